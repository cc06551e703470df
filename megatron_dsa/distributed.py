"""Process-group set-up for single-process tools and tests (torchrun sets the env for many)."""

from __future__ import annotations

import os
import socket

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

import patches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Long sequences allocate tensors of many GiB whose sizes differ between the forward and the
# backward; the caching allocator's fixed segments then fragment. The v32-slice's sparse step at
# 1 x 128K failed a 16 GiB allocation with 45 GiB reserved but free, and ran (112 GB peak) with
# segments that grow in place.
CUDA_ALLOC_CONF = "expandable_segments:True"


def prefer_expandable_segments() -> None:
    """Give the CUDA caching allocator expandable segments unless the user configured it
    (PYTORCH_CUDA_ALLOC_CONF set, even empty, is kept). Effective before the first CUDA
    allocation of the process: call it at an entry point."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


def init_single_process(seed: int = 1234) -> None:
    """torch.distributed (world size 1; gloo on CPU, nccl on CUDA) + megatron parallel state."""
    prefer_expandable_segments()
    patches.apply_cpu_patches()
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        # A private rendezvous on a free port: a MASTER_PORT inherited from a parent process
        # (a test runner or launcher holding that port) must not be reused.
        torch.distributed.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
