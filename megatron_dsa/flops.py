"""FLOP counting, the lightning indexer's O(S^2) term included: the one counter.

Matmul FLOPs only (2 per multiply-add). Causal attention and the indexer see ``S(S+1)/2``
(query, key) pairs (``causal_pairs``), top-k sparse attention ``sum_t min(k, t+1)``
(``sparse_pairs``). Two readers, one set of pair counts:

The whole model per training sequence (``training_terms``: the trainer's TFLOP/s, MFU
convention: each algorithmic FLOP once):

* MLA per token and layer: ``wq_a`` (h -> q_lora), ``wq_b`` (q_lora -> H*(d_qk + d_rope)),
  ``wkv_a`` (h -> kv_lora + d_rope), the K and V up-projections (``H * d_qk * kv_lora`` and
  ``H * kv_lora * d_v``: applied to the query and the output in the absorbed form, to each key
  row in the MHA form, the same count) and ``wo`` (H*d_v -> h).
* Core attention per attended pair, in the form each phase attends in: the dense phases in MLA's
  MHA form, scores ``2*H*(d_qk + d_rope)`` and values ``2*H*d_v``; the sparse phase absorbed,
  scores ``2*H*(kv_lora + d_rope)`` and values ``2*H*kv_lora``.
* The indexer per token: ``wq_b`` (q_lora -> HI*DI), ``wk`` (h -> DI), ``weights_proj``
  (h -> HI); per causal pair ``2*HI*DI`` for the scores plus ``2*HI`` for the head weighting.
  This is the term FLOP accounting tends to forget.
* The indexer KL: its target needs the main attention scores again over the pairs it covers
  (warm-up: every causal pair, in the MHA form; sparse training: the probabilities the
  attention's backward recomputes, no products of their own).
* MLP: SwiGLU ``2*3*h*ffn``; MoE: router ``2*h*E`` + active experts ``topk*2*3*h*ffn_e`` + shared
  expert ``2*3*h*ffn_s``. Output layer ``2*h*V``.
* Multi-token prediction (``mtp_num_layers`` depths): each depth is one more decoder layer of the
  kind past the dense ones (DSA attention, MoE), its ``eh_proj`` (2h -> h) and one more pass of
  the shared output layer.

  Training multipliers: a part that trains costs forward + backward = 3x its forward; a frozen
  part that still runs costs 1x (warm-up runs the whole main model forward only); the
  indexer's top-k selection in sparse training runs without gradient (1x); in dense
  pretraining the indexer does not run at all.

One DSA attention core as the kernels execute it (``dsa_flops``, ``dense_attention_flops``:
the benchmarks' TFLOP/s), counting the passes the kernels really make (the sparse KL's target is
the probabilities the attention's backward recomputes: it adds no products of its own).
"""

from __future__ import annotations

from dataclasses import dataclass


def causal_pairs(seq: int) -> int:
    """(query, key) pairs with key <= query: S(S+1)/2."""
    return seq * (seq + 1) // 2


def sparse_pairs(seq: int, topk: int) -> int:
    """Pairs attended by top-k sparse attention: sum_t min(k, t+1)."""
    k = min(topk, seq)
    return k * (k + 1) // 2 + (seq - k) * k


# --------------------------------------------------------------------------------------------
# The whole model, per training sequence (the trainer's TFLOP/s)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The numbers the counter needs (read once from a DSATransformerConfig)."""

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    q_lora: int
    kv_lora: int
    qk_dim: int
    rope_dim: int
    v_dim: int
    moe_layers: int
    experts: int
    moe_topk: int
    moe_ffn: int
    shared_ffn: int
    idx_heads: int
    idx_dim: int
    topk: int
    vocab: int
    mtp_layers: int = 0

    @property
    def all_layers(self) -> int:
        """Decoder layers plus MTP depths (each depth is one more decoder layer)."""
        return self.num_layers + self.mtp_layers

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> "Shape":
        freq = cfg.moe_layer_freq
        if not cfg.num_moe_experts:
            moe_layers = 0
        elif isinstance(freq, list):
            moe_layers = sum(freq)
        else:
            moe_layers = sum(1 for i in range(cfg.num_layers) if i % int(freq or 1) == 0)
        return cls(
            num_layers=cfg.num_layers, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
            heads=cfg.num_attention_heads, q_lora=cfg.q_lora_rank, kv_lora=cfg.kv_lora_rank,
            qk_dim=cfg.qk_head_dim, rope_dim=cfg.qk_pos_emb_head_dim, v_dim=cfg.v_head_dim,
            moe_layers=moe_layers, experts=cfg.num_moe_experts or 0,
            moe_topk=cfg.moe_router_topk or 0, moe_ffn=cfg.moe_ffn_hidden_size or 0,
            shared_ffn=cfg.moe_shared_expert_intermediate_size or 0,
            idx_heads=cfg.dsa_indexer_n_heads, idx_dim=cfg.dsa_indexer_head_dim,
            topk=cfg.dsa_indexer_topk, vocab=vocab_size, mtp_layers=cfg.mtp_num_layers or 0,
        )


