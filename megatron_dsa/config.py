"""DSA settings: the one place that reads and validates them.

megatron-core already names the core DSA concepts (``dsa_indexer_n_heads``,
``dsa_indexer_head_dim``, ``dsa_indexer_topk``, ``dsa_indexer_loss_coeff``,
``dsa_indexer_use_sparse_loss``, ``dsa_indexer_topk_freq``): we reuse those fields, so a user's
``--dsa-indexer-*`` flags keep their meaning. Our own settings carry the ``mdsa_`` prefix (no
megatron-core field or flag has it, so Megatron-LM's argument parser never copies them onto
its own config by accident).

``DSATransformerConfig`` extends megatron-core's ``MLATransformerConfig``; its ``__post_init__``
validates everything once, before any module is built. Everything below (spec, layer,
kernels) takes the resolved ``DSASettings``.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import Any, Optional

from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_dsa.kernel_options import DEFAULT_OPTIONS, KernelOptions
from megatron_dsa.reference import YaRN

MODES = ("dense", "warmup", "sparse")
KERNELS = ("auto", "reference", "triton")
INDEXER_SHARING = ("per_layer", "shared")
INDEXER_DTYPES = ("activation", "fp32")
# The indexer's training objective; the names of ``megatron_dsa.reference.INDEXER_OBJECTIVES``
# (kept literal here so reading the config imports no tensor code). Only "kl" has Triton kernels.
INDEXER_OBJECTIVES = ("kl", "reverse_kl", "mse", "listwise")


class DSAConfigError(ValueError):
    """A DSA setting is invalid; raised at construction, before any compute."""


@dataclass(frozen=True)
class DSASettings:
    """Resolved, validated DSA settings handed to the layer (plain values, no megatron types)."""

    mode: str
    kernel: str
    indexer_sharing: str
    fp8_indexer: bool
    n_heads: int
    head_dim: int
    rope_dim: int
    topk: int
    loss_coeff: float
    sparse_loss: bool
    topk_freq: int
    rope_base: float
    k_norm_eps: float
    objective: str = "kl"
    indexer_dtype: str = "activation"
    recall_rows: int = 4096
    kernel_options: KernelOptions = DEFAULT_OPTIONS
    yarn: Optional[YaRN] = None
    """YaRN scaling of the indexer's RoPE (the same as MLA's), None for plain RoPE."""
    indexer_types: Optional[tuple[str, ...]] = None
    """Per layer "full" (runs its indexer) or "shared" (reuses the last full layer's top-k)."""

    def selects(self, layer_number: int) -> bool:
        """Whether layer ``layer_number`` (1-based) runs its own indexer and top-k."""
        if self.indexer_types is not None:
            return self.indexer_types[layer_number - 1] == "full"
        return (layer_number - 1) % self.topk_freq == 0


@dataclass
class DSATransformerConfig(MLATransformerConfig):
    """MLA config with the lightning indexer and our DSA switches.

    The ``dsa_indexer_*`` fields are megatron-core's; the ``mdsa_*`` fields are ours.
    """

    mdsa_mode: str = "dense"
    """dense: plain causal attention, no indexer work (pretraining). warmup: dense attention and
    the indexer KL against the head-summed attention. sparse: top-k attention and the sparse KL."""

    mdsa_kernel: str = "auto"
    """auto: Triton on CUDA, the PyTorch reference elsewhere. reference | triton force one."""

    mdsa_indexer_sharing: str = "per_layer"
    """per_layer: one indexer per layer (the report). shared: one indexer's weights serve every
    layer, each applied to that layer's own input. (Reusing one SELECTION every N layers is
    megatron-core's ``dsa_indexer_topk_freq``.)"""

    mdsa_fp8_indexer: bool = False
    """Score the indexer in FP8 (e4m3 after the Hadamard rotation); Triton kernel only, and a
    power-of-two ``dsa_indexer_head_dim`` (the rotation's size)."""

    mdsa_indexer_rope_dim: Optional[int] = None
    """RoPE dims of each indexer head ([rope | nope] layout). Defaults to MLA's rope dims."""

    mdsa_indexer_k_norm_eps: float = 1e-6

    mdsa_indexer_types: Optional[list] = None
    """Per layer "full" (the layer runs its indexer and selects) or "shared" (it has no indexer
    and reuses the top-k of the last "full" layer before it): GLM-5's ``indexer_types``. None:
    every layer selects, or one in ``dsa_indexer_topk_freq``."""

    mdsa_latent_norm_eps: Optional[float] = None
    """Epsilon of MLA's query and KV latent norms (default: ``layernorm_epsilon``). DeepSeek-V3.2
    and GLM-5 fix it at 1e-6 while GLM-5's other norms use 1e-5."""

    mdsa_indexer_dtype: str = "activation"
    """Dtype of the indexer's queries and keys as they enter scoring, top-k and the KL.
    activation: the attention's own dtype (bf16 in bf16 training: tensor-core dots with fp32
    accumulation); fp32: keep them fp32. The head weights w stay fp32 either way."""

    mdsa_recall_rows: int = 4096
    """The warm-up's top-k recall (a logged diagnostic, no gradient) is measured on at most this
    many evenly spaced query rows of each sequence; 0 measures every row."""

    mdsa_kernel_options: Optional[dict] = None
    """Choices the Triton kernels leave open (``megatron_dsa.kernel_options.KernelOptions``): e.g.
    ``{dense_kl: blockwise}``, ``{key_passes: 1}`` or launch tiles ``{attn_fwd: [64, 8, 2]}``.
    None: the measured defaults."""

    mdsa_indexer_objective: str = "kl"
    """How the indexer learns the head-summed attention p (softmax(I) = the indexer distribution):
    kl: KL(p || softmax(I)) (the report). reverse_kl: KL(softmax(I) || p). mse: sum of squared
    differences. listwise: cross-entropy of p's renormalised top-k against softmax(I) (in the
    sparse phase the top-k is the selected set: the KL plus a constant). Every objective but
    "kl" runs the PyTorch reference for the loss (Triton still does top-k and attention), and
    the tensor/context-parallel path computes only "kl"."""

    dsa_indexer_use_sparse_loss: bool = True
    """megatron-core's field; in sparse mode the report's KL runs over the selected set only."""

    def __post_init__(self) -> None:
        # Our defaults and the fields megatron-core's own checks depend on first ...
        if self.experimental_attention_variant is None:
            # Makes megatron-core keep the MLA query norm UNFUSED (the indexer needs the
            # normalised latent) and scale the indexer loss in its schedules.
            self.experimental_attention_variant = "dsa"
        if self.dsa_indexer_loss_coeff is None:
            self.dsa_indexer_loss_coeff = 1.0
        tp = self.tensor_model_parallel_size
        if self.num_attention_heads % tp:
            # Before megatron-core's own checks, so the user gets the DSA error type.
            _fail(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by the tensor "
                f"parallel size ({tp})"
            )
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            # megatron-core's MoE and AbsorbedMLA both require sequence parallel under TP, and
            # the TP-sharded indexer works on the sequence-parallel rows: switch it on.
            self.sequence_parallel = True
        if self.context_parallel_size > 1:
            # The DSA core attention does its own context-parallel communication (indexer-key
            # all-gather + selected-KV fetch, megatron_dsa.parallel) and ignores cp_comm_type;
            # megatron-core accepts only 'allgather' for its DSA variant.
            self.cp_comm_type = "all_gather"
        super().__post_init__()
        # ... then ours, all of them, before anything is built.
        self.dsa = validate(self)


@functools.lru_cache(maxsize=1)
def _scalar_field_types() -> dict[str, type | tuple]:
    """field -> int | float | bool | str | a tuple of Literal choices, for every config field of
    one scalar type (Optional or not); fields of other types (callables, lists, unions) are
    left to megatron-core."""
    out = {}
    for name, hint in typing.get_type_hints(DSATransformerConfig).items():
        if typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                continue
            hint = args[0]
        if typing.get_origin(hint) is typing.Literal:
            out[name] = tuple(typing.get_args(hint))
        elif hint in (int, float, bool, str):
            out[name] = hint
    return out


def check_field_types(fields: dict[str, Any]) -> dict[str, Any]:
    """The config fields with their declared scalar types enforced: one DSAConfigError naming
    the field otherwise. A dataclass does not check types, and the settings are later read with
    ``int()``, so 2.5, ``true`` or 16.9 for an integer would silently become 2, 1 or 16. Numeric
    strings are accepted for float fields (YAML 1.1 reads ``1e-3`` as a string)."""
    types = _scalar_field_types()
    out = dict(fields)
    for name, value in fields.items():
        # None is megatron-core's "unset" even where the annotation omits Optional
        # (q_lora_rank: int = 512 means "no query latent" when None); its own checks judge it.
        if name not in types or value is None:
            continue
        kind = types[name]
        if isinstance(kind, tuple):
            if value not in kind or isinstance(value, bool) != any(isinstance(c, bool) for c in kind):
                raise DSAConfigError(f"{name} must be one of {list(kind)}, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise DSAConfigError(f"{name} must be an integer, got {value!r}")
        elif kind is float:
            if isinstance(value, str):
                try:
                    value = out[name] = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DSAConfigError(f"{name} must be a number, got {value!r}")
        elif not isinstance(value, kind):
            raise DSAConfigError(f"{name} must be {'true or false' if kind is bool else 'a string'}, got {value!r}")
    return out


def _fail(msg: str) -> None:
    raise DSAConfigError(f"invalid DSA configuration: {msg}")


def validate(cfg: DSATransformerConfig) -> DSASettings:
    """Check every DSA setting; return the resolved settings or raise one DSAConfigError."""
    if cfg.experimental_attention_variant != "dsa":
        _fail(f"experimental_attention_variant must be 'dsa', got {cfg.experimental_attention_variant!r}")
    if cfg.mdsa_mode not in MODES:
        _fail(f"mdsa_mode must be one of {MODES}, got {cfg.mdsa_mode!r}")
    if cfg.mdsa_kernel not in KERNELS:
        _fail(f"mdsa_kernel must be one of {KERNELS}, got {cfg.mdsa_kernel!r}")
    if cfg.mdsa_indexer_sharing not in INDEXER_SHARING:
        _fail(f"mdsa_indexer_sharing must be one of {INDEXER_SHARING}, got {cfg.mdsa_indexer_sharing!r}")
    if cfg.mdsa_indexer_objective not in INDEXER_OBJECTIVES:
        _fail(f"mdsa_indexer_objective must be one of {INDEXER_OBJECTIVES}, got {cfg.mdsa_indexer_objective!r}")
    if not cfg.multi_latent_attention:
        _fail("DSA runs on multi-latent attention: multi_latent_attention must be True")
    if cfg.q_lora_rank is None:
        _fail("the indexer reads MLA's query latent: q_lora_rank must be set")
    if not cfg.qk_layernorm:
        _fail("the indexer reads the NORMALISED query latent: qk_layernorm must be True")
    yarn = None
    if cfg.rope_type == "yarn":
        # MLA's rotary embedding is megatron-core's YarnRotaryEmbedding; the indexer's tables
        # come from the same fields (reference.rope_cos_sin).
        if cfg.rotary_scaling_factor < 1 or cfg.original_max_position_embeddings <= 0:
            _fail(f"YaRN needs rotary_scaling_factor >= 1 and original_max_position_embeddings > 0, got "
                  f"{cfg.rotary_scaling_factor} and {cfg.original_max_position_embeddings}")
        yarn = YaRN(float(cfg.rotary_scaling_factor), int(cfg.original_max_position_embeddings),
                    float(cfg.beta_fast), float(cfg.beta_slow), float(cfg.mscale), float(cfg.mscale_all_dim))
    elif cfg.rope_type != "rope":
        _fail(f"rope_type must be 'rope' or 'yarn', got {cfg.rope_type!r}")

    for name in ("dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk"):
        value = getattr(cfg, name)
        if value is None or int(value) <= 0:
            _fail(f"{name} must be a positive integer, got {value!r}")
    head_dim = cfg.dsa_indexer_head_dim
    rope_dim = cfg.mdsa_indexer_rope_dim
    if rope_dim is None:
        rope_dim = cfg.qk_pos_emb_head_dim
    if head_dim % 2:
        _fail(f"dsa_indexer_head_dim must be even, got {head_dim}")
    if cfg.mdsa_fp8_indexer and head_dim & (head_dim - 1):
        # Only the FP8 path depends on the rotation (it spreads outliers before e4m3); the
        # other paths score the same dot products unrotated.
        _fail(f"the FP8 indexer quantises after a Hadamard rotation, which needs a power-of-two "
              f"dsa_indexer_head_dim; got {head_dim} (turn mdsa_fp8_indexer off or use a power of two)")
    if rope_dim <= 0 or rope_dim % 2:
        _fail(f"the indexer rope dims must be positive and even, got {rope_dim}")
    if head_dim < rope_dim:
        _fail(f"dsa_indexer_head_dim ({head_dim}) is smaller than its rope dims ({rope_dim})")
    if cfg.dsa_indexer_loss_coeff < 0:
        _fail(f"dsa_indexer_loss_coeff must be >= 0, got {cfg.dsa_indexer_loss_coeff}")
    if cfg.mdsa_mode == "warmup" and cfg.dsa_indexer_loss_coeff == 0:
        _fail("warmup trains the indexer through its KL alone: dsa_indexer_loss_coeff must be > 0")
    if cfg.mdsa_indexer_dtype not in INDEXER_DTYPES:
        _fail(f"mdsa_indexer_dtype must be one of {INDEXER_DTYPES}, got {cfg.mdsa_indexer_dtype!r}")
    if cfg.mdsa_recall_rows < 0:
        _fail(f"mdsa_recall_rows must be >= 0 (0: every row), got {cfg.mdsa_recall_rows}")
    if cfg.dsa_indexer_topk_freq < 1:
        _fail(f"dsa_indexer_topk_freq must be >= 1, got {cfg.dsa_indexer_topk_freq}")
    indexer_types = None
    if cfg.mdsa_indexer_types is not None:
        indexer_types = tuple(cfg.mdsa_indexer_types)
        if len(indexer_types) != cfg.num_layers or any(t not in ("full", "shared") for t in indexer_types):
            _fail(f"mdsa_indexer_types must name 'full' or 'shared' for each of the {cfg.num_layers} layers, "
                  f"got {cfg.mdsa_indexer_types!r}")
        if indexer_types[0] != "full":
            _fail("mdsa_indexer_types: the first layer must be 'full' (a 'shared' layer reuses an earlier one)")
        if cfg.dsa_indexer_topk_freq != 1 or cfg.mdsa_indexer_sharing != "per_layer":
            _fail("mdsa_indexer_types names each layer's indexer: leave dsa_indexer_topk_freq at 1 and "
                  "mdsa_indexer_sharing at 'per_layer'")
    if cfg.mtp_num_layers is not None and cfg.mtp_num_layers < 0:
        _fail(f"mtp_num_layers must be >= 0 (None or 0: no multi-token prediction), got {cfg.mtp_num_layers}")
    if cfg.mtp_num_layers and cfg.mtp_use_repeated_layer:
        # One DSA layer at every depth would keep only the last depth's indexer loss.
        _fail("mtp_use_repeated_layer is not supported with DSA layers: each MTP depth has its own layer")
    if cfg.mdsa_latent_norm_eps is not None and cfg.mdsa_latent_norm_eps <= 0:
        _fail(f"mdsa_latent_norm_eps must be positive, got {cfg.mdsa_latent_norm_eps}")
    if cfg.mdsa_indexer_sharing == "shared" and cfg.dsa_indexer_topk_freq > 1:
        _fail("choose one kind of sharing: a shared indexer or dsa_indexer_topk_freq > 1")
    if cfg.mdsa_indexer_sharing == "shared" and cfg.pipeline_model_parallel_size > 1:
        # Its weights would live on the first stage while later stages score with them: that
        # needs a weight tie across stages (an embedding-group-like all-reduce), not built here.
        _fail("a shared indexer needs every layer on one pipeline stage (pipeline size 1); "
              "under pipeline parallelism use mdsa_indexer_sharing='per_layer'")
    _check_selection_within_stages(cfg)
    if cfg.mdsa_mode == "warmup" and cfg.recompute_granularity is not None and cfg.pipeline_model_parallel_size == 1:
        # The frozen model keeps no activations for a backward in warm-up (its indexer KL is
        # backpropagated alone), so there is nothing to recompute; and a recomputed forward
        # would hand the trainer a KL without its graph.
        _fail(f"recompute_granularity={cfg.recompute_granularity!r} in warmup recomputes nothing (only the "
              "indexers train, on detached inputs); leave recomputation off for the warm-up phase")
    if cfg.fp8 and cfg.recompute_granularity == "selective" and "mla_up_proj" in (cfg.recompute_modules or ()):
        # megatron-core's absorbed MLA asserts this in its first forward; say it before building.
        _fail("recompute_modules 'mla_up_proj' is not supported with fp8 by megatron-core's absorbed MLA: "
              "drop it from recompute_modules or train without fp8")
    if cfg.mdsa_fp8_indexer and cfg.mdsa_kernel == "reference":
        _fail("the FP8 indexer is a Triton kernel: mdsa_kernel must be 'auto' or 'triton'")
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    if tp > 1 and not cfg.sequence_parallel:
        _fail("tensor_model_parallel_size > 1 needs sequence_parallel=True (the indexer is sharded by sequence)")
    if (tp > 1 or cp > 1) and cfg.mdsa_indexer_objective != "kl":
        _fail(
            f"mdsa_indexer_objective {cfg.mdsa_indexer_objective!r} runs on one rank only: the "
            "tensor/context-parallel indexer loss is the KL (mdsa_indexer_objective='kl')"
        )
    try:
        kernel_options = KernelOptions.from_dict(cfg.mdsa_kernel_options)
    except (TypeError, ValueError) as e:
        _fail(f"mdsa_kernel_options: {e}")
    return DSASettings(
        mode=cfg.mdsa_mode,
        kernel=cfg.mdsa_kernel,
        indexer_sharing=cfg.mdsa_indexer_sharing,
        fp8_indexer=cfg.mdsa_fp8_indexer,
        n_heads=int(cfg.dsa_indexer_n_heads),
        head_dim=int(head_dim),
        rope_dim=int(rope_dim),
        topk=int(cfg.dsa_indexer_topk),
        loss_coeff=float(cfg.dsa_indexer_loss_coeff),
        sparse_loss=bool(cfg.dsa_indexer_use_sparse_loss),
        topk_freq=int(cfg.dsa_indexer_topk_freq),
        rope_base=float(cfg.rotary_base),
        k_norm_eps=float(cfg.mdsa_indexer_k_norm_eps),
        objective=cfg.mdsa_indexer_objective,
        indexer_dtype=cfg.mdsa_indexer_dtype,
        recall_rows=int(cfg.mdsa_recall_rows),
        kernel_options=kernel_options,
        yarn=yarn,
        indexer_types=indexer_types,
    )


def _check_selection_within_stages(cfg: DSATransformerConfig) -> None:
    """With dsa_indexer_topk_freq = N a layer reuses the selection of the layer N-1 before it
    at most: every pipeline stage (and virtual stage) must start with a selecting layer, i.e.
    hold a multiple of N layers. Checked here for an even split; the model build checks any
    split (``model.wire_indexer_sharing``)."""
    n, pp = cfg.dsa_indexer_topk_freq, cfg.pipeline_model_parallel_size
    uneven = cfg.num_layers_in_first_pipeline_stage is not None or cfg.num_layers_in_last_pipeline_stage is not None
    if n <= 1 or pp <= 1 or uneven or cfg.pipeline_model_parallel_layout is not None:
        return
    chunks = pp * (cfg.virtual_pipeline_model_parallel_size or 1)
    per_chunk = cfg.num_layers // chunks
    if per_chunk % n:
        _fail(f"dsa_indexer_topk_freq={n} reuses one layer's top-k selection in the next {n - 1} layers, "
              f"but each of the {chunks} pipeline stages holds {per_chunk} layers: a stage would reuse a "
              f"selection made on another stage (give each stage a multiple of {n} layers)")


def set_mode(config: DSATransformerConfig, mode: str) -> None:
    """Switch the training phase of a built model (its layers read the mode every forward)."""
    if mode not in MODES:
        _fail(f"mdsa_mode must be one of {MODES}, got {mode!r}")
    config.mdsa_mode = mode
    config.dsa = validate(config)
