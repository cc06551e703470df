"""What the warp-specialised Gluon kernels share: Triton's Gluon API where it exists, the check
that a device can run them, and the one rule by which a stage chooses its Gluon kernel over its
Triton one (``KernelOptions``' "auto" / "triton" / "gluon" fields)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ._common import interpreting

# the Gluon names exist only where HAS_GLUON is true
__all__ = ["HAS_GLUON", "aligned_rows", "chosen", "device_why_not", "cp", "cta_barrier", "gl", "gluon", "hopper",
           "mbarrier", "triton"]

try:  # Gluon's API as written here is Triton 3.6's (run on the GPU) and 3.8's (compiled in CI)
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Triton {triton.__version__}: the Gluon kernels need 3.6 or later")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    # the CTA-wide barrier's name: thread_barrier up to Triton 3.6, barrier after
    cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_GLUON = False


def device_why_not(t: torch.Tensor) -> Optional[str]:
    """None when ``t``'s device runs the Gluon kernels (Hopper, sm_90), else why not."""
    if not HAS_GLUON:
        return "needs Triton 3.6 or later (its Gluon API)"
    if interpreting() or not t.is_cuda:
        return "needs a CUDA device (Triton's interpreter does not run Gluon)"
    if torch.cuda.get_device_capability(t.device) != (9, 0):
        return "needs an sm_90 GPU (Hopper's wgmma and setmaxnreg)"
    return None


def aligned_rows(*tensors: torch.Tensor) -> bool:
    """Unit-stride rows that start 16-byte aligned, as the kernels' 16-byte copies need; the
    compiler knows it only from strides in multiples of 16 elements and aligned base pointers."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and not any(s % 16 for s in t.stride()[:-1])
               for t in tensors)


def chosen(choice: str, heads: int, auto_min_heads: Optional[int], why_not: Callable[[], Optional[str]],
           option: str) -> bool:
    """Whether a stage runs its Gluon kernel (``choice``: its ``KernelOptions`` field, named
    ``option``): "triton" never; "auto" from ``auto_min_heads`` heads (None: not measured faster
    anywhere) where it can run; "gluon" wherever it can, one error where not. ``why_not()``: the
    kernel's input check for these inputs."""
    if choice == "triton" or (choice == "auto" and (auto_min_heads is None or heads < auto_min_heads)):
        return False
    why = why_not()
    if why is None:
        return True
    if choice == "gluon":
        raise ValueError(f"{option}='gluon' cannot run these inputs: {why}")
    return False
