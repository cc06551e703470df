"""The model: its shapes (the one owner of them) and its build from megatron-core pieces.

Sizes (``SIZES``: ``tiny``, ``small``, ``v32-slice``, the 671B shape, GLM-5) are ``ModelSize``
records on top of the DeepSeek-V3 conventions (``deepseek_v3_style``). The trainer, its
preflight and the converter all read shapes from here: ``model_config`` for a size's config, ``SHAPE_FIELDS`` /
``parameter_shape`` for what a checkpoint must agree on, ``ModelSize.to_json`` /
``from_json`` for the size a checkpoint records.

Architecture (one-to-one with Hugging Face's ``DeepseekV32ForCausalLM``): token embedding ->
layers of [RMSNorm -> MLA (query latent, absorbed form, DSA core attention) -> RMSNorm ->
SwiGLU MLP (first ``first_k_dense`` layers) or MoE (one shared expert + routed experts,
sigmoid routing with the expert-bias balancer, group-limited routing, top-k scaling factor)]
-> RMSNorm -> untied output layer. With ``mtp_num_layers`` (the releases have one): megatron-core's
multi-token-prediction block after the decoder, each depth a DSA layer of its own
(``spec.dsa_mtp_block_spec``), sharing the embedding and the output layer.

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
from megatron.core.models.gpt.gpt_model import GPTModel

from megatron_dsa import backends
from megatron_dsa.config import DSAConfigError, DSATransformerConfig, check_field_types
from megatron_dsa.layer import DSACoreAttention, LightningIndexer
from megatron_dsa.spec import dsa_block_spec, dsa_mtp_block_spec


@dataclass(frozen=True)
class ModelSize:
    """Shape of one named model. ``transformer`` holds DSATransformerConfig fields."""

    name: str
    vocab_size: int
    max_seq_len: int
    first_k_dense: int
    transformer: dict[str, Any] = field(default_factory=dict)
    # The transformers model type it maps onto one-to-one: "deepseek_v32" (DeepSeek-V3.2) or
    # "glm_moe_dsa" (GLM-5). Shapes and layers are the same kind; only the export differs.
    family: str = "deepseek_v32"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able record of this size (checkpoints carry it); ``from_json`` reads it back."""
        fields = {}
        for key, value in self.transformer.items():
            if isinstance(value, torch.dtype):
                value = {"dtype": str(value).removeprefix("torch.")}
            elif callable(value):
                value = {"callable": getattr(value, "__name__", str(value))}
            fields[key] = value
        return dict(name=self.name, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len,
                    first_k_dense=self.first_k_dense, transformer=fields, family=self.family)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "ModelSize":
        fields = {}
        for key, value in record["transformer"].items():
            if isinstance(value, dict) and "dtype" in value:
                value = getattr(torch, value["dtype"])
            elif isinstance(value, dict) and "callable" in value:
                continue  # the activation: fixed by the DeepSeek style (silu)
            elif key == "transformer_impl":
                continue  # TE where installed, local elsewhere (decided by the reader, not the writer)
            fields[key] = value
        return cls(name=record["name"], vocab_size=record["vocab_size"], max_seq_len=record["max_seq_len"],
                   first_k_dense=record["first_k_dense"], transformer=deepseek_v3_style(**fields),
                   family=record.get("family", "deepseek_v32"))


# DSATransformerConfig fields that fix parameter shapes: a checkpoint loads into a model iff
# these and first_k_dense agree.
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_moe_experts",
    "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk",
    "dsa_indexer_n_heads", "dsa_indexer_head_dim", "mdsa_indexer_sharing", "dsa_indexer_topk_freq",
    "mdsa_indexer_types",
    "add_bias_linear", "gated_linear_unit", "normalization", "mtp_num_layers",
)


def parameter_shape(config: DSATransformerConfig, first_k_dense: int) -> dict[str, Any]:
    """What fixes the parameters' shapes in a built model (``SHAPE_FIELDS`` + first_k_dense)."""
    shape = {name: getattr(config, name, None) for name in SHAPE_FIELDS}
    shape["mtp_num_layers"] = shape["mtp_num_layers"] or None  # 0 and None: no MTP block
    shape["first_k_dense"] = first_k_dense
    return shape


