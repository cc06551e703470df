"""Process-group set-up for single-process tools and tests (torchrun sets the env for many)."""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

import patches


def local_store(world_size: int = 1) -> torch.distributed.TCPStore:
    """A rendezvous store on a local port that the OS picks and this process holds from the
    start. (Picking a free port, closing it and letting init_process_group bind it later leaves
    a window in which a concurrent job can take it.) Other ranks connect to its ``port`` as
    clients; keep the object alive as long as the process group."""
    return torch.distributed.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)


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
        # A private store, not env://: a MASTER_PORT inherited from a parent process (a test
        # runner or launcher holding that port) must not be reused.
        torch.distributed.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", store=local_store(), rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
