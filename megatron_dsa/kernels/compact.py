"""A selection kept for the backward in 16 bits a key, one pass each way: the encoding of
``reference.compact_selection`` (the keys' low halves and, per row, where each block of 2^16
keys ends).

One program a row: packing reads the row once and writes its low halves, its block ends and
whether it can be packed (ascending keys, the padding last); unpacking reads the low halves and
the ends and writes the int32 row. A training step packs each layer's selection after its
forward and unpacks it at the start of its backward, so both are a read and a write of the
selection's bytes.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_dsa.reference import SELECTION_KEY_BLOCK_BITS, selection_key_blocks

from ._common import HAS_TRITON, next_pow2, selection, tl, triton

if HAS_TRITON:

    @triton.jit
    def _compact_kernel(idx_ptr, low_ptr, ends_ptr, bad_ptr, K, BLOCKS, BITS: tl.constexpr, KP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, KP)
        inside = r < K
        key = tl.load(idx_ptr + row * K + r, mask=inside, other=-1)
        nxt = tl.load(idx_ptr + row * K + r + 1, mask=r + 1 < K, other=-1)
        # ascending keys, then only padding; every key below the last block's end
        ordered = (nxt == -1) | ((key >= 0) & (nxt > key))
        fits = (key >= -1) & ((key >> BITS) < BLOCKS)
        bad = tl.sum((inside & ~(ordered & fits)).to(tl.int32), axis=0)
        tl.store(bad_ptr + row, (bad > 0).to(tl.int8))
        tl.store(low_ptr + row * K + r, key.to(tl.int16), mask=inside)  # truncation keeps the low half
        for j in range(BLOCKS):
            below = (key >= 0) & ((key >> BITS) <= j)
            tl.store(ends_ptr + row * BLOCKS + j, tl.sum(below.to(tl.int32), axis=0))

    @triton.jit
    def _expand_kernel(low_ptr, ends_ptr, out_ptr, K, BLOCKS, BITS: tl.constexpr, KP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, KP)
        inside = r < K
        key = tl.load(low_ptr + row * K + r, mask=inside, other=0).to(tl.int32) & ((1 << BITS) - 1)
        for j in range(BLOCKS - 1):  # a slot past block j's keys holds a later block's key
            key += tl.where(r >= tl.load(ends_ptr + row * BLOCKS + j), 1 << BITS, 0)
        key = tl.where(r >= tl.load(ends_ptr + row * BLOCKS + BLOCKS - 1), -1, key)
        tl.store(out_ptr + row * K + r, key, mask=inside)


def _warps(KP: int) -> int:
    return max(1, min(8, KP // 256))


def compact_selection(idx: torch.Tensor, n_keys: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``reference.compact_selection``: (low [B, S, K] int16, ends [B, S, blocks] int32), or
    None when a row cannot be packed exactly. One host sync for that answer."""
    B, S, K = idx.shape
    if K == 0 or idx.numel() == 0:
        return None
    idx = selection(idx)
    blocks = selection_key_blocks(n_keys)
    low = torch.empty(B, S, K, dtype=torch.int16, device=idx.device)
    ends = torch.empty(B, S, blocks, dtype=torch.int32, device=idx.device)
    bad = torch.empty(B * S, dtype=torch.int8, device=idx.device)
    KP = next_pow2(K)
    _compact_kernel[(B * S,)](idx, low, ends, bad, K, blocks, BITS=SELECTION_KEY_BLOCK_BITS, KP=KP,
                              num_warps=_warps(KP))
    return None if bool(bad.any()) else (low, ends)


def expand_selection(low: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``reference.expand_selection``: the int32 selection [B, S, K] that (low, ends) store."""
    B, S, K = low.shape
    out = torch.empty(B, S, K, dtype=torch.int32, device=low.device)
    if out.numel() == 0:
        return out
    KP = next_pow2(K)
    _expand_kernel[(B * S,)](low.contiguous(), ends.contiguous(), out, K, ends.shape[-1],
                             BITS=SELECTION_KEY_BLOCK_BITS, KP=KP, num_warps=_warps(KP))
    return out
