"""Each training-loop patch (patches/training.py) is needed: leaving it out (all other patches
applied) makes Megatron-LM's pretrain loop fail on this CPU machine at the documented spot.
With every patch applied, the same run trains (tests/test_train.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

RUN_WITHOUT = r"""
import sys
from megatron_dsa.train.config import load_config
from megatron_dsa.train.preflight import preflight
from megatron_dsa.train.trainer import run
if __name__ == "__main__":
    skip, config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    run(cfg, preflight(cfg), skip_patches=frozenset({skip}))
"""



def run_without(patch: str, corpus: Path, tmp_path: Path):
    script = tmp_path / "run_without.py"
    script.write_text(RUN_WITHOUT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    args = [str(REPO / "configs/tiny/pretrain.yaml"), f"data.dir={corpus}", "data.seq_length=32",
            f"checkpoint.save={tmp_path / 'ckpt'}", "train.iters=2", "train.lr_warmup_iters=0", "train.micro_batch_size=2",
            "train.global_batch_size=2", "eval.iters=1", "logging.interval=1"]
    return subprocess.run([sys.executable, str(script), patch, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)


def test_patch_list_is_complete():
    from patches.training import TRAINING_CPU_PATCHES, WHEEL_PATCHES

    names = {p.name for p in TRAINING_CPU_PATCHES + WHEEL_PATCHES}
    assert names == {"initialize_megatron_on_cpu", "clip_grads_on_cpu", "prebuilt_dataset_helpers",
                     "device_arch_on_cpu"}
    assert all(p.why for p in TRAINING_CPU_PATCHES + WHEEL_PATCHES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches do nothing where CUDA exists")
@pytest.mark.parametrize(
    "patch, failure",
    [
        ("initialize_megatron_on_cpu", "Megatron requires CUDA"),
        ("clip_grads_on_cpu", "assert param.grad.type() == 'torch.cuda.FloatTensor'"),
        # `make` finds no Makefile in the wheel (or no `make` at all) and Megatron exits.
        ("prebuilt_dataset_helpers", ("no makefile found", "Failed to compile", "'make'")),
    ],
)
def test_training_fails_without_patch(patch, failure, corpus, tmp_path):
    result = run_without(patch, corpus, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    failures = (failure,) if isinstance(failure, str) else failure
    assert any(f in output for f in failures), output[-3000:]
    # Nothing was trained to completion.
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches do nothing where CUDA exists")
def test_tensor_parallel_flags_validate_only_with_the_device_arch_patch(monkeypatch):
    """Megatron's argument validation asks CUDA for the GPU architecture under TP > 1: without
    the patch it raises "Found no NVIDIA driver"; with it, TP=2 on two processes validates."""
    from megatron.training import arguments
    from megatron.training.utils.common_utils import get_device_arch_version

    from patches.training import apply_training_cpu_patches
    from megatron_dsa.train.preflight import check_megatron_settings

    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        get_device_arch_version()  # what arguments.py calls unpatched
    apply_training_cpu_patches(only={"device_arch_on_cpu"})
    assert arguments.get_device_arch_version() == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    argv = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "1", "--train-iters", "1",
            "--tensor-model-parallel-size", "2", "--mdsa-phase", "pretrain", "--mdsa-size", "tiny",
            "--mdsa-data-dir", "/nonexistent", "--transformer-impl", "local"]
    check_megatron_settings(argv)
