"""The warm-up's dense indexer KL as fused Triton kernels, without S^2 memory.

KL(p || softmax(I)) per query row t, over the causal keys s (``reference.dense_indexer_kl``):
p = the main attention's probabilities summed over heads and divided by H (each head's rows
sum to 1), I[t, s] = sum_j w[t, j] ReLU(q_idx[t, j] . k_idx[s]).

    KL[t] = sum_s p log p - sum_s p I + logsumexp_s I

Forward, two kernels: (1) one program per (query block, head) streams the keys for the main
attention's log-sum-exp of that head; (2) one program per query block streams the keys again,
recomputes every head's probabilities from (1), sums them into p, computes I for the same
block and accumulates sum p log p, sum p I and I's online log-sum-exp. Backward,
dI = g (softmax(I) - p): one program per query block streams the keys for dq_idx and dw_idx
(rows it owns, no atomics), one per key block streams the queries for dk_idx. The top-k recall
(a diagnostic, no gradient) uses the indexer top-k kernel and gathers p at the selected keys.

Status: equal to the reference on fresh random inputs (tests/test_kernels.py, Triton's
interpreter in CI, and on the H200). Measured in the small MoE's warm-up step on the H200 it is
no faster than the blockwise PyTorch op in ``indexer_kl.DenseIndexerKL`` (1291 vs 1272 ms per
16K sequence, benchmarks/results/model_step_small_16384_dense_kl.md), so ``FUSED`` stays off.
``MDSA_DENSE_KL=fused|blockwise`` picks one for a process and the processes it starts.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import reference as R
from ._common import HAS_TRITON, _dot, _dot_ds, _span, interpreting, is_fp32, next_pow2, triton, tl

DENSE_KL_CHOICES = ("blockwise", "fused")


def _fused_from_env(default: str = "blockwise") -> bool:
    """``MDSA_DENSE_KL`` (blockwise | fused), so a launcher can choose for the trainer's phases."""
    choice = os.environ.get("MDSA_DENSE_KL", default)
    if choice not in DENSE_KL_CHOICES:
        raise ValueError(f"MDSA_DENSE_KL must be one of {list(DENSE_KL_CHOICES)}, got {choice!r}")
    return choice == "fused"


# Take the fused kernels for the KL objective (see the module docstring).
FUSED = _fused_from_env()
LOG2E = 1.4426950408889634
RECALL_CHUNK_ELEMENTS = 1 << 24


