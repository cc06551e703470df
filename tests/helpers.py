"""Small helpers shared by the math tests."""

from __future__ import annotations

import torch

F64 = torch.float64


def rand(*shape, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
