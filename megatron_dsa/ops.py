"""One switch between the PyTorch reference and the Triton kernels.

Both expose the same functions with the same signatures (``megatron_dsa.reference`` is the
spec): ``indexer_topk``, ``dense_attention`` (MLA's MHA form), ``dense_mla_attention``, ``sparse_mla_attention``,
``dense_indexer_kl``, ``sparse_indexer_kl``, the sparse KL in two steps for tensor
parallelism (``sparse_target_head_sum``, ``sparse_indexer_kl_from_target``; its value and
gradients in one call, ``sparse_indexer_kl_and_grads``, where the gradient is known first), the sparse
attention's backward that also returns that target (``sparse_mla_attention_backward``), and the
selection kept for it in 16 bits a key (``compact_selection``, ``expand_selection``). ``auto`` takes
Triton on CUDA tensors when the kernels import, the reference everywhere else. The Triton ops
are bound to one ``KernelOptions`` (the layer config's ``mdsa_kernel_options``).

The fused sparse KL kernel implements one indexer objective, the KL. ``indexer_loss_backend``
gives the two loss ops for a configured objective: the chosen backend's for "kl"; for any other
the backend's blockwise dense op (bound to the objective: the warm-up's cost does not depend on
the objective) and the reference's sparse op.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import torch

from megatron_dsa import reference
from megatron_dsa.kernel_options import DEFAULT_OPTIONS, KernelOptions

OPS = ("indexer_topk", "dense_attention", "dense_mla_attention", "sparse_mla_attention", "dense_indexer_kl", "sparse_indexer_kl",
       # the sparse KL in two steps, for a target summed over the heads of several TP ranks
       "sparse_target_head_sum", "sparse_indexer_kl_from_target",
       # that KL's value and gradients in one call, where the gradient is known first
       "sparse_indexer_kl_and_grads",
       # the sparse attention's backward with that target from the same pass (training's KL)
       "sparse_mla_attention_backward",
       # a selection kept for that backward in 16 bits a key, and rebuilt from them
       "compact_selection", "expand_selection")


def _reference_indexer_topk(q, k, w, topk, q_pos=None, k_pos=None, fp8=False, ordered=True, q_doc=None, k_doc=None):
    # ``ordered=False`` lets a backend skip ordering each row by score; the reference's rows
    # are ordered either way (the same sets).
    if fp8:
        raise ValueError("the FP8 indexer is a Triton kernel; the reference scores in fp32")
    return reference.indexer_topk(q, k, w, topk, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc)


def _reference_sparse_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale, lse=None, objective="kl"):
    # ``lse`` (the sparse attention's own log-sum-exp) only saves the kernel a pass; the
    # reference recomputes the target from q_main and kv.
    return reference.sparse_indexer_kl(q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale, objective=objective)


@functools.cache
def _reference_backend(options: KernelOptions = DEFAULT_OPTIONS) -> SimpleNamespace:
    # The ops take no options; the step's own choices (what the backward keeps and where) read
    # ``options`` on either backend.
    fns = {name: getattr(reference, name) for name in OPS}
    fns["indexer_topk"] = _reference_indexer_topk
    fns["sparse_indexer_kl"] = _reference_sparse_indexer_kl
    return SimpleNamespace(name="reference", options=options, **fns)


@functools.cache
def _kernels():
    """The Triton kernels package, imported on first use (None where it cannot be): Triton is
    optional, the CPU path never needs it, and Triton reads TRITON_INTERPRET when first imported."""
    try:
        from megatron_dsa import kernels
    except ImportError:
        return None
    return kernels


@functools.cache
def _triton_backend(options: KernelOptions) -> SimpleNamespace:
    def bind(fn):
        takes = "options" in inspect.signature(fn).parameters
        return functools.partial(fn, options=options) if takes else fn

    return SimpleNamespace(name="triton", options=options,
                           **{name: bind(getattr(_kernels(), name)) for name in OPS})


@functools.cache
def triton_available() -> bool:
    return _kernels() is not None and _kernels().available()


def backend(kind: str, device: torch.device, options: KernelOptions = DEFAULT_OPTIONS) -> SimpleNamespace:
    """The op namespace for ``kind`` ('auto' | 'reference' | 'triton') on ``device``; the Triton
    ops run with ``options``."""
    if kind == "reference":
        return _reference_backend(options)
    if kind == "triton":
        if not triton_available():
            raise RuntimeError("mdsa_kernel='triton' but the Triton DSA kernels are unavailable here")
        return _triton_backend(options)
    if kind == "auto":
        if device.type == "cuda" and triton_available():
            return _triton_backend(options)
        return _reference_backend(options)
    raise ValueError(f"unknown DSA kernel backend {kind!r}")


@functools.cache
def _reference_loss_backend(objective: str) -> SimpleNamespace:
    reference.objective_rows(objective)  # unknown names fail here
    ref = _reference_backend()
    return SimpleNamespace(
        name="reference",
        objective=objective,
        dense_indexer_kl=functools.partial(ref.dense_indexer_kl, objective=objective),
        sparse_indexer_kl=functools.partial(ref.sparse_indexer_kl, objective=objective),
    )


def indexer_loss_backend(kind: str, device: torch.device, objective: str = "kl",
                         options: KernelOptions = DEFAULT_OPTIONS) -> SimpleNamespace:
    """The op namespace whose ``dense_indexer_kl`` / ``sparse_indexer_kl`` compute ``objective``.

    Same call signatures as ``backend(kind, device)`` (the sparse op takes ``lse=``). "kl" is
    exactly ``backend(kind, device)``; any other objective runs the chosen backend's blockwise
    dense op with that objective and the PyTorch reference's sparse op (the fused sparse KL
    kernel implements only the KL).
    """
    if objective == "kl":
        return backend(kind, device, options)
    ref = _reference_loss_backend(objective)
    chosen = backend(kind, device, options)
    if chosen.name == "reference":
        return ref
    return SimpleNamespace(
        name=f"{chosen.name}+reference",
        objective=objective,
        dense_indexer_kl=functools.partial(chosen.dense_indexer_kl, objective=objective),
        sparse_indexer_kl=ref.sparse_indexer_kl,
    )


# Decoding over a paged cache (see reference's "Decoding over a paged cache").
DECODE_OPS = ("paged_indexer_topk", "sparse_mla_decode", "dense_mla_decode")


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector e4m3 quantisation (x8, fp32 scale): the Triton pass on CUDA, else its PyTorch
    twin (bit-identical), so a cache written on either device holds the same bytes."""
    if x.is_cuda and triton_available():
        return _kernels().fp8_quantize(x)
    return reference.fp8_quantize(x)


def decode_backend(kind: str, device: torch.device, options: KernelOptions = DEFAULT_OPTIONS) -> SimpleNamespace:
    """The paged-cache decode ops (``DECODE_OPS``) for ``kind`` ('auto' | 'reference' | 'triton')
    on ``device``, chosen as ``backend`` chooses; the Triton ops launch with ``options``."""
    name = backend(kind, device).name
    if name == "reference":
        return SimpleNamespace(name=name, **{op: getattr(reference, op) for op in DECODE_OPS})
    source = _kernels().decode
    return SimpleNamespace(name=name, **{op: functools.partial(getattr(source, op), options=options)
                                         for op in DECODE_OPS})
