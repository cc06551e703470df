"""The DSA core attention under tensor (+ sequence) and context parallelism.

``parallel_dsa_core`` is the whole layer-level computation, plain tensors in and out, built
from the ops of ``megatron_dsa.ops`` (the PyTorch reference, or the Triton kernels on CUDA: the
same functions with the same signatures) plus the collectives of ``megatron_dsa.parallel.comm`` /
``fetch``. What each rank holds (batch first):

    q       [B, S_cp, H/TP, Dqk]   absorbed queries: all CP-local rows, LOCAL heads
    kv      [B, S_cp, Dqk]         latent KV entries of the CP-local rows (MLA gathered them over TP)
    qi, wi  [B, S_cp/TP, HI, DI], [B, S_cp/TP, HI]   indexer queries / weights of OWN rows
    ki      [B, S_cp/TP, DI]       indexer keys of OWN rows

S_cp = S / CP rows in megatron's load-balanced layout (chunks r and 2CP-1-r); own rows are the
sequence-parallel shard tp_rank of those. See the package docstring for the design and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_dsa import reference as R
from megatron_dsa.parallel.comm import (
    ParallelContext,
    all_gather_rows,
    cp_positions,
    heads_to_rows,
    move_blocks,
    reduce_scatter_rows,
    to_global_order,
)
from megatron_dsa.parallel.fetch import fetch_selected
from megatron_dsa.parallel.topk import streaming_topk


@dataclass
class CoreResult:
    out: torch.Tensor  # [B, S_cp, H/TP, v_dim]
    kl: Optional[torch.Tensor] = None  # [B, S_cp/TP] own rows
    recall: Optional[torch.Tensor] = None  # [B, S_cp/TP] own rows
    topk: Optional[torch.Tensor] = None  # [B, S_cp, K] GLOBAL positions (-1 padded)
    flops: list = field(default_factory=lambda: [0])  # indexer scoring FLOPs on this rank


def own_rows(ctx: ParallelContext, s_cp: int) -> slice:
    if s_cp % ctx.tp_size:
        raise ValueError(f"{s_cp} rows per CP rank do not split over {ctx.tp_size} TP ranks")
    n = s_cp // ctx.tp_size
    return slice(ctx.tp_rank * n, (ctx.tp_rank + 1) * n)


def balanced_blocks(tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The two of 2*TP equal row blocks whose indexer work (top-k, dense KL) this TP rank does:
    r and 2TP-1-r.

    Causal scoring costs a row time in proportion to its position, so the SP shard (blocks
    2r and 2r+1) would leave the last rank (2TP-1)/TP^2 of the work (3/4 at TP=2). Pairing an
    early block with a late one gives every rank the same share, as CP's chunk layout does.
    The rows' queries and weights move there and back in one all-to-all each.
    """
    return tp_rank, 2 * tp_size - 1 - tp_rank


def sp_blocks(tp_rank: int) -> tuple[int, int]:
    return 2 * tp_rank, 2 * tp_rank + 1  # the sequence-parallel shard, as blocks of 2*TP


def can_balance(ctx: ParallelContext, own_row_count: int) -> bool:
    return ctx.tp_size > 1 and own_row_count % 2 == 0


def rows_to_balanced(x: torch.Tensor, ctx: ParallelContext, name: str) -> torch.Tensor:
    """Own SP rows [B, n, ...] -> this rank's balanced rows (blocks r, 2TP-1-r); differentiable."""
    tp = ctx.tp_size
    return move_blocks(x, sp_blocks, lambda j: balanced_blocks(tp, j), ctx.tp_group, name)


def balanced_to_own(x: torch.Tensor, ctx: ParallelContext, name: str) -> torch.Tensor:
    """The inverse of ``rows_to_balanced``; differentiable."""
    tp = ctx.tp_size
    return move_blocks(x, lambda j: balanced_blocks(tp, j), sp_blocks, ctx.tp_group, name)


