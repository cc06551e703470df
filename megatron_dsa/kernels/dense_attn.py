"""Dense causal MLA attention (absorbed form) for the dense and warm-up phases on the GPU.

No Triton kernel of our own: PyTorch's fused scaled-dot-product attention (flash, memory-
efficient or cuDNN, whichever takes the shapes) already streams the keys without S^2 memory.
The math backend, which materialises the S x S scores, is never allowed on the GPU: shapes no
fused backend takes fall back to the reference's chunked, checkpointed attention instead.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from megatron_dsa import reference

_FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


MAX_RUNS = 8  # more runs of consecutive query positions than this: the reference


def _causal_runs(q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor], sq: int, sk: int):
    """The query rows as runs [(r0, r1, end)] of consecutive positions, each attending keys
    0..end-1 causally aligned at its last key, as SDPA builds the mask: the whole sequence, a
    prefill chunk after a cache, or a context-parallel rank's chunks (megatron's load-balanced
    layout gives each rank two). None when the mask is not of that form: keys not at positions
    0..Sk-1, more than MAX_RUNS runs, or one query row (a decode step: cheap on the reference,
    and a fused backend would plan anew for every new key count)."""
    if sq > sk or (sq == 1 and sk > 1):
        return None
    if k_pos is not None and not torch.equal(k_pos.reshape(-1), torch.arange(sk, device=k_pos.device)):
        return None
    if q_pos is None:
        return [(0, sq, sk)] if sq == sk else None
    pos = q_pos.reshape(-1)
    if sq == 0:
        return None
    breaks = ((pos[1:] - pos[:-1]) != 1).nonzero().reshape(-1).add(1).tolist()
    if len(breaks) >= MAX_RUNS:
        return None
    starts = [0] + breaks
    ends = breaks + [sq]
    firsts = pos[starts].tolist()
    runs = [(r0, r1, p0 + (r1 - r0)) for r0, r1, p0 in zip(starts, ends, firsts)]
    if any(p0 < 0 or end > sk for (r0, r1, end), p0 in zip(runs, firsts)):
        return None
    return runs


def _lse(q: torch.Tensor, kv: torch.Tensor, scale: float, q_pos, k_pos) -> torch.Tensor:
    """Log-sum-exp [B, Sq, H] of the causal scores in fp32, without autograd (only callers
    that ask for it pay: the layer does not)."""
    with torch.no_grad():
        _, lse = reference.dense_mla_attention(q, kv, 1, scale, q_pos=q_pos, k_pos=k_pos)
    return lse


def dense_mla_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    v_dim: int,
    scale: float,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same as ``reference.dense_mla_attention``: q [B, Sq, H, Dqk], kv [B, Sk, Dqk] ->
    (out [B, Sq, H, v_dim], lse [B, Sq, H] fp32). ``need_lse=False`` returns (out, None) and
    skips the extra pass over the keys the log-sum-exp costs here."""
    B, Sq, H, _ = q.shape
    Sk = kv.shape[1]
    runs = _causal_runs(q_pos, k_pos, Sq, Sk)
    if runs is None:
        return reference.dense_mla_attention(q, kv, v_dim, scale, q_pos=q_pos, k_pos=k_pos, need_lse=need_lse)
    # One latent entry per token shared by all heads (MQA): expand to H heads. A copy of the
    # keys per head is S x H x Dqk, far below the S^2 scores it replaces.
    k = kv[:, None].expand(B, H, Sk, kv.shape[-1]).contiguous()
    v = kv[:, None, :, :v_dim].expand(B, H, Sk, v_dim).contiguous()
    backends = _FUSED if q.is_cuda else _FUSED + [SDPBackend.MATH]
    outs = []
    try:
        with sdpa_kernel(backends):
            for r0, r1, end in runs:
                n = r1 - r0
                # A run of n rows ending at key end-1: causal aligned at the bottom-right.
                mask = dict(is_causal=True) if n == end else dict(attn_mask=causal_lower_right(n, end))
                o = F.scaled_dot_product_attention(q[:, r0:r1].transpose(1, 2), k[:, :, :end], v[:, :, :end],
                                                   scale=scale, **mask)
                outs.append(o.transpose(1, 2))
    except RuntimeError as err:  # no fused backend takes these shapes / dtypes
        if "No available kernel" not in str(err):
            raise
        return reference.dense_mla_attention(q, kv, v_dim, scale, q_pos=q_pos, k_pos=k_pos, need_lse=need_lse)
    out = (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]).contiguous()
    return out, (_lse(q, kv, scale, q_pos, k_pos) if need_lse else None)