if HAS_TRITON:

    @triton.jit
    def _main_block_scores(qb, rmask, kvp, cmask, d1, d1m, d2, d2m,
                           DV: tl.constexpr, DR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """One head's q [BM, D] (at row pointers qb) times the KV rows at kvp [BN] -> [BM, BN]."""
        q1 = tl.load(qb[:, None] + d1[None, :], mask=rmask[:, None] & d1m[None, :], other=0.0)
        kv1 = tl.load(kvp[:, None] + d1[None, :], mask=cmask[:, None] & d1m[None, :], other=0.0)
        s = _dot(q1, tl.trans(kv1), IEEE, UPCAST)
        if DR > 0:
            q2 = tl.load(qb[:, None] + DV + d2[None, :], mask=rmask[:, None] & d2m[None, :], other=0.0)
            kv2 = tl.load(kvp[:, None] + DV + d2[None, :], mask=cmask[:, None] & d2m[None, :], other=0.0)
            s += _dot(q2, tl.trans(kv2), IEEE, UPCAST)
        return s

    @triton.jit
    def _target_block(QM, b, rows, rmask, kvp, cmask, elig, LSE, s_qmb, s_qms, s_qmh, s_lb, s_ls,
                      scale_log2, d1, d1m, d2, d2m,
                      H: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
        """p [BM, BN]: the heads' probabilities (from their log2-sum-exp) summed and divided by H."""
        p = tl.zeros((BM, BN), dtype=tl.float32)
        for h in range(H):
            qb = QM + b * s_qmb + rows * s_qms + h * s_qmh
            s = _main_block_scores(qb, rmask, kvp, cmask, d1, d1m, d2, d2m, DV, DR, IEEE, UPCAST) * scale_log2
            lse = tl.load(LSE + b * s_lb + rows * s_ls + h, mask=rmask, other=0.0)
            p += tl.where(elig, tl.exp2(s - lse[:, None]), 0.0)
        return p / H

    @triton.jit
    def _index_head(QI, WI, b, rows, rmask, j, k_t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih, di, dim,
                    IEEE_I: tl.constexpr, UPCAST: tl.constexpr):
        """Indexer head j of the query rows: (q_j [BM, DIP], w_j [BM] fp32, q_j . k [BM, BN])."""
        q_j = tl.load(QI + b * s_qib + rows[:, None] * s_qis + j * s_qih + di[None, :],
                      mask=rmask[:, None] & dim[None, :], other=0.0)
        w_j = tl.load(WI + b * s_wib + rows * s_wis + j * s_wih, mask=rmask, other=0.0).to(tl.float32)
        return q_j, w_j, _dot(q_j, k_t, IEEE_I, UPCAST)

    @triton.jit
    def _index_block(QI, WI, b, rows, rmask, k_t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih, di, dim,
                     HI: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """I [BM, BN] = sum_j w_j ReLU(q_j . k)."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for j in range(HI):
            _, w_j, s_j = _index_head(QI, WI, b, rows, rmask, j, k_t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih,
                                      di, dim, IEEE_I, UPCAST)
            acc += w_j[:, None] * tl.maximum(s_j, 0.0)
        return acc

    @triton.jit
    def _query_block(QPOS, KLIM, pid_m, Sq, BM: tl.constexpr):
        """Query block ``pid_m``: (rows, row mask, positions, end of its causal key range)."""
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < Sq
        return rows, rmask, tl.load(QPOS + rows, mask=rmask, other=-1), tl.load(KLIM + pid_m)

    @triton.jit
    def _key_block(KI, KPOS, b, start, qp, rmask, Sk, s_kib, s_kis, di, dim, BN: tl.constexpr):
        """Key block at ``start``: (cols, cmask, eligible [BM, BN], indexer keys [BN, DIP])."""
        cols = start + tl.arange(0, BN)
        cmask = cols < Sk
        kp = tl.load(KPOS + cols, mask=cmask, other=0)
        elig = (kp[None, :] <= qp[:, None]) & cmask[None, :] & rmask[:, None]
        k_tile = tl.load(KI + b * s_kib + cols[:, None] * s_kis + di[None, :],
                         mask=cmask[:, None] & dim[None, :], other=0.0)
        return cols, cmask, elig, k_tile

    @triton.jit
    def _dlogits_block(QM, QI, WI, b, rows, rmask, kvp, cmask, elig, k_t, LSE, lse_i, g,
                       s_qmb, s_qms, s_qmh, s_lb, s_ls, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih,
                       scale_log2, d1, d1m, d2, d2m, di, dim,
                       H: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, HI: tl.constexpr,
                       IEEE: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr):
        """dKL/dI [BM, BN] = g (softmax(I) - p) on the eligible pairs, 0 elsewhere."""
        logits = _index_block(QI, WI, b, rows, rmask, k_t, s_qib, s_qis, s_qih,
                              s_wib, s_wis, s_wih, di, dim, HI, IEEE_I, UPCAST, BM, BN)
        p = _target_block(QM, b, rows, rmask, kvp, cmask, elig, LSE,
                          s_qmb, s_qms, s_qmh, s_lb, s_ls, scale_log2, d1, d1m, d2, d2m,
                          H, DV, DR, IEEE, UPCAST, BM, BN)
        sm = tl.exp2((logits - lse_i[:, None]) * 1.4426950408889634)
        return tl.where(elig, g[:, None] * (sm - p), 0.0)

    @triton.jit
    def _main_lse_kernel(
        QM, KV, QPOS, KPOS, KLIM, LSE,
        Sq, Sk, scale_log2,
        s_qmb, s_qms, s_qmh, s_kvb, s_kvs, s_lb, s_ls,
        H: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows, rmask, qp, lim = _query_block(QPOS, KLIM, pid_m, Sq, BM)
        d1, d1m = _span(DV, D1)
        d2, d2m = _span(DR, D2)
        qb = QM + b * s_qmb + rows * s_qms + h * s_qmh
        m = tl.full((BM,), float("-inf"), tl.float32)
        l = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, lim, BN):
            cols = start + tl.arange(0, BN)
            cmask = cols < Sk
            kp = tl.load(KPOS + cols, mask=cmask, other=0)
            elig = (kp[None, :] <= qp[:, None]) & cmask[None, :] & rmask[:, None]
            s = _main_block_scores(qb, rmask, KV + b * s_kvb + cols * s_kvs, cmask, d1, d1m, d2, d2m,
                                   DV, DR, IEEE, UPCAST) * scale_log2
            s = tl.where(elig, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m = m_new
        lse = tl.where(l > 0, m + tl.log2(l), float("-inf"))
        tl.store(LSE + b * s_lb + rows * s_ls + h, lse, mask=rmask)

    @triton.jit
    def _dense_kl_fwd_kernel(
        QM, KV, QI, KI, WI, QPOS, KPOS, KLIM, LSE, KL, LSEI,
        Sq, Sk, scale_log2,
        s_qmb, s_qms, s_qmh, s_kvb, s_kvs, s_lb, s_ls,
        s_qib, s_qis, s_qih, s_kib, s_kis, s_wib, s_wis, s_wih, s_ob, s_os,
        H: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        rows, rmask, qp, lim = _query_block(QPOS, KLIM, pid_m, Sq, BM)
        d1, d1m = _span(DV, D1)
        d2, d2m = _span(DR, D2)
        di, dim = _span(DI, DIP)
        m_i = tl.full((BM,), float("-inf"), tl.float32)  # I's online log2-sum-exp
        l_i = tl.zeros((BM,), dtype=tl.float32)
        plogp = tl.zeros((BM,), dtype=tl.float32)
        p_i = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, lim, BN):
            cols, cmask, elig, k_tile = _key_block(KI, KPOS, b, start, qp, rmask, Sk, s_kib, s_kis, di, dim, BN)
            logits = _index_block(QI, WI, b, rows, rmask, tl.trans(k_tile), s_qib, s_qis, s_qih,
                                  s_wib, s_wis, s_wih, di, dim, HI, IEEE_I, UPCAST, BM, BN)
            i2 = tl.where(elig, logits * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(i2, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(i2 - m_safe[:, None]), axis=1)
            m_i = m_new
            p = _target_block(QM, b, rows, rmask, KV + b * s_kvb + cols * s_kvs, cmask, elig, LSE,
                              s_qmb, s_qms, s_qmh, s_lb, s_ls, scale_log2, d1, d1m, d2, d2m,
                              H, DV, DR, IEEE, UPCAST, BM, BN)
            plogp += tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), axis=1)
            p_i += tl.sum(tl.where(elig, p * logits, 0.0), axis=1)
        has = l_i > 0
        lse_i = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, 0.0)
        kl = tl.where(has, plogp - p_i + lse_i, 0.0)
        tl.store(KL + b * s_ob + rows * s_os, kl, mask=rmask)
        tl.store(LSEI + b * s_ob + rows * s_os, lse_i, mask=rmask)

    @triton.jit
    def _dense_kl_bwd_q_kernel(
        QM, KV, QI, KI, WI, QPOS, KPOS, KLIM, LSE, LSEI, G, DQ, DW,
        Sq, Sk, scale_log2,
        s_qmb, s_qms, s_qmh, s_kvb, s_kvs, s_lb, s_ls,
        s_qib, s_qis, s_qih, s_kib, s_kis, s_wib, s_wis, s_wih, s_ob, s_os,
        s_dqb, s_dqs, s_dqh, s_dwb, s_dws, s_dwh,
        H: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        rows, rmask, qp, lim = _query_block(QPOS, KLIM, pid_m, Sq, BM)
        d1, d1m = _span(DV, D1)
        d2, d2m = _span(DR, D2)
        di, dim = _span(DI, DIP)
        lse_i = tl.load(LSEI + b * s_ob + rows * s_os, mask=rmask, other=0.0)
        g = tl.load(G + b * s_ob + rows * s_os, mask=rmask, other=0.0)
        for start in range(0, lim, BN):
            cols, cmask, elig, k_tile = _key_block(KI, KPOS, b, start, qp, rmask, Sk, s_kib, s_kis, di, dim, BN)
            k_t = tl.trans(k_tile)
            d_i = _dlogits_block(QM, QI, WI, b, rows, rmask, KV + b * s_kvb + cols * s_kvs, cmask, elig, k_t,
                                 LSE, lse_i, g, s_qmb, s_qms, s_qmh, s_lb, s_ls, s_qib, s_qis, s_qih,
                                 s_wib, s_wis, s_wih, scale_log2, d1, d1m, d2, d2m, di, dim,
                                 H, DV, DR, HI, IEEE, IEEE_I, UPCAST, BM, BN)
            for j in range(HI):
                _, w_j, s_j = _index_head(QI, WI, b, rows, rmask, j, k_t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih,
                                          di, dim, IEEE_I, UPCAST)
                dw_p = DW + b * s_dwb + rows * s_dws + j * s_dwh
                tl.store(dw_p, tl.load(dw_p, mask=rmask, other=0.0)
                         + tl.sum(d_i * tl.maximum(s_j, 0.0), axis=1), mask=rmask)
                ds = tl.where(s_j > 0, d_i * w_j[:, None], 0.0)
                dq_p = DQ + b * s_dqb + rows[:, None] * s_dqs + j * s_dqh + di[None, :]
                qmask = rmask[:, None] & dim[None, :]
                tl.store(dq_p, tl.load(dq_p, mask=qmask, other=0.0)
                         + _dot_ds(ds, k_tile, IEEE_I, UPCAST, False), mask=qmask)

    @triton.jit
    def _dense_kl_bwd_k_kernel(
        QM, KV, QI, KI, WI, QPOS, KPOS, QSTART, LSE, LSEI, G, DK,
        Sq, Sk, scale_log2,
        s_qmb, s_qms, s_qmh, s_kvb, s_kvs, s_lb, s_ls,
        s_qib, s_qis, s_qih, s_kib, s_kis, s_wib, s_wis, s_wih, s_ob, s_os,
        s_dkb, s_dks,
        H: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < Sk
        d1, d1m = _span(DV, D1)
        d2, d2m = _span(DR, D2)
        di, dim = _span(DI, DIP)
        kp = tl.load(KPOS + cols, mask=cmask, other=0)
        k_tile = tl.load(KI + b * s_kib + cols[:, None] * s_kis + di[None, :],
                         mask=cmask[:, None] & dim[None, :], other=0.0)
        k_t = tl.trans(k_tile)
        kvp = KV + b * s_kvb + cols * s_kvs
        dk = tl.zeros((BN, DIP), dtype=tl.float32)
        first = tl.load(QSTART + pid_n)
        for m0 in range(first * BM, Sq, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < Sq
            qp = tl.load(QPOS + rows, mask=rmask, other=-1)
            elig = (kp[None, :] <= qp[:, None]) & cmask[None, :] & rmask[:, None]
            lse_i = tl.load(LSEI + b * s_ob + rows * s_os, mask=rmask, other=0.0)
            g = tl.load(G + b * s_ob + rows * s_os, mask=rmask, other=0.0)
            d_i = _dlogits_block(QM, QI, WI, b, rows, rmask, kvp, cmask, elig, k_t,
                                 LSE, lse_i, g, s_qmb, s_qms, s_qmh, s_lb, s_ls, s_qib, s_qis, s_qih,
                                 s_wib, s_wis, s_wih, scale_log2, d1, d1m, d2, d2m, di, dim,
                                 H, DV, DR, HI, IEEE, IEEE_I, UPCAST, BM, BN)
            for j in range(HI):
                q_j, w_j, s_j = _index_head(QI, WI, b, rows, rmask, j, k_t, s_qib, s_qis, s_qih, s_wib, s_wis,
                                            s_wih, di, dim, IEEE_I, UPCAST)
                ds = tl.where(s_j > 0, d_i * w_j[:, None], 0.0)
                dk += _dot_ds(tl.trans(ds), q_j, IEEE_I, UPCAST, False)
        tl.store(DK + b * s_dkb + cols[:, None] * s_dks + di[None, :], dk, mask=cmask[:, None] & dim[None, :])


def _blocks(on_gpu: bool) -> tuple[int, int, int]:
    """(BM, BN, num_warps). Not tuned: the kernels have not run on a GPU yet."""
    return (64, 64, 4) if on_gpu else (16, 16, 1)


def _key_limits(q_pos: torch.Tensor, k_pos: torch.Tensor, BM: int) -> torch.Tensor:
    """Per query block, how many leading keys can be eligible (all of them unless k_pos is
    ascending, then the keys up to the block's largest query position)."""
    Sq, Sk = q_pos.numel(), k_pos.numel()
    nqb = triton.cdiv(Sq, BM)
    if Sk > 1 and not bool((k_pos[1:] >= k_pos[:-1]).all()):
        return torch.full((nqb,), Sk, dtype=torch.int32, device=q_pos.device)
    pad = torch.full((nqb * BM - Sq,), torch.iinfo(torch.int64).min, dtype=q_pos.dtype, device=q_pos.device)
    qmax = torch.cat([q_pos, pad]).view(nqb, BM).amax(dim=1)
    return torch.searchsorted(k_pos.contiguous(), qmax, right=True).to(torch.int32)


def _query_starts(q_pos: torch.Tensor, k_pos: torch.Tensor, BM: int, BN: int) -> torch.Tensor:
    """Per key block, the first query block that can see any of its keys (0 unless q_pos is
    ascending)."""
    Sq, Sk = q_pos.numel(), k_pos.numel()
    nkb = triton.cdiv(Sk, BN)
    if Sq > 1 and not bool((q_pos[1:] >= q_pos[:-1]).all()):
        return torch.zeros((nkb,), dtype=torch.int32, device=q_pos.device)
    pad = torch.full((nkb * BN - Sk,), torch.iinfo(torch.int64).max, dtype=k_pos.dtype, device=k_pos.device)
    kmin = torch.cat([k_pos, pad]).view(nkb, BN).amin(dim=1)
    first_row = torch.searchsorted(q_pos.contiguous(), kmin, right=False)
    return (first_row // BM).to(torch.int32)


def _split(D: int) -> tuple[int, int, int, int]:
    """D = DV (its largest power of two) + DR (the rest: 576 = 512 + 64, 160 = 128 + 32)."""
    DV = 1 << (D.bit_length() - 1)
    DR = D - DV
    return DV, next_pow2(DV, 16), DR, (next_pow2(DR, 16) if DR > 0 else 16)


@torch.no_grad()
def _recall(qm, kv, lse2, idx, scale) -> torch.Tensor:
    """Share of p inside the selected keys idx [B, Sq, K] (-1 = unused), query chunk by chunk."""
    B, Sq, H, D = qm.shape
    K = idx.shape[-1]
    out = torch.empty(B, Sq, dtype=torch.float32, device=qm.device)
    step = max(1, RECALL_CHUNK_ELEMENTS // max(1, B * K * max(D, H)))
    for t0 in range(0, Sq, step):
        t1 = min(Sq, t0 + step)
        sel = R.gather_tokens(kv, idx[:, t0:t1]).float()  # [B, c, K, D]
        s = torch.einsum("bthd,btkd->bthk", qm[:, t0:t1].float(), sel) * (scale * LOG2E)
        p = torch.exp2(s - lse2[:, t0:t1, :, None]).mean(dim=2)  # [B, c, K]
        out[:, t0:t1] = (p * (idx[:, t0:t1] >= 0)).sum(-1)
    return out


def _strides(qm, kvc, lse2, qi, ki, wi, kl):
    return (qm.stride(0), qm.stride(1), qm.stride(2), kvc.stride(0), kvc.stride(1), lse2.stride(0), lse2.stride(1),
            qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1),
            wi.stride(0), wi.stride(1), wi.stride(2), kl.stride(0), kl.stride(1))


class FusedDenseIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_main, kv, q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos):
        from .indexer import indexer_topk

        B, Sq, H, D = q_main.shape
        Sk = kv.shape[1]
        HI, DI = q_idx.shape[2], q_idx.shape[3]
        qm, kvc = q_main.detach().contiguous(), kv.detach().contiguous()
        qi, ki, wi = q_idx.detach().contiguous(), k_idx.detach().contiguous(), w_idx.detach().contiguous()
        q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
        dev = q_main.device
        BM, BN, nw = _blocks(q_main.is_cuda)
        DV, D1, DR, D2 = _split(D)
        kl = torch.zeros(B, Sq, dtype=torch.float32, device=dev)
        lse_i = torch.zeros(B, Sq, dtype=torch.float32, device=dev)
        lse2 = torch.empty(B, Sq, H, dtype=torch.float32, device=dev)  # log2 units of scale * q.kv
        klim = _key_limits(q_pos, k_pos, BM)
        consts = dict(DV=DV, D1=D1, DR=DR, D2=D2, BM=BM, BN=BN, IEEE=is_fp32(qm, kvc), UPCAST=interpreting())
        if Sq and Sk:
            nqb = triton.cdiv(Sq, BM)
            _main_lse_kernel[(nqb, B * H)](
                qm, kvc, q_pos, k_pos, klim, lse2, Sq, Sk, scale * LOG2E,
                qm.stride(0), qm.stride(1), qm.stride(2), kvc.stride(0), kvc.stride(1), lse2.stride(0), lse2.stride(1),
                H=H, num_warps=nw, **consts,
            )
            _dense_kl_fwd_kernel[(nqb, B)](
                qm, kvc, qi, ki, wi, q_pos, k_pos, klim, lse2, kl, lse_i, Sq, Sk, scale * LOG2E,
                *_strides(qm, kvc, lse2, qi, ki, wi, kl),
                H=H, HI=HI, DI=DI, DIP=next_pow2(DI, 16), IEEE_I=is_fp32(qi, ki), num_warps=nw, **consts,
            )
            idx = indexer_topk(qi, ki, wi, topk, q_pos=q_pos, k_pos=k_pos)
            recall = _recall(qm, kvc, lse2, idx, scale)
        else:
            recall = torch.zeros_like(kl)
        ctx.save_for_backward(qm, kvc, qi, ki, wi, q_pos, k_pos, lse2, lse_i, klim)
        ctx.scale = scale
        ctx.mark_non_differentiable(recall)
        return kl, recall

    @staticmethod
    def backward(ctx, gkl, grecall):
        qm, kvc, qi, ki, wi, q_pos, k_pos, lse2, lse_i, klim = ctx.saved_tensors
        B, Sq, H, D = qm.shape
        Sk = kvc.shape[1]
        HI, DI = qi.shape[2], qi.shape[3]
        dev = qm.device
        dq = torch.zeros(B, Sq, HI, DI, dtype=torch.float32, device=dev)
        dw = torch.zeros(B, Sq, HI, dtype=torch.float32, device=dev)
        dk = torch.zeros(B, Sk, DI, dtype=torch.float32, device=dev)
        if gkl is not None and Sq and Sk:
            g = gkl.float().contiguous()
            BM, BN, nw = _blocks(qm.is_cuda)
            DV, D1, DR, D2 = _split(D)
            consts = dict(H=H, DV=DV, D1=D1, DR=DR, D2=D2, HI=HI, DI=DI, DIP=next_pow2(DI, 16), BM=BM, BN=BN,
                          IEEE=is_fp32(qm, kvc), IEEE_I=is_fp32(qi, ki), UPCAST=interpreting(), num_warps=nw)
            strides = _strides(qm, kvc, lse2, qi, ki, wi, g)
            assert lse_i.stride() == g.stride()
            _dense_kl_bwd_q_kernel[(triton.cdiv(Sq, BM), B)](
                qm, kvc, qi, ki, wi, q_pos, k_pos, klim, lse2, lse_i, g, dq, dw, Sq, Sk, ctx.scale * LOG2E,
                *strides, dq.stride(0), dq.stride(1), dq.stride(2), dw.stride(0), dw.stride(1), dw.stride(2),
                **consts,
            )
            _dense_kl_bwd_k_kernel[(triton.cdiv(Sk, BN), B)](
                qm, kvc, qi, ki, wi, q_pos, k_pos, _query_starts(q_pos, k_pos, BM, BN), lse2, lse_i, g, dk,
                Sq, Sk, ctx.scale * LOG2E, *strides, dk.stride(0), dk.stride(1), **consts,
            )
        return None, None, dq.to(qi.dtype), dk.to(ki.dtype), dw.to(wi.dtype), None, None, None, None


def fused_dense_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, scale: float, topk: int,
                           q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None):
    """Same contract as ``reference.dense_indexer_kl`` (objective "kl"): (kl [B, Sq], recall)."""
    Sq, Sk = q_main.shape[1], kv.shape[1]
    q_pos = R._positions(q_pos, Sq, q_main.device)
    k_pos = R._positions(k_pos, Sk, q_main.device)
    return FusedDenseIndexerKL.apply(q_main.detach(), kv.detach(), q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos)
