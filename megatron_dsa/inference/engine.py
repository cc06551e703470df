"""Prefill and token-by-token decode for our DSA model, with a latent KV cache.

The engine runs the model's own modules and weights layer by layer, and the attention through
the same DSA core as training (``megatron_dsa.core.dsa_core``, on one rank), with the new
tokens' positions as the queries' and the whole cache as the keys. Per layer it caches, for
every token seen:

    latent KV entry  [B, T, kv_lora_rank + rope]  (normalised latent | roped key rope part)
    indexer key      [B, T, DI]                   (LayerNorm, half-split RoPE, Hadamard; only
                                                  layers that run their indexer: one that reuses
                                                  an earlier layer's top-k takes that layer's)

A step with T new tokens (prefill: the prompt; decode: one token), in each layer:
    the MLA absorbed queries, latent entries and query latent of the new tokens at their
    positions (``DSAAbsorbedMLASelfAttention.absorbed_inputs``), the indexer's q / k / w
    (``DSACoreAttention.indexer_inputs``, sparse only); append the latent entries and indexer
    keys to the cache; the DSA core over the cache (sparse: causal top-min(k, n) of ALL cached
    keys, attention over the selected entries only; dense: every cached entry); the V
    up-projection and ``linear_proj`` (``project_output``); the residual and the layer's MLP /
    MoE (a MoE layer runs only the experts its router picked: see ``DSAInference._routed_moe``).

This equals the model's full forward over the whole sequence (the test checks it) in fp32.
Memory per token and layer: (kv_lora_rank + rope + DI) values, 576 + 128 for the 671B shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dsa import ops
from megatron_dsa.config import set_mode
from megatron_dsa.core import dsa_core
from megatron_dsa.model import dsa_layers
from megatron_dsa.parallel import ParallelContext

MODES = ("sparse", "dense")


@dataclass
class LayerCache:
    """Cached entries of one layer. With ``capacity`` the buffers are allocated once (on the
    first append) and filled in place; without, they grow by concatenation."""

    capacity: Optional[int] = None
    n: int = 0
    _kv: Optional[torch.Tensor] = None  # [B, capacity or T, Dqk] latent entries
    _ik: Optional[torch.Tensor] = None  # [B, capacity or T, DI] indexer keys

    @property
    def kv(self) -> Optional[torch.Tensor]:
        return None if self._kv is None else self._kv[:, : self.n]

    @property
    def ik(self) -> Optional[torch.Tensor]:
        return None if self._ik is None else self._ik[:, : self.n]

    def _put(self, buf: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
        if self.capacity is None:
            return new if buf is None else torch.cat([buf[:, : self.n], new], dim=1)
        if buf is None:
            buf = new.new_empty(new.shape[0], self.capacity, new.shape[-1])
        if self.n + new.shape[1] > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded")
        buf[:, self.n : self.n + new.shape[1]] = new
        return buf

    def append(self, kv: torch.Tensor, ik: Optional[torch.Tensor]):
        self._kv = self._put(self._kv, kv)
        if ik is not None:
            self._ik = self._put(self._ik, ik)
        self.n += kv.shape[1]
        return self.kv, self.ik


@dataclass
class KVCache:
    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int, capacity: Optional[int] = None) -> "KVCache":
        return cls([LayerCache(capacity) for _ in range(num_layers)], 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.layers for t in (c.kv, c.ik) if t is not None)


class DSAInference:
    """Inference over a built megatron-dsa GPTModel (TP=1, one process)."""

    def __init__(self, model: torch.nn.Module, mode: str = "sparse", kernel: str = "reference"):
        """kernel: 'reference' (plain PyTorch, default) or 'auto'/'triton' (megatron_dsa.ops:
        the Triton kernels on CUDA; they take the queries' positions like the reference)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model.eval()
        self.mode = mode
        self.config = model.config
        self.layers = list(model.decoder.layers)
        self.cores = dsa_layers(model)
        self.device = device = next(model.parameters()).device
        self.backend = ops.backend(kernel, device, model.config.dsa.kernel_options)
        self.parallel = ParallelContext()  # one rank
        self.routed = [self._routed_experts_only(layer.mlp) for layer in self.layers]  # see _routed_moe
        self._selection: Optional[torch.Tensor] = None  # the last selecting layer's top-k, this step

    def new_cache(self, capacity: Optional[int] = None) -> KVCache:
        return KVCache.empty(len(self.layers), capacity)

    # ---- one layer ----------------------------------------------------------------------

    def _attention(self, attn, core, h: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """h [T, B, hidden] at ``positions`` [T] (after the cached tokens) -> the attention's
        output [T, B, hidden]."""
        T, B, _ = h.shape
        query, latent, qr = attn.absorbed_inputs(h, first_position=cache.n)
        q = query.transpose(0, 1)  # [B, T, H, Dqk]
        qi = ik = wi = None
        selects = self.mode == "sparse" and core.selects
        if selects:
            qi, ik, wi = core.indexer_inputs(h, qr, positions)
        kv_all, ik_all = cache.append(latent.squeeze(2).transpose(0, 1), ik)
        res = dsa_core(
            self.parallel, self.mode, q, kv_all, core.v_dim, core.softmax_scale, self.config.dsa.topk,
            indexer=(qi, ik_all, wi) if selects else None, q_pos=positions, with_loss=False,
            backend=self.backend, selection=None if selects else self._selection,
        )
        if selects:
            self._selection = res.topk  # the layers after it that have no indexer reuse it
        out, bias = attn.project_output(res.out.transpose(0, 1).reshape(T, B, -1))
        return out if bias is None else out + bias

    def _layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [T, B, hidden] (megatron's layout) through layer i."""
        layer = self.layers[i]
        x = x + self._attention(layer.self_attention, self.cores[i], layer.input_layernorm(x), positions,
                                cache.layers[i])
        h = layer.pre_mlp_layernorm(x)
        mlp_out, bias = self._routed_moe(layer.mlp, h) if self.routed[i] else layer.mlp(h)
        if bias is not None:
            mlp_out = mlp_out + bias
        return x + mlp_out

    @staticmethod
    def _routed_experts_only(mlp) -> bool:
        """Whether ``_routed_moe`` may run ``mlp`` itself: a one-rank MoE layer of per-expert MLPs
        (SequentialMLP) with the probabilities applied after the experts, no latent projection."""
        cfg = mlp.config
        return (isinstance(mlp, MoELayer) and isinstance(mlp.experts, SequentialMLP)
                and mlp.experts.num_local_experts == cfg.num_moe_experts
                and not cfg.moe_apply_probs_on_input and not getattr(cfg, "moe_latent_size", None)
                and not cfg.fp8 and not getattr(cfg, "fp4", None))

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

    # ---- steps -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed ``tokens`` [B, T] after the cached ones; returns logits [B, T, V] (fp32) on the
        model's device (tokens are moved there)."""
        tokens = tokens.to(self.device)
        T = tokens.shape[1]
        positions = torch.arange(cache.length, cache.length + T, device=tokens.device)
        x = self.model.embedding.word_embeddings(tokens).transpose(0, 1)  # [T, B, hidden]
        for i in range(len(self.layers)):
            x = self._layer(i, x, positions, cache)
        cache.length += T
        logits, _ = self.model.output_layer(self.model.decoder.final_layernorm(x))
        return logits.transpose(0, 1).float()

    def prefill(self, tokens: torch.Tensor, capacity: Optional[int] = None) -> tuple[torch.Tensor, KVCache]:
        cache = self.new_cache(capacity)
        return self.step(tokens, cache), cache

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy continuation of ``tokens`` [B, T]: prefill, then one token per decode step.
        Returns the new tokens [B, <= max_new_tokens] (stops early when every row hit eos)."""
        tokens = tokens.to(self.device)
        logits, cache = self.prefill(tokens, capacity=tokens.shape[1] + max_new_tokens)
        out = []
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = self.step(nxt[:, None], cache)
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
