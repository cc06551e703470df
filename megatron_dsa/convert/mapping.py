"""Names, shapes and configs: our megatron-core model <-> HF ``DeepseekV32ForCausalLM``.

Every tensor is copied as-is (no permutation: see docs/hf-deepseek-v32-notes.md, section 3);
the only reshaping is SwiGLU's ``linear_fc1 = cat(gate_proj, up_proj)`` (dense MLP, routed
and shared experts). The router weight and its expert bias are fp32 in HF.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron_dsa.convert.errors import ConversionError
from megatron_dsa.model import ModelSize, deepseek_v3_style

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
    (r"self_attention\.core_attention\.indexer\.(wq_b|wk|weights_proj)\.weight",
     ["self_attn.indexer.{0}.weight"], "copy"),
    (r"self_attention\.core_attention\.indexer\.k_norm\.(weight|bias)",
     ["self_attn.indexer.k_norm.{0}"], "copy"),
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


def hf_names(name: str) -> tuple[list[str], str]:
    """HF tensor names for one of our state-dict names, and how to convert ('copy'|'glu'|'fp32')."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.match(name)
    if m:
        layer, rest = m.groups()
        for pattern, names, kind in _LAYER_RULES:
            r = pattern.match(rest)
            if r:
                return [f"model.layers.{layer}." + n.format(*r.groups()) for n in names], kind
    raise ConversionError(f"no Hugging Face name for the megatron tensor {name!r}")


def to_hf_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    names, kind = hf_names(name)
    if kind == "glu":
        gate, up = tensor.chunk(2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}
    if kind == "fp32":
        return {names[0]: tensor.float().contiguous()}
    return {names[0]: tensor.contiguous()}


def from_hf_tensors(name: str, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    _, kind = hf_names(name)
    if kind == "glu":
        return torch.cat(tensors, dim=0).to(dtype)
    return tensors[0].to(dtype)


def hf_shapes(name: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    names, kind = hf_names(name)
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


def check_exportable(cfg) -> None:
    """Settings HF's DeepseekV32 cannot express: one ConversionError."""
    s = cfg.dsa
    problems = []
    if s.topk_freq != 1:
        problems.append(f"dsa_indexer_topk_freq={s.topk_freq} (HF selects in every layer)")
    if s.indexer_sharing != "per_layer":
        problems.append(f"mdsa_indexer_sharing={s.indexer_sharing!r} (HF has one indexer per layer)")
    if s.rope_dim != cfg.qk_pos_emb_head_dim:
        problems.append(f"indexer rope dims {s.rope_dim} != MLA rope dims {cfg.qk_pos_emb_head_dim}")
    if s.k_norm_eps != 1e-6 or cfg.layernorm_epsilon != 1e-6:
        problems.append("norm epsilons must be 1e-6 (HF hard-codes it for q/kv/indexer norms)")
    if cfg.rope_type != "rope" or cfg.mscale_all_dim:
        problems.append("only plain RoPE without mscale is exported")
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
        raise ConversionError("cannot export to DeepseekV32ForCausalLM: " + "; ".join(problems))


def hf_config_dict(cfg, first_k_dense: int, vocab_size: int, max_seq_len: int,
                   dtype: torch.dtype, special_ids: dict | None = None) -> dict[str, Any]:
    """config.json content of DeepseekV32ForCausalLM for our transformer config."""
    check_exportable(cfg)
    s = cfg.dsa
    L = cfg.num_layers
    moe = bool(cfg.num_moe_experts)
    k_dense = first_k_dense if moe else L
    d = dict(
        architectures=["DeepseekV32ForCausalLM"],
        model_type="deepseek_v32",
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
        rope_parameters={"rope_theta": float(cfg.rotary_base), "rope_type": "default"},
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        initializer_range=cfg.init_method_std,
        use_cache=True,
        dtype=dtype_name(dtype),
    )
    if special_ids:
        d.update(special_ids)
    return d


def size_from_hf_config(hf: dict[str, Any], name: str = "hf") -> ModelSize:
    """A ModelSize equivalent to an HF DeepseekV32 config.json dict; ConversionError if the
    HF model uses something our model cannot reproduce exactly. The HF config sets the
    numbers; the conventions are ``model.deepseek_v3_style``'s."""
    check_hf_config(hf)
    L = hf["num_hidden_layers"]
    k_dense = _first_k_dense(hf)
    rope = _rope_parameters(hf)
    dtype = DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", ""), torch.float32)
    moe = k_dense < L
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
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        dsa_indexer_n_heads=hf["index_n_heads"],
        dsa_indexer_head_dim=hf["index_head_dim"],
        dsa_indexer_topk=hf["index_topk"],
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )
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
    )


def _rope_parameters(hf: dict) -> dict:
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:
        rope = {"rope_theta": hf.get("rope_theta", 10000.0), "rope_type": "default"}
        if hf.get("rope_scaling"):
            rope.update(hf["rope_scaling"])
            rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


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


def check_hf_config(hf: dict[str, Any]) -> None:
    """Everything that makes an HF config unimportable, in one ConversionError."""
    if hf.get("model_type") != "deepseek_v32" or "DeepseekV32ForCausalLM" not in (hf.get("architectures") or ["DeepseekV32ForCausalLM"]):
        raise ConversionError(
            f"not a DeepSeek-V3.2 checkpoint: model_type={hf.get('model_type')!r}, "
            f"architectures={hf.get('architectures')!r} (want 'deepseek_v32' / DeepseekV32ForCausalLM)"
        )
    problems = []
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                "index_n_heads", "index_head_dim", "index_topk")
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks required DeepSeek-V3.2 keys: {missing}")
    if hf.get("q_lora_rank") is None:
        problems.append("q_lora_rank is None (the indexer needs the query latent)")
    rope = _rope_parameters(hf)
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype != "default" or rope.get("factor") not in (None, 1, 1.0):
        problems.append(f"rope scaling {rtype!r} (yarn and other scaled RoPE are not supported; plain RoPE only)")
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
    if hf.get("rms_norm_eps", 1e-6) != 1e-6:
        problems.append(f"rms_norm_eps={hf.get('rms_norm_eps')} (HF's q/kv norms use 1e-6; megatron one eps for all)")
    d, r = hf["index_head_dim"], hf["qk_rope_head_dim"]
    if d % 2 or d < r:
        problems.append(f"index_head_dim={d} must be even and >= qk_rope_head_dim ({r})")
    if problems:
        raise ConversionError("unsupported DeepSeek-V3.2 settings: " + "; ".join(problems))
