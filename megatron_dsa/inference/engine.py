"""Prefill and token-by-token decode for our DSA model, with a latent KV cache.

The engine runs the model's own modules and weights (embedding, norms, linear layers, MLP/MoE,
output layer) and does the attention math of one layer in plain PyTorch with
``megatron_dsa.reference`` (absolute ``q_pos``/``k_pos``, so new queries attend to cached
keys). Per layer it caches, for every token seen:

    latent KV entry  [B, T, kv_lora_rank + rope]  (normalised latent | roped key rope part)
    indexer key      [B, T, DI]                   (LayerNorm, half-split RoPE, Hadamard)

A step with T new tokens (prefill: the prompt; decode: one token):
    MLA absorbed query  q = [q_nope @ W_UK | rope(q_pe)]                        [B, T, H, Dqk]
    sparse: indexer scores of the new queries against ALL cached keys, causal top-min(k, n)
            (``reference.indexer_topk``), attention over the selected latent entries only
            (``reference.sparse_mla_attention``);
    dense:  causal attention over every cached entry (``reference.dense_mla_attention``);
    then the V up-projection, ``linear_proj``, the residual, the layer's MLP / MoE (a MoE layer
    runs only the experts its router picked: see ``DSAInference._routed_moe``).

This equals the model's full forward over the whole sequence (the test checks it) in fp32.
Memory per token and layer: (kv_lora_rank + rope + DI) values, 576 + 128 for the 671B shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megatron_dsa import reference as R

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


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, getattr(module, "bias", None))


def _mla_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron-core's MLA RoPE (mla_rotary_interleaved=True): de-interleave, then half-split."""
    x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    return R.apply_rope_half_split(x, cos, sin)


