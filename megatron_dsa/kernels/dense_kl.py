"""The warm-up's dense indexer KL as fused Triton kernels, without S^2 memory.

KL(p || softmax(I)) per query row t, over the causal keys s (``reference.dense_indexer_kl``):
p = the main attention's probabilities summed over heads and divided by H (each head's rows
sum to 1), I[t, s] = sum_j w[t, j] ReLU(q_idx[t, j] . k_idx[s]). The main keys are MLA's latent
[B, Sk, D] that every head reads (a head stride of 0) or each head's own [B, Sk, H, D] (the MHA
form, 192 dims a head against the latent's 576 at DeepSeek-V3.2's shape).

    KL[t] = sum_s p log p - sum_s p I + logsumexp_s I

Forward, two kernels: (1) one program per (query block, head) streams the keys for the main
attention's log-sum-exp of that head; (2) one program per (query block, span of keys) streams its
span again, recomputes every head's probabilities from (1), sums them into p, computes I for the
same tiles and accumulates sum p log p, sum p I and I's online log-sum-exp; the spans' partial
sums are combined afterwards (the log-sum-exps by their maximum). Splitting the keys into spans
gives the GPU enough programs at every length. The indexer heads of a query block are folded into
the rows of one dot (row = query x head; k_idx is shared by the heads), so all heads score a key
tile in one tensor-core dot.

Backward, one kernel, one program per (query block, span): dI = g (softmax(I) - p) is built once
per tile and feeds dq_idx, dw_idx (accumulated over the span, then added atomically) and dk_idx
(added atomically per tile). With more heads than one dot holds (HG heads per group, NG groups)
the groups are scored again and their dq/dw are added per tile. The top-k recall (a diagnostic,
no gradient) uses the indexer top-k kernel on the sampled rows and gathers p at the selected keys.

Status: equal to the reference on fresh random inputs (tests/test_kernels.py, Triton's
interpreter in CI, and on the H200). In the small MoE's warm-up step on the H200 it is 4.8x
faster than the blockwise PyTorch op in ``indexer_kl.DenseIndexerKL`` (246 vs 1182 ms per 16K
sequence, benchmarks/results/model_step_small_16384_dense_kl.md), so it is the default
(``KernelOptions.dense_kl``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as R
from ..kernel_options import DEFAULT_OPTIONS, KernelOptions
from ._common import (HAS_TRITON, LOG2E, _dot, _dot_ds, _span, interpreting, is_fp32, next_pow2, rows_within,
                      split_pow2, triton, tl)


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
    def _target_block(QM, b, rows, rmask, kvp, s_kvh, cmask, elig, LSE, s_qmb, s_qms, s_qmh, s_lb, s_ls,
                      scale_log2, d1, d1m, d2, d2m,
                      H: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
        """p [BM, BN]: the heads' probabilities (from their log2-sum-exp) summed and divided by H.
        Head h reads the key rows at kvp + h * s_kvh (s_kvh 0: the latent every head shares)."""
        p = tl.zeros((BM, BN), dtype=tl.float32)
        for h in range(H):
            qb = QM + b * s_qmb + rows * s_qms + h * s_qmh
            s = _main_block_scores(qb, rmask, kvp + h * s_kvh, cmask, d1, d1m, d2, d2m, DV, DR, IEEE,
                                   UPCAST) * scale_log2
            lse = tl.load(LSE + b * s_lb + rows * s_ls + h, mask=rmask, other=0.0)
            p += tl.where(elig, tl.exp2(s - lse[:, None]), 0.0)
        return p / H

    @triton.jit
    def _folded_queries(QI, WI, b, pid_m, Sq, grp, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih, di, dim,
                        HI: tl.constexpr, HG: tl.constexpr, BM: tl.constexpr):
        """Indexer heads grp*HG .. grp*HG+HG-1 of query block ``pid_m`` folded into rows r = t*HG + j,
        so one dot scores them all against a key block: (q [BM*HG, DIP], w [BM*HG] fp32, row
        offsets t, head numbers j, row mask)."""
        r = tl.arange(0, BM * HG)
        t = (pid_m * BM + r // HG).to(tl.int64)
        j = grp * HG + r % HG
        rm = (t < Sq) & (j < HI)
        q = tl.load(QI + b * s_qib + t[:, None] * s_qis + j[:, None] * s_qih + di[None, :],
                    mask=rm[:, None] & dim[None, :], other=0.0)
        w = tl.load(WI + b * s_wib + t * s_wis + j * s_wih, mask=rm, other=0.0).to(tl.float32)
        return q, w, t, j, rm

    @triton.jit
    def _fold_sum(x, BM: tl.constexpr, HG: tl.constexpr, BN: tl.constexpr):
        """[BM*HG, BN] folded rows -> [BM, BN], summed over each query's HG heads."""
        return tl.sum(tl.reshape(x, (BM, HG, BN)), axis=1)

    @triton.jit
    def _unfold(x, BM: tl.constexpr, HG: tl.constexpr, BN: tl.constexpr):
        """[BM, BN] -> [BM*HG, BN]: each query's row repeated for its HG folded heads."""
        return tl.reshape(tl.broadcast_to(x[:, None, :], (BM, HG, BN)), (BM * HG, BN))

    @triton.jit
    def _index_logits(QI, WI, b, pid_m, Sq, k_t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih, di, dim,
                      HI: tl.constexpr, HG: tl.constexpr, NG: tl.constexpr, IEEE_I: tl.constexpr,
                      UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """I [BM, BN] = sum_j w_j ReLU(q_j . k), one dot per group of HG heads."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for grp in range(NG):  # a loop, not unrolled: one group's tiles in shared memory at a time
            q, w, _t, _j, _rm = _folded_queries(QI, WI, b, pid_m, Sq, grp, s_qib, s_qis, s_qih,
                                                s_wib, s_wis, s_wih, di, dim, HI, HG, BM)
            acc += _fold_sum(tl.maximum(_dot(q, k_t, IEEE_I, UPCAST), 0.0) * w[:, None], BM, HG, BN)
        return acc

    @triton.jit
    def _query_block(QPOS, QDOC, KLIM, pid_m, Sq, BM: tl.constexpr, HAS_DOC: tl.constexpr):
        """Query block ``pid_m``: (rows, row mask, positions, end of its causal key range,
        document ids: zeros for an unpacked sequence)."""
        # int64: a row's offset in q [B, S, H, D] passes 2^31 elements (128 heads x 576 at 32K),
        # as does a key row's in each head's keys [B, S, H, D] (the key rows' int64 casts).
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < Sq
        if HAS_DOC:
            qd = tl.load(QDOC + rows, mask=rmask, other=-1)
        else:
            qd = tl.zeros((BM,), dtype=tl.int64)
        return rows, rmask, tl.load(QPOS + rows, mask=rmask, other=-1), tl.load(KLIM + pid_m), qd

    @triton.jit
    def _eligible(KPOS, KDOC, cols, cmask, qp, qd, rmask, HAS_DOC: tl.constexpr):
        """[BM, BN]: key before or at the query and (packed sequences) in its document."""
        kp = tl.load(KPOS + cols, mask=cmask, other=0)
        elig = (kp[None, :] <= qp[:, None]) & cmask[None, :] & rmask[:, None]
        if HAS_DOC:
            kd = tl.load(KDOC + cols, mask=cmask, other=-2)
            elig = elig & (kd[None, :] == qd[:, None])
        return elig

    @triton.jit
    def _span_program(QPOS, QDOC, KLIM, Sq, BM: tl.constexpr, SPAN: tl.constexpr, HAS_DOC: tl.constexpr):
        """This (query block, key span, batch) program: (batch, query block, rows, row mask,
        positions, first key, end of its keys: the span cut at the block's causal range,
        document ids)."""
        pid_m = tl.program_id(0)
        sp = tl.program_id(1)
        rows, rmask, qp, lim, qd = _query_block(QPOS, QDOC, KLIM, pid_m, Sq, BM, HAS_DOC)
        return tl.program_id(2).to(tl.int64), pid_m, rows, rmask, qp, sp * SPAN, tl.minimum(sp * SPAN + SPAN, lim), qd

    @triton.jit
    def _key_block(KI, KPOS, KDOC, b, start, qp, qd, rmask, Sk, s_kib, s_kis, di, dim, BN: tl.constexpr,
                   HAS_DOC: tl.constexpr):
        """Key block at ``start``: (cols, cmask, eligible [BM, BN], indexer keys [BN, DIP])."""
        cols = start + tl.arange(0, BN)
        cmask = cols < Sk
        elig = _eligible(KPOS, KDOC, cols, cmask, qp, qd, rmask, HAS_DOC)
        k_tile = tl.load(KI + b * s_kib + cols[:, None] * s_kis + di[None, :],
                         mask=cmask[:, None] & dim[None, :], other=0.0)
        return cols, cmask, elig, k_tile

    @triton.jit
    def _main_lse_kernel(
        QM, KV, QPOS, KPOS, QDOC, KDOC, KLIM, LSE,
        Sq, Sk, scale_log2,
        s_qmb, s_qms, s_qmh, s_kvb, s_kvs, s_kvh, s_lb, s_ls,
        H: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        rows, rmask, qp, lim, qd = _query_block(QPOS, QDOC, KLIM, pid_m, Sq, BM, HAS_DOC)
        d1, d1m = _span(DV, D1)
        d2, d2m = _span(DR, D2)
        qb = QM + b * s_qmb + rows * s_qms + h * s_qmh
        m = tl.full((BM,), float("-inf"), tl.float32)
        l = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, lim, BN):
            cols = start + tl.arange(0, BN)
            cmask = cols < Sk
            elig = _eligible(KPOS, KDOC, cols, cmask, qp, qd, rmask, HAS_DOC)
            kvp = KV + b * s_kvb + h * s_kvh + cols.to(tl.int64) * s_kvs
            s = _main_block_scores(qb, rmask, kvp, cmask, d1, d1m, d2, d2m,
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
        QM, KV, QI, KI, WI, QPOS, KPOS, QDOC, KDOC, KLIM, LSE, PART,
        Sq, Sk, scale_log2,
        s_qmb, s_qms, s_qmh, s_kvb, s_kvs, s_kvh, s_lb, s_ls,
        s_qib, s_qis, s_qih, s_kib, s_kis, s_wib, s_wis, s_wih,
        s_pc, s_pb, s_ps,
        H: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        HI: tl.constexpr, HG: tl.constexpr, NG: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, SPAN: tl.constexpr,
        IEEE: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr,
    ):
        # One program per (query block, span of SPAN keys, batch): the span's share of I's
        # log2-sum-exp (max, sum), of sum p log p and of sum p I, into PART [4, B, NS, Sq].
        b, pid_m, rows, rmask, qp, lo, hi, qd = _span_program(QPOS, QDOC, KLIM, Sq, BM, SPAN, HAS_DOC)
        d1, d1m = _span(DV, D1)
        d2, d2m = _span(DR, D2)
        di, dim = _span(DI, DIP)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        plogp = tl.zeros((BM,), dtype=tl.float32)
        p_i = tl.zeros((BM,), dtype=tl.float32)
        for start in range(lo, hi, BN):
            cols, cmask, elig, k_tile = _key_block(KI, KPOS, KDOC, b, start, qp, qd, rmask, Sk, s_kib, s_kis, di, dim,
                                                   BN, HAS_DOC)
            logits = _index_logits(QI, WI, b, pid_m, Sq, tl.trans(k_tile), s_qib, s_qis, s_qih, s_wib, s_wis, s_wih,
                                   di, dim, HI, HG, NG, IEEE_I, UPCAST, BM, BN)
            i2 = tl.where(elig, logits * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(i2, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(i2 - m_safe[:, None]), axis=1)
            m_i = m_new
            kvp = KV + b * s_kvb + cols.to(tl.int64) * s_kvs
            p = _target_block(QM, b, rows, rmask, kvp, s_kvh, cmask, elig, LSE,
                              s_qmb, s_qms, s_qmh, s_lb, s_ls, scale_log2, d1, d1m, d2, d2m,
                              H, DV, DR, IEEE, UPCAST, BM, BN)
            plogp += tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), axis=1)
            p_i += tl.sum(tl.where(elig, p * logits, 0.0), axis=1)
        base = PART + b * s_pb + tl.program_id(1) * s_ps + rows
        tl.store(base, m_i, mask=rmask)
        tl.store(base + s_pc, l_i, mask=rmask)
        tl.store(base + 2 * s_pc, plogp, mask=rmask)
        tl.store(base + 3 * s_pc, p_i, mask=rmask)

    @triton.jit
    def _dense_kl_bwd_kernel(
        QM, KV, QI, KI, WI, QPOS, KPOS, QDOC, KDOC, KLIM, LSE, LSEI, G, DQ, DW, DK,
        Sq, Sk, scale_log2,
        s_qmb, s_qms, s_qmh, s_kvb, s_kvs, s_kvh, s_lb, s_ls,
        s_qib, s_qis, s_qih, s_kib, s_kis, s_wib, s_wis, s_wih, s_ob, s_os,
        s_dqb, s_dqs, s_dqh, s_dwb, s_dws, s_dwh, s_dkb, s_dks,
        H: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr, D2: tl.constexpr,
        HI: tl.constexpr, HG: tl.constexpr, NG: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, SPAN: tl.constexpr,
        IEEE: tl.constexpr, IEEE_I: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr,
    ):
        # One program per (query block, span of keys, batch). dI = g (softmax(I) - p) is built
        # once per tile and feeds all three gradients: dk_idx per tile and (one head group)
        # dq_idx / dw_idx per span, all added atomically (fp32) since spans share rows.
        b, pid_m, rows, rmask, qp, lo, hi, qd = _span_program(QPOS, QDOC, KLIM, Sq, BM, SPAN, HAS_DOC)
        d1, d1m = _span(DV, D1)
        d2, d2m = _span(DR, D2)
        di, dim = _span(DI, DIP)
        lse_i = tl.load(LSEI + b * s_ob + rows * s_os, mask=rmask, other=0.0)
        g = tl.load(G + b * s_ob + rows * s_os, mask=rmask, other=0.0)
        dq_acc = tl.zeros((BM * HG, DIP), dtype=tl.float32)
        dw_acc = tl.zeros((BM * HG,), dtype=tl.float32)
        for start in range(lo, hi, BN):
            cols, cmask, elig, k_tile = _key_block(KI, KPOS, KDOC, b, start, qp, qd, rmask, Sk, s_kib, s_kis, di, dim,
                                                   BN, HAS_DOC)
            k_t = tl.trans(k_tile)
            kvp = KV + b * s_kvb + cols.to(tl.int64) * s_kvs
            p = _target_block(QM, b, rows, rmask, kvp, s_kvh, cmask, elig, LSE,
                              s_qmb, s_qms, s_qmh, s_lb, s_ls, scale_log2, d1, d1m, d2, d2m,
                              H, DV, DR, IEEE, UPCAST, BM, BN)
            if NG == 1:  # one group: its scores serve the logits and the gradients
                q, w, t, j, rm = _folded_queries(QI, WI, b, pid_m, Sq, 0, s_qib, s_qis, s_qih,
                                                 s_wib, s_wis, s_wih, di, dim, HI, HG, BM)
                s = _dot(q, k_t, IEEE_I, UPCAST)
                logits = _fold_sum(tl.maximum(s, 0.0) * w[:, None], BM, HG, BN)
            else:
                logits = _index_logits(QI, WI, b, pid_m, Sq, k_t, s_qib, s_qis, s_qih, s_wib, s_wis, s_wih,
                                       di, dim, HI, HG, NG, IEEE_I, UPCAST, BM, BN)
            sm = tl.exp2((logits - lse_i[:, None]) * 1.4426950408889634)
            d_rep = _unfold(tl.where(elig, g[:, None] * (sm - p), 0.0), BM, HG, BN)
            dk = tl.zeros((BN, DIP), dtype=tl.float32)
            if NG == 1:
                ds = tl.where(s > 0, d_rep * w[:, None], 0.0)
                dq_acc += _dot_ds(ds, k_tile, IEEE_I, UPCAST)
                dw_acc += tl.sum(d_rep * tl.maximum(s, 0.0), axis=1)
                dk += _dot_ds(tl.trans(ds), q, IEEE_I, UPCAST)
            else:  # many indexer heads: score each group again, add its dq/dw per tile
                for grp in range(NG):  # a loop, not unrolled: one group's tiles in shared memory at a time
                    q, w, t, j, rm = _folded_queries(QI, WI, b, pid_m, Sq, grp, s_qib, s_qis, s_qih,
                                                     s_wib, s_wis, s_wih, di, dim, HI, HG, BM)
                    s = _dot(q, k_t, IEEE_I, UPCAST)
                    ds = tl.where(s > 0, d_rep * w[:, None], 0.0)
                    tl.atomic_add(DQ + b * s_dqb + t[:, None] * s_dqs + j[:, None] * s_dqh + di[None, :],
                                    _dot_ds(ds, k_tile, IEEE_I, UPCAST), mask=rm[:, None] & dim[None, :], sem="relaxed")
                    tl.atomic_add(DW + b * s_dwb + t * s_dws + j * s_dwh,
                                    tl.sum(d_rep * tl.maximum(s, 0.0), axis=1), mask=rm, sem="relaxed")
                    dk += _dot_ds(tl.trans(ds), q, IEEE_I, UPCAST)
            tl.atomic_add(DK + b * s_dkb + cols[:, None] * s_dks + di[None, :], dk, mask=cmask[:, None] & dim[None, :], sem="relaxed")
        if NG == 1:
            if lo < hi:
                q, w, t, j, rm = _folded_queries(QI, WI, b, pid_m, Sq, 0, s_qib, s_qis, s_qih,
                                                 s_wib, s_wis, s_wih, di, dim, HI, HG, BM)
                tl.atomic_add(DQ + b * s_dqb + t[:, None] * s_dqs + j[:, None] * s_dqh + di[None, :],
                                dq_acc, mask=rm[:, None] & dim[None, :], sem="relaxed")
                tl.atomic_add(DW + b * s_dwb + t * s_dws + j * s_dwh, dw_acc, mask=rm, sem="relaxed")


# Defaults (GPU, interpreter) of the rows of one folded indexer dot (query rows x indexer heads)
# and of the key-span length of one program (``KernelOptions.dense_kl_rows`` / ``dense_kl_span``),
# and the (BM, BN, num_warps) of the per-head log-sum-exp kernel.
FOLD_ROWS = {True: 128, False: 32}
SPAN = {True: 4096, False: 32}
KEY_BLOCK = {True: 64, False: 16}
WARPS = {True: 4, False: 1}
LSE_BLOCKS = {True: (64, 64, 4), False: (16, 16, 1)}
SHARED_BYTES = 227 * 1024  # an H100 / H200 SM's shared memory for one program
# sm_90 shared memory at these blocks (tests/test_compile_sm90.py, with the runtime's alignment
# hints): the fused KL's two kernels at most 148 KB at the 671B shapes (latent 512 + 64, 128
# heads, indexer 64 x 128); the log-sum-exp kernel holds its query tile plus one KV tile per
# pipeline stage, 288 KB at three stages there, so its stages are chosen from the sizes.


def _lse_blocks(on_gpu: bool, D1: int = 0, D2: int = 0, itemsize: int = 2) -> dict:
    """(BM, BN, num_warps, num_stages) of the per-head log-sum-exp kernel: up to three pipeline
    stages of [BN, D1 + D2] KV tiles beside the [BM, D1 + D2] query tile in shared memory."""
    BM, BN, nw = LSE_BLOCKS[on_gpu]
    row = (D1 + D2) * itemsize
    stages = max(1, min(3, (SHARED_BYTES - BM * row) // max(1, BN * row))) if on_gpu else 1
    return dict(BM=BM, BN=BN, num_warps=nw, num_stages=stages)


def _kl_blocks(HI: int, on_gpu: bool, options: KernelOptions) -> dict:
    """Block sizes of the KL kernels: BM query rows per program with their indexer heads folded
    into HG * BM <= ``dense_kl_rows`` dot rows (NG groups of HG heads), BN keys per tile,
    ``dense_kl_span`` keys per program (rounded to a multiple of BN)."""
    HIP = next_pow2(HI)
    rows = options.dense_kl_rows or FOLD_ROWS[on_gpu]
    BM = min(64, max(16, rows // HIP))
    HG = max(1, min(HIP, rows // BM))
    BN = KEY_BLOCK[on_gpu]
    span = max(BN, (options.dense_kl_span or SPAN[on_gpu]) // BN * BN)
    return dict(BM=BM, HG=HG, NG=HIP // HG, BN=BN, SPAN=span, num_warps=WARPS[on_gpu])


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


@torch.no_grad()
def _recall(qm, kv, lse2, idx, scale, chunk_bytes: int) -> torch.Tensor:
    """Share of p inside the selected keys idx [B, Sq, K] (-1 = unused), query chunk by chunk
    (each chunk's fp32 gathered rows within ``chunk_bytes``); kv: the latent [B, Sk, D] or each
    head's keys [B, Sk, H, D]."""
    B, Sq, H, D = qm.shape
    K = idx.shape[-1]
    row = kv[0, 0].numel()  # D, or H * D per head keys
    out = torch.empty(B, Sq, dtype=torch.float32, device=qm.device)
    step = rows_within(chunk_bytes, B * K * max(row, H) * 4)
    for t0 in range(0, Sq, step):
        t1 = min(Sq, t0 + step)
        sel = R.gather_tokens(kv.flatten(2), idx[:, t0:t1]).float()  # [B, c, K, D or H * D]
        if kv.dim() == 3:
            s = torch.einsum("bthd,btkd->bthk", qm[:, t0:t1].float(), sel)
        else:
            s = torch.einsum("bthd,btkhd->bthk", qm[:, t0:t1].float(), sel.unflatten(-1, (H, D)))
        s = s * (scale * LOG2E)
        p = torch.exp2(s - lse2[:, t0:t1, :, None]).mean(dim=2)  # [B, c, K]
        out[:, t0:t1] = (p * (idx[:, t0:t1] >= 0)).sum(-1)
    return out


def _key_strides(kv) -> tuple[int, int, int]:
    """(batch, row, head) strides of the main keys: a head stride of 0 for the latent [B, Sk, D]
    every head reads, each head's rows for the MHA form's [B, Sk, H, D]."""
    return kv.stride(0), kv.stride(1), (kv.stride(2) if kv.dim() == 4 else 0)


def _strides(qm, kvc, lse2, qi, ki, wi):
    return (qm.stride(0), qm.stride(1), qm.stride(2), *_key_strides(kvc), lse2.stride(0), lse2.stride(1),
            qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1),
            wi.stride(0), wi.stride(1), wi.stride(2))


def _spans(klim: torch.Tensor, span: int) -> int:
    """Programs per query block along the keys: enough spans for the longest causal range."""
    return max(1, triton.cdiv(int(klim.max()), span)) if klim.numel() else 1


class FusedDenseIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_main, kv, q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos, recall_rows, q_doc, k_doc, options):
        from .indexer import indexer_topk

        B, Sq, H, D = q_main.shape
        Sk = kv.shape[1]
        HI, DI = q_idx.shape[2], q_idx.shape[3]
        qm, kvc = q_main.detach().contiguous(), kv.detach().contiguous()
        qi, ki, wi = q_idx.detach().contiguous(), k_idx.detach().contiguous(), w_idx.detach().contiguous()
        q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
        # Packed sequences: document ids (q_doc / k_doc None: one document, never read).
        has_doc = q_doc is not None
        q_doc = q_doc.contiguous() if has_doc else q_pos
        k_doc = k_doc.contiguous() if has_doc else k_pos
        documents = dict(q_doc=q_doc, k_doc=k_doc) if has_doc else {}
        dev, gpu = q_main.device, q_main.is_cuda
        DV, D1, DR, D2 = split_pow2(D)
        kl = torch.zeros(B, Sq, dtype=torch.float32, device=dev)
        lse_i = torch.zeros(B, Sq, dtype=torch.float32, device=dev)
        lse2 = torch.empty(B, Sq, H, dtype=torch.float32, device=dev)  # log2 units of scale * q.kv
        blk = _kl_blocks(HI, gpu, options)
        recall_bytes = options.workspace_bytes // 32
        klim = _key_limits(q_pos, k_pos, blk["BM"])
        mains = dict(DV=DV, D1=D1, DR=DR, D2=D2, IEEE=is_fp32(qm, kvc), UPCAST=interpreting())
        if Sq and Sk:
            lblk = _lse_blocks(gpu, D1, D2, qm.element_size())
            _main_lse_kernel[(triton.cdiv(Sq, lblk["BM"]), B * H)](
                qm, kvc, q_pos, k_pos, q_doc, k_doc, _key_limits(q_pos, k_pos, lblk["BM"]), lse2, Sq, Sk, scale * LOG2E,
                qm.stride(0), qm.stride(1), qm.stride(2), *_key_strides(kvc), lse2.stride(0), lse2.stride(1),
                H=H, HAS_DOC=has_doc, **lblk, **mains,
            )
            ns = _spans(klim, blk["SPAN"])
            part = torch.empty(4, B, ns, Sq, dtype=torch.float32, device=dev)
            _dense_kl_fwd_kernel[(triton.cdiv(Sq, blk["BM"]), ns, B)](
                qm, kvc, qi, ki, wi, q_pos, k_pos, q_doc, k_doc, klim, lse2, part, Sq, Sk, scale * LOG2E,
                *_strides(qm, kvc, lse2, qi, ki, wi), part.stride(0), part.stride(1), part.stride(2),
                H=H, HI=HI, DI=DI, DIP=next_pow2(DI, 16), IEEE_I=is_fp32(qi, ki), HAS_DOC=has_doc, **blk, **mains,
            )
            # Combine the spans: I's log-sum-exp over all of them; the p sums add up.
            m2, l2, plogp, p_i = part
            top = m2.amax(dim=1, keepdim=True)
            top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
            total = (l2 * torch.exp2(m2 - top)).sum(dim=1)
            has = total > 0
            lse_i = torch.where(has, (top.squeeze(1) + torch.log2(torch.where(has, total, 1.0))) / LOG2E, 0.0)
            kl = torch.where(has, plogp.sum(dim=1) - p_i.sum(dim=1) + lse_i, 0.0)
            if recall_rows is None:
                idx = indexer_topk(qi, ki, wi, topk, q_pos=q_pos, k_pos=k_pos, options=options, **documents)
                recall = _recall(qm, kvc, lse2, idx, scale, recall_bytes)
            else:  # the diagnostic's top-k scored for the sampled rows only
                r = recall_rows
                idx = indexer_topk(qi[:, r], ki, wi[:, r], topk, q_pos=q_pos[r], k_pos=k_pos, options=options,
                                   **({} if not has_doc else dict(q_doc=q_doc[r], k_doc=k_doc)))
                recall = _recall(qm[:, r], kvc, lse2[:, r], idx, scale, recall_bytes)
        else:
            recall = torch.zeros(B, Sq if recall_rows is None else recall_rows.numel(), device=dev)
        ctx.save_for_backward(qm, kvc, qi, ki, wi, q_pos, k_pos, q_doc, k_doc, lse2, lse_i, klim)
        ctx.scale, ctx.has_doc, ctx.options = scale, has_doc, options
        ctx.mark_non_differentiable(recall)
        return kl, recall

    @staticmethod
    def backward(ctx, gkl, grecall):
        qm, kvc, qi, ki, wi, q_pos, k_pos, q_doc, k_doc, lse2, lse_i, klim = ctx.saved_tensors
        B, Sq, H, D = qm.shape
        Sk = kvc.shape[1]
        HI, DI = qi.shape[2], qi.shape[3]
        dev = qm.device
        dq = torch.zeros(B, Sq, HI, DI, dtype=torch.float32, device=dev)
        dw = torch.zeros(B, Sq, HI, dtype=torch.float32, device=dev)
        dk = torch.zeros(B, Sk, DI, dtype=torch.float32, device=dev)
        if gkl is not None and Sq and Sk:
            # The kernel reads lse_i with g's strides: give g lse_i's layout whatever the
            # incoming gradient's (a [1, S] view of a transposed [S, 1] has strides (1, 1)).
            g = torch.empty_like(lse_i).copy_(gkl)
            DV, D1, DR, D2 = split_pow2(D)
            blk = _kl_blocks(HI, qm.is_cuda, ctx.options)
            _dense_kl_bwd_kernel[(triton.cdiv(Sq, blk["BM"]), _spans(klim, blk["SPAN"]), B)](
                qm, kvc, qi, ki, wi, q_pos, k_pos, q_doc, k_doc, klim, lse2, lse_i, g, dq, dw, dk, Sq, Sk, ctx.scale * LOG2E,
                *_strides(qm, kvc, lse2, qi, ki, wi), g.stride(0), g.stride(1),
                dq.stride(0), dq.stride(1), dq.stride(2), dw.stride(0), dw.stride(1), dw.stride(2),
                dk.stride(0), dk.stride(1),
                H=H, DV=DV, D1=D1, DR=DR, D2=D2, HI=HI, DI=DI, DIP=next_pow2(DI, 16),
                IEEE=is_fp32(qm, kvc), IEEE_I=is_fp32(qi, ki), UPCAST=interpreting(), HAS_DOC=ctx.has_doc, **blk,
            )
        return (None, None, dq.to(qi.dtype), dk.to(ki.dtype), dw.to(wi.dtype), None, None, None, None, None, None, None,
                None)


def fused_dense_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, scale: float, topk: int,
                           q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                           recall_rows: Optional[torch.Tensor] = None, q_doc: Optional[torch.Tensor] = None,
                           k_doc: Optional[torch.Tensor] = None, options: KernelOptions = DEFAULT_OPTIONS):
    """Same contract as ``reference.dense_indexer_kl`` (objective "kl"): (kl [B, Sq], recall);
    ``q_doc`` / ``k_doc``: document ids of a packed sequence."""
    Sq, Sk = q_main.shape[1], kv.shape[1]
    q_pos = R._positions(q_pos, Sq, q_main.device)
    k_pos = R._positions(k_pos, Sk, q_main.device)
    if q_doc is not None or k_doc is not None:
        q_doc = R._documents(q_doc, Sq, q_main.device).to(torch.int64)
        k_doc = R._documents(k_doc, Sk, q_main.device).to(torch.int64)
    return FusedDenseIndexerKL.apply(q_main.detach(), kv.detach(), q_idx, k_idx, w_idx, scale, topk, q_pos, k_pos,
                                     recall_rows, q_doc, k_doc, options)