def deepseek_v3_style(**overrides: Any) -> dict[str, Any]:
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
        moe_router_topk_scaling_factor=2.5,
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
        transformer=deepseek_v3_style(
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
        transformer=deepseek_v3_style(
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
            dsa_indexer_n_heads=4,
            dsa_indexer_head_dim=64,
            dsa_indexer_topk=512,
        ),
    ),
    # The DeepSeek-V3.2 release's shape and RoPE (YaRN, factor 40 over 4096 positions), for
    # validation and planning; built on the meta device only (tests/test_convert_release.py).
    "deepseek-v3.2-671b": ModelSize(
        name="deepseek-v3.2-671b",
        vocab_size=129280,
        max_seq_len=163840,
        first_k_dense=3,
        transformer=deepseek_v3_style(
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
            dsa_indexer_n_heads=64,
            dsa_indexer_head_dim=128,
            dsa_indexer_topk=2048,
            mtp_num_layers=1,  # the release's layer 61 (num_nextn_predict_layers)
            rope_type="yarn",
            rotary_scaling_factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
            bf16=True,
            params_dtype=torch.bfloat16,
        ),
    ),
    # GLM-5 (transformers' GlmMoeDsaForCausalLM, zai-org/GLM-5): 744B, 64 heads of 192 + 64 dims,
    # 256-dim values, 32 indexer heads, one routing group, norms at 1e-5 but its latent norms at
    # 1e-6, plain RoPE base 1e6. Every layer runs its indexer (transformers' default
    # indexer_types); a release that shares top-k sets mdsa_indexer_types. Meta device only.
    "glm-5": ModelSize(
        name="glm-5",
        vocab_size=154880,
        max_seq_len=202752,
        first_k_dense=3,
        family="glm_moe_dsa",
        transformer=deepseek_v3_style(
            num_layers=78,
            hidden_size=6144,
            ffn_hidden_size=12288,
            num_attention_heads=64,
            q_lora_rank=2048,
            kv_lora_rank=512,
            qk_head_dim=192,
            qk_pos_emb_head_dim=64,
            v_head_dim=256,
            num_moe_experts=256,
            moe_router_topk=8,
            moe_ffn_hidden_size=2048,
            moe_shared_expert_intermediate_size=2048,
            dsa_indexer_n_heads=32,
            dsa_indexer_head_dim=128,
            dsa_indexer_topk=2048,
            mtp_num_layers=1,  # the release's layer 78 (num_nextn_predict_layers)
            rotary_base=1000000.0,
            layernorm_epsilon=1e-5,
            mdsa_latent_norm_eps=1e-6,
            bf16=True,
            params_dtype=torch.bfloat16,
        ),
    ),
}

# Two DeepSeek-V3.2-shaped layers for one GPU's model step (benchmarks/bench_model_step.py): the
# release's hidden size, heads, MLA and indexer dims and RoPE, with 8 small routed experts per layer,
# no MTP and a small vocabulary in place of its 256 experts and 129K tokens (~0.7B parameters).
SIZES["v32-slice"] = ModelSize(
    name="v32-slice",
    vocab_size=8192,
    max_seq_len=131072,
    first_k_dense=0,
    transformer={**SIZES["deepseek-v3.2-671b"].transformer,
                 **dict(num_layers=2, ffn_hidden_size=2048, num_moe_experts=8, moe_router_topk=4,
                        moe_ffn_hidden_size=512, moe_shared_expert_intermediate_size=512,
                        moe_router_num_groups=4, moe_router_group_topk=2, mtp_num_layers=None)},
)


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
    fields["transformer_impl"] = backends.resolve_transformer_impl(fields.get("transformer_impl", "auto"))
    backends.check_fp8(fields.get("fp8"), fields["transformer_impl"])
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
    spec = resolve_size(size)
    config = config if config is not None else model_config(spec)
    model = GPTModel(
        config=config,
        transformer_layer_spec=dsa_block_spec(config, spec.first_k_dense, vp_stage=vp_stage),
        mtp_block_spec=dsa_mtp_block_spec(config, spec.first_k_dense, vp_stage=vp_stage),
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
    """The DSA core attention modules of a model, in layer order (the decoder's, then those of
    the multi-token-prediction layers, numbered on from ``num_layers``)."""
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
    if not layers[0].selects:
        raise DSAConfigError(
            f"invalid DSA configuration: layer {layers[0].layer_number} begins a pipeline stage but "
            f"would reuse the top-k selection of a layer on another stage (dsa_indexer_topk_freq="
            f"{settings.topk_freq}); give each stage a multiple of {settings.topk_freq} layers"
        )
    source = None
    for layer in layers:
        if layer.selects:
            source = layer
        elif source is not None:
            layer.reuse_selection_of(source)


def indexer_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of every lightning indexer (each shared parameter once)."""
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
