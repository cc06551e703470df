"""The indexer's KL objectives without S^2 memory.

* ``sparse_indexer_kl``: fused Triton forward and backward over the selected set.  Forward, one
  program per (token, batch): pass 1 streams the selected KV rows and builds the main
  attention's per-head log-sum-exp; pass 2 recomputes the probabilities, sums them over heads
  (the target p, renormalised over the set), computes the indexer logits for the same rows,
  and accumulates sum p log p, sum p I and the indexer's online log-sum-exp:
  KL = sum p log p - sum p I + lse_I * sum p.  p is kept ([B, Sq, K] fp32) for backward, which
  recomputes the logits and pushes dI = g * (softmax(I) - p) into q_idx, w_idx (per program)
  and k_idx (fp32 atomic adds).
* ``dense_indexer_kl``: the fused Triton kernels of ``dense_kl`` for the KL (the default), or
  blockwise PyTorch over query chunks (O(chunk x Sk) memory; ``MDSA_DENSE_KL=blockwise`` and the
  other objectives), as an autograd.Function whose backward recomputes each chunk and uses
  dI = g * (softmax(I) - p) directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as R
from .sparse_attn import atomic_mode
from . import _common as _C
from . import _csr
from . import dense_kl as _dense_kl
from ._common import HAS_TRITON, _atomic_add_f32, _dot, _dot_ds, _span, interpreting, is_fp32, next_pow2, split_pow2, triton, tl

DENSE_CHUNK_ELEMENTS = 1 << 26
# Use the attention's lse when the caller passes one (sparse_indexer_kl(..., lse=...)); False
# recomputes it in the kernel's first pass even when given.
REUSE_LSE = True


if HAS_TRITON:

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
    def _sparse_kl_fwd_kernel(
        QM, KV, QI, KI, WI, IDX, KL, P, LSEI, LSEM,
        Sk, TOPK, scale_log2,
        s_qmb, s_qms, s_qmh,
        s_kvb, s_kvs,
        s_qib, s_qis, s_qih,
        s_kib, s_kis,
        s_wib, s_wis, s_wih,
        s_ib, s_is,
        s_lb, s_ls,
        s_mb, s_ms,
        H: tl.constexpr, HP: tl.constexpr,
        DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr,
        HAS_LSE: tl.constexpr, MODE: tl.constexpr,
    ):
        # HAS_LSE: LSEM [B, Sq, H] (heads contiguous) is the main attention's natural-log lse
        # over the same set (sparse_mla_attention's second output): pass 1 is skipped.
        # MODE 0: the whole KL (target = head average, written to P).  MODE 1: only the
        # target's head SUM, written to P (summed over TP ranks by the caller).  MODE 2: the KL
        # against the target read from P (QM, KV, LSEM unused).
        t = tl.program_id(0)
        b = tl.program_id(1)
        ib = IDX + b * s_ib + t * s_is
        pb = P + b * s_ib + t * s_is
        if MODE != 2:
            h, hm = _span(H, HP)
            d1, d1m = _span(DV, D1)
            d2, d2m = _span(DR, D2)
            qb = QM + b * s_qmb + t * s_qms + h[:, None] * s_qmh
            q1 = tl.load(qb + d1[None, :], mask=hm[:, None] & d1m[None, :], other=0.0)
            q2 = tl.load(qb + DV + d2[None, :], mask=hm[:, None] & d2m[None, :], other=0.0)
            kvb = KV + b * s_kvb
            if HAS_LSE:
                lsem = tl.load(LSEM + b * s_mb + t * s_ms + h, mask=hm, other=float("-inf"))
                has_h = (lsem > float("-inf")) & hm
                lse2 = tl.where(has_h, lsem * 1.4426950408889634, float("inf"))
            else:
                # Pass 1: per-head log-sum-exp of the main scores over the selected set.
                m_i = tl.full((HP,), float("-inf"), tl.float32)
                l_i = tl.zeros((HP,), tl.float32)
                for k0 in range(0, TOPK, BK):
                    kk = k0 + tl.arange(0, BK)
                    idx = tl.load(ib + kk, mask=kk < TOPK, other=-1)
                    valid = (idx >= 0) & (idx < Sk)
                    s = _main_scores(q1, q2, kvb + idx * s_kvs, valid, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST)
                    s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                    m_i = m_new
                has_h = (l_i > 0.0) & hm
                lse2 = tl.where(has_h, m_i + tl.log2(tl.where(has_h, l_i, 1.0)), float("inf"))
            if MODE == 0:
                inv_h = 1.0 / tl.maximum(tl.sum(has_h.to(tl.float32), axis=0), 1.0)
        if MODE == 1:
            for k0 in range(0, TOPK, BK):
                kk = k0 + tl.arange(0, BK)
                idx = tl.load(ib + kk, mask=kk < TOPK, other=-1)
                valid = (idx >= 0) & (idx < Sk)
                s = _main_scores(q1, q2, kvb + idx * s_kvs, valid, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST)
                ph = tl.exp2(s * scale_log2 - lse2[:, None])
                tl.store(pb + kk, tl.where(valid, tl.sum(ph, axis=0), 0.0), mask=kk < TOPK)
        else:
            # Pass 2: target p, indexer logits, KL terms.
            j, jm = _span(HI, HIP)
            di, dim_ = _span(DI, DIP)
            qi = tl.load(QI + b * s_qib + t * s_qis + j[:, None] * s_qih + di[None, :],
                         mask=jm[:, None] & dim_[None, :], other=0.0)
            wi = tl.load(WI + b * s_wib + t * s_wis + j * s_wih, mask=jm, other=0.0).to(tl.float32)
            kib = KI + b * s_kib
            mI = float("-inf")
            lI = 0.0
            plogp = 0.0
            pI = 0.0
            psum = 0.0
            for k0 in range(0, TOPK, BK):
                kk = k0 + tl.arange(0, BK)
                idx = tl.load(ib + kk, mask=kk < TOPK, other=-1)
                valid = (idx >= 0) & (idx < Sk)
                if MODE == 2:
                    p = tl.where(valid, tl.load(pb + kk, mask=kk < TOPK, other=0.0), 0.0)
                else:
                    s = _main_scores(q1, q2, kvb + idx * s_kvs, valid, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST)
                    ph = tl.exp2(s * scale_log2 - lse2[:, None])
                    p = tl.where(valid, tl.sum(ph, axis=0) * inv_h, 0.0)
                    tl.store(pb + kk, p, mask=kk < TOPK)
                ki = tl.load(kib + idx[:, None] * s_kis + di[None, :], mask=valid[:, None] & dim_[None, :], other=0.0)
                si = _dot(qi, tl.trans(ki), IEEE_I, UPCAST)
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

    @triton.jit
    def _sparse_kl_bwd_kernel(
        QI, KI, WI, IDX, P, LSEI, GKL, DQI, DKI, DWI, POS, PART,
        Sk, TOPK, t0,
        s_qib, s_qis, s_qih,
        s_kib, s_kis,
        s_wib, s_wis, s_wih,
        s_ib, s_is,
        s_lb, s_ls,
        s_dkb, s_dks,
        s_pb, s_ps,
        HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BK: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr, DS_3XTF32: tl.constexpr,
        SORTED: tl.constexpr,
    ):
        # DQI shares QI's strides, DWI shares WI's strides (both fp32 buffers made contiguous alike).
        # SORTED: per-pair dk rows to PART at row POS[b, t, slot] (row stride DI), else atomics.
        t = t0 + tl.program_id(0)
        b = tl.program_id(1)
        j, jm = _span(HI, HIP)
        di, dim_ = _span(DI, DIP)
        qi = tl.load(QI + b * s_qib + t * s_qis + j[:, None] * s_qih + di[None, :],
                     mask=jm[:, None] & dim_[None, :], other=0.0)
        wi = tl.load(WI + b * s_wib + t * s_wis + j * s_wih, mask=jm, other=0.0).to(tl.float32)
        lseI = tl.load(LSEI + b * s_lb + t * s_ls)
        g = tl.load(GKL + b * s_lb + t * s_ls)
        lse_safe = tl.where(lseI == float("-inf"), float("inf"), lseI)
        ib = IDX + b * s_ib + t * s_is
        pb = P + b * s_ib + t * s_is
        kib = KI + b * s_kib
        dkb = DKI + b * s_dkb
        dq = tl.zeros((HIP, DIP), tl.float32)
        dw = tl.zeros((HIP,), tl.float32)
        for k0 in range(0, TOPK, BK):
            kk = k0 + tl.arange(0, BK)
            idx = tl.load(ib + kk, mask=kk < TOPK, other=-1)
            valid = (idx >= 0) & (idx < Sk)
            p = tl.load(pb + kk, mask=kk < TOPK, other=0.0)
            ki = tl.load(kib + idx[:, None] * s_kis + di[None, :], mask=valid[:, None] & dim_[None, :], other=0.0)
            si = _dot(qi, tl.trans(ki), IEEE_I, UPCAST)
            r = tl.maximum(si, 0.0)
            logit = tl.sum(r * wi[:, None], axis=0)
            sm = tl.exp(logit - lse_safe)
            dI = tl.where(valid, g * (sm - p), 0.0)
            dw += tl.sum(r * dI[None, :], axis=1)
            dS = tl.where(si > 0.0, dI[None, :] * wi[:, None], 0.0)
            dSc = dS.to(ki.dtype)
            dq += _dot(dSc, ki, IEEE_I, UPCAST)
            dk = _dot_ds(tl.trans(dS), qi, IEEE_I, UPCAST, DS_3XTF32)
            if SORTED:
                prow = tl.load(POS + b * s_pb + t * s_ps + kk, mask=kk < TOPK, other=0)
                tl.store(PART + prow.to(tl.int64)[:, None] * DI + di[None, :], dk.to(PART.dtype.element_ty),
                         mask=valid[:, None] & dim_[None, :])
            else:
                _atomic_add_f32(dkb + idx[:, None] * s_dks + di[None, :], dk, valid[:, None] & dim_[None, :], ATOMIC)
        tl.store(DQI + b * s_qib + t * s_qis + j[:, None] * s_qih + di[None, :], dq.to(DQI.dtype.element_ty),
                 mask=jm[:, None] & dim_[None, :])
        tl.store(DWI + b * s_wib + t * s_wis + j * s_wih, dw.to(DWI.dtype.element_ty), mask=jm)


# Optional (BK, num_warps, num_stages) overrides.
KL_FWD_CFG = None
KL_BWD_CFG = None


def _kl_cfg(on_gpu, bwd=False):
    if not on_gpu:
        return (16, 4, 1)
    # Measured at 128K (H200): forward (32, 4, 2) 197 ms vs (32, 8, 2) 261 ms;
    # backward (64, 4, 2) 98 ms vs (32, 8, 2) 196 ms.
    if bwd:
        return KL_BWD_CFG or (64, 4, 2)
    return KL_FWD_CFG or (32, 4, 2)


def _kl_forward(mode, idx, P, qm=None, kv=None, lse=None, scale=1.0, qi=None, ki=None, wi=None):
    """Launch ``_sparse_kl_fwd_kernel`` in ``mode`` (0: whole KL, 1: target head sum, 2: KL
    against the target in P). Returns (kl, lse of the indexer logits) for modes 0 and 2."""
    B, Sq, K = idx.shape
    dev = idx.device
    kl = torch.empty(B, Sq, dtype=torch.float32, device=dev)
    lseI = torch.empty(B, Sq, dtype=torch.float32, device=dev)
    if not Sq:
        return kl, lseI
    if mode == 2:  # the main attention's tensors are not read
        qm, kv = P[..., None, None], P[..., None]
        H, DV, D1, DR, D2 = 1, 16, 16, 0, 16
    else:
        H = qm.shape[2]
        DV, D1, DR, D2 = split_pow2(qm.shape[-1])
    if mode == 1:  # the indexer's tensors are not read
        qi, ki, wi = P[..., None, None], P[..., None], P[..., None]
        HI, DI = 1, 16
    else:
        HI, DI = qi.shape[2], qi.shape[3]
    has_lse = mode != 2 and lse is not None and REUSE_LSE
    if has_lse:
        lsem = lse.detach().float().contiguous()
        assert lsem.shape == (B, Sq, H), (lsem.shape, (B, Sq, H))
    else:
        lsem = kl  # unused
    BK, nw, ns = _kl_cfg(dev.type == "cuda")
    _sparse_kl_fwd_kernel[(Sq, B)](
        qm, kv, qi, ki, wi, idx, kl, P, lseI, lsem,
        (ki if mode == 2 else kv).shape[1], K, scale * 1.4426950408889634,
        qm.stride(0), qm.stride(1), qm.stride(2),
        kv.stride(0), kv.stride(1),
        qi.stride(0), qi.stride(1), qi.stride(2),
        ki.stride(0), ki.stride(1),
        wi.stride(0), wi.stride(1), wi.stride(2),
        idx.stride(0), idx.stride(1),
        kl.stride(0), kl.stride(1),
        lsem.stride(0), lsem.stride(1),
        H=H, HP=next_pow2(H, 16), DV=DV, D1=D1, DR=DR, D2=D2,
        HI=HI, HIP=next_pow2(HI, 16), DI=DI, DIP=next_pow2(DI, 16),
        BK=BK, IEEE=mode != 2 and is_fp32(qm, kv), IEEE_I=mode != 1 and is_fp32(qi, ki), UPCAST=interpreting(),
        HAS_LSE=has_lse, MODE=mode, num_warps=nw, num_stages=ns,
    )
    return kl, lseI


class SparseIndexerKL(torch.autograd.Function):
    """The fused sparse KL. ``target`` None: p is the head average of the main attention over
    the set (q_main, kv, scale; ``lse`` optional); else p = target [B, Sq, K] as given."""

    @staticmethod
    def forward(ctx, q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale, lse=None, target=None):
        B, Sq = topk_idx.shape[:2]
        K = topk_idx.shape[-1]
        qi, ki, wi = q_idx.detach().contiguous(), k_idx.detach().contiguous(), w_idx.detach().contiguous()
        idx = topk_idx.contiguous()
        if target is None:
            P = torch.empty(B, Sq, K, dtype=torch.float32, device=idx.device)
            kl, lseI = _kl_forward(0, idx, P, q_main.detach().contiguous(), kv.detach().contiguous(), lse, scale,
                                   qi, ki, wi)
        else:
            P = target.detach().float().contiguous()
            assert P.shape == (B, Sq, K), (P.shape, (B, Sq, K))
            kl, lseI = _kl_forward(2, idx, P, qi=qi, ki=ki, wi=wi)
        ctx.save_for_backward(qi, ki, wi, idx, P, lseI)
        ctx.dtypes = (q_idx.dtype, k_idx.dtype, w_idx.dtype)
        return kl

    @staticmethod
    def backward(ctx, gkl):
        qi, ki, wi, idx, P, lseI = ctx.saved_tensors
        B, Sq, HI, DI = qi.shape
        Sk = ki.shape[1]
        K = idx.shape[-1]
        gkl = torch.empty_like(lseI).copy_(gkl)  # the kernel reads it with lseI's strides
        # The kernel accumulates in fp32 and stores in the inputs' dtypes (no fp32 copies).
        dqi = torch.empty_like(qi)
        dwi = torch.empty_like(wi)
        dki = torch.zeros(ki.shape, dtype=torch.float32, device=qi.device)
        # DQI/DWI use QI/WI strides: make sure the layouts agree.
        assert dqi.stride() == qi.stride() and dwi.stride() == wi.stride()
        BK, nw, ns = _kl_cfg(qi.is_cuda, bwd=True)
        sorted_ = _C.reduce_sorted(kl=True)
        ieee_i = is_fp32(qi, ki)
        if sorted_ and Sq:
            csr = _csr.build_csr(idx, Sk)
            part = torch.empty(csr.rows, DI, dtype=_C.part_dtype(ieee_i), device=qi.device)
            pos = csr.pos
            chunks = [(c * csr.C, min(Sq, (c + 1) * csr.C)) for c in range(csr.NC)]
        else:
            part, pos, chunks = dki, idx, ([(0, Sq)] if Sq else [])
        for c, (t0, t1) in enumerate(chunks):
            _sparse_kl_bwd_kernel[(t1 - t0, B)](
                qi, ki, wi, idx, P, lseI, gkl, dqi, dki, dwi, pos, part,
                Sk, K, t0,
                qi.stride(0), qi.stride(1), qi.stride(2),
                ki.stride(0), ki.stride(1),
                wi.stride(0), wi.stride(1), wi.stride(2),
                idx.stride(0), idx.stride(1),
                lseI.stride(0), lseI.stride(1),
                dki.stride(0), dki.stride(1),
                pos.stride(0), pos.stride(1),
                HI=HI, HIP=next_pow2(HI, 16), DI=DI, DIP=next_pow2(DI, 16),
                BK=BK, IEEE_I=ieee_i, UPCAST=interpreting(), ATOMIC=atomic_mode(), DS_3XTF32=_C.DS_3XTF32,
                SORTED=sorted_, num_warps=nw, num_stages=ns,
            )
            if sorted_:
                _csr.seg_reduce(part, csr, c, dki)
        dq_t, dk_t, dw_t = ctx.dtypes
        return None, None, dqi.to(dq_t), dki.to(dk_t), dwi.to(dw_t), None, None, None, None


def sparse_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale, lse=None):
    """Same contract as ``reference.sparse_indexer_kl``: kl [B, Sq]; grads reach q_idx, k_idx, w_idx.

    Optional ``lse`` [B, Sq, H]: the main attention's lse over the same (q_main, kv, topk_idx,
    scale), i.e. the second output of ``sparse_mla_attention``.  With it (and ``REUSE_LSE``)
    the forward skips its own lse pass over the gathered 576-dim rows (one pass instead of
    two).  Passing an lse of different inputs gives a wrong target: the caller's contract.
    """
    # The target never gets a gradient (detach rule). Detached here, not only in backward: an
    # autograd edge that returns None still lets the engine run the main model's backward
    # (custom Functions materialise zeros; megatron's MoE aux-loss scaler then injects its own).
    return SparseIndexerKL.apply(q_main.detach(), kv.detach(), q_idx, k_idx, w_idx, topk_idx, scale, lse)


@torch.no_grad()
def sparse_target_head_sum(q_main, kv, topk_idx, scale, lse=None):
    """Same contract as ``reference.sparse_target_head_sum``: [B, Sq, K] fp32, the main
    attention's selected-set probabilities summed over q_main's heads (one pass over the
    gathered rows with ``lse``, the sparse attention's; two without)."""
    idx = topk_idx.contiguous()
    P = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
    _kl_forward(1, idx, P, q_main.detach().contiguous(), kv.detach().contiguous(), lse, scale)
    return P


def sparse_indexer_kl_from_target(q_idx, k_idx, w_idx, topk_idx, p):
    """Same contract as ``reference.sparse_indexer_kl_from_target``: kl [B, Sq] against the
    given target p [B, Sq, K]; grads reach q_idx, k_idx, w_idx (the fused backward)."""
    return SparseIndexerKL.apply(None, None, q_idx, k_idx, w_idx, topk_idx, 1.0, None, p.detach())


# --------------------------------------------------------------------------------------------
# Dense (warm-up) KL: blockwise PyTorch, analytic backward
# --------------------------------------------------------------------------------------------


def _dense_target(qm, qp, kv, k_pos, scale):
    mask = R.causal_mask(qp, k_pos)[None]  # [1, c, Sk]
    scores = torch.einsum("bthd,bsd->bths", R._up(qm), R._up(kv)) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")), dim=-1)
    return R.head_summed_target(probs.nan_to_num_(0.0)), mask


class DenseIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_main, kv, q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos, objective="kl"):
        B, Sq, H = q_main.shape[:3]
        Sk = kv.shape[1]
        step = max(1, min(Sq, DENSE_CHUNK_ELEMENTS // max(B * max(H, q_idx.shape[2]) * Sk, 1)))
        kl = torch.empty(B, Sq, dtype=torch.float32, device=q_main.device)
        recall = torch.empty_like(kl)
        qm, kvd = q_main.detach(), kv.detach()
        for t0 in range(0, Sq, step):
            t1 = min(Sq, t0 + step)
            p, mask = _dense_target(qm[:, t0:t1], q_pos[t0:t1], kvd, k_pos, scale)
            logits = R.indexer_scores(q_idx[:, t0:t1], k_idx, w_idx[:, t0:t1])
            kl[:, t0:t1] = R.objective_rows(objective, topk)(p, logits, mask)
            sel = R.topk_from_scores(logits, mask, topk)
            recall[:, t0:t1] = (torch.gather(p, -1, sel.clamp_min(0)) * (sel >= 0)).sum(-1)
        ctx.save_for_backward(qm, kvd, q_idx.detach(), k_idx.detach(), w_idx.detach(), q_pos, k_pos)
        ctx.scale, ctx.step, ctx.objective, ctx.topk = scale, step, objective, topk
        ctx.mark_non_differentiable(recall)
        return kl, recall

    @staticmethod
    def backward(ctx, gkl, grecall):
        qm, kvd, qi, ki, wi, q_pos, k_pos = ctx.saved_tensors
        Sq = qm.shape[1]
        gkl = torch.zeros(qm.shape[:2], device=qm.device) if gkl is None else gkl.float()
        dq = torch.zeros_like(qi, dtype=torch.float32)
        dw = torch.zeros_like(wi, dtype=torch.float32)
        dk = torch.zeros_like(ki, dtype=torch.float32)
        for t0 in range(0, Sq, ctx.step):
            t1 = min(Sq, t0 + ctx.step)
            with torch.no_grad():
                p, mask = _dense_target(qm[:, t0:t1], q_pos[t0:t1], kvd, k_pos, ctx.scale)
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
        return None, None, dq.to(qi.dtype), dk.to(ki.dtype), dw.to(wi.dtype), None, None, None, None, None


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.dense_indexer_kl``: (kl [B, Sq], recall [B, Sq], or [B, n]
    at ``recall_rows``); ``objective`` as there (the KL's gradient is analytic, the others'
    come from autograd chunk by chunk). With ``dense_kl.FUSED`` the KL runs as fused Triton
    kernels (``dense_kl``), which score the recall's top-k on ``recall_rows`` only."""
    R.objective_rows(objective)  # an unknown name fails before any compute
    if objective == "kl" and _dense_kl.FUSED:
        return _dense_kl.fused_dense_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos,
                                                recall_rows=recall_rows)
    Sq, Sk = q_main.shape[1], kv.shape[1]
    q_pos = R._positions(q_pos, Sq, q_main.device)
    k_pos = R._positions(k_pos, Sk, q_main.device)
    # Detached target: see sparse_indexer_kl.
    kl, recall = DenseIndexerKL.apply(q_main.detach(), kv.detach(), q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos,
                                      objective)
    return kl, (recall if recall_rows is None else recall[:, recall_rows])
