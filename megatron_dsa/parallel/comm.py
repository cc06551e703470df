"""Process groups, the TP/CP row layouts and the few collectives DSA needs.

Every collective here works on gloo (CPU) and NCCL. Tensors are batch first ([B, S, ...]);
"rows" are the sequence dim (dim 1). Byte counters: every function that moves data adds the
bytes this rank RECEIVES to ``CommStats`` (one global instance, ``STATS``) so tests and the
accounting script can read real traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dsa.config import DSAConfigError


# --------------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """Bytes received by this rank, per named collective (forward and backward)."""

    bytes: dict = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        self.bytes[name] = self.bytes.get(name, 0) + int(nbytes)

    def reset(self) -> None:
        self.bytes.clear()

    def total(self) -> int:
        return sum(self.bytes.values())


STATS = CommStats()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# --------------------------------------------------------------------------------------------
# The parallel context of one DSA layer
# --------------------------------------------------------------------------------------------


@dataclass
class ParallelContext:
    """TP and CP groups (None = size 1) with this rank's coordinates. ``ParallelContext()`` is
    one rank: sizes 1, and every collective below returns its input (no torch.distributed)."""

    tp_group: Optional[dist.ProcessGroup] = None
    cp_group: Optional[dist.ProcessGroup] = None

    tp_size = property(lambda self: _size(self.tp_group))
    tp_rank = property(lambda self: _rank(self.tp_group))
    cp_size = property(lambda self: _size(self.cp_group))
    cp_rank = property(lambda self: _rank(self.cp_group))

    @property
    def parallel(self) -> bool:
        return self.tp_size > 1 or self.cp_size > 1

    @classmethod
    def from_megatron(cls, pg_collection=None) -> "ParallelContext":
        """The TP and CP groups megatron-core's parallel state (or a pg_collection) holds."""
        tp = cp = None
        if pg_collection is not None:
            tp, cp = getattr(pg_collection, "tp", None), getattr(pg_collection, "cp", None)
        if (tp is None or cp is None) and parallel_state.model_parallel_is_initialized():
            tp = tp or parallel_state.get_tensor_model_parallel_group()
            cp = cp or parallel_state.get_context_parallel_group()
        if tp is not None and dist.get_world_size(tp) == 1:
            tp = None
        if cp is not None and dist.get_world_size(cp) == 1:
            cp = None
        return cls(tp_group=tp, cp_group=cp)


# --------------------------------------------------------------------------------------------
# Layouts: megatron-core's load-balanced CP chunks and the causally balanced TP row blocks
# --------------------------------------------------------------------------------------------
#
# megatron.core.utils._get_batch_on_this_cp_rank_per_sequence_balancing splits the sequence
# into 2 * CP equal chunks; CP rank r holds chunks r and 2*CP-1-r, in that order (the same
# split get_pos_emb_on_this_cp_rank applies to the rotary table). The TP-sharded indexer uses
# the same pairing for its row blocks (``parallel.sharded.indexer_rows``).


def balanced_blocks(size: int, rank: int) -> tuple[int, int]:
    """The two of 2*size equal blocks that rank ``rank`` of ``size`` takes: r and 2*size-1-r.

    Causal work grows with a row's position, so pairing an early block with a late one gives
    every rank the same share: megatron's CP chunks, and the rows each TP rank's indexer scores
    (the sequence-parallel shard, blocks 2r and 2r+1, would leave the last of TP ranks
    (2TP-1)/TP^2 of the work, 3/4 at TP=2).
    """
    return rank, 2 * size - 1 - rank


def check_cp_length(seq_len: int, cp_size: int) -> None:
    """megatron's CP layout cuts the sequence into 2 * CP equal chunks."""
    if cp_size > 1 and seq_len % (2 * cp_size):
        raise DSAConfigError(
            f"invalid DSA configuration: context parallel needs the sequence length ({seq_len}) "
            f"divisible by 2 * context_parallel_size ({2 * cp_size})"
        )


def check_tp_rows(rows: int, tp_size: int) -> None:
    """Sequence parallel splits a CP rank's rows evenly over the TP ranks."""
    if tp_size > 1 and rows % tp_size:
        raise DSAConfigError(
            f"invalid DSA configuration: {rows} rows per context-parallel rank do not split over "
            f"tensor_model_parallel_size={tp_size} (sequence parallel)"
        )


