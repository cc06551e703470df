"""Atomic-free key gradients: the transpose of the top-k list and a segmented reduction.

The sparse backward kernels (attention dkv, KL dk_idx) are query-major: one program per query
token produces, for each selected key, one gradient row (sum over heads).  Instead of adding
that row into ``dkey[key]`` with fp32 atomics (1.5e11 scalar reductions at 128K), the
"sorted" path writes it to a partial buffer at the pair's position in key order, and a second
kernel sums each key's contiguous segment in registers and adds it to ``dkey`` with plain
loads / stores (every key is owned by one program).

Memory stays bounded by processing the queries in chunks of ``C`` rows: the pairs of chunk c
are ordered by (c, batch, key) - a counting sort built once per index tensor by two small
kernels (histogram of int32 atomics, exclusive cumsum, positions by atomic cursors) and shared
by the attention and the KL backward (cached on the index tensor).  The order of the pairs
inside one key's segment follows the atomic cursors (not deterministic on the GPU), like the
summation order of the atomic path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ._common import HAS_TRITON, interpreting, next_pow2, split_pow2, triton, tl

# Pairs (query, slot) per chunk for all batches together.  The partial buffer holds this many
# rows (x 576 bf16 = 1.2 GB for the attention at 2^20); smaller -> less memory, more launches.
PAIR_BUDGET = 1 << 20
# Interpreter (CPU tests): tiny, so that every test runs over several chunks.
PAIR_BUDGET_INTERP = 96
# Keys per program of the reduction kernel and rows per register tile.
REDUCE_KB = 16
REDUCE_R = 16


if HAS_TRITON:

    @triton.jit
    def _csr_count_kernel(IDX, CNT, Sk, C, B, TOPK, stride_ib, stride_is, BLK: tl.constexpr):
        t = tl.program_id(0)
        b = tl.program_id(1)
        segb = ((t // C) * B + b) * Sk
        ib = IDX + b * stride_ib + t * stride_is
        for k0 in range(0, TOPK, BLK):
            kk = k0 + tl.arange(0, BLK)
            km = kk < TOPK
            idx = tl.load(ib + kk, mask=km, other=-1)
            valid = km & (idx >= 0) & (idx < Sk)
            key = tl.where(valid, idx, 0).to(tl.int32)
            tl.atomic_add(CNT + segb + key, tl.full((BLK,), 1, tl.int32), mask=valid, sem="relaxed")

    @triton.jit
    def _csr_pos_kernel(IDX, CUR, OFFS, POS, Sk, Sq, C, B, TOPK, stride_ib, stride_is, BLK: tl.constexpr):
        t = tl.program_id(0)
        b = tl.program_id(1)
        c = t // C
        segb = (c * B + b) * Sk
        base = tl.load(OFFS + c * B * Sk)
        ib = IDX + b * stride_ib + t * stride_is
        pb = POS + (b * Sq + t).to(tl.int64) * TOPK
        for k0 in range(0, TOPK, BLK):
            kk = k0 + tl.arange(0, BLK)
            km = kk < TOPK
            idx = tl.load(ib + kk, mask=km, other=-1)
            valid = km & (idx >= 0) & (idx < Sk)
            key = tl.where(valid, idx, 0).to(tl.int32)
            p = tl.atomic_add(CUR + segb + key, tl.full((BLK,), 1, tl.int32), mask=valid, sem="relaxed")
            tl.store(pb + kk, tl.where(valid, p - base, -1), mask=km)

    @triton.jit
    def _seg_reduce_kernel(
        PART, OFFS, OUT, Sk, seg0, stride_ob, stride_os,
        D: tl.constexpr, DA: tl.constexpr, D1: tl.constexpr, DB: tl.constexpr, D2: tl.constexpr,
        KB: tl.constexpr, R: tl.constexpr,
    ):
        """OUT[b, s, :D] += sum of PART rows [OFFS[seg] - base, OFFS[seg + 1] - base), for the
        KB keys s of this program (seg = seg0 + b * Sk + s, base = OFFS[seg0]); fp32 sums."""
        pid = tl.program_id(0)
        b = tl.program_id(1)
        base = tl.load(OFFS + seg0)
        d1 = tl.arange(0, D1)
        d1m = d1 < DA
        d2 = tl.arange(0, D2)
        d2m = d2 < DB
        r = tl.arange(0, R)
        for i in range(KB):
            s = pid * KB + i
            if s < Sk:
                seg = seg0 + b * Sk + s
                lo = tl.load(OFFS + seg) - base
                hi = tl.load(OFFS + seg + 1) - base
                if hi > lo:
                    acc1 = tl.zeros((R, D1), tl.float32)
                    acc2 = tl.zeros((R, D2), tl.float32)
                    for r0 in range(lo, hi, R):
                        rr = r0 + r
                        rm = rr < hi
                        rp = PART + rr.to(tl.int64)[:, None] * D
                        acc1 += tl.load(rp + d1[None, :], mask=rm[:, None] & d1m[None, :], other=0.0).to(tl.float32)
                        if DB > 0:
                            acc2 += tl.load(rp + DA + d2[None, :], mask=rm[:, None] & d2m[None, :], other=0.0).to(tl.float32)
                    op = OUT + b * stride_ob + s.to(tl.int64) * stride_os
                    o1 = tl.load(op + d1, mask=d1m, other=0.0)
                    tl.store(op + d1, o1 + tl.sum(acc1, axis=0), mask=d1m)
                    if DB > 0:
                        o2 = tl.load(op + DA + d2, mask=d2m, other=0.0)
                        tl.store(op + DA + d2, o2 + tl.sum(acc2, axis=0), mask=d2m)


@dataclass
class PairCSR:
    """Per-chunk key order of the (query, slot) pairs of an index tensor [B, Sq, K].

    pos [B, Sq, K] int32: the pair's row in its chunk's partial buffer (-1 for skipped slots);
    offs [NC * B * Sk + 1] int32: segment starts, segment (c, b, s) = (c * B + b) * Sk + s;
    C: query rows per chunk, NC chunks, rows: partial-buffer rows needed (C * B * K).
    """

    pos: torch.Tensor
    offs: torch.Tensor
    C: int
    NC: int
    Sk: int
    rows: int


_CACHE: dict = {}


def pair_budget() -> int:
    return PAIR_BUDGET_INTERP if interpreting() else PAIR_BUDGET


def build_csr(idx: torch.Tensor, Sk: int) -> PairCSR:
    """Counting sort of the pairs of ``idx`` (contiguous [B, Sq, K]) by (chunk, batch, key);
    cached on the tensor (same object, same version, same Sk and budget)."""
    B, Sq, K = idx.shape
    C = max(1, min(Sq, pair_budget() // max(B * K, 1)))
    key = (id(idx), idx.data_ptr(), idx._version, tuple(idx.shape), Sk, C)
    hit = _CACHE.get("csr")
    if hit is not None and hit[0] == key and hit[1]() is idx:
        return hit[2]
    NC = -(-Sq // C)
    G = NC * B * Sk
    assert G < 2**31 - 1 and B * Sq * K < 2**31 - 1, "index space too large for int32 CSR"
    dev = idx.device
    cnt = torch.zeros(G, dtype=torch.int32, device=dev)
    BLK = min(1024, next_pow2(K, 16))
    nw = 4
    if Sq:
        _csr_count_kernel[(Sq, B)](idx, cnt, Sk, C, B, K, idx.stride(0), idx.stride(1), BLK=BLK, num_warps=nw)
    offs = torch.zeros(G + 1, dtype=torch.int32, device=dev)
    torch.cumsum(cnt, 0, dtype=torch.int32, out=offs[1:])
    del cnt
    cur = offs[:-1].clone()
    pos = torch.empty(B, Sq, K, dtype=torch.int32, device=dev)
    if Sq:
        _csr_pos_kernel[(Sq, B)](idx, cur, offs, pos, Sk, Sq, C, B, K, idx.stride(0), idx.stride(1), BLK=BLK, num_warps=nw)
    del cur
    csr = PairCSR(pos=pos, offs=offs, C=C, NC=NC, Sk=Sk, rows=C * B * K)
    _CACHE["csr"] = (key, weakref.ref(idx), csr)
    weakref.finalize(idx, _drop, key)  # free pos / offs (1.1 GB at 128K) with the index tensor
    return csr


def _drop(key):
    hit = _CACHE.get("csr")
    if hit is not None and hit[0] == key:
        _CACHE.pop("csr", None)


def clear_cache():
    _CACHE.clear()


def seg_reduce(part: torch.Tensor, csr: PairCSR, c: int, out: torch.Tensor):
    """out [B, Sk, D] fp32 (contiguous rows) += per-key sums of chunk c's partial rows."""
    B, Sk, D = out.shape
    DA, D1, DB, D2 = split_pow2(D)
    KB = 4 if interpreting() else REDUCE_KB
    R = 8 if interpreting() else REDUCE_R
    nw = 4 if D1 + D2 > 128 else 2
    _seg_reduce_kernel[(triton.cdiv(Sk, KB), B)](
        part, csr.offs, out, Sk, c * B * Sk, out.stride(0), out.stride(1),
        D=D, DA=DA, D1=D1, DB=DB, D2=D2, KB=KB, R=R, num_warps=nw,
    )
