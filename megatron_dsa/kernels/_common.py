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


LOG2E = 1.4426950408889634  # the kernels' softmaxes run in base 2: scores times scale * LOG2E


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernels can run: Triton importable and CUDA present, or TRITON_INTERPRET=1."""
    return HAS_TRITON and (torch.cuda.is_available() or interpreting())


def next_pow2(n: int, lo: int = 1) -> int:
    n = max(int(n), lo)
    return 1 << (n - 1).bit_length()


def split_pow2(D: int) -> tuple[int, int, int, int]:
    """D as its largest power of two plus the rest (576 = 512 + 64, 160 = 128 + 32), each padded
    to a tile width: (DV, DV padded, DR, DR padded; 16 when DR is 0)."""
    DV = 1 << (D.bit_length() - 1)
    DR = D - DV
    return DV, next_pow2(DV, 16), DR, (next_pow2(DR, 16) if DR > 0 else 16)


# Hopper's e4m3 tensor-core products take a reduction dimension of at least 32: FP8 scoring pads
# a narrower indexer head dim to it (Triton does not compile a smaller one).
FP8_MIN_K = 32


def rows_within(budget_bytes: int, row_bytes: int) -> int:
    """How many rows of ``row_bytes`` each one chunk of a temporary holds within ``budget_bytes``
    (at least one): the kernels' row-chunked buffers, sized from ``KernelOptions.workspace_bytes``."""
    return max(1, budget_bytes // max(1, row_bytes))


def is_fp32(*ts: torch.Tensor) -> bool:
    return any(t.dtype in (torch.float32, torch.float64) for t in ts)


def selection(idx: torch.Tensor) -> torch.Tensor:
    """A top-k selection as the kernels read it: int32 (-1 padded), contiguous. One dtype: an
    int64 selection would compile a second variant of each kernel and double the bytes that the
    sparse attention and the KL keep for their backward."""
    if idx.dtype != torch.int32:
        raise TypeError(f"a top-k selection is int32 (reference.indexer_topk's), got {idx.dtype}")
    return idx.contiguous()


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
    def _dot_ds(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 gradient ``a`` times ``b`` in b's dtype (bf16 tensor cores; fp32 when IEEE). Keeping
        ``a`` in fp32 through 3xTF32 measured no more accurate against the reference and slower."""
        if UPCAST or IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _softmax_step(s, v, valid, scale_log2, m_i, l_i, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """One block of keys into a running (flash) softmax: logits ``s`` [M, N] (masked by
        ``valid`` [N], scaled to base 2), values ``v`` [N, D]; returns the new (max, sum, acc)."""
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays empty
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
        return m_new, l_i, acc

    @triton.jit
    def _softmax_finish(m_i, l_i, acc):
        """The output and natural-log log-sum-exp of a running softmax; a row that saw no key
        gives 0 and -inf (no NaN)."""
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        return out, lse

else:  # pragma: no cover
    _span = None
    _dot = None
    _dot_ds = None
    _softmax_step = None
    _softmax_finish = None
