"""Which modules run the model's linears and norms: Transformer Engine or megatron-core's own.

The one place that knows about Transformer Engine (TE): whether it is installed, how
``transformer_impl="auto"`` resolves, what FP8 needs (TE's linears, and on the machine TE itself
and a GPU with FP8 GEMMs), and the two TE classes the spec builds from. ``model.model_config``
resolves the backend with it, ``spec`` builds modules with it, and the trainer's preflight turns
its answers into run-config errors. TE is optional: it is imported only here, and only when used.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from megatron_dsa.config import DSAConfigError

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
TE_INSTALL_HINT = "install the 'te' extra: pip install -e .[te]"


def te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def require_transformer_engine() -> None:
    """DSAConfigError unless TE is installed (a config may be made where TE is, and built where
    it is not)."""
    if not te_installed():
        raise DSAConfigError(
            f"transformer_impl 'transformer_engine' but Transformer Engine is not installed; "
            f"{TE_INSTALL_HINT} (or use transformer_impl 'local')"
        )


def resolve_transformer_impl(requested: str = "auto") -> str:
    """``auto`` -> Transformer Engine where it is installed and CUDA is up, local elsewhere.

    Resolved once per run, and the result goes to both Megatron's ``--transformer-impl`` and
    the model config, so the two never disagree.
    """
    if requested not in TRANSFORMER_IMPLS:
        raise DSAConfigError(f"transformer_impl must be one of {list(TRANSFORMER_IMPLS)}, got {requested!r}")
    if requested == "auto":
        return "transformer_engine" if te_installed() and torch.cuda.is_available() else "local"
    if requested == "transformer_engine":
        require_transformer_engine()
    return requested


def fp8_problem(transformer_impl: str, recipe: Optional[str] = None, on_this_machine: bool = False) -> Optional[str]:
    """Why TE's FP8 cannot run with these modules (and, with ``on_this_machine``, here), or None.

    FP8 lives inside TE's GEMMs: local linears would silently train in high precision. The
    reason reads after the FP8 setting's name ("fp8='hybrid' <reason>").
    """
    if transformer_impl not in ("auto", "transformer_engine"):  # "auto" takes TE where it can
        return f"needs transformer_impl 'transformer_engine' (TE's FP8 GEMMs), not {transformer_impl!r}"
    if not on_this_machine:
        return None
    if not te_installed():
        return f"needs Transformer Engine, which is not installed; {TE_INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (TE's FP8 GEMMs); none is available"
    # FP8 GEMMs from Ada / Hopper (sm 8.9) on; MXFP8 from Blackwell (sm 10.0) on.
    need = (10, 0) if recipe == "mxfp8" else (8, 9)
    have = tuple(torch.cuda.get_device_capability())
    if have < need:
        return (f"with recipe {recipe!r} needs a GPU of compute capability {need[0]}.{need[1]} or newer; "
                f"this one has {have[0]}.{have[1]}")
    return None


def check_fp8(fp8: Optional[str], transformer_impl: str) -> None:
    """DSAConfigError when FP8 is asked of modules that cannot run it."""
    problem = fp8_problem(transformer_impl) if fp8 else None
    if problem:
        raise DSAConfigError(f"fp8={fp8!r} {problem}")


def te_spec_provider():
    """megatron-core's TE module provider (TE's linears, norms and grouped experts)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def te_linear() -> type:
    """TE's plain linear as megatron-core wraps it (``parallel_mode`` chooses its TP layout)."""
    from megatron.core.extensions.transformer_engine import TELinear

    return TELinear
