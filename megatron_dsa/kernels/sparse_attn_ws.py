"""Warp-specialised Gluon kernels on Hopper: the sparse MLA forward (64 heads a program) and the
stored-scores backward's dkv product (every head a program).

One program per (query token, block of 64 heads): three warpgroups that share one shared-memory
plan (Q 72 KB, two 64-key buffers of the gathered latent rows, 144 KB; 225 KB in all):
- a producer gathers the selected rows with ``cp.async`` (16-byte copies, invalid slots
  zero-filled), even key blocks into buffer 0, odd ones into buffer 1, each buffer in two parts
  (value columns 0..255; the rest) with their own ready / free barriers, so a part is refilled as
  soon as the warpgroups that read it are done;
- two consumer warpgroups take alternate key blocks (ping-pong). Each makes its block's scores
  as a full 64 x 64 product over the 576-wide latent (both operands from shared memory: 4 KB read
  per 131 KFLOP, the tensor cores' rate; splitting a block's keys between two warpgroups, as the
  Triton kernel's 8-warp products do, reads Q twice and runs at two thirds of it). Each keeps the
  output for half of the value columns (64 x 256 fp32 in registers), added to by one m64n256
  product a block over four value tiles read as one operand. The running maximum passes
  from one to the other through shared memory; each block's probabilities are used in registers
  by the warpgroup that made them and through shared memory by the other (the even block's in
  the rope tile of its own buffer, which only its scores read).
The log-sum-exp and the output follow ``_softmax_finish``'s rules: a row without a valid key gives
0 and -inf. A last block of fewer than 64 heads runs with zero rows in place of the missing heads.
Needs sm_90 (wgmma, setmaxnreg), bf16 and the 512 + 64 latent of DeepSeek-V3.2 and GLM-5;
``supported`` says why not otherwise, and the Triton kernel (``sparse_attn.sparse_attn_fwd``) is
the fallback.

The dkv product (``dkv_product_ws``), persistent: about one program an SM takes work items
(token, 256 value columns; the 64 rope columns in a launch of their own, 64 an item) in turn,
skipping the items whose token has no key in the launch's key range. Its producer copies an
item's q (and dO) columns for every head, up to 128, into a slot, then the item's 64-key blocks of
stored score gradients (and probabilities) into a buffer as soon as it is free
(``DKV_VALUE_PIPELINE`` / ``DKV_ROPE_PIPELINE``). In the value launch both consumers read every
block, each for its half of the item's columns (the stored scores pass through shared memory once
for 256 columns); in the rope launch they take alternate blocks. A consumer's step is a [64 keys,
128 columns] product with the stored [heads, keys] tiles read transposed as A, then a
row-swizzled shared copy to 4 columns a thread and one 16-byte fp32 add per (key, 4 columns); a
buffer is free again once its products are done, so the next block's copy overlaps the adds. L2
bounds it: Nsight Compute puts the L2 at 87% of its peak throughput, with the adds into the dkv
rows and the stored scores' reads.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import LOG2E
from ._gluon import HAS_GLUON, aligned_rows, device_why_not

if HAS_GLUON:
    from ._gluon import cp, cta_barrier, gl, gluon, hopper, mbarrier, triton

HEADS = 64  # heads a program: the products' M
# A last block of fewer heads runs with its missing rows zero (their outputs are not stored). The
# forward reads the same gathered rows whatever the heads, so a half-empty block costs about what
# a full one does: ``attn_fwd_kernel="auto"`` takes this kernel from AUTO_MIN_HEADS heads, where it
# measured faster than the Triton kernel.
AUTO_MIN_HEADS = 32
# The backward's dkv product: at 128 heads it measured faster than the Triton kernel, below not.
DKV_AUTO_MIN_HEADS = 128
V_DIM = 512  # value columns: two halves of 256, one a consumer
TILE = 64  # latent columns a shared tile (128-byte rows, the 128-byte swizzle)
# Registers a thread (setmaxnreg): 168 a thread at launch over 12 warps; the consumers take 232,
# the producer 40 (ptxas, sm_90a: no spills).
LAUNCH_REGS, CONSUMER_REGS, PRODUCER_REGS = 168, 232, 40
# The dkv product's two launches as (q and dO slots, 64-key score buffers, registers a thread of
# a consumer and of the producer; ptxas, sm_90a: no spills). The value columns go in pairs of
# 128-column blocks, both consumers on every block: the stored scores pass through shared memory
# twice for the 512 columns, not four times. Their two q and two dO tiles (128 KB) and the adds'
# shared copy (64 KB) leave room for one buffer. The rope columns go unpaired, the consumers on
# alternate blocks, which needs two buffers. 64K x 128 heads on an H100, the kernel alone: pairs
# 171.2 ms, 391.2 at 128K; unpaired (every launch as the rope one) 181.0 / 405.5, with three
# buffers 201.2; the adds from the products' registers 8-byte 207.5 / 462.6, 16-byte with the q
# and dO columns copied permuted 182.8 / 425.4 (a warp's adds then touch 8 rows of 64 bytes, from
# the shared copy 2 rows of 256; results/h100/tune_dkv_product_{pairs,permuted_adds}_128heads.json).
DKV_VALUE_PIPELINE = (1, 1, 184, 120)
DKV_ROPE_PIPELINE = (1, 2, 192, 104)
DKV_HEADS = 128  # heads the dkv product sums in one program (its products' K)


def supported(q: torch.Tensor, kv: Optional[torch.Tensor], v_dim: int,
              dout: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when the kernels can run these inputs (the forward's q and kv; the dkv product's q and
    dO, ``kv`` None), else why not."""
    why = device_why_not(q)
    if why is not None:
        return why
    named = [(n, t) for n, t in (("q", q), ("kv", kv), ("dO", dout)) if t is not None]
    if any(t.dtype != torch.bfloat16 for _, t in named):
        return "needs bf16 " + " / ".join(f"{n} (got {t.dtype})" for n, t in named)
    D = q.shape[3]
    if v_dim != V_DIM or D != V_DIM + TILE:
        return f"needs the {V_DIM} + {TILE} latent (Dqk {V_DIM + TILE} / Dv {V_DIM}), got Dqk {D} / Dv {v_dim}"
    if not aligned_rows(*(t for _, t in named)):
        return "needs unit-stride rows, 16-byte aligned, with strides in multiples of 16 elements"
    return None


