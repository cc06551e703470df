"""The indexer's KL objectives without S^2 memory.

* ``sparse_indexer_kl``: Triton forward and backward over the selected set, in two kernels.
  The target kernel (one program per token) sums the main attention's probabilities over its
  heads into p [B, Sq, K] fp32: up to 64 heads as the rows of the products, above that the
  selected keys as the rows and up to 128 heads as the columns (each gathered row read once);
  it takes each head's log-sum-exp from the sparse attention's forward when given (one pass
  over the gathered latent rows) or builds it first (two). The KL kernel then computes the
  indexer logits over the same keys and KL = sum p log p - sum p I + lse_I * sum p, with p
  renormalised (divided by its row sum, which the kernel adds up first from the row it then
  reads again from cache; the backward takes the forward's sums). The backward recomputes the
  logits and pushes dI = g * (softmax(I) sum(p) - p) into q_idx, w_idx (per program) and k_idx
  (fp32 atomic adds; the attention's L2-sized key ranges measured slower here: 89 -> 109 ms at
  128K). sum(p) is 1 unless a row's weights sum below the floor KL_EPS.
* Under tensor parallelism the two kernels run as two ops (``sparse_target_head_sum``, summed
  over the ranks' heads by the caller, then ``sparse_indexer_kl_from_target``).
* ``dense_indexer_kl``: the fused Triton kernels of ``dense_kl`` for the KL (the default), or
  blockwise PyTorch over query chunks (O(chunk x Sk) memory; ``KernelOptions.dense_kl =
  "blockwise"`` and the other objectives), as an autograd.Function whose backward recomputes each
  chunk and uses dI = g * (softmax(I) - p) directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as R
from . import dense_kl as _dense_kl
from ._common import HAS_TRITON, _dot, interpreting, is_fp32, next_pow2, rows_within, selection, split_pow2, triton, tl
from ..kernel_options import DEFAULT_OPTIONS, KernelOptions, Tiles
from .sparse_attn import LOG2E, head_block


if HAS_TRITON:
    _KL_EPS = tl.constexpr(R.KL_EPS)

    @triton.jit
    def _load_selected(ib, kk, km):
        """Selected key indices at slots kk (-1 where not km): int32 in memory, widened so that
        idx * row stride below is 64-bit address math."""
        return tl.load(ib + kk, mask=km, other=-1).to(tl.int64)

    @triton.jit
    def _main_scores(q1, q2, rowp, valid, d1, d1m, d2, d2m,
                     DV: tl.constexpr, DR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        kv1 = tl.load(rowp[:, None] + d1[None, :], mask=valid[:, None] & d1m[None, :], other=0.0)
        s = _dot(q1, tl.trans(kv1), IEEE, UPCAST)
        if DR > 0:
            kv2 = tl.load(rowp[:, None] + DV + d2[None, :], mask=valid[:, None] & d2m[None, :], other=0.0)
            s += _dot(q2, tl.trans(kv2), IEEE, UPCAST)
        return s

    @triton.jit
    def _target_kernel(
        QM, KV, IDX, LSEM, P,
        Sk, TOPK, H, NHB, scale_log2,
        s_qmb, s_qms, s_qmh,
        s_kvb, s_kvs,
        s_ib, s_is,
        s_mb, s_ms,
        HB: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_LSE: tl.constexpr,
    ):
        # P [B, Sq, K] (IDX's strides) gets sum over heads of the main attention's probabilities
        # over the selected set; LSEM [B, Sq, H] (heads contiguous) is each head's natural-log
        # lse over that set (HAS_LSE), else it is built here in a first pass.
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        ib = IDX + b * s_ib + t * s_is
        pb = P + b * s_ib + t * s_is
        kvb = KV + b * s_kvb
        d1 = tl.arange(0, D1)
        d1m = d1 < DV
        d2 = tl.arange(0, D2)
        d2m = d2 < DR
        for hb in range(NHB):
            h = hb * HB + tl.arange(0, HB)
            hm = h < H
            qb = QM + b * s_qmb + t * s_qms + h[:, None] * s_qmh
            q1 = tl.load(qb + d1[None, :], mask=hm[:, None] & d1m[None, :], other=0.0)
            q2 = tl.load(qb + DV + d2[None, :], mask=hm[:, None] & d2m[None, :], other=0.0)
            if HAS_LSE:
                lsem = tl.load(LSEM + b * s_mb + t * s_ms + h, mask=hm, other=float("-inf"))
                lse2 = tl.where(lsem > float("-inf"), lsem * 1.4426950408889634, float("inf"))
            else:
                m_i = tl.full((HB,), float("-inf"), tl.float32)
                l_i = tl.zeros((HB,), tl.float32)
                for k0 in range(0, TOPK, BK):
                    kk = k0 + tl.arange(0, BK)
                    idx = _load_selected(ib, kk, kk < TOPK)
                    valid = (idx >= 0) & (idx < Sk)
                    s = _main_scores(q1, q2, kvb + idx * s_kvs, valid, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST)
                    s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                    m_i = m_new
                has_h = (l_i > 0.0) & hm
                lse2 = tl.where(has_h, m_i + tl.log2(tl.where(has_h, l_i, 1.0)), float("inf"))
            for k0 in range(0, TOPK, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < TOPK
                idx = _load_selected(ib, kk, km)
                valid = (idx >= 0) & (idx < Sk)
                s = _main_scores(q1, q2, kvb + idx * s_kvs, valid, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST)
                ph = tl.where(valid, tl.sum(tl.exp2(s * scale_log2 - lse2[:, None]), axis=0), 0.0)
                if hb > 0:
                    ph += tl.load(pb + kk, mask=km, other=0.0)
                tl.store(pb + kk, ph, mask=km)

    @triton.jit
    def _target_keys_kernel(
        QM, KV, IDX, LSEM, P,
        Sk, TOPK, H, NHC, scale_log2,
        s_qmb, s_qms, s_qmh,
        s_kvb, s_kvs,
        s_ib, s_is,
        s_mb, s_ms,
        HN: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_LSE: tl.constexpr,
    ):
        # The target with the selected keys as the products' rows and the heads (HN at a time,
        # NHC chunks) as the columns: s^T = kv q^T [BK, HN], so each gathered row is read once
        # per token up to HN heads, and the head sum is a row sum. Same contract as
        # _target_kernel, which reads the rows once per 64-head block.
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        ib = IDX + b * s_ib + t * s_is
        pb = P + b * s_ib + t * s_is
        kvb = KV + b * s_kvb
        d1 = tl.arange(0, D1)
        d1m = d1 < DV
        d2 = tl.arange(0, D2)
        d2m = d2 < DR
        for hc in range(NHC):
            h = hc * HN + tl.arange(0, HN)
            hm = h < H
            qb = QM + b * s_qmb + t * s_qms + h[:, None] * s_qmh
            q1 = tl.load(qb + d1[None, :], mask=hm[:, None] & d1m[None, :], other=0.0)
            q2 = tl.load(qb + DV + d2[None, :], mask=hm[:, None] & d2m[None, :], other=0.0)
            if HAS_LSE:
                lsem = tl.load(LSEM + b * s_mb + t * s_ms + h, mask=hm, other=float("-inf"))
                lse2 = tl.where(lsem > float("-inf"), lsem * 1.4426950408889634, float("inf"))
            else:
                m_i = tl.full((HN,), float("-inf"), tl.float32)
                l_i = tl.zeros((HN,), tl.float32)
                for k0 in range(0, TOPK, BK):
                    kk = k0 + tl.arange(0, BK)
                    idx = _load_selected(ib, kk, kk < TOPK)
                    valid = (idx >= 0) & (idx < Sk)
                    st = _main_scores_t(q1, q2, kvb + idx * s_kvs, valid, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST)
                    st = tl.where(valid[:, None], st * scale_log2, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(st, axis=0))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(st - m_safe[None, :]), axis=0)
                    m_i = m_new
                has_h = (l_i > 0.0) & hm
                lse2 = tl.where(has_h, m_i + tl.log2(tl.where(has_h, l_i, 1.0)), float("inf"))
            for k0 in range(0, TOPK, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < TOPK
                idx = _load_selected(ib, kk, km)
                valid = (idx >= 0) & (idx < Sk)
                st = _main_scores_t(q1, q2, kvb + idx * s_kvs, valid, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST)
                ph = tl.where(valid, tl.sum(tl.exp2(st * scale_log2 - lse2[None, :]), axis=1), 0.0)
                if hc > 0:
                    ph += tl.load(pb + kk, mask=km, other=0.0)
                tl.store(pb + kk, ph, mask=km)

    @triton.jit
    def _main_scores_t(q1, q2, rowp, valid, d1, d1m, d2, d2m,
                       DV: tl.constexpr, DR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """_main_scores transposed: the gathered rows [BK, D] times the heads' q^T -> [BK, heads]."""
        kv1 = tl.load(rowp[:, None] + d1[None, :], mask=valid[:, None] & d1m[None, :], other=0.0)
        s = _dot(kv1, tl.trans(q1), IEEE, UPCAST)
        if DR > 0:
            kv2 = tl.load(rowp[:, None] + DV + d2[None, :], mask=valid[:, None] & d2m[None, :], other=0.0)
            s += _dot(kv2, tl.trans(q2), IEEE, UPCAST)
        return s

    @triton.jit
    def _indexer_row(QI, WI, b, t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih,
                     HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr):
        """One token's indexer queries [HIP, DIP] and fp32 head weights [HIP], with their offsets
        and masks (the gradients are stored at the same offsets)."""
        j = tl.arange(0, HIP)
        jm = j < HI
        di = tl.arange(0, DIP)
        qm = jm[:, None] & (di < DI)[None, :]
        qoff = b * s_qib + t * s_qis + j[:, None] * s_qih + di[None, :]
        woff = b * s_wib + t * s_wis + j * s_wih
        qi = tl.load(QI + qoff, mask=qm, other=0.0)
        wi = tl.load(WI + woff, mask=jm, other=0.0).to(tl.float32)
        return qi, wi, qoff, qm, woff, jm, di

    @triton.jit
    def _selected_slots(ib, k0, TOPK, Sk, BK: tl.constexpr):
        """A block of a row's slots: (slots, in the row, key index, a key is there)."""
        kk = k0 + tl.arange(0, BK)
        km = kk < TOPK
        idx = _load_selected(ib, kk, km)
        return kk, km, idx, (idx >= 0) & (idx < Sk)

    @triton.jit
    def _target_row_sum(ib, pb, TOPK, Sk, BK: tl.constexpr):
        """The sum of a row's target weights over its valid slots (read again by the main loop,
        from cache). They are divided by it floored at KL_EPS, as the reference's
        ``normalised_rows`` does, so a row whose weights sum to less holds less than 1 in all."""
        total = 0.0
        for k0 in range(0, TOPK, BK):
            kk, km, _, valid = _selected_slots(ib, k0, TOPK, Sk, BK)
            total += tl.sum(tl.where(valid, tl.load(pb + kk, mask=km, other=0.0), 0.0), axis=0)
        return total

    @triton.jit
    def _selected_scores(ib, pb, k0, TOPK, Sk, kib, s_kis, qi, di, psum,
                         DI: tl.constexpr, BK: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr):
        """One block of selected keys: (key index, valid, target p = weight / row sum (an IEEE
        division, as PyTorch's), indexer keys, per-head dots q_j . k [HIP, BK])."""
        kk, km, idx, valid = _selected_slots(ib, k0, TOPK, Sk, BK)
        p = tl.where(valid, tl.math.div_rn(tl.load(pb + kk, mask=km, other=0.0), psum), 0.0)
        ki = tl.load(kib + idx[:, None] * s_kis + di[None, :], mask=valid[:, None] & (di < DI)[None, :], other=0.0)
        return idx, valid, p, ki, _dot(qi, tl.trans(ki), IEEE_I, UPCAST)

    @triton.jit
    def _kl_fwd_kernel(
        QI, KI, WI, IDX, P, KL, LSEI, PSUM,
        Sk, TOPK,
        s_qib, s_qis, s_qih,
        s_kib, s_kis,
        s_wib, s_wis, s_wih,
        s_ib, s_is,
        s_lb, s_ls,
        HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BK: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # KL(p || softmax(I)) over the selected set, p = P / its row sum (P has IDX's strides).
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        ib = IDX + b * s_ib + t * s_is
        pb = P + b * s_ib + t * s_is
        total = _target_row_sum(ib, pb, TOPK, Sk, BK)
        psum_row = tl.maximum(total, _KL_EPS)
        qi, wi, _, _, _, _, di = _indexer_row(QI, WI, b, t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih, HI, HIP, DI, DIP)
        kib = KI + b * s_kib
        mI = float("-inf")
        lI = 0.0
        plogp = 0.0
        pI = 0.0
        psum = 0.0
        for k0 in range(0, TOPK, BK):
            idx, valid, p, ki, si = _selected_scores(ib, pb, k0, TOPK, Sk, kib, s_kis, qi, di, psum_row,
                                                     DI, BK, IEEE_I, UPCAST)
            logit = tl.sum(tl.maximum(si, 0.0) * wi[:, None], axis=0)
            logit = tl.where(valid, logit, float("-inf"))
            m_new = tl.maximum(mI, tl.max(logit, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            lI = lI * tl.exp(mI - m_safe) + tl.sum(tl.exp(logit - m_safe), axis=0)
            mI = m_new
            pos = p > 0.0
            plogp += tl.sum(tl.where(pos, p * tl.log(tl.where(pos, p, 1.0)), 0.0), axis=0)
            pI += tl.sum(tl.where(pos, p * tl.where(valid, logit, 0.0), 0.0), axis=0)
            psum += tl.sum(p, axis=0)
        hasI = lI > 0.0
        lseI = tl.where(hasI, mI + tl.log(tl.where(hasI, lI, 1.0)), float("-inf"))
        kl = tl.where(hasI, plogp - pI + tl.where(hasI, lseI, 0.0) * psum, 0.0)
        tl.store(KL + b * s_lb + t * s_ls, kl)
        tl.store(LSEI + b * s_lb + t * s_ls, lseI)
        tl.store(PSUM + b * s_lb + t * s_ls, total)

    @triton.jit
    def _kl_bwd_kernel(
        QI, KI, WI, IDX, P, LSEI, PSUM, GKL, DQI, DKI, DWI,
        Sk, TOPK,
        s_qib, s_qis, s_qih,
        s_kib, s_kis,
        s_wib, s_wis, s_wih,
        s_ib, s_is,
        s_lb, s_ls,
        s_dkb, s_dks,
        HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BK: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # DQI/DWI: fp32 buffers with QI/WI's strides; P has IDX's strides, PSUM the forward's row
        # sums of the target weights. dI = g (softmax(I) sum(p) - p): sum(p) is 1 unless the
        # weights' sum is below the floor (0 for a row of zeros, whose KL is 0 for any I).
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        qi, wi, qoff, qm, woff, jm, di = _indexer_row(QI, WI, b, t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih,
                                                      HI, HIP, DI, DIP)
        lseI = tl.load(LSEI + b * s_lb + t * s_ls)
        g = tl.load(GKL + b * s_lb + t * s_ls)
        total = tl.load(PSUM + b * s_lb + t * s_ls)
        psum_row = tl.maximum(total, _KL_EPS)
        mass = tl.math.div_rn(total, psum_row)
        lse_safe = tl.where(lseI == float("-inf"), float("inf"), lseI)
        ib = IDX + b * s_ib + t * s_is
        pb = P + b * s_ib + t * s_is
        kib = KI + b * s_kib
        dkb = DKI + b * s_dkb
        dq = tl.zeros((HIP, DIP), tl.float32)
        dw = tl.zeros((HIP,), tl.float32)
        for k0 in range(0, TOPK, BK):
            idx, valid, p, ki, si = _selected_scores(ib, pb, k0, TOPK, Sk, kib, s_kis, qi, di, psum_row,
                                                     DI, BK, IEEE_I, UPCAST)
            r = tl.maximum(si, 0.0)
            logit = tl.sum(r * wi[:, None], axis=0)
            sm = tl.exp(logit - lse_safe)
            dI = tl.where(valid, g * (sm * mass - p), 0.0)
            dw += tl.sum(r * dI[None, :], axis=1)
            dS = tl.where(si > 0.0, dI[None, :] * wi[:, None], 0.0).to(ki.dtype)
            dq += _dot(dS, ki, IEEE_I, UPCAST)
            dk = _dot(tl.trans(dS), qi, IEEE_I, UPCAST)
            tl.atomic_add(dkb + idx[:, None] * s_dks + di[None, :], dk, mask=valid[:, None] & (di < DI)[None, :],
                          sem="relaxed")
        tl.store(DQI + qoff, dq, mask=qm)
        tl.store(DWI + woff, dw, mask=jm)


SMALL_INDEXER = 16 * 64  # indexer heads x dims (padded) up to which the KL's forward takes longer key blocks


def _kl_tiles(chosen: Optional[Tiles], on_gpu: bool, bwd: bool, width: int) -> Tiles:
    """The KL logits kernels' launch; ``width``: the indexer's padded heads x dims."""
    if chosen is not None:
        return chosen
    if not on_gpu:
        return Tiles(16, 4, 1)
    if bwd:  # 128K, 64 x 128 indexer (H200): 98 ms vs (32, 8, 2) 196; 4 x 64 (H100): 27 ms vs (128, 4, 2) 31
        return Tiles(64, 4, 2)
    if width <= SMALL_INDEXER:
        # 128K, the small MoE's 4 x 64 indexer on an H100 (results/h100/tune_dsa_small_128k_8heads_topk_kl.json):
        # target + logits 21 ms vs 29 at (32, 4, 2), 25 at (64, 4, 2)
        return Tiles(128, 4, 2)
    # 128K, 64 x 128 (H200): (32, 4, 2) 197 ms vs (32, 8, 2) 261
    return Tiles(32, 4, 2)


KEYS_ROWS_HEADS = 128  # heads per chunk of the keys-as-rows target kernel (the products' N)


def _target_tiles(chosen: Optional[Tiles], on_gpu: bool, keys_rows: bool, HB: int) -> Tiles:
    if chosen is not None:
        return chosen
    if not on_gpu:
        return Tiles(16, 4, 1)
    # Measured on the H200 at 128K (benchmarks/results/tune_dsa_bwd_kl_target.json): keys as rows at
    # 128 heads (64, 4, 1) 152 ms vs (64, 8, 1) 189, (32, 4, 2) 196, heads as rows 260; heads as
    # rows at 64 heads 99 ms (keys as rows 101-162), 16 heads 55 ms (keys as rows 64-138).
    if keys_rows:
        return Tiles(64, 4, 1)
    # heads as rows, 64-head blocks, 32K x 128 heads: (64, 4, 2) 67 ms vs (64, 8, 2) 76, (32, 8, 2) 107
    return Tiles(64, 4, 2) if HB >= 64 else Tiles(32, 4, 2)


def _head_sum(qm, kv, idx, scale, lse, options: KernelOptions) -> torch.Tensor:
    """[B, Sq, K] fp32: the main attention's selected-set probabilities summed over qm's heads.
    Up to one 64-head block the heads are the products' rows; above it (or as the options say)
    the selected keys are, so each gathered row is read once per token, not once per block."""
    B, Sq, K = idx.shape
    H = qm.shape[2]
    P = torch.empty(B, Sq, K, dtype=torch.float32, device=idx.device)
    if not Sq:
        return P
    if H == 0:
        return P.zero_()
    DV, D1, DR, D2 = split_pow2(qm.shape[-1])
    HB = head_block(H)
    keys_rows = H > HB if options.kl_target_keys_rows is None else options.kl_target_keys_rows
    if lse is not None:
        lsem = lse.detach().float().contiguous()
        assert lsem.shape == (B, Sq, H), (lsem.shape, (B, Sq, H))
    else:
        lsem = P  # unused
    tiles = _target_tiles(options.kl_target, idx.is_cuda, keys_rows, HB)
    kernel, HN = (_target_keys_kernel, min(next_pow2(H, 16), KEYS_ROWS_HEADS)) if keys_rows else (_target_kernel, HB)
    kw = dict(HN=HN) if keys_rows else dict(HB=HB)
    kernel[(Sq, B)](
        qm, kv, idx, lsem, P,
        kv.shape[1], K, H, triton.cdiv(H, HN), scale * LOG2E,
        qm.stride(0), qm.stride(1), qm.stride(2),
        kv.stride(0), kv.stride(1),
        idx.stride(0), idx.stride(1),
        lsem.stride(0), lsem.stride(1),
        DV=DV, D1=D1, DR=DR, D2=D2, BK=tiles.BK, IEEE=is_fp32(qm, kv), UPCAST=interpreting(),
        HAS_LSE=lse is not None, num_warps=tiles.num_warps, num_stages=tiles.num_stages, **kw,
    )
    return P


def _kl_forward(qi, ki, wi, idx, P, options: KernelOptions):
    """(kl, lse of the indexer logits, the target's row sums) [B, Sq] against the target P
    divided by its row sums."""
    B, Sq, K = idx.shape
    kl = torch.empty(B, Sq, dtype=torch.float32, device=idx.device)
    lseI, psum = torch.empty_like(kl), torch.empty_like(kl)
    if not Sq:
        return kl, lseI, psum
    HI, DI = qi.shape[2], qi.shape[3]
    HIP, DIP = next_pow2(HI, 16), next_pow2(DI, 16)
    tiles = _kl_tiles(options.kl_fwd, idx.is_cuda, False, HIP * DIP)
    _kl_fwd_kernel[(Sq, B)](
        qi, ki, wi, idx, P, kl, lseI, psum,
        ki.shape[1], K,
        qi.stride(0), qi.stride(1), qi.stride(2),
        ki.stride(0), ki.stride(1),
        wi.stride(0), wi.stride(1), wi.stride(2),
        idx.stride(0), idx.stride(1),
        kl.stride(0), kl.stride(1),
        HI=HI, HIP=HIP, DI=DI, DIP=DIP,
        BK=tiles.BK, IEEE_I=is_fp32(qi, ki), UPCAST=interpreting(),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return kl, lseI, psum


def _kl_backward(qi, ki, wi, idx, P, lseI, psum, gkl, options: KernelOptions):
    B, Sq, HI, DI = qi.shape
    K = idx.shape[-1]
    gkl = torch.empty_like(lseI).copy_(gkl)  # the kernel reads it with lseI's strides
    dqi = torch.empty(qi.shape, dtype=torch.float32, device=qi.device)
    dwi = torch.empty(wi.shape, dtype=torch.float32, device=qi.device)
    dki = torch.zeros(ki.shape, dtype=torch.float32, device=qi.device)
    assert dqi.stride() == qi.stride() and dwi.stride() == wi.stride()
    if not Sq:
        return dqi, dki, dwi
    HIP, DIP = next_pow2(HI, 16), next_pow2(DI, 16)
    tiles = _kl_tiles(options.kl_bwd, qi.is_cuda, True, HIP * DIP)
    _kl_bwd_kernel[(Sq, B)](
        qi, ki, wi, idx, P, lseI, psum, gkl, dqi, dki, dwi,
        ki.shape[1], K,
        qi.stride(0), qi.stride(1), qi.stride(2),
        ki.stride(0), ki.stride(1),
        wi.stride(0), wi.stride(1), wi.stride(2),
        idx.stride(0), idx.stride(1),
        lseI.stride(0), lseI.stride(1),
        dki.stride(0), dki.stride(1),
        HI=HI, HIP=HIP, DI=DI, DIP=DIP,
        BK=tiles.BK, IEEE_I=is_fp32(qi, ki), UPCAST=interpreting(),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return dqi, dki, dwi


def _kl_inputs(q_idx, k_idx, w_idx, topk_idx):
    """The sparse KL kernels' indexer inputs, detached and contiguous, and the selection as int32
    (kept for the backward: half of int64's bytes)."""
    return (q_idx.detach().contiguous(), k_idx.detach().contiguous(), w_idx.detach().contiguous(),
            selection(topk_idx))


class SparseIndexerKL(torch.autograd.Function):
    """The sparse KL against p = P / its row sum: P is the head sum of the main attention over the
    set (built from q_main, kv, scale, ``lse`` optional) or given target weights."""

    @staticmethod
    def forward(ctx, q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale, lse, target, options):
        B, Sq = topk_idx.shape[:2]
        K = topk_idx.shape[-1]
        qi, ki, wi, idx = _kl_inputs(q_idx, k_idx, w_idx, topk_idx)
        if target is None:
            P = _head_sum(q_main.detach().contiguous(), kv.detach().contiguous(), idx, scale, lse, options)
        else:
            P = target.detach().float().contiguous()
            assert P.shape == (B, Sq, K), (P.shape, (B, Sq, K))
        kl, lseI, psum = _kl_forward(qi, ki, wi, idx, P, options)
        ctx.save_for_backward(qi, ki, wi, idx, P, lseI, psum)
        ctx.options = options
        ctx.dtypes = (q_idx.dtype, k_idx.dtype, w_idx.dtype)
        return kl

    @staticmethod
    def backward(ctx, gkl):
        qi, ki, wi, idx, P, lseI, psum = ctx.saved_tensors
        dqi, dki, dwi = _kl_backward(qi, ki, wi, idx, P, lseI, psum, gkl, ctx.options)
        dq_t, dk_t, dw_t = ctx.dtypes
        return None, None, dqi.to(dq_t), dki.to(dk_t), dwi.to(dw_t), None, None, None, None, None


def sparse_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale, lse=None,
                      options: KernelOptions = DEFAULT_OPTIONS):
    """Same contract as ``reference.sparse_indexer_kl``: kl [B, Sq]; grads reach q_idx, k_idx, w_idx.

    Optional ``lse`` [B, Sq, H]: the main attention's lse over the same (q_main, kv, topk_idx,
    scale), i.e. the second output of ``sparse_mla_attention``: the target kernel then skips its
    own lse pass over the gathered latent rows. An lse of other inputs gives a wrong target.
    """
    # The target never gets a gradient (detach rule). Detached here, not only in backward: an
    # autograd edge that returns None still lets the engine run the main model's backward
    # (custom Functions materialise zeros; megatron's MoE aux-loss scaler then injects its own).
    return SparseIndexerKL.apply(q_main.detach(), kv.detach(), q_idx, k_idx, w_idx, topk_idx, scale, lse, None,
                                 options)


@torch.no_grad()
def sparse_target_head_sum(q_main, kv, topk_idx, scale, lse=None, options: KernelOptions = DEFAULT_OPTIONS):
    """Same contract as ``reference.sparse_target_head_sum``: [B, Sq, K] fp32, the main
    attention's selected-set probabilities summed over q_main's heads (one pass over the
    gathered rows with ``lse``, the sparse attention's; two without)."""
    return _head_sum(q_main.detach().contiguous(), kv.detach().contiguous(), selection(topk_idx), scale, lse,
                     options)


def sparse_indexer_kl_from_target(q_idx, k_idx, w_idx, topk_idx, weights,
                                  options: KernelOptions = DEFAULT_OPTIONS):
    """Same contract as ``reference.sparse_indexer_kl_from_target``: kl [B, Sq] against the
    given target weights [B, Sq, K], normalised per row in the kernel (no pass of its own over
    them); grads reach q_idx, k_idx, w_idx (the fused backward)."""
    return SparseIndexerKL.apply(None, None, q_idx, k_idx, w_idx, topk_idx, 1.0, None, weights.detach(), options)


@torch.no_grad()
def sparse_indexer_kl_and_grads(q_idx, k_idx, w_idx, topk_idx, weights, grad_kl,
                                options: KernelOptions = DEFAULT_OPTIONS):
    """Same contract as ``reference.sparse_indexer_kl_and_grads``: (kl [B, Sq], and the gradients
    of sum(grad_kl * kl) for q_idx, k_idx, w_idx in their dtypes), against target weights as
    ``sparse_indexer_kl_from_target``'s: the forward's kernel, then the backward's. (Both in one
    kernel, a row's gradients after its value in the same program, measured slower: 149 against
    115 ms at 128K on an H100, benchmarks/results/h100/tune_dsa_kl_one_kernel_not_kept.json.)"""
    gkl = R.kl_grad_rows(topk_idx, weights, grad_kl)
    qi, ki, wi, idx = _kl_inputs(q_idx, k_idx, w_idx, topk_idx)
    P = weights.detach().float().contiguous()
    kl, lseI, psum = _kl_forward(qi, ki, wi, idx, P, options)
    dqi, dki, dwi = _kl_backward(qi, ki, wi, idx, P, lseI, psum, gkl, options)
    return kl, dqi.to(q_idx.dtype), dki.to(k_idx.dtype), dwi.to(w_idx.dtype)


# --------------------------------------------------------------------------------------------
# Dense (warm-up) KL: blockwise PyTorch, analytic backward
# --------------------------------------------------------------------------------------------


def _dense_target(qm, qp, kv, k_pos, scale, qd, k_doc):
    mask = R.causal_mask(qp, k_pos, qd, k_doc)[None]  # [1, c, Sk]
    scores = R.main_scores(qm, kv) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")), dim=-1)
    return R.head_summed_target(probs.nan_to_num_(0.0)), mask


class DenseIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_main, kv, q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos, q_doc, k_doc, objective, options):
        B, Sq, H = q_main.shape[:3]
        Sk = kv.shape[1]
        # fp32 [B, chunk, heads, Sk] temporaries within an eighth of the workspace each.
        step = max(1, min(Sq, rows_within(options.workspace_bytes // 8, B * max(H, q_idx.shape[2]) * Sk * 4)))
        kl = torch.empty(B, Sq, dtype=torch.float32, device=q_main.device)
        recall = torch.empty_like(kl)
        qm, kvd = q_main.detach(), kv.detach()
        for t0 in range(0, Sq, step):
            t1 = min(Sq, t0 + step)
            p, mask = _dense_target(qm[:, t0:t1], q_pos[t0:t1], kvd, k_pos, scale, q_doc[t0:t1], k_doc)
            logits = R.indexer_scores(q_idx[:, t0:t1], k_idx, w_idx[:, t0:t1])
            kl[:, t0:t1] = R.objective_rows(objective, topk)(p, logits, mask)
            sel = R.topk_from_scores(logits, mask, topk)
            recall[:, t0:t1] = (torch.gather(p, -1, sel.clamp_min(0)) * (sel >= 0)).sum(-1)
        ctx.save_for_backward(qm, kvd, q_idx.detach(), k_idx.detach(), w_idx.detach(), q_pos, k_pos, q_doc, k_doc)
        ctx.scale, ctx.step, ctx.objective, ctx.topk = scale, step, objective, topk
        ctx.mark_non_differentiable(recall)
        return kl, recall

    @staticmethod
    def backward(ctx, gkl, grecall):
        qm, kvd, qi, ki, wi, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        Sq = qm.shape[1]
        gkl = torch.zeros(qm.shape[:2], device=qm.device) if gkl is None else gkl.float()
        dq = torch.zeros_like(qi, dtype=torch.float32)
        dw = torch.zeros_like(wi, dtype=torch.float32)
        dk = torch.zeros_like(ki, dtype=torch.float32)
        for t0 in range(0, Sq, ctx.step):
            t1 = min(Sq, t0 + ctx.step)
            with torch.no_grad():
                p, mask = _dense_target(qm[:, t0:t1], q_pos[t0:t1], kvd, k_pos, ctx.scale, q_doc[t0:t1], k_doc)
            with torch.enable_grad():
                qc = qi[:, t0:t1].detach().requires_grad_()
                wc = wi[:, t0:t1].detach().requires_grad_()
                kc = ki.detach().requires_grad_()
                # Out of place (reference.indexer_scores works in place, not for autograd).
                logits = (
                    torch.einsum("btjd,bsd->btjs", R._up(qc), R._up(kc)).relu()
                    * R._up(wc)[..., None]
                ).sum(dim=2)
                if ctx.objective == "kl":  # analytic: d KL / d logits = softmax(logits) - p
                    with torch.no_grad():
                        sm = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num_(0.0)
                        dlog = (gkl[:, t0:t1, None] * (sm - p)).masked_fill_(~mask, 0.0)
                    gq, gk, gw = torch.autograd.grad(logits, (qc, kc, wc), dlog)
                else:  # the other objectives: autograd through their per-row loss, this chunk only
                    rows = R.objective_rows(ctx.objective, ctx.topk)(p, logits, mask)
                    gq, gk, gw = torch.autograd.grad(rows, (qc, kc, wc), gkl[:, t0:t1])
            dq[:, t0:t1] = gq
            dw[:, t0:t1] = gw
            dk += gk
        return (None, None, dq.to(qi.dtype), dk.to(ki.dtype), dw.to(wi.dtype), None, None, None, None, None, None, None,
                None)


def dense_indexer_kl(
    q_main: torch.Tensor,
    kv: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w_idx: torch.Tensor,
    scale: float,
    topk: int,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    objective: str = "kl",
    recall_rows: Optional[torch.Tensor] = None,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.dense_indexer_kl``: (kl [B, Sq], recall [B, Sq], or [B, n]
    at ``recall_rows``); ``objective`` as there (the KL's gradient is analytic, the others'
    come from autograd chunk by chunk). With ``options.dense_kl == "fused"`` (the default) the
    KL runs as fused Triton kernels (``dense_kl``), which score the recall's top-k on
    ``recall_rows`` only. ``q_doc`` / ``k_doc``: document ids of a packed sequence, as there."""
    R.objective_rows(objective)  # an unknown name fails before any compute
    R.check_main_keys(q_main, kv)
    if objective == "kl" and options.dense_kl == "fused":
        return _dense_kl.fused_dense_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos,
                                                recall_rows=recall_rows, q_doc=q_doc, k_doc=k_doc, options=options)
    Sq, Sk = q_main.shape[1], kv.shape[1]
    q_pos = R._positions(q_pos, Sq, q_main.device)
    k_pos = R._positions(k_pos, Sk, q_main.device)
    q_doc, k_doc = R._documents(q_doc, Sq, q_main.device), R._documents(k_doc, Sk, q_main.device)
    # Detached target: see sparse_indexer_kl.
    kl, recall = DenseIndexerKL.apply(q_main.detach(), kv.detach(), q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos,
                                      q_doc, k_doc, objective, options)
    return kl, (recall if recall_rows is None else recall[:, recall_rows])