def balanced_positions(q_pos: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Positions of this rank's balanced rows, from those of all CP-local rows."""
    h = q_pos.shape[0] // (2 * ctx.tp_size)
    return torch.cat([q_pos[b * h:(b + 1) * h] for b in balanced_blocks(ctx.tp_size, ctx.tp_rank)])


def indexer_rows(qi, wi, q_pos, ctx: ParallelContext, rows: slice):
    """The indexer queries, weights and positions of the rows this TP rank scores:
    (qi, wi, positions, balanced). Balanced blocks where the own row count splits in two
    (``rows_to_balanced``: differentiable), else the own SP ``rows`` as they are."""
    if not can_balance(ctx, qi.shape[1]):
        return qi, wi, q_pos[rows], False
    return (rows_to_balanced(qi, ctx, "tp.indexer_q_balance"), rows_to_balanced(wi, ctx, "tp.indexer_w_balance"),
            balanced_positions(q_pos, ctx), True)


def balanced_to_rows(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """A TP all-gather of balanced rows (rank order: blocks 0, 2TP-1, 1, 2TP-2, ...) [B, S_cp, ...]
    -> the rows in order."""
    B, n = x.shape[:2]
    v = x.reshape(B, tp_size, 2, n // (2 * tp_size), *x.shape[2:])
    return torch.cat((v[:, :, 0], v[:, :, 1].flip(1)), dim=1).reshape(x.shape)


def tp_indexer_topk(ops, qi, ki_global, wi, q_pos, topk: int, ctx: ParallelContext, flops: list,
                    fp8: bool = False, shards=None) -> torch.Tensor:
    """The top-k of every CP-local row [B, S_cp, K] (GLOBAL positions), each TP rank scoring a
    causally balanced half-and-half of the rows (``balanced_blocks``); ``qi``/``wi`` are own
    SP rows, ``ki_global`` every key, ``q_pos`` the global positions of the CP-local rows.
    Indices are identical to a one-rank top-k; ``flops`` (one-element list) accumulates the
    scoring FLOPs.

    ``shards``: the reference path's key chunks (``key_shards``); None runs ``ops.indexer_topk``
    on the gathered keys in one streaming kernel (FP8 allowed).
    """
    B, n = qi.shape[:2]
    S = ki_global.shape[1]
    qi, wi, pos, balance = indexer_rows(qi, wi, q_pos, ctx, own_rows(ctx, n * ctx.tp_size))
    if shards is None:
        own = ops.indexer_topk(qi, ki_global, wi, topk, q_pos=pos, fp8=fp8, ordered=False)
        flops[0] += B * n * S * qi.shape[2] * qi.shape[3] * 2
    else:  # counts the pairs it scores (whole key chunks in a row's future are skipped)
        own = streaming_topk(qi, wi, pos, shards, topk, flops)
    # Every TP rank attends all CP-local rows with its local heads: share the selection
    # (int32 on the wire: S_cp x K x 4 bytes per step, no backward).
    sel = all_gather_rows(own.to(torch.int32), ctx.tp_group, name="tp.topk_idx").long()
    return balanced_to_rows(sel, ctx.tp_size) if balance else sel


def gather_indexer_keys(ki: torch.Tensor, ctx: ParallelContext, seq_len: int) -> torch.Tensor:
    """Own rows' indexer keys -> every key of the sequence [B, S, DI] in global order.

    All-gather over TP (the SP shards), then over CP; backward reduce-scatters (sums) each
    key's gradient back to the rank that computed it.
    """
    k = all_gather_rows(ki, ctx.tp_group, name="tp.indexer_k")
    k = all_gather_rows(k, ctx.cp_group, name="cp.indexer_k")
    return to_global_order(k, seq_len, ctx.cp_size)


def gather_kv(kv: torch.Tensor, ctx: ParallelContext, seq_len: int) -> torch.Tensor:
    """The whole latent KV [B, S, Dqk] in global order (dense / warm-up under CP only)."""
    return to_global_order(all_gather_rows(kv, ctx.cp_group, name="cp.kv_dense"), seq_len, ctx.cp_size)


def key_shards(k_global: torch.Tensor, ctx: ParallelContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 2*CP position chunks of the keys (one shard without CP), the order they arrive in
    a ring starting at this rank's own chunks."""
    S = k_global.shape[1]
    n = 2 * ctx.cp_size if ctx.cp_size > 1 else 1
    c = S // n
    order = list(range(n))
    if ctx.cp_size > 1:  # own chunks first, then the others (any order gives the same result)
        mine = [ctx.cp_rank, 2 * ctx.cp_size - 1 - ctx.cp_rank]
        order = mine + [i for i in order if i not in mine]
    pos = torch.arange(S, device=k_global.device)
    return [(k_global[:, i * c : (i + 1) * c], pos[i * c : (i + 1) * c]) for i in order]


def tp_sparse_kl(ops, q, kv_buf, idx, lse, qi, ki_buf, wi, scale: float, ctx: ParallelContext) -> torch.Tensor:
    """KL(p[S_t] || softmax(I[S_t])) of own rows, p summed over ALL heads across TP ranks.

    Each rank sums its local heads' selected-set probabilities for all rows (no grad; ``lse`` is
    the sparse attention's, which saves the kernel a pass), the partial sums [B, S_cp, K] are
    reduce-scattered over TP (fp32: S_cp x K x 4 bytes), and each rank normalises its own rows'
    sums and takes the KL against its own indexer logits.
    """
    rows = own_rows(ctx, q.shape[1])
    with torch.no_grad():
        partial = ops.sparse_target_head_sum(q.detach(), kv_buf.detach(), idx, scale, lse=lse)
        summed = reduce_scatter_rows(partial, ctx.tp_group, name="tp.kl_partial_p")
        p = summed / summed.sum(dim=-1, keepdim=True).clamp_min(R.KL_EPS)
    return ops.sparse_indexer_kl_from_target(qi, ki_buf, wi, idx[:, rows], p)


def parallel_dsa_core(
    ctx: ParallelContext,
    mode: str,
    q: torch.Tensor,
    kv: torch.Tensor,
    v_dim: int,
    scale: float,
    topk: int,
    indexer: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    selection: Optional[torch.Tensor] = None,
    with_loss: bool = True,
    sparse_loss: bool = True,
    ops=None,
    fp8_indexer: bool = False,
    recall_rows: int = 0,
) -> CoreResult:
    """One DSA core attention step on this rank (see the module docstring for shapes).

    ``indexer``: (qi, ki, wi) of own rows (detached inputs; None for a layer that borrows a
    selection or in dense mode). ``selection``: an earlier layer's top-k (GLOBAL positions,
    [B, S_cp, K]) when ``indexer`` is None in sparse mode. ``ops``: an op namespace of
    ``megatron_dsa.ops.backend`` (default: the reference). With the kernels, the top-k runs on
    the gathered keys in one streaming pass (their own top-k never holds S^2 scores), and
    ``fp8_indexer`` scores it in FP8; the reference streams the key shards instead.
    ``recall_rows``: the dense KL's recall diagnostic on at most this many rows per sequence,
    split evenly over the TP x CP ranks (0: every row), as ``mdsa_recall_rows`` on one rank.
    """
    if ops is None:
        from megatron_dsa import ops as _ops

        ops = _ops.backend("reference", q.device)
    kernels = ops.name != "reference"
    if fp8_indexer and not kernels:
        raise ValueError("the FP8 indexer is a Triton kernel; the reference path scores in fp32")
    B, S_cp = q.shape[:2]
    S = S_cp * ctx.cp_size
    q_pos = cp_positions(S, ctx.cp_size, ctx.cp_rank, q.device)
    rows = own_rows(ctx, S_cp)
    res = CoreResult(out=None)
    ki_global = None
    if indexer is not None:
        qi, ki, wi = indexer
        ki_global = gather_indexer_keys(ki, ctx, S)

    if mode in ("dense", "warmup") or (mode == "sparse" and indexer is not None and with_loss and not sparse_loss):
        kv_full = gather_kv(kv, ctx, S) if ctx.cp_size > 1 else kv

    def dense_kl():
        # Each TP rank takes a causally balanced half-and-half of the rows (``balanced_blocks``):
        # the detached queries with all heads, and its indexer queries / weights (differentiable).
        # The KL comes back to the own SP rows; a sampled recall stays on the rows it was taken on.
        qi_, wi_, pos, balance = indexer_rows(qi, wi, q_pos, ctx, rows)
        blocks = (lambda j: balanced_blocks(ctx.tp_size, j)) if balance else None
        q_rows = heads_to_rows(q.detach(), ctx.tp_group, blocks=blocks)
        res.flops[0] += B * q_rows.shape[1] * S * qi.shape[2] * qi.shape[3] * 2
        sample = None
        if recall_rows > 0:
            sample = R.recall_sample_rows(qi.shape[1], max(1, recall_rows // (ctx.tp_size * ctx.cp_size)), q.device)
        kl, recall = ops.dense_indexer_kl(
            q_rows, kv_full.detach(), qi_, ki_global, wi_, scale, topk, q_pos=pos, recall_rows=sample
        )
        if balance:
            kl = balanced_to_own(kl, ctx, "tp.indexer_kl_balance")
            if sample is None:
                recall = balanced_to_own(recall, ctx, "tp.indexer_recall_balance")
        return kl, recall

    if mode in ("dense", "warmup"):
        res.out, _ = ops.dense_mla_attention(q, kv_full, v_dim, scale, q_pos=q_pos, need_lse=False)
        if mode == "warmup" and indexer is not None:
            res.kl, res.recall = dense_kl()
        return res
    if mode != "sparse":
        raise ValueError(f"unknown DSA mode {mode!r}")

    if indexer is not None:
        # Kernels: every key is here already (gathered for the KL), one streaming kernel;
        # the reference streams the key shards.
        shards = None if kernels else key_shards(ki_global.detach(), ctx)
        sel = tp_indexer_topk(ops, qi.detach(), ki_global.detach(), wi.detach(), q_pos, topk, ctx, res.flops,
                              fp8=fp8_indexer, shards=shards)
    else:
        sel = selection
        if sel is None or sel.shape[:2] != (B, S_cp):
            raise RuntimeError("sparse DSA needs a top-k selection for these rows")
    res.topk = sel

    if ctx.cp_size > 1:
        kv_buf, idx, gids = fetch_selected(kv, sel, S, ctx.cp_group)
        kv_buf = kv_buf[None].expand(B, -1, -1)
    else:
        kv_buf, idx, gids = kv, sel, None
    res.out, lse = ops.sparse_mla_attention(q, kv_buf, idx, v_dim, scale)

    if indexer is not None and with_loss:
        if sparse_loss:
            if gids is not None:
                ki_buf = ki_global.reshape(B * S, -1)[gids][None].expand(B, -1, -1)
            else:
                ki_buf = ki_global
            res.kl = tp_sparse_kl(ops, q, kv_buf, idx, lse, qi, ki_buf, wi, scale, ctx)
        else:
            res.kl, res.recall = dense_kl()
    return res
