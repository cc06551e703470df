"""DSA core attention for megatron-core's absorbed MLA: the module around ``core.dsa_core``.

megatron-core's ``AbsorbedMLASelfAttention`` builds this module as its ``core_attention``
through the layer spec (``megatron_dsa.spec``). Because the class sets
``requires_dsa_inputs``, MLA hands it the attention input ``x`` and the normalised query latent
``qr`` besides the absorbed queries and the latent KV entries. The module reads the settings
(``config.dsa``), runs the indexer on its own rows, and calls ``megatron_dsa.core.dsa_core``
with its TP/CP context (size 1 on one rank); what each mode computes is written there.

Modes (``config.dsa.mode``, read at every forward so a trainer can switch phases with
``config.set_mode``):
    dense   plain causal attention; the indexer does no work (pretraining)
    warmup  dense attention + the indexer KL against the head-summed attention (dense KL)
    sparse  top-k attention + the KL over the selected set (indexer inputs detached)

"The KL" is ``config.mdsa_indexer_objective`` (default "kl", the report's); another objective
is logged under the same name.

The indexer loss reaches the optimizer the way megatron-core's MoE auxiliary loss does: in
``sparse`` mode the language-model backward also runs the KL's backward, scaled by the
schedule's loss scale (``DSAIndexerLossAutoScaler``'s). With gradients on, the KL is computed
inside the sparse attention's backward (``core.KLInBackward``: its target is the probabilities
that backward recomputes) and recorded there; without them (evaluation) it is computed in the
forward and attached to the output by ``DSAIndexerLossAutoScaler``. In
``warmup`` on one pipeline stage nothing is attached (the main model is frozen and must see no
backward at all): the trainer takes the losses from ``pop_indexer_losses`` and backpropagates
their sum alone. Under pipeline parallelism the last stage's loss cannot reach the other
stages' layers, so there the warm-up attaches the KL too, and the schedule's backward (of a
zero LM term through the frozen stages) runs every stage's KL backward.
Per-layer values are logged through megatron-core's MoE metrics tracker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_dsa import ops
from megatron_dsa.config import DSATransformerConfig
from megatron_dsa.core import KLInBackward, dsa_core
from megatron_dsa.parallel import ParallelContext, cp_positions, global_sequence_length, own_rows
from megatron_dsa import reference as R
from megatron_dsa.reference import document_ids, indexer_qkw, rope_cos_sin

# Names of the per-layer values in megatron-core's MoE metrics tracker (the trainer logs them).
INDEXER_KL = "indexer_kl"
TOPK_RECALL = "indexer_topk_recall"


class ReplicatedLinear(torch.nn.Module):
    """A plain ``y = x W^T`` with megatron's linear signature, replicated on every TP rank.

    The indexer's linears: under TP each rank applies them to its own sequence-parallel rows,
    so the weight carries ``.sequence_parallel = config.sequence_parallel`` and megatron's
    ``finalize_model_grads`` sums its gradient over the TP group.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False, **_):
        super().__init__()
        if bias:
            raise ValueError("the indexer's linears have no bias")
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        if torch.get_default_device().type == "meta":
            device = "meta"  # a model built for its shapes only (the converter's) allocates nothing
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            init_method(self.weight)
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight), None

    # megatron's linears keep an (empty) ``_extra_state`` entry in their checkpoints. MLA's KV
    # down-projection is megatron's linear at TP=1 and this one under TP: with the same entry,
    # a checkpoint written at one TP size loads at another.
    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state) -> None:
        pass


@dataclass
class LightningIndexerSubmodules:
    wq_b: Union[ModuleSpec, type]
    wk: Union[ModuleSpec, type]
    weights_proj: Union[ModuleSpec, type]


