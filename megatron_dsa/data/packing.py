"""Packed sequences: the documents inside a batch of corpus samples, in megatron-core's THD form.

A sample of ``GPTDataset`` is ``seq_length`` tokens cut from the concatenation of documents,
each ending with the EOD token. Packing keeps the tokens where they are and tells the model
where each document starts: the micro-batch's rows are laid end to end into one row (THD:
tokens of all sequences, one batch row), with ``cu_seqlens`` the boundaries of every document
piece, a row's end always being one. A document piece starts after each EOD and at the start
of each row, so attention, RoPE positions and the DSA indexer never cross a document.

Why THD rather than Megatron-LM's ``--reset-attention-mask``: that flag builds a dense
[S, S] mask per sample, which the DSA core does not take (its kernels and top-k follow a
causal rule, ``reference.causal_mask``, plus document ids) and which grows as S^2; THD hands
megatron-core's MLA (its RoPE restarts per document) and our core the same boundaries.

The loss: the label of an EOD token is the first token of the next document, which its own
document cannot predict; those positions are masked (Megatron's ``--eod-mask-loss`` rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """One micro-batch as one THD row: every tensor is [1, B * S] (positions restart per
    document); ``cu_seqlens`` [documents + 1] int32, from 0 to B * S."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())


def document_boundaries(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Start of every document piece of the rows laid end to end, and the end: tokens [B, S]
    -> cu_seqlens [n + 1] int32 (a piece starts at each row start and after each EOD)."""
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"packing takes tokens [batch, seq_length], got shape {tuple(tokens.shape)}")
    B, S = tokens.shape
    starts = torch.zeros(B, S, dtype=torch.bool, device=tokens.device)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    flat = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([B * S], device=tokens.device)
    return torch.cat([flat, end]).to(torch.int32)


def pack_batch(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, eod: int) -> PackedBatch:
    """A batch of samples [B, S] as one THD row of documents (see the module docstring)."""
    cu = document_boundaries(tokens, eod)
    total = tokens.numel()
    rows = torch.arange(total, device=tokens.device)
    # Each row's position inside its document: its offset from the start of its piece.
    piece = torch.searchsorted(cu[1:].to(torch.long), rows, right=True)
    positions = rows - cu.to(torch.long)[piece]
    mask = loss_mask.reshape(1, total) * (tokens.reshape(1, total) != eod)
    return PackedBatch(tokens.reshape(1, total), labels.reshape(1, total), mask, positions[None], cu)


def unsplittable_documents(prefix: str, multiple: int) -> tuple[int, int, int | None]:
    """Documents of an indexed dataset whose length is not a multiple of ``multiple`` (context
    parallelism over packed sequences cuts each document into 2 * CP equal chunks):
    (how many, of how many, the length of the first such)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    # A copy: the lengths are a view of the index's memory map, unmapped with the dataset.
    lengths = dataset.sequence_lengths.copy()
    del dataset
    bad = lengths[lengths % multiple != 0]
    return len(bad), len(lengths), (int(bad[0]) if len(bad) else None)
