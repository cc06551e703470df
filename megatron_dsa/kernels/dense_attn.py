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


def _plain_causal(q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor], sq: int, sk: int) -> bool:
    """True when the mask is causal aligned at the last key, as SDPA builds it: keys at
    positions 0..Sk-1 and the queries the last Sq of them (the whole sequence when Sq == Sk, a
    prefill chunk after a cache otherwise), or no positions given. One query row (a decode
    step) is left to the reference: a single row is cheap there, and a fused backend would
    plan anew for every new key count."""
    if sq > sk or (sq == 1 and sk > 1):
        return False
    if k_pos is not None and not torch.equal(k_pos.reshape(-1), torch.arange(sk, device=k_pos.device)):
        return False
    if q_pos is not None and not torch.equal(q_pos.reshape(-1), torch.arange(sk - sq, sk, device=q_pos.device)):
        return False
    return q_pos is not None or sq == sk


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
    if not _plain_causal(q_pos, k_pos, Sq, Sk):
        return reference.dense_mla_attention(q, kv, v_dim, scale, q_pos=q_pos, k_pos=k_pos, need_lse=need_lse)
    # One latent entry per token shared by all heads (MQA): expand to H heads. A copy of the
    # keys per head is S x H x Dqk, far below the S^2 scores it replaces.
    k = kv[:, None].expand(B, H, Sk, kv.shape[-1]).contiguous()
    v = kv[:, None, :, :v_dim].expand(B, H, Sk, v_dim).contiguous()
    backends = _FUSED if q.is_cuda else _FUSED + [SDPBackend.MATH]
    # The whole sequence, or its last Sq positions (causal aligned at the bottom-right).
    mask = dict(is_causal=True) if Sq == Sk else dict(attn_mask=causal_lower_right(Sq, Sk))
    try:
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=scale, **mask)
    except RuntimeError as err:  # no fused backend takes these shapes / dtypes
        if "No available kernel" not in str(err):
            raise
        return reference.dense_mla_attention(q, kv, v_dim, scale, q_pos=q_pos, k_pos=k_pos, need_lse=need_lse)
    out = out.transpose(1, 2).contiguous()
    return out, (_lse(q, kv, scale, q_pos, k_pos) if need_lse else None)