class LightningIndexer(MegatronModule):
    """The indexer's parameters: wq_b (query latent -> HI*DI), wk (x -> DI), k_norm (LayerNorm
    with bias) and weights_proj (x -> HI). Names follow the reference implementation."""

    def __init__(self, config: DSATransformerConfig, submodules: LightningIndexerSubmodules):
        super().__init__(config=config)
        s = config.dsa
        linear = dict(
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
            is_expert=False,
        )
        self.wq_b = build_module(submodules.wq_b, config.q_lora_rank, s.n_heads * s.head_dim, **linear)
        self.wk = build_module(submodules.wk, config.hidden_size, s.head_dim, **linear)
        self.weights_proj = build_module(submodules.weights_proj, config.hidden_size, s.n_heads, **linear)
        self.k_norm = torch.nn.LayerNorm(s.head_dim, eps=s.k_norm_eps)
        for p in self.k_norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor):
        """x [B, S, hidden], qr [B, S, q_lora_rank] -> q [B,S,HI,DI], k [B,S,DI], w [B,S,HI]."""
        s = self.config.dsa
        q_proj, _ = self.wq_b(qr)
        k_proj, _ = self.wk(x)
        w_proj, _ = self.weights_proj(x)
        # Built per call (S x rope/2 values): no cache that could go stale when positions change.
        cos, sin = rope_cos_sin(positions, s.rope_dim, s.rope_base, yarn=s.yarn)
        return indexer_qkw(
            q_proj, k_proj, w_proj, self.k_norm.weight, self.k_norm.bias, cos, sin,
            n_heads=s.n_heads, eps=s.k_norm_eps,
        )


@dataclass
class DSACoreAttentionSubmodules:
    indexer: Union[ModuleSpec, type]


