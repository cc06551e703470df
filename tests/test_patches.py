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
    import sys, torch
    import patches
    from patches.cpu import CPU_PATCHES
    skip = set(sys.argv[1:])
    patches.apply_cpu_patches(only={p.name for p in CPU_PATCHES} - skip)
    from megatron_dsa.distributed import local_store
    torch.distributed.init_process_group("gloo", store=local_store(), rank=0, world_size=1)
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
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *skip], capture_output=True, text=True, timeout=300, env=env
    )


needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches apply only without CUDA")


@needs_cpu
def test_tiny_model_trains_on_cpu_with_all_patches():
    result = run([])
    assert "TRAINED" in result.stdout, result.stderr[-3000:]


# These bite only in backward of sequence-parallel layers and under context or expert parallelism;
# their own tests below (and the TP/CP model tests in test_parallel.py) fail without them.
NEEDED_ELSEWHERE = {"cuda_device_to_cpu_in_backward", "cp_rope_index_on_cpu", "moe_splits_on_cpu"}


@needs_cpu
@pytest.mark.parametrize("patch", [p.name for p in CPU_PATCHES if p.name not in NEEDED_ELSEWHERE])
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


BACKWARD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, patches
    from patches.cpu import CPU_PATCHES
    patches.apply_cpu_patches(only={p.name for p in CPU_PATCHES} - set(sys.argv[1:]))

    class AllocatesInBackward(torch.autograd.Function):  # as megatron's sequence-parallel linear
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            out = torch.empty(grad.shape, device=torch.cuda.current_device())
            return out.copy_(grad * 2)

    x = torch.ones(3, requires_grad=True)
    AllocatesInBackward.apply(x).sum().backward()
    print("BACKWARD", x.grad.tolist())
    """
)

@needs_cpu
def test_backward_allocations_need_the_backward_remap():
    ok = subprocess.run([sys.executable, "-c", BACKWARD_SCRIPT], capture_output=True, text=True, timeout=120)
    assert "BACKWARD [2.0, 2.0, 2.0]" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-c", BACKWARD_SCRIPT, "cuda_device_to_cpu_in_backward"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "NVIDIA driver" in bad.stderr


@needs_cpu
def test_cp_rotary_rows_need_the_unpinned_index():
    code = textwrap.dedent(
        """
        import sys, torch, patches
        from patches.cpu import CPU_PATCHES
        patches.apply_cpu_patches(only={p.name for p in CPU_PATCHES} - set(sys.argv[1:]))
        from megatron.core.models.common.embeddings import rope_utils

        class Group:  # rank 1 of a context-parallel group of 2
            def size(self): return 2
            def rank(self): return 1

        table = torch.arange(8.0)[:, None, None, None]
        rows = rope_utils.get_pos_emb_on_this_cp_rank(table, 0, Group())
        print("ROWS", rows.flatten().tolist())
        """
    )
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ROWS [2.0, 3.0, 4.0, 5.0]" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", code, "cp_rope_index_on_cpu"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and ("pin" in bad.stderr.lower() or "NVIDIA" in bad.stderr or "CUDA" in bad.stderr)


@needs_cpu
def test_expert_parallel_splits_need_the_host_conversion():
    """The all-to-all that megatron's dispatcher runs, with split sizes from its own
    maybe_move_tensor_to_cpu (one gloo rank; megatron's wrapper skips the call at world size 1)."""
    code = textwrap.dedent(
        """
        import sys, torch, patches
        from patches.cpu import CPU_PATCHES
        patches.apply_cpu_patches(only={p.name for p in CPU_PATCHES} - set(sys.argv[1:]))
        from megatron_dsa.distributed import local_store
        torch.distributed.init_process_group("gloo", store=local_store(), rank=0, world_size=1)
        from megatron.core.transformer.moe import token_dispatcher
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
        out = torch.empty(3, 2)
        torch.distributed.all_to_all_single(out, torch.arange(6.0).view(3, 2), splits, splits)
        print("A2A", out.flatten().tolist())
        """
    )
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "A2A [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", code, "moe_splits_on_cpu"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "all_to_all_single" in bad.stderr
