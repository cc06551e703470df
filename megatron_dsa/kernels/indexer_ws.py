"""The lightning indexer's FP8 scoring as a warp-specialised Gluon kernel on Hopper.

It writes what ``indexer._score_kernel`` writes for one chunk of query rows: the fp32 scores
``ks[s] * sum_j w[t, j] * relu(q8[t, j] . k8[s])`` of every key up to the query block's last
eligible one (-inf where a key is not eligible) and the largest score of every run of G keys.

The keys are the products' rows and the heads of two queries their columns (one query at 128
heads): a [64 keys, 2 x HI] product, so the sum over each query's heads runs along accumulator
rows (in-thread adds, then two shuffles), with every column's weight held in registers. The key
scales, the mask, the stores and the run maxima stay in the layout that sum leaves (each key's
value in its quad of lanes): nothing after the products goes through shared memory. One program
scores a block of 8 queries (4 at 128 heads) against all of their keys:
- a producer warpgroup copies 64-key blocks of k (8 KB, 16-byte ``cp.async``) into NBUF buffers;
- two consumer warpgroups each own half of the block's queries, held in shared memory for the
  whole program (64 KB in all at 64 heads), as two groups. Each key block is two m64nNk32
  products a consumer; the first group's relu-weight-sum runs while the second's product does,
  and the other consumer's products fill the tensor cores meanwhile.
A block of k is read from L2 once per program (the Triton kernel reloads each query tile, 8 KB a
head, once per 128-key tile). Needs sm_90, e4m3 q and k with 128 dims, and 16, 32, 64 or 128
indexer heads; ``supported`` says why not otherwise, and the Triton kernel is the fallback
(``benchmarks/NOTES.md`` has the measurements).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._gluon import HAS_GLUON, device_why_not

if HAS_GLUON:
    from ._gluon import cp, cta_barrier, gl, gluon, hopper, mbarrier

DIM = 128  # the indexer's head dim: one 128-byte (swizzled) row of e4m3 a head
KEYS = 64  # keys a block: the products' M
NBUF = 4  # key blocks in flight (8 KB each)
# ``score_kernel="auto"`` takes this kernel from this many indexer heads; None: nowhere. At
# DeepSeek-V3.2's 64 x 128 indexer and 128K it measured slower than the Triton kernel on an H100
# (benchmarks/results/h100/tune_dsa_topk_score_gluon_128k.json: 172.3 against 155.4 ms).
AUTO_MIN_HEADS: Optional[int] = None
# Registers a thread (setmaxnreg): 168 at launch over 12 warps; the consumers hold two [64, 128]
# fp32 products and 64 weights.
LAUNCH_REGS, CONSUMER_REGS, PRODUCER_REGS = 168, 232, 40


def group_queries(heads: int) -> int:
    """Queries whose heads one product holds as its columns: two (128 columns at 64 heads), one
    at 128 heads. (Four at 32 heads would also make 128 columns, and spill.)"""
    return 2 if heads <= 64 else 1


def queries_per_block(heads: int) -> int:
    """Query rows one program scores: two consumers x two groups."""
    return 4 * group_queries(heads)


def supported(q: torch.Tensor, k: torch.Tensor, fp8: bool, runs: int) -> Optional[str]:
    """None when the kernel can score these indexer inputs (q [B, Sq, HI, DI], k [B, Sk, DI],
    quantised to e4m3 by ``indexer_topk`` when ``fp8``) with runs of ``runs`` keys' maxima (0:
    none), else why not."""
    why = device_why_not(q)
    if why is not None:
        return why
    if not fp8:
        return "needs the FP8 indexer (fp8=True)"
    HI, DI = q.shape[2], q.shape[3]
    if DI != DIM or k.shape[-1] != DIM:
        return f"needs the indexer's head dim {DIM} for q and k, got {DI} / {k.shape[-1]}"
    if HI not in (16, 32, 64, 128):
        return f"needs 16, 32, 64 or 128 indexer heads, got {HI}"
    if runs and (runs > KEYS or KEYS % runs):
        return f"needs runs of keys that divide {KEYS}, got {runs}"
    return None


if HAS_GLUON:
    BK = gl.constexpr(KEYS)
    DK = gl.constexpr(DIM)
    # the operands' 128-byte swizzled e4m3 tiles (both K-major); 16-byte copies of 128-byte rows
    OP_L = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2))
    LD_L = gl.constexpr(gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0]))

    @gluon.constexpr_function
    def _acc_layout(NQ):
        # a consumer's product: [64 keys, NQ (query, head) columns], fp32
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, NQ, 32])

    @gluon.jit
    def _weights(W, wb, q_off, row0, n_rows, s_ws, s_wh, HI: gl.constexpr, QH: gl.constexpr):
        # the weight of each product column (query row0 + n // HI, head n % HI), as the product
        # holds its columns; rows past the chunk weigh 0
        n = gl.arange(0, QH * HI, layout=gl.SliceLayout(0, _acc_layout(QH * HI)))
        r = row0 + n // HI
        return gl.load(W + wb + (q_off + r).to(gl.int64) * s_ws + (n % HI) * s_wh, mask=r < n_rows, other=0.0)

    @gluon.jit
    def _per_query(x, HI: gl.constexpr, QH: gl.constexpr):
        # [64 keys, QH x HI columns] -> [64 keys, QH]: the sum over each query's heads, left in
        # the layout the reduction gives (each key's value in its quad of lanes), so that nothing
        # after it goes through shared memory
        return gl.sum(gl.reshape(x, [BK, QH, HI]), axis=2)

    @gluon.jit
    def _runs(x, G: gl.constexpr, QH: gl.constexpr):
        # [64 keys, QH] -> [64 // G runs, QH]: each run of G consecutive keys' maximum (G keys sit
        # in G lane groups of a warp: shuffles)
        return gl.max(gl.reshape(x, [BK // G, G, QH]), axis=1)

    @gluon.jit
    def _write(s, keys, rows, OUT, ob, s_or, GMAX, gb, s_gr, Sk, n_rows, G: gl.constexpr, QH: gl.constexpr):
        # the scores [64 keys, QH rows] and each run of G keys' maximum
        row_ok = rows < n_rows
        gl.store(OUT + ob + rows.to(gl.int64) * s_or + keys, s, mask=row_ok & (keys < Sk))
        if G > 0:
            run = _runs(keys, G, QH) // G  # a run's last key // G
            run_rows = _runs(rows, G, QH)
            gl.store(GMAX + gb + run_rows.to(gl.int64) * s_gr + run, _runs(s, G, QH),
                     mask=(run_rows < n_rows) & (run < gl.cdiv(Sk, G)))

    @gluon.jit
    def _finish(s, ks, keys, rows, QPOS, KPOS, QDOC, KDOC, q_off, full, Sk, n_rows, HAS_DOC: gl.constexpr):
        # the key scales, then -inf where a key is not eligible for a row (the Triton kernel's
        # order); the positions are read only for the blocks that need them (the diagonal's)
        s = s * ks
        if not full:
            kin = keys < Sk
            rin = rows < n_rows
            elig = gl.load(KPOS + keys, mask=kin, other=0) <= gl.load(QPOS + q_off + rows, mask=rin, other=0)
            if HAS_DOC:
                elig = elig & (gl.load(KDOC + keys, mask=kin, other=-2) == gl.load(QDOC + q_off + rows, mask=rin,
                                                                                    other=-1))
            s = gl.where(elig & kin, s, float("-inf"))
        return s

    @gluon.jit
    def _score_consumer(q_s, k_s, ready, free, W, KS, OUT, GMAX, QPOS, KPOS, QDOC, KDOC, wb, ksb, ob, gb,
                        s_ws, s_wh, s_or, s_gr, Sk, n_rows, q_off, row0, i_lo, i_hi, bfull,
                        C: gl.constexpr, HI: gl.constexpr, QH: gl.constexpr, HAS_DOC: gl.constexpr,
                        G: gl.constexpr, NB: gl.constexpr):
        NQ: gl.constexpr = QH * HI
        acc_l: gl.constexpr = _acc_layout(NQ)
        ra = row0 + 2 * C * QH  # this consumer's two groups of QH rows (chunk-relative)
        rb = ra + QH
        w_a = _weights(W, wb, q_off, ra, n_rows, s_ws, s_wh, HI, QH)
        w_b = _weights(W, wb, q_off, rb, n_rows, s_ws, s_wh, HI, QH)
        # each [64 keys, QH] value's key (within the block) and query (within the group), in the
        # layout the head sums come in
        cells = gl.zeros([BK, NQ], gl.int32, layout=acc_l)
        kidx = _per_query(cells + gl.arange(0, BK, layout=gl.SliceLayout(1, acc_l))[:, None], HI, QH) // HI
        qidx = _per_query(cells + (gl.arange(0, NQ, layout=gl.SliceLayout(0, acc_l)) // HI)[None, :], HI, QH) // HI
        # key blocks wholly before the block's earliest document (packed sequences): -inf, unscored
        none = gl.where(kidx < 0, 0.0, float("-inf"))
        for i in range(0, gl.minimum(i_lo, i_hi)):
            _write(none, i * BK + kidx, ra + qidx, OUT, ob, s_or, GMAX, gb, s_gr, Sk, n_rows, G, QH)
            _write(none, i * BK + kidx, rb + qidx, OUT, ob, s_or, GMAX, gb, s_gr, Sk, n_rows, G, QH)
        zero = gl.zeros([BK, NQ], gl.float32, layout=acc_l)
        for i in range(i_lo, i_hi):
            j = i - i_lo
            buf = j % NB
            k0 = i * BK
            keys = k0 + kidx
            full = k0 + BK <= bfull  # every key of the block eligible for every row
            mbarrier.wait(ready.index(buf), (j // NB) & 1)
            hopper.fence_async_shared()  # the copies' writes, before the products read them
            kb = k_s.index(buf)
            acc_a = hopper.warpgroup_mma(kb, q_s.index(2 * C).permute((1, 0)), zero, use_acc=False, is_async=True)
            acc_b = hopper.warpgroup_mma(kb, q_s.index(2 * C + 1).permute((1, 0)), zero, use_acc=False,
                                         is_async=True)
            # the block's key scales while the products run
            ks = gl.load(KS + ksb + keys, mask=keys < Sk, other=0.0)
            acc_a = hopper.warpgroup_mma_wait(num_outstanding=1, deps=(acc_a,))
            s_a = _per_query(gl.maximum(acc_a, 0.0) * w_a[None, :], HI, QH)
            acc_b = hopper.warpgroup_mma_wait(num_outstanding=0, deps=(acc_b,))
            mbarrier.arrive(free.index(buf))
            s_b = _per_query(gl.maximum(acc_b, 0.0) * w_b[None, :], HI, QH)
            s_a = _finish(s_a, ks, keys, ra + qidx, QPOS, KPOS, QDOC, KDOC, q_off, full, Sk, n_rows, HAS_DOC)
            _write(s_a, keys, ra + qidx, OUT, ob, s_or, GMAX, gb, s_gr, Sk, n_rows, G, QH)
            s_b = _finish(s_b, ks, keys, rb + qidx, QPOS, KPOS, QDOC, KDOC, q_off, full, Sk, n_rows, HAS_DOC)
            _write(s_b, keys, rb + qidx, OUT, ob, s_or, GMAX, gb, s_gr, Sk, n_rows, G, QH)

    @gluon.jit
    def _score_producer(q_s, k_s, ready, free, K, kb_off, s_ks, Sk, i_lo, i_hi, NB: gl.constexpr):
        # Copies key block i into buffer (i - i_lo) % NB once both consumers are done with it.
        r = gl.arange(0, BK, layout=gl.SliceLayout(1, LD_L))
        d = gl.arange(0, DK, layout=gl.SliceLayout(0, LD_L))
        for i in range(i_lo, i_hi):
            j = i - i_lo
            buf = j % NB
            keys = i * BK + r
            mbarrier.wait(free.index(buf), ((j // NB) & 1) ^ 1)
            cp.async_copy_global_to_shared(k_s.index(buf), K + kb_off + keys.to(gl.int64)[:, None] * s_ks + d[None, :],
                                           mask=(keys < Sk)[:, None])  # keys past Sk: zero rows
            cp.mbarrier_arrive(ready.index(buf), increment_count=False)

    @gluon.jit
    def _score_ws_kernel(Q, K, W, KS, OUT, GMAX, BLIM, BLO, BFULL, QPOS, KPOS, QDOC, KDOC,
                         Sk, n_rows, q_off, n_blocks,
                         s_qb, s_qs, s_kb, s_ks, s_wb, s_ws, s_wh, s_ksb, s_ob, s_or, s_gb, s_gr,
                         HI: gl.constexpr, QH: gl.constexpr, HAS_DOC: gl.constexpr, G: gl.constexpr,
                         NB: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        blk = n_blocks - 1 - gl.program_id(0)  # the latest rows (the most keys) first
        b = gl.program_id(1).to(gl.int64)
        NQ: gl.constexpr = QH * HI
        row0 = blk * (4 * QH)
        blim = gl.load(BLIM + b * n_blocks + blk)
        blo = gl.load(BLO + b * n_blocks + blk)
        bfull = gl.load(BFULL + b * n_blocks + blk)
        i_lo = blo // BK
        i_hi = gl.cdiv(blim, BK)
        q_s = gl.allocate_shared_memory(gl.float8e4nv, [4, NQ, DK], OP_L)
        k_s = gl.allocate_shared_memory(gl.float8e4nv, [NB, BK, DK], OP_L)
        ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(NB):
            mbarrier.init(ready.index(j), count=4 * 32)  # every producer thread's copies
            mbarrier.init(free.index(j), count=2)  # both consumers
        # the block's queries, once: group g holds rows row0 + g * QH .. as [QH x HI heads, 128]
        # (rows past the chunk are zero)
        n = gl.arange(0, NQ, layout=gl.SliceLayout(1, LD_L))
        d = gl.arange(0, DK, layout=gl.SliceLayout(0, LD_L))
        for g in gl.static_range(4):
            r = row0 + g * QH + n // HI
            src = Q + b * s_qb + (q_off + r).to(gl.int64) * s_qs + (n % HI) * DK
            cp.async_copy_global_to_shared(q_s.index(g), src[:, None] + d[None, :], mask=(r < n_rows)[:, None])
        cp.commit_group()
        cp.wait_group(0)
        hopper.fence_async_shared()
        cta_barrier()
        wb = b * s_wb
        ob = b * s_ob
        gb = b * s_gb
        ksb = b * s_ksb
        gl.warp_specialize([
            (_score_consumer, (q_s, k_s, ready, free, W, KS, OUT, GMAX, QPOS, KPOS, QDOC, KDOC, wb, ksb, ob, gb,
                               s_ws, s_wh, s_or, s_gr, Sk, n_rows, q_off, row0, i_lo, i_hi, bfull,
                               0, HI, QH, HAS_DOC, G, NB)),
            (_score_consumer, (q_s, k_s, ready, free, W, KS, OUT, GMAX, QPOS, KPOS, QDOC, KDOC, wb, ksb, ob, gb,
                               s_ws, s_wh, s_or, s_gr, Sk, n_rows, q_off, row0, i_lo, i_hi, bfull,
                               1, HI, QH, HAS_DOC, G, NB)),
            (_score_producer, (q_s, k_s, ready, free, K, b * s_kb, s_ks, Sk, i_lo, i_hi, NB)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def score_chunk_ws(q8, k8, w, ks, out, gmax, blim, blo, bfull, q_pos, k_pos, q_doc, k_doc,
                   n_rows: int, q_off: int, runs: int, has_doc: bool) -> None:
    """``indexer._score_kernel``'s launch for one chunk of ``n_rows`` rows from ``q_off``, on the
    inputs as ``indexer_topk`` prepares them (e4m3 q8 and k8 and fp32 weights with contiguous
    rows, int64 positions and documents) where ``supported`` allows: the per-block bounds ``blim``
    / ``blo`` / ``bfull`` [B, n_blocks] over blocks of ``queries_per_block(HI)`` rows."""
    B, _, HI, _ = q8.shape
    n_blocks = blim.shape[1]
    if n_rows == 0:
        return
    _score_ws_kernel[(n_blocks, B)](
        q8, k8, w, ks, out, gmax, blim, blo, bfull, q_pos, k_pos, q_doc, k_doc,
        k8.shape[1], n_rows, q_off, n_blocks,
        q8.stride(0), q8.stride(1), k8.stride(0), k8.stride(1), w.stride(0), w.stride(1), w.stride(2),
        ks.stride(0), out.stride(0), out.stride(1), gmax.stride(0), gmax.stride(1),
        HI=HI, QH=group_queries(HI), HAS_DOC=has_doc, G=runs, NB=NBUF, CONSUMER_REGS=CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=LAUNCH_REGS)
