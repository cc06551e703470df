"""megatron-core layer specs: MLA (absorbed form) whose core attention is DSA.

One transformer layer = input norm -> AbsorbedMLASelfAttention(core_attention=DSACoreAttention)
-> pre-MLP norm -> dense SwiGLU MLP (the first ``first_k_dense`` layers) or MoE. Modules come
from Transformer Engine when ``config.transformer_impl == "transformer_engine"`` (and TE is
installed), from megatron-core's local modules otherwise.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant.absorbed_mla import (
    AbsorbedMLASelfAttention,
    AbsorbedMLASelfAttentionSubmodules,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_dsa.config import DSATransformerConfig
from megatron_dsa.layer import (
    DSACoreAttention,
    DSACoreAttentionSubmodules,
    LightningIndexer,
    LightningIndexerSubmodules,
    ReplicatedLinear,
)


class DSAAbsorbedMLASelfAttention(AbsorbedMLASelfAttention):
    """megatron-core's absorbed MLA, with two changes for DSA:

    * under TP, the KV down-projection is replicated (as megatron-core's own DSA spec does with
      Transformer Engine's duplicated linear). megatron-core 0.19.2's column-parallel path
      gathers the projection over TP and keeps the rope-key part on full sequence rows, so its
      gradient holds only this rank's heads' share: every input gradient below the attention
      came out wrong by ~0.1-1% against one rank. The replicated path gathers the rope keys
      from the sequence-parallel region, whose backward reduce-scatters the full sum.
    * the DSA parallel layout is checked at the first line of the forward (before megatron
      splits its rotary table over CP, which would fail with an opaque reshape error).
    """

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        if config.tensor_model_parallel_size > 1 and submodules.linear_kv_down_proj is ColumnParallelLinear:
            self.linear_kv_down_proj = ReplicatedLinear(
                config.hidden_size,
                config.kv_lora_rank + config.qk_pos_emb_head_dim,
                config=config,
                init_method=config.init_method,
            )

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        from megatron_dsa.layer import check_parallel_sequence

        check_parallel_sequence(self.config, hidden_states.shape[0])
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


class SequenceParallelTorchNorm:
    """megatron-core's local torch norm (``WrappedTorchNorm``) that also runs under sequence
    parallelism: its parameters carry ``.sequence_parallel = True`` so megatron's
    ``finalize_model_grads`` sums their gradients over TP (the wrapped norm refuses SP)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        import torch
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not supported with sequence parallel")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm


def _norm(backend: BackendSpecProvider, config: DSATransformerConfig, for_qk: bool):
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=for_qk)
    if isinstance(backend, LocalSpecProvider):
        return SequenceParallelTorchNorm
    return norm


def backend_for(config: DSATransformerConfig) -> BackendSpecProvider:
    """TE modules when asked for (and installed), megatron-core's local modules otherwise."""
    if config.transformer_impl == "transformer_engine":
        try:
            from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
            import transformer_engine  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "transformer_impl='transformer_engine' but Transformer Engine is not installed; "
                "install the 'te' extra or use transformer_impl='local'"
            ) from err
        return TESpecProvider()
    return LocalSpecProvider()


def dsa_attention_spec(config: DSATransformerConfig, backend: BackendSpecProvider) -> ModuleSpec:
    """AbsorbedMLASelfAttention with an unfused query norm and DSA as core attention."""
    linear = backend.column_parallel_linear()
    core_attention = ModuleSpec(
        module=DSACoreAttention,
        submodules=DSACoreAttentionSubmodules(
            indexer=ModuleSpec(
                module=LightningIndexer,
                # Replicated on every TP rank, applied to that rank's sequence-parallel rows.
                submodules=LightningIndexerSubmodules(
                    wq_b=ReplicatedLinear, wk=ReplicatedLinear, weights_proj=ReplicatedLinear
                ),
            )
        ),
    )
    # Unfused: the indexer needs the normalised query latent outside the up-projection.
    qk_norm = _norm(backend, config, for_qk=True)
    return ModuleSpec(
        module=DSAAbsorbedMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=AbsorbedMLASelfAttentionSubmodules(
            linear_q_proj=linear,
            linear_q_down_proj=linear,
            linear_q_up_proj=linear,
            linear_kv_down_proj=linear,
            linear_kv_up_proj=linear,
            core_attention=core_attention,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            kv_layernorm=qk_norm,
        ),
    )


def dsa_layer_specs(config: DSATransformerConfig, first_k_dense: int) -> list[ModuleSpec]:
    """One spec per layer: dense SwiGLU MLP for the first ``first_k_dense`` layers, MoE after."""
    backend = backend_for(config)
    attention = dsa_attention_spec(config, backend)
    norm = _norm(backend, config, for_qk=False)
    dense_mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=None)
    moe = (
        get_mlp_module_spec_for_backend(
            backend=backend, num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
        if config.num_moe_experts
        else dense_mlp
    )
    specs = []
    for i in range(config.num_layers):
        specs.append(
            ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=attention,
                    self_attn_bda=get_bias_dropout_add,
                    pre_mlp_layernorm=norm,
                    mlp=dense_mlp if i < first_k_dense else moe,
                    mlp_bda=get_bias_dropout_add,
                ),
            )
        )
    return specs


def dsa_block_spec(
    config: DSATransformerConfig, first_k_dense: int, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The decoder block spec megatron-core's GPTModel takes (this pipeline stage's layers)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    backend = backend_for(config)
    specs = dsa_layer_specs(config, first_k_dense)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count],
        layer_norm=_norm(backend, config, for_qk=False),
    )
