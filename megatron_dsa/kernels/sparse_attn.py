"""Sparse MLA attention over top-k indices, absorbed (MQA) form, forward + backward in Triton.

q [B, Sq, H, Dqk], kv [B, Sk, Dqk] (values = kv[..., :v_dim]), topk_idx [B, Sq, K] int32 (-1 skipped).

One program per (query token, block of heads, batch). The heads of a token are the rows of the
matrix products: every selected latent row is gathered once per head block and used by all of
its heads, so from 64 heads up a program's products are 64-row tiles (the tensor cores' M
dimension) and the kernel is bound by arithmetic, not by the gathers. Below 64 heads one block
holds every head (16 or 32 rows). The head blocks of a token are neighbouring programs, so the
second block's gathers find the rows in L2. Dqk is split into the value part (v_dim, padded to a
power of two) and the rest (rope dims, padded), so any Dqk/v_dim works (576 = 512 + 64,
192 = 128 + 64, 96 = 64 + 32, ...). On Hopper (bf16, the 512 + 64 latent) the forward is
``sparse_attn_ws``'s warp-specialised Gluon kernel instead from ``sparse_attn_ws.AUTO_MIN_HEADS``
heads (1.9x at 64, its products a full 64-key block per warpgroup); ``KernelOptions.attn_fwd_kernel``
chooses.

Backward: dq per program (fp32 in registers); the latent rows' gradient dkv by fp32 atomic adds,
one 576-wide row per (token, head block, selected key). Those adds are the backward's bound at
few heads (1.55e11 of them at 128K): HBM-resident targets take ~3.9e11 adds/s, L2-resident ones
~2.5x that. So with ``passes`` > 1 the backward runs once per range of keys whose dkv rows fit in
L2: each row's selected keys are sorted, every program handles its keys in the pass's range and
adds its dq share to an fp32 buffer. The queries' tensors are re-read once per pass.

The split backward (from 64-head blocks, where one kernel does not fit an SM, and by default at
any head count on a wide latent, ``split_backward``): in its "recompute" form dq per (token, head
block), then dkv with the selected keys as the products' rows, its value dims in four quarters
whose gradients are added as soon as they are made (one [BK, D/4] fp32 accumulator live at a
time; the whole [BK, 576] row spilled registers: 553 ms against 197 at 32K x 128 heads).
The dq kernel recomputes the probabilities and score gradients the dkv kernel also makes (1.4x
the backward's products) and holds a [64, 576] fp32 accumulator, which spills; and at 128 heads
the dkv kernel adds every (token, key, column) twice, once per head block. The stored forms
(``KernelOptions.split_bwd``) keep what one kernel made, in kv's dtype (the rounding the products
apply anyway), a chunk of rows at a time (``KernelOptions.workspace_bytes``):
- "stored_ds": the dkv kernel stores its score gradients and dq is their product with the
  gathered rows, in column blocks (no recomputation; a [64, 256] or [128, 128] accumulator,
  every head up to 128 in one program, so that a token's rows are gathered once);
- "stored_scores" (the default): a kernel of its own makes and stores the probabilities and
  score gradients, a gathered product over 64-wide slices of the latent with q and dO streamed
  from L2 (holding them whole left one program of 4 warps an SM); dkv is then their product with
  q and dO summed over every head (up to 128) before one add per (token, key, column), in key
  ranges whose dkv rows L2 holds, and dq as above.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import (HAS_TRITON, LOG2E, _dot, _softmax_finish, _softmax_step, interpreting, is_fp32, next_pow2,
                      rows_within, selection, triton, tl)
from . import sparse_attn_ws
from ._gluon import chosen
from ..kernel_options import DEFAULT_OPTIONS, KernelOptions, Tiles

MAX_HEAD_BLOCK = 64  # rows of one program's products: the tensor cores' M at 64 and above


def head_block(H: int) -> int:
    """Heads per program: every head up to 64 (padded to 16 or 32), else blocks of 64."""
    return min(next_pow2(H, 16), MAX_HEAD_BLOCK)


if HAS_TRITON:

    @triton.jit
    def _program_coords(NHB, HB: tl.constexpr, H, t0=0):
        """(token, heads of this program, their mask, batch) for a launch over the tokens from
        ``t0``; head blocks of one token are consecutive program ids, so they run side by side
        and share the gathered rows in L2."""
        pid = tl.program_id(0)
        t = t0 + pid // NHB
        h = (pid % NHB) * HB + tl.arange(0, HB)
        return t.to(tl.int64), h, h < H, tl.program_id(1).to(tl.int64)

    @triton.jit
    def _tile_mask(rows_ok, d, D: tl.constexpr, DP: tl.constexpr):
        """The mask of a [rows, DP] tile whose last DP - D columns are padding. Without padding it
        is the row mask alone, constant along each row, so the loads stay 16-byte vectors (a
        column mask Triton cannot prove constant makes them 2-byte scalar loads)."""
        if D == DP:
            return rows_ok[:, None]
        else:
            return rows_ok[:, None] & (d < D)[None, :]

    @triton.jit
    def _gather(base, rowoff, valid, d, D: tl.constexpr, DP: tl.constexpr):
        """Rows of a [rows, D] tile at int32 element offsets ``rowoff`` from one base pointer: the
        [BK, D] address tile stays 32-bit (64-bit pointers per element cost twice the registers)."""
        return tl.load(base + (rowoff[:, None] + d[None, :]), mask=_tile_mask(valid, d, D, DP), other=0.0)

    @triton.jit
    def _key_slots(SEG, b, t, pass_id, stride_sb, stride_ss, TOPK, PASSES: tl.constexpr):
        """The slots [lo, hi) of this row that the launch handles: this pass's key range of the
        key-sorted row (PASSES > 1), else all of them."""
        if PASSES > 1:
            sp = SEG + b * stride_sb + t * stride_ss + pass_id
            return tl.load(sp), tl.load(sp + 1)
        else:
            return 0, TOPK

    @triton.jit
    def _selected(ib, k0, hi, Sk, stride_ks, BK: tl.constexpr):
        """One block of selected keys: (key index, valid, int32 row offset into KV). The int32
        index times the row stride stays 32-bit: Sk x Dqk < 2^31 (3.7M rows of 576)."""
        kk = k0 + tl.arange(0, BK)
        idx = tl.load(ib + kk, mask=kk < hi, other=-1)
        valid = (idx >= 0) & (idx < Sk)
        return idx, valid, idx * stride_ks

    @triton.jit
    def _softmax_stats(LSE, DELTA, b, t, h, hm, stride_lb, stride_ls):
        """Per head: the forward's log-sum-exp in log2 units (+inf for a row without keys, so its
        probabilities are 0) and delta = sum(dO * O)."""
        lse = tl.load(LSE + b * stride_lb + t * stride_ls + h, mask=hm, other=float("-inf"))
        delta = tl.load(DELTA + b * stride_lb + t * stride_ls + h, mask=hm, other=0.0)
        return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), delta

    @triton.jit
    def _query_rows(Q, b, t, h, hm, stride_qb, stride_qs, stride_qh,
                    DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr):
        """A head block's q: its value dims [HB, D1] and rope dims [HB, D2] (q1 again without rope)."""
        qb = Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
        d1 = tl.arange(0, D1)
        q1 = tl.load(qb + d1[None, :], mask=_tile_mask(hm, d1, DV, D1), other=0.0)
        if DR > 0:
            d2 = tl.arange(0, D2)
            q2 = tl.load(qb + DV + d2[None, :], mask=_tile_mask(hm, d2, DR, D2), other=0.0)
        else:
            q2 = q1
        return q1, q2

    @triton.jit
    def _latent_rows(kvb, rowoff, valid, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr):
        """The gathered latent rows: value dims [BK, D1] and rope dims [BK, D2] (kv1 again without rope)."""
        kv1 = _gather(kvb, rowoff, valid, tl.arange(0, D1), DV, D1)
        if DR > 0:
            kv2 = _gather(kvb + DV, rowoff, valid, tl.arange(0, D2), DR, D2)
        else:
            kv2 = kv1
        return kv1, kv2

    @triton.jit
    def _probs_and_score_grads(q1, q2, do, kv1, kv2, valid, lse2, delta, scale, scale_log2,
                               DR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """The backward's recomputation for one block of selected keys, heads as rows: the
        probabilities p and the score gradients ds = p (dO . v - delta) scale, in kv's dtype."""
        s = _dot(q1, tl.trans(kv1), IEEE, UPCAST)
        if DR > 0:
            s += _dot(q2, tl.trans(kv2), IEEE, UPCAST)
        p = tl.exp2(s * scale_log2 - lse2[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        dp = _dot(do, tl.trans(kv1), IEEE, UPCAST)
        return p, (p * (dp - delta[:, None]) * scale).to(kv1.dtype)

    @triton.jit
    def _add_head_sum(PSUM, b, t, k0, hi, sums, stride_pb, stride_ps, BK: tl.constexpr):
        """Adds a block of keys' probabilities summed over a head block ([BK]) to the slots k0..
        of the row's head sum: fp32 adds, since the head blocks of a token share the row (K adds
        a program, against the dkv's K x 576)."""
        kk = k0 + tl.arange(0, BK)
        tl.atomic_add(PSUM + b * stride_pb + t * stride_ps + kk, sums, mask=kk < hi, sem="relaxed")

    @triton.jit
    def _sparse_fwd_kernel(
        Q, KV, IDX, O, LSE,
        Sk, TOPK, NHB, H, scale_log2,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        HB: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        t, h, hm, b = _program_coords(NHB, HB, H)
        d1 = tl.arange(0, D1)
        q1, q2 = _query_rows(Q, b, t, h, hm, stride_qb, stride_qs, stride_qh, DV, D1, DR, D2)
        m_i = tl.full((HB,), float("-inf"), tl.float32)
        l_i = tl.zeros((HB,), tl.float32)
        acc = tl.zeros((HB, D1), tl.float32)
        ib = IDX + b * stride_ib + t * stride_is
        kvb = KV + b * stride_kb
        for k0 in range(0, TOPK, BK):
            idx, valid, rowoff = _selected(ib, k0, TOPK, Sk, stride_ks, BK)
            kv1, kv2 = _latent_rows(kvb, rowoff, valid, DV, D1, DR, D2)
            s = _dot(q1, tl.trans(kv1), IEEE, UPCAST)
            if DR > 0:
                s += _dot(q2, tl.trans(kv2), IEEE, UPCAST)
            m_i, l_i, acc = _softmax_step(s, kv1, valid, scale_log2, m_i, l_i, acc, IEEE, UPCAST)
        out, lse = _softmax_finish(m_i, l_i, acc)
        ob = O + b * stride_ob + t * stride_os + h[:, None] * stride_oh + d1[None, :]
        tl.store(ob, out.to(O.dtype.element_ty), mask=_tile_mask(hm, d1, DV, D1))
        tl.store(LSE + b * stride_lb + t * stride_ls + h, lse, mask=hm)

    @triton.jit
    def _sparse_bwd_kernel(
        Q, KV, IDX, SEG, DO, LSE, DELTA, DQ, DKV, PSUM,
        Sk, TOPK, NHB, H, scale, scale_log2, pass_id, t0,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_sb, stride_ss,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        stride_db, stride_ds, stride_dh,
        stride_dkb, stride_dks,
        HB: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        PASSES: tl.constexpr, FIRST: tl.constexpr, HEAD_SUM: tl.constexpr,
    ):
        # The backward in one kernel (below 64 heads), one program per (token, head block):
        # recompute the probabilities p and the score gradients ds of the selected keys, then dq
        # and the rows' gradient dkv (fp32 atomic adds). Q/DO/LSE/DELTA strides as named; DQ has
        # its own (an fp32 buffer when passes add to it). PASSES > 1: this launch takes the slots
        # SEG[b, t, pass_id] .. SEG[b, t, pass_id + 1] of a key-sorted IDX, and dq is added to
        # DQ (FIRST: written). The launch covers the tokens from t0; DQ holds rows from t0.
        # HEAD_SUM: p summed over the block's heads is added to PSUM (IDX's strides), the sparse
        # KL's target, which the recomputed p gives for the price of a column sum.
        t, h, hm, b = _program_coords(NHB, HB, H, t0)
        lo, hi = _key_slots(SEG, b, t, pass_id, stride_sb, stride_ss, TOPK, PASSES)
        if FIRST or hi > lo:
            d1 = tl.arange(0, D1)
            d2 = tl.arange(0, D2)
            q1, q2 = _query_rows(Q, b, t, h, hm, stride_qb, stride_qs, stride_qh, DV, D1, DR, D2)
            do = tl.load(DO + b * stride_ob + t * stride_os + h[:, None] * stride_oh + d1[None, :],
                         mask=_tile_mask(hm, d1, DV, D1), other=0.0)
            lse2, delta = _softmax_stats(LSE, DELTA, b, t, h, hm, stride_lb, stride_ls)
            dq1 = tl.zeros((HB, D1), tl.float32)
            dq2 = tl.zeros((HB, D2), tl.float32)
            ib = IDX + b * stride_ib + t * stride_is
            kvb = KV + b * stride_kb
            dkvb = DKV + b * stride_dkb
            for k0 in range(lo, hi, BK):
                idx, valid, rowoff = _selected(ib, k0, hi, Sk, stride_ks, BK)
                kv1, kv2 = _latent_rows(kvb, rowoff, valid, DV, D1, DR, D2)
                p, dsc = _probs_and_score_grads(q1, q2, do, kv1, kv2, valid, lse2, delta, scale, scale_log2,
                                                DR, IEEE, UPCAST)
                if HEAD_SUM:
                    _add_head_sum(PSUM, b, t, k0, hi, tl.sum(p, 0), stride_ib, stride_is, BK)
                dq1 += _dot(dsc, kv1, IEEE, UPCAST)
                if DR > 0:
                    dq2 += _dot(dsc, kv2, IEEE, UPCAST)
                dk1 = _dot(tl.trans(dsc), q1, IEEE, UPCAST) + _dot(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)
                dkoff = idx * stride_dks
                tl.atomic_add(dkvb + (dkoff[:, None] + d1[None, :]), dk1, mask=_tile_mask(valid, d1, DV, D1),
                              sem="relaxed")
                if DR > 0:
                    dk2 = _dot(tl.trans(dsc), q2, IEEE, UPCAST)
                    tl.atomic_add(dkvb + DV + (dkoff[:, None] + d2[None, :]), dk2,
                                  mask=_tile_mask(valid, d2, DR, D2), sem="relaxed")
            dqb = DQ + b * stride_db + (t - t0) * stride_ds + h[:, None] * stride_dh
            m1 = _tile_mask(hm, d1, DV, D1)
            if not FIRST:
                dq1 += tl.load(dqb + d1[None, :], mask=m1, other=0.0)
            tl.store(dqb + d1[None, :], dq1.to(DQ.dtype.element_ty), mask=m1)
            if DR > 0:
                m2 = _tile_mask(hm, d2, DR, D2)
                if not FIRST:
                    dq2 += tl.load(dqb + DV + d2[None, :], mask=m2, other=0.0)
                tl.store(dqb + DV + d2[None, :], dq2.to(DQ.dtype.element_ty), mask=m2)


    @triton.jit
    def _sparse_scores_kernel(
        Q, KV, IDX, DO, LSE, DELTA, PSUM, DS, P,
        Sk, TOPK, NKB, NHG, H, scale, scale_log2, t0,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        stride_gb, stride_gs, stride_gh,
        HN: tl.constexpr, DV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, EVEN_D: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HEAD_SUM: tl.constexpr,
    ):
        # The "stored_scores" backward's first kernel as a gathered matrix product, one program
        # per (token, group of HN heads, block of BK selected keys): s^T = kv q^T and
        # dp^T = kv[:, :DV] dO^T over BD-wide slices of the latent, every operand streamed
        # through shared memory (the token's q and dO from L2), then the probabilities and score
        # gradients stored in kv's dtype (DS and P [B, rows from t0, H, TOPK], 0 where no key).
        # Holding a head block's q and dO whole (139 KB at 576 / 512 dims) left one program of 4
        # warps an SM and nothing to overlap the gathers with; slices leave room for pipeline
        # stages and a second program. HEAD_SUM: as the dkv kernel.
        pid = tl.program_id(0)
        t = (t0 + pid // (NHG * NKB)).to(tl.int64)
        r = pid % (NHG * NKB)
        h = (r // NKB) * HN + tl.arange(0, HN)
        hm = h < H
        k0 = (r % NKB) * BK
        b = tl.program_id(1).to(tl.int64)
        ib = IDX + b * stride_ib + t * stride_is
        idx, valid, rowoff = _selected(ib, k0, TOPK, Sk, stride_ks, BK)
        kvb = KV + b * stride_kb + rowoff[:, None]
        qb = Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
        ob = DO + b * stride_ob + t * stride_os + h[:, None] * stride_oh
        d = tl.arange(0, BD)
        st = tl.zeros((BK, HN), tl.float32)
        dpt = tl.zeros((BK, HN), tl.float32)
        for c in range(0, DV, BD):  # the value dims: both products
            kvc = tl.load(kvb + (c + d)[None, :], mask=_cols(valid, c + d, DV, EVEN_D), other=0.0)
            qc = tl.load(qb + (c + d)[None, :], mask=_cols(hm, c + d, DV, EVEN_D), other=0.0)
            oc = tl.load(ob + (c + d)[None, :], mask=_cols(hm, c + d, DV, EVEN_D), other=0.0)
            st += _dot(kvc, tl.trans(qc), IEEE, UPCAST)
            dpt += _dot(kvc, tl.trans(oc), IEEE, UPCAST)
        for c in range(DV, D, BD):  # the rope dims: the scores only
            kvc = tl.load(kvb + (c + d)[None, :], mask=_cols(valid, c + d, D, EVEN_D), other=0.0)
            qc = tl.load(qb + (c + d)[None, :], mask=_cols(hm, c + d, D, EVEN_D), other=0.0)
            st += _dot(kvc, tl.trans(qc), IEEE, UPCAST)
        lse2, delta = _softmax_stats(LSE, DELTA, b, t, h, hm, stride_lb, stride_ls)
        pt = tl.exp2(st * scale_log2 - lse2[None, :])
        pt = tl.where(valid[:, None], pt, 0.0)
        if HEAD_SUM:  # the heads are the columns: a sum within each key's row
            _add_head_sum(PSUM, b, t, k0, TOPK, tl.sum(pt, 1), stride_ib, stride_is, BK)
        kk = k0 + tl.arange(0, BK)
        slot = b * stride_gb + (t - t0) * stride_gs + h[None, :] * stride_gh + kk[:, None]
        ok = (kk < TOPK)[:, None] & hm[None, :]
        dst = pt * (dpt - delta[None, :]) * scale
        tl.store(DS + slot, dst.to(DS.dtype.element_ty), mask=ok)
        tl.store(P + slot, pt.to(P.dtype.element_ty), mask=ok)

    @triton.jit
    def _sparse_dq_kernel(
        Q, KV, IDX, DO, LSE, DELTA, DQ,
        Sk, TOPK, NHB, H, scale, scale_log2,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        HB: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # dq alone (the split backward's first kernel), one program per (token, head block):
        # recompute p and ds of the selected keys, dq = ds kv. DQ has Q's strides.
        t, h, hm, b = _program_coords(NHB, HB, H)
        d1 = tl.arange(0, D1)
        d2 = tl.arange(0, D2)
        q1, q2 = _query_rows(Q, b, t, h, hm, stride_qb, stride_qs, stride_qh, DV, D1, DR, D2)
        do = tl.load(DO + b * stride_ob + t * stride_os + h[:, None] * stride_oh + d1[None, :],
                     mask=_tile_mask(hm, d1, DV, D1), other=0.0)
        lse2, delta = _softmax_stats(LSE, DELTA, b, t, h, hm, stride_lb, stride_ls)
        dq1 = tl.zeros((HB, D1), tl.float32)
        dq2 = tl.zeros((HB, D2), tl.float32)
        ib = IDX + b * stride_ib + t * stride_is
        kvb = KV + b * stride_kb
        for k0 in range(0, TOPK, BK):
            idx, valid, rowoff = _selected(ib, k0, TOPK, Sk, stride_ks, BK)
            kv1, kv2 = _latent_rows(kvb, rowoff, valid, DV, D1, DR, D2)
            _, dsc = _probs_and_score_grads(q1, q2, do, kv1, kv2, valid, lse2, delta, scale, scale_log2,
                                            DR, IEEE, UPCAST)
            dq1 += _dot(dsc, kv1, IEEE, UPCAST)
            if DR > 0:
                dq2 += _dot(dsc, kv2, IEEE, UPCAST)
        dqb = DQ + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
        tl.store(dqb + d1[None, :], dq1.to(DQ.dtype.element_ty), mask=_tile_mask(hm, d1, DV, D1))
        if DR > 0:
            tl.store(dqb + DV + d2[None, :], dq2.to(DQ.dtype.element_ty), mask=_tile_mask(hm, d2, DR, D2))

    @triton.jit
    def _cols(rows_ok, d, DV: tl.constexpr, EXACT: tl.constexpr):
        """The mask of a [rows, columns d] tile whose columns run to DV: the row mask alone when the
        blocks cover exactly DV (EXACT: 16-byte vector accesses), else also d < DV. The dkv
        kernel's value quarters, and the stored scores' blocks of slots (DV = TOPK)."""
        if EXACT:
            return rows_ok[:, None]
        else:
            return rows_ok[:, None] & (d < DV)[None, :]

    @triton.jit
    def _sparse_dkv_kernel(
        Q, KV, IDX, SEG, DO, LSE, DELTA, DKV, PSUM, DS,
        Sk, TOPK, NHB, H, scale, scale_log2, pass_id, t0,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_sb, stride_ss,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        stride_dkb, stride_dks,
        stride_gb, stride_gs, stride_gh,
        HB: tl.constexpr, DV: tl.constexpr, DQ4: tl.constexpr, EXACT: tl.constexpr, DR: tl.constexpr,
        D2: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, PASSES: tl.constexpr,
        HEAD_SUM: tl.constexpr, STORE_DS: tl.constexpr,
    ):
        # dkv alone for 64-head blocks, with the selected keys as the products' rows: s^T = kv q^T
        # [BK, HB], then dkv = ds^T q + p^T do. Every product reads q and do as its second
        # operand (plain or transposed), so one shared-memory copy of each serves all of them.
        # The value dims go in four quarters of DQ4 and each quarter's gradient is added as soon
        # as it is made: one [BK, DQ4] fp32 accumulator is live at a time, not the whole row.
        # HEAD_SUM: the block's p summed over its heads is added to PSUM (IDX's strides).
        # STORE_DS: the score gradients are also stored, DS [B, rows from t0, H, TOPK] (slots
        # last, IDX's slot order), for the dq product that replaces the recomputing dq kernel.
        # The launch covers the tokens from t0.
        t, h, hm, b = _program_coords(NHB, HB, H, t0)
        lo, hi = _key_slots(SEG, b, t, pass_id, stride_sb, stride_ss, TOPK, PASSES)
        if hi > lo:
            c0 = tl.arange(0, DQ4)
            c1 = DQ4 + c0
            c2 = 2 * DQ4 + c0
            c3 = 3 * DQ4 + c0
            d2 = tl.arange(0, D2)
            qb = Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
            ob = DO + b * stride_ob + t * stride_os + h[:, None] * stride_oh
            q0 = tl.load(qb + c0[None, :], mask=_cols(hm, c0, DV, EXACT), other=0.0)
            q1 = tl.load(qb + c1[None, :], mask=_cols(hm, c1, DV, EXACT), other=0.0)
            q2 = tl.load(qb + c2[None, :], mask=_cols(hm, c2, DV, EXACT), other=0.0)
            q3 = tl.load(qb + c3[None, :], mask=_cols(hm, c3, DV, EXACT), other=0.0)
            o0 = tl.load(ob + c0[None, :], mask=_cols(hm, c0, DV, EXACT), other=0.0)
            o1 = tl.load(ob + c1[None, :], mask=_cols(hm, c1, DV, EXACT), other=0.0)
            o2 = tl.load(ob + c2[None, :], mask=_cols(hm, c2, DV, EXACT), other=0.0)
            o3 = tl.load(ob + c3[None, :], mask=_cols(hm, c3, DV, EXACT), other=0.0)
            if DR > 0:
                qr = tl.load(qb + DV + d2[None, :], mask=_tile_mask(hm, d2, DR, D2), other=0.0)
            lse2, delta = _softmax_stats(LSE, DELTA, b, t, h, hm, stride_lb, stride_ls)
            ib = IDX + b * stride_ib + t * stride_is
            kvb = KV + b * stride_kb
            dkvb = DKV + b * stride_dkb
            for k0 in range(lo, hi, BK):
                idx, valid, rowoff = _selected(ib, k0, hi, Sk, stride_ks, BK)
                rp = kvb + rowoff[:, None]
                k0_ = tl.load(rp + c0[None, :], mask=_cols(valid, c0, DV, EXACT), other=0.0)
                k1_ = tl.load(rp + c1[None, :], mask=_cols(valid, c1, DV, EXACT), other=0.0)
                k2_ = tl.load(rp + c2[None, :], mask=_cols(valid, c2, DV, EXACT), other=0.0)
                k3_ = tl.load(rp + c3[None, :], mask=_cols(valid, c3, DV, EXACT), other=0.0)
                st = _dot(k0_, tl.trans(q0), IEEE, UPCAST) + _dot(k1_, tl.trans(q1), IEEE, UPCAST)
                st += _dot(k2_, tl.trans(q2), IEEE, UPCAST) + _dot(k3_, tl.trans(q3), IEEE, UPCAST)
                if DR > 0:
                    st += _dot(_gather(kvb + DV, rowoff, valid, d2, DR, D2), tl.trans(qr), IEEE, UPCAST)
                pt = tl.exp2(st * scale_log2 - lse2[None, :])
                pt = tl.where(valid[:, None], pt, 0.0)
                if HEAD_SUM:  # the heads are the columns here: a sum within each key's row
                    _add_head_sum(PSUM, b, t, k0, hi, tl.sum(pt, 1), stride_ib, stride_is, BK)
                dpt = _dot(k0_, tl.trans(o0), IEEE, UPCAST) + _dot(k1_, tl.trans(o1), IEEE, UPCAST)
                dpt += _dot(k2_, tl.trans(o2), IEEE, UPCAST) + _dot(k3_, tl.trans(o3), IEEE, UPCAST)
                dst = (pt * (dpt - delta[None, :]) * scale).to(k0_.dtype)
                ptc = pt.to(k0_.dtype)
                if STORE_DS:
                    kk = k0 + tl.arange(0, BK)
                    slot = b * stride_gb + (t - t0) * stride_gs + h[None, :] * stride_gh + kk[:, None]
                    tl.store(DS + slot, dst, mask=(kk < hi)[:, None] & hm[None, :])
                gp = dkvb + idx[:, None] * stride_dks
                tl.atomic_add(gp + c0[None, :], _dot(dst, q0, IEEE, UPCAST) + _dot(ptc, o0, IEEE, UPCAST),
                              mask=_cols(valid, c0, DV, EXACT), sem="relaxed")
                tl.atomic_add(gp + c1[None, :], _dot(dst, q1, IEEE, UPCAST) + _dot(ptc, o1, IEEE, UPCAST),
                              mask=_cols(valid, c1, DV, EXACT), sem="relaxed")
                tl.atomic_add(gp + c2[None, :], _dot(dst, q2, IEEE, UPCAST) + _dot(ptc, o2, IEEE, UPCAST),
                              mask=_cols(valid, c2, DV, EXACT), sem="relaxed")
                tl.atomic_add(gp + c3[None, :], _dot(dst, q3, IEEE, UPCAST) + _dot(ptc, o3, IEEE, UPCAST),
                              mask=_cols(valid, c3, DV, EXACT), sem="relaxed")
                if DR > 0:
                    tl.atomic_add(gp + DV + d2[None, :], _dot(dst, qr, IEEE, UPCAST),
                                  mask=_tile_mask(valid, d2, DR, D2), sem="relaxed")

    @triton.jit
    def _gathered_cols_dot(ds, kvb, rowoff, valid, c, D: tl.constexpr, EXACT: tl.constexpr, IEEE: tl.constexpr,
                           UPCAST: tl.constexpr):
        """ds [HB, BK] times the selected rows' columns c (a [BK, TW] gather at ``rowoff``)."""
        return _dot(ds, tl.load(kvb + (rowoff[:, None] + c[None, :]), mask=_cols(valid, c, D, EXACT), other=0.0),
                    IEEE, UPCAST)

    @triton.jit
    def _sparse_dq_product_kernel(
        DS, KV, IDX, DQ,
        Sk, TOPK, NHB, NCB, H, t0,
        stride_gb, stride_gs, stride_gh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_qb, stride_qs, stride_qh,
        HB: tl.constexpr, D: tl.constexpr, TW: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr,
        EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # dq from the stored score gradients, one program per (token, head block, group of NT
        # tiles of TW of q's D columns, values and rope alike): dq[t, h, c] = sum over the row's
        # slots of ds[t, h, slot] * kv[idx[t, slot], c]. No recomputation; NT [HB, TW]
        # accumulators. A token's programs are neighbours, so each one's read of the row's score
        # gradients after the first comes from L2; fewer, wider groups read them fewer times.
        # Every slot of DS holds a value (0 where no key), so its tiles need the row mask alone.
        pid = tl.program_id(0)
        t = t0 + pid // (NHB * NCB)
        r = pid % (NHB * NCB)
        h = (r // NCB) * HB + tl.arange(0, HB)
        hm = h < H
        c0 = (r % NCB) * (NT * TW) + tl.arange(0, TW)
        c1 = c0 + TW
        c2 = c1 + TW
        c3 = c2 + TW
        t = t.to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        ib = IDX + b * stride_ib + t * stride_is
        gb = DS + b * stride_gb + (t - t0) * stride_gs + h[:, None] * stride_gh
        kvb = KV + b * stride_kb
        EXACT: tl.constexpr = D % (NT * TW) == 0  # every group's columns exist: row masks alone
        acc0 = tl.zeros((HB, TW), tl.float32)
        acc1 = tl.zeros((HB, TW), tl.float32)
        acc2 = tl.zeros((HB, TW), tl.float32)
        acc3 = tl.zeros((HB, TW), tl.float32)
        for k0 in range(0, TOPK, BK):
            idx, valid, rowoff = _selected(ib, k0, TOPK, Sk, stride_ks, BK)
            kk = k0 + tl.arange(0, BK)
            ds = tl.load(gb + kk[None, :], mask=_cols(hm, kk, TOPK, EVEN_K), other=0.0)
            acc0 += _gathered_cols_dot(ds, kvb, rowoff, valid, c0, D, EXACT, IEEE, UPCAST)
            if NT > 1:
                acc1 += _gathered_cols_dot(ds, kvb, rowoff, valid, c1, D, EXACT, IEEE, UPCAST)
            if NT > 2:
                acc2 += _gathered_cols_dot(ds, kvb, rowoff, valid, c2, D, EXACT, IEEE, UPCAST)
            if NT > 3:
                acc3 += _gathered_cols_dot(ds, kvb, rowoff, valid, c3, D, EXACT, IEEE, UPCAST)
        qb = DQ + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
        tl.store(qb + c0[None, :], acc0.to(DQ.dtype.element_ty), mask=_cols(hm, c0, D, EXACT))
        if NT > 1:
            tl.store(qb + c1[None, :], acc1.to(DQ.dtype.element_ty), mask=_cols(hm, c1, D, EXACT))
        if NT > 2:
            tl.store(qb + c2[None, :], acc2.to(DQ.dtype.element_ty), mask=_cols(hm, c2, D, EXACT))
        if NT > 3:
            tl.store(qb + c3[None, :], acc3.to(DQ.dtype.element_ty), mask=_cols(hm, c3, D, EXACT))


    @triton.jit
    def _sparse_dkv_product_kernel(
        DS, P, Q, DO, IDX, SEG, DKV,
        Sk, TOPK, NCB, H, h0, t0, pass_id,
        stride_gb, stride_gs, stride_gh,
        stride_qb, stride_qs, stride_qh,
        stride_ob, stride_os, stride_oh,
        stride_ib, stride_is,
        stride_sb, stride_ss,
        stride_dkb, stride_dks,
        HC: tl.constexpr, COL0: tl.constexpr, NCOL: tl.constexpr, BC: tl.constexpr, HAS_DO: tl.constexpr,
        BK: tl.constexpr, PASSES: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # dkv from the stored probabilities and score gradients, one program per (token, block of
        # BC of the latent's NCOL columns from COL0), over the heads h0.. h0+HC: with the selected
        # keys as the rows, dkv[key, c] += sum_h ds[t, h, slot] q[t, h, c] + p[t, h, slot] dO[t, h, c]
        # (dO only where the columns are values, HAS_DO). Every head's share of a (token, key,
        # column) is summed before its one fp32 add, where the per-head-block dkv kernel adds once
        # per head block. q's and dO's columns stay in shared memory for the whole row.
        pid = tl.program_id(0)
        t = (t0 + pid // NCB).to(tl.int64)
        cb = (pid % NCB) * BC + tl.arange(0, BC)
        c = COL0 + cb
        b = tl.program_id(1).to(tl.int64)
        h = h0 + tl.arange(0, HC)
        hm = h < H
        lo, hi = _key_slots(SEG, b, t, pass_id, stride_sb, stride_ss, TOPK, PASSES)
        if hi > lo:
            cols_ok = _tile_mask(hm, cb, NCOL, BC)
            # With key ranges, the row's q and dO (read once a pass) go first from L2, so that
            # the range's dkv rows, the targets of the adds, stay there.
            hint: tl.constexpr = "evict_first" if PASSES > 1 else ""
            qc = tl.load(Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh + c[None, :], mask=cols_ok,
                         other=0.0, eviction_policy=hint)
            if HAS_DO:
                oc = tl.load(DO + b * stride_ob + t * stride_os + h[:, None] * stride_oh + c[None, :], mask=cols_ok,
                             other=0.0, eviction_policy=hint)
            gb = b * stride_gb + (t - t0) * stride_gs + h[:, None] * stride_gh
            ib = IDX + b * stride_ib + t * stride_is
            dkvb = DKV + b * stride_dkb
            # Blocks aligned to BK, so the stored tiles are whole (a key range starts anywhere).
            for k0 in range(lo // BK * BK, hi, BK):
                kk = k0 + tl.arange(0, BK)
                mine = (kk >= lo) & (kk < hi)
                idx = tl.load(ib + kk, mask=mine, other=-1)
                valid = (idx >= 0) & (idx < Sk)
                tile_ok = _cols(hm, kk, TOPK, EVEN_K)
                dst = tl.trans(tl.load(DS + gb + kk[None, :], mask=tile_ok, other=0.0))
                acc = _dot(dst, qc, IEEE, UPCAST)
                if HAS_DO:
                    pt = tl.trans(tl.load(P + gb + kk[None, :], mask=tile_ok, other=0.0))
                    acc += _dot(pt, oc, IEEE, UPCAST)
                tl.atomic_add(dkvb + (idx * stride_dks)[:, None] + c[None, :], acc,
                              mask=_tile_mask(valid, cb, NCOL, BC), sem="relaxed")

    @triton.jit
    def _rowwise_dot_kernel(A, B, OUT, N, V: tl.constexpr, VP: tl.constexpr, BR: tl.constexpr):
        """OUT[r] = sum(A[r] * B[r]) in fp32 over BR rows of V contiguous elements: each input
        read once, nothing else written."""
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        c = tl.arange(0, VP)
        rm = r < N
        off = r[:, None] * V + c[None, :]
        m = _tile_mask(rm, c, V, VP)
        a = tl.load(A + off, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + off, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + r, tl.sum(a * b, axis=1), mask=rm)

    @triton.jit
    def _key_ranges_kernel(IDX, SEG, ORDERED, Sk, K, stride_ib, stride_is, stride_sb, stride_ss,
                           PASSES: tl.constexpr, PP: tl.constexpr, BK: tl.constexpr):
        """One row of ``key_segments``' ranges in one read of the row: per range start p * Sk /
        PASSES the count of selected keys below it (its slot in a key-ordered row), and whether
        the row is in key order (ascending, -1 slots last)."""
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        row = IDX + b * stride_ib + t * stride_is
        p = tl.arange(0, PP)
        bound = (p.to(tl.int64) * Sk // PASSES).to(tl.int32)
        big = 2147483647  # -1 slots sort last
        below = tl.zeros((PP,), dtype=tl.int32)
        bad = tl.zeros((), dtype=tl.int32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            x = tl.load(row + kk, mask=kk < K, other=-1)
            key = tl.where(x >= 0, x, big)
            before = tl.load(row + kk - 1, mask=(kk > 0) & (kk < K), other=-1)  # the previous slot's key
            prev = tl.where((before >= 0) | (kk == 0), before, big)
            bad += tl.sum((key < prev).to(tl.int32), axis=0)
            below += tl.sum((key[None, :] < bound[:, None]).to(tl.int32), axis=1)
        tl.store(SEG + b * stride_sb + t * stride_ss + p, below, mask=p <= PASSES)
        tl.store(ORDERED + b * tl.num_programs(0) + t, (bad == 0).to(tl.int8))


def _dims(D, v_dim):
    DR = D - v_dim
    D1 = next_pow2(v_dim, 16)
    D2 = next_pow2(DR, 16) if DR > 0 else 16
    return DR, D1, D2


NARROW_LATENT = 128  # value columns (padded) up to which a latent counts as narrow for the tiles


def _tiles(chosen, on_gpu: bool, HB: int, kernel: str, D1: int = 512) -> Tiles:
    """The launch tiles: the options' choice, else measured defaults per kernel, head block and
    latent width (D1: the value columns, padded to a power of two)."""
    if chosen is not None:
        return chosen
    if not on_gpu:
        return Tiles(16, 4, 1)
    if D1 <= NARROW_LATENT:
        # A narrow latent leaves 8 warps little to share: the small MoE's 160 / 128 dims, 128K x
        # 8 heads, top-k 2048 on an H100 (results/h100/tune_dsa_small_128k_8heads.json): forward
        # 17 ms vs (64, 8, 2) 24; one-kernel backward with its 3 key ranges 91 ms vs 208 for
        # (32, 8, 2) in one pass (and 212 for (32, 8, 3), profiled in the model's step).
        if kernel == "fwd":
            return Tiles(64, 4, 2)
        if kernel == "bwd":
            return Tiles(32, 4, 2)
    # Measured on the H200 (benchmarks/results/tune_dsa_*.json; 576 / 512 dims, top-k 2048).
    if kernel == "fwd":  # 32K x 64 heads: 36 ms vs (32, 8, 2) 51. One head block of 16 or 32 rows:
        # 4 warps (128K on an H100, results/h100/tune_dsa_fwd_gluon_128k_32_16heads.json: 16 heads
        # 57.7 ms vs (64, 8, 2) 73.3, 32 heads 85.8 vs 136.5; an earlier kernel on the H200,
        # results/tune_dsa_fwd_128k_16heads.json, had 8 warps faster at 16 heads, 74 against 99)
        return Tiles(64, 8, 2) if HB >= MAX_HEAD_BLOCK else Tiles(64, 4, 2)
    if kernel == "dkv":  # keys are the products' rows, 64 for the tensor cores; 128K x 128 heads:
        return Tiles(64, 4, 1)  # 912 ms, (64, 8, 1) 1338
    if kernel == "dq" and HB >= MAX_HEAD_BLOCK:  # 32K x 128 heads: 133 ms, (32, 8, 2) 226, (32, 8, 1) 176
        return Tiles(64, 8, 1)
    if kernel == "scores":  # 64K x 128 heads (H100), 128 heads a program: 108 ms, (64, 8, 2) 122, (128, 8, 2)
        # 137, (64, 4, 3) 140; 64 heads a program (SCORES_HEADS): 100.5 ms, (64, 4, 3) 112, (128, 8, 2) 120
        # Below 64 heads (16 or 32 product columns) 4 warps: 128K on an H100, the backward 338 ms
        # at 16 heads against 346 at 8 warps, 390 against 398 at 32 heads.
        return Tiles(128, 8, 3) if HB >= MAX_HEAD_BLOCK else Tiles(128, 4, 3)
    if kernel == "dq_product":  # on an H100: 128 heads, four 4096-row chunks at 64K alone, 11.4 ms vs
        # (64, 8, 3) 18.9 (162 registers either way, one program an SM; tune_dq_product_grouped_64k.json);
        # the whole backward at 128K (tune_dq_product_in_backward_128k.json): 64 heads 474 ms vs
        # (64, 8, 2) 477; 32 heads 385.8 vs (64, 8, 3) 388.1, (64, 4, 3) 386.7; 16 heads 331.8 vs
        # (64, 8, 3) 333.4, (64, 4, 3) 349.1 (which the product alone had fastest)
        return Tiles(64, 8, 3) if HB == MAX_HEAD_BLOCK else Tiles(64, 8, 2)
    if kernel == "dkv_product":  # 128K x 128 heads, stored_scores backward: 984 ms, (64, 8, 2) 1055,
        return Tiles(64, 4, 3)  # (32, 4, 3) 1026
    # one kernel, 128K x 16 heads with 10 key ranges: 414 ms vs (32, 8, 2) 432, (16, 8, 2) 572
    return Tiles(32, 8, 3)


def sparse_attn_fwd(q, kv, idx, v_dim, scale, options: KernelOptions = DEFAULT_OPTIONS):
    if chosen(options.attn_fwd_kernel, q.shape[2], sparse_attn_ws.AUTO_MIN_HEADS,
              lambda: sparse_attn_ws.supported(q, kv, v_dim), "attn_fwd_kernel"):
        return sparse_attn_ws.sparse_attn_fwd_ws(q, kv, idx, v_dim, scale)
    B, Sq, H, D = q.shape
    Sk = kv.shape[1]
    K = idx.shape[-1]
    DR, D1, D2 = _dims(D, v_dim)
    out = torch.empty(B, Sq, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Sq, H, dtype=torch.float32, device=q.device)
    if Sq == 0 or H == 0:
        return out, lse
    HB = head_block(H)
    NHB = triton.cdiv(H, HB)
    tiles = _tiles(options.attn_fwd, q.is_cuda, HB, "fwd", D1)
    _sparse_fwd_kernel[(Sq * NHB, B)](
        q, kv, idx, out, lse,
        Sk, K, NHB, H, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1),
        idx.stride(0), idx.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HB=HB, DV=v_dim, D1=D1, DR=DR, D2=D2, BK=tiles.BK, IEEE=is_fp32(q, kv), UPCAST=interpreting(),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out, lse


L2_TARGET_BYTES = 32 << 20  # dkv bytes one pass keeps in L2 (the H200 has 60 MB in two halves)
DKV_PRODUCT_RANGE_BYTES = 40 << 20  # the same for the dkv product, whose other operands stream past L2
# Defaults of the product kernels' widths (``KernelOptions``). A dq program takes every head up
# to 128 (each program gathers its token's selected rows, so every head in one program gathers them
# once: 64K x 128 heads on an H100, 57.1 ms against 61.0 at 64 heads a program;
# results/h100/tune_dsa_bwd_dq_heads_64k_128heads.json) and 192 of the latent's columns, values and
# rope alike: three programs a token read its score gradients where a launch of 256 (128 at 128
# heads) value columns and one of the rope's read them three (five) times, the last from HBM. The
# dq product alone, four 4096-row chunks at 64K on an H100
# (results/h100/tune_dq_product_grouped_64k.json): 11.4 ms against 15.5 at 128 heads, 7.4 / 8.6 at
# 64, 5.5 / 6.5 at 16; 32 heads 7.3 / 7.2. 128 and 256 columns leave a half-masked last group
# (14.9-16.0 and 19.0 ms at 128 heads), 64 reads the scores nine times (15.1-15.4). The whole
# backward at 128K (results/h100/tune_dq_product_in_backward_128k.json): 64 heads 474 against
# 484 ms, 32 heads 385.8 / 393.0, 16 heads 331.8 / 340.9.
DQ_PRODUCT_COLUMNS = 192
DQ_PRODUCT_HEADS = 128
DKV_PRODUCT_COLUMNS = 128  # 128 heads' q and dO columns for 128 latent columns fit shared memory
DKV_PRODUCT_HEADS = 128
# Heads one program of the stored-scores kernel takes as its products' columns. 64K x 128 heads on
# an H100 (results/h100/tune_dsa_bwd_scores_heads_64k_128heads.json): 100.5 ms in groups of 64 at
# (128, 8, 3) (120 registers, 96 KB: two programs an SM) against 107.4 at 128 (204, 144 KB: one).
SCORES_HEADS = 64
SCORES_SLICE = 64  # latent columns a step of its products reads (q, dO and the gathered rows)


ROWWISE_DOT_ELEMENTS = 8192  # elements of each input one program of the rowwise dot reads


def _rowwise_dot(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum(dout * out, -1) in fp32 [B, Sq, H], one read of each. In PyTorch (fp32 copies of both,
    their product, its sum) it moved ~6x their bytes: 50 of the 490 ms of the 128-head backward
    at 64K on an H100."""
    B, Sq, H, V = out.shape
    delta = torch.empty(B, Sq, H, dtype=torch.float32, device=out.device)
    n = B * Sq * H
    if n:
        VP = next_pow2(V)
        BR = max(1, ROWWISE_DOT_ELEMENTS // VP)
        _rowwise_dot_kernel[(triton.cdiv(n, BR),)](dout.contiguous(), out.contiguous(), delta, n, V=V, VP=VP, BR=BR,
                                                   num_warps=4)
    return delta


def key_passes(options: KernelOptions, B: int, Sk: int, D: int, form: Optional[str], on_gpu: bool) -> int:
    """How many key ranges the attention backward's dkv adds are split into (1 = one pass).
    ``form``: the split backward's (``split_form``), None for the one-kernel backward.

    ``options.key_passes`` when set; else, on the GPU, enough passes for each range's fp32
    gradient rows to fit ``L2_TARGET_BYTES`` in the one-kernel backward (128K x 16 heads: 10
    ranges 414 ms, one 466) and ``DKV_PRODUCT_RANGE_BYTES`` in the dkv product of the stored
    scores (64K on an H100: 128 heads 208 ms at 4 ranges, 230 at one, 227 at 10; 64 heads 133,
    186, 131). The split backward's per-head-block dkv kernels take one pass (the products, not
    the adds, bound them)."""
    if options.key_passes:
        return max(1, min(options.key_passes, Sk))
    if not on_gpu or form in ("recompute", "stored_ds"):
        return 1
    target = L2_TARGET_BYTES if form is None else DKV_PRODUCT_RANGE_BYTES
    return max(1, min(-(-B * Sk * D * 4 // target), 64, Sk))


def key_segments(idx: torch.Tensor, Sk: int, passes: int, chunk_rows: Optional[int] = None):
    """Each row's selected keys sorted ascending (-1 slots last), the slot permutation that did it
    (int16 up to 32768 slots; None when every row already was: the selection's unordered rows
    are), and per row the slot where each of ``passes`` equal key ranges starts: (sorted idx,
    order, seg [B, Sq, passes + 1] int32). ``chunk_rows`` rows at a time (None: all), which
    bounds the sort's int64 permutation: in one piece at 128K x 2048 the sort took 4 GiB, and its
    permutation (2 GiB, now 0.5) stayed for the whole backward. Rows in key order cost one read
    of the selection: a kernel finds their ranges' starts and checks the order."""
    idx = idx.contiguous()
    B, Sq, K = idx.shape
    seg = torch.empty(B, Sq, passes + 1, dtype=torch.int32, device=idx.device)
    ordered = torch.empty(B, Sq, dtype=torch.int8, device=idx.device)
    if Sq:  # already in key order? Then the ranges' starts, found in the same read, are all
        _key_ranges_kernel[(Sq, B)](idx, seg, ordered, Sk, K, idx.stride(0), idx.stride(1), seg.stride(0),
                                    seg.stride(1), PASSES=passes, PP=next_pow2(passes + 1),
                                    BK=max(16, min(next_pow2(K), 4096 // next_pow2(passes + 1))), num_warps=4)
    if bool(ordered.all()):
        return idx, None, seg
    big = torch.iinfo(idx.dtype).max
    bounds = torch.div(torch.arange(passes + 1, device=idx.device) * Sk, passes, rounding_mode="floor").to(idx.dtype)
    step = chunk_rows or max(Sq, 1)
    chunks = [slice(t0, min(Sq, t0 + step)) for t0 in range(0, Sq, step)]
    keys = torch.empty_like(idx)
    order = torch.empty(idx.shape, dtype=torch.int16 if K <= 1 << 15 else torch.int32, device=idx.device)
    for rows in chunks:
        part = idx[:, rows]
        sorted_part, perm = torch.sort(torch.where(part >= 0, part, big), dim=-1)
        seg[:, rows] = torch.searchsorted(sorted_part, bounds.expand(*part.shape[:2], passes + 1).contiguous())
        keys[:, rows] = torch.where(sorted_part == big, -1, sorted_part)
        order[:, rows] = perm
    return keys, order, seg


def dq_product_blocks(H: int, options: KernelOptions) -> tuple[int, int]:
    """The dq product's heads a program (padded to a power of two) and latent columns a program
    (values and rope alike): every head up to 128, 192 columns (three 64-column tiles: the 576-wide
    latent in three programs a token)."""
    HB = min(next_pow2(H, 16), options.dq_product_heads or DQ_PRODUCT_HEADS)
    return HB, options.dq_product_columns or DQ_PRODUCT_COLUMNS


def dq_product_tiles(columns: int, D: int) -> tuple[int, int]:
    """A dq program's columns as (tile width, tiles): the widest power of two up to 64 that
    divides them, at most four tiles (``KernelOptions`` checks the columns), no more than a
    D-wide latent needs."""
    tw = 64
    while columns % tw:
        tw //= 2
    return tw, min(columns // tw, triton.cdiv(D, tw))


def _dq_product(ds, kv, idx, dq, t0: int, t1: int, options: KernelOptions, common: dict) -> None:
    """dq of rows t0..t1 from their stored score gradients ds (rows from t0): up to
    ``options.dq_product_heads`` heads a program, the latent's columns (values and rope in one
    launch) in groups of ``options.dq_product_columns``."""
    B, _, H, D = dq.shape
    HB, columns = dq_product_blocks(H, options)
    TW, NT = dq_product_tiles(columns, D)
    NHB = triton.cdiv(H, HB)
    ncb = triton.cdiv(D, NT * TW)
    tiles = _tiles(options.attn_dq_product, dq.is_cuda, HB, "dq_product")
    _sparse_dq_product_kernel[((t1 - t0) * NHB * ncb, B)](
        ds, kv, idx, dq,
        kv.shape[1], idx.shape[-1], NHB, ncb, H, t0,
        ds.stride(0), ds.stride(1), ds.stride(2),
        kv.stride(0), kv.stride(1),
        idx.stride(0), idx.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        HB=HB, D=D, TW=TW, NT=NT, BK=tiles.BK, EVEN_K=idx.shape[-1] % tiles.BK == 0,
        IEEE=common["IEEE"], UPCAST=common["UPCAST"],
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def _dkv_product(ds, p, q, dout, idx, seg, dkv, t0: int, t1: int, pass_id: int, passes: int, v_dim: int,
                 options: KernelOptions, common: dict) -> None:
    """dkv's share of rows t0..t1 from their stored score gradients ds and probabilities p (rows
    from t0), over key range ``pass_id``: the value columns in blocks of
    ``options.dkv_product_columns`` with dO's term, then the rope columns; every head at once up
    to ``options.dkv_product_heads`` (more: one add per group of that many)."""
    B, _, H, D = q.shape
    if chosen(options.attn_dkv_product_kernel, H, sparse_attn_ws.DKV_AUTO_MIN_HEADS,
              lambda: sparse_attn_ws.dkv_product_supported(ds, q, dout), "attn_dkv_product_kernel"):
        sparse_attn_ws.dkv_product_ws(ds, p, q, dout, idx, seg, dkv, t0, t1, pass_id, passes, v_dim)
        return
    K = idx.shape[-1]
    DR, D1, D2 = _dims(D, v_dim)
    tiles = _tiles(options.attn_dkv_product, q.is_cuda, 0, "dkv_product")
    HC = min(next_pow2(H, 16), options.dkv_product_heads or DKV_PRODUCT_HEADS)
    columns = options.dkv_product_columns or DKV_PRODUCT_COLUMNS
    parts = [(0, v_dim, min(D1, columns), True)] + ([(v_dim, DR, D2, False)] if DR > 0 else [])
    for h0 in range(0, H, HC):
        for col0, ncol, BC, has_do in parts:
            ncb = triton.cdiv(ncol, BC)
            _sparse_dkv_product_kernel[((t1 - t0) * ncb, B)](
                ds, p, q, dout, idx, seg, dkv,
                dkv.shape[1], K, ncb, H, h0, t0, pass_id,
                ds.stride(0), ds.stride(1), ds.stride(2),
                q.stride(0), q.stride(1), q.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                idx.stride(0), idx.stride(1),
                seg.stride(0), seg.stride(1),
                dkv.stride(0), dkv.stride(1),
                HC=HC, COL0=col0, NCOL=ncol, BC=BC, HAS_DO=has_do, BK=tiles.BK, PASSES=passes,
                EVEN_K=K % tiles.BK == 0, IEEE=common["IEEE"], UPCAST=common["UPCAST"],
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )


def split_backward(options: KernelOptions, HB: int, D1: int) -> bool:
    """dq and dkv in separate kernels sharing stored scores (``split_form``), or the one-kernel
    backward. By default split from 64-head blocks (where one kernel does not fit an SM) and at
    any head count on a wide latent (D1: its value columns, padded): 128K on the H200, 16 heads
    301 against 393 ms, 32 heads 344 against 530. A narrow latent keeps one kernel (the small
    MoE's 128 + 32 dims at 8 heads: 71 against 91 ms)."""
    if options.attn_bwd_split is not None:
        return options.attn_bwd_split
    return HB >= MAX_HEAD_BLOCK or D1 > NARROW_LATENT


def split_form(options: KernelOptions) -> str:
    """What the split backward's kernels share (``KernelOptions.split_bwd``); by default the stored
    scores (one add per (token, key, column) for every head, the stored scores' kernel as a
    gathered product, the dkv product's adds in L2-sized key ranges): 64K on an H100, 128 heads
    449 ms against 662 recomputing; on the H200, 64 heads 208 against 323."""
    return options.split_bwd or "stored_scores"


def sparse_attn_bwd(q, kv, idx, out, lse, dout, v_dim, scale, options: KernelOptions = DEFAULT_OPTIONS,
                    head_sum: bool = False):
    """(dq, dkv), and with ``head_sum`` also p summed over the heads [B, Sq, K] fp32 in ``idx``'s
    slot order: the sparse KL's target, from the probabilities the backward recomputes anyway."""
    B, Sq, H, D = q.shape
    Sk = kv.shape[1]
    K = idx.shape[-1]
    DR, D1, D2 = _dims(D, v_dim)
    dout = dout.contiguous()
    dkv = torch.zeros(B, Sk, D, dtype=torch.float32, device=q.device)
    psum = torch.zeros(B, Sq, K, dtype=torch.float32, device=q.device) if head_sum else dkv
    extra = (psum,) if head_sum else ()
    if Sq == 0 or H == 0:
        return (torch.zeros_like(q), dkv.to(kv.dtype)) + extra
    delta = _rowwise_dot(dout, out)  # [B, Sq, H]
    HB = head_block(H)
    NHB = triton.cdiv(H, HB)
    split = split_backward(options, HB, D1)
    form = split_form(options) if split else None
    passes = key_passes(options, B, Sk, D, form, q.is_cuda)
    full_idx = idx
    order = None
    slot_rows = rows_within(options.workspace_bytes // 8, B * K * 8)  # rows of int64 slot temporaries
    if passes > 1:
        idx, order, seg = key_segments(idx, Sk, passes, slot_rows)
    else:
        seg = idx
    if head_sum:
        assert psum.stride() == idx.stride(), "the head sum is addressed with idx's strides"

    def results(dq):
        # Key ranges add the head sum in key order: back to the selection's slots in place, a
        # chunk of rows at a time (the scatter takes int64 slots and a copy of its source).
        if not head_sum:
            return dq, dkv.to(kv.dtype)
        if order is not None:
            for t0 in range(0, Sq, slot_rows):
                rows = slice(t0, min(Sq, t0 + slot_rows))
                psum[:, rows].scatter_(-1, order[:, rows].long(), psum[:, rows].clone())
        return dq, dkv.to(kv.dtype), psum
    common = dict(HB=HB, DV=v_dim, D1=D1, DR=DR, D2=D2, IEEE=is_fp32(q, kv), UPCAST=interpreting())
    grid = (Sq * NHB, B)

    def bwd(idx_, seg_, dq, p, n_passes, t0=0, t1=Sq):
        tiles = _tiles(options.attn_bwd, q.is_cuda, HB, "bwd", D1)
        _sparse_bwd_kernel[((t1 - t0) * NHB, B)](
            q, kv, idx_, seg_, dout, lse, delta, dq, dkv, psum,
            Sk, K, NHB, H, scale, scale * LOG2E, p, t0,
            q.stride(0), q.stride(1), q.stride(2),
            kv.stride(0), kv.stride(1),
            idx_.stride(0), idx_.stride(1),
            seg_.stride(0), seg_.stride(1),
            dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1), dq.stride(2),
            dkv.stride(0), dkv.stride(1),
            BK=tiles.BK, PASSES=n_passes, FIRST=p == 0, HEAD_SUM=head_sum,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **common,
        )

    if split:
        dq = torch.empty_like(q)
        if form == "recompute":
            tiles = _tiles(options.attn_bwd, q.is_cuda, HB, "dq")
            _sparse_dq_kernel[grid](
                q, kv, full_idx, dout, lse, delta, dq,
                Sk, K, NHB, H, scale, scale * LOG2E,
                q.stride(0), q.stride(1), q.stride(2),
                kv.stride(0), kv.stride(1),
                full_idx.stride(0), full_idx.stride(1),
                dout.stride(0), dout.stride(1), dout.stride(2),
                lse.stride(0), lse.stride(1),
                BK=tiles.BK, num_warps=tiles.num_warps, num_stages=tiles.num_stages, **common,
            )
        # The stored forms keep a chunk of rows' score gradients (and probabilities) in kv's dtype,
        # in idx's slot order (key-sorted with ranges).
        stored, scores = form != "recompute", form == "stored_scores"
        step = rows_within(options.workspace_bytes, B * H * K * kv.element_size()) if stored else Sq
        # "stored_ds" with key ranges writes only the slots of a row's keys: zeros elsewhere.
        new = torch.zeros if passes > 1 and not scores else torch.empty
        ds = new(B, min(step, Sq), H, K, dtype=kv.dtype, device=q.device) if stored else dkv
        pbuf = torch.empty_like(ds) if scores else ds
        ds_strides = (ds.stride(0), ds.stride(1), ds.stride(2)) if stored else (0, 0, 0)
        def dkv_kernel(t0, t1, p, n_passes):
            tiles = _tiles(options.attn_dkv, q.is_cuda, HB, "dkv")
            DQ4 = max(D1 // 4, 16)
            _sparse_dkv_kernel[((t1 - t0) * NHB, B)](
                q, kv, idx, seg, dout, lse, delta, dkv, psum, ds,
                Sk, K, NHB, H, scale, scale * LOG2E, p, t0,
                q.stride(0), q.stride(1), q.stride(2),
                kv.stride(0), kv.stride(1),
                idx.stride(0), idx.stride(1),
                seg.stride(0), seg.stride(1),
                dout.stride(0), dout.stride(1), dout.stride(2),
                lse.stride(0), lse.stride(1),
                dkv.stride(0), dkv.stride(1),
                *ds_strides,
                HB=HB, DV=v_dim, DQ4=DQ4, EXACT=4 * DQ4 == v_dim, DR=DR, D2=D2, IEEE=common["IEEE"],
                UPCAST=common["UPCAST"], BK=tiles.BK, PASSES=n_passes, HEAD_SUM=head_sum, STORE_DS=stored,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )

        def scores_kernel(t0, t1):
            st = _tiles(options.attn_scores, q.is_cuda, HB, "scores")
            HN = min(next_pow2(H, 16), options.scores_heads or SCORES_HEADS)
            BD = SCORES_SLICE if q.is_cuda else 16  # narrow slices in the interpreter: several per dim
            nkb, nhg = triton.cdiv(K, st.BK), triton.cdiv(H, HN)
            _sparse_scores_kernel[((t1 - t0) * nhg * nkb, B)](
                q, kv, idx, dout, lse, delta, psum, ds, pbuf,
                Sk, K, nkb, nhg, H, scale, scale * LOG2E, t0,
                q.stride(0), q.stride(1), q.stride(2),
                kv.stride(0), kv.stride(1),
                idx.stride(0), idx.stride(1),
                dout.stride(0), dout.stride(1), dout.stride(2),
                lse.stride(0), lse.stride(1),
                *ds_strides,
                HN=HN, DV=v_dim, D=D, BD=BD, EVEN_D=v_dim % BD == 0 and D % BD == 0, BK=st.BK,
                IEEE=common["IEEE"], UPCAST=common["UPCAST"], HEAD_SUM=head_sum,
                num_warps=st.num_warps, num_stages=st.num_stages,
            )

        for t0 in range(0, Sq, step):
            t1 = min(Sq, t0 + step)
            if scores:  # every slot's p and ds once (no adds), then dkv over all heads per range
                scores_kernel(t0, t1)
                for p in range(passes):
                    _dkv_product(ds, pbuf, q, dout, idx, seg, dkv, t0, t1, p, passes, v_dim, options, common)
            else:
                for p in range(passes):
                    dkv_kernel(t0, t1, p, passes)
            if stored:
                _dq_product(ds, kv, idx, dq, t0, t1, options, common)
        return results(dq)
    if passes == 1:
        dq = torch.empty_like(q)
        bwd(idx, seg, dq, 0, 1)
        return results(dq)
    # One kernel over the key ranges; each pass adds its dq share to an fp32 buffer, which holds
    # a chunk of rows at a time (for every row it would be 2x dq, 9.7 GB at 128K x 32 heads).
    dq = torch.empty_like(q)
    step = rows_within(options.workspace_bytes // 2, B * H * D * 4)
    dq32 = torch.empty(B, min(step, Sq), H, D, dtype=torch.float32, device=q.device)
    for t0 in range(0, Sq, step):
        t1 = min(Sq, t0 + step)
        for p in range(passes):
            bwd(idx, seg, dq32, p, passes, t0, t1)
        dq[:, t0:t1] = dq32[:, : t1 - t0]
    return results(dq)


class SparseMLAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, topk_idx, v_dim, scale, options):
        # The int32 selection is what this op keeps for the backward (half of int64's bytes).
        if kv.shape[1] * kv.shape[2] >= 2**31:  # the kernels' row offsets are 32-bit
            raise ValueError(f"sparse attention over {kv.shape[1]} latent rows of {kv.shape[2]}: the kernels "
                             "address one sequence's rows with 32-bit offsets (under 2^31 elements)")
        q_c, kv_c, idx_c = q.contiguous(), kv.contiguous(), selection(topk_idx)
        out, lse = sparse_attn_fwd(q_c, kv_c, idx_c, v_dim, scale, options)
        ctx.save_for_backward(q_c, kv_c, idx_c, out, lse)
        ctx.v_dim, ctx.scale, ctx.options = v_dim, scale, options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, idx, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_attn_bwd(q, kv, idx, out, lse, dout, ctx.v_dim, ctx.scale, ctx.options)
        return dq, dkv, None, None, None, None


def sparse_mla_attention(q, kv, topk_idx, v_dim, scale, options: KernelOptions = DEFAULT_OPTIONS):
    """Same contract as ``reference.sparse_mla_attention``: returns (out [B,Sq,H,v_dim], lse [B,Sq,H])."""
    return SparseMLAAttention.apply(q, kv, topk_idx, v_dim, scale, options)


def sparse_mla_attention_backward(q, kv, topk_idx, out, lse, dout, v_dim, scale,
                                  options: KernelOptions = DEFAULT_OPTIONS):
    """Same contract as ``reference.sparse_mla_attention_backward``: (dq, dkv, the selected-set
    probabilities summed over q's heads [B, Sq, K] fp32), in the one backward pass."""
    return sparse_attn_bwd(q.contiguous(), kv.contiguous(), selection(topk_idx), out, lse, dout, v_dim, scale,
                           options, head_sum=True)
