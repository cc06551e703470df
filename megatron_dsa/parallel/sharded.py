"""The steps of the DSA core that change when its tensors are sharded over TP and CP.

``megatron_dsa.core.dsa_core`` calls these with a ``ParallelContext``; on one rank (sizes 1)
each is the plain computation (the collectives return their input). What a rank holds (batch
first):

    q       [B, S_cp, H/TP, Dqk]   absorbed queries: all CP-local rows, LOCAL heads
    kv      [B, S_cp, Dqk]         latent KV entries of the CP-local rows (MLA gathered them over TP)
    qi, wi  [B, S_cp/TP, HI, DI], [B, S_cp/TP, HI]   indexer queries / weights of OWN rows
    ki      [B, S_cp/TP, DI]       indexer keys of OWN rows

S_cp = S / CP rows in megatron's load-balanced layout (chunks r and 2CP-1-r); own rows are the
sequence-parallel shard tp_rank of those. The package docstring has the design and the bytes.
"""

from __future__ import annotations

import torch

from megatron_dsa import reference as R
from megatron_dsa.offload import HostOffload
from megatron_dsa.parallel.comm import (
    ParallelContext,
    all_gather_rows,
    balanced_blocks,
    check_tp_rows,
    move_blocks,
    reduce_scatter_rows,
    to_global_order,
)
from megatron_dsa.parallel.topk import streaming_topk


def own_rows(ctx: ParallelContext, s_cp: int) -> slice:
    """This TP rank's sequence-parallel share of a CP rank's ``s_cp`` rows."""
    check_tp_rows(s_cp, ctx.tp_size)
    n = s_cp // ctx.tp_size
    return slice(ctx.tp_rank * n, (ctx.tp_rank + 1) * n)


# ---- causally balanced indexer rows under TP ------------------------------------------------


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


# ---- the indexer's top-k --------------------------------------------------------------------


def tp_indexer_topk(ops, qi, ki_global, wi, q_pos, topk: int, ctx: ParallelContext, flops: list,
                    fp8: bool = False, shards=None, doc=None) -> torch.Tensor:
    """The top-k of every CP-local row [B, S_cp, K] (GLOBAL positions), each TP rank scoring a
    causally balanced half-and-half of the rows (``balanced_blocks``); ``qi``/``wi`` are own
    SP rows, ``ki_global`` every key, ``q_pos`` the global positions of the CP-local rows.
    Indices are identical to a one-rank top-k; ``flops`` (one-element list) accumulates the
    scoring FLOPs.

    ``shards``: the reference path's key chunks (``key_shards``); None runs ``ops.indexer_topk``
    on the gathered keys in one streaming kernel (FP8 allowed). ``doc``: the document id of
    every global position of a packed sequence (keys of other documents are not eligible).
    """
    B, n = qi.shape[:2]
    S = ki_global.shape[1]
    qi, wi, pos, balance = indexer_rows(qi, wi, q_pos, ctx, own_rows(ctx, n * ctx.tp_size))
    if shards is None:
        # ordered=False: the attention and the KL need the selected set, not its score order.
        documents = {} if doc is None else dict(q_doc=doc[pos], k_doc=doc)
        own = ops.indexer_topk(qi, ki_global, wi, topk, q_pos=pos, fp8=fp8, ordered=False, **documents)
        flops[0] += B * n * S * qi.shape[2] * qi.shape[3] * 2
    else:  # counts the pairs it scores (whole key chunks in a row's future are skipped)
        own = streaming_topk(qi, wi, pos, shards, topk, flops, doc=doc)
    if ctx.tp_size == 1:
        return own
    # Every TP rank attends all CP-local rows with its local heads: share the selection
    # (int32, as everywhere: S_cp x K x 4 bytes on the wire per step, no backward).
    sel = all_gather_rows(own, ctx.tp_group, name="tp.topk_idx")
    return balanced_to_rows(sel, ctx.tp_size) if balance else sel


