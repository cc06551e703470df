"""A scaled-down DeepSeek-V3-style MoE with DSA, built from megatron-core pieces.

Architecture (one-to-one with Hugging Face's ``DeepseekV32ForCausalLM``): token embedding ->
layers of [RMSNorm -> MLA (query latent, absorbed form, DSA core attention) -> RMSNorm ->
SwiGLU MLP (first ``first_k_dense`` layers) or MoE (one shared expert + routed experts,
sigmoid routing with the expert-bias balancer, group-limited routing, top-k scaling factor)]
-> RMSNorm -> untied output layer.

The model class is megatron-core's ``GPTModel`` with a per-layer block spec. (megatron-core
0.19 points new work at ``HybridModel``; without Transformer Engine its block hard-codes a TE
final norm and its GPT->hybrid checkpoint translation skips MLA layers, so GPTModel is the
class that runs everywhere this project must.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megatron_dsa.config import DSAConfigError, DSATransformerConfig, check_field_types


@dataclass(frozen=True)
class ModelSize:
    """Shape of one named model. ``transformer`` holds DSATransformerConfig fields."""

    name: str
    vocab_size: int
    max_seq_len: int
    first_k_dense: int
    transformer: dict[str, Any] = field(default_factory=dict)


TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
TE_INSTALL_HINT = "install the 'te' extra: pip install -e .[te]"


def te_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(requested: str = "auto") -> str:
    """``auto`` -> Transformer Engine where it is installed and CUDA is up, local elsewhere.

    The trainer resolves ``model.transformer_impl`` once with this and hands the result to both
    Megatron's ``--transformer-impl`` and ``model_config``, so the two never disagree.
    """
    if requested not in TRANSFORMER_IMPLS:
        raise DSAConfigError(f"transformer_impl must be one of {list(TRANSFORMER_IMPLS)}, got {requested!r}")
    if requested == "auto":
        return "transformer_engine" if te_installed() and torch.cuda.is_available() else "local"
    if requested == "transformer_engine" and not te_installed():
        raise DSAConfigError(
            f"transformer_impl 'transformer_engine' but Transformer Engine is not installed; "
            f"{TE_INSTALL_HINT} (or use transformer_impl 'local')"
        )
    return requested


def _deepseek_v3_style(**overrides: Any) -> dict[str, Any]:
    """DeepSeek-V3 conventions shared by every size; each size sets the numbers."""
    base = dict(
        # Resolved by model_config (resolve_transformer_impl): TE where usable, local elsewhere.
        transformer_impl="auto",
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        qk_layernorm=True,
        multi_latent_attention=True,
        rope_type="rope",
        rotary_base=10000,
        # MoE: sigmoid scores, expert-bias balancer, group-limited routing, scaled top-k.
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-4,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_shared_expert_overlap=False,
        bf16=False,
        params_dtype=torch.float32,
    )
    base.update(overrides)
    return base


SIZES: dict[str, ModelSize] = {
    # CPU tests: seconds per step.
    "tiny": ModelSize(
        name="tiny",
        vocab_size=512,
        max_seq_len=512,
        first_k_dense=1,
        transformer=_deepseek_v3_style(
            num_layers=3,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_head_dim=16,
            qk_pos_emb_head_dim=16,
            v_head_dim=16,
            num_moe_experts=8,
            # topk == 2 * group_topk: megatron-core and HF score groups alike (sum of top-2).
            moe_router_topk=4,
            moe_ffn_hidden_size=32,
            moe_shared_expert_intermediate_size=32,
            moe_router_num_groups=4,
            moe_router_group_topk=2,
            moe_router_topk_scaling_factor=2.5,
            dsa_indexer_n_heads=2,
            dsa_indexer_head_dim=32,
            dsa_indexer_topk=16,
        ),
    ),
    # One GPU: ~49M parameters in all (~16M active per token).
    "small": ModelSize(
        name="small",
        vocab_size=8192,
        max_seq_len=131072,
        first_k_dense=1,
        transformer=_deepseek_v3_style(
            num_layers=6,
            hidden_size=512,
            ffn_hidden_size=1536,
            num_attention_heads=8,
            q_lora_rank=192,
            kv_lora_rank=128,
            qk_head_dim=64,
            qk_pos_emb_head_dim=32,
            v_head_dim=64,
            num_moe_experts=16,
            moe_router_topk=4,
            moe_ffn_hidden_size=256,
            moe_shared_expert_intermediate_size=256,
            moe_router_num_groups=4,
            moe_router_group_topk=2,
            moe_router_topk_scaling_factor=2.5,
            dsa_indexer_n_heads=4,
            dsa_indexer_head_dim=64,
            dsa_indexer_topk=512,
        ),
    ),
    # The DeepSeek-V3.2 shape, for validation and planning only; never instantiated in tests.
    # (The released checkpoint scales RoPE with YaRN, factor 40; this release supports plain
    # RoPE, so the shape is exact and the rotary scaling is not.)
    "deepseek-v3.2-671b": ModelSize(
        name="deepseek-v3.2-671b",
        vocab_size=129280,
        max_seq_len=163840,
        first_k_dense=3,
        transformer=_deepseek_v3_style(
            num_layers=61,
            hidden_size=7168,
            ffn_hidden_size=18432,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_head_dim=128,
            qk_pos_emb_head_dim=64,
            v_head_dim=128,
            num_moe_experts=256,
            moe_router_topk=8,
            moe_ffn_hidden_size=2048,
            moe_shared_expert_intermediate_size=2048,
            moe_router_num_groups=8,
            moe_router_group_topk=4,
            moe_router_topk_scaling_factor=2.5,
            dsa_indexer_n_heads=64,
            dsa_indexer_head_dim=128,
            dsa_indexer_topk=2048,
            bf16=True,
            params_dtype=torch.bfloat16,
        ),
    ),
}


def resolve_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    if size not in SIZES:
        raise DSAConfigError(f"unknown model size {size!r}; known: {sorted(SIZES)}")
    return SIZES[size]


def model_config(size: str | ModelSize, **overrides: Any) -> DSATransformerConfig:
    """The validated transformer config of a named size, with field overrides.

    Raises DSAConfigError (or megatron-core's own error) before anything is built.
    """
    spec = resolve_size(size)
    fields = dict(spec.transformer)
    fields.update(overrides)
    known = {f.name for f in dataclasses.fields(DSATransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise DSAConfigError(f"unknown transformer config fields: {unknown}")
    if fields.get("num_moe_experts"):
        # The first layers are dense, the rest MoE (megatron-core's per-layer pattern).
        n = fields["num_layers"]
        fields.setdefault("moe_layer_freq", [0] * spec.first_k_dense + [1] * (n - spec.first_k_dense))
    if not torch.cuda.is_available():
        fields.setdefault("use_cpu_initialization", True)
    fields["transformer_impl"] = resolve_transformer_impl(fields.get("transformer_impl", "auto"))
    if fields.get("fp8") and fields["transformer_impl"] != "transformer_engine":
        # Local linears have no FP8 path: megatron-core would silently train in high precision.
        raise DSAConfigError(f"fp8={fields['fp8']!r} needs transformer_impl 'transformer_engine' (TE's FP8 GEMMs)")
    return DSATransformerConfig(**check_field_types(fields))


def build_model(
    size: str | ModelSize,
    config: DSATransformerConfig | None = None,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """Build the GPTModel for a named size (parallel state must be initialised)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_dsa.spec import dsa_block_spec

    spec = resolve_size(size)
    config = config if config is not None else model_config(spec)
    model = GPTModel(
        config=config,
        transformer_layer_spec=dsa_block_spec(config, spec.first_k_dense, vp_stage=vp_stage),
        vocab_size=vocab_size or spec.vocab_size,
        max_sequence_length=max_seq_len or spec.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",  # MLA applies its own RoPE
        vp_stage=vp_stage,
    )
    wire_indexer_sharing(model)
    return model


def dsa_layers(model: torch.nn.Module) -> list:
    """The DSA core attention modules of a model, in layer order."""
    from megatron_dsa.layer import DSACoreAttention

    layers = [m for m in model.modules() if isinstance(m, DSACoreAttention)]
    return sorted(layers, key=lambda m: m.layer_number)


def wire_indexer_sharing(model: torch.nn.Module) -> None:
    """Apply ``mdsa_indexer_sharing`` and ``dsa_indexer_topk_freq`` across the built layers."""
    layers = dsa_layers(model)
    if not layers:
        return
    settings = layers[0].config.dsa
    if settings.indexer_sharing == "shared":
        for layer in layers[1:]:
            layer.share_indexer_with(layers[0])
    source = None
    for layer in layers:
        if layer.selects:
            source = layer
        elif source is not None:
            layer.reuse_selection_of(source)


def indexer_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of every lightning indexer (each shared parameter once)."""
    from megatron_dsa.layer import LightningIndexer

    seen, params = set(), []
    for module in model.modules():
        if isinstance(module, LightningIndexer):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
