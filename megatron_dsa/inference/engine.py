"""Prefill and decode for our DSA model over a paged cache (``paged.PagedCache``).

The engine runs the model's own modules and weights layer by layer. Per layer it caches, for
every token seen, in the paged cache's blocks:

    latent row   kv_lora_rank + rope  (normalised latent | roped key rope part)
    indexer key  DI                   (LayerNorm, half-split RoPE, Hadamard; FP8 with a per-token
                                      scale by default; only layers that run their indexer: one
                                      that reuses an earlier layer's top-k takes that layer's)

Prefill (a prompt, in chunks of ``prefill_chunk`` tokens) runs the attention through the same
DSA core as training (``megatron_dsa.core.dsa_core`` on one rank, the training kernels or the
reference): the chunk's queries at their positions against the sequence's cached rows, read
back from the cache (so the indexer scores the keys as stored, FP8 included).

Decode (one new token for each of several sequences of any lengths) runs the paged ops
(``ops.decode_backend``): the indexer over each sequence's cached keys, its top-k, and the
absorbed-MLA attention over the selected latent rows (sparse) or all of them (dense). The new
tokens' RoPE is applied at each one's own position from device tensors, so one step serves a
ragged batch and, on a GPU, can be replayed as a CUDA graph (``cuda_graphs=True``, see
``graphs.DecodeGraphs``).

After the attention: the V up-projection and ``linear_proj`` (``project_output``), the residual
and the layer's MLP / MoE (an eager MoE layer runs only the experts its router picked, see
``DSAInference._routed_moe``). With fp32 indexer keys this equals the model's full forward over
the whole sequence (the tests check it); FP8 keys change only which keys the indexer ranks
first where their scores are within FP8's rounding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dsa import ops
from megatron_dsa import reference as R
from megatron_dsa.config import set_mode
from megatron_dsa.core import dsa_core, dsa_decode
from megatron_dsa.inference.paged import KEY_FORMATS, CacheError, PagedCache
from megatron_dsa.model import dsa_layers
from megatron_dsa.parallel import ParallelContext

MODES = ("sparse", "dense")


class DSAInference:
    """Inference over a built megatron-dsa GPTModel (TP=1, one process)."""

    def __init__(self, model: torch.nn.Module, mode: str = "sparse", kernel: str = "reference",
                 indexer_keys: Optional[str] = None, block_size: int = 64, prefill_chunk: int = 4096,
                 cuda_graphs: bool = False):
        """kernel: 'reference' (plain PyTorch, default) or 'auto'/'triton' (the Triton kernels:
        the training kernels for prefill, ``kernels.decode`` for decode). indexer_keys: how the
        cache stores indexer keys ('fp8' e4m3 + per-token scale, 'bf16', 'fp32'; default: as the
        model was trained to score them, FP8 with ``mdsa_fp8_indexer``, else the weights' dtype).
        cuda_graphs: replay the decode step as CUDA graphs, one per batch-size bucket (CUDA and
        the Triton decode kernels only)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if indexer_keys is None:
            weights = next(model.parameters()).dtype
            indexer_keys = "fp8" if model.config.dsa.fp8_indexer else ("bf16" if weights == torch.bfloat16 else "fp32")
        if indexer_keys not in KEY_FORMATS:
            raise ValueError(f"indexer_keys must be one of {KEY_FORMATS}, got {indexer_keys!r}")
        if block_size < 1 or prefill_chunk < 1:
            raise ValueError(f"block_size and prefill_chunk must be >= 1, got {block_size}, {prefill_chunk}")
        self.device = device = next(model.parameters()).device
        if cuda_graphs and device.type != "cuda":
            raise RuntimeError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device.type} "
                               "(CUDA graphs are unavailable there)")
        self.model = model.eval()
        self.mode = mode
        self.config = cfg = model.config
        self.layers = list(model.decoder.layers)
        self.cores = dsa_layers(model)
        self.backend = ops.backend(kernel, device, cfg.dsa.kernel_options)
        self.decode_ops = ops.decode_backend(kernel, device, cfg.dsa.kernel_options)
        if cuda_graphs and self.decode_ops.name == "reference":
            raise RuntimeError("cuda_graphs=True needs the Triton decode kernels (kernel='auto' or 'triton'); the "
                               "reference decode reads the lengths on the host")
        self.indexer_keys, self.block_size, self.prefill_chunk = indexer_keys, block_size, prefill_chunk
        self.parallel = ParallelContext()  # one rank
        self.routed = [self._routed_experts_only(layer.mlp) for layer in self.layers]  # see _routed_moe
        self._expert_stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # see _stacked_moe
        self._selection: Optional[torch.Tensor] = None  # the last selecting layer's top-k, this step
        self.max_length = int(getattr(model, "max_sequence_length", None) or 1 << 62)
        self._rope_inv_freq = R.rope_inv_freq(cfg.qk_pos_emb_head_dim, float(cfg.rotary_base), cfg.dsa.yarn, device)
        self.graphs = None
        if cuda_graphs:
            from megatron_dsa.inference.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)

    def new_cache(self, max_sequences: int = 1, max_length: Optional[int] = None,
                  num_blocks: Optional[int] = None) -> PagedCache:
        """A paged cache for up to ``max_sequences`` sequences of up to ``max_length`` tokens
        (default: the model's maximum); ``num_blocks`` (default: enough for all of them at
        full length) bounds the pool."""
        cfg = self.config
        max_length = min(max_length or self.max_length, self.max_length)
        per_seq = -(-max_length // self.block_size)
        dtype = next(self.model.parameters()).dtype
        return PagedCache(
            num_layers=len(self.layers),
            indexer_layers=[i for i, core in enumerate(self.cores) if core.selects and self.mode == "sparse"],
            latent_dim=cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim, indexer_dim=cfg.dsa.head_dim,
            num_blocks=num_blocks or max_sequences * per_seq, block_size=self.block_size,
            max_sequences=max_sequences, max_length=max_length, model_max_length=self.max_length, dtype=dtype,
            key_format=self.indexer_keys, device=self.device)

    # ---- one layer ----------------------------------------------------------------------

    def _rope_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate the rope part (last dims) of x [..., B, D], computed at position 0, to each
        token's position [B]. MLA's RoPE (megatron-core's, YaRN included) is a rotation of the
        position-0 result in its rotate-half layout, so it composes."""
        rope = self._rope_inv_freq.shape[0] * 2
        angles = positions.float()[:, None] * self._rope_inv_freq[None]  # [B, rope / 2]
        cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
        part = x[..., -rope:].float()
        half = rope // 2
        rotated = part * cos + torch.cat([-part[..., half:], part[..., :half]], dim=-1) * sin
        return torch.cat([x[..., :-rope], rotated.to(x.dtype)], dim=-1)

    def _prefill_attention(self, i: int, h: torch.Tensor, seq: int, start: int, cache: PagedCache) -> torch.Tensor:
        """h [T, 1, hidden]: one sequence's tokens at ``start``.. -> the attention's output
        [T, 1, hidden], through the DSA core against the sequence's cached rows."""
        attn, core = self.layers[i].self_attention, self.cores[i]
        T = h.shape[0]
        positions = torch.arange(start, start + T, device=h.device)
        query, latent, qr = attn.absorbed_inputs(h, first_position=start)
        selects = self.mode == "sparse" and core.selects
        qi = ik = wi = None
        if selects:
            qi, ik, wi = core.indexer_inputs(h, qr, positions)
        slots = cache.slots(torch.tensor([seq], device=h.device), positions[None])[0]
        cache.write(i, slots, latent.reshape(T, -1), None if ik is None else ik[0])
        kv_all, ik_all = cache.rows(i, seq, start + T)
        if selects and cache.key_format == "fp8":  # FP8 keys are scored with an FP8 query, as the decode does
            qi = R.fp8_rounded(qi).to(qi.dtype)
        res = dsa_core(
            self.parallel, self.mode, query.transpose(0, 1), kv_all, core.v_dim, core.softmax_scale,
            self.config.dsa.topk, indexer=(qi, ik_all.to(qi.dtype), wi) if selects else None, q_pos=positions,
            with_loss=False, backend=self.backend, selection=None if selects else self._selection,
        )
        if selects:
            self._selection = res.topk
        out, bias = attn.project_output(res.out.transpose(0, 1).reshape(T, 1, -1))
        return out if bias is None else out + bias

    def _decode_attention(self, i: int, h: torch.Tensor, seqs: torch.Tensor, cache: PagedCache) -> torch.Tensor:
        """h [1, B, hidden]: one new token of each sequence ``seqs`` [B] (already counted in the
        cache's lengths) -> the attention's output [1, B, hidden], through the paged ops."""
        attn, core = self.layers[i].self_attention, self.cores[i]
        B = h.shape[1]
        lengths = cache.lengths[seqs]
        positions = lengths.long() - 1
        query, latent, qr = attn.absorbed_inputs(h, first_position=0)  # roped at 0, rotated below
        query = self._rope_at(query[0].transpose(0, 1), positions).transpose(0, 1)  # [B, H, Dqk]
        latent = self._rope_at(latent.reshape(B, -1), positions)
        selects = self.mode == "sparse" and core.selects
        ik = None
        if selects:  # the B tokens as one sequence of B positions: the indexer's RoPE per token
            qi, ik, wi = core.indexer_inputs(h.transpose(0, 1), qr.transpose(0, 1), positions)
        cache.write(i, cache.slots(seqs, positions[:, None])[:, 0], latent, None if ik is None else ik[0])
        res = dsa_decode(
            self.mode, self.decode_ops, query, cache.kv[i], cache.block_table[seqs], lengths, core.v_dim,
            core.softmax_scale, self.config.dsa.topk,
            indexer=(qi[0], wi[0], cache.keys[i], cache.key_scales[i]) if selects else None,
            selection=None if selects else self._selection,
        )
        if selects:
            self._selection = res.topk  # the layers after it that have no indexer reuse it
        out, bias = attn.project_output(res.out.reshape(1, B, -1))
        return out if bias is None else out + bias

    def _mlp(self, i: int, x: torch.Tensor, graphed: bool) -> torch.Tensor:
        layer = self.layers[i]
        h = layer.pre_mlp_layernorm(x)
        if self.routed[i]:
            mlp_out, bias = self._stacked_moe(i, layer.mlp, h) if graphed else self._routed_moe(layer.mlp, h)
        else:
            mlp_out, bias = layer.mlp(h)
        return x + (mlp_out if bias is None else mlp_out + bias)

    @staticmethod
    def _routed_experts_only(mlp) -> bool:
        """Whether ``_routed_moe`` / ``_stacked_moe`` may run ``mlp`` themselves: a one-rank MoE
        layer of per-expert MLPs (SequentialMLP) without biases, the probabilities applied after
        the experts, no latent projection, an activation megatron-core applies as written (GLU
        without clamp or offset, or a plain one)."""
        cfg = mlp.config
        return (isinstance(mlp, MoELayer) and isinstance(mlp.experts, SequentialMLP)
                and mlp.experts.num_local_experts == cfg.num_moe_experts
                and not cfg.moe_apply_probs_on_input and not getattr(cfg, "moe_latent_size", None)
                and not cfg.fp8 and not getattr(cfg, "fp4", None) and not cfg.add_bias_linear
                and getattr(cfg, "activation_func_clamp_value", None) is None
                and not getattr(cfg, "glu_linear_offset", 0.0))

    @staticmethod
    def _routed_moe(mlp, h: torch.Tensor):
        """A MoE layer on ``h`` [s, b, hidden] running only the experts its router picked
        (megatron-core's SequentialMLP runs every expert, also those with no token: most of a
        batch-1 decode step's operators); same router, expert modules and combine."""
        shared = mlp.shared_experts(h) if mlp.shared_experts is not None else None
        probs, routing_map = mlp.router(h)                                      # [tokens, experts]
        x = h.reshape(-1, h.shape[-1])
        out = torch.zeros_like(x)
        for e in routing_map.any(dim=0).nonzero().flatten().tolist():
            rows = routing_map[:, e].nonzero().flatten()
            y, _ = mlp.experts.local_experts[e](x[rows], probs[rows, e])
            out.index_add_(0, rows, y.to(out.dtype))
        out = out.view_as(h)
        return (out if shared is None else out + shared), None

    def _stacked_moe(self, i: int, mlp, h: torch.Tensor):
        """``_routed_moe`` without reading the routing on the host (a CUDA graph cannot): every
        expert over every token as two batched products over the experts' stacked weights,
        weighted by the router's probability where it picked the expert, 0 else. The stacks are
        copied from the weights on first use (inference does not change them)."""
        shared = mlp.shared_experts(h) if mlp.shared_experts is not None else None
        probs, routing_map = mlp.router(h)
        if i not in self._expert_stacks:
            experts = mlp.experts.local_experts
            w1 = torch.cat([e.linear_fc1.weight for e in experts])                     # [E*F(x2), H]
            w2 = torch.cat([e.linear_fc2.weight.t() for e in experts])                 # [E*F, H]
            self._expert_stacks[i] = (w1, w2)
        w1, w2 = self._expert_stacks[i]
        cfg = mlp.config
        E = mlp.experts.num_local_experts
        x = h.reshape(-1, h.shape[-1])
        inner = (x @ w1.t()).view(x.shape[0], E, -1)                                   # [T, E, F(x2)]
        if cfg.gated_linear_unit:
            gate, linear = inner.chunk(2, dim=-1)
            inner = cfg.activation_func(gate) * linear
        else:
            inner = cfg.activation_func(inner)
        weights = (probs * routing_map)[..., None]                                     # [T, E, 1]
        inner = (inner * weights).to(x.dtype)  # scaled as megatron-core's MLP scales per token
        out = (inner.reshape(x.shape[0], -1) @ w2).view_as(h)
        return (out if shared is None else out + shared), None

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model.output_layer(self.model.decoder.final_layernorm(x))
        return logits.transpose(0, 1).float()

    # ---- steps -----------------------------------------------------------------------------

    @torch.no_grad()
    def prefill_sequence(self, tokens: torch.Tensor, cache: PagedCache, seq: int) -> torch.Tensor:
        """Append ``tokens`` [T] to sequence ``seq`` of the cache in chunks; logits [T, V] (fp32)."""
        tokens = tokens.to(self.device)
        T = tokens.shape[0]
        start = cache.host_lengths[seq]
        cache.reserve([seq], [T])  # one clear error before any compute
        out = []
        for c0 in range(0, T, self.prefill_chunk):
            chunk = tokens[c0 : c0 + self.prefill_chunk]
            x = self.model.embedding.word_embeddings(chunk[None]).transpose(0, 1)  # [t, 1, hidden]
            for i, layer in enumerate(self.layers):
                x = x + self._prefill_attention(i, layer.input_layernorm(x), seq, start + c0, cache)
                x = self._mlp(i, x, graphed=False)
            cache.advance([seq], [chunk.shape[0]])
            out.append(self._logits(x)[0])
        return torch.cat(out)

    def decode_step(self, tokens: torch.Tensor, seqs: torch.Tensor, cache: PagedCache, graphed: bool = False):
        """The device part of a decode step: one token [B] for each sequence ``seqs`` [B], whose
        length already counts it; logits [B, V] (fp32). No host synchronisation with the Triton
        decode ops and ``graphed`` (the MoE without host routing): what a CUDA graph captures."""
        x = self.model.embedding.word_embeddings(tokens[None])  # [1, B, hidden]
        for i, layer in enumerate(self.layers):
            x = x + self._decode_attention(i, layer.input_layernorm(x), seqs, cache)
            x = self._mlp(i, x, graphed)
        return self._logits(x)[:, 0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: PagedCache, seqs: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One new token [B] for each sequence ``seqs`` (default 0..B-1), each at its own
        position; logits [B, V] (fp32)."""
        seqs = list(range(tokens.shape[0])) if seqs is None else list(seqs)
        cache.reserve(seqs, [1] * len(seqs))  # one clear error before any compute
        cache.advance(seqs, [1] * len(seqs))
        tokens = tokens.to(self.device)
        index = torch.tensor(seqs, device=self.device)
        if self.graphs is not None:
            return self.graphs.run(tokens, index, cache)
        return self.decode_step(tokens, index, cache)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: PagedCache) -> torch.Tensor:
        """Feed ``tokens`` [B, T] to sequences 0..B-1 after their cached ones; logits [B, T, V]
        (fp32): one token each is a decode step, more a (chunked) prefill of each sequence."""
        if tokens.shape[1] == 1:
            return self.decode(tokens[:, 0], cache)[:, None]
        B, T = tokens.shape
        cache.reserve(list(range(B)), [T] * B)  # all sequences fit, or nothing runs
        return torch.stack([self.prefill_sequence(tokens[b], cache, b) for b in range(B)])

    def prefill(self, tokens: torch.Tensor, capacity: Optional[int] = None,
                num_blocks: Optional[int] = None) -> tuple[torch.Tensor, PagedCache]:
        """A new cache holding ``tokens`` [B, T] as B sequences with room for ``capacity`` tokens
        each (default: the model's maximum length); logits [B, T, V]."""
        cache = self.new_cache(tokens.shape[0], capacity, num_blocks)
        for _ in range(tokens.shape[0]):
            cache.add_sequence()
        return self.step(tokens, cache), cache

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy continuation of ``tokens`` [B, T]: prefill, then one token per decode step.
        Returns the new tokens [B, <= max_new_tokens] (stops early when every row hit eos)."""
        tokens = tokens.to(self.device)
        logits, cache = self.prefill(tokens, capacity=tokens.shape[1] + max_new_tokens)
        logits = logits[:, -1]
        out = []
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = self.decode(nxt, cache)
        return torch.stack(out, dim=1) if out else tokens.new_zeros(tokens.shape[0], 0)


@torch.no_grad()
def full_forward_logits(model: torch.nn.Module, tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """The model's own forward over a whole sequence in ``mode`` (for comparison), [B, T, V].
    The per-layer metrics it records (indexer KL, MoE losses) go to a tracker of its own, so a
    training run's are untouched and models of other depths can be compared in one process."""
    from megatron.core.transformer.moe import moe_logging

    old, tracker = model.config.mdsa_mode, moe_logging.get_moe_metrics_tracker()
    set_mode(model.config, mode)
    moe_logging.set_moe_metrics_tracker(moe_logging.MoEMetricsTracker())
    try:
        tokens = tokens.to(next(model.parameters()).device)
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device)[None].expand(B, -1)
        return model(tokens, positions, None).float()
    finally:
        moe_logging.set_moe_metrics_tracker(tracker)
        set_mode(model.config, old)
