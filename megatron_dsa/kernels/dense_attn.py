"""Dense causal attention for the dense and warm-up phases on the GPU: in MLA's MHA form (per-head
keys and values, ``dense_attention``, what the layer trains with) and in the absorbed form
(``dense_mla_attention``: one latent entry shared by all heads, what prefill over a cache uses).

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


def _causal_runs(q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor], sq: int, sk: int,
                 q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None):
    """The query rows as runs [(r0, r1, lo, end)] of consecutive positions, each attending keys
    lo..end-1 causally aligned at its last key, as SDPA builds the mask: the whole sequence, a
    prefill chunk after a cache, or a context-parallel rank's chunks (megatron's load-balanced
    layout gives each rank two). Packed sequences (``q_doc`` / ``k_doc``, documents contiguous
    in the keys) cut the runs at document starts, lo being the run's document's first key. None
    when the mask is not of that form: keys not at positions 0..Sk-1, more than MAX_RUNS runs,
    or one query row (a decode step: cheap on the reference, and a fused backend would plan
    anew for every new key count)."""
    if sq > sk or (sq == 1 and sk > 1) or sq == 0:
        return None
    if k_pos is not None and not torch.equal(k_pos.reshape(-1), torch.arange(sk, device=k_pos.device)):
        return None
    packed = q_doc is not None or k_doc is not None
    if q_pos is None and not packed:
        return [(0, sq, 0, sk)] if sq == sk else None
    pos = torch.arange(sq) if q_pos is None else q_pos.reshape(-1)
    cut = (pos[1:] - pos[:-1]) != 1
    first_key = None
    if packed:
        q_doc = torch.zeros(sq, dtype=torch.long, device=pos.device) if q_doc is None else q_doc.reshape(-1).to(pos.device)
        k_doc = torch.zeros(sk, dtype=torch.long, device=pos.device) if k_doc is None else k_doc.reshape(-1).to(pos.device)
        if sk > 1 and bool((k_doc[1:] < k_doc[:-1]).any()):
            return None  # a document's keys are not one contiguous range
        cut = cut | (q_doc[1:] != q_doc[:-1])
        first_key = torch.searchsorted(k_doc.contiguous(), q_doc.contiguous())  # each row's document's first key
    breaks = cut.nonzero().reshape(-1).add(1).tolist()
    if len(breaks) >= MAX_RUNS:
        return None
    starts = [0] + breaks
    ends = breaks + [sq]
    firsts = pos[starts].tolist()
    los = [0] * len(starts) if first_key is None else first_key[starts].tolist()
    runs = [(r0, r1, lo, p0 + (r1 - r0)) for r0, r1, p0, lo in zip(starts, ends, firsts, los)]
    if any(p0 < 0 or end > sk or lo > p0 for (r0, r1, lo, end), p0 in zip(runs, firsts)):
        return None
    return runs


def _sdpa_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, runs) -> Optional[torch.Tensor]:
    """Fused SDPA over the causal runs: q [B, Sq, H, Dqk], per-head k [B, Sk, H, Dqk] and
    v [B, Sk, H, Dv] -> out [B, Sq, H, Dv]; None when no fused backend takes the shapes."""
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    backends = _FUSED if q.is_cuda else _FUSED + [SDPBackend.MATH]
    outs = []
    try:
        with sdpa_kernel(backends):
            for r0, r1, lo, end in runs:
                n = r1 - r0
                # A run of n rows ending at key end-1: causal aligned at the bottom-right.
                mask = dict(is_causal=True) if n == end - lo else dict(attn_mask=causal_lower_right(n, end - lo))
                o = F.scaled_dot_product_attention(q[:, r0:r1].transpose(1, 2), kt[:, :, lo:end], vt[:, :, lo:end],
                                                   scale=scale, **mask)
                outs.append(o.transpose(1, 2))
    except RuntimeError as err:  # no fused backend takes these shapes / dtypes
        if "No available kernel" not in str(err):
            raise
        return None
    return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]).contiguous()


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    need_lse: bool = True,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same as ``reference.dense_attention`` (MLA's MHA form: per-head keys and values):
    q [B, Sq, H, Dqk], k [B, Sk, H, Dqk], v [B, Sk, H, Dv] -> (out [B, Sq, H, Dv], lse or None)."""
    documents = {} if q_doc is None and k_doc is None else dict(q_doc=q_doc, k_doc=k_doc)
    runs = _causal_runs(q_pos, k_pos, q.shape[1], k.shape[1], q_doc, k_doc)
    out = None if runs is None else _sdpa_runs(q, k, v, scale, runs)
    if out is None:
        return reference.dense_attention(q, k, v, scale, q_pos=q_pos, k_pos=k_pos, need_lse=need_lse, **documents)
    if not need_lse:
        return out, None
    with torch.no_grad():
        _, lse = reference.dense_attention(q, k, v[..., :1], scale, q_pos=q_pos, k_pos=k_pos, **documents)
    return out, lse


def dense_mla_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    v_dim: int,
    scale: float,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    need_lse: bool = True,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same as ``reference.dense_mla_attention``: q [B, Sq, H, Dqk], kv [B, Sk, Dqk] ->
    (out [B, Sq, H, v_dim], lse [B, Sq, H] fp32). ``need_lse=False`` returns (out, None) and
    skips the extra pass over the keys the log-sum-exp costs here. ``q_doc`` / ``k_doc``:
    document ids of a packed sequence (each run of rows attends its own document's keys)."""
    B, Sq, H, _ = q.shape
    Sk = kv.shape[1]
    documents = {} if q_doc is None and k_doc is None else dict(q_doc=q_doc, k_doc=k_doc)
    runs = _causal_runs(q_pos, k_pos, Sq, Sk, q_doc, k_doc)
    out = None
    if runs is not None:
        # One latent entry per token shared by all heads (MQA): expand to H heads. A copy of the
        # keys per head is S x H x Dqk, far below the S^2 scores it replaces.
        k = kv[:, :, None].expand(B, Sk, H, kv.shape[-1]).contiguous()
        out = _sdpa_runs(q, k, k[..., :v_dim], scale, runs)
    if out is None:
        return reference.dense_mla_attention(q, kv, v_dim, scale, q_pos=q_pos, k_pos=k_pos, need_lse=need_lse,
                                             **documents)
    if not need_lse:
        return out, None
    with torch.no_grad():
        _, lse = reference.dense_mla_attention(q, kv, 1, scale, q_pos=q_pos, k_pos=k_pos, **documents)
    return out, lse