class DSACoreAttention(MegatronModule):
    """Core attention of absorbed MLA with the lightning indexer: dense | warmup | sparse."""

    requires_dsa_inputs = True

    def __init__(
        self,
        config: DSATransformerConfig,
        submodules: DSACoreAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
    ):
        super().__init__(config=config)
        if attention_type != "self" or attn_mask_type != AttnMaskType.causal:
            raise ValueError("DSA core attention supports causal self-attention only")
        # megatron-core's Attention base class first builds its core attention without the
        # channel sizes, then AbsorbedMLASelfAttention rebuilds it with them: accept both.
        latent = config.kv_lora_rank + config.qk_pos_emb_head_dim
        if k_channels not in (None, latent) or v_channels not in (None, config.kv_lora_rank):
            raise ValueError(
                "DSA core attention expects the absorbed MLA form (AbsorbedMLASelfAttention): "
                f"k_channels={k_channels} (want {latent}), v_channels={v_channels} "
                f"(want {config.kv_lora_rank})"
            )
        if softmax_scale is None:
            softmax_scale = (config.qk_head_dim + config.qk_pos_emb_head_dim) ** -0.5
        # megatron-core numbers a multi-token-prediction layer from 1 within the MTP block; its
        # number here follows the decoder's (num_layers + 1, ...), as the MoE router counts it
        # in the metrics tracker, so its values and its place in ``model.dsa_layers`` are its own.
        self.is_mtp_layer = is_mtp_layer
        self.layer_number = config.num_layers + layer_number if is_mtp_layer else layer_number
        self.v_dim = config.kv_lora_rank
        self.softmax_scale = softmax_scale
        s = config.dsa
        # With dsa_indexer_topk_freq = N, layers 1, N+1, 2N+1, ... select (or those that
        # mdsa_indexer_types names "full"); the rest reuse the last selection. An MTP layer
        # runs on its own hidden states and always selects with its own indexer.
        self.selects = is_mtp_layer or s.selects(layer_number)
        self.indexer = build_module(submodules.indexer, config=config) if self.selects else None
        self._selection_source: Optional["DSACoreAttention"] = None
        self._last_topk: Optional[torch.Tensor] = None
        self._indexer_loss: Optional[torch.Tensor] = None
        # TP / CP groups of this layer (sizes 1 on one rank).
        self.parallel = ParallelContext.from_megatron(pg_collection)
        # Indexer scoring FLOPs done on THIS rank (rows x keys x HI x DI x 2), cumulative.
        self.indexer_flops = 0
        self.__dict__["_up_projections"] = None

    def bind_up_projections(self, up_projections) -> None:
        """Called by the attention module that builds this core: ``up_projections()`` returns its
        (k_up [H, dk, L], v_up [H, dv, L]); from then on the dense modes attend in MLA's MHA form
        and that module hands over the unabsorbed query (``dense_in_mha_form``)."""
        self.__dict__["_up_projections"] = up_projections

    @property
    def dense_in_mha_form(self) -> bool:
        """This forward attends over every key in MLA's MHA form: per head, 192 / 128 dims at
        DeepSeek-V3.2's shape instead of the absorbed 576 / 512 (3.4x fewer FLOPs, and the
        fused SDPA kernels take it). Sparse attention stays absorbed: one gathered latent row
        serves every head."""
        return self.config.dsa.mode in ("dense", "warmup") and self.__dict__["_up_projections"] is not None

    def absorbed_query(self, query: torch.Tensor) -> torch.Tensor:
        """The absorbed form [s, b, H, L + R] of a query this core receives in this forward (the
        dense modes' unabsorbed one goes through W_UK; an absorbed one comes back as is): what
        a hook that recomputes the attention from the core's inputs reads."""
        if not self.dense_in_mha_form:
            return query
        k_up = self.__dict__["_up_projections"]()[0]
        return R.absorb_query(query.transpose(0, 1), k_up).transpose(0, 1)

    @property
    def consumes_absorbed_v_up_projection(self) -> bool:
        """Read by AbsorbedMLASelfAttention after the core: the MHA form's output has been through
        the V up-projection; the absorbed form's latent output has not."""
        return self.dense_in_mha_form

    # ---- wiring done once by the model builder ---------------------------------------------

    def share_indexer_with(self, owner: "DSACoreAttention") -> None:
        """Use owner's indexer weights (one indexer for all layers). Not registered here, so
        the parameters are saved, counted and updated once, under the owner's name."""
        self.indexer = None
        self.__dict__["_shared_indexer"] = owner

    def reuse_selection_of(self, source: "DSACoreAttention") -> None:
        """Take the top-k selection that ``source`` (an earlier layer) made in this forward."""
        self.__dict__["_selection_source"] = source
        source.__dict__["_lends_selection"] = True

    def indexer_module(self) -> Optional[LightningIndexer]:
        """The indexer whose weights this layer scores with: its own, the shared one, or None
        (a layer that reuses an earlier layer's selection)."""
        owner = self.__dict__.get("_shared_indexer")
        return owner.indexer if owner is not None else self.indexer

    def pop_indexer_loss(self) -> Optional[torch.Tensor]:
        """The scaled indexer loss of the last forward (with its graph), then forget it."""
        loss, self._indexer_loss = self._indexer_loss, None
        return loss

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        x: Optional[torch.Tensor] = None,
        qr: Optional[torch.Tensor] = None,
        up_v_weight: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query [s, b, H, Dqk], key [s, b, 1, Dqk] (latent KV entries), x [s', b, hidden],
        qr [s', b, q_lora_rank] -> latent output [s, b, H * v_dim] (``dense_in_mha_form``:
        query unabsorbed, output [s, b, H * v_head_dim]).

        s: this CP rank's rows (all of them on one rank); s': the rows this rank's indexer
        runs on (its sequence-parallel shard under TP, s otherwise); H: this TP rank's heads.

        Packed sequences (megatron's THD format, ``packed_seq_params.qkv_format == "thd"``):
        one row of documents, query [s, H, Dqk], key [s, 1, Dqk], qr [s', q_lora_rank]; the
        documents' boundaries are ``cu_seqlens_q_padded`` (else ``cu_seqlens_q``), and the
        indexer's RoPE restarts at each document, as megatron's MLA RoPE does.
        """
        cu_seqlens = None
        if packed_seq_params is not None:
            query, key, x, qr, cu_seqlens = self._unpack_thd(query, key, x, qr, packed_seq_params)
        s = self.config.dsa
        ctx = self.parallel
        rows, batch, heads, _ = query.shape
        q = query.permute(1, 0, 2, 3)  # [b, s, H, Dqk]
        kv = key.squeeze(2).transpose(0, 1)  # [b, s, Dqk]
        seq = global_sequence_length(rows, ctx.tp_size, ctx.cp_size, sequence_parallel_rows=False)
        indexer = self.indexer_module() if s.mode != "dense" else None
        inputs = selection = None
        if indexer is not None:
            own = own_rows(ctx, rows)
            if x.shape[0] != own.stop - own.start or qr.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"DSA under TP expects the sequence-parallel shard of x and qr ({own.stop - own.start} "
                    f"rows), got {tuple(x.shape)} and {tuple(qr.shape)}: is sequence_parallel on?"
                )
            positions = cp_positions(seq, ctx.cp_size, ctx.cp_rank, q.device, cu_seqlens)[own]
            if cu_seqlens is not None:  # the position inside its own document
                starts = cu_seqlens.to(q.device)[document_ids(cu_seqlens.to(q.device), seq)]
                positions = positions - starts[positions]
            inputs = self.indexer_inputs(x, qr, positions)
        elif s.mode == "sparse":
            selection = self._borrowed_selection(batch, rows)
        # Recomputation's first pass keeps its output, not its graph: the pass the backward
        # reruns trains the indexer, so a sparse indexer loss here would be computed for nothing.
        skip_loss = s.mode == "sparse" and self._recompute_first_pass()
        res = dsa_core(
            ctx, s.mode, q, kv, self.v_dim, self.softmax_scale, s.topk,
            indexer=inputs, selection=selection, with_loss=s.loss_coeff > 0 and not skip_loss,
            sparse_loss=s.sparse_loss,
            objective=s.objective, backend=ops.backend(s.kernel, q.device, s.kernel_options), fp8_indexer=s.fp8_indexer,
            recall_rows=s.recall_rows, cu_seqlens=cu_seqlens,
            up_proj=self.__dict__["_up_projections"]() if self.dense_in_mha_form else None,
            kl_in_backward=self._kl_in_backward(total_rows=batch * seq) if indexer is not None else None,
        )
        self.indexer_flops += res.indexer_flops
        if indexer is not None and s.mode == "sparse" and self.__dict__.get("_lends_selection"):
            # Global positions: a borrowing layer fetches its own KV. Kept only where a layer
            # borrows it: otherwise it would hold the selection (int32, 1 GiB a layer at 128K x
            # 2048) past the backward, until the next forward.
            self._last_topk = res.topk
        out = res.out
        if res.kl is not None:
            out = self._attach_indexer_loss(out, res.kl, res.recall, s.mode, total_rows=batch * seq)
        return out.transpose(0, 1).reshape(rows, batch, heads * out.shape[-1])

    @staticmethod
    def _unpack_thd(query, key, x, qr, packed_seq_params):
        """megatron's THD tensors -> the batch-of-one layout forward reads, and the documents'
        boundaries."""
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(
                f"DSA core attention takes packed sequences in megatron's THD format, got "
                f"qkv_format={packed_seq_params.qkv_format!r}"
            )
        cu_seqlens = packed_seq_params.cu_seqlens_q_padded
        if cu_seqlens is None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        kv_bounds = packed_seq_params.cu_seqlens_kv_padded
        if kv_bounds is None:
            kv_bounds = packed_seq_params.cu_seqlens_kv
        if kv_bounds is not None and not torch.equal(kv_bounds.cpu(), cu_seqlens.cpu()):
            raise ValueError("DSA self-attention needs the same document boundaries for queries and keys")
        # x keeps megatron's [t, 1, hidden]; qr arrives squeezed to [t, q_lora_rank].
        return query.unsqueeze(1), key.unsqueeze(1), x, None if qr is None else qr.unsqueeze(1), cu_seqlens

    def indexer_inputs(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor):
        """The indexer's (q [b, s, HI, DI], k [b, s, DI], w [b, s, HI]) for x [s, b, hidden] and
        qr [s, b, q_lora_rank] at ``positions`` [s], as the core scores them."""
        # Detached: the indexer learns only from its KL, the main model never from it.
        q, k, w = self.indexer_module()(x.detach().transpose(0, 1), qr.detach().transpose(0, 1), positions)
        if self.config.dsa.indexer_dtype == "activation" and q.dtype != x.dtype:
            # Score in the activations' dtype (bf16: tensor-core dots, fp32 accumulation);
            # the fp32 head weights keep the sum over heads exact.
            q, k = q.to(x.dtype), k.to(x.dtype)
        return q, k, w

    def _borrowed_selection(self, batch: int, seq: int) -> torch.Tensor:
        source = self.__dict__.get("_selection_source")
        topk = None if source is None else source._last_topk
        if topk is None or topk.shape[:2] != (batch, seq):
            raise RuntimeError(
                f"layer {self.layer_number} reuses an earlier layer's top-k selection, but none "
                "was made in this forward (dsa_indexer_topk_freq needs the selecting layer first)"
            )
        return topk

    def _recompute_first_pass(self) -> bool:
        """A training forward without gradients: activation recomputation's first pass (the
        pass it reruns in the backward is the one that records and trains)."""
        return self.training and not torch.is_grad_enabled()

    def _record(self, name: str, rows: torch.Tensor) -> None:
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker(name, rows.detach().mean(), self.layer_number, num_layers)

    def _kl_in_backward(self, total_rows: int) -> KLInBackward:
        """The sparse phase's KL as the attention's backward computes it: each own row's KL
        weighs what it would as ``_attach_indexer_loss``'s loss (its share of the mean over ALL
        ``total_rows`` rows, times the coefficient and the schedule's loss scale) and is
        recorded once, in that backward (also under recomputation)."""
        coeff = self.config.dsa.loss_coeff / total_rows

        def weight():
            scale = DSAIndexerLossAutoScaler.main_loss_backward_scale
            return coeff if scale is None else scale * coeff

        return KLInBackward(weight, lambda kl: self._record(INDEXER_KL, kl),
                            selection_shared=bool(self.__dict__.get("_lends_selection")))

    def _attach_indexer_loss(self, out, kl, recall, mode: str, total_rows: int) -> torch.Tensor:
        """``kl`` holds this rank's own rows: the loss is their sum over ALL ``total_rows`` rows
        of the batch, so under TP/CP the sum of the ranks' losses is the one-rank mean."""
        s = self.config.dsa
        loss = kl.sum() / total_rows * s.loss_coeff
        # The pass recomputation reruns in the backward records, so a step records once (as
        # megatron-core's MoE aux losses).
        if not self._recompute_first_pass():
            self._record(INDEXER_KL, kl)
            if recall is not None:
                self._record(TOPK_RECALL, recall)
        if mode == "warmup" and self.config.pipeline_model_parallel_size == 1:
            self._indexer_loss = loss
            return out
        return DSAIndexerLossAutoScaler.apply(out, loss)


def pop_indexer_losses(model: torch.nn.Module) -> list[torch.Tensor]:
    """Collect (and clear) the indexer losses of the last forward, one per layer with a loss."""
    losses = []
    for module in model.modules():
        if isinstance(module, DSACoreAttention):
            loss = module.pop_indexer_loss()
            if loss is not None:
                losses.append(loss)
    return losses
