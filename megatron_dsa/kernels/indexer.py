"""Lightning-indexer scoring fused with a causal top-k (bf16 / fp32 / FP8 e4m3).

Design (chosen for correctness first, then measured, see benchmarks/NOTES.md):

* ``_score_kernel``: one program per (query block BM, key block BN); loops over the HI indexer
  heads, ``acc += w[:, j] * relu(q_j @ k^T)`` on the tensor cores, masks ineligible keys with
  -inf and writes the fp32 tile into a buffer that holds ONE QUERY CHUNK x Sk (never S x S).
  Key blocks past the query block's last eligible key are skipped (causal).
* ``_select_kernel``: one program per row, exact radix select on the order-preserving uint32 key
  of the fp32 score, ``select_digit_bits`` (7) bits per digit (``tl.histogram``).  The scoring
  also writes the largest score of every run of ``select_runs`` keys (8); the top-k-th largest
  of those bounds the threshold from below. Only the runs whose maximum reaches the bound
  (about top-k of them) can hold a key that does: a pass over the maxima lists those runs, one
  pass over their keys lists the few keys at or above the bound (about top-k on a long row),
  and the threshold is resolved from that list: the top digits' passes and one more over the
  run maxima, and one over about top-k x G keys, not the row.  Where the top-k crowds together
  (a recency bias) the runs' bound is loose and its list passes CAP; such rows bound the
  threshold from a sample instead: the ``select_sample_rank``-th largest of every
  ``select_sample``-th key (32) is below the threshold on all but about one row in a thousand
  (checked: at least top-k keys must reach it), and its list is made from the runs the same
  way.  Short rows, and rows whose lists pass CAP, take the general path: histogram passes
  over the row fix the threshold's top bits (about 16); another lists the few keys that share
  them, whose low digits are resolved from that list, and a last pass over the row takes the
  selected keys.  Keys equal to the threshold are taken in key-index order (ties toward the
  smaller index, as the reference's stable sort); -1 pads past the eligible count.  Either way
  a row lists its keys in key order, which the attention's backward uses (its key ranges need
  no sort).  The selected indices are then sorted by score descending (stable), as the
  reference, unless the caller asks for the set only (``ordered=False``).

The scoring is compute bound (HI * DI * 2 = 16K FLOP per score against 4 bytes written and
read back), so writing a chunk of scores costs a few percent of the scoring time.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from ..kernel_options import DEFAULT_OPTIONS, KernelOptions, Tiles
from ..reference import FP8_AMAX_MIN, FP8_MAX
from ._common import FP8_MIN_K, HAS_TRITON, _dot, interpreting, is_fp32, next_pow2, rows_within, triton, tl

# Scoring-kernel launch configs per operand type (GPU; KernelOptions.score overrides the keys
# per tile, warps and stages); benchmarks/tune_dsa.py measures others.
# Measured at 128K (benchmarks/results/tune_indexer.json), scoring alone: one warpgroup on a
# 64 x 128 tile lets several programs share an SM, so one's relu * w overlaps another's
# products: bf16 274 ms vs 285 (64 x 256, 8 warps), fp8 159 vs 183.
SCORE_CFG = {
    "bf16": dict(BM=64, BN=128, num_warps=4, num_stages=3),
    "fp8": dict(BM=64, BN=128, num_warps=4, num_stages=3),
    "fp32": dict(BM=64, BN=64, num_warps=8, num_stages=2),
}
# The selection's launch on the GPU (KernelOptions.select overrides): keys a program reads per
# step, warps, stages.
SELECT_TILES = Tiles(2048, 8, 1)
# CAP: keys a row's candidate list holds (those at or above the run maxima's bound, or those
# sharing the threshold's top 16 bits) before the selection takes more passes over the row
# instead (KernelOptions.select_cap overrides; 0 = always the passes). Small in the
# interpreter, so CPU tests take every path.
SELECT_CAP = 8192
SELECT_CAP_INTERPRETER = 64
# Whether a candidate list holds its keys' scores beside their indices
# (KernelOptions.select_list_values overrides): the passes over the list then read them in
# order instead of gathering each from the row. Off until timed on a GPU.
SELECT_LIST_VALUES = False
# Keys per run whose maximum the scoring keeps for the selection's first bound
# (KernelOptions.select_runs overrides; a divisor of the scoring tile's BN). Short runs in the
# interpreter, so that its short rows hold top-k runs.
SELECT_RUNS = 8
SELECT_RUNS_INTERPRETER = 2
# Keys between the samples whose select_sample_rank-th largest bounds the threshold from below
# where the runs' bound lists more than CAP keys (KernelOptions.select_sample overrides; 0 = no
# sample). Dense in the interpreter, so that its short rows hold enough samples.
SELECT_SAMPLE = 32
SELECT_SAMPLE_INTERPRETER = 4
# Bits of the order key the selection fixes per histogram pass (KernelOptions.select_digit_bits
# overrides). Triton 3.6's histogram takes a ballot per bit and, per bin a lane holds (2^BITS /
# 32), a popcount and a few logic operations: narrower digits make more, cheaper passes.
# H100, 128K, FP8 top-k (results/h100/tune_dsa_select_digit_bits_128k.json): the small MoE's
# 77.8 ms at 7 bits against 80.5 at 8, 84.9 at 6, 80.8 at 5.
SELECT_DIGIT_BITS = 7
# Registers a thread of the selection holds on the GPU (KernelOptions.select_max_registers
# overrides): the compiler takes 116 (Triton 3.6, sm_90: two programs of 8 warps an SM); 80 fit
# three, for a few bytes of spills. H100, 128K, FP8 top-k, random / recency-biased scores: the
# small MoE's 78.1 / 65.4 ms against 77.3 / 68.0 uncapped, DeepSeek's 199.5 / 201.5 against
# 198.4 / 204.5 (benchmarks/NOTES.md).
SELECT_MAX_REGISTERS = 80
# Standard deviations of a row's run maxima below where a row of the chunk selected before had
# its threshold (in those units) at which the selection first bounds the row's threshold,
# without histogram passes (KernelOptions.select_guess overrides; 0 = no guess). On random and recency-biased
# scores that z varies by a few hundredths from row to row (0.01-0.06 at 4 x 64 and 64 x 128
# indexers, 0.2 for the small one's recency-biased rows). Off: at 0.1 on an H100 it sped up
# the recency-biased 128K top-k (DeepSeek's indexer 179 against 205 ms, the small MoE's 63.1
# against 67.6) but not the small MoE's random one (84.5 against 82.0), and the form measured
# read z while other programs wrote it (benchmarks/NOTES.md).
SELECT_GUESS = 0.0


def select_sample_rank(topk: int, sample: int) -> int:
    """The rank, among every ``sample``-th key of a row, of the sampled bound: about topk / sample
    samples reach the threshold, so three binomial standard deviations more make a bound below
    it on all but about one row in a thousand (those take the runs' bound instead)."""
    m = topk / sample
    return math.ceil(m + 3 * math.sqrt(m)) + 1


def select_top_digits(bits: int) -> int:
    """How many of the selection's leading digits bound its candidate lists: about 16 bits."""
    return (16 + bits // 2) // bits


if HAS_TRITON:

    @triton.jit
    def _score_kernel(
        Q, K, W, KS, OUT, GMAX, GSTAT, BLIM, BLO, BFULL, QPOS, KPOS, QDOC, KDOC,
        Sk, n_rows, q_off,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks,
        stride_wb, stride_ws, stride_wh,
        stride_ksb,
        stride_ob, stride_or,
        stride_gb, stride_gr, stride_tb,
        n_mblocks,
        HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr,
        HAS_KS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_DOC: tl.constexpr,
        G: tl.constexpr, STATS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        kstart = pid_n * BN
        blim = tl.load(BLIM + b * n_mblocks + pid_m)
        blo = tl.load(BLO + b * n_mblocks + pid_m)
        if kstart < blim:
            rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # chunk-relative; int64 offsets past 2^31
            rmask = rows < n_rows
            cols = kstart + tl.arange(0, BN)
            cmask = cols < Sk
            if kstart + BN <= blo:  # packed: every key here is in an earlier document than all rows
                acc = tl.full((BM, BN), float("-inf"), tl.float32)
            else:
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
                qmask = rmask[:, None] & dmask[None, :]
                for j in range(HI):
                    q_j = tl.load(q_base + j * stride_qh, mask=qmask, other=0.0)
                    s = _dot(q_j, k_t, IEEE, UPCAST)
                    w_j = tl.load(w_base + j * stride_wh, mask=rmask, other=0.0).to(tl.float32)
                    acc += w_j[:, None] * tl.maximum(s, 0.0)
                if HAS_KS:
                    ks = tl.load(KS + b * stride_ksb + cols, mask=cmask, other=0.0)
                    acc = acc * ks[None, :]
                if kstart + BN > tl.load(BFULL + b * n_mblocks + pid_m):  # not every key eligible for every row
                    qp = tl.load(QPOS + q_off + rows, mask=rmask, other=0)
                    kp = tl.load(KPOS + cols, mask=cmask, other=0)
                    elig = (kp[None, :] <= qp[:, None]) & cmask[None, :]
                    if HAS_DOC:  # packed sequences: only keys of the query's own document
                        qd = tl.load(QDOC + q_off + rows, mask=rmask, other=-1)
                        kd = tl.load(KDOC + cols, mask=cmask, other=-2)
                        elig = elig & (kd[None, :] == qd[:, None])
                    acc = tl.where(elig, acc, float("-inf"))
            tl.store(
                OUT + b * stride_ob + rows[:, None] * stride_or + cols[None, :],
                acc, mask=rmask[:, None] & cmask[None, :],
            )
            if G > 0:  # each run of G keys' largest score: the selection's first bound
                gmax = tl.max(tl.reshape(acc, (BM, BN // G, G)), axis=2)
                gcols = kstart // G + tl.arange(0, BN // G)
                tl.store(GMAX + b * stride_gb + rows[:, None] * stride_gr + gcols[None, :], gmax,
                         mask=rmask[:, None] & (gcols < tl.cdiv(Sk, G))[None, :])
                if STATS:  # the count, sum and sum of squares of each row's finite run maxima
                    fin = gmax > float("-inf")
                    gv = tl.where(fin, gmax, 0.0)
                    c = tl.sum(fin.to(tl.float32), axis=1)
                    trow = GSTAT + b * stride_tb + rows * 3
                    tmask = rmask & (c > 0)
                    tl.atomic_add(trow, c, mask=tmask, sem="relaxed")
                    tl.atomic_add(trow + 1, tl.sum(gv, axis=1), mask=tmask, sem="relaxed")
                    tl.atomic_add(trow + 2, tl.sum(gv * gv, axis=1), mask=tmask, sem="relaxed")

    @triton.jit
    def _order_key(x):
        # fp32 -> uint32 whose order is the float order (-0.0 folded onto +0.0).
        x = tl.where(x == 0.0, 0.0, x)
        bits = x.to(tl.int32, bitcast=True)
        sgn = bits >> 31  # 0 or -1 (arithmetic shift)
        key = bits ^ (sgn & 0x7FFFFFFF)  # signed int32, float order
        return (key ^ -2147483648).to(tl.uint32, bitcast=True)  # the sign bit flipped: unsigned order

    @triton.jit
    def _key_value(u):
        # _order_key's inverse: the fp32 score of a uint32 order key.
        key = (u ^ 0x80000000).to(tl.int32, bitcast=True)
        bits = key ^ ((key >> 31) & 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _load_keys(srow, cand, start, n, INDIRECT: tl.constexpr, TILE: tl.constexpr, STEP=1):
        """One tile of a row's scores: the row itself (INDIRECT 0; every STEP-th key of it: n of
        them; STEP a run-time value where one pass serves both the run maxima and a sample), or
        the keys of a candidate list: the key indices in ``cand``, their scores gathered from
        the row (INDIRECT < 0) or their order keys read INDIRECT slots after them (> 0).
        Returns (order key, key index, valid)."""
        offs = start + tl.arange(0, TILE)
        inb = offs < n
        if INDIRECT > 0:
            kidx = tl.load(cand + offs, mask=inb, other=0)
            u = tl.load(cand + INDIRECT + offs, mask=inb, other=0).to(tl.uint32, bitcast=True)
            return u, kidx, inb  # only valid keys are listed
        else:
            if INDIRECT < 0:
                kidx = tl.load(cand + offs, mask=inb, other=0)
            else:
                kidx = offs * STEP
            x = tl.load(srow + kidx, mask=inb, other=float("-inf"))
            return _order_key(x), kidx, inb & (x != float("-inf"))

    @triton.jit
    def _digit_hist(srow, cand, n, prefix, SHIFT: tl.constexpr, INDIRECT: tl.constexpr, TILE: tl.constexpr,
                    WIDTH: tl.constexpr = 8, NB: tl.constexpr = 256, STEP=1):
        """NB-bin histogram of the WIDTH-bit digit (u >> SHIFT) over the valid scores whose bits
        above the digit equal ``prefix``'s (all valid scores for the top digit)."""
        bins = tl.arange(0, NB)
        hist = tl.zeros((NB,), dtype=tl.int32)
        for start in range(0, n, TILE):
            u, _, valid = _load_keys(srow, cand, start, n, INDIRECT, TILE, STEP)
            if SHIFT + WIDTH < 32:
                valid = valid & ((u >> (SHIFT + WIDTH)) == (prefix >> (SHIFT + WIDTH)))
            dig = tl.where(valid, (u >> SHIFT) & ((1 << WIDTH) - 1), 0).to(tl.int32)
            # Invalid elements were counted in bin 0 (no mask argument in Triton 3.6's histogram).
            nbad = TILE - tl.sum(valid.to(tl.int32), axis=0)
            hist += tl.histogram(dig, NB) - tl.where(bins == 0, nbad, 0)
        return hist

    @triton.jit
    def _threshold_digit(hist, want, NB: tl.constexpr = 256):
        """The digit holding the want-th largest score, how many lie above it, and in it."""
        bins = tl.arange(0, NB)
        total = tl.sum(hist, axis=0)
        ge = total - tl.cumsum(hist, axis=0) + hist  # count with digit >= bin
        digit = tl.max(tl.where(ge >= want, bins, 0), axis=0)
        above = tl.sum(tl.where(bins == digit, ge - hist, 0), axis=0)
        inside = tl.sum(tl.where(bins == digit, hist, 0), axis=0)
        return digit, above, inside, total

    @triton.jit
    def _next_digit(srow, cand, n, prefix, want, SHIFT: tl.constexpr, INDIRECT: tl.constexpr, TILE: tl.constexpr,
                    WIDTH: tl.constexpr = 8, NB: tl.constexpr = 256, STEP=1):
        """Fix the threshold's WIDTH-bit digit at SHIFT: returns the prefix with it set, the rank
        still wanted among the scores sharing the prefix, how many share it, and the valid count."""
        hist = _digit_hist(srow, cand, n, prefix, SHIFT, INDIRECT, TILE, WIDTH, NB, STEP)
        d, above, inside, total = _threshold_digit(hist, want, NB)
        return prefix | (d.to(tl.uint32) << SHIFT), want - above, inside, total

    @triton.jit
    def _top_digits(srow, cand, n, prefix, want, INDIRECT: tl.constexpr, TILE: tl.constexpr,
                    BITS: tl.constexpr, TOPD: tl.constexpr, STEP=1):
        """The threshold's top TOPD digits of BITS bits (``select_digit_bits``): the prefix, the
        rank still wanted among the scores sharing it, how many share it, and the valid count."""
        prefix, want, inside, total = _next_digit(srow, cand, n, prefix, want, 32 - BITS, INDIRECT, TILE,
                                                  BITS, 1 << BITS, STEP)
        for i in tl.static_range(1, TOPD):
            prefix, want, inside, _ = _next_digit(srow, cand, n, prefix, want, 32 - (i + 1) * BITS, INDIRECT, TILE,
                                                  BITS, 1 << BITS, STEP)
        return prefix, want, inside, total

    @triton.jit
    def _low_digits(srow, cand, n, prefix, want, INDIRECT: tl.constexpr, TILE: tl.constexpr,
                    BITS: tl.constexpr, TOPD: tl.constexpr):
        """The threshold's digits below the top TOPD ones; the last is what is left of 32 bits."""
        for i in tl.static_range(TOPD, 32 // BITS):
            prefix, want, _, _ = _next_digit(srow, cand, n, prefix, want, 32 - (i + 1) * BITS, INDIRECT, TILE,
                                             BITS, 1 << BITS)
        if 32 % BITS > 0:
            prefix, want, _, _ = _next_digit(srow, cand, n, prefix, want, 0, INDIRECT, TILE, 32 % BITS, 1 << BITS)
        return prefix, want

    @triton.jit
    def _collect(srow, cand, n, orow, cnt, prefix, want, INDIRECT: tl.constexpr, TOPK: tl.constexpr,
                 TILE: tl.constexpr):
        """Store, in key-index order, the keys above the threshold ``prefix`` to ``orow`` from
        position ``cnt``, and those equal to it while fewer than ``want`` were seen (ties toward the
        smaller key index). Returns the output count."""
        seen = tl.zeros((), dtype=tl.int32)
        for start in range(0, n, TILE):
            u, kidx, valid = _load_keys(srow, cand, start, n, INDIRECT, TILE)
            eq_i = (valid & (u == prefix)).to(tl.int32)
            eq_rank = seen + tl.cumsum(eq_i, axis=0) - eq_i
            take = (valid & (u > prefix)) | ((eq_i > 0) & (eq_rank < want))
            take_i = take.to(tl.int32)
            pos = cnt + tl.cumsum(take_i, axis=0) - take_i
            tl.store(orow + pos, kidx.to(tl.int32), mask=take & (pos < TOPK))
            cnt += tl.sum(take_i, axis=0)
            seen += tl.sum(eq_i, axis=0)
        return cnt

    @triton.jit
    def _store_listed(cand, pos, kidx, u, take, CAP: tl.constexpr, VALUES: tl.constexpr):
        """A candidate list's layout: key indices at their positions (the first CAP), and
        (VALUES) their order keys CAP slots after them, which _load_keys reads back."""
        tl.store(cand + pos, kidx.to(tl.int32), mask=take & (pos < CAP))
        if VALUES:
            tl.store(cand + CAP + pos, u.to(tl.int32, bitcast=True), mask=take & (pos < CAP))

    @triton.jit
    def _gather_at_least(srow, n, cand, prefix, CAP: tl.constexpr, TILE: tl.constexpr, EQUAL: tl.constexpr,
                         LOW: tl.constexpr, VALUES: tl.constexpr):
        """List, in key order, the keys whose bits above the LOW lowest are at least prefix's
        (EQUAL: equal to them) in ``cand`` (the first CAP of them; VALUES: their order keys CAP
        slots after them); returns how many there are."""
        cnt = tl.zeros((), dtype=tl.int32)
        for start in range(0, n, TILE):
            u, kidx, valid = _load_keys(srow, cand, start, n, False, TILE)
            if EQUAL:
                take = valid & ((u >> LOW) == (prefix >> LOW))
            else:
                take = valid & ((u >> LOW) >= (prefix >> LOW))
            take_i = take.to(tl.int32)
            pos = cnt + tl.cumsum(take_i, axis=0) - take_i
            _store_listed(cand, pos, kidx, u, take, CAP, VALUES)
            cnt += tl.sum(take_i, axis=0)
        return cnt

    @triton.jit
    def _gather_runs_at_least(srow, grow, ng, n, runs, cand, prefix,
                              CAP: tl.constexpr, TILE: tl.constexpr, G: tl.constexpr, RT: tl.constexpr,
                              LOW: tl.constexpr, VALUES: tl.constexpr):
        """``_gather_at_least`` reading only the runs of G keys whose maximum reaches prefix's bits
        above the LOW lowest (no other run holds such a key): those runs listed in ``runs`` from the maxima
        ``grow``, then their keys, RT runs a step. The same list in key order, from about
        TOPK * G keys instead of the whole row; returns its length (CAP + 1: too long)."""
        nr = _gather_at_least(grow, ng, runs, prefix, CAP, TILE, False, LOW, False)
        # Other threads of the program read the list back: without a barrier they may read stale
        # slots (a 32-key tile on 2 warps, where no reduction crosses warps, selected wrong sets).
        tl.debug_barrier()
        cnt = tl.zeros((), dtype=tl.int32)
        if nr > CAP:
            cnt += CAP + 1
        else:
            for start in range(0, nr, RT):
                slot = start + tl.arange(0, RT)
                run = tl.load(runs + slot, mask=slot < nr, other=0)
                kidx = run[:, None] * G + tl.arange(0, G)[None, :]  # [RT, G], in key order row-major
                inb = (slot < nr)[:, None] & (kidx < n)
                x = tl.load(srow + kidx, mask=inb, other=float("-inf"))
                u = _order_key(x)
                take = inb & (x != float("-inf")) & ((u >> LOW) >= (prefix >> LOW))
                t = take.to(tl.int32)
                per_run = tl.sum(t, axis=1)
                pos = cnt + (tl.cumsum(per_run, axis=0) - per_run)[:, None] + tl.cumsum(t, axis=1) - t
                _store_listed(cand, pos, kidx, u, take, CAP, VALUES)
                cnt += tl.sum(per_run, axis=0)
        return cnt

    @triton.jit
    def _list_at_least(srow, grow, lim, runs, cand, prefix, CAP: tl.constexpr, TILE: tl.constexpr, G: tl.constexpr,
                       RT: tl.constexpr, LOW: tl.constexpr, VALUES: tl.constexpr):
        """The candidate list of a bound: in ``cand``, in key order, the keys whose bits above the
        LOW lowest are at least prefix's (VALUES: their order keys CAP slots after them), from the
        runs that reach it (G > 0) or the row; returns its length (more than CAP: too long, not
        all listed)."""
        if G > 0:
            listed = _gather_runs_at_least(srow, grow, tl.cdiv(lim, G), lim, runs, cand, prefix, CAP, TILE, G, RT, LOW,
                                           VALUES)
        else:
            listed = _gather_at_least(srow, lim, cand, prefix, CAP, TILE, False, LOW, VALUES)
        tl.debug_barrier()  # other threads read the list back (see _gather_runs_at_least)
        return listed

    @triton.jit
    def _select_kernel(
        S, OUT, RLIM, CAND, GMAX, RUNS, GSTAT, ZIN, ZOUT, PATHS,
        stride_sb, stride_sr, stride_ob, stride_or, stride_rb, stride_cb, stride_cr, stride_ub, stride_ur,
        stride_gb, stride_gr, stride_tb, r_off, margin,
        TOPK: tl.constexpr, TILE: tl.constexpr, OTILE: tl.constexpr, CAP: tl.constexpr, G: tl.constexpr,
        RT: tl.constexpr, BITS: tl.constexpr, TOPD: tl.constexpr, SAMPLE: tl.constexpr, RANK: tl.constexpr,
        GUESS: tl.constexpr, COUNT: tl.constexpr, VALUES: tl.constexpr,
    ):
        # Exact radix select on the 32-bit order key, BITS bits per digit; the top TOPD digits
        # (about 16 bits) are "the top bits" below, the 32 - TOPD * BITS others the low bits.
        #
        # A candidate list holds every key at or above a bound's top bits, in key order; when
        # it holds TOPK keys or more and fits CAP, the threshold's digits are resolved from the
        # list alone. Bounds, in the order tried:
        # - guessed (GUESS, with the runs): a threshold lies at about the same number of
        #   standard deviations above the mean of its row's run maxima on every row of a
        #   sequence, so a row of the chunk selected before (ZIN; this launch's rows write
        #   ZOUT) gives it, ``margin`` standard deviations lower, from this row's moments of
        #   its run maxima (GSTAT, summed by the scoring): no histogram pass. Checked like the
        #   sample's. (Read from another launch: every thread of the program reads the same
        #   value, which the paths below need.)
        # - the runs' maxima (G > 0, at least TOPK runs holding a score): the TOPK-th largest
        #   run maximum is a lower bound of the threshold (TOPK distinct keys reach it). Its top
        #   bits from TOPD histogram passes over the maxima (1/G of the row); a pass more lists
        #   the runs whose maximum reaches them (about TOPK), and one over those runs' keys lists
        #   the keys at or above them (about TOPK on long rows).
        # - sampled (SAMPLE > 0; tried where the runs' list passes CAP, or without runs): where
        #   the top-k crowds together (a recency bias) the runs' bound is loose. The top bits of
        #   the RANK-th largest of every SAMPLE-th key (RANK about TOPK / SAMPLE plus three
        #   standard deviations of it), from TOPD histogram passes over 1/SAMPLE of the row, then
        #   the list as above (G = 0: one pass over the row). A sample unlike its row (fewer than
        #   TOPK keys reach its bound, or more than CAP) falls through to the row's passes.
        # VALUES: a list holds each key's index and, CAP slots after it, its order key, so the
        # passes over it read both in order instead of gathering each score from the row again.
        # Otherwise: TOPD histogram passes over the row fix the top bits of the threshold; a
        # pass more lists the few keys sharing them (tens at 128K) in CAND, where the low
        # digits are resolved (more than CAP sharing them, heavy ties: from the row); a last
        # pass takes the keys above the threshold and its first ties, in key order.
        # COUNT: PATHS[bound + 1] counts the rows each bound listed (bound 2: the row's passes).
        LOW: tl.constexpr = 32 - TOPD * BITS
        FIRST: tl.constexpr = 0 if G > 0 else 1
        LAST: tl.constexpr = 1 if SAMPLE > 0 else 0
        LIST: tl.constexpr = max(CAP, 1) if VALUES else -1  # how _load_keys reads a list
        r = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)  # b * stride_ob passes 2^31 elements from B * Sq * TOPK
        lim = tl.load(RLIM + b * stride_rb + r_off + r)
        srow = S + b * stride_sb + r * stride_sr
        orow = OUT + b * stride_ob + r * stride_or
        crow = CAND + b * stride_cb + r * stride_cr
        rrow = RUNS + b * stride_ub + r * stride_ur
        grow = GMAX + b * stride_gb + r * stride_gr
        want = tl.zeros((), dtype=tl.int32) + TOPK
        cnt = tl.zeros((), dtype=tl.int32)
        prefix = tl.zeros((), dtype=tl.uint32)
        listed = tl.zeros((), dtype=tl.int32) + CAP + 1
        bound = tl.zeros((), dtype=tl.int32) + FIRST
        mean = tl.zeros((), dtype=tl.float32)
        sd = tl.zeros((), dtype=tl.float32)
        guess = tl.zeros((), dtype=tl.uint32)
        if GUESS:
            nmax = tl.load(GSTAT + b * stride_tb + r * 3)
            mean = tl.load(GSTAT + b * stride_tb + r * 3 + 1) / tl.maximum(nmax, 1.0)
            sd = tl.sqrt(tl.maximum(tl.load(GSTAT + b * stride_tb + r * 3 + 2) / tl.maximum(nmax, 1.0) - mean * mean,
                                    0.0))
            z = tl.load(ZIN + b)
            if (nmax >= TOPK) & (sd > 0.0) & (z == z):
                guess = _order_key(mean + (z - margin) * sd)
                bound = bound * 0 - 1
        # The bounds in one loop, so that their passes are one code path (the kernel compiles
        # smaller, and faster): -1 the guess, 0 the runs' maxima, 1 the sample; LAST + 1 ends it.
        if G + SAMPLE > 0:  # (without either: no loop, on which Triton 3.6's coalescing pass fails)
            while bound <= LAST:
                bp = guess
                counted = tl.zeros((), dtype=tl.int32) + TOPK
                rank = tl.zeros((), dtype=tl.int32) + TOPK
                if bound >= 0:
                    src = grow  # the bound's values: every run maximum, or every SAMPLE-th key
                    step = tl.zeros((), dtype=tl.int32) + 1
                    n = tl.cdiv(lim, max(G, 1))
                    if bound > 0:
                        src = srow
                        step = step * max(SAMPLE, 1)
                        n = tl.cdiv(lim, max(SAMPLE, 1))
                        rank = rank * 0 + RANK
                    bp, _, _, counted = _top_digits(src, crow, n, prefix, rank, False, TILE, BITS, TOPD, step)
                following = tl.zeros((), dtype=tl.int32) + LAST + 1  # too few values for a bound: the row's passes
                if counted >= rank:
                    listed = _list_at_least(srow, grow, lim, rrow, crow, bp, CAP, TILE, G, RT, LOW, VALUES)
                    if bound != 0 and listed < TOPK:  # a guess or sample above the threshold
                        listed = CAP + 1
                    if listed > CAP:
                        following = tl.maximum(bound + 1, FIRST)
                    else:
                        following = LAST + 1
                        if COUNT:
                            tl.atomic_add(PATHS + bound + 1, 1, sem="relaxed")
                bound = following
        nvalid = tl.zeros((), dtype=tl.int32) + TOPK + 1
        if listed <= CAP:
            prefix, want, _, _ = _top_digits(srow, crow, listed, prefix, want, LIST, TILE, BITS, TOPD)
            prefix, want = _low_digits(srow, crow, listed, prefix, want, LIST, TILE, BITS, TOPD)
            cnt = _collect(srow, crow, listed, orow, cnt, prefix, want, LIST, TOPK, TILE)
        else:
            if COUNT:
                tl.atomic_add(PATHS + 3, 1, sem="relaxed")
            prefix, want, inside, nvalid = _top_digits(srow, crow, lim, prefix, want, False, TILE, BITS, TOPD)
            if nvalid <= TOPK:  # every eligible key: those above 0 and up to TOPK equal to it
                prefix = tl.zeros((), dtype=tl.uint32)
                want = tl.zeros((), dtype=tl.int32) + TOPK
            elif inside <= CAP:  # the low digits from the keys sharing the top bits
                ncand = _gather_at_least(srow, lim, crow, prefix, CAP, TILE, True, LOW, VALUES)
                tl.debug_barrier()  # the listed keys, read back as above
                prefix, want = _low_digits(srow, crow, ncand, prefix, want, LIST, TILE, BITS, TOPD)
            else:  # heavy ties: from the row
                prefix, want = _low_digits(srow, crow, lim, prefix, want, False, TILE, BITS, TOPD)
            # One pass over the row takes the keys in key order, as the list above does: the
            # attention's backward then finds its key ranges without sorting the rows.
            cnt = _collect(srow, crow, lim, orow, cnt, prefix, want, False, TOPK, TILE)
        if GUESS:  # where this row's threshold lay, for the rows selected after it
            if (nvalid > TOPK) & (sd > 0.0):
                tl.store(ZOUT + b, (_key_value(prefix) - mean) / sd)
        for start in range(0, TOPK, OTILE):
            offs = start + tl.arange(0, OTILE)
            tl.store(orow + offs, tl.full((OTILE,), -1, tl.int32), mask=(offs >= cnt) & (offs < TOPK))


    @triton.jit
    def _round_to_e4m3(y):
        """Round fp32 (|y| <= 448) to the nearest e4m3 value, ties to even, staying in fp32: the
        cast that follows is then exact everywhere (Triton's CPU interpreter mis-rounds values
        whose rounding carries into the exponent, e.g. 127.4 -> 64)."""
        a = tl.abs(y)
        bits = a.to(tl.int32, bitcast=True)
        # Normal range (>= 2^-6): keep 3 mantissa bits, ties to even.
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF
        normal = bits.to(tl.float32, bitcast=True)
        sub = (a + 16384.0) - 16384.0  # subnormals: a multiple of 2^-9 (fp32 add rounds to even)
        r = tl.where(a < 0.015625, sub, normal).to(tl.int32, bitcast=True)
        sign = y.to(tl.int32, bitcast=True) & -2147483648  # keeps -0.0
        return (r | sign).to(tl.float32, bitcast=True)

    _FP8_MAX = tl.constexpr(FP8_MAX)
    _FP8_INV_MAX = tl.constexpr(1.0 / FP8_MAX)
    _FP8_AMAX_MIN = tl.constexpr(FP8_AMAX_MIN)

    @triton.jit
    def _e4m3_rows(x):
        """``reference.fp8_quantize`` of each row of x [R, D] fp32 (zero padding changes no
        amax): the e4m3 values, still in fp32 (exact), and the per-row scales."""
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), _FP8_AMAX_MIN) * _FP8_INV_MAX
        y = tl.math.div_rn(x, scale[:, None])  # IEEE division, as PyTorch's
        y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
        return _round_to_e4m3(y), scale

    @triton.jit
    def _fp8_quantize_kernel(X, Y, SC, n_rows, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr):
        rows = tl.program_id(0) * R + tl.arange(0, R)
        d = tl.arange(0, DP)
        msk = (rows < n_rows)[:, None] & (d < D)[None, :]
        offs = rows.to(tl.int64)[:, None] * D + d[None, :]
        y, scale = _e4m3_rows(tl.load(X + offs, mask=msk, other=0.0).to(tl.float32))
        tl.store(Y + offs, y.to(tl.float8e4nv), mask=msk)
        tl.store(SC + rows, scale, mask=rows < n_rows)

def _positions(pos: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) if pos is None else pos.to(device)


def _documents(doc: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    """Document ids as a contiguous int64 vector (zeros, unread, for an unpacked sequence)."""
    if doc is None:
        return torch.zeros(n, dtype=torch.int64, device=device)
    return doc.to(device=device, dtype=torch.int64).contiguous()


def _first_keys(q_doc: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """Per query, the first key index of its document: every key before it is in another
    document (0 where the keys' document ids do not ascend)."""
    if k_doc.numel() > 1 and bool((k_doc[1:] < k_doc[:-1]).any()):
        return torch.zeros_like(q_doc)
    return torch.searchsorted(k_doc, q_doc)


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (last dim) e4m3 quantisation: scale = max(amax, 1e-4) * (1 / 448). Returns (x8, scale).

    One Triton pass (read x once, write e4m3 and the scales), bit-identical to
    ``reference.fp8_quantize``, which makes several fp32 passes over x."""
    D = x.shape[-1]
    xc = x.contiguous()
    x8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    n = scale.numel()
    if n:
        R = 32
        _fp8_quantize_kernel[(triton.cdiv(n, R),)](
            xc, x8, scale, n, D=D, DP=next_pow2(D), R=R, num_warps=4,
        )
    return x8, scale


def _row_limits(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per query, one past the last key index that can be eligible (Sk if k_pos is unsorted), and
    whether k_pos ascends: then every key below a query's limit is eligible for it."""
    Sk = k_pos.shape[0]
    if Sk > 1 and not bool((k_pos[1:] >= k_pos[:-1]).all()):
        return torch.full_like(q_pos, Sk, dtype=torch.int32), False
    return torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True).to(torch.int32), True


class _SelectStreams:
    """Where the selection of a chunk of rows runs: on a second, higher-priority CUDA stream
    (``device`` given), so that it shares the SMs with the scoring of the next chunk, or (None)
    on the current stream. With two score buffers, the scoring of a chunk waits only for the
    selection that last read its buffer."""

    def __init__(self, device: Optional[torch.device]):
        self.main = torch.cuda.current_stream(device) if device is not None else None
        self.side = torch.cuda.Stream(device=device, priority=-1) if device is not None else None
        self.read = {}  # buffer slot -> event after the selection that last read it

    def before_scoring(self, slot: int) -> None:
        if self.side is not None and slot in self.read:
            self.main.wait_event(self.read[slot])

    @contextlib.contextmanager
    def selecting(self, slot: int):
        if self.side is None:
            yield
            return
        self.side.wait_stream(self.main)  # the chunk's scores (and every input) are written
        with torch.cuda.stream(self.side):
            yield
        self.read[slot] = self.side.record_event()

    def join(self) -> None:
        if self.side is not None:
            self.main.wait_stream(self.side)


@torch.no_grad()
def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    fp8: bool = False,
    ordered: bool = True,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
    options: KernelOptions = DEFAULT_OPTIONS,
    path_counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal top-k of the indexer scores: [B, Sq, topk] int32, -1 padded (as the reference).

    ``q_doc`` / ``k_doc`` (packed sequences): document ids [Sq] / [Sk]; a key is eligible only
    in its query's document (``reference.causal_mask``), one more comparison in the scoring tile.

    ``ordered=False`` skips sorting each row by score (the selected set is the same, in key
    order, -1 padding last): the sparse attention and the KL do not depend on the order.

    q [B, Sq, HI, DI], k [B, Sk, DI], w [B, Sq, HI]. ``fp8=True`` quantises q (per head vector)
    and k (per token) to e4m3 (the caller has Hadamard-rotated them) and folds the q scales into
    w and the k scales into the scores, as the reference inference code does.

    ``path_counts`` (int32 [4] on q's device, optional): the selection adds to it how many rows
    each bound's candidate list served (the guess, the runs' maxima, the sample) and how many
    took the passes over their row.
    """
    B, Sq, HI, DI = q.shape
    if path_counts is not None and (path_counts.shape != (4,) or path_counts.dtype != torch.int32
                                    or path_counts.device != q.device):
        raise ValueError(f"path_counts must be an int32 tensor of shape [4] on {q.device}, got "
                         f"{path_counts.dtype} {tuple(path_counts.shape)} on {path_counts.device}")
    Sk = k.shape[1]
    dev = q.device
    q_pos, k_pos = _positions(q_pos, Sq, dev), _positions(k_pos, Sk, dev)
    out = torch.empty(B, Sq, topk, dtype=torch.int32, device=dev)
    if Sq == 0:
        return out
    if Sk == 0 or topk == 0:
        return out.fill_(-1)
    on_gpu = q.is_cuda
    ieee = not fp8 and is_fp32(q, k)
    kind = "fp8" if fp8 else ("fp32" if ieee else "bf16")
    cfg = dict(SCORE_CFG[kind]) if on_gpu else dict(BM=16, BN=32, num_warps=4, num_stages=1)
    if options.score is not None:  # keys per tile, warps, stages; the tile's query rows stay
        cfg.update(BN=options.score.BK, num_warps=options.score.num_warps, num_stages=options.score.num_stages)
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    G = options.select_runs if options.select_runs is not None else (SELECT_RUNS if on_gpu else SELECT_RUNS_INTERPRETER)
    if G and BN % G:
        raise ValueError(f"select_runs={G} must divide the scoring tile's {BN} keys")
    if fp8:
        q_in, qs = fp8_quantize(q)
        k_in, ks = fp8_quantize(k)
        w_in = (w.float() * qs).contiguous()
        ks = ks.contiguous()
    else:
        cast = torch.float32 if ieee else q.dtype
        q_in, k_in = q.to(cast), k.to(cast)
        w_in = w.float().contiguous()
        ks = None
    q_in, k_in = q_in.contiguous(), k_in.contiguous()
    q_pos32 = q_pos.to(torch.int64).contiguous()
    k_pos32 = k_pos.to(torch.int64).contiguous()
    rlim, ascending = _row_limits(q_pos32, k_pos32)  # [Sq]
    rlim = rlim.contiguous()
    has_doc = q_doc is not None or k_doc is not None
    q_doc32 = _documents(q_doc, Sq, dev)
    k_doc32 = _documents(k_doc, Sk, dev)
    row_lo = _first_keys(q_doc32, k_doc32) if has_doc else torch.zeros(Sq, dtype=torch.int64, device=dev)

    DIP = next_pow2(DI, FP8_MIN_K if fp8 else 16)  # padded columns are masked zeros
    sel = options.select or (SELECT_TILES if on_gpu else Tiles(256, 4, 1))
    CAP = options.select_cap if options.select_cap is not None else (SELECT_CAP if on_gpu else SELECT_CAP_INTERPRETER)
    # The selection of one chunk of rows overlaps the scoring of the next: two score buffers,
    # each within half the options' workspace (2 GiB by default) of fp32 scores [B, chunk, Sk].
    overlap = options.select_overlap if options.select_overlap is not None else on_gpu
    nbuf = 2 if overlap else 1
    chunk = max(BM, rows_within(options.workspace_bytes // nbuf, B * Sk * 4) // BM * BM)
    chunk = min(chunk, triton.cdiv(Sq, BM) * BM)
    bits = options.select_digit_bits or SELECT_DIGIT_BITS
    sample = options.select_sample if options.select_sample is not None else (
        SELECT_SAMPLE if on_gpu else SELECT_SAMPLE_INTERPRETER)
    m = options.select_max_registers if options.select_max_registers is not None else (
        SELECT_MAX_REGISTERS if on_gpu else None)
    select_registers = {} if m is None else {"maxnreg": m}
    margin = options.select_guess if options.select_guess is not None else SELECT_GUESS
    guess = bool(G) and margin > 0  # the moments come from the run maxima
    bufs = [torch.empty(B, chunk, Sk, dtype=torch.float32, device=dev) for _ in range(nbuf)]
    gmaxs = [torch.empty(B, chunk, triton.cdiv(Sk, G) if G else 1, dtype=torch.float32, device=dev)
             for _ in range(nbuf)]
    gstats = [torch.empty(B, chunk, 3 if guess else 1, dtype=torch.float32, device=dev) for _ in range(nbuf)]
    # Where a chunk's rows put their thresholds, read by the next chunk's (none before the first).
    zlast = torch.full((2, B), float("nan"), dtype=torch.float32, device=dev)
    values = options.select_list_values if options.select_list_values is not None else SELECT_LIST_VALUES
    # A row's list: key indices, then (values) their order keys.
    cand = torch.empty(B, chunk, (2 if values else 1) * max(CAP, 1), dtype=torch.int32, device=dev)
    runs = torch.empty(B, chunk, max(CAP, 1) if G else 1, dtype=torch.int32, device=dev)  # the runs it is read from
    OTILE = min(next_pow2(topk), 1024)
    streams = _SelectStreams(dev if overlap and on_gpu else None)
    try:  # a failed launch still leaves nothing running on the side stream
        for i, t0 in enumerate(range(0, Sq, chunk)):
            t1 = min(Sq, t0 + chunk)
            n = t1 - t0
            nmb = triton.cdiv(n, BM)
            buf, gmax, gstat = bufs[i % nbuf], gmaxs[i % nbuf], gstats[i % nbuf]
            streams.before_scoring(i % nbuf)
            if guess:
                gstat.zero_()
            # Key limit of each query block: max row limit over its rows.
            rl = rlim[t0:t1]
            pad = nmb * BM - n
            if pad:
                rl = torch.cat((rl, rl.new_zeros(pad)))
            blim = rl.view(nmb, BM).amax(dim=1).to(torch.int32).expand(B, nmb).contiguous()
            # Keys below the least row limit are eligible for every row of the block (ascending
            # key positions, one document): its tiles there skip the mask.
            if ascending and not has_doc:
                bfull = rl.view(nmb, BM).amin(dim=1).to(torch.int32).expand(B, nmb).contiguous()
            else:
                bfull = torch.zeros_like(blim)
            # First key of each query block's earliest document: key blocks before it are -inf
            # without scoring (0 for an unpacked sequence).
            lo = row_lo[t0:t1]
            if pad:
                lo = torch.cat((lo, lo.new_full((pad,), Sk)))
            blo = lo.view(nmb, BM).amin(dim=1).to(torch.int32).expand(B, nmb).contiguous()
            _score_kernel[(nmb, triton.cdiv(Sk, BN), B)](
                q_in, k_in, w_in, ks if ks is not None else w_in, buf, gmax, gstat, blim, blo, bfull,
                q_pos32, k_pos32, q_doc32, k_doc32,
                Sk, n, t0,
                q_in.stride(0), q_in.stride(1), q_in.stride(2),
                k_in.stride(0), k_in.stride(1),
                w_in.stride(0), w_in.stride(1), w_in.stride(2),
                ks.stride(0) if ks is not None else 0,
                buf.stride(0), buf.stride(1),
                gmax.stride(0), gmax.stride(1), gstat.stride(0),
                nmb,
                HI=HI, DI=DI, DIP=DIP, BM=BM, BN=BN, HAS_KS=ks is not None, IEEE=ieee, UPCAST=interpreting(),
                HAS_DOC=has_doc, G=G, STATS=guess,
                **cfg,
            )
            with streams.selecting(i % nbuf):
                o = out[:, t0:t1]
                rl_b = rlim.expand(B, Sq)
                _select_kernel[(n, B)](
                    buf, o, rl_b, cand, gmax, runs, gstat, zlast[(i + 1) % 2], zlast[i % 2],
                    path_counts if path_counts is not None else cand,
                    buf.stride(0), buf.stride(1), o.stride(0), o.stride(1), rl_b.stride(0),
                    cand.stride(0), cand.stride(1), runs.stride(0), runs.stride(1),
                    gmax.stride(0), gmax.stride(1), gstat.stride(0), t0,
                    float(margin), TOPK=topk, TILE=sel.BK, OTILE=OTILE, CAP=CAP, G=G, RT=max(sel.BK // max(G, 1), 1),
                    BITS=bits, TOPD=select_top_digits(bits),
                    SAMPLE=sample, RANK=select_sample_rank(topk, sample) if sample else 0,
                    GUESS=guess, COUNT=path_counts is not None, VALUES=values,
                    num_warps=sel.num_warps, num_stages=sel.num_stages, **select_registers,
                )
                if ordered:
                    # Order within a row: score descending, ties toward the smaller key index (the
                    # collected list is in key order, so a stable sort keeps that tie rule).
                    vals = torch.gather(buf[:, :n], 2, o.clamp_min(0).long())  # int64 for gather: this chunk only
                    vals.masked_fill_(o < 0, float("-inf"))
                    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
                    out[:, t0:t1] = torch.gather(o, 2, order)
    finally:
        streams.join()
    return out