if HAS_GLUON:
    HB = gl.constexpr(HEADS)
    BK = gl.constexpr(64)  # keys a block; the two consumers take alternate blocks
    TW = gl.constexpr(TILE)
    LOG2E_C = gl.constexpr(LOG2E)
    # a consumer's products: scores [64 heads, 64 keys], its output half [64, 256] with the
    # probabilities as its A operand from registers; the 128-byte-swizzled shared tiles
    SCORES_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16]))
    OUT_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16]))
    P_L = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=OUT_L.value, k_width=2))
    SMEM_L = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    ROW_L = gl.constexpr(gl.SliceLayout(1, SCORES_L.value))  # per head, as the scores hold it
    OUT_ROW_L = gl.constexpr(gl.SliceLayout(1, OUT_L.value))

    @gluon.jit
    def _consumer_state():
        """A consumer's output half, running maximum (log2 units) and sum."""
        o = gl.zeros([HB, 4 * TW], gl.float32, layout=OUT_L)
        m = gl.full([HB], float("-inf"), gl.float32, layout=ROW_L)
        l = gl.zeros([HB], gl.float32, layout=ROW_L)
        return o, m, l

    @gluon.jit
    def _score_part(q_s, kv_s, acc, PART, Q0: gl.constexpr):
        # a runtime loop over a part's 4 tiles: unrolled, the descriptors were hoisted out of the
        # key loop and spilled
        for c in range(4):
            acc = hopper.warpgroup_mma(q_s.index(Q0 + c), kv_s.index(PART * 4 + c).permute((1, 0)), acc, is_async=True)
        return acc

    @gluon.jit
    def _key_valid(ib, blk, TOPK, Sk):
        kk = blk * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, SCORES_L))
        idx = gl.load(ib + kk, mask=kk < TOPK, other=-1)
        return (idx >= 0) & (idx < Sk)

    @gluon.jit
    def _pv(p, kv_s, o, PART: gl.constexpr):
        # one m64n256 product over a part's 4 tiles, read as one [64 keys, 256 columns] operand
        v = kv_s._reinterpret(gl.bfloat16, [4, BK, 4 * TW], SMEM_L).index(PART)
        return hopper.warpgroup_mma(p, v, o, is_async=True)

    @gluon.jit
    def _store_half(O, LSE, ob, lb, s_oh, nh, m, l_own, l_s_own, l_s_other, bar_own, bar_other,
                    o, HALF: gl.constexpr, WRITE_LSE: gl.constexpr):
        row_l: gl.constexpr = OUT_ROW_L
        l_own = gl.convert_layout(l_own, row_l)
        m = gl.convert_layout(m, row_l)
        l_s_own.store(l_own)
        mbarrier.arrive(bar_own)
        mbarrier.wait(bar_other, 0)
        l = l_own + l_s_other.load(row_l)
        has = l > 0.0
        inv = 1.0 / gl.where(has, l, 1.0)
        rows = gl.arange(0, HB, layout=row_l)
        cols = gl.arange(0, 4 * TW, layout=gl.SliceLayout(0, OUT_L))
        out = (o * inv[:, None]).to(O.dtype.element_ty)
        gl.store(O + ob + rows[:, None] * s_oh + (HALF * 4 * TW) + cols[None, :], out, mask=(rows < nh)[:, None])
        if WRITE_LSE:
            lse = gl.where(has, (m + gl.log2(gl.where(has, l, 1.0))) / LOG2E_C, float("-inf"))
            gl.store(LSE + lb + rows, lse, mask=rows < nh)

    @gluon.jit
    def _online_softmax(s, m_run, m_own, l):
        """A block's probabilities against the running maximum ``m_run`` (log2 units), and the
        factor that takes this consumer's sum and output from its last maximum ``m_own`` to the
        new one: (p, new maximum, sum, factor). A row with no key yet stays empty (no NaN)."""
        m_new = gl.maximum(m_run, gl.max(s, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_own - m_safe)
        p = gl.exp2(s - m_safe[:, None])
        return p, m_new, l * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _consumer0(q_s, kv_s, r_s, s1_s, m0_s, m1_s, l0_s, l1_s, bars, IDX, ib_off, O, LSE, ob, lb, s_oh,
                   nh, Sk, TOPK, scale_log2, NT: gl.constexpr):
        # Even key blocks (buffer 0); owns the left half of the value columns.
        k_ready, k_free, m0_bar, m1_bar, s0_bar, s1_bar, l0_bar, l1_bar = bars
        ib = IDX + ib_off
        o, m, l = _consumer_state()
        s0_s = r_s.index(0)  # buffer 0's rope tile: free once this block's scores are made
        n_pairs = gl.cdiv(TOPK, 2 * BK)
        for i in range(n_pairs):
            ph = i & 1
            z = (i >> 30) & 1  # 0; unknown to the compiler, it keeps the descriptors in the loop
            valid = _key_valid(ib, 2 * i, TOPK, Sk)  # issued before the wait: off the critical path
            acc = hopper.warpgroup_mma_init(gl.zeros([HB, BK], gl.float32, layout=SCORES_L))
            mbarrier.wait(k_ready.index(0), ph)  # buffer 0, value columns 0..255
            hopper.fence_async_shared()
            acc = _score_part(q_s, kv_s, acc, 0 + z, 0)
            mbarrier.wait(k_ready.index(1), ph)  # buffer 0, the rest
            hopper.fence_async_shared()
            acc = _score_part(q_s, kv_s, acc, 1 + z, 4)
            acc = hopper.warpgroup_mma(q_s.index(NT - 1), r_s.index(0 + z).permute((1, 0)), acc, is_async=True)
            s = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            s = gl.where(valid[None, :], s * scale_log2, float("-inf"))
            p, m, l, alpha = _online_softmax(s, m, m, l)
            m0_s.store(m)
            mbarrier.arrive(m0_bar)
            o = o * gl.convert_layout(alpha, OUT_ROW_L)[:, None]
            o = _pv(gl.convert_layout(p.to(gl.bfloat16), P_L), kv_s, o, 0)
            o = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(o,))
            mbarrier.arrive(k_free.index(0))  # buffer 0's left value columns: only this consumer reads them
            # the other consumer's maximum after the odd block: rescale to it
            mbarrier.wait(m1_bar, ph)
            m1 = m1_s.load(ROW_L)
            beta = gl.exp2(m - gl.where(m1 == float("-inf"), 0.0, m1))
            m = m1
            s0_s.store((p * beta[:, None]).to(gl.bfloat16))
            hopper.fence_async_shared()
            mbarrier.arrive(s0_bar)
            l = l * beta
            o = o * gl.convert_layout(beta, OUT_ROW_L)[:, None]
            mbarrier.wait(s1_bar, ph)
            o = _pv(s1_s, kv_s, o, 2)
            o = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(o,))
            mbarrier.arrive(k_free.index(3))  # buffer 1's left value columns
        _store_half(O, LSE, ob, lb, s_oh, nh, m, l, l0_s, l1_s, l0_bar, l1_bar, o, 0, False)

    @gluon.jit
    def _consumer1(q_s, kv_s, r_s, s1_s, m0_s, m1_s, l0_s, l1_s, bars, IDX, ib_off, O, LSE, ob, lb, s_oh,
                   nh, Sk, TOPK, scale_log2, NT: gl.constexpr):
        # Odd key blocks (buffer 1); owns the right half of the value columns.
        k_ready, k_free, m0_bar, m1_bar, s0_bar, s1_bar, l0_bar, l1_bar = bars
        ib = IDX + ib_off
        o, m, l = _consumer_state()
        s0_s = r_s.index(0)
        n_pairs = gl.cdiv(TOPK, 2 * BK)
        for i in range(n_pairs):
            ph = i & 1
            z = (i >> 30) & 1  # 0; unknown to the compiler, it keeps the descriptors in the loop
            valid = _key_valid(ib, 2 * i + 1, TOPK, Sk)  # issued before the wait: off the critical path
            acc = hopper.warpgroup_mma_init(gl.zeros([HB, BK], gl.float32, layout=SCORES_L))
            mbarrier.wait(k_ready.index(2), ph)  # buffer 1, value columns 256.. and the rope
            hopper.fence_async_shared()
            acc = _score_part(q_s, kv_s, acc, 3 + z, 4)
            acc = hopper.warpgroup_mma(q_s.index(NT - 1), r_s.index(1 + z).permute((1, 0)), acc, is_async=True)
            mbarrier.wait(k_ready.index(3), ph)  # buffer 1, value columns 0..255
            hopper.fence_async_shared()
            acc = _score_part(q_s, kv_s, acc, 2 + z, 0)
            s = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            s = gl.where(valid[None, :], s * scale_log2, float("-inf"))
            mbarrier.wait(m0_bar, ph)
            m0 = m0_s.load(ROW_L)
            p, m, l, alpha = _online_softmax(s, m0, m, l)
            m1_s.store(m)
            mbarrier.arrive(m1_bar)
            o = o * gl.convert_layout(alpha, OUT_ROW_L)[:, None]
            pb = p.to(gl.bfloat16)
            o = _pv(gl.convert_layout(pb, P_L), kv_s, o, 3)
            s1_s.store(pb)
            hopper.fence_async_shared()
            mbarrier.arrive(s1_bar)
            mbarrier.wait(s0_bar, ph)
            o = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(o,))
            mbarrier.arrive(k_free.index(2))  # buffer 1's right part
            o = _pv(s0_s, kv_s, o, 1)
            o = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(o,))
            mbarrier.arrive(k_free.index(1))  # buffer 0's right part (and the probabilities in its rope tile)
        _store_half(O, LSE, ob, lb, s_oh, nh, m, l, l1_s, l0_s, l1_bar, l0_bar, o, 1, True)

    @gluon.jit
    def _producer(q_s, kv_s, r_s, s1_s, m0_s, m1_s, l0_s, l1_s, bars, IDX, ib_off, KV, kv_off, s_ks, Sk, TOPK,
                  NT: gl.constexpr):
        # Gathers the selected latent rows, block 2i into buffer 0 and 2i + 1 into buffer 1.
        k_ready, k_free, m0_bar, m1_bar, s0_bar, s1_bar, l0_bar, l1_bar = bars
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        ib = IDX + ib_off
        kvb = KV + kv_off
        cols = gl.arange(0, TW, layout=gl.SliceLayout(0, ld))
        n_pairs = gl.cdiv(TOPK, 2 * BK)
        for i in range(n_pairs):
            ph = (i & 1) ^ 1
            kk0 = (2 * i) * BK + gl.arange(0, BK, layout=gl.SliceLayout(1, ld))
            idx0 = gl.load(ib + kk0, mask=kk0 < TOPK, other=-1)
            v0 = (idx0 >= 0) & (idx0 < Sk)
            r0 = kvb + gl.where(v0, idx0, 0).to(gl.int64) * s_ks
            kk1 = kk0 + BK
            idx1 = gl.load(ib + kk1, mask=kk1 < TOPK, other=-1)
            v1 = (idx1 >= 0) & (idx1 < Sk)
            r1 = kvb + gl.where(v1, idx1, 0).to(gl.int64) * s_ks
            # in the order the consumers read them, each under its barrier pair: buffer 0's value
            # columns 0..255 (barriers 0), buffer 1's 256..511 and rope (2), buffer 0's 256..511 and
            # rope (1), buffer 1's 0..255 (3); the value tiles' part in kv_s is 2 * buffer + half
            mbarrier.wait(k_free.index(0), ph)
            _gather(kv_s, 0, r0, v0, cols, 0)
            cp.mbarrier_arrive(k_ready.index(0), increment_count=False)
            mbarrier.wait(k_free.index(2), ph)
            _gather(kv_s, 3, r1, v1, cols, 4)
            cp.async_copy_global_to_shared(r_s.index(1), r1[:, None] + (8 * TW + cols)[None, :], mask=v1[:, None])
            cp.mbarrier_arrive(k_ready.index(2), increment_count=False)
            mbarrier.wait(k_free.index(1), ph)
            _gather(kv_s, 1, r0, v0, cols, 4)
            cp.async_copy_global_to_shared(r_s.index(0), r0[:, None] + (8 * TW + cols)[None, :], mask=v0[:, None])
            cp.mbarrier_arrive(k_ready.index(1), increment_count=False)
            mbarrier.wait(k_free.index(3), ph)
            _gather(kv_s, 2, r1, v1, cols, 0)
            cp.mbarrier_arrive(k_ready.index(3), increment_count=False)

    @gluon.jit
    def _gather(kv_s, PART: gl.constexpr, rows, valid, cols, C0: gl.constexpr):
        for c in gl.static_range(4):
            cp.async_copy_global_to_shared(kv_s.index(PART * 4 + c), rows[:, None] + ((C0 + c) * TW + cols)[None, :],
                                           mask=valid[:, None])

    @gluon.jit
    def _sparse_fwd_ws_kernel(Q, KV, IDX, O, LSE, H, Sk, TOPK, NHB, scale_log2,
                             s_qb, s_qs, s_qh, s_kb, s_ks, s_ib, s_is, s_ob, s_os, s_oh, s_lb, s_ls,
                             NT: gl.constexpr, PRODUCER_WARPS: gl.constexpr, WG1_REGS: gl.constexpr,
                             PRODUCER_REGS: gl.constexpr):
        pid = gl.program_id(0)
        t = (pid // NHB).to(gl.int64)
        hb = pid % NHB
        b = gl.program_id(1).to(gl.int64)
        h0 = hb * HB
        nh = H - h0  # heads of this block that exist (the last block's may be fewer than 64)
        vec_l: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        q_s = gl.allocate_shared_memory(gl.bfloat16, [NT, HB, TW], SMEM_L)
        kv_s = gl.allocate_shared_memory(gl.bfloat16, [16, BK, TW], SMEM_L)  # (buffer, half) parts of 4 value tiles
        r_s = gl.allocate_shared_memory(gl.bfloat16, [2, BK, TW], SMEM_L)  # the buffers' rope tiles
        s1_s = gl.allocate_shared_memory(gl.bfloat16, [HB, BK], SMEM_L)
        m0_s = gl.allocate_shared_memory(gl.float32, [HB], vec_l)
        m1_s = gl.allocate_shared_memory(gl.float32, [HB], vec_l)
        l0_s = gl.allocate_shared_memory(gl.float32, [HB], vec_l)
        l1_s = gl.allocate_shared_memory(gl.float32, [HB], vec_l)
        k_ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        one = gl.allocate_shared_memory(gl.int64, [6, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(4):
            mbarrier.init(k_ready.index(j), count=PRODUCER_WARPS * 32)
            mbarrier.init(k_free.index(j), count=1)
        for j in gl.static_range(6):
            mbarrier.init(one.index(j), count=1)
        # the query's 64 heads, once; missing heads are zero rows
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rows = gl.arange(0, HB, layout=gl.SliceLayout(1, ld))
        cols = gl.arange(0, TW, layout=gl.SliceLayout(0, ld))
        qb = Q + b * s_qb + t * s_qs + (h0 + rows).to(gl.int64)[:, None] * s_qh
        for c in gl.static_range(NT):
            cp.async_copy_global_to_shared(q_s.index(c), qb + (c * TW + cols)[None, :], mask=(rows < nh)[:, None])
        cp.commit_group()
        cp.wait_group(0)
        hopper.fence_async_shared()
        cta_barrier()
        bars = (k_ready, k_free, one.index(0), one.index(1), one.index(2), one.index(3), one.index(4), one.index(5))
        ib_off = b * s_ib + t * s_is
        ob = b * s_ob + t * s_os + h0.to(gl.int64) * s_oh
        lb = b * s_lb + t * s_ls + h0
        gl.warp_specialize([
            (_consumer0, (q_s, kv_s, r_s, s1_s, m0_s, m1_s, l0_s, l1_s, bars, IDX, ib_off, O, LSE, ob, lb, s_oh,
                          nh, Sk, TOPK, scale_log2, NT)),
            (_consumer1, (q_s, kv_s, r_s, s1_s, m0_s, m1_s, l0_s, l1_s, bars, IDX, ib_off, O, LSE, ob, lb, s_oh,
                          nh, Sk, TOPK, scale_log2, NT)),
            (_producer, (q_s, kv_s, r_s, s1_s, m0_s, m1_s, l0_s, l1_s, bars, IDX, ib_off, KV, b * s_kb, s_ks, Sk, TOPK,
                         NT)),
        ], [4, PRODUCER_WARPS], [WG1_REGS, PRODUCER_REGS])


    # The backward's dkv product, persistent: a program takes work items (token, 256 value or 64
    # rope columns) in turn; its producer fills NQ slots of the items' q (and dO) columns and NBUF
    # buffers of 64-key blocks of the stored scores, as far ahead as they are free; in pairs both
    # consumers take every block (each its 128 of the item's columns), else alternate blocks.
    DBK = gl.constexpr(64)
    # the products' copy for the adds: 4 columns a thread, 16-byte adds; its 16-byte units
    # permuted by the row (rows 512 B apart would put the 8 rows of a store in the same banks)
    ADD_L = gl.constexpr(gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0]))
    ACC_SMEM_L = gl.constexpr(gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0]))

    @gluon.jit
    def _key_range(SEG, seg_off, pass_id, TOPK, PASSES: gl.constexpr):
        # this pass's slots [lo, hi) of the key-sorted row, else all of them; as 64-key blocks,
        # none where the range is empty (no copy of the item's q and dO either)
        if PASSES > 1:
            lo = gl.load(SEG + seg_off + pass_id)
            hi = gl.load(SEG + seg_off + pass_id + 1)
        else:
            lo = 0
            hi = TOPK
        b0 = lo // DBK
        return lo, hi, b0, gl.where(hi > lo, gl.cdiv(hi, DBK), b0)

    @gluon.jit
    def _dkv_item(i, NCB, t0, COL0: gl.constexpr, ITEM: gl.constexpr):
        # the program's i-th work item: (token, its first latent column); neighbouring programs
        # take one token's column blocks together, so its stored scores are read once from HBM
        w = gl.program_id(0) + i * gl.num_programs(0)
        return (t0 + w // NCB).to(gl.int64), COL0 + (w % NCB) * ITEM

    @gluon.jit
    def _dkv_consumer(q_s, do_s, ds_s, p_s, acc_s, bars, IDX, SEG, DKV, b, n_items, NCB, t0, pass_id, Sk, TOPK,
                      s_ib, s_is, s_sb, s_ss, s_dkb, s_dks, COL0: gl.constexpr, BC: gl.constexpr,
                      HAS_DO: gl.constexpr, C: gl.constexpr, PASSES: gl.constexpr, NQ: gl.constexpr,
                      NBUF: gl.constexpr, PAIRS: gl.constexpr):
        q_ready, q_free, k_ready, k_free = bars
        ITEM: gl.constexpr = 2 * BC if PAIRS else BC
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BC, 16])
        g = 0  # blocks of the program's earlier items
        u = 0  # its earlier items with keys in this range: the q slots' count
        for i in range(n_items):
            t, col0 = _dkv_item(i, NCB, t0, COL0, ITEM)
            lo, hi, b0, b1 = _key_range(SEG, b * s_sb + t * s_ss, pass_id, TOPK, PASSES)
            if b1 > b0:
                _dkv_consume_item(q_s, do_s, ds_s, p_s, acc_s, bars, IDX, DKV, b, t, col0, lo, hi, b0, b1, g, u,
                                  Sk, s_ib, s_is, s_dkb, s_dks, acc_l, BC, HAS_DO, C, NQ, NBUF, PAIRS)
                g += b1 - b0
                u += 1

    @gluon.jit
    def _dkv_consume_item(q_s, do_s, ds_s, p_s, acc_s, bars, IDX, DKV, b, t, col0, lo, hi, b0, b1, g, u, Sk,
                          s_ib, s_is, s_dkb, s_dks, acc_l: gl.constexpr, BC: gl.constexpr, HAS_DO: gl.constexpr,
                          C: gl.constexpr, NQ: gl.constexpr, NBUF: gl.constexpr, PAIRS: gl.constexpr):
        # one item's blocks whose running count g + j has this consumer's parity C; in pairs,
        # every block, for this consumer's half of the item's columns
        q_ready, q_free, k_ready, k_free = bars
        ib = IDX + b * s_ib + t * s_is
        if PAIRS:
            cols = col0 + C * BC + gl.arange(0, BC, layout=gl.SliceLayout(0, ADD_L))
            j0 = 0
            STEP: gl.constexpr = 1
            QT: gl.constexpr = 2
            QC: gl.constexpr = C
        else:
            cols = col0 + gl.arange(0, BC, layout=gl.SliceLayout(0, ADD_L))
            j0 = (g + C) % 2
            STEP: gl.constexpr = 2
            QT: gl.constexpr = 1
            QC: gl.constexpr = 0
        slot = u % NQ
        mbarrier.wait(q_ready.index(slot), (u // NQ) & 1)
        for j in range(j0, b1 - b0, STEP):
            gj = g + j
            buf = gj % NBUF
            kk = (b0 + j) * DBK + gl.arange(0, DBK, layout=gl.SliceLayout(1, ADD_L))
            idx = gl.load(ib + kk, mask=(kk >= lo) & (kk < hi), other=-1)
            valid = (idx >= 0) & (idx < Sk)
            acc = hopper.warpgroup_mma_init(gl.zeros([DBK, BC], gl.float32, layout=acc_l))
            mbarrier.wait(k_ready.index(buf), (gj // NBUF) & 1)
            hopper.fence_async_shared()
            # the stored [heads, keys] tiles read as [keys, heads]: the products' A
            acc = hopper.warpgroup_mma(ds_s.index(buf).permute((1, 0)), q_s.index(slot * QT + QC), acc, is_async=True)
            if HAS_DO:
                acc = hopper.warpgroup_mma(p_s.index(buf).permute((1, 0)), do_s.index(slot * QT + QC), acc,
                                           is_async=True)
            acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(k_free.index(buf))
            acc_s.index(C).store(acc)
            vals = acc_s.index(C).load(ADD_L)
            rows = DKV + b * s_dkb + gl.where(valid, idx, 0).to(gl.int64) * s_dks
            gl.atomic_add(rows[:, None] + cols[None, :], vals, mask=valid[:, None], sem="relaxed")
        mbarrier.arrive(q_free.index(slot))

    @gluon.jit
    def _dkv_producer(q_s, do_s, ds_s, p_s, bars, Q, DO, DS, P, SEG, b, n_items, NCB, t0, pass_id, H, TOPK,
                      s_qb, s_qs, s_qh, s_ob, s_os, s_oh, s_gb, s_gs, s_gh, s_sb, s_ss,
                      COL0: gl.constexpr, BC: gl.constexpr, HP: gl.constexpr, HAS_DO: gl.constexpr,
                      PASSES: gl.constexpr, NQ: gl.constexpr, NBUF: gl.constexpr, PAIRS: gl.constexpr):
        # Each item with keys in this range: its q (and dO) columns for every head into the next
        # of NQ slots, then its blocks of stored score gradients (and probabilities) into buffer
        # (running block count) % NBUF; missing heads are zero rows
        q_ready, q_free, k_ready, k_free = bars
        # 16-byte copies, a warp's lanes across a row of the tile (BC or 64 columns)
        ld_q: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BC // 8), BC // 8], [4, 1], [1, 0])
        ld_s: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        h = gl.arange(0, HP, layout=gl.SliceLayout(1, ld_q))
        hm = (h < H)[:, None]
        c = gl.arange(0, BC, layout=gl.SliceLayout(0, ld_q))
        hs = gl.arange(0, HP, layout=gl.SliceLayout(1, ld_s))
        hsm = (hs < H)[:, None]
        slots = gl.arange(0, DBK, layout=gl.SliceLayout(0, ld_s))
        QT: gl.constexpr = 2 if PAIRS else 1  # q (and dO) tiles of BC columns an item
        g = 0
        u = 0  # items with keys in this range (the others are skipped by both sides)
        for i in range(n_items):
            t, col0 = _dkv_item(i, NCB, t0, COL0, QT * BC)
            lo, hi, b0, b1 = _key_range(SEG, b * s_sb + t * s_ss, pass_id, TOPK, PASSES)
            if b1 > b0:
                _dkv_produce_item(q_s, do_s, ds_s, p_s, bars, Q, DO, DS, P, b, t, t0, col0, b0, b1, g, u, TOPK,
                                  h, hm, c, hs, hsm, slots, s_qb, s_qs, s_qh, s_ob, s_os, s_oh, s_gb, s_gs, s_gh,
                                  HAS_DO, NQ, NBUF, QT)
                g += b1 - b0
                u += 1

    @gluon.jit
    def _dkv_produce_item(q_s, do_s, ds_s, p_s, bars, Q, DO, DS, P, b, t, t0, col0, b0, b1, g, u, TOPK,
                          h, hm, c, hs, hsm, slots, s_qb, s_qs, s_qh, s_ob, s_os, s_oh, s_gb, s_gs, s_gh,
                          HAS_DO: gl.constexpr, NQ: gl.constexpr, NBUF: gl.constexpr, QT: gl.constexpr):
        q_ready, q_free, k_ready, k_free = bars
        slot = u % NQ
        mbarrier.wait(q_free.index(slot), ((u // NQ) & 1) ^ 1)
        for x in range(QT):  # a loop, not unrolled: one set of pointers in registers
            cx = col0 + x * c.shape[0] + c
            cp.async_copy_global_to_shared(q_s.index(slot * QT + x), Q + b * s_qb + t * s_qs + (h * s_qh)[:, None]
                                           + cx[None, :], mask=hm)
            if HAS_DO:
                cp.async_copy_global_to_shared(do_s.index(slot * QT + x), DO + b * s_ob + t * s_os
                                               + (h * s_oh)[:, None] + cx[None, :], mask=hm)
        cp.mbarrier_arrive(q_ready.index(slot), increment_count=False)
        base = b * s_gb + (t - t0) * s_gs + (hs * s_gh)[:, None]
        for j in range(b1 - b0):
            gj = g + j
            buf = gj % NBUF
            kk = (b0 + j) * DBK + slots
            # whole blocks (16-byte copies): slots outside the range are multiplied but not added
            ok = hsm & (kk < TOPK)[None, :]
            mbarrier.wait(k_free.index(buf), ((gj // NBUF) & 1) ^ 1)
            cp.async_copy_global_to_shared(ds_s.index(buf), DS + base + kk[None, :], mask=ok)
            if HAS_DO:
                cp.async_copy_global_to_shared(p_s.index(buf), P + base + kk[None, :], mask=ok)
            cp.mbarrier_arrive(k_ready.index(buf), increment_count=False)

    @gluon.jit
    def _sparse_dkv_product_ws_kernel(DS, P, Q, DO, IDX, SEG, DKV, H, Sk, TOPK, NCB, n_work, t0, pass_id,
                                      s_gb, s_gs, s_gh, s_qb, s_qs, s_qh, s_ob, s_os, s_oh, s_ib, s_is, s_sb, s_ss,
                                      s_dkb, s_dks, COL0: gl.constexpr, BC: gl.constexpr, HP: gl.constexpr,
                                      HAS_DO: gl.constexpr, PASSES: gl.constexpr, NQ: gl.constexpr,
                                      NBUF: gl.constexpr, PAIRS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                      PRODUCER_REGS: gl.constexpr):
        b = gl.program_id(1).to(gl.int64)
        n_items = gl.cdiv(n_work - gl.program_id(0), gl.num_programs(0))  # this program's work items
        op_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        QT: gl.constexpr = 2 if PAIRS else 1  # q (and dO) tiles an item
        q_s = gl.allocate_shared_memory(gl.bfloat16, [NQ * QT, HP, BC], op_l)
        do_s = gl.allocate_shared_memory(gl.bfloat16, [NQ * QT if HAS_DO else 1, HP if HAS_DO else 16, BC], op_l)
        ds_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, HP, DBK], SMEM_L)
        p_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF if HAS_DO else 1, HP if HAS_DO else 16, DBK], SMEM_L)
        acc_s = gl.allocate_shared_memory(gl.float32, [2, DBK, BC], ACC_SMEM_L)
        # ready: the 4-warp producer's copies have landed; free: the consumer(s) reading it are done
        q_ready = gl.allocate_shared_memory(gl.int64, [NQ, 1], mbarrier.MBarrierLayout())
        q_free = gl.allocate_shared_memory(gl.int64, [NQ, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(NQ):
            mbarrier.init(q_ready.index(j), count=4 * 32)
            mbarrier.init(q_free.index(j), count=2)  # both consumers
        for j in gl.static_range(NBUF):
            mbarrier.init(k_ready.index(j), count=4 * 32)
            mbarrier.init(k_free.index(j), count=QT)  # in pairs both consumers read every block
        bars = (q_ready, q_free, k_ready, k_free)
        gl.warp_specialize([
            (_dkv_consumer, (q_s, do_s, ds_s, p_s, acc_s, bars, IDX, SEG, DKV, b, n_items, NCB, t0, pass_id, Sk, TOPK,
                             s_ib, s_is, s_sb, s_ss, s_dkb, s_dks, COL0, BC, HAS_DO, 0, PASSES, NQ, NBUF, PAIRS)),
            (_dkv_consumer, (q_s, do_s, ds_s, p_s, acc_s, bars, IDX, SEG, DKV, b, n_items, NCB, t0, pass_id, Sk, TOPK,
                             s_ib, s_is, s_sb, s_ss, s_dkb, s_dks, COL0, BC, HAS_DO, 1, PASSES, NQ, NBUF, PAIRS)),
            (_dkv_producer, (q_s, do_s, ds_s, p_s, bars, Q, DO, DS, P, SEG, b, n_items, NCB, t0, pass_id, H,
                             TOPK, s_qb, s_qs, s_qh, s_ob, s_os, s_oh, s_gb, s_gs, s_gh, s_sb, s_ss, COL0, BC, HP,
                             HAS_DO, PASSES, NQ, NBUF, PAIRS)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def sparse_attn_fwd_ws(q, kv, idx, v_dim, scale):
    """(out [B, Sq, H, v_dim], lse [B, Sq, H] fp32, natural log) as ``sparse_attn.sparse_attn_fwd``."""
    why = supported(q, kv, v_dim)
    if why is not None:
        raise ValueError(f"the Gluon sparse forward cannot run these inputs: {why}")
    B, Sq, H, D = q.shape
    out = torch.empty(B, Sq, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Sq, H, dtype=torch.float32, device=q.device)
    if Sq == 0 or H == 0 or idx.shape[-1] == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    NHB = triton.cdiv(H, HEADS)
    _sparse_fwd_ws_kernel[(Sq * NHB, B)](
        q, kv, idx, out, lse, H, kv.shape[1], idx.shape[-1], NHB, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0), idx.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        NT=D // TILE, PRODUCER_WARPS=4, WG1_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=4, maxnreg=LAUNCH_REGS)
    return out, lse


def dkv_product_supported(ds, q, dout) -> Optional[str]:
    """None when the Gluon dkv product can run (``supported``'s conditions, every head in one
    program: up to 128, the stored scores' rows 16-byte aligned), else why not."""
    why = supported(q, None, dout.shape[-1], dout)
    if why is None and q.shape[2] > DKV_HEADS:
        why = f"sums at most {DKV_HEADS} heads in one program, got {q.shape[2]}"
    if why is None and (ds.shape[-1] % 16 or not aligned_rows(ds)):
        why = f"needs top-k a multiple of 16 and the stored scores' rows 16-byte aligned, got top-k {ds.shape[-1]}"
    return why


def dkv_product_ws(ds, p, q, dout, idx, seg, dkv, t0: int, t1: int, pass_id: int, passes: int, v_dim: int):
    """``sparse_attn._dkv_product``'s contract for rows t0..t1 and key range ``pass_id``: dkv +=
    (ds^T q + p^T dO) over every head, one fp32 add per (token, selected key, column)."""
    why = dkv_product_supported(ds, q, dout)
    if why is not None:
        raise ValueError(f"the Gluon dkv product cannot run these inputs: {why}")
    B, _, H, D = q.shape
    if t1 <= t0 or H == 0 or idx.shape[-1] == 0:
        return
    HP = max(16, triton.next_power_of_2(H))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    for col0, ncol, BC, has_do, (nq, nbuf, consumer_regs, producer_regs) in (
            (0, v_dim, 128, True, DKV_VALUE_PIPELINE), (v_dim, D - v_dim, TILE, False, DKV_ROPE_PIPELINE)):
        ncb = ncol // (BC * (2 if has_do else 1))  # the value columns in pairs
        n_work = (t1 - t0) * ncb
        grid = (max(1, min(n_work, -(-sms // B))), B)  # persistent: about one program an SM
        _sparse_dkv_product_ws_kernel[grid](
            ds, p, q, dout, idx, seg, dkv, H, dkv.shape[1], idx.shape[-1], ncb, n_work, t0, pass_id,
            ds.stride(0), ds.stride(1), ds.stride(2), q.stride(0), q.stride(1), q.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2), idx.stride(0), idx.stride(1), seg.stride(0), seg.stride(1),
            dkv.stride(0), dkv.stride(1),
            COL0=col0, BC=BC, HP=HP, HAS_DO=has_do, PASSES=passes, NQ=nq, NBUF=nbuf, PAIRS=has_do,
            CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, num_warps=4, maxnreg=LAUNCH_REGS)
