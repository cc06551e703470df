"""Small, version-gated patches to megatron-core.

Each patch names the megatron-core versions it was written against and is applied only there
(and only where it is needed: the CPU patches do nothing when CUDA is present). Every patch
has a test that fails without it: ``tests/test_patches.py`` (model-level CPU patches) and
``tests/test_training_patches.py`` (Megatron-LM training-loop patches).
"""

from patches.cpu import apply_cpu_patches
from patches.registry import Patch, applied, megatron_core_version
from patches.training import apply_training_cpu_patches

__all__ = ["Patch", "applied", "apply_cpu_patches", "apply_training_cpu_patches", "megatron_core_version"]
