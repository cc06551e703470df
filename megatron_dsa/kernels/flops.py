"""FLOP accounting for one DSA attention core, including the indexer's O(S^2) term.

Counts multiply-adds as 2 FLOP.  Causal: the indexer scores ~S^2/2 (query, key) pairs
(exactly S(S+1)/2); sparse attention and the sparse KL touch min(topk, t+1) keys for query t.
"""

from __future__ import annotations


def _causal_pairs(seq: int) -> float:
    return seq * (seq + 1) / 2.0


def _sparse_pairs(seq: int, topk: int, causal: bool = True) -> float:
    if not causal:
        return float(seq) * min(topk, seq)
    k = min(topk, seq)
    # rows t < k see t+1 keys, the rest see k.
    return k * (k + 1) / 2.0 + (seq - k) * float(k)


def dsa_flops(
    seq: int,
    heads: int,
    dqk: int,
    dv: int,
    idx_heads: int,
    idx_dim: int,
    topk: int,
    batch: int = 1,
    causal: bool = True,
    backward: bool = True,
    sparse_kl: bool = True,
    indexer_backward: bool = False,
) -> dict:
    """FLOPs of one DSA attention core (indexer top-k + sparse MLA attention + sparse KL).

    Returns a dict with the parts and ``total``.  ``indexer_backward`` counts the O(S^2)
    backward of a DENSE indexer KL (warm-up); the sparse phase's indexer backward is inside
    ``sparse_kl``.  Forward attention: QK^T (dqk) + PV (dv) per pair and head; backward:
    2.5x forward (dQ, dK, dV, dP recompute of S).
    """
    pairs_dense = _causal_pairs(seq) if causal else float(seq) * seq
    pairs_sparse = _sparse_pairs(seq, topk, causal)
    out = {}
    out["indexer_scores"] = batch * 2.0 * idx_heads * idx_dim * pairs_dense
    attn_fwd = batch * 2.0 * heads * (dqk + dv) * pairs_sparse
    out["attn_fwd"] = attn_fwd
    # backward: recompute S (dqk), dP = dO V^T (dv), dQ (dqk), dK (dqk), dV (dv)
    out["attn_bwd"] = batch * 2.0 * heads * (3 * dqk + 2 * dv) * pairs_sparse if backward else 0.0
    if sparse_kl:
        # forward: main scores twice (lse pass + p pass) + indexer logits over the set
        out["kl_fwd"] = batch * pairs_sparse * (2 * 2.0 * heads * dqk + 2.0 * idx_heads * idx_dim)
        # backward: logits recompute, dq_idx, dk_idx
        out["kl_bwd"] = batch * pairs_sparse * 3 * 2.0 * idx_heads * idx_dim if backward else 0.0
    if indexer_backward:
        out["indexer_dense_bwd"] = 2 * out["indexer_scores"]
    out["total"] = sum(out.values())
    return out


def dense_attention_flops(seq: int, heads: int, dqk: int, dv: int, batch: int = 1,
                          causal: bool = True, backward: bool = True) -> float:
    """FLOPs of dense (flash) attention, causal pairs ~S^2/2; backward 2.5x forward."""
    pairs = _causal_pairs(seq) if causal else float(seq) * seq
    fwd = batch * 2.0 * heads * (dqk + dv) * pairs
    return fwd * (3.5 if backward else 1.0)
