"""Triton kernels for DeepSeek Sparse Attention; each function equals the one of the same name in
``megatron_dsa.reference`` (same arguments, shapes, dtypes and return values).

* ``indexer_topk(q, k, w, topk, q_pos=None, k_pos=None, fp8=False, ordered=True, q_doc=None, k_doc=None)``
  -> [B, Sq, topk] int32, -1 padded: the selection every op below takes (``topk_idx``; decoding:
  [B, K]); the ops that read it take int32 only
* ``dense_mla_attention(q, kv, v_dim, scale, q_pos=None, k_pos=None, need_lse=True, q_doc=None, k_doc=None)``
  -> (out, lse),
  autograd (PyTorch's fused SDPA; never the S^2 math path on the GPU)
* ``dense_attention(q, k, v, scale, q_pos=None, k_pos=None, need_lse=True, q_doc=None, k_doc=None)``
  -> (out, lse), autograd: the same in MLA's MHA form (per-head keys and values)
* ``sparse_mla_attention(q, kv, topk_idx, v_dim, scale)`` -> (out, lse), autograd (its forward from
  64 heads on Hopper: the Gluon kernel of ``sparse_attn_ws``)
* ``sparse_mla_attention_backward(q, kv, topk_idx, out, lse, dout, v_dim, scale)`` -> (dq, dkv, p_sum):
  its backward, which also sums the recomputed probabilities over the heads (the sparse KL's target)
* ``sparse_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale)`` -> kl [B, Sq], autograd
* ``sparse_target_head_sum(q_main, kv, topk_idx, scale, lse=None)`` -> [B, Sq, K] and
  ``sparse_indexer_kl_from_target(q_idx, k_idx, w_idx, topk_idx, p)`` -> kl [B, Sq], autograd:
  the same KL in two steps, for a target summed over several TP ranks' heads
* ``sparse_indexer_kl_and_grads(q_idx, k_idx, w_idx, topk_idx, p, grad_kl)`` -> (kl, dq_idx, dk_idx, dw_idx):
  that KL's value and its gradients in one call, for a caller that has the gradient first
* ``dense_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, scale, topk, q_pos=None, k_pos=None, ..., q_doc=None,
  k_doc=None)``
  -> (kl, recall), autograd (blockwise PyTorch, analytic backward)
* ``decode``: decoding over a paged cache (``paged_indexer_topk``, ``sparse_mla_decode``,
  ``dense_mla_decode``, as the reference's functions of those names)
* ``q_doc`` / ``k_doc``: document ids of a packed sequence (``reference.causal_mask``'s rule)
* ``available()``: Triton importable and CUDA present, or TRITON_INTERPRET=1.
* ``compact_selection(idx, n_keys)`` -> (low int16, ends) or None / ``expand_selection(low, ends)``
  -> int32: a selection kept for a backward in 16 bits a key (rows in key order, as the unordered
  top-k lists them), one pass each way

Set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors.
"""

from . import decode
from ._common import available
from .compact import compact_selection, expand_selection
from .dense_attn import dense_attention, dense_mla_attention
from .indexer import fp8_quantize, indexer_topk
from .indexer_kl import (dense_indexer_kl, sparse_indexer_kl, sparse_indexer_kl_and_grads, sparse_indexer_kl_from_target,
                         sparse_target_head_sum)
from .sparse_attn import sparse_mla_attention, sparse_mla_attention_backward

__all__ = [
    "available",
    "compact_selection",
    "expand_selection",
    "indexer_topk",
    "fp8_quantize",
    "dense_attention",
    "dense_mla_attention",
    "sparse_mla_attention",
    "sparse_mla_attention_backward",
    "sparse_indexer_kl",
    "sparse_target_head_sum",
    "sparse_indexer_kl_from_target",
    "sparse_indexer_kl_and_grads",
    "dense_indexer_kl",
]
