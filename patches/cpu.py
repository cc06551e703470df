"""Run megatron-core 0.19 on CPU under gloo.

megatron-core assumes CUDA in a few places that a CPU run reaches. Each patch below replaces
exactly one such assumption, and only on a machine without CUDA, where the original call
could only raise. Nothing here runs when CUDA is present.
"""

from __future__ import annotations

import contextlib

import torch

from patches.registry import Patch, apply_patches


class _NoStream:
    """Stand-in for torch.cuda.Stream/Event on CPU: work is already ordered on one stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args) -> None:
        pass

    def wait_event(self, *args) -> None:
        pass

    def record(self, *args) -> None:
        pass

    def record_event(self, *args) -> "_NoStream":
        return _NoStream()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cuda_streams_events() -> None:
    """The MoE layer and its all-to-all token dispatcher create CUDA streams and events."""
    torch.cuda.Stream = _NoStream  # type: ignore[misc]
    torch.cuda.Event = _NoStream  # type: ignore[misc]
    torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]


_DEVICE_RNG = torch.Generator()


def _cuda_rng_on_cpu() -> None:
    """megatron's RNG tracker saves, seeds and restores the CUDA generator. On CPU it tracks a
    private CPU generator instead, so forking never disturbs the default CPU RNG."""
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(*args, **kwargs) -> torch.Tensor:
        return _DEVICE_RNG.get_state()

    def set_state(state: torch.Tensor, *args, **kwargs) -> None:
        _DEVICE_RNG.set_state(state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_state  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: _DEVICE_RNG.manual_seed(int(seed))  # type: ignore[assignment]
    torch.cuda.manual_seed_all = torch.cuda.manual_seed  # type: ignore[assignment]


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device means a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Route tensors that megatron-core allocates "on the current CUDA device" to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


_CUDA_TO_CPU = _CudaToCpu()


def _cuda_device_to_cpu() -> None:
    """About forty call sites allocate with ``device=torch.cuda.current_device()`` (routers,
    trackers, buffers): report device 0 and allocate those tensors on the CPU instead."""
    torch.cuda.current_device = lambda: 0  # type: ignore[assignment]
    _CUDA_TO_CPU.__enter__()


def _cuda_device_to_cpu_in_backward() -> None:
    """Autograd runs backward without the caller's TorchFunctionMode, and megatron's
    sequence-parallel linear allocates its reduce-scatter output on the current CUDA device in
    backward: run every custom autograd Function's backward under the same remap."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        with _CudaToCpu():
            return original(self, *args)

    BackwardCFunction.apply = apply


def _cp_rope_index_on_cpu() -> None:
    """Under context parallelism megatron picks this rank's rotary rows with an index tensor
    built with ``pin_memory=True``, which needs a CUDA driver: the same selection, unpinned."""
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        cp_size, cp_rank = cp_group.size(), cp_group.rank()
        idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1 :])
        pos_emb = pos_emb.index_select(seq_dim, idx)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])

    rope_utils.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def _moe_splits_on_cpu() -> None:
    """Under expert parallelism the all-to-all dispatcher moves its split sizes to host memory
    as numpy arrays only when they are on a GPU; on the CPU they stay tensors, which
    ``all_to_all_single`` rejects as split sizes. Convert CPU tensors the same way."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


CPU_PATCHES = [
    Patch("cuda_device_to_cpu", "allocations on torch.cuda.current_device()", _cuda_device_to_cpu),
    Patch("cuda_device_to_cpu_in_backward", "the same allocations inside autograd backward", _cuda_device_to_cpu_in_backward),
    Patch("cp_rope_index_on_cpu", "context-parallel rotary rows picked with pinned memory", _cp_rope_index_on_cpu),
    Patch("moe_splits_on_cpu", "expert-parallel all-to-all split sizes stay tensors on CPU", _moe_splits_on_cpu),
    Patch("cuda_streams_events", "MoE creates CUDA streams and events", _cuda_streams_events),
    Patch("cuda_rng_on_cpu", "the model-parallel RNG tracker reads CUDA RNG state", _cuda_rng_on_cpu),
]


def apply_cpu_patches(only: set[str] | None = None, force: bool = False) -> list[str]:
    """Let megatron-core run on CPU under gloo. No-op when CUDA is available (unless forced)."""
    if torch.cuda.is_available() and not force:
        return []
    return apply_patches(CPU_PATCHES, only)
