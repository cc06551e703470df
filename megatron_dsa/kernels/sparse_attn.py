"""Sparse MLA attention over top-k indices, absorbed (MQA) form, forward + backward in Triton.

q [B, Sq, H, Dqk], kv [B, Sk, Dqk] (values = kv[..., :v_dim]), topk_idx [B, Sq, K] (-1 skipped).
One program per (query token, batch): all H heads of the token share the gathered KV rows, so
each selected row is loaded once per token and used by every head.  Dqk is split into the value
part (v_dim, padded to a power of two) and the rest (rope dims, padded), so any Dqk/v_dim works
(576 = 512 + 64, 192 = 128 + 64, 96 = 64 + 32, ...).  Backward: dq per program; dkv either by
fp32 atomic adds into a [B, Sk, Dqk] buffer (``_common.REDUCE_MODE = "atomic"``, the default:
measured faster on the H200) or atomic-free: per-pair rows written in key order and summed per
key (``_csr``, "sorted").
"""

from __future__ import annotations

import math

import torch

from . import _common as _C
from . import _csr
from ._common import HAS_TRITON, _atomic_add_f32, _dot, _dot_ds, _span, interpreting, is_fp32, next_pow2, triton, tl

LOG2E = 1.4426950408889634


# dkv accumulation: 0 = tl.atomic_add (relaxed), 2 = paired red.global.add.v2.f32 (GPU only;
# only 3% faster at 128K and WRONG where the register layout replicates elements, e.g. 16-wide
# tiles: it double-counts, see benchmarks/NOTES.md), 1 = skip (timing experiments only).
ATOMIC_MODE = 0
# Optional (BK, num_warps, num_stages) overrides for the forward / backward kernels.
FWD_CFG = None
BWD_CFG = None


def atomic_mode():
    return 0 if interpreting() else ATOMIC_MODE


def _cfg(D1, D2, on_gpu, bwd=False):
    # Measured at 128K, H=16, 576/512: forward (64, 4, 2) 71 ms vs (32, 8, 2) 123 ms;
    # backward (32, 8, 2) 518 ms vs (16, 8, 2) 717 and (32, 4, 2) 834.
    if not on_gpu:
        return 16, 4, 1
    big = D1 + D2 > 256
    if bwd:
        return (32 if big else 64), (8 if big else 4), (2 if big else 3)
    return 64, 4, 2