def global_sequence_length(local_rows: int, tp_size: int, cp_size: int, sequence_parallel_rows: bool) -> int:
    """The whole sequence's length from this rank's rows (``sequence_parallel_rows``: the rows
    are one TP rank's sequence-parallel shard); DSAConfigError when the TP/CP layout cannot
    hold it. Checked before megatron splits its rotary table over CP, which would fail with an
    opaque reshape error."""
    seq = local_rows * cp_size * (tp_size if sequence_parallel_rows else 1)
    check_cp_length(seq, cp_size)
    check_tp_rows(seq // cp_size, tp_size)
    return seq


def _documents_of(seq_len: int, cu_seqlens: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) of each document; an unpacked sequence is one document."""
    if cu_seqlens is None:
        return [(0, seq_len)]
    bounds = [int(b) for b in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def check_cp_documents(seq_len: int, cp_size: int, cu_seqlens: Optional[torch.Tensor]) -> None:
    """megatron's packed (THD) CP layout cuts every document into 2 * CP equal chunks."""
    if cu_seqlens is None or cp_size == 1:
        return
    for start, end in _documents_of(seq_len, cu_seqlens):
        if (end - start) % (2 * cp_size):
            raise DSAConfigError(
                f"invalid DSA configuration: context parallel over packed sequences needs every "
                f"document padded to a multiple of 2 * context_parallel_size ({2 * cp_size}); "
                f"rows {start}..{end} hold {end - start} (pass megatron's cu_seqlens_q_padded)"
            )


def cp_positions(seq_len: int, cp_size: int, cp_rank: int, device=None,
                 cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global positions [seq_len / cp_size] of the tokens CP rank ``cp_rank`` holds.

    ``cu_seqlens``: the document boundaries of a packed sequence, whose CP layout (megatron's
    THD one) splits each document into 2 * CP chunks and gives rank r chunks r and 2CP-1-r of
    every document; without it the whole sequence is one document.
    """
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        check_cp_length(seq_len, cp_size)
    check_cp_documents(seq_len, cp_size, cu_seqlens)
    a, b = balanced_blocks(cp_size, cp_rank)
    parts = []
    for start, end in _documents_of(seq_len, cu_seqlens):
        c = (end - start) // (2 * cp_size)
        parts += [torch.arange(start + a * c, start + (a + 1) * c), torch.arange(start + b * c, start + (b + 1) * c)]
    return torch.cat(parts).to(device)


def cp_split(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1,
             cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This CP rank's part of a full-sequence tensor (megatron's layout), as get_batch does."""
    if cp_size == 1:
        return x
    if cu_seqlens is not None:
        return x.index_select(dim, cp_positions(x.shape[dim], cp_size, cp_rank, x.device, cu_seqlens))
    a, b = balanced_blocks(cp_size, cp_rank)
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat((chunks[a], chunks[b]), dim=dim)


def cp_owner(pos: torch.Tensor, seq_len: int, cp_size: int,
             cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner CP rank, row on the owner) of global positions ``pos``."""
    if cu_seqlens is not None:
        owner = torch.empty(seq_len, dtype=torch.long, device=pos.device)
        local = torch.empty(seq_len, dtype=torch.long, device=pos.device)
        for r in range(cp_size):
            held = cp_positions(seq_len, cp_size, r, pos.device, cu_seqlens)
            owner[held] = r
            local[held] = torch.arange(held.numel(), device=pos.device)
        return owner[pos], local[pos]
    c = seq_len // (2 * cp_size)
    chunk = pos // c
    first = chunk < cp_size
    owner = torch.where(first, chunk, 2 * cp_size - 1 - chunk)
    local = torch.where(first, pos - chunk * c, c + pos - chunk * c)
    return owner, local


def to_global_order(x_cat: torch.Tensor, seq_len: int, cp_size: int, dim: int = 1,
                    cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reorder a CP all-gather (rank 0's rows, rank 1's rows, ...) into global position order."""
    if cp_size == 1:
        return x_cat
    pos = torch.cat([cp_positions(seq_len, cp_size, r, cu_seqlens=cu_seqlens) for r in range(cp_size)])
    inv = torch.argsort(pos).to(x_cat.device)
    return x_cat.index_select(dim, inv)


# --------------------------------------------------------------------------------------------
# Collectives with autograd
# --------------------------------------------------------------------------------------------


class _AllGatherRows(torch.autograd.Function):
    """All-gather along ``dim`` (rank order); backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim, name):
        ctx.group, ctx.dim, ctx.name = group, dim, name
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        STATS.add(name, _nbytes(x) * (world - 1))
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(world, dim=ctx.dim)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        STATS.add(ctx.name + ".bwd", _nbytes(out) * (world - 1))
        return out, None, None, None


def all_gather_rows(x: torch.Tensor, group, dim: int = 1, name: str = "all_gather") -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllGatherRows.apply(x, group, dim, name)
    with torch.no_grad():
        return _AllGatherRows.forward(_Ctx(), x, group, dim, name)


class _Ctx:
    """A stand-in autograd ctx for calling a Function's forward without autograd."""


def reduce_scatter_rows(x: torch.Tensor, group, dim: int = 1, name: str = "reduce_scatter") -> torch.Tensor:
    """Sum over the group, then keep this rank's equal share of ``dim`` (no autograd)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    world = dist.get_world_size(group)
    parts = [p.contiguous() for p in x.chunk(world, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    STATS.add(name, _nbytes(out) * (world - 1))
    return out


def all_to_all_list(send: list[torch.Tensor], group, name: str, recv_shapes=None) -> list[torch.Tensor]:
    """Exchange one tensor per peer (variable first-dim sizes); ``send[j]`` goes to rank j."""
    rank = dist.get_rank(group)
    if recv_shapes is None:
        counts = torch.tensor([t.shape[0] for t in send], dtype=torch.long, device=send[0].device)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        tail = tuple(send[0].shape[1:])
        recv_shapes = [(int(n),) + tail for n in recv_counts.tolist()]
    # One all_to_all_single with split sizes (alltoallv): works on gloo and NCCL alike.
    flat_in = torch.cat([t.reshape(-1) for t in send])
    out_sizes = [int(torch.Size(s).numel()) for s in recv_shapes]
    flat_out = torch.empty(sum(out_sizes), dtype=send[0].dtype, device=send[0].device)
    dist.all_to_all_single(
        flat_out, flat_in, output_split_sizes=out_sizes,
        input_split_sizes=[t.numel() for t in send], group=group,
    )
    recv = [r.view(s) for r, s in zip(flat_out.split(out_sizes), recv_shapes)]
    STATS.add(name, sum(_nbytes(t) for j, t in enumerate(recv) if j != rank))
    return recv


def _move_blocks(x: torch.Tensor, have, want, group, name: str) -> torch.Tensor:
    """Row blocks between ranks. Rows (dim 1) are numbered blocks of equal size; ``x`` holds
    blocks ``have(rank)`` in that order, and each rank j ends with ``want(j)`` in that order.
    One all-to-all; peers send their blocks in ascending block number."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = list(have(rank))
    h = x.shape[1] // len(mine)
    rows_first = x.transpose(0, 1)  # [rows, B, ...]: all_to_all_list splits dim 0
    block = {b: rows_first[i * h:(i + 1) * h] for i, b in enumerate(mine)}
    send = [torch.cat([block[b] for b in sorted(mine) if b in want(j)] or [rows_first[:0]]).contiguous()
            for j in range(world)]
    wanted = list(want(rank))
    tail = tuple(rows_first.shape[1:])
    from_peer = [[b for b in sorted(wanted) if b in have(j)] for j in range(world)]
    recv = all_to_all_list(send, group, name, recv_shapes=[(h * len(f),) + tail for f in from_peer])
    got = {b: t[i * h:(i + 1) * h] for f, t in zip(from_peer, recv) for i, b in enumerate(f)}
    return torch.cat([got[b] for b in wanted]).transpose(0, 1).contiguous()


class _MoveBlocks(torch.autograd.Function):
    """``_move_blocks`` with autograd: the gradient goes back the same way reversed."""

    @staticmethod
    def forward(ctx, x, have, want, group, name):
        ctx.args = (have, want, group, name)
        return _move_blocks(x, have, want, group, name)

    @staticmethod
    def backward(ctx, grad):
        have, want, group, name = ctx.args
        return _move_blocks(grad.contiguous(), want, have, group, name + ".bwd"), None, None, None, None


def move_blocks(x: torch.Tensor, have, want, group, name: str) -> torch.Tensor:
    """Re-distribute row blocks over ``group`` (see ``_move_blocks``); differentiable."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _MoveBlocks.apply(x, have, want, group, name)
    return _move_blocks(x, have, want, group, name)


def heads_to_rows(q: torch.Tensor, group, name: str = "tp.q_heads_to_rows", blocks=None) -> torch.Tensor:
    """[B, S, H/TP, D] (all rows, local heads) -> [B, S/TP, H, D] (own rows, all heads).

    ``blocks(j)``: rank j's rows as block numbers of 2*TP equal blocks (None: the contiguous
    shard j). One all-to-all, no autograd (used for the detached KL target only).
    """
    if group is None or dist.get_world_size(group) == 1:
        return q
    world = dist.get_world_size(group)
    if blocks is None:
        send = [p.contiguous() for p in q.chunk(world, dim=1)]
    else:
        parts = q.chunk(2 * world, dim=1)
        send = [torch.cat([parts[b] for b in blocks(j)], dim=1).contiguous() for j in range(world)]
    shape = tuple(send[0].shape)
    recv = all_to_all_list(
        [s.flatten() for s in send], group, name, recv_shapes=[(send[0].numel(),)] * len(send)
    )
    return torch.cat([r.view(shape) for r in recv], dim=2)
