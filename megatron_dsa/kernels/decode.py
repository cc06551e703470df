"""Decoding over a paged cache: the indexer's scores, the top-k and the absorbed-MLA attention
(sparse over the selected rows, dense over every cached row), in Triton.

Each function equals the one of its name in ``megatron_dsa.reference`` (the paged layout is
described there): ``paged_indexer_topk``, ``sparse_mla_decode``, ``dense_mla_decode``.

Every row of the cache is found through the block table: token s of sequence b is row
``s % block_size`` of block ``block_table[b, s // block_size]``.

Attention: one program per (block of heads, sequence, key split). The heads of the decoding
token are the rows of the matrix products, so every gathered latent row is read once per head
block and used by all of its heads: from 64 heads up a program's products are 64-row tiles
(the tensor cores' M dimension); below, one block holds every head (padded to 16 or 32). A
sequence's keys are split over ``splits`` programs (flash-decoding) so that a batch of one long
sequence still fills the GPU; each writes its partial output and log-sum-exp and the splits are
combined by their log-sum-exps. The split count is fixed by the cache's capacity, not by the
lengths, and each program reads its sequence's length on the device: a step's launches do not
change from one step to the next, as a CUDA graph needs.

Indexer: each program scores a run of consecutive blocks of a sequence's keys against every
indexer head of the decoding token, with the keys as the product's rows so that the weighted
sum over heads stays within each row's threads. With FP8 keys the program quantises the query
per head (``reference.fp8_quantize``) and multiplies e4m3 by e4m3 on the tensor cores; the
query's scales fold into the weights and the keys' per-token scale multiplies the head sum
(ReLU commutes with a positive scale).

Top-k (``select_topk``): an exact radix select on the scores' 32-bit order keys, 8 bits a round,
spread over pieces of each row so that a batch of a few long rows fills the GPU: per round one
program per (piece, sequence) counts the digit under the prefix fixed so far (``tl.histogram``),
and one program per sequence sums the pieces' counts and fixes the next digit. After four rounds
the threshold is exact; each piece knows how many of its keys lie above it and how many of the
keys equal to it it takes (ties towards the smaller position, the reference's rule), so one more
launch writes the chosen positions, in position order, at their offsets. Then only those k are
sorted by score. Everything stays on the device: a CUDA graph holds the whole step.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import (FP8_MIN_K, HAS_TRITON, _dot, _softmax_finish, _softmax_step, interpreting, is_fp32, next_pow2,
                      selection, split_pow2, triton, tl)
from .indexer import _digit_hist, _e4m3_rows, _order_key, _threshold_digit
from .sparse_attn import _tile_mask, head_block
from ..kernel_options import DEFAULT_OPTIONS, KernelOptions, Tiles

# Launch defaults (KernelOptions.decode_attn / decode_index override them): cached rows per block
# of one attention program, warps by head block; keys per indexer program.
# H200, 128 heads, 128K (results/tune_decode_attn_h200.json): 2 stages 0.30 / 0.45 ms at batch 32 / 64
# against 3 stages 0.32 / 0.53; more key splits than the rule's were slower.
DECODE_ATTN = dict(BK=64, num_stages=2)
# Indexer scoring with e4m3 products, H200, 128 heads at 128K (results/tune_decode_h200.json):
# 128 keys a block over ~2112 programs, 0.283 / 0.528 ms at batch 32 / 64, against 64 keys
# 0.331 / 0.667, 8 warps 0.293 / 0.552, two pipelining stages (64 keys) 0.342 / 0.651. Below
# INDEX_PROGRAMS blocks of 128 keys (a batch of one or a few sequences) the half-size block
# (DECODE_INDEX_SMALL) keeps twice the programs in flight.
DECODE_INDEX = Tiles(BK=128, num_warps=4, num_stages=1)
DECODE_INDEX_SMALL = Tiles(BK=64, num_warps=4, num_stages=1)
SPLIT_ROWS = 512  # at least this many cached rows per key split
# Top-k: scores per piece of a row (at least; more for rows over SELECT_PIECES pieces) and per
# tile of a piece's loops.
SELECT_PIECE = 4096
SELECT_PIECES = 64
SELECT_TILE = 1024
# Programs the key splits aim for. A sparse program reads a few hundred selected rows, so its
# fixed cost (the query, the partial output) weighs: about one per SM (128 heads, batch 32: two
# splits 0.245 ms against four 0.279, results/tune_decode_h200.json). A dense program streams
# thousands of rows: two per SM hide the memory latency (16 heads, batch 32 at 128K: 2.4 ms
# against 3.7 at one per SM).
SPARSE_PROGRAMS = 132
DENSE_PROGRAMS = 264
# Indexer scoring: about this many programs in all (each scores a run of consecutive key blocks).
INDEX_PROGRAMS = 2112


def key_splits(capacity: int, batch: int, head_blocks: int, programs: int) -> int:
    """Programs per sequence over its keys: enough to give the GPU about ``programs`` programs,
    each with at least SPLIT_ROWS rows of the cache's capacity."""
    want = max(1, programs // max(1, batch * head_blocks))
    return max(1, min(want, -(-capacity // SPLIT_ROWS)))


if HAS_TRITON:

    @triton.jit
    def _decode_attn_kernel(
        Q, KV, BT, LEN, IDX, O, LSE,
        NHB, H, TOPK, SPLITS, block_size, scale_log2,
        stride_qb, stride_qh,
        stride_kv_block, stride_kv_row,
        stride_bt,
        stride_ib,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        SPARSE: tl.constexpr, HB: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, DR: tl.constexpr,
        D2: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        hb = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        h = hb * HB + tl.arange(0, HB)
        hm = h < H
        n = tl.load(LEN + b)
        items = TOPK if SPARSE else n
        per_split = tl.cdiv(tl.cdiv(items, SPLITS), BK) * BK
        lo = split * per_split
        hi = tl.minimum(lo + per_split, items)
        d1 = tl.arange(0, D1)
        d2 = tl.arange(0, D2)
        qb = Q + b * stride_qb + h[:, None] * stride_qh
        q1 = tl.load(qb + d1[None, :], mask=_tile_mask(hm, d1, DV, D1), other=0.0)
        if DR > 0:
            q2 = tl.load(qb + DV + d2[None, :], mask=_tile_mask(hm, d2, DR, D2), other=0.0)
        m_i = tl.full((HB,), float("-inf"), tl.float32)
        l_i = tl.zeros((HB,), tl.float32)
        acc = tl.zeros((HB, D1), tl.float32)
        for k0 in range(lo, hi, BK):
            kk = k0 + tl.arange(0, BK)
            if SPARSE:
                pos = tl.load(IDX + b * stride_ib + kk, mask=kk < hi, other=-1)
                valid = (pos >= 0) & (pos < n)
            else:
                pos = kk
                valid = kk < hi
            pos = tl.where(valid, pos, 0)
            block = tl.load(BT + b * stride_bt + pos // block_size, mask=valid, other=0).to(tl.int64)
            rows = KV + block * stride_kv_block + (pos % block_size).to(tl.int64) * stride_kv_row
            kv1 = tl.load(rows[:, None] + d1[None, :], mask=_tile_mask(valid, d1, DV, D1), other=0.0)
            s = _dot(q1, tl.trans(kv1), IEEE, UPCAST)
            if DR > 0:
                kv2 = tl.load(rows[:, None] + DV + d2[None, :], mask=_tile_mask(valid, d2, DR, D2), other=0.0)
                s += _dot(q2, tl.trans(kv2), IEEE, UPCAST)
            m_i, l_i, acc = _softmax_step(s, kv1, valid, scale_log2, m_i, l_i, acc, IEEE, UPCAST)
        out, lse = _softmax_finish(m_i, l_i, acc)
        ob = O + b * stride_ob + split * stride_os + h[:, None] * stride_oh + d1[None, :]
        tl.store(ob, out, mask=_tile_mask(hm, d1, DV, D1))
        tl.store(LSE + b * stride_lb + split * stride_ls + h, lse, mask=hm)

    @triton.jit
    def _paged_indexer_scores_kernel(
        Q, W, K, KS, BT, LEN, S,
        HI, block_size, per_program,
        stride_qb, stride_qh, stride_wb,
        stride_k_block, stride_k_row, stride_ks_block,
        stride_bt, stride_sb, width,
        HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, BN: tl.constexpr, SCALED: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # One program scores ``per_program`` consecutive blocks of BN keys with the query and
        # weights loaded once (pipelining the key loads measured slower: one stage by default).
        b = tl.program_id(1).to(tl.int64)
        n = tl.load(LEN + b)
        j = tl.arange(0, HIP)
        jm = j < HI
        d = tl.arange(0, DIP)
        q = tl.load(Q + b * stride_qb + j[:, None] * stride_qh + d[None, :], mask=jm[:, None] & (d < DI)[None, :],
                    other=0.0)
        w = tl.load(W + b * stride_wb + j, mask=jm, other=0.0).to(tl.float32)
        if SCALED:  # FP8 keys: the query quantised per head too, its scale folded into w
            q8, q_scale = _e4m3_rows(q.to(tl.float32))
            q = q8.to(tl.float8e4nv)
            w = w * q_scale
        qt = tl.trans(q)
        first = tl.program_id(0) * per_program
        for i in range(0, per_program):
            pos = (first + i) * BN + tl.arange(0, BN)
            valid = pos < n
            safe = tl.where(valid, pos, 0)
            block = tl.load(BT + b * stride_bt + safe // block_size, mask=valid, other=0).to(tl.int64)
            row = (safe % block_size).to(tl.int64)
            k = tl.load(K + block[:, None] * stride_k_block + row[:, None] * stride_k_row + d[None, :],
                        mask=valid[:, None] & (d < DI)[None, :], other=0.0)
            # Keys as the product's rows: the sum over heads stays within a row's threads
            # (heads as rows would reduce across warps through shared memory every block).
            dots = _dot(k.to(q.dtype), qt, IEEE, UPCAST)  # [BN, HIP]; FP8 x FP8 with FP8 keys
            score = tl.sum(tl.maximum(dots, 0.0) * w[None, :], axis=1)
            if SCALED:  # ReLU commutes with the positive per-key scale
                score = score * tl.load(KS + block * stride_ks_block + row, mask=valid, other=0.0)
            tl.store(S + b * stride_sb + pos, tl.where(valid, score, float("-inf")), mask=pos < width)

    @triton.jit
    def _radix_count_kernel(S, PREFIX, HIST, width, stride_sb, PIECE: tl.constexpr, NP: tl.constexpr,
                            SHIFT: tl.constexpr, TILE: tl.constexpr):
        # The 256-bin count of the digit at SHIFT over this piece's valid scores whose higher
        # digits equal the row's prefix: HIST[b, piece, :].
        piece = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        start = piece * PIECE
        n = tl.minimum(width - start, PIECE)
        hist = _digit_hist(S + b * stride_sb + start, S, n, tl.load(PREFIX + b), SHIFT, False, TILE)
        tl.store(HIST + (b * NP + piece) * 256 + tl.arange(0, 256), hist)

    @triton.jit
    def _radix_pick_kernel(HIST, PREFIX, WANT, ABOVE, TAKE_ALL, OFFSET, TIES, n_pieces, topk,
                           NP: tl.constexpr, SHIFT: tl.constexpr):
        # One program per row: sum the pieces' counts, fix the digit at SHIFT (the one holding
        # the want-th largest score) and add each piece's count above it to ABOVE[b, piece].
        # After the last digit: each piece's share of the keys equal to the threshold (in piece
        # order, while the row still wants some) and the offset of its chosen keys. (Every value
        # is read before this program writes it: no location is read back.)
        b = tl.program_id(0).to(tl.int64)
        pieces = tl.arange(0, NP)
        bins = tl.arange(0, 256)
        pm = pieces < n_pieces
        h = tl.load(HIST + (b * NP + pieces[:, None]) * 256 + bins[None, :], mask=pm[:, None], other=0)
        if SHIFT == 24:  # first digit: a row with at most top-k valid scores takes them all
            valid_p = tl.sum(h, axis=1)  # each piece's valid scores, kept in TIES until the last digit
            take_all = tl.sum(valid_p, axis=0) <= topk
            tl.store(TAKE_ALL + b, take_all.to(tl.int32))
            tl.store(TIES + b * NP + pieces, valid_p, mask=pm)
            above_p = tl.zeros((NP,), tl.int32)
            want = topk + tl.zeros((), tl.int32)
        else:
            take_all = tl.load(TAKE_ALL + b) != 0
            above_p = tl.load(ABOVE + b * NP + pieces, mask=pm, other=0)
            want = tl.load(WANT + b)
        digit, above, _, _ = _threshold_digit(tl.sum(h, axis=0), want)
        want = want - above
        tl.store(PREFIX + b, tl.load(PREFIX + b) | (digit.to(tl.int64) << SHIFT))
        tl.store(WANT + b, want)
        above_p += tl.sum(tl.where(bins[None, :] > digit, h, 0), axis=1)
        tl.store(ABOVE + b * NP + pieces, above_p, mask=pm)
        if SHIFT == 0:
            ties = tl.sum(tl.where(bins[None, :] == digit, h, 0), axis=1)
            take = tl.minimum(tl.maximum(want - (tl.cumsum(ties, axis=0) - ties), 0), ties)
            valid_p = tl.load(TIES + b * NP + pieces, mask=pm, other=0)  # stored at the first digit
            chosen = tl.where(take_all, valid_p, above_p + take)
            tl.store(TIES + b * NP + pieces, tl.where(take_all, 0, take), mask=pm)
            tl.store(OFFSET + b * NP + pieces, tl.cumsum(chosen, axis=0) - chosen, mask=pm)

    @triton.jit
    def _radix_collect_kernel(S, PREFIX, TAKE_ALL, OFFSET, TIES, OUT, width, stride_sb, stride_ob,
                              PIECE: tl.constexpr, NP: tl.constexpr, TILE: tl.constexpr):
        # Write this piece's chosen positions, in position order, from its offset: the valid
        # scores above the threshold (all valid ones for a row that takes them all) and its
        # share of those equal to it, the first ones.
        piece = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        start = piece * PIECE
        n = tl.minimum(width - start, PIECE)
        thr = tl.load(PREFIX + b)
        take_all = tl.load(TAKE_ALL + b) != 0
        ties = tl.load(TIES + b * NP + piece)
        pos = tl.load(OFFSET + b * NP + piece)
        seen = tl.zeros((), tl.int32)
        srow = S + b * stride_sb + start
        for t0 in range(0, n, TILE):
            offs = t0 + tl.arange(0, TILE)
            x = tl.load(srow + offs, mask=offs < n, other=float("-inf"))
            u = _order_key(x)
            valid = (offs < n) & (x != float("-inf"))
            eq = (valid & (u == thr)).to(tl.int32)
            rank = seen + tl.cumsum(eq, axis=0) - eq
            take = valid & (take_all | (u > thr) | ((eq != 0) & (rank < ties)))
            ti = take.to(tl.int32)
            slot = pos + tl.cumsum(ti, axis=0) - ti
            tl.store(OUT + b * stride_ob + slot, (start + offs).to(tl.int32), mask=take)
            pos += tl.sum(ti, axis=0)
            seen += tl.sum(eq, axis=0)


def _check_paged(name: str, pool: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor):
    if pool.dim() < 3 or block_table.dim() != 2 or lengths.dim() != 1 or lengths.shape[0] != block_table.shape[0]:
        raise ValueError(f"{name}: pool [NB, bs, D], block_table [B, max_blocks] and lengths [B] expected, got "
                         f"{tuple(pool.shape)}, {tuple(block_table.shape)}, {tuple(lengths.shape)}")


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def paged_indexer_scores(q, w, key_pool, key_scales, block_table, lengths, width: Optional[int] = None,
                         options: KernelOptions = DEFAULT_OPTIONS, programs: Optional[int] = None):
    """Indexer scores [B, width] fp32 of the decoding tokens (q [B, HI, DI], w [B, HI]) over each
    sequence's cached keys; -inf past a sequence's length. ``width``: the columns (default: the
    block table's capacity; a fixed width keeps a graphed step's shapes). ``programs``: about
    how many programs share the work (default ``INDEX_PROGRAMS``); each scores a run of
    consecutive key blocks."""
    _check_paged("paged_indexer_scores", key_pool, block_table, lengths)
    block_table, lengths = _int32(block_table), _int32(lengths)
    B, HI, DI = q.shape
    bs = key_pool.shape[1]
    width = width or block_table.shape[1] * bs
    scores = torch.empty(B, width, dtype=torch.float32, device=q.device)
    if B == 0 or width == 0:
        return scores
    fp8 = key_scales is not None  # the kernel quantises the query per head (e4m3 products)
    qd = q if (fp8 or q.dtype == key_pool.dtype) else q.to(key_pool.dtype)
    qd, wc = qd.contiguous(), w.float().contiguous()
    ks = key_scales if fp8 else scores
    ieee = is_fp32(qd) and not fp8
    programs = programs or INDEX_PROGRAMS
    tiles = options.decode_index or (DECODE_INDEX if B * triton.cdiv(width, DECODE_INDEX.BK) >= programs
                                     else DECODE_INDEX_SMALL)
    n_blocks = triton.cdiv(width, tiles.BK)
    per_program = triton.cdiv(n_blocks, max(1, min(n_blocks, programs // B)))
    _paged_indexer_scores_kernel[(triton.cdiv(n_blocks, per_program), B)](
        qd, wc, key_pool, ks, block_table, lengths, scores,
        HI, bs, per_program,
        qd.stride(0), qd.stride(1), wc.stride(0),
        key_pool.stride(0), key_pool.stride(1), ks.stride(0),
        block_table.stride(0), scores.stride(0), width,
        HIP=next_pow2(HI, 16), DI=DI, DIP=next_pow2(DI, FP8_MIN_K if fp8 else 16), BN=tiles.BK, SCALED=fp8,
        IEEE=ieee, UPCAST=interpreting() and not ieee, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return scores


def select_topk(scores: torch.Tensor, topk: int, piece: Optional[int] = None, ordered: bool = True) -> torch.Tensor:
    """``reference.topk_from_scores`` for rows whose ineligible entries are already -inf: the same
    set (ties towards the smaller position), order (score descending, ties by position) and -1
    padding. The set by the radix select of the module docstring over pieces of ``piece`` scores
    (default: ``SELECT_PIECE``, more for rows over ``SELECT_PIECES`` pieces), then only the k
    chosen are sorted (``ordered=False``: not sorted, in position order). No host
    synchronisation (a CUDA graph can hold it)."""
    B, n = scores.shape
    k = min(topk, n)
    out = torch.full((B, topk), -1, dtype=torch.int32, device=scores.device)
    if k == 0 or B == 0:
        return out
    s = scores.float().contiguous()
    piece = piece or max(SELECT_PIECE, next_pow2(-(-n // SELECT_PIECES)))
    n_pieces = -(-n // piece)
    NP = next_pow2(n_pieces)
    tile = min(SELECT_TILE, next_pow2(piece))
    dev = s.device
    hist = torch.empty(B, NP, 256, dtype=torch.int32, device=dev)
    prefix = torch.zeros(B, dtype=torch.int64, device=dev)
    want = torch.empty(B, dtype=torch.int32, device=dev)
    # Written by the first pick before anything reads them.
    above, offset, ties = (torch.empty(B, NP, dtype=torch.int32, device=dev) for _ in range(3))
    take_all = torch.empty(B, dtype=torch.int32, device=dev)
    for shift in (24, 16, 8, 0):
        _radix_count_kernel[(n_pieces, B)](s, prefix, hist, n, s.stride(0), PIECE=piece, NP=NP, SHIFT=shift,
                                           TILE=tile, num_warps=4)
        _radix_pick_kernel[(B,)](hist, prefix, want, above, take_all, offset, ties, n_pieces, k, NP=NP, SHIFT=shift,
                                 num_warps=8)
    _radix_collect_kernel[(n_pieces, B)](s, prefix, take_all, offset, ties, out, n, s.stride(0), out.stride(0),
                                         PIECE=piece, NP=NP, TILE=tile, num_warps=4)
    if not ordered:
        return out
    # Order: score descending, ties by position (the chosen are in position order: a stable sort).
    idx = out[:, :k]
    order = torch.sort(s.gather(-1, idx.clamp_min(0).long()).masked_fill(idx < 0, float("-inf")), dim=-1,
                       descending=True, stable=True).indices
    out[:, :k] = idx.gather(-1, order)
    return out


def paged_indexer_topk(q, w, key_pool, key_scales, block_table, lengths, topk: int, ordered: bool = True,
                       options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """reference.paged_indexer_topk: token positions [B, topk] int32, -1 padded (scored over the
    block table's whole capacity, so the shapes do not depend on the lengths). ``ordered=False``:
    the same set in position order, not sorted by score."""
    scores = paged_indexer_scores(q, w, key_pool, key_scales, block_table, lengths, options=options)
    return select_topk(scores, topk, ordered=ordered)


def combine_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs [B, S, H, Dv] and log-sum-exps [B, S, H] of S key splits -> (out [B, H, Dv]
    in ``dtype``, lse [B, H]); a split without keys has lse -inf and weighs nothing."""
    total = torch.logsumexp(lse, dim=1)  # [B, H]
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weight = torch.exp(lse - safe[:, None])  # exp(-inf) = 0
    return (weight[..., None] * out).sum(1).to(dtype), total


def _decode(q, kv_pool, block_table, lengths, topk_idx, v_dim: int, scale: float, splits: Optional[int],
            options: KernelOptions):
    _check_paged("MLA decode", kv_pool, block_table, lengths)
    block_table, lengths = _int32(block_table), _int32(lengths)
    B, H, D = q.shape
    if kv_pool.shape[-1] != D or not 0 < v_dim <= D:
        raise ValueError(f"MLA decode: q's dim {D}, the cache's {kv_pool.shape[-1]}, v_dim {v_dim}")
    if 1 << (v_dim.bit_length() - 1) != v_dim or split_pow2(D)[0] != v_dim:
        raise ValueError(f"MLA decode: v_dim must be the largest power of two in Dqk, got {v_dim} of {D}")
    HB = head_block(H)
    NHB = triton.cdiv(H, HB)
    capacity = topk_idx.shape[1] if topk_idx is not None else block_table.shape[1] * kv_pool.shape[1]
    splits = splits or key_splits(capacity, B, NHB, SPARSE_PROGRAMS if topk_idx is not None else DENSE_PROGRAMS)
    out = torch.empty(B, splits, H, v_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, splits, H, dtype=torch.float32, device=q.device)
    if B == 0:
        return combine_splits(out, lse, q.dtype)
    DV, D1, DR, D2 = split_pow2(D)
    tiles = options.decode_attn or Tiles(num_warps=4 if HB <= 32 else 8, **DECODE_ATTN)
    qc = q.contiguous() if q.dtype == kv_pool.dtype else q.to(kv_pool.dtype).contiguous()
    sparse = topk_idx is not None
    idx = selection(topk_idx) if sparse else lengths
    ieee = is_fp32(qc)
    _decode_attn_kernel[(NHB, B, splits)](
        qc, kv_pool, block_table, lengths, idx, out, lse,
        NHB, H, topk_idx.shape[1] if sparse else 0, splits, kv_pool.shape[1], scale * 1.4426950408889634,
        qc.stride(0), qc.stride(1),
        kv_pool.stride(0), kv_pool.stride(1),
        block_table.stride(0),
        idx.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        SPARSE=sparse, HB=HB, DV=DV, D1=D1, DR=DR, D2=D2, BK=tiles.BK, IEEE=ieee,
        UPCAST=interpreting() and not ieee, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return combine_splits(out, lse, q.dtype)


def sparse_mla_decode(q, kv_pool, block_table, topk_idx, v_dim: int, scale: float, lengths=None,
                      splits: Optional[int] = None, options: KernelOptions = DEFAULT_OPTIONS):
    """reference.sparse_mla_decode. ``lengths`` [B] (optional) bounds the selected positions."""
    if lengths is None:
        lengths = torch.full((q.shape[0],), block_table.shape[1] * kv_pool.shape[1], dtype=torch.int32,
                             device=q.device)
    return _decode(q, kv_pool, block_table, lengths, topk_idx, v_dim, scale, splits, options)


def dense_mla_decode(q, kv_pool, block_table, lengths, v_dim: int, scale: float, splits: Optional[int] = None,
                     options: KernelOptions = DEFAULT_OPTIONS):
    """reference.dense_mla_decode."""
    return _decode(q, kv_pool, block_table, lengths, None, v_dim, scale, splits, options)
