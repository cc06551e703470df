"""The DSA core: one attention step in dense, warm-up or sparse mode, written once.

Every caller runs this function: the layer in training, on one rank or under TP/CP, and the
inference engine's prefill (new queries against the cached rows). Decoding one token per
sequence over a paged cache runs ``dsa_decode`` below, the same modes on the decode ops.
The callers of ``dsa_core`` differ only in what they pass: a
``ParallelContext`` (size 1 on one rank, where every sharded step of ``megatron_dsa.parallel``
is the plain computation and no collective runs), the query positions, and the tensors.

    dense   causal attention over every key; the indexer does no work
    warmup  dense attention + the indexer objective against the head-summed attention over
            every eligible key (the dense KL); nothing reaches the main model
    sparse  the indexer's causal top-k (``min(k, eligible)``, -1 padded), attention over the
            selected keys only, and the objective over the selected set (``sparse_loss``;
            over every eligible key otherwise)

Shapes (batch first; what a rank holds under TP/CP is in ``parallel.sharded``):
    q        [B, Sq, H, Dqk]    absorbed queries (H: this rank's heads); with ``up_proj`` in
                                the dense modes, unabsorbed (``reference.mha_form``'s input)
    kv       [B, Sk, Dqk]       latent KV entries (Sk = Sq in training; the whole cache when
                                decoding, the new queries at ``q_pos``)
    indexer  (qi [B, Sq', HI, DI], ki [B, Sk', DI], wi [B, Sq', HI]): this rank's own rows
             (Sq' = Sq / TP), with detached inputs: the indexer learns only from its objective

Packed sequences (``cu_seqlens``: the document boundaries of the whole sequence, megatron's
THD layout under CP) add one rule, ``reference.causal_mask``'s: a key is eligible only in its
query's document. The dense attention, the top-k and the dense objective apply it; the sparse
attention and the selected-set KL read only the selected indices, which already obey it. The
rule is a document-id input (``q_doc``, ``k_doc``) of the reference ops and of the Triton
kernels alike.

The objective is the KL unless ``objective`` names another (``reference.INDEXER_OBJECTIVES``:
those run the PyTorch loss ops of ``ops.indexer_loss_backend``, one rank only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from megatron_dsa import ops
from megatron_dsa import reference as R
from megatron_dsa.parallel.comm import ParallelContext, balanced_blocks, cp_positions, heads_to_rows
from megatron_dsa.parallel.fetch import fetch_selected
from megatron_dsa.parallel.sharded import (
    balanced_to_own,
    every_heads_keys,
    gather_indexer_keys,
    gather_kv,
    indexer_rows,
    key_shards,
    own_rows,
    sparse_attention_kl_in_backward,
    tp_indexer_topk,
    tp_sparse_kl,
)

MODES = ("dense", "warmup", "sparse")


@dataclass(frozen=True)
class KLInBackward:
    """Where the sparse phase's indexer KL goes when the attention's backward computes it (the
    training step: its target is the probabilities that backward recomputes, no second pass
    over the selected rows). ``weight()``: d loss / d (one own row's KL), read in the
    backward; ``record(kl)``: receives the own rows' KL [B, Sq'] (no grad) once it exists."""

    weight: Callable[[], Union[float, torch.Tensor]]
    record: Callable[[torch.Tensor], None]
    # A later layer reuses the selection: its int32 form stays alive anyway, so the backward
    # keeps that one (not a 16-bit copy, which ``KernelOptions.compact_selection`` asks for).
    selection_shared: bool = False


@dataclass
class CoreResult:
    out: torch.Tensor  # [B, Sq, H, v_dim] (the MHA form's dv with ``up_proj``)
    kl: Optional[torch.Tensor] = None  # [B, Sq'] the indexer objective of each own row
    recall: Optional[torch.Tensor] = None  # [B, Sq'] (or the sampled rows) top-k recall, no grad
    topk: Optional[torch.Tensor] = None  # [B, Sq, K] int32 selected key positions, -1 padded (sparse)
    indexer_flops: int = 0  # indexer scoring FLOPs done on this rank (rows x keys x HI x DI x 2)


def dsa_core(
    ctx: ParallelContext,
    mode: str,
    q: torch.Tensor,
    kv: torch.Tensor,
    v_dim: int,
    scale: float,
    topk: int,
    *,
    indexer: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    selection: Optional[torch.Tensor] = None,
    q_pos: Optional[torch.Tensor] = None,
    with_loss: bool = True,
    sparse_loss: bool = True,
    objective: str = "kl",
    backend=None,
    fp8_indexer: bool = False,
    recall_rows: int = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    up_proj: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    kl_in_backward: Optional[KLInBackward] = None,
) -> CoreResult:
    """One DSA core attention step on this rank (shapes in the module docstring).

    ``indexer``: (qi, ki, wi), or None for a layer that reuses another's ``selection`` (sparse)
    or does no indexer work. ``q_pos``: the queries' positions when they are not the rows of
    the sequence (decoding; default: 0..S-1, or this CP rank's chunks); keys are always the
    positions 0..Sk-1. ``backend``: an op namespace of ``ops.backend`` (default: the
    reference); with the kernels the top-k scores every key in one streaming pass and
    ``fp8_indexer`` scores in FP8. ``recall_rows``: the dense objective's recall diagnostic on
    at most this many rows per sequence, split evenly over the TP x CP ranks (0: every row).
    ``cu_seqlens``: document boundaries of a packed sequence (global rows, [0, ..., S]; each
    document a multiple of 2 * CP under CP); None: one document.
    ``up_proj``: (k_up [H, dk, L], v_up [H, dv, L]) in the dense modes: the attention runs in
    MLA's MHA form (the gathered latents expanded per head, 192 / 128 dims a head at
    DeepSeek-V3.2's shape against 576 / 512 absorbed) and ``out`` is [B, Sq, H, dv], already
    through the V up-projection; the warm-up's target absorbs the query itself.
    ``kl_in_backward``: in the sparse mode with gradients on and the KL objective over the
    selected set, the KL is computed in the attention's backward and delivered there
    (``res.kl`` is None); without gradients (evaluation) it is computed here as always.
    """
    if mode not in MODES:
        raise ValueError(f"unknown DSA mode {mode!r}; one of {MODES}")
    if up_proj is not None and mode == "sparse":
        raise ValueError("sparse DSA attends in the absorbed form: up_proj is for the dense modes")
    backend = backend or ops.backend("reference", q.device)
    if fp8_indexer and backend.name == "reference":
        raise ValueError("the FP8 indexer is a Triton kernel; the reference path scores in fp32")
    loss_ops = ops.indexer_loss_backend(backend.name, q.device, objective, backend.options)
    B, Sq = q.shape[:2]
    seq = kv.shape[1] * ctx.cp_size
    positions = q_pos if q_pos is not None else cp_positions(seq, ctx.cp_size, ctx.cp_rank, q.device, cu_seqlens)
    # The ops' default positions are 0..S-1: passing None there spares a kernel the bookkeeping.
    attention_pos = None if q_pos is None and ctx.cp_size == 1 else positions
    doc = None if cu_seqlens is None else R.document_ids(cu_seqlens.to(q.device), seq)
    documents = {} if doc is None else dict(q_doc=doc[positions], k_doc=doc)
    rows = own_rows(ctx, Sq)
    flops = [0]
    qi = ki = wi = ki_all = None
    if indexer is not None:
        qi, ki, wi = indexer
        ki_all = gather_indexer_keys(ki, ctx, seq, cu_seqlens)

    def dense_objective(keys, q_target=q):
        return _dense_objective(loss_ops, ctx, q_target, keys, qi, ki_all, wi, positions, rows, scale, topk,
                                recall_rows, flops, doc)

    if mode in ("dense", "warmup"):
        kv_all = gather_kv(kv, ctx, seq, cu_seqlens)  # every key (an all-gather under CP)
        q_att, keys = q, kv_all  # absorbed queries over the latent
        if up_proj is None:
            out, _ = backend.dense_mla_attention(q, kv_all, v_dim, scale, q_pos=attention_pos, need_lse=False,
                                                 **documents)
        else:
            q_att, keys, values = R.mha_form(q, kv_all, *up_proj)
            out, _ = backend.dense_attention(q_att, keys, values, scale, q_pos=attention_pos, need_lse=False,
                                             **documents)
        res = CoreResult(out)
        if mode == "warmup" and indexer is not None:
            # The target scores every head again over every key, in the attention's form: per
            # head in the MHA form (3x fewer products than over the latent at DeepSeek-V3.2's
            # shape). Under TP its rows hold every head, so it needs every head's keys.
            # Detached inside: nothing reaches the main model.
            if up_proj is not None and ctx.tp_size > 1:
                keys = every_heads_keys(kv_all, up_proj[0], ctx)
            res.kl, res.recall = dense_objective(keys, q_target=q_att)
        res.indexer_flops = flops[0]
        return res

    if indexer is not None:
        # The reference emulates the CP ring: it streams the key chunks, skipping future ones.
        shards = key_shards(ki_all.detach(), ctx) if backend.name == "reference" and ctx.cp_size > 1 else None
        sel = tp_indexer_topk(backend, qi.detach(), ki_all.detach(), wi.detach(), positions, topk, ctx, flops,
                              fp8=fp8_indexer, shards=shards, doc=doc)
    else:
        sel = selection
        if sel is None or sel.shape[:2] != (B, Sq):
            raise RuntimeError("sparse DSA needs a top-k selection for these rows")

    if ctx.cp_size > 1:  # only the selected KV rows travel, from the CP ranks that own them
        kv_buf, idx, gids = fetch_selected(kv, sel, seq, ctx.cp_group, cu_seqlens)
        kv_buf = kv_buf[None].expand(B, -1, -1)
    else:
        kv_buf, idx, gids = kv, sel, None
    selected_set_loss = indexer is not None and with_loss and sparse_loss
    if selected_set_loss:
        ki_buf = ki_all if gids is None else ki_all.reshape(B * seq, -1)[gids][None].expand(B, -1, -1)
    if selected_set_loss and kl_in_backward is not None and objective == "kl" and torch.is_grad_enabled():
        out = sparse_attention_kl_in_backward(backend, q, kv_buf, idx, v_dim, scale, qi, ki_buf, wi, ctx,
                                              kl_in_backward.weight, kl_in_backward.record,
                                              selection_shared=kl_in_backward.selection_shared)
        return CoreResult(out, topk=sel, indexer_flops=flops[0])
    out, lse = backend.sparse_mla_attention(q, kv_buf, idx, v_dim, scale)
    res = CoreResult(out, topk=sel)

    if selected_set_loss:
        res.kl = _selected_set_objective(loss_ops, backend, ctx, q, kv_buf, idx, lse, qi, ki_buf, wi, scale)
    elif indexer is not None and with_loss:
        res.kl, res.recall = dense_objective(gather_kv(kv, ctx, seq, cu_seqlens))
    res.indexer_flops = flops[0]
    return res


def dsa_decode(
    mode: str,
    decode_ops,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    v_dim: int,
    scale: float,
    topk: int,
    *,
    indexer: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
    selection: Optional[torch.Tensor] = None,
) -> CoreResult:
    """``dsa_core``'s dense and sparse modes for one new token of each of B sequences, over a
    paged cache (inference; the layout is ``reference.paged_rows``'s). The token is the last
    of its sequence (``lengths`` [B] count it), so every cached row is eligible.

    q [B, H, Dqk] absorbed queries; kv_cache [blocks, block_size, Dqk]; block_table [B, n];
    ``decode_ops``: ``ops.decode_backend``'s namespace. ``indexer``: (qi [B, HI, DI],
    wi [B, HI], the cached indexer keys, their per-token scales or None), or None for a layer
    that reuses another's ``selection`` [B, K] (int32, -1 padded). Returns the output
    [B, H, v_dim] and, sparse, the selection.
    """
    if mode not in ("dense", "sparse"):
        raise ValueError(f"decoding runs the dense or sparse mode, got {mode!r}")
    if mode == "dense":
        out, _ = decode_ops.dense_mla_decode(q, kv_cache, block_table, lengths, v_dim, scale)
        return CoreResult(out)
    if indexer is not None:
        qi, wi, keys, key_scales = indexer
        # The attention takes the selection as a set: unordered rows skip the sort by score (and
        # list the positions in cache order).
        sel = decode_ops.paged_indexer_topk(qi, wi, keys, key_scales, block_table, lengths, topk, ordered=False)
    else:
        sel = selection
        if sel is None or sel.shape[0] != q.shape[0]:
            raise RuntimeError("sparse DSA needs a top-k selection for these rows")
    out, _ = decode_ops.sparse_mla_decode(q, kv_cache, block_table, sel, v_dim, scale)
    return CoreResult(out, topk=sel)


def _dense_objective(loss_ops, ctx: ParallelContext, q, keys, qi, ki_all, wi, positions, rows: slice,
                     scale: float, topk: int, recall_rows: int, flops: list, doc=None):
    """The objective over every eligible key of each own row, with its top-k recall. ``keys``:
    every key row of the main attention, the latent or each head's (``reference.main_scores``).

    The target sums the attention over ALL heads, so each TP rank takes whole rows: a causally
    balanced half-and-half of them (``balanced_blocks``) with every head's detached query. The
    objective comes back to the own rows; a sampled recall stays on the rows it was taken on.
    """
    qi_rows, wi_rows, pos, balanced = indexer_rows(qi, wi, positions, ctx, rows)
    blocks = (lambda j: balanced_blocks(ctx.tp_size, j)) if balanced else None
    q_rows = heads_to_rows(q.detach(), ctx.tp_group, blocks=blocks)
    flops[0] += q.shape[0] * q_rows.shape[1] * ki_all.shape[1] * qi.shape[2] * qi.shape[3] * 2
    sample = None
    if recall_rows > 0:
        sample = R.recall_sample_rows(qi.shape[1], max(1, recall_rows // (ctx.tp_size * ctx.cp_size)), q.device)
    documents = {} if doc is None else dict(q_doc=doc[pos], k_doc=doc)
    kl, recall = loss_ops.dense_indexer_kl(q_rows, keys.detach(), qi_rows, ki_all, wi_rows, scale, topk, q_pos=pos,
                                           recall_rows=sample, **documents)
    if balanced:
        kl = balanced_to_own(kl, ctx, "tp.indexer_kl_balance")
        if sample is None:
            recall = balanced_to_own(recall, ctx, "tp.indexer_recall_balance")
    return kl, recall


def _selected_set_objective(loss_ops, backend, ctx: ParallelContext, q, kv_buf, idx, lse, qi, ki_buf, wi,
                            scale: float) -> torch.Tensor:
    """The objective over each own row's selected set, p renormalised over that set."""
    if ctx.tp_size == 1:
        # Every head is here: the one-step op, which reuses the attention's log-sum-exp.
        return loss_ops.sparse_indexer_kl(q, kv_buf, qi, ki_buf, wi, idx, scale, lse=lse.detach())
    # The target sums the heads of every TP rank: two steps, a reduce-scatter between them.
    return tp_sparse_kl(backend, q, kv_buf, idx, lse, qi, ki_buf, wi, scale, ctx)
