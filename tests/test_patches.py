"""Each CPU patch is needed: the tiny model fails on CPU without it and runs with all of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from patches.cpu import CPU_PATCHES

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    import patches
    from patches.cpu import CPU_PATCHES
    skip = set(sys.argv[1:])
    patches.apply_cpu_patches(only={p.name for p in CPU_PATCHES} - skip)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    from megatron_dsa.model import build_model, model_config
    model = build_model("tiny", model_config("tiny", mdsa_mode="sparse"))
    tokens = torch.randint(0, 512, (1, 16))
    loss = model(tokens, torch.arange(16)[None], None, labels=tokens).mean()
    loss.backward()
    print("TRAINED", float(loss))
    """
)


def run(skip: list[str]) -> subprocess.CompletedProcess:
    from tests.conftest import free_port

    env = {"PORT": str(free_port()), "PATH": "/usr/bin:/bin", "PYTHONPATH": "."}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *skip], capture_output=True, text=True, timeout=300, env=env
    )


needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches apply only without CUDA")


@needs_cpu
def test_tiny_model_trains_on_cpu_with_all_patches():
    result = run([])
    assert "TRAINED" in result.stdout, result.stderr[-3000:]


@needs_cpu
@pytest.mark.parametrize("patch", [p.name for p in CPU_PATCHES])
def test_each_patch_is_needed(patch):
    result = run([patch])
    assert result.returncode != 0 and "TRAINED" not in result.stdout
    assert "NVIDIA driver" in result.stderr or "CUDA" in result.stderr, result.stderr[-3000:]


def test_cpu_patches_do_nothing_when_cuda_is_present():
    code = (
        "import torch, patches; torch.cuda.is_available = lambda: True; "
        "print('APPLIED', patches.apply_cpu_patches())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "APPLIED []" in result.stdout, result.stderr[-2000:]


def test_version_gate_refuses_other_megatron_core(monkeypatch):
    from patches import registry

    monkeypatch.setattr(registry, "megatron_core_version", lambda: (0, 21, 0))
    with pytest.raises(RuntimeError, match="outside the versions"):
        registry.apply_patches(CPU_PATCHES)