if HAS_TRITON:

    @triton.jit
    def _sparse_fwd_kernel(
        Q, KV, IDX, O, LSE,
        Sk, TOPK, scale_log2,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        H: tl.constexpr, HP: tl.constexpr,
        DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        t = tl.program_id(0)
        b = tl.program_id(1)
        h, hm = _span(H, HP)
        d1, d1m = _span(DV, D1)
        qb = Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
        q1 = tl.load(qb + d1[None, :], mask=hm[:, None] & d1m[None, :], other=0.0)
        if DR > 0:
            d2, d2m = _span(DR, D2)
            q2 = tl.load(qb + DV + d2[None, :], mask=hm[:, None] & d2m[None, :], other=0.0)
        m_i = tl.full((HP,), float("-inf"), tl.float32)
        l_i = tl.zeros((HP,), tl.float32)
        acc = tl.zeros((HP, D1), tl.float32)
        ib = IDX + b * stride_ib + t * stride_is
        kvb = KV + b * stride_kb
        for k0 in range(0, TOPK, BK):
            kk = k0 + tl.arange(0, BK)
            idx = tl.load(ib + kk, mask=kk < TOPK, other=-1)
            valid = (idx >= 0) & (idx < Sk)
            rowp = kvb + idx * stride_ks
            kv1 = tl.load(rowp[:, None] + d1[None, :], mask=valid[:, None] & d1m[None, :], other=0.0)
            s = _dot(q1, tl.trans(kv1), IEEE, UPCAST)
            if DR > 0:
                kv2 = tl.load(rowp[:, None] + DV + d2[None, :], mask=valid[:, None] & d2m[None, :], other=0.0)
                s += _dot(q2, tl.trans(kv2), IEEE, UPCAST)
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(kv1.dtype), kv1, IEEE, UPCAST)
            m_i = m_new
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        ob = O + b * stride_ob + t * stride_os + h[:, None] * stride_oh + d1[None, :]
        tl.store(ob, out.to(O.dtype.element_ty), mask=hm[:, None] & d1m[None, :])
        tl.store(LSE + b * stride_lb + t * stride_ls + h, lse, mask=hm)

    @triton.jit
    def _sparse_bwd_kernel(
        Q, KV, IDX, DO, LSE, DELTA, DQ, DKV, POS, PART,
        Sk, TOPK, scale, scale_log2, t0,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_ib, stride_is,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        stride_dkb, stride_dks,
        stride_pb, stride_ps,
        H: tl.constexpr, HP: tl.constexpr,
        DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr, DS_3XTF32: tl.constexpr,
        SORTED: tl.constexpr,
    ):
        # Q/DQ share strides; DO uses stride_o*; LSE/DELTA share stride_l*.
        # SORTED: the per-pair dkv rows go to PART at row POS[b, t, slot] (row stride DV + DR),
        # summed per key by _csr.seg_reduce; otherwise fp32 atomics into DKV.
        t = t0 + tl.program_id(0)
        b = tl.program_id(1)
        h, hm = _span(H, HP)
        d1, d1m = _span(DV, D1)
        qb = Q + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
        q1 = tl.load(qb + d1[None, :], mask=hm[:, None] & d1m[None, :], other=0.0)
        do = tl.load(
            DO + b * stride_ob + t * stride_os + h[:, None] * stride_oh + d1[None, :],
            mask=hm[:, None] & d1m[None, :], other=0.0,
        )
        lse = tl.load(LSE + b * stride_lb + t * stride_ls + h, mask=hm, other=float("-inf"))
        delta = tl.load(DELTA + b * stride_lb + t * stride_ls + h, mask=hm, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        dq1 = tl.zeros((HP, D1), tl.float32)
        if DR > 0:
            d2, d2m = _span(DR, D2)
            q2 = tl.load(qb + DV + d2[None, :], mask=hm[:, None] & d2m[None, :], other=0.0)
            dq2 = tl.zeros((HP, D2), tl.float32)
        ib = IDX + b * stride_ib + t * stride_is
        kvb = KV + b * stride_kb
        dkvb = DKV + b * stride_dkb
        for k0 in range(0, TOPK, BK):
            kk = k0 + tl.arange(0, BK)
            idx = tl.load(ib + kk, mask=kk < TOPK, other=-1)
            valid = (idx >= 0) & (idx < Sk)
            rowp = kvb + idx * stride_ks
            kv1 = tl.load(rowp[:, None] + d1[None, :], mask=valid[:, None] & d1m[None, :], other=0.0)
            s = _dot(q1, tl.trans(kv1), IEEE, UPCAST)
            if DR > 0:
                kv2 = tl.load(rowp[:, None] + DV + d2[None, :], mask=valid[:, None] & d2m[None, :], other=0.0)
                s += _dot(q2, tl.trans(kv2), IEEE, UPCAST)
            p = tl.exp2(s * scale_log2 - lse2[:, None])
            p = tl.where(valid[None, :], p, 0.0)
            dp = _dot(do, tl.trans(kv1), IEEE, UPCAST)
            ds = p * (dp - delta[:, None]) * scale  # d loss / d (q . k)
            dsc = ds.to(kv1.dtype)
            dq1 += _dot(dsc, kv1, IEEE, UPCAST)
            dk1 = _dot_ds(tl.trans(ds), q1, IEEE, UPCAST, DS_3XTF32) + _dot(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)
            if SORTED:
                prow = tl.load(POS + b * stride_pb + t * stride_ps + kk, mask=kk < TOPK, other=0)
                dkp = PART + prow.to(tl.int64) * (DV + DR)
                tl.store(dkp[:, None] + d1[None, :], dk1.to(PART.dtype.element_ty), mask=valid[:, None] & d1m[None, :])
            else:
                dkp = dkvb + idx * stride_dks
                _atomic_add_f32(dkp[:, None] + d1[None, :], dk1, valid[:, None] & d1m[None, :], ATOMIC)
            if DR > 0:
                dq2 += _dot(dsc, kv2, IEEE, UPCAST)
                dk2 = _dot_ds(tl.trans(ds), q2, IEEE, UPCAST, DS_3XTF32)
                if SORTED:
                    tl.store(dkp[:, None] + DV + d2[None, :], dk2.to(PART.dtype.element_ty), mask=valid[:, None] & d2m[None, :])
                else:
                    _atomic_add_f32(dkp[:, None] + DV + d2[None, :], dk2, valid[:, None] & d2m[None, :], ATOMIC)
        dqb = DQ + b * stride_qb + t * stride_qs + h[:, None] * stride_qh
        tl.store(dqb + d1[None, :], dq1.to(DQ.dtype.element_ty), mask=hm[:, None] & d1m[None, :])
        if DR > 0:
            tl.store(dqb + DV + d2[None, :], dq2.to(DQ.dtype.element_ty), mask=hm[:, None] & d2m[None, :])


def _dims(D, v_dim):
    DR = D - v_dim
    D1 = next_pow2(v_dim, 16)
    D2 = next_pow2(DR, 16) if DR > 0 else 16
    return DR, D1, D2


def sparse_attn_fwd(q, kv, idx, v_dim, scale):
    B, Sq, H, D = q.shape
    Sk = kv.shape[1]
    K = idx.shape[-1]
    DR, D1, D2 = _dims(D, v_dim)
    ieee = is_fp32(q, kv)
    out = torch.empty(B, Sq, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Sq, H, dtype=torch.float32, device=q.device)
    if Sq == 0:
        return out, lse
    BK, nw, ns = FWD_CFG or _cfg(D1, D2 if DR else 0, q.is_cuda)
    HP = next_pow2(H, 16)
    _sparse_fwd_kernel[(Sq, B)](
        q, kv, idx, out, lse,
        Sk, K, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1),
        idx.stride(0), idx.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        H=H, HP=HP, DV=v_dim, D1=D1, DR=DR, D2=D2, BK=BK, IEEE=ieee, UPCAST=interpreting(),
        num_warps=nw, num_stages=ns,
    )
    return out, lse


