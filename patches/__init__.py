"""Small, version-gated patches to megatron-core.

Each patch names the megatron-core versions it was written against and is applied only there
(and only where it is needed: the CPU patches do nothing when CUDA is present). Every patch
has a test in ``tests/test_patches.py`` that fails without it.
"""

from patches.registry import Patch, applied, apply_cpu_patches, megatron_core_version

__all__ = ["Patch", "applied", "apply_cpu_patches", "megatron_core_version"]
