"""Training-loop shims: run Megatron-LM's ``megatron.training.pretrain`` loop (shipped in the
megatron-core 0.19 wheel) on CPU under gloo.

The model-level CPU shims live in ``patches/cpu.py`` (apply those first). These cover what the
LOOP adds on top: its CUDA assertion, device set-up, seeding, the dataset-helper compile step
and a few CUDA-only calls in logging and checkpointing. Each one replaces exactly one
assumption that could only raise on a machine without CUDA; ``WHEEL_PATCHES`` fix the wheel
itself and apply everywhere. Every patch has a test in ``tests/test_training_patches.py`` that
fails without it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from patches.registry import Patch, apply_patches


def _local_world_size() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def _cpu_devices_visible():
    """While Megatron sets up: report one "device" per local rank and make set_device a no-op,
    so it initialises model parallelism and seeds its RNG tracker (both gated on
    ``torch.cuda.device_count() > 0``, ``training/initialize.py:270,447``)."""
    count, set_device = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count = _local_world_size  # type: ignore[assignment]
    torch.cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = count, set_device  # type: ignore[assignment]


def _initialize_megatron_on_cpu() -> None:
    """``pretrain`` calls ``initialize_megatron()`` without ``allow_no_cuda`` (it asserts CUDA,
    ``training/initialize.py:66``), and initialisation skips model parallelism and the CUDA RNG
    tracker when no device is counted."""
    from megatron.training import initialize, training

    original = initialize.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        with _cpu_devices_visible():
            return original(*args, **kwargs)

    initialize.initialize_megatron = initialize_megatron
    training.initialize_megatron = initialize_megatron


def _prebuilt_dataset_helpers() -> None:
    """``initialize_megatron`` runs ``make`` in ``megatron/core/datasets`` (``initialize.py:178``)
    and exits on failure; the wheel ships the compiled ``helpers_cpp`` but no Makefile."""
    from megatron.core.datasets import utils

    def compile_helpers() -> None:
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (prebuilt in the wheel)

    utils.compile_helpers = compile_helpers


def _clip_grads_on_cpu() -> None:
    """``clip_grad_by_total_norm_fp32`` asserts each grad's ``type()`` is
    ``'torch.cuda.FloatTensor'`` (``optimizer/clip_grads.py:174``). Same scaling, fp32 grads on
    any device."""
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = []
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                assert grad.dtype in (torch.float32, torch.bfloat16) if use_decoupled_grad else grad.dtype == torch.float32
                grads.append(clip_grads.to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if isinstance(clip_coeff, torch.Tensor):
            clip_coeff = clip_coeff.clamp_max(1.0)
        elif clip_coeff >= 1.0:
            return
        for grad in grads:
            grad.mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _device_arch_on_cpu() -> None:
    """Megatron's argument validation asks the GPU for its architecture whenever tensor or
    context parallelism is on (``training/arguments.py:1414``, ``get_device_arch_version``),
    which raises "Found no NVIDIA driver" on CPU. Report a pre-Blackwell device (0): the
    branches it gates only choose CUDA stream priorities."""
    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 0


WHEEL_PATCHES: list[Patch] = [
    Patch("prebuilt_dataset_helpers", "the wheel has helpers_cpp but no Makefile to `make`",
          _prebuilt_dataset_helpers),
]

TRAINING_CPU_PATCHES: list[Patch] = [
    Patch("initialize_megatron_on_cpu", "pretrain() asserts CUDA and gates MP init/seeding on "
          "device_count", _initialize_megatron_on_cpu),
    Patch("clip_grads_on_cpu", "gradient clipping asserts torch.cuda.FloatTensor grads",
          _clip_grads_on_cpu),
    Patch("device_arch_on_cpu", "argument validation queries the GPU architecture under TP or CP",
          _device_arch_on_cpu),
]


def apply_training_cpu_patches(only: set[str] | None = None, force: bool = False) -> list[str]:
    """Let ``megatron.training.pretrain`` run on CPU under gloo (apply ``patches.apply_cpu_patches``
    too). The wheel patches apply everywhere; the CPU ones only without CUDA (or when forced)."""
    done = apply_patches(WHEEL_PATCHES, only)
    if torch.cuda.is_available() and not force:
        return done
    return done + apply_patches(TRAINING_CPU_PATCHES, only)