def forward_terms(shape: Shape, seq: int, mode: str) -> dict[str, float]:
    """Forward FLOPs of one sequence, by term, for mode dense | warmup | sparse."""
    s, h, L = shape, shape.hidden, shape.all_layers
    # Each MTP depth is one more decoder layer of the kind past the dense ones (MoE if any).
    moe_layers = shape.moe_layers + (shape.mtp_layers if shape.moe_layers else 0)
    dense_pairs = causal_pairs(seq)
    pairs = sparse_pairs(seq, s.topk) if mode == "sparse" else dense_pairs
    mla_proj = 2 * seq * (
        h * s.q_lora + s.q_lora * s.heads * (s.qk_dim + s.rope_dim) + h * (s.kv_lora + s.rope_dim)
        + s.heads * s.qk_dim * s.kv_lora + s.heads * s.kv_lora * s.v_dim + s.heads * s.v_dim * h
    )
    mha_scores = 2 * s.heads * (s.qk_dim + s.rope_dim)  # a pair's scores over each head's own key
    if mode == "sparse":  # absorbed: the one latent row serves every head
        per_pair_attn = 2 * s.heads * (s.kv_lora + s.rope_dim) + 2 * s.heads * s.kv_lora
    else:
        per_pair_attn = mha_scores + 2 * s.heads * s.v_dim
    dense_mlp_layers = L - moe_layers
    mlp = 2 * seq * (
        dense_mlp_layers * 3 * h * s.ffn
        + moe_layers * (h * s.experts + s.moe_topk * 3 * h * s.moe_ffn + 3 * h * s.shared_ffn)
    )
    terms = {
        "mla_projections": L * mla_proj,
        "attention": L * pairs * per_pair_attn,
        "mlp_moe": mlp,
        "output_layer": (1 + s.mtp_layers) * 2 * seq * h * s.vocab,
        "mtp_projections": s.mtp_layers * 2 * seq * 2 * h * h,
        "indexer_projections": 0,
        "indexer_scores": 0,
        "indexer_kl": 0,
    }
    if mode in ("warmup", "sparse"):
        terms["indexer_projections"] = L * 2 * seq * (s.q_lora * s.idx_heads * s.idx_dim + h * s.idx_dim + h * s.idx_heads)
        # The O(S^2) term: every causal pair, 2 * HI * DI (+ the head weighting).
        terms["indexer_scores"] = L * dense_pairs * (2 * s.idx_heads * s.idx_dim + 2 * s.idx_heads)
        kl_pairs = dense_pairs if mode == "warmup" else pairs
        # Warm-up: the target scores the main attention again over every pair. Sparse: the
        # target is the probabilities the attention's backward recomputes (no products of its
        # own), and the indexer rescores the selected keys.
        target = mha_scores if mode == "warmup" else 0
        rescore = 0 if mode == "warmup" else 2 * s.idx_heads * s.idx_dim
        terms["indexer_kl"] = L * kl_pairs * (target + rescore)
    return {k: float(v) for k, v in terms.items()}


MAIN = ("mla_projections", "attention", "mlp_moe", "output_layer", "mtp_projections")


def training_terms(shape: Shape, seq: int, phase: str) -> dict[str, float]:
    """FLOPs of one training sequence (forward + backward), by term, for a phase."""
    mode = {"pretrain": "dense", "warmup": "warmup", "sparse": "sparse"}[phase]
    fwd = forward_terms(shape, seq, mode)
    out = {}
    for key, value in fwd.items():
        if key in MAIN:
            mult = 1 if phase == "warmup" else 3  # warm-up: main model frozen, forward only
        elif key == "indexer_scores":
            # warm-up: trained (3x); sparse: the selection runs without gradient (1x), the KL
            # backward re-scores only the selected pairs (counted in indexer_kl).
            mult = 3 if phase == "warmup" else 1
        else:
            mult = 3  # indexer projections and the KL train the indexer
        out[key] = value * mult
    if phase == "sparse":
        # The KL's backward recomputes the selected pairs' logits before dq_idx and dk_idx.
        out["indexer_kl"] += shape.all_layers * sparse_pairs(seq, shape.topk) * 2 * shape.idx_heads * shape.idx_dim
    return out


def training_flops_per_iteration(cfg, seq: int, global_batch: int, vocab_size: int, phase: str) -> float:
    """FLOPs of one optimizer step over ``global_batch`` sequences of ``seq`` tokens."""
    return global_batch * sum(training_terms(Shape.from_config(cfg, vocab_size), seq, phase).values())


# --------------------------------------------------------------------------------------------
# One attention core, as the kernels run it (benchmarks: TFLOP/s of a measured step)
# --------------------------------------------------------------------------------------------


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
    pairs_dense = float(causal_pairs(seq)) if causal else float(seq) * seq
    pairs_sparse = float(sparse_pairs(seq, topk)) if causal else float(seq) * min(topk, seq)
    out = {}
    out["indexer_scores"] = batch * 2.0 * idx_heads * idx_dim * pairs_dense
    attn_fwd = batch * 2.0 * heads * (dqk + dv) * pairs_sparse
    out["attn_fwd"] = attn_fwd
    # backward: recompute S (dqk), dP = dO V^T (dv), dQ (dqk), dK (dqk), dV (dv)
    out["attn_bwd"] = batch * 2.0 * heads * (3 * dqk + 2 * dv) * pairs_sparse if backward else 0.0
    if sparse_kl:
        # forward: the indexer logits over the set (the target comes from the attention backward)
        out["kl_fwd"] = batch * pairs_sparse * 2.0 * idx_heads * idx_dim
        # backward: logits recompute, dq_idx, dk_idx
        out["kl_bwd"] = batch * pairs_sparse * 3 * 2.0 * idx_heads * idx_dim if backward else 0.0
    if indexer_backward:
        out["indexer_dense_bwd"] = 2 * out["indexer_scores"]
    out["total"] = sum(out.values())
    return out


def dense_attention_flops(seq: int, heads: int, dqk: int, dv: int, batch: int = 1,
                          causal: bool = True, backward: bool = True) -> float:
    """FLOPs of dense (flash) attention, causal pairs ~S^2/2; backward 2.5x forward."""
    pairs = float(causal_pairs(seq)) if causal else float(seq) * seq
    fwd = batch * 2.0 * heads * (dqk + dv) * pairs
    return fwd * (3.5 if backward else 1.0)
