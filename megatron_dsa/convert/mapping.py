"""Names, shapes and configs: our megatron-core model <-> transformers' DSA models.

Two families, one model: ``DeepseekV32ForCausalLM`` (DeepSeek-V3.2) and
``GlmMoeDsaForCausalLM`` (GLM-5) have the same parameter names. Every tensor is copied as-is
(no permutation: see docs/hf-deepseek-v32-notes.md, section 3) except

* SwiGLU's ``linear_fc1 = cat(gate_proj, up_proj)`` (dense MLP, routed and shared experts);
* GLM-5's indexer RoPE, which rotates interleaved pairs (x0, x1), (x2, x3), ... where ours
  (and DeepSeek-V3.2's) rotates half-split pairs (x_i, x_i+r/2): the rope rows of the
  indexer's ``wq_b`` (per head), ``wk`` and ``k_norm`` are reordered evens-then-odds on
  import (and back on export), which makes the two rotations the same function;
* the router weight and its expert bias, fp32 in HF.

GLM-5's ``indexer_types`` ("full" runs the indexer, "shared" reuses the previous full
layer's top-k) is ``mdsa_indexer_types``; DeepSeek-V3.2 selects in every layer.

The releases' multi-token-prediction layer (``num_nextn_predict_layers``, stored as layer
``num_hidden_layers``) is megatron-core's MTP block (``mtp.layers.{d}``): its decoder layer
by the decoder's rules, ``enorm`` / ``hnorm`` / ``eh_proj`` as they are, ``shared_head.norm``
its ``final_layernorm``; the release's ``embed_tokens`` / ``shared_head.head`` in that layer
are copies of the model's embedding and output layer (``mtp_shared_copies``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_dsa.convert.errors import ConversionError
from megatron_dsa.model import ModelSize, deepseek_v3_style


@dataclass(frozen=True)
class Family:
    """A transformers model class our model maps onto one-to-one."""

    model_type: str
    architecture: str
    name: str
    indexer_rope_interleaved: bool  # GLM-5's indexer rotates interleaved pairs
    indexer_types: bool  # the config has per-layer "full" / "shared" indexers


FAMILIES = {
    f.model_type: f
    for f in (
        Family("deepseek_v32", "DeepseekV32ForCausalLM", "DeepSeek-V3.2", False, False),
        Family("glm_moe_dsa", "GlmMoeDsaForCausalLM", "GLM-5", True, True),
    )
}


def family_of(hf: dict[str, Any]) -> Family:
    """The family of an HF config.json dict; ConversionError for any other model."""
    family = FAMILIES.get(hf.get("model_type"))
    archs = hf.get("architectures")
    if family is None or (archs is not None and family.architecture not in archs):
        known = ", ".join(f"{f.model_type!r} ({f.architecture}, {f.name})" for f in FAMILIES.values())
        raise ConversionError(f"unsupported model: model_type={hf.get('model_type')!r}, architectures={archs!r}; "
                              f"known: {known}")
    return family


def family_named(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ConversionError(f"unknown model family {model_type!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# One our-name -> one or more HF names. kind: "copy" | "glu" (split rows in two halves) | "fp32".
_LAYER_RULES = [
    (r"input_layernorm\.weight", ["input_layernorm.weight"], "copy"),
    (r"pre_mlp_layernorm\.weight", ["post_attention_layernorm.weight"], "copy"),
    (r"self_attention\.linear_q_down_proj\.weight", ["self_attn.q_a_proj.weight"], "copy"),
    (r"self_attention\.q_layernorm\.weight", ["self_attn.q_a_layernorm.weight"], "copy"),
    (r"self_attention\.linear_q_up_proj\.weight", ["self_attn.q_b_proj.weight"], "copy"),
    (r"self_attention\.linear_kv_down_proj\.weight", ["self_attn.kv_a_proj_with_mqa.weight"], "copy"),
    (r"self_attention\.kv_layernorm\.weight", ["self_attn.kv_a_layernorm.weight"], "copy"),
    (r"self_attention\.linear_kv_up_proj\.weight", ["self_attn.kv_b_proj.weight"], "copy"),
    (r"self_attention\.linear_proj\.weight", ["self_attn.o_proj.weight"], "copy"),
    (r"self_attention\.core_attention\.indexer\.wq_b\.weight", ["self_attn.indexer.wq_b.weight"], "indexer_q"),
    (r"self_attention\.core_attention\.indexer\.(wk\.weight|k_norm\.weight|k_norm\.bias)",
     ["self_attn.indexer.{0}"], "indexer_k"),
    (r"self_attention\.core_attention\.indexer\.weights_proj\.weight",
     ["self_attn.indexer.weights_proj.weight"], "copy"),
    (r"mlp\.linear_fc1\.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], "glu"),
    (r"mlp\.linear_fc2\.weight", ["mlp.down_proj.weight"], "copy"),
    (r"mlp\.router\.weight", ["mlp.gate.weight"], "fp32"),
    (r"mlp\.router\.expert_bias", ["mlp.gate.e_score_correction_bias"], "fp32"),
    (r"mlp\.experts\.local_experts\.(\d+)\.linear_fc1\.weight",
     ["mlp.experts.{0}.gate_proj.weight", "mlp.experts.{0}.up_proj.weight"], "glu"),
    (r"mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight", ["mlp.experts.{0}.down_proj.weight"], "copy"),
    (r"mlp\.shared_experts\.linear_fc1\.weight",
     ["mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"], "glu"),
    (r"mlp\.shared_experts\.linear_fc2\.weight", ["mlp.shared_experts.down_proj.weight"], "copy"),
]
_LAYER_RULES = [(re.compile(p + r"$"), names, kind) for p, names, kind in _LAYER_RULES]
_TOP = {
    "embedding.word_embeddings.weight": (["model.embed_tokens.weight"], "copy"),
    "decoder.final_layernorm.weight": (["model.norm.weight"], "copy"),
    "output_layer.weight": (["lm_head.weight"], "copy"),
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")
# Multi-token prediction: depth d is the release's layer num_hidden_layers + d. Its own tensors
# besides a decoder layer's; the concatenation order of eh_proj's input is the same on both
# sides (embedding first, then hidden state), so it is copied as-is.
_MTP = re.compile(r"mtp\.layers\.(\d+)\.(.+)$")
_MTP_OWN = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_layernorm.weight": "shared_head.norm.weight",
}
# The release stores the MTP layer's embedding and output head again beside its other tensors;
# megatron-core's MTP block uses the model's own (one parameter each), so these are copies.
_MTP_SHARED = {
    "embedding.word_embeddings.weight": "embed_tokens.weight",
    "output_layer.weight": "shared_head.head.weight",
}


def _layer_names(prefix: str, rest: str, name: str) -> tuple[list[str], str]:
    for pattern, names, kind in _LAYER_RULES:
        r = pattern.match(rest)
        if r:
            return [prefix + n.format(*r.groups()) for n in names], kind
    raise ConversionError(f"no Hugging Face name for the megatron tensor {name!r}")


def hf_names(name: str, num_layers: Optional[int] = None) -> tuple[list[str], str]:
    """HF tensor names for one of our state-dict names, and how to convert
    ('copy' | 'glu' | 'fp32' | 'indexer_q' | 'indexer_k'). ``num_layers`` (the decoder's)
    numbers the multi-token-prediction layers that follow it."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.match(name)
    if m:
        layer, rest = m.groups()
        return _layer_names(f"model.layers.{layer}.", rest, name)
    m = _MTP.match(name)
    if m:
        if num_layers is None:
            raise ConversionError(f"{name!r} is a multi-token-prediction tensor: its HF name needs num_layers")
        depth, rest = m.groups()
        prefix = f"model.layers.{num_layers + int(depth)}."
        if rest in _MTP_OWN:
            return [prefix + _MTP_OWN[rest]], "copy"
        if rest.startswith("mtp_model_layer."):
            return _layer_names(prefix, rest.removeprefix("mtp_model_layer."), name)
    raise ConversionError(f"no Hugging Face name for the megatron tensor {name!r}")


def mtp_shared_copies(name: str, num_layers: int, mtp_num_layers: Optional[int]) -> list[str]:
    """The HF names under which the release repeats one of our shared tensors (the embedding,
    the output layer) for each multi-token-prediction layer; [] for any other tensor."""
    if name not in _MTP_SHARED:
        return []
    return [f"model.layers.{num_layers + d}.{_MTP_SHARED[name]}" for d in range(mtp_num_layers or 0)]


@dataclass(frozen=True)
class IndexerRope:
    """Where the indexer's rope dims are, for families whose indexer rotates interleaved pairs."""

    n_heads: int
    head_dim: int
    rope_dim: int

    def rows(self, kind: str, n_rows: int) -> torch.Tensor:
        """Our row j is HF's row ``rows[j]``: in each head (one key head for 'indexer_k'),
        the rope dims evens first, then odds; the other dims stay."""
        head = torch.arange(self.head_dim)
        head[: self.rope_dim] = torch.cat([torch.arange(0, self.rope_dim, 2), torch.arange(1, self.rope_dim, 2)])
        heads = self.n_heads if kind == "indexer_q" else 1
        order = (torch.arange(heads)[:, None] * self.head_dim + head[None]).flatten()
        if order.numel() != n_rows:
            raise ConversionError(f"indexer tensor with {n_rows} rows, expected {order.numel()}")
        return order


def indexer_rope_of(cfg, family: Family) -> Optional[IndexerRope]:
    s = cfg.dsa
    return IndexerRope(s.n_heads, s.head_dim, s.rope_dim) if family.indexer_rope_interleaved else None


def to_hf_tensors(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None,
                  indexer_rope: Optional[IndexerRope] = None, num_layers: Optional[int] = None,
                  mtp_num_layers: Optional[int] = None) -> dict[str, torch.Tensor]:
    """HF tensors for one of ours, in ``dtype`` (default: as stored; the router's stay fp32),
    with the release's copies for its multi-token-prediction layers (``mtp_shared_copies``)."""
    names, kind = hf_names(name, num_layers)
    if kind == "fp32":
        return {names[0]: tensor.float().contiguous()}
    tensor = tensor.to(dtype or tensor.dtype)
    if kind == "glu":
        gate, up = tensor.chunk(2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}
    if kind.startswith("indexer_") and indexer_rope is not None:
        tensor = tensor[torch.argsort(indexer_rope.rows(kind, tensor.shape[0]))]
    tensor = tensor.contiguous()
    copies = mtp_shared_copies(name, num_layers, mtp_num_layers) if mtp_num_layers else []
    # Each copy its own storage: safetensors refuses tensors that share memory.
    return {names[0]: tensor, **{n: tensor.clone() for n in copies}}


def from_hf_tensors(name: str, tensors: list[torch.Tensor], dtype: torch.dtype,
                    indexer_rope: Optional[IndexerRope] = None, num_layers: Optional[int] = None) -> torch.Tensor:
    _, kind = hf_names(name, num_layers)
    if kind == "glu":
        return torch.cat(tensors, dim=0).to(dtype)
    if kind.startswith("indexer_") and indexer_rope is not None:
        return tensors[0][indexer_rope.rows(kind, tensors[0].shape[0])].to(dtype)
    return tensors[0].to(dtype)


def hf_shapes(name: str, shape: tuple[int, ...], num_layers: Optional[int] = None) -> list[tuple[int, ...]]:
    names, kind = hf_names(name, num_layers)
    if kind == "glu":
        return [(shape[0] // 2, *shape[1:])] * 2
    return [tuple(shape)]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ConversionError(f"unsupported parameter dtype {dtype}")


# transformers hard-codes these epsilons: the MLA latent norms (q_a / kv_a) and the indexer's
# key LayerNorm; the decoder norms use the config's rms_norm_eps.
HF_LATENT_NORM_EPS = 1e-6


def latent_norm_eps(cfg) -> float:
    return cfg.mdsa_latent_norm_eps if cfg.mdsa_latent_norm_eps is not None else cfg.layernorm_epsilon


def check_exportable(cfg, family: Family) -> None:
    """Settings the family's HF model cannot express: one ConversionError."""
    s = cfg.dsa
    problems = []
    selects = [s.selects(i + 1) for i in range(cfg.num_layers)]
    if not family.indexer_types and not all(selects):
        problems.append(f"dsa_indexer_topk_freq={s.topk_freq} / mdsa_indexer_types "
                        f"({family.name} selects in every layer)")
    if s.indexer_sharing != "per_layer":
        problems.append(f"mdsa_indexer_sharing={s.indexer_sharing!r} (HF has one indexer per layer)")
    if s.rope_dim != cfg.qk_pos_emb_head_dim:
        problems.append(f"indexer rope dims {s.rope_dim} != MLA rope dims {cfg.qk_pos_emb_head_dim}")
    if s.k_norm_eps != HF_LATENT_NORM_EPS or latent_norm_eps(cfg) != HF_LATENT_NORM_EPS:
        problems.append("the q/kv latent norms and the indexer's key norm need epsilon 1e-6 (HF hard-codes it)")
    if cfg.rope_type == "rope" and cfg.mscale_all_dim:
        problems.append("plain RoPE with mscale_all_dim (a softmax scale HF's default RoPE does not apply)")
    if cfg.rope_type == "yarn" and not cfg.mscale_all_dim and cfg.mscale != 1:
        problems.append("YaRN with mscale != 1 but no mscale_all_dim (HF then ignores mscale)")
    if cfg.num_moe_experts:
        topk, groups, gtopk = cfg.moe_router_topk, cfg.moe_router_num_groups, cfg.moe_router_group_topk
        if cfg.moe_router_score_function != "sigmoid" or not cfg.moe_router_enable_expert_bias:
            problems.append("the router must be sigmoid with expert bias")
        if topk < 2:
            problems.append("moe_router_topk must be >= 2 (megatron normalises sigmoid weights only then)")
        if groups and groups > 1 and not (topk == 2 * gtopk or gtopk == groups):
            problems.append(f"moe_router_topk ({topk}) must be 2 * moe_router_group_topk ({gtopk})")
        if cfg.moe_shared_expert_intermediate_size and cfg.moe_shared_expert_intermediate_size % cfg.moe_ffn_hidden_size:
            problems.append("shared expert size must be a multiple of moe_ffn_hidden_size")
        if cfg.moe_shared_expert_gate:
            problems.append("gated shared experts do not exist in HF")
    if problems:
        raise ConversionError(f"cannot export to {family.architecture}: " + "; ".join(problems))


def hf_rope_parameters(cfg) -> dict[str, Any]:
    rope = {"rope_theta": float(cfg.rotary_base), "rope_type": "default"}
    if cfg.rope_type == "yarn":
        y = cfg.dsa.yarn
        rope.update(rope_type="yarn", factor=y.factor, original_max_position_embeddings=y.original_max_position_embeddings,
                    beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
    return rope


def hf_config_dict(cfg, family: Family, first_k_dense: int, vocab_size: int, max_seq_len: int,
                   dtype: torch.dtype, special_ids: dict | None = None) -> dict[str, Any]:
    """config.json content of the family's HF model for our transformer config."""
    check_exportable(cfg, family)
    s = cfg.dsa
    L = cfg.num_layers
    moe = bool(cfg.num_moe_experts)
    k_dense = first_k_dense if moe else L
    d = dict(
        architectures=[family.architecture],
        model_type=family.model_type,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        moe_intermediate_size=cfg.moe_ffn_hidden_size if moe else cfg.ffn_hidden_size,
        num_hidden_layers=L,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=(cfg.moe_shared_expert_intermediate_size or 0) // cfg.moe_ffn_hidden_size if moe else 0,
        n_routed_experts=cfg.num_moe_experts if moe else 1,
        num_experts_per_tok=cfg.moe_router_topk if moe else 1,
        n_group=(cfg.moe_router_num_groups or 1) if moe else 1,
        topk_group=(cfg.moe_router_group_topk or 1) if moe else 1,
        routed_scaling_factor=float(cfg.moe_router_topk_scaling_factor or 1.0) if moe else 1.0,
        norm_topk_prob=True,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_pos_emb_head_dim,
        qk_nope_head_dim=cfg.qk_head_dim,
        v_head_dim=cfg.v_head_dim,
        index_n_heads=s.n_heads,
        index_head_dim=s.head_dim,
        index_topk=s.topk,
        first_k_dense_replace=k_dense,
        mlp_layer_types=["dense"] * k_dense + ["sparse"] * (L - k_dense),
        hidden_act="silu",
        rms_norm_eps=cfg.layernorm_epsilon,
        max_position_embeddings=max_seq_len,
        rope_parameters=hf_rope_parameters(cfg),
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        num_nextn_predict_layers=cfg.mtp_num_layers or 0,
        initializer_range=cfg.init_method_std,
        use_cache=True,
        dtype=dtype_name(dtype),
    )
    if family.indexer_types:
        d["indexer_types"] = ["full" if s.selects(i + 1) else "shared" for i in range(L)]
    if special_ids:
        d.update(special_ids)
    return d


def mtp_layers_of(hf: dict[str, Any]) -> int:
    """The multi-token-prediction layers an HF config names (the releases' ``num_nextn_predict_layers``)."""
    return int(hf.get("num_nextn_predict_layers") or 0)


def size_from_hf_config(hf: dict[str, Any], name: str = "hf", drop_mtp: bool = False) -> ModelSize:
    """A ModelSize equivalent to an HF config.json dict of a known family; ConversionError if
    the HF model uses something our model cannot reproduce exactly. The HF config sets the
    numbers; the conventions are ``model.deepseek_v3_style``'s. ``drop_mtp``: without the
    multi-token-prediction layers the config names."""
    family = check_hf_config(hf)
    L = hf["num_hidden_layers"]
    k_dense = _first_k_dense(hf)
    rope = _rope_parameters(hf)
    dtype = DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", ""), torch.float32)
    moe = k_dense < L
    eps = hf.get("rms_norm_eps", 1e-6)
    fields = dict(
        num_layers=L,
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rotary_base=rope.get("rope_theta", 10000.0),
        layernorm_epsilon=eps,
        dsa_indexer_n_heads=hf["index_n_heads"],
        dsa_indexer_head_dim=hf["index_head_dim"],
        dsa_indexer_topk=hf["index_topk"],
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        mtp_num_layers=None if drop_mtp else (mtp_layers_of(hf) or None),
    )
    if eps != HF_LATENT_NORM_EPS:
        fields["mdsa_latent_norm_eps"] = HF_LATENT_NORM_EPS
    fields.update(_yarn_fields(hf, rope))
    types = _indexer_types(hf, family)
    if types is not None and "shared" in types:
        fields["mdsa_indexer_types"] = types
    if moe:
        n_group = hf.get("n_group") or 1
        fields.update(
            num_moe_experts=hf["n_routed_experts"],
            moe_router_topk=hf["num_experts_per_tok"],
            moe_ffn_hidden_size=hf["moe_intermediate_size"],
            moe_shared_expert_intermediate_size=(hf["moe_intermediate_size"] * hf["n_shared_experts"]
                                                 if hf.get("n_shared_experts") else None),
            moe_router_num_groups=n_group if n_group > 1 else None,
            moe_router_group_topk=hf.get("topk_group") if n_group > 1 else None,
            moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        )
    return ModelSize(
        name=name,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 163840),
        first_k_dense=k_dense,
        transformer=deepseek_v3_style(**fields),
        family=family.model_type,
    )


def _rope_parameters(hf: dict) -> dict:
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:
        rope = {"rope_theta": hf.get("rope_theta", 10000.0), "rope_type": "default"}
        if hf.get("rope_scaling"):
            rope.update(hf["rope_scaling"])
            rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_problems(hf: dict, rope: dict) -> list[str]:
    """What of an HF YaRN setting megatron-core's YarnRotaryEmbedding cannot reproduce."""
    if rope.get("rope_type") != "yarn":
        return []
    problems = []
    if rope.get("original_max_position_embeddings") is None:
        problems.append("YaRN rope_parameters without original_max_position_embeddings")
    if rope.get("truncate", True) is not True:
        problems.append("YaRN with truncate=false (megatron-core rounds the correction range)")
    if rope.get("mscale_all_dim") and not rope.get("mscale"):
        problems.append("YaRN with mscale_all_dim but no mscale")
    fields = _yarn_fields(hf, rope) if not problems else {}
    if fields and rope.get("attention_factor") is not None:
        f, m, mad = fields["rotary_scaling_factor"], fields["mscale"], fields["mscale_all_dim"]
        if not math.isclose(rope["attention_factor"], _yarn_mscale(f, m) / _yarn_mscale(f, mad), rel_tol=1e-12):
            problems.append(f"YaRN attention_factor {rope['attention_factor']} is not the one its mscale values give")
    return problems


def _yarn_fields(hf: dict, rope: dict) -> dict[str, Any]:
    """megatron-core's YaRN fields for an HF rope_parameters dict ({} for plain RoPE).

    HF scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are
    set, by mscale(factor) otherwise; megatron-core always by the ratio, so a missing
    mscale_all_dim becomes 0 (mscale(factor, 0) = 1) with mscale 1."""
    if rope.get("rope_type") != "yarn":
        return {}
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or hf.get("max_position_embeddings", original) / original
    both = bool(rope.get("mscale")) and bool(rope.get("mscale_all_dim"))
    return dict(
        rope_type="yarn",
        rotary_scaling_factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope["mscale"]) if both else 1.0,
        mscale_all_dim=float(rope["mscale_all_dim"]) if both else 0.0,
    )


def _indexer_types(hf: dict, family: Family) -> Optional[list[str]]:
    if not family.indexer_types:
        return None
    types = hf.get("indexer_types")
    return list(types) if types is not None else ["full"] * hf["num_hidden_layers"]


def _first_k_dense(hf: dict) -> int:
    L = hf["num_hidden_layers"]
    types = hf.get("mlp_layer_types")
    if types is None:
        k = hf.get("first_k_dense_replace", 3)
        return min(k, L)
    k = 0
    while k < L and types[k] == "dense":
        k += 1
    return k


def check_hf_config(hf: dict[str, Any]) -> Family:
    """The config's family; everything that makes it unimportable in one ConversionError."""
    family = family_of(hf)
    problems = []
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                "index_n_heads", "index_head_dim", "index_topk")
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks required {family.name} keys: {missing}")
    if hf.get("q_lora_rank") is None:
        problems.append("q_lora_rank is None (the indexer needs the query latent)")
    rope = _rope_parameters(hf)
    rtype = rope.get("rope_type", "default")
    if rtype == "default" and rope.get("factor") not in (None, 1, 1.0):
        problems.append(f"default RoPE with factor {rope.get('factor')}")
    elif rtype not in ("default", "yarn"):
        problems.append(f"rope scaling {rtype!r} (plain RoPE and YaRN are supported)")
    problems += _yarn_problems(hf, rope)
    if hf.get("norm_topk_prob", True) is not True:
        problems.append("norm_topk_prob is False (megatron always normalises sigmoid top-k weights)")
    L = hf["num_hidden_layers"]
    k_dense = _first_k_dense(hf)
    types = hf.get("mlp_layer_types")
    if types is not None and list(types) != ["dense"] * k_dense + ["sparse"] * (L - k_dense):
        problems.append(f"mlp_layer_types {types} is not dense^k followed by sparse")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "indexed_attention" for t in layer_types):
        problems.append("every layer must be 'indexed_attention'")
    indexer_types = _indexer_types(hf, family)
    if indexer_types is not None:
        if len(indexer_types) != L or any(t not in ("full", "shared") for t in indexer_types):
            problems.append(f"indexer_types must name 'full' or 'shared' for each of the {L} layers")
        elif indexer_types[0] != "full":
            problems.append("indexer_types: the first layer must be 'full' (a 'shared' layer reuses an earlier one)")
    if k_dense < L:
        topk, n_group, topk_group = hf.get("num_experts_per_tok"), hf.get("n_group") or 1, hf.get("topk_group") or 1
        if topk is None or topk < 2:
            problems.append(f"num_experts_per_tok={topk} (needs >= 2: megatron normalises sigmoid weights only then)")
        elif n_group > 1 and not (topk == 2 * topk_group or topk_group == n_group):
            problems.append(
                f"num_experts_per_tok ({topk}) != 2 * topk_group ({topk_group}): megatron scores expert "
                "groups by the sum of their top-(topk/topk_group) experts, HF by their top-2"
            )
        if hf.get("n_routed_experts", 0) % n_group:
            problems.append("n_routed_experts must be divisible by n_group")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        problems.append("num_key_value_heads must equal num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (only silu)")
    if hf.get("attention_bias"):
        problems.append("attention_bias=True is not supported")
    if hf.get("tie_word_embeddings"):
        problems.append("tied embeddings are not supported")
    mtp = hf.get("num_nextn_predict_layers") or 0
    if not isinstance(mtp, int) or isinstance(mtp, bool) or mtp < 0:
        problems.append(f"num_nextn_predict_layers={mtp!r} must be an integer >= 0")
    eps = hf.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        problems.append(f"rms_norm_eps={eps!r} must be a positive number")
    d, r = hf["index_head_dim"], hf["qk_rope_head_dim"]
    if d % 2 or d < r:
        problems.append(f"index_head_dim={d} must be even and >= qk_rope_head_dim ({r})")
    if problems:
        raise ConversionError(f"unsupported {family.name} settings: " + "; ".join(problems))
    return family
