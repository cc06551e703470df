"""Shared helpers for the Triton kernels (import-safe without CUDA)."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: the package imports without it, ``available()`` says False.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernels can run: Triton importable and CUDA present, or TRITON_INTERPRET=1."""
    return HAS_TRITON and (torch.cuda.is_available() or interpreting())


# Backward kernels: multiply the fp32 score gradients in 3xTF32 instead of bf16 (see _dot_ds).
DS_3XTF32 = False

# Key-gradient reduction of the sparse backward kernels (attention dkv, KL dk_idx):
# "sorted" = per-pair rows written in key order + per-key segmented sums (no atomics, _csr.py);
# "atomic" = fp32 tl.atomic_add per element.  PART_FP32: keep the per-pair rows
# in fp32 (default: bf16 for bf16/fp8 inputs, fp32 for fp32 inputs).
REDUCE_MODE = "atomic"  # the sorted reduction measured slower on the H200 (attn_bwd 552 vs 536 ms at 128K)
# The KL backward's dk_idx only (rows of 128 instead of 576: predicted neutral, see
# benchmarks/NOTES.md, so the GPU-proven atomics stay the default); None = follow REDUCE_MODE.
KL_REDUCE_MODE = "atomic"
PART_FP32 = False


def reduce_sorted(kl: bool = False) -> bool:
    mode = REDUCE_MODE if not kl or KL_REDUCE_MODE is None else KL_REDUCE_MODE
    assert mode in ("sorted", "atomic"), mode
    return mode == "sorted"


def part_dtype(ieee: bool) -> torch.dtype:
    return torch.float32 if (ieee or PART_FP32) else torch.bfloat16


def next_pow2(n: int, lo: int = 1) -> int:
    n = max(int(n), lo)
    return 1 << (n - 1).bit_length()


def split_pow2(D: int) -> tuple[int, int, int, int]:
    """D as its largest power of two plus the rest (576 = 512 + 64, 160 = 128 + 32), each padded
    to a tile width: (DV, DV padded, DR, DR padded; 16 when DR is 0)."""
    DV = 1 << (D.bit_length() - 1)
    DR = D - DV
    return DV, next_pow2(DV, 16), DR, (next_pow2(DR, 16) if DR > 0 else 16)


def is_fp32(*ts: torch.Tensor) -> bool:
    return any(t.dtype in (torch.float32, torch.float64) for t in ts)


if HAS_TRITON:

    @triton.jit
    def _span(N, NP: tl.constexpr):
        """Offsets 0..NP-1 of a dimension of size N padded to the power of two NP, and their mask."""
        r = tl.arange(0, NP)
        return r, r < N

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """tl.dot with fp32 'ieee' precision when IEEE; UPCAST (interpreter only) computes low
        precision operands in fp32, working around the interpreter's broken bf16 dot."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _dot_ds(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr, DS_3XTF32: tl.constexpr):
        """fp32 gradient ``a`` times ``b``: in b's dtype (bf16 tensor cores) by default, or with
        ``a`` kept in fp32 through 3xTF32 when DS_3XTF32 (measured: no accuracy change against
        the reference, ~190 ms slower at 128K, see benchmarks/NOTES.md)."""
        if UPCAST or IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif DS_3XTF32:
            return tl.dot(a, b.to(tl.float32), input_precision="tf32x3")
        else:
            return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _atomic_add_f32(ptrs, vals, mask, MODE: tl.constexpr):
        """fp32 atomic add into global memory.  MODE 0: tl.atomic_add (relaxed); MODE 1: skip
        (timing experiments only); MODE 2: inline PTX ``red.global.add.v2.f32`` on pairs of
        adjacent elements (sm_90), falling back to scalar ``red`` when a pair is not contiguous
        or partly masked, so it is correct in any register layout."""
        if MODE == 0:
            tl.atomic_add(ptrs, vals, mask=mask, sem="relaxed")
        elif MODE == 2:
            tl.inline_asm_elementwise(
                asm="""{
                .reg .pred %pv, %p0, %p1;
                .reg .b64 %dd;
                setp.ne.s32 %p0, $4, 0;
                setp.ne.s32 %p1, $5, 0;
                sub.s64 %dd, $3, $2;
                setp.eq.s64 %pv, %dd, 4;
                and.pred %pv, %pv, %p0;
                and.pred %pv, %pv, %p1;
                @%pv red.global.add.v2.f32 [$2], {$6, $7};
                not.pred %pv, %pv;
                and.pred %p0, %p0, %pv;
                and.pred %p1, %p1, %pv;
                @%p0 red.global.add.f32 [$2], $6;
                @%p1 red.global.add.f32 [$3], $7;
                mov.u32 $0, 0;
                mov.u32 $1, 0;
                }""",
                constraints="=r,=r,l,l,r,r,f,f",
                args=[ptrs.to(tl.int64), mask.to(tl.int32), vals.to(tl.float32)],
                dtype=tl.int32,
                is_pure=False,
                pack=2,
            )
else:  # pragma: no cover
    _span = None
    _dot = None
    _dot_ds = None
    _atomic_add_f32 = None
