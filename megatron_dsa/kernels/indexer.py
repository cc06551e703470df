"""Lightning-indexer scoring fused with a causal top-k (bf16 / fp32 / FP8 e4m3).

Design (chosen for correctness first, then measured, see benchmarks/NOTES.md):

* ``_score_kernel``: one program per (query block BM, key block BN); loops over the HI indexer
  heads, ``acc += w[:, j] * relu(q_j @ k^T)`` on the tensor cores, masks ineligible keys with
  -inf and writes the fp32 tile into a buffer that holds ONE QUERY CHUNK x Sk (never S x S).
  Key blocks past the query block's last eligible key are skipped (causal).
* ``_select_kernel``: one program per row, exact radix select on the order-preserving uint32 key
  of the fp32 score (4 passes of 8 bits, ``tl.histogram``), then one collecting pass that keeps
  every score > threshold and the first ``want`` scores == threshold in key-index order (ties
  toward the smaller key index, as the reference's stable sort), -1 padding past the eligible
  count.  The selected indices are then sorted by score descending (stable), as the reference.

The scoring is compute bound (HI * DI * 2 = 16K FLOP per score against 4 bytes written and
read back), so writing a chunk of scores costs a few percent of the scoring time.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import HAS_TRITON, _dot, interpreting, is_fp32, next_pow2, triton, tl

FP8_MAX = 448.0
FP8_AMAX_MIN = 1e-4
# Elements of one query chunk's fp32 score buffer (B * chunk * Sk).
SCORE_CHUNK_ELEMENTS = 1 << 29  # 2 GiB of fp32
# Scoring-kernel launch configs per operand type (GPU); benchmarks/tune_dsa.py measures others.
SCORE_CFG = {
    "bf16": dict(BM=64, BN=256, num_warps=8, num_stages=3),  # 277 ms vs 317 (BN=128) at 128K
    "fp8": dict(BM=64, BN=256, num_warps=8, num_stages=3),
    "fp32": dict(BM=64, BN=64, num_warps=8, num_stages=2),
}
SELECT_CFG = dict(TILE=2048, num_warps=8)
_TIMING_SKIP_SELECT = False  # timing experiments only: score, do not select


if HAS_TRITON:

    @triton.jit
    def _score_kernel(
        Q, K, W, KS, OUT, BLIM, QPOS, KPOS,
        Sk, n_rows, q_off,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_wb, stride_ws, stride_wh,
        stride_ksb,
        stride_ob, stride_or,
        n_mblocks,
        HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
        HAS_KS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = tl.program_id(2)
        kstart = pid_n * BN
        blim = tl.load(BLIM + b * n_mblocks + pid_m)
        if kstart < blim:
            rows = pid_m * BM + tl.arange(0, BM)  # chunk-relative
            rmask = rows < n_rows
            cols = kstart + tl.arange(0, BN)
            cmask = cols < Sk
            d = tl.arange(0, DIP)
            dmask = d < DI
            k_tile = tl.load(
                K + b * stride_kb + cols[:, None] * stride_ks + d[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0,
            )
            k_t = tl.trans(k_tile)
            q_base = Q + b * stride_qb + (q_off + rows)[:, None] * stride_qs + d[None, :]
            w_base = W + b * stride_wb + (q_off + rows) * stride_ws
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for j in range(HI):
                q_j = tl.load(q_base + j * stride_qh, mask=rmask[:, None] & dmask[None, :], other=0.0)
                s = _dot(q_j, k_t, IEEE, UPCAST)
                w_j = tl.load(w_base + j * stride_wh, mask=rmask, other=0.0).to(tl.float32)
                acc += w_j[:, None] * tl.maximum(s, 0.0)
            if HAS_KS:
                ks = tl.load(KS + b * stride_ksb + cols, mask=cmask, other=0.0)
                acc = acc * ks[None, :]
            qp = tl.load(QPOS + q_off + rows, mask=rmask, other=0)
            kp = tl.load(KPOS + cols, mask=cmask, other=0)
            elig = (kp[None, :] <= qp[:, None]) & cmask[None, :]
            acc = tl.where(elig, acc, float("-inf"))
            tl.store(
                OUT + b * stride_ob + rows[:, None] * stride_or + cols[None, :],
                acc, mask=rmask[:, None] & cmask[None, :],
            )

    @triton.jit
    def _order_key(x):
        # fp32 -> int64 in [0, 2^32) whose order is the float order (-0.0 folded onto +0.0).
        x = tl.where(x == 0.0, 0.0, x)
        bits = x.to(tl.int32, bitcast=True)
        sgn = bits >> 31  # 0 or -1 (arithmetic shift)
        key = bits ^ (sgn & 0x7FFFFFFF)  # signed int32, float order
        return key.to(tl.int64) + 2147483648

    @triton.jit
    def _select_kernel(
        S, OUT, RLIM,
        stride_sb, stride_sr, stride_ob, stride_or, stride_rb, r_off,
        TOPK: tl.constexpr, TILE: tl.constexpr, OTILE: tl.constexpr,
    ):
        r = tl.program_id(0)
        b = tl.program_id(1)
        lim = tl.load(RLIM + b * stride_rb + r_off + r)
        srow = S + b * stride_sb + r * stride_sr
        orow = OUT + b * stride_ob + r * stride_or
        bins = tl.arange(0, 256)
        prefix = tl.zeros((), dtype=tl.int64)
        want = tl.zeros((), dtype=tl.int32) + TOPK
        nvalid = tl.zeros((), dtype=tl.int32)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros((256,), dtype=tl.int32)
            for start in range(0, lim, TILE):
                offs = start + tl.arange(0, TILE)
                inb = offs < lim
                x = tl.load(srow + offs, mask=inb, other=float("-inf"))
                u = _order_key(x)
                valid = inb & (x != float("-inf"))
                if p > 0:
                    valid = valid & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
                dig = tl.where(valid, (u >> shift) & 255, 0).to(tl.int32)
                h = tl.histogram(dig, 256)
                nbad = TILE - tl.sum(valid.to(tl.int32), axis=0)
                hist += h - tl.where(bins == 0, nbad, 0)
            total = tl.sum(hist, axis=0)
            if p == 0:
                nvalid = total
            ge = total - tl.cumsum(hist, axis=0) + hist  # count with digit >= bin
            bstar = tl.max(tl.where(ge >= want, bins, 0), axis=0)
            gt = tl.sum(tl.where(bins == bstar, ge - hist, 0), axis=0)
            want = want - gt
            prefix = prefix | (bstar.to(tl.int64) << shift)
        take_all = nvalid <= TOPK
        prefix = tl.where(take_all, -1, prefix)
        cnt = tl.zeros((), dtype=tl.int32)
        eq_seen = tl.zeros((), dtype=tl.int32)
        for start in range(0, lim, TILE):
            offs = start + tl.arange(0, TILE)
            inb = offs < lim
            x = tl.load(srow + offs, mask=inb, other=float("-inf"))
            u = _order_key(x)
            valid = inb & (x != float("-inf"))
            gt_m = valid & (u > prefix)
            eq_m = valid & (u == prefix)
            eq_i = eq_m.to(tl.int32)
            eq_rank = eq_seen + tl.cumsum(eq_i, axis=0) - eq_i
            take = gt_m | (eq_m & (eq_rank < want))
            take_i = take.to(tl.int32)
            pos = cnt + tl.cumsum(take_i, axis=0) - take_i
            tl.store(orow + pos, offs.to(tl.int64), mask=take & (pos < TOPK))
            cnt += tl.sum(take_i, axis=0)
            eq_seen += tl.sum(eq_i, axis=0)
        for start in range(0, TOPK, OTILE):
            offs = start + tl.arange(0, OTILE)
            tl.store(orow + offs, tl.full((OTILE,), -1, tl.int64), mask=(offs >= cnt) & (offs < TOPK))


def _positions(pos: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) if pos is None else pos.to(device)


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (last dim) e4m3 quantisation: scale = max(amax, 1e-4) / 448. Returns (x8, scale)."""
    scale = x.abs().amax(dim=-1).float().clamp_min(FP8_AMAX_MIN) / FP8_MAX
    x8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    # Chunked over dim 1 so the fp32 temporary stays small.
    step = max(1, (1 << 26) // max(1, x[:, :1].numel())) if x.dim() > 2 else x.shape[1]
    for t0 in range(0, x.shape[1], step):
        xs = x[:, t0 : t0 + step].float() / scale[:, t0 : t0 + step, ..., None]
        x8[:, t0 : t0 + step] = xs.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, scale


def _row_limits(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Per query, one past the last key index that can be eligible (Sk if k_pos is unsorted)."""
    Sk = k_pos.shape[0]
    if Sk > 1 and not bool((k_pos[1:] >= k_pos[:-1]).all()):
        return torch.full_like(q_pos, Sk, dtype=torch.int32)
    return torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True).to(torch.int32)


@torch.no_grad()
def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    fp8: bool = False,
) -> torch.Tensor:
    """Causal top-k of the indexer scores: [B, Sq, topk] int64, -1 padded (as the reference).

    q [B, Sq, HI, DI], k [B, Sk, DI], w [B, Sq, HI]. ``fp8=True`` quantises q (per head vector)
    and k (per token) to e4m3 (the caller has Hadamard-rotated them) and folds the q scales into
    w and the k scales into the scores, as the reference inference code does.
    """
    B, Sq, HI, DI = q.shape
    Sk = k.shape[1]
    dev = q.device
    q_pos, k_pos = _positions(q_pos, Sq, dev), _positions(k_pos, Sk, dev)
    out = torch.empty(B, Sq, topk, dtype=torch.long, device=dev)
    if Sq == 0:
        return out
    if Sk == 0 or topk == 0:
        return out.fill_(-1)
    if fp8:
        q_in, qs = fp8_quantize(q)
        k_in, ks = fp8_quantize(k)
        w_in = (w.float() * qs).contiguous()
        ks = ks.contiguous()
        ieee = False
    else:
        ieee = is_fp32(q, k)
        cast = torch.float32 if ieee else q.dtype
        q_in, k_in = q.to(cast), k.to(cast)
        w_in = w.float().contiguous()
        ks = None
    q_in, k_in = q_in.contiguous(), k_in.contiguous()
    q_pos32 = q_pos.to(torch.int64).contiguous()
    k_pos32 = k_pos.to(torch.int64).contiguous()
    rlim = _row_limits(q_pos32, k_pos32).contiguous()  # [Sq]

    on_gpu = q.is_cuda
    kind = "fp8" if fp8 else ("fp32" if ieee else "bf16")
    cfg = dict(SCORE_CFG[kind]) if on_gpu else dict(BM=16, BN=32, num_warps=4, num_stages=1)
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    DIP = next_pow2(DI, 16)
    chunk = max(BM, (SCORE_CHUNK_ELEMENTS // max(B * Sk, 1)) // BM * BM)
    chunk = min(chunk, triton.cdiv(Sq, BM) * BM)
    buf = torch.empty(B, chunk, Sk, dtype=torch.float32, device=dev)
    TILE = SELECT_CFG["TILE"] if on_gpu else 256
    OTILE = min(next_pow2(topk), 1024)
    for t0 in range(0, Sq, chunk):
        t1 = min(Sq, t0 + chunk)
        n = t1 - t0
        nmb = triton.cdiv(n, BM)
        # Key limit of each query block: max row limit over its rows.
        rl = rlim[t0:t1]
        pad = nmb * BM - n
        if pad:
            rl = torch.cat((rl, rl.new_zeros(pad)))
        blim = rl.view(nmb, BM).amax(dim=1).to(torch.int32).expand(B, nmb).contiguous()
        grid = (nmb, triton.cdiv(Sk, BN), B)
        _score_kernel[grid](
            q_in, k_in, w_in, ks if ks is not None else w_in, buf, blim, q_pos32, k_pos32,
            Sk, n, t0,
            q_in.stride(0), q_in.stride(1), q_in.stride(2),
            k_in.stride(0), k_in.stride(1),
            w_in.stride(0), w_in.stride(1), w_in.stride(2),
            ks.stride(0) if ks is not None else 0,
            buf.stride(0), buf.stride(1),
            nmb,
            HI=HI, DI=DI, DIP=DIP, BM=BM, BN=BN, HAS_KS=ks is not None, IEEE=ieee, UPCAST=interpreting(),
            **cfg,
        )
        if _TIMING_SKIP_SELECT:
            continue
        o = out[:, t0:t1]
        rl_b = rlim.expand(B, Sq)
        _select_kernel[(n, B)](
            buf, o, rl_b,
            buf.stride(0), buf.stride(1), o.stride(0), o.stride(1), rl_b.stride(0), t0,
            TOPK=topk, TILE=TILE, OTILE=OTILE, num_warps=SELECT_CFG["num_warps"] if on_gpu else 4,
        )
        # Order within a row: score descending, ties toward the smaller key index (the
        # collected list is in key order, so a stable sort keeps that tie rule).
        vals = torch.gather(buf[:, :n], 2, o.clamp_min(0))
        vals.masked_fill_(o < 0, float("-inf"))
        order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
        out[:, t0:t1] = torch.gather(o, 2, order)
    return out
