"""Fetch only the selected latent KV rows from the context-parallel ranks that own them.

Forward: every rank sends each owner the list of its rows it needs (int64 row ids), the
owner answers with those rows (one all-to-all each way). Backward: the gradient of every
fetched row goes back to its owner (the reverse all-to-all) and is scatter-added into the
owner's dKV. Each rank requests every row at most once (unique over batch, queries and
top-k slots), so traffic is bounded by min(S, B x S/CP x K) rows, never the whole KV.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dsa.parallel.comm import all_to_all_list, cp_owner


class _FetchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv_local, gids, seq_len, group, cu_seqlens):
        B, S_local, D = kv_local.shape
        world = dist.get_world_size(group)
        b, pos = gids // seq_len, gids % seq_len
        owner, row = cp_owner(pos, seq_len, world, cu_seqlens)
        flat = b * S_local + row  # row id in the owner's [B * S_local] KV
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=world).tolist()
        requests = list(flat[order].split(counts))
        asked = all_to_all_list(requests, group, "cp.kv_fetch.request")
        kv_flat = kv_local.reshape(B * S_local, D)
        replies = all_to_all_list(
            [kv_flat[a] for a in asked], group, "cp.kv_fetch.rows",
            recv_shapes=[(c, D) for c in counts],
        )
        out = torch.empty(gids.numel(), D, dtype=kv_local.dtype, device=kv_local.device)
        out[order] = torch.cat(replies)
        ctx.save_for_backward(order, *asked)
        ctx.meta = (group, counts, (B, S_local, D))
        return out

    @staticmethod
    def backward(ctx, grad):
        order, *asked = ctx.saved_tensors
        group, counts, shape = ctx.meta
        B, S_local, D = shape
        back = all_to_all_list(
            list(grad[order].split(counts)), group, "cp.kv_fetch.rows.bwd",
            recv_shapes=[(a.numel(), D) for a in asked],
        )
        dkv = torch.zeros(B * S_local, D, dtype=grad.dtype, device=grad.device)
        for a, g in zip(asked, back):
            dkv.index_add_(0, a, g)
        return dkv.view(B, S_local, D), None, None, None, None


def fetch_selected(
    kv_local: torch.Tensor, topk_pos: torch.Tensor, seq_len: int, group, cu_seqlens=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the CP-sharded KV that ``topk_pos`` [B, Sq, K] (global positions, -1 = none)
    selects. kv_local [B, S/CP, D] is this rank's shard (megatron's layout; its packed one
    when ``cu_seqlens`` gives the document boundaries).

    Returns (buffer [N, D] with autograd to kv_local on the owners, compact indices
    [B, Sq, K] int32 into the buffer (-1 kept: a selection, as ``topk_pos``), gids [N] int64 =
    b * seq_len + position of each row).
    """
    B = topk_pos.shape[0]
    valid = topk_pos >= 0
    b_ids = torch.arange(B, device=topk_pos.device).view(B, 1, 1).expand_as(topk_pos)
    g = b_ids * seq_len + topk_pos.clamp_min(0)  # int64 (b_ids): B x seq_len may pass 2^31
    gids = torch.unique(g[valid])  # sorted
    # int32: the attention and the KL keep these indices for their backward.
    compact = torch.searchsorted(gids, g, out_int32=True).masked_fill(~valid, -1)
    if gids.numel() == 0:  # nothing selected anywhere on this rank: still join the exchange
        gids = torch.zeros(0, dtype=torch.long, device=topk_pos.device)
    buf = _FetchRows.apply(kv_local, gids, seq_len, group, cu_seqlens)
    return buf, compact, gids
