"""Shared fixtures: a one-process megatron-core world on CPU (gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch  # (does not import triton)

# Without a GPU the Triton kernels run through Triton's interpreter. Triton reads the switch
# once, so it is set here, before any test module (or megatron-core) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small corpus (~200 KB of this interpreter's stdlib, vocab 512, the tiny model's) shared
    by the tests that only need some valid data; test_train.py builds a larger one of its own."""
    from megatron_dsa.data import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "c"
    build_corpus(out, None, 512, max_bytes=200_000, valid_fraction=0.1)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world size 1) + megatron-core parallel state + RNG tracker."""
    import patches

    patches.apply_cpu_patches()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        # No MASTER_PORT in the environment: subprocesses started by tests would inherit it.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (printed on failure), so inputs differ from run to run."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many tiny query chunks so the chunked (and checkpointed) paths are exercised."""
    from megatron_dsa import reference

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 97)


@pytest.fixture(autouse=True)
def fresh_metrics_tracker():
    """Each test gets its own megatron-core metrics tracker: it is process-global and sizes each
    metric by the first model's layer count, so a test of another depth (an MTP layer, another
    size) would otherwise fail on whichever test ran first."""
    import sys

    moe_logging = sys.modules.get("megatron.core.transformer.moe.moe_logging")
    if moe_logging is not None:
        moe_logging.set_moe_metrics_tracker(moe_logging.MoEMetricsTracker())
    yield
