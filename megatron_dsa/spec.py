"""megatron-core layer specs: MLA (absorbed form) whose core attention is DSA.

One transformer layer = input norm -> AbsorbedMLASelfAttention(core_attention=DSACoreAttention)
-> pre-MLP norm -> dense SwiGLU MLP (the first ``first_k_dense`` layers) or MoE. Modules come
from Transformer Engine when ``config.transformer_impl == "transformer_engine"`` (and TE is
installed), from megatron-core's local modules otherwise.

Under TE the linears, norms and MoE experts are TE modules (FP8 GEMMs when ``config.fp8`` is
set), and so are the indexer's ``wq_b`` / ``wk``. The DSA core attention is ours on either
backend: it runs our kernels on the high-precision (bf16/fp32) outputs of those linears.
"""

from __future__ import annotations

import functools
from functools import partial
from types import SimpleNamespace
from typing import Optional

import torch
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant.absorbed_mla import (
    AbsorbedMLASelfAttention,
    AbsorbedMLASelfAttentionSubmodules,
    _apply_absorbed_v_up_projection,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_dsa import backends
from megatron_dsa.config import DSATransformerConfig
from megatron_dsa.layer import (
    DSACoreAttention,
    DSACoreAttentionSubmodules,
    LightningIndexer,
    LightningIndexerSubmodules,
    ReplicatedLinear,
)
from megatron_dsa.parallel import global_sequence_length


class DSAAbsorbedMLASelfAttention(AbsorbedMLASelfAttention):
    """megatron-core's absorbed MLA, with three changes for DSA:

    * under TP, the KV down-projection is replicated (as megatron-core's own DSA spec does with
      Transformer Engine's duplicated linear). megatron-core 0.19.2's column-parallel path
      gathers the projection over TP and keeps the rope-key part on full sequence rows, so its
      gradient holds only this rank's heads' share: every input gradient below the attention
      came out wrong by ~0.1-1% against one rank. The replicated path gathers the rope keys
      from the sequence-parallel region, whose backward reduce-scatters the full sum.
    * the DSA parallel layout is checked at the first line of the forward (before megatron
      splits its rotary table over CP, which would fail with an opaque reshape error).
    * under FP8 (``config.fp8``, TE's GEMMs) the core attention's inputs are checked to be
      high-precision tensors (``_refuse_fp8_inputs``).
    * in the dense phases (the core's ``dense_in_mha_form``) the query stays unabsorbed and the
      core attends in MLA's MHA form with the up-projections it is bound to
      (``_get_kv_up_weights``).

    For inference (one rank, a KV cache), ``absorbed_inputs`` and ``project_output`` are the
    two halves of ``forward`` around the core attention, by megatron-core's own code.
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
        if config.fp8:
            self.core_attention.register_forward_pre_hook(_refuse_fp8_inputs, with_kwargs=True)
        self._unabsorbed_query = False
        if config.qk_head_dim <= config.kv_lora_rank:  # q_nope fits the "absorbed" query's columns
            self.core_attention.bind_up_projections(super()._get_kv_up_weights)

    def _get_kv_up_weights(self):
        """megatron-core absorbs q_nope into the latent with the K up-projection inside
        ``get_query_key_value_tensors``. For an unabsorbed query that weight becomes a selector
        [I | 0]: the "absorbed" query then holds q_nope in its first qk_head_dim columns and its
        rope part where it was (``reference.mha_form``'s input); the rest of megatron's path
        (norms, RoPE, TP/SP gathers, packed sequences, recomputation) runs unchanged."""
        k_up, v_up = super()._get_kv_up_weights()
        if getattr(self, "_unabsorbed_query", False):  # (unset while megatron's __init__ runs)
            H, dk, L = k_up.shape
            k_up = torch.eye(dk, L, dtype=k_up.dtype, device=k_up.device).expand(H, dk, L)
        return k_up, v_up

    def absorbed_inputs(self, hidden_states: torch.Tensor, first_position: int = 0):
        """The core attention's inputs for tokens at positions ``first_position``, ... (one
        rank): absorbed queries [s, b, H, Dqk], latent KV entries [s, b, 1, Dqk] and the
        normalised query latent qr [s, b, q_lora_rank] of hidden_states [s, b, hidden]."""
        # megatron-core offsets its rotary table by an inference context's sequence_len_offset.
        at = SimpleNamespace(sequence_len_offset=first_position,
                             max_sequence_length=first_position + hidden_states.shape[0])
        self._unabsorbed_query = False
        return self.get_query_key_value_tensors(hidden_states, inference_context=at)

    def project_output(self, latent_output: torch.Tensor):
        """The core attention's latent output [s, b, H * kv_lora_rank] -> (output [s, b, hidden],
        bias): the V up-projection, then ``linear_proj``, as ``forward`` applies them."""
        cfg = self.config
        out = _apply_absorbed_v_up_projection(latent_output, self._get_v_up_weight(),
                                              self.num_attention_heads_per_partition, cfg.kv_lora_rank,
                                              cfg.v_head_dim, core_consumed_v_up_projection=False)
        return self.linear_proj(out)

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        cfg = self.config
        global_sequence_length(hidden_states.shape[0], cfg.tensor_model_parallel_size, cfg.context_parallel_size,
                               sequence_parallel_rows=cfg.sequence_parallel)
        # Set for the whole step (not reset after): a recomputation in the backward rebuilds the
        # query in the form this forward used.
        self._unabsorbed_query = self.core_attention.dense_in_mha_form
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


_FP8_DTYPES = {
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
}


def _refuse_fp8_inputs(core, args, kwargs):
    """Under TE FP8 the DSA core must get plain high-precision tensors: TE quantises inside its
    own GEMMs and returns bf16/fp32, and our kernels (the FP8 indexer included, which quantises
    q and k with per-vector scales of its own) must never see TE's FP8 tensors or its amax history.
    A dtype / type check per forward, so a config that makes TE emit FP8 activations (FP8 MHA)
    fails here instead of silently quantising twice."""
    named = (("query", args[0] if args else kwargs.get("query")),
             ("key", args[1] if len(args) > 1 else kwargs.get("key")),
             ("x", kwargs.get("x")), ("qr", kwargs.get("qr")))
    for name, t in named:
        if t is not None and (t.dtype in _FP8_DTYPES or type(t).__module__.startswith("transformer_engine")):
            raise RuntimeError(
                f"DSA core attention got an FP8 tensor as {name} ({type(t).__name__}, {t.dtype}); "
                "it runs on the bf16/fp32 outputs of the TE linears (fp8_multi_head_attention and "
                "fp8_dot_product_attention are not supported)"
            )


class TEReplicatedLinear:
    """Transformer Engine's linear in megatron's "duplicated" mode: the weight replicated on
    every TP rank, its gradient summed over TP under sequence parallel (as ``ReplicatedLinear``).
    The indexer's ``wq_b`` / ``wk`` under the TE backend, so ``--fp8`` runs them as FP8 GEMMs
    (their outputs stay bf16; the indexer's own FP8 scoring quantises those itself)."""

    def __new__(cls, input_size: int, output_size: int, *, config, init_method, bias: bool = False, **_):
        return _contiguous_input(backends.te_linear())(
            input_size, output_size, parallel_mode="duplicated", config=config, init_method=init_method,
            bias=bias, skip_bias_add=False, skip_weight_param_allocation=False,
        )


@functools.cache
def _contiguous_input(te_linear: type) -> type:
    class IndexerTELinear(te_linear):
        def forward(self, x):
            # TE flattens its input with .view(); the indexer hands it batch-first transposes.
            return super().forward(x.contiguous())

    return IndexerTELinear


class SequenceParallelTorchNorm:
    """megatron-core's local torch norm (``WrappedTorchNorm``) that also runs under sequence
    parallelism: its parameters carry ``.sequence_parallel = True`` so megatron's
    ``finalize_model_grads`` sums their gradients over TP (the wrapped norm refuses SP)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not supported with sequence parallel")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm


def _with_eps(norm, eps: float) -> type:
    """``norm`` built with ``eps`` whatever epsilon its builder passes (MLA passes
    ``layernorm_epsilon`` to its latent norms; ``mdsa_latent_norm_eps`` sets theirs)."""

    class FixedEpsNorm:
        def __new__(cls, *args, **kwargs):
            kwargs["eps"] = eps
            return build_module(norm, *args, **kwargs)

    return FixedEpsNorm


def _norm(backend: BackendSpecProvider, config: DSATransformerConfig, for_qk: bool):
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=for_qk)
    if isinstance(backend, LocalSpecProvider):
        return SequenceParallelTorchNorm
    return norm


def backend_for(config: DSATransformerConfig) -> BackendSpecProvider:
    """TE modules when asked for (and installed here), megatron-core's local modules otherwise."""
    backends.check_fp8(config.fp8, config.transformer_impl)
    if config.transformer_impl == "transformer_engine":
        backends.require_transformer_engine()
        return backends.te_spec_provider()
    return LocalSpecProvider()


def _indexer_linears(backend: BackendSpecProvider) -> LightningIndexerSubmodules:
    """The indexer's projections, replicated on every TP rank and applied to that rank's
    sequence-parallel rows. Under TE, wq_b and wk are TE linears (FP8 GEMMs under --fp8);
    weights_proj stays plain: a [hidden -> indexer heads] GEMM too small to gain from FP8, whose
    output dimension (2 and 4 heads in tiny / small) TE's FP8 GEMM cannot take (it needs a
    multiple of 8)."""
    linear = ReplicatedLinear if isinstance(backend, LocalSpecProvider) else TEReplicatedLinear
    return LightningIndexerSubmodules(wq_b=linear, wk=linear, weights_proj=ReplicatedLinear)


def dsa_attention_spec(config: DSATransformerConfig, backend: BackendSpecProvider,
                       is_mtp_layer: bool = False) -> ModuleSpec:
    """AbsorbedMLASelfAttention with an unfused query norm and DSA as core attention (told
    whether it sits in a multi-token-prediction layer: megatron-core does not pass that down)."""
    linear = backend.column_parallel_linear()
    # The down-projections: TE's duplicated linear under TE (as megatron-core's own DSA spec;
    # a column-parallel KV down-projection gets wrong gradients, see DSAAbsorbedMLASelfAttention).
    down = linear if isinstance(backend, LocalSpecProvider) else backend.linear()
    # Never backend.core_attention(): the DSA core is ours on every backend (not a TE module).
    core_attention = ModuleSpec(
        module=DSACoreAttention,
        params={"is_mtp_layer": is_mtp_layer},
        submodules=DSACoreAttentionSubmodules(
            indexer=ModuleSpec(module=LightningIndexer, submodules=_indexer_linears(backend))
        ),
    )
    # Unfused: the indexer needs the normalised query latent outside the up-projection.
    qk_norm = _norm(backend, config, for_qk=True)
    if config.mdsa_latent_norm_eps is not None:
        qk_norm = _with_eps(qk_norm, config.mdsa_latent_norm_eps)
    return ModuleSpec(
        module=DSAAbsorbedMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=AbsorbedMLASelfAttentionSubmodules(
            linear_q_proj=linear,
            linear_q_down_proj=down,
            linear_q_up_proj=linear,
            linear_kv_down_proj=down,
            linear_kv_up_proj=linear,
            core_attention=core_attention,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            kv_layernorm=qk_norm,
        ),
    )


def _layer_spec(config: DSATransformerConfig, backend: BackendSpecProvider, dense: bool,
                is_mtp_layer: bool = False) -> ModuleSpec:
    """One transformer layer: DSA attention, then a dense SwiGLU MLP or the MoE."""
    norm = _norm(backend, config, for_qk=False)
    # Unfused on every backend (megatron's TE dense MLP fuses the pre-MLP norm into fc1, which
    # with our separate pre_mlp_layernorm would normalise twice); the parameter names stay the
    # same as local's, which the converter and the inference engine read.
    dense_mlp = partial(
        MLP.as_mlp_submodule,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
        ),
    )
    if dense or not config.num_moe_experts:
        mlp = dense_mlp
    else:
        mlp = get_mlp_module_spec_for_backend(
            backend=backend, num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=dsa_attention_spec(config, backend, is_mtp_layer=is_mtp_layer),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def dsa_layer_specs(config: DSATransformerConfig, first_k_dense: int) -> list[ModuleSpec]:
    """One spec per layer: dense SwiGLU MLP for the first ``first_k_dense`` layers, MoE after."""
    backend = backend_for(config)
    return [_layer_spec(config, backend, dense=i < first_k_dense) for i in range(config.num_layers)]


def dsa_block_spec(
    config: DSATransformerConfig, first_k_dense: int, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The decoder block spec megatron-core's GPTModel takes (this pipeline stage's layers)."""
    backend = backend_for(config)
    specs = dsa_layer_specs(config, first_k_dense)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count],
        layer_norm=_norm(backend, config, for_qk=False),
    )


def dsa_mtp_block_spec(
    config: DSATransformerConfig, first_k_dense: int, vp_stage: Optional[int] = None
) -> Optional[MultiTokenPredictionBlockSubmodules]:
    """megatron-core's multi-token-prediction block (``config.mtp_num_layers`` depths) whose
    transformer layer is our DSA layer, or None where this pipeline stage builds none.

    Each depth is DeepSeek-V3's MTP module: ``eh_proj(cat(enorm(embed(t_i+1)), hnorm(h_i)))``
    -> a decoder layer of the kind the next decoder layer would be (MoE past ``first_k_dense``)
    -> ``final_layernorm`` -> the model's shared output layer. Megatron-LM's GPT builder
    derives the MTP layer from megatron-core's ``get_gpt_decoder_layer_specs``, which asserts
    ``experimental_attention_variant is None`` (so ``dsa`` with ``--mtp-num-layers`` stops
    there); this block takes our layer spec directly, and the decoder's norms (``_norm``:
    sequence parallel on the local backend too), so no patch of megatron-core is needed.
    """
    if not config.mtp_num_layers or get_mtp_num_layers_to_build(config, vp_stage=vp_stage) == 0:
        return None
    backend = backend_for(config)
    norm = _norm(backend, config, for_qk=False)
    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=norm,
            hnorm=norm,
            eh_proj=backend.column_parallel_linear(),
            mtp_model_layer=_layer_spec(config, backend, dense=config.num_layers < first_k_dense, is_mtp_layer=True),
            layer_norm=norm,
        ),
    )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * config.mtp_num_layers)
