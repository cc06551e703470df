"""Registry of megatron-core patches with a version gate."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

SUPPORTED = ((0, 19), (0, 20))  # [min, max) of megatron-core minor versions


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    apply: Callable[[], None]


_APPLIED: set[str] = set()


def megatron_core_version() -> tuple[int, int, int]:
    import re

    from megatron.core import package_info

    # Versions look like "0.19.2" or "0.19.2+671cae5" (a local build tag).
    major, minor, patch = re.match(r"(\d+)\.(\d+)\.(\d+)", package_info.__version__).groups()
    return int(major), int(minor), int(patch)


def applied() -> frozenset[str]:
    return frozenset(_APPLIED)


def _gate() -> None:
    version = megatron_core_version()
    lo, hi = SUPPORTED
    if not (lo <= version[:2] < hi):
        raise RuntimeError(
            f"megatron-core {'.'.join(map(str, version))} is outside the versions these patches "
            f"were written for ({lo[0]}.{lo[1]}.x); pin megatron-core>=0.19.2,<0.20"
        )


def apply_patches(patches: list[Patch], only: set[str] | None = None) -> list[str]:
    _gate()
    done = []
    for patch in patches:
        if (only is None or patch.name in only) and patch.name not in _APPLIED:
            patch.apply()
            _APPLIED.add(patch.name)
            done.append(patch.name)
            log.debug("applied megatron-core patch %s: %s", patch.name, patch.why)
    return done


def apply_cpu_patches(only: set[str] | None = None, force: bool = False) -> list[str]:
    """Let megatron-core run on CPU under gloo. No-op when CUDA is available (unless forced)."""
    if torch.cuda.is_available() and not force:
        return []
    from patches.cpu import CPU_PATCHES

    return apply_patches(CPU_PATCHES, only)