class _StepPositions(NamedTuple):
    """Positions of one step's new tokens (``q_pos``) and of every cached token (``k_pos``), with
    their RoPE tables for MLA and for the indexer."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    mla_rope: tuple[torch.Tensor, torch.Tensor]
    indexer_rope: Optional[tuple[torch.Tensor, torch.Tensor]]


class DSAInference:
    """Inference over a built megatron-dsa GPTModel (TP=1, one process)."""

    def __init__(self, model: torch.nn.Module, mode: str = "sparse", kernel: str = "reference"):
        """kernel: 'reference' (plain PyTorch, default) or 'auto'/'triton' (megatron_dsa.ops:
        the Triton kernels on CUDA, if they take ``q_pos``/``k_pos`` like the reference)."""
        from megatron_dsa import ops
        from megatron_dsa.model import dsa_layers

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model.eval()
        self.mode = mode
        self.config = model.config
        self.layers = list(model.decoder.layers)
        self.cores = dsa_layers(model)
        self.device = device = next(model.parameters()).device
        self.ops = ops.backend(kernel, device)
        self.routed = [self._routed_experts_only(layer.mlp) for layer in self.layers]  # see _routed_moe
        s = self.config.dsa
        if s.topk_freq != 1 or s.indexer_sharing != "per_layer":
            raise ValueError("inference supports one indexer per layer selecting in every layer")

    def new_cache(self, capacity: Optional[int] = None) -> KVCache:
        return KVCache.empty(len(self.layers), capacity)

    # ---- one layer ----------------------------------------------------------------------

    def _attention(self, attn, core, h: torch.Tensor, at: "_StepPositions", cache: LayerCache) -> torch.Tensor:
        cfg = self.config
        B, T, _ = h.shape
        n, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim,
                            cfg.v_head_dim, cfg.kv_lora_rank)
        cos, sin = at.mla_rope
        qr = attn.q_layernorm(_linear(attn.linear_q_down_proj, h))            # [B, T, q_lora]
        q = _linear(attn.linear_q_up_proj, qr).view(B, T, n, dn + dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        k_up, v_up = attn._get_kv_up_weights()                                  # [n, dn, r], [n, dv, r]
        q_abs = torch.einsum("btnd,ndk->btnk", q_nope, k_up)
        query = torch.cat([q_abs, _mla_rope(q_pe, cos, sin)], dim=-1)           # [B, T, n, r + dr]
        kv = _linear(attn.linear_kv_down_proj, h)
        c, k_pe = kv.split([r, dr], dim=-1)
        latent = torch.cat([attn.kv_layernorm(c), _mla_rope(k_pe, cos, sin)], dim=-1)  # [B, T, r + dr]

        ik = None
        indexer = core._get_indexer()
        if self.mode == "sparse":
            s = cfg.dsa
            icos, isin = at.indexer_rope
            qi, ik, wi = R.indexer_qkw(
                _linear(indexer.wq_b, qr), _linear(indexer.wk, h), _linear(indexer.weights_proj, h),
                indexer.k_norm.weight, indexer.k_norm.bias, icos, isin, n_heads=s.n_heads, eps=s.k_norm_eps,
            )
            if s.indexer_dtype == "activation":  # as the layer scores them (DSACoreAttention._indexer_inputs)
                qi, ik = qi.to(h.dtype), ik.to(h.dtype)
        kv_all, ik_all = cache.append(latent, ik)
        if self.mode == "sparse":
            topk = self.ops.indexer_topk(qi, ik_all, wi, cfg.dsa.topk, q_pos=at.q_pos, k_pos=at.k_pos)
            out, _ = self.ops.sparse_mla_attention(query, kv_all, topk, r, core.softmax_scale)
        else:
            out, _ = self.ops.dense_mla_attention(query, kv_all, r, core.softmax_scale, q_pos=at.q_pos, k_pos=at.k_pos,
                                                  need_lse=False)
        o = torch.einsum("btnk,nvk->btnv", out.to(v_up.dtype), v_up).reshape(B, T, n * dv)
        return _linear(attn.linear_proj, o)

    def _layer(self, i: int, x: torch.Tensor, at: "_StepPositions", cache: KVCache) -> torch.Tensor:
        layer = self.layers[i]
        h = layer.input_layernorm(x)
        x = x + self._attention(layer.self_attention, self.cores[i], h, at, cache.layers[i])
        h = layer.pre_mlp_layernorm(x)
        h = h.transpose(0, 1).contiguous()                                      # megatron: [s, b, h]
        mlp_out, bias = self._routed_moe(layer.mlp, h) if self.routed[i] else layer.mlp(h)
        if bias is not None:
            mlp_out = mlp_out + bias
        return x + mlp_out.transpose(0, 1)

    @staticmethod
    def _routed_experts_only(mlp) -> bool:
        """Whether ``_routed_moe`` may run ``mlp`` itself: a one-rank MoE layer of per-expert MLPs
        (SequentialMLP) with the probabilities applied after the experts, no latent projection."""
        from megatron.core.transformer.moe.experts import SequentialMLP
        from megatron.core.transformer.moe.moe_layer import MoELayer

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
        B, T = tokens.shape
        start = cache.length
        positions = torch.arange(start, start + T, device=tokens.device)
        cfg = self.config
        at = _StepPositions(  # the same for every layer: computed once per step
            q_pos=positions, k_pos=torch.arange(start + T, device=tokens.device),
            mla_rope=R.rope_cos_sin(positions, cfg.qk_pos_emb_head_dim, cfg.rotary_base),
            indexer_rope=(R.rope_cos_sin(positions, cfg.dsa.rope_dim, cfg.dsa.rope_base)
                          if self.mode == "sparse" else None))
        x = self.model.embedding.word_embeddings(tokens)                         # [B, T, H]
        for i in range(len(self.layers)):
            x = self._layer(i, x, at, cache)
        cache.length += T
        x = self.model.decoder.final_layernorm(x)
        logits, _ = self.model.output_layer(x.transpose(0, 1).contiguous())
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
    """The model's own forward over a whole sequence in ``mode`` (for comparison), [B, T, V]."""
    from megatron_dsa.config import set_mode

    old = model.config.mdsa_mode
    set_mode(model.config, mode)
    try:
        tokens = tokens.to(next(model.parameters()).device)
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device)[None].expand(B, -1)
        return model(tokens, positions, None).float()
    finally:
        set_mode(model.config, old)
