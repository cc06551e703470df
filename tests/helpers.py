"""Small helpers shared by the math tests."""

from __future__ import annotations

import torch

F64 = torch.float64


def rand(*shape, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def set_indexer_loss_scale(value: float, device=None) -> None:
    """Set megatron-core's indexer-loss backward scale the way its pipeline schedule does: a
    one-element tensor. The first call fixes the stored tensor's shape for the whole process
    (later calls copy into it), so every test must use the schedule's shape."""
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

    DSAIndexerLossAutoScaler.set_loss_scale(torch.full((1,), float(value), device=device))
