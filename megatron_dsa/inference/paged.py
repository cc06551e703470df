"""A paged cache for decoding: per layer, the MLA latent rows and the indexer keys of every cached
token, in a fixed pool of fixed-size blocks with a block table per sequence (as vLLM and FlashMLA
lay them out; the layout is described in ``reference``'s "Decoding over a paged cache").

    latent rows   [num_blocks, block_size, kv_lora_rank + rope]   the activations' dtype
    indexer keys  [num_blocks, block_size, DI]  e4m3 with an fp32 scale per token
                  (``key_scales`` [num_blocks, block_size], as DeepSeek-V3.2's inference code
                  caches them), or bf16 / fp32 (``key_format``); only layers that run an indexer

Blocks come from one pool shared by the sequences. ``reserve`` takes the blocks a step's new
tokens need for every sequence at once, or raises one ``CacheError`` (out of blocks, a position
beyond the model's or the cache's maximum length) before anything is allocated or computed.
The lengths and the block table live on the device too, so a decode step reads them there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_dsa import ops
from megatron_dsa import reference as R

KEY_FORMATS = ("fp8", "bf16", "fp32")


class CacheError(ValueError):
    """A step the cache cannot hold: out of blocks, or a position past the maximum length."""


class PagedCache:
    def __init__(self, *, num_layers: int, indexer_layers: Sequence[int], latent_dim: int, indexer_dim: int,
                 num_blocks: int, block_size: int, max_sequences: int, max_length: int, model_max_length: int,
                 dtype: torch.dtype, key_format: str = "fp8", device: torch.device | str = "cpu"):
        if key_format not in KEY_FORMATS:
            raise CacheError(f"indexer key format must be one of {KEY_FORMATS}, got {key_format!r}")
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("max_sequences", max_sequences),
                            ("max_length", max_length)):
            if value < 1:
                raise CacheError(f"{name} must be >= 1, got {value}")
        self.block_size, self.num_blocks, self.key_format = block_size, num_blocks, key_format
        self.max_length = min(max_length, model_max_length)
        self.model_max_length = model_max_length
        key_dtype = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}[key_format]
        pool = lambda *shape, dt: torch.zeros(num_blocks, block_size, *shape, dtype=dt, device=device)  # noqa: E731
        self.kv = [pool(latent_dim, dt=dtype) for _ in range(num_layers)]
        self.keys: list[Optional[torch.Tensor]] = [
            pool(indexer_dim, dt=key_dtype) if i in indexer_layers else None for i in range(num_layers)]
        self.key_scales: list[Optional[torch.Tensor]] = [
            pool(dt=torch.float32) if (i in indexer_layers and key_format == "fp8") else None for i in range(num_layers)]
        self.max_blocks = -(-self.max_length // block_size)
        self.block_table = torch.zeros(max_sequences, self.max_blocks, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(max_sequences, dtype=torch.int32, device=device)
        self.host_lengths = [0] * max_sequences
        self._blocks: list[list[int]] = [[] for _ in range(max_sequences)]
        self._free = list(range(num_blocks - 1, -1, -1))
        self._active = [False] * max_sequences

    # ---- sequences and blocks ---------------------------------------------------------------

    def add_sequence(self) -> int:
        for seq, used in enumerate(self._active):
            if not used:
                self._active[seq] = True
                return seq
        raise CacheError(f"the cache holds at most {len(self._active)} sequences; release one first")

    def release(self, seq: int):
        self._free.extend(reversed(self._blocks[seq]))
        self._blocks[seq] = []
        self._active[seq] = False
        self.host_lengths[seq] = 0
        self.lengths[seq] = 0

    def free_blocks(self) -> int:
        return len(self._free)

    def reserve(self, seqs: Sequence[int], counts: Sequence[int]):
        """Make room for ``counts[i]`` new tokens of sequence ``seqs[i]``, all or none."""
        need = 0
        for seq, count in zip(seqs, counts):
            if not self._active[seq]:
                raise CacheError(f"sequence {seq} is not in the cache")
            last = self.host_lengths[seq] + count - 1
            if last >= self.model_max_length:
                raise CacheError(f"sequence {seq}: position {last} is beyond the model's maximum length "
                                 f"{self.model_max_length}")
            if last >= self.max_length:
                raise CacheError(f"sequence {seq}: position {last} is beyond this cache's maximum length "
                                 f"{self.max_length}")
            need += -(-(last + 1) // self.block_size) - len(self._blocks[seq])
        if need > len(self._free):
            raise CacheError(f"out of cache blocks: this step needs {need} more blocks of {self.block_size} tokens, "
                             f"{len(self._free)} of {self.num_blocks} are free")
        for seq, count in zip(seqs, counts):
            blocks = self._blocks[seq]
            first = len(blocks)
            while len(blocks) * self.block_size < self.host_lengths[seq] + count:
                blocks.append(self._free.pop())
            if len(blocks) > first:
                self.block_table[seq, first : len(blocks)] = torch.tensor(blocks[first:], dtype=torch.int32)

    def advance(self, seqs: Sequence[int], counts: Sequence[int]):
        """Count the reserved new tokens as cached (host and device lengths)."""
        for seq, count in zip(seqs, counts):
            self.host_lengths[seq] += count
        index = torch.tensor(list(seqs), dtype=torch.long)
        self.lengths[index.to(self.lengths.device)] = torch.tensor(
            [self.host_lengths[s] for s in seqs], dtype=torch.int32).to(self.lengths.device)

    # ---- rows --------------------------------------------------------------------------------

    def slots(self, seqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat row numbers in the pool of tokens ``positions`` [B, N] of sequences ``seqs`` [B]
        (device tensors; no host synchronisation)."""
        table = self.block_table[seqs].long()
        blocks = torch.gather(table, 1, positions.long() // self.block_size)
        return blocks * self.block_size + positions.long() % self.block_size

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, keys: Optional[torch.Tensor]):
        """Store the latent rows [N, Dqk] (and indexer keys [N, DI]) of the tokens at ``slots`` [N]."""
        kv = self.kv[layer]
        kv.view(-1, kv.shape[-1])[slots] = latent.to(kv.dtype)
        if keys is None or self.keys[layer] is None:
            return
        pool = self.keys[layer].view(-1, keys.shape[-1])
        if self.key_format == "fp8":
            k8, scale = ops.fp8_quantize(keys.float()[None])  # [1, N, DI]: the quantiser's batch-first layout
            pool[slots] = k8[0]
            self.key_scales[layer].view(-1)[slots] = scale[0]
        else:
            pool[slots] = keys.to(pool.dtype)

    def rows(self, layer: int, seq: int, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The first ``n`` cached latent rows [1, n, Dqk] of a sequence and its indexer keys
        [1, n, DI] in fp32 (dequantised), None for a layer without keys."""
        table = self.block_table[seq : seq + 1]
        pos = torch.arange(n, device=table.device)[None]
        latent = R.paged_rows(self.kv[layer], table, pos)
        if self.keys[layer] is None:
            return latent, None
        scales = None if self.key_scales[layer] is None else R.paged_rows(self.key_scales[layer], table, pos)
        return latent, R.dequantize_keys(R.paged_rows(self.keys[layer], table, pos), scales)

    def nbytes(self) -> int:
        """Bytes of the cached tokens' rows (latent rows, indexer keys and their scales)."""
        per_token = sum(t.shape[-1] * t.element_size() if t.dim() == 3 else t.element_size()
                        for ts in (self.kv, self.keys, self.key_scales) for t in ts if t is not None)
        return per_token * sum(self.host_lengths)
