"""What a patch is and how patches are applied: once each, behind a megatron-core version gate.

The patch lists live in ``patches.cpu`` and ``patches.training``; each of those modules offers
its own ``apply_*`` entry point built on ``apply_patches`` here. Importing ``patches`` imports
no megatron-core: each patch imports what it patches when it is applied, so nothing of
megatron-core is loaded before the CPU patches are in place.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

SUPPORTED = ((0, 19), (0, 20))  # [min, max) of megatron-core minor versions


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    apply: Callable[[], None]


_APPLIED: set[str] = set()


def megatron_core_version() -> tuple[int, int, int]:
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