DELTA_CHUNK_ELEMENTS = 1 << 26  # fp32 temporaries per chunk: 256 MiB each


def _rowwise_dot(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum(dout * out, -1) in fp32 [B, Sq, H], a chunk of rows at a time: in one piece the fp32
    copies of dout and out and their product were 12 GiB of temporaries at 128K (16 heads x 512),
    more than the backward's own outputs."""
    B, Sq, H, V = out.shape
    delta = torch.empty(B, Sq, H, dtype=torch.float32, device=out.device)
    step = max(1, DELTA_CHUNK_ELEMENTS // max(1, B * H * V))
    for t0 in range(0, Sq, step):
        t1 = min(Sq, t0 + step)
        delta[:, t0:t1] = (dout[:, t0:t1].float() * out[:, t0:t1].float()).sum(-1)
    return delta


def sparse_attn_bwd(q, kv, idx, out, lse, dout, v_dim, scale):
    B, Sq, H, D = q.shape
    Sk = kv.shape[1]
    K = idx.shape[-1]
    DR, D1, D2 = _dims(D, v_dim)
    ieee = is_fp32(q, kv)
    dout = dout.contiguous()
    delta = _rowwise_dot(dout, out)  # [B, Sq, H]
    dq = torch.empty_like(q)
    dkv = torch.zeros(B, Sk, D, dtype=torch.float32, device=q.device)
    if Sq:
        BK, nw, ns = BWD_CFG or _cfg(D1, D2 if DR else 0, q.is_cuda, bwd=True)
        HP = next_pow2(H, 16)
        sorted_ = _C.reduce_sorted()
        if sorted_:
            csr = _csr.build_csr(idx, Sk)
            part = torch.empty(csr.rows, D, dtype=_C.part_dtype(ieee), device=q.device)
            pos = csr.pos
            chunks = [(c * csr.C, min(Sq, (c + 1) * csr.C)) for c in range(csr.NC)]
        else:
            part, pos, chunks = dkv, idx, [(0, Sq)]
        for c, (t0, t1) in enumerate(chunks):
            _sparse_bwd_kernel[(t1 - t0, B)](
                q, kv, idx, dout, lse, delta, dq, dkv, pos, part,
                Sk, K, scale, scale * 1.4426950408889634, t0,
                q.stride(0), q.stride(1), q.stride(2),
                kv.stride(0), kv.stride(1),
                idx.stride(0), idx.stride(1),
                dout.stride(0), dout.stride(1), dout.stride(2),
                lse.stride(0), lse.stride(1),
                dkv.stride(0), dkv.stride(1),
                pos.stride(0), pos.stride(1),
                H=H, HP=HP, DV=v_dim, D1=D1, DR=DR, D2=D2, BK=BK, IEEE=ieee, UPCAST=interpreting(), ATOMIC=atomic_mode(), DS_3XTF32=_C.DS_3XTF32,
                SORTED=sorted_, num_warps=nw, num_stages=ns,
            )
            if sorted_:
                _csr.seg_reduce(part, csr, c, dkv)
    return dq, dkv.to(kv.dtype)


class SparseMLAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, topk_idx, v_dim, scale):
        q_c, kv_c, idx_c = q.contiguous(), kv.contiguous(), topk_idx.contiguous()
        out, lse = sparse_attn_fwd(q_c, kv_c, idx_c, v_dim, scale)
        ctx.save_for_backward(q_c, kv_c, idx_c, out, lse)
        ctx.v_dim, ctx.scale = v_dim, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, idx, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_attn_bwd(q, kv, idx, out, lse, dout, ctx.v_dim, ctx.scale)
        return dq, dkv, None, None, None


def sparse_mla_attention(q, kv, topk_idx, v_dim, scale):
    """Same contract as ``reference.sparse_mla_attention``: returns (out [B,Sq,H,v_dim], lse [B,Sq,H])."""
    return SparseMLAAttention.apply(q, kv, topk_idx, v_dim, scale)
