"""Exact top-k over key shards: score each shard as it arrives, merge candidates.

``streaming_topk`` equals ``reference.indexer_topk`` on the keys in GLOBAL position order
(index = global position), including its tie rule (equal scores: smaller global position
first) and its order within a row (score descending), whatever the order the shards come in.
Candidates carry their global positions, so no rank ever needs the other ranks' key layout.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from megatron_dsa.reference import _chunk_size, causal_mask, indexer_scores

_NO_POS = torch.iinfo(torch.int32).max  # position of an empty candidate slot: sorts last


def merge_candidates(
    vals: torch.Tensor, pos: torch.Tensor, new_vals: torch.Tensor, new_pos: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``topk`` of two candidate sets [..., n] (values, global positions).

    Order: value descending, ties by smaller global position (the reference's stable sort on
    globally ordered keys), empty / masked slots (-inf) last.
    """
    v = torch.cat((vals, new_vals), dim=-1)
    p = torch.cat((pos, new_pos), dim=-1)
    by_pos = torch.argsort(p, dim=-1, stable=True)
    v, p = v.gather(-1, by_pos), p.gather(-1, by_pos)
    by_val = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :topk]
    return v.gather(-1, by_val), p.gather(-1, by_val)


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) row ranges over which positions are consecutive."""
    breaks = (torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1).tolist()
    edges = [0] + breaks + [positions.numel()]
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def streaming_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    q_pos: torch.Tensor,
    shards: Iterable[tuple[torch.Tensor, torch.Tensor]],
    topk: int,
    flops: Optional[list] = None,
    doc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal top-k of the indexer scores of queries q [B, Sq, HI, DI] (weights w [B, Sq, HI],
    global positions q_pos [Sq]) over key shards ``(k [B, Sk_j, DI], k_pos [Sk_j])``.

    Returns [B, Sq, topk] int32 GLOBAL key positions, -1 padded. A (query run, shard) pair
    whose keys all lie after the run's last query is skipped (causal skip, no FLOPs).
    ``flops`` (a one-element list) accumulates the scoring FLOPs: rows x keys x HI x DI x 2.
    ``doc``: the document id of every global position (packed sequences: a key of another
    document is not eligible).
    """
    B, Sq, HI, DI = q.shape
    vals = torch.full((B, Sq, topk), float("-inf"), device=q.device)
    pos = torch.full((B, Sq, topk), _NO_POS, dtype=torch.int32, device=q.device)
    q_pos = q_pos.to(q.device)
    runs = _runs(q_pos)
    for k, k_pos in shards:
        k_pos = k_pos.to(q.device)
        kmin = int(k_pos.min())
        step = _chunk_size(B * HI * k.shape[1], Sq)
        for r0, r1 in runs:
            for t0 in range(r0, r1, step):
                t1 = min(r1, t0 + step)
                if kmin > int(q_pos[t1 - 1]):
                    continue  # every key of this shard is in these queries' future
                scores = indexer_scores(q[:, t0:t1], k, w[:, t0:t1])
                if flops is not None:
                    flops[0] += B * (t1 - t0) * k.shape[1] * HI * DI * 2
                if doc is None:
                    mask = causal_mask(q_pos[t0:t1], k_pos)
                else:
                    mask = causal_mask(q_pos[t0:t1], k_pos, doc[q_pos[t0:t1]], doc[k_pos])
                scores = scores.masked_fill(~mask, float("-inf"))
                new_pos = k_pos.to(torch.int32).expand(B, t1 - t0, -1)
                vals[:, t0:t1], pos[:, t0:t1] = merge_candidates(
                    vals[:, t0:t1], pos[:, t0:t1], scores, new_pos, topk
                )
    return pos.masked_fill(vals == float("-inf"), -1)
