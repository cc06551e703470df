"""The sparse step's selection parked in host memory between forward and backward
(``KernelOptions.offload_selection``, ``megatron_dsa.offload.HostOffload``): the tensors come back
equal, each once, and a training step with it gives the gradients of one without it while its
autograd graph keeps no selection of its own. The copies themselves run on a GPU only."""

from __future__ import annotations

import gc

import pytest
import torch

from megatron_dsa.offload import HostOffload
from tests.helpers import set_indexer_loss_scale, tiny_lm_forward


def test_host_offload_gives_the_tensors_back_once_and_links_the_one_before():
    a, b = torch.arange(6, dtype=torch.int16), torch.ones(2, dtype=torch.int32)
    first = HostOffload([a])
    second = HostOffload([a, b])
    assert second.previous() is first
    got = second.tensors()
    assert [torch.equal(x, y) for x, y in zip(got, (a, b))] == [True, True]
    with pytest.raises(RuntimeError, match="already taken back"):
        second.tensors()
    del first
    gc.collect()
    assert second.previous() is None  # a weak link: an offload does not keep the one before alive
    with pytest.raises(ValueError, match="one device"):
        HostOffload([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the copies to pinned host memory and back")
def test_host_offload_round_trip_on_the_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    low = torch.randint(-2**15, 2**15, (3, 4099, 2048), device="cuda", generator=gen, dtype=torch.int32)
    low = low.to(torch.int16)
    ends = torch.randint(0, 2048, (3, 4099, 2), device="cuda", generator=gen, dtype=torch.int32)
    want = [low.clone(), ends.clone()]
    first = HostOffload([low, ends])
    del low, ends  # the GPU memory may be reused once the copy is done
    scratch = torch.full((3, 4099, 2048), 7, device="cuda", dtype=torch.int16)  # overwrite what was freed
    second = HostOffload([scratch])
    second.tensors()
    first.prefetch()
    got = first.tensors()
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(got, want))


# The model's device: CPU here, the GPU when the suite runs on one (megatron-core's rotary tables
# are made there then).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sparse_step(offload: bool, saved: list, kernel: str):
    set_indexer_loss_scale(1.0, device=DEVICE if DEVICE != "cpu" else None)
    model, loss = tiny_lm_forward(saved, DEVICE, mdsa_mode="sparse", mdsa_kernel=kernel,
                                  mdsa_kernel_options={"offload_selection": offload})
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict, want: dict, exact: bool) -> None:
    """The same parameters have gradients, finite, equal bit for bit (``exact``) or up to the order
    of fp32 adds on a GPU (atomic adds: index_add_, the embedding's and the kernels' backward)."""
    assert set(got) == set(want) and got
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-6)
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, want[name], **tol, msg=lambda m: f"{name}: {m}")


def test_offloaded_selection_gives_the_same_gradients(megatron_world):
    kept, offloaded = [], []
    want = _sparse_step(False, kept, "reference")
    got = _sparse_step(True, offloaded, "reference")
    _assert_same_gradients(got, want, exact=DEVICE == "cpu")
    # The selection (int32 [B, S, top-k] here: the reference's rows are not in key order, so they
    # are not packed into 16 bits) is among what the graph keeps, each layer's, only without offload.
    def selections(saved):
        return sum(t.dtype in (torch.int16, torch.int32) and t.shape == (2, 64, 16) for t in saved)

    assert selections(kept) == 3 and selections(offloaded) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the Triton kernels' step with the copies")
def test_offloaded_selection_gives_the_same_gradients_on_the_gpu(megatron_world):
    """The Triton step (its selection packed in 16 bits, so the int16 form travels) with the
    selection through pinned host memory: the gradients of the step without it, up to the order
    of the backward's fp32 adds."""
    kept, offloaded = [], []
    want = _sparse_step(False, kept, "auto")
    got = _sparse_step(True, offloaded, "auto")
    _assert_same_gradients(got, want, exact=False)
    assert sum(t.dtype == torch.int16 for t in kept) == 3 and not any(t.dtype == torch.int16 for t in offloaded)