def key_shards(k_global: torch.Tensor, ctx: ParallelContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 2*CP position chunks of the keys (one shard without CP), the order they arrive in
    a ring starting at this rank's own chunks."""
    S = k_global.shape[1]
    n = 2 * ctx.cp_size if ctx.cp_size > 1 else 1
    c = S // n
    order = list(range(n))
    if ctx.cp_size > 1:  # own chunks first, then the others (any order gives the same result)
        mine = list(balanced_blocks(ctx.cp_size, ctx.cp_rank))
        order = mine + [i for i in order if i not in mine]
    pos = torch.arange(S, device=k_global.device)
    return [(k_global[:, i * c : (i + 1) * c], pos[i * c : (i + 1) * c]) for i in order]


# ---- gathers over the TP / CP groups --------------------------------------------------------


def gather_indexer_keys(ki: torch.Tensor, ctx: ParallelContext, seq_len: int, cu_seqlens=None) -> torch.Tensor:
    """Own rows' indexer keys -> every key of the sequence [B, S, DI] in global order.

    All-gather over TP (the SP shards), then over CP; backward reduce-scatters (sums) each
    key's gradient back to the rank that computed it.
    """
    k = all_gather_rows(ki, ctx.tp_group, name="tp.indexer_k")
    k = all_gather_rows(k, ctx.cp_group, name="cp.indexer_k")
    return to_global_order(k, seq_len, ctx.cp_size, cu_seqlens=cu_seqlens)


def gather_kv(kv: torch.Tensor, ctx: ParallelContext, seq_len: int, cu_seqlens=None) -> torch.Tensor:
    """The whole latent KV [B, S, Dqk] in global order (dense / warm-up under CP only)."""
    kv = all_gather_rows(kv, ctx.cp_group, name="cp.kv_dense")
    return to_global_order(kv, seq_len, ctx.cp_size, cu_seqlens=cu_seqlens)


def every_heads_keys(kv_all: torch.Tensor, k_up: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Every head's keys in MLA's MHA form [B, S, H, dk + R] (detached) for the warm-up's target,
    whose rows hold all heads under TP. The K up-projection's head shards are gathered (a few MB)
    and the keys built from the latent every rank has, rather than moved between ranks."""
    k_up = all_gather_rows(k_up.detach(), ctx.tp_group, dim=0, name="tp.k_up_heads")
    return R.mha_keys(kv_all.detach(), k_up)


# ---- the sparse KL's target summed over the heads of every TP rank --------------------------


def tp_sparse_kl(ops, q, kv_buf, idx, lse, qi, ki_buf, wi, scale: float, ctx: ParallelContext) -> torch.Tensor:
    """KL(p[S_t] || softmax(I[S_t])) of own rows, p summed over ALL heads across TP ranks.

    Each rank sums its local heads' selected-set probabilities for all rows (no grad; ``lse`` is
    the sparse attention's, which saves the kernel a pass), the partial sums [B, S_cp, K] are
    reduce-scattered over TP (fp32: S_cp x K x 4 bytes), and each rank takes the KL of its own
    rows (normalised in the KL) against its own indexer logits.
    """
    rows = own_rows(ctx, q.shape[1])
    with torch.no_grad():
        p = own_rows_target(ops.sparse_target_head_sum(q.detach(), kv_buf.detach(), idx, scale, lse=lse), ctx)
    return ops.sparse_indexer_kl_from_target(qi, ki_buf, wi, idx[:, rows], p)


@torch.no_grad()
def own_rows_target(head_sum: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The sparse KL's target weights for this rank's own rows, from its heads' probability sums
    over every row's selected set [B, S_cp, K]: the TP ranks' sums added (reduce-scatter, fp32;
    on one rank ``head_sum`` itself). The KL divides each row by its sum as it reads it."""
    return reduce_scatter_rows(head_sum, ctx.tp_group, name="tp.kl_partial_p")


class SparseAttentionKLInBackward(torch.autograd.Function):
    """The sparse attention whose backward also trains the indexer (the KL's target comes from
    the probabilities that backward recomputes, so no pass over the selected rows is made for
    it). Forward: ``ops.sparse_mla_attention``'s output. Backward: dq, dkv as that op's, plus
    the KL's gradients for qi, ki, wi, each own row's KL weighted by ``weight()``, with the rows'
    KL values handed to ``record`` (no grad)."""

    @staticmethod
    def forward(ctx, q, kv, qi, ki, wi, idx, v_dim, scale, ops, pctx, weight, record, selection_shared):
        out, lse = ops.sparse_mla_attention(q, kv, idx, v_dim, scale)
        # The selection kept in half its bytes when asked and nothing else holds it (else int32),
        # and in host memory until the backward when asked (then it leaves the graph's tensors).
        own = not selection_shared
        stored = ops.compact_selection(idx, kv.shape[1]) if ops.options.compact_selection and own else None
        stored = stored or (idx,)
        ctx.offload = HostOffload(stored) if ops.options.offload_selection and own else None
        ctx.save_for_backward(q, kv, qi, ki, wi, out, lse, *(() if ctx.offload else stored))
        ctx.args = (v_dim, scale, ops, pctx, weight, record)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, qi, ki, wi, out, lse, *stored = ctx.saved_tensors
        v_dim, scale, ops, pctx, weight, record = ctx.args
        if ctx.offload is not None:
            stored = ctx.offload.tensors()
            earlier = ctx.offload.previous()  # the layer whose backward comes next
            if earlier is not None:
                earlier.prefetch()
        idx = ops.expand_selection(*stored) if len(stored) == 2 else stored[0]
        del stored
        dq, dkv, head_sum = ops.sparse_mla_attention_backward(q, kv, idx, out, lse, dout, v_dim, scale)
        p = own_rows_target(head_sum, pctx)
        rows = own_rows(pctx, q.shape[1])
        w = torch.as_tensor(weight(), dtype=torch.float32, device=p.device)
        kl, dqi, dki, dwi = ops.sparse_indexer_kl_and_grads(qi, ki, wi, idx[:, rows], p, w)
        record(kl)
        return dq, dkv, dqi, dki, dwi, None, None, None, None, None, None, None, None


def sparse_attention_kl_in_backward(ops, q, kv_buf, idx, v_dim: int, scale: float, qi, ki_buf, wi,
                                    ctx: ParallelContext, weight, record,
                                    selection_shared: bool = False) -> torch.Tensor:
    """The sparse attention's output [B, S_cp, H/TP, v_dim]; its backward adds the own rows' KL
    (``tp_sparse_kl``'s value, weighted by ``weight()``: d loss / d row KL) to the indexer's
    gradients and passes the values to ``record``. The indexer's inputs are detached (the
    indexer learns only from the KL), so nothing else changes in the graph. With the ops'
    ``KernelOptions.compact_selection`` the selection is kept for the backward in 16 bits a key
    (rows in key order), which frees the int32 one, unless ``selection_shared``: a layer that
    lends its selection to later layers keeps the int32 one they hold anyway. With
    ``KernelOptions.offload_selection`` (and not shared) the kept selection waits for the backward
    in pinned host memory (``offload.HostOffload``), and each backward starts bringing back the
    selection of the layer before it."""
    return SparseAttentionKLInBackward.apply(q, kv_buf, qi, ki_buf, wi, idx, v_dim, scale, ops, ctx, weight, record,
                                             selection_shared)
