"""Inference for megatron-dsa models: chunked prefill + batched decode over a paged cache of
latent rows and (FP8) indexer keys per layer, sparse (top-k) or dense attention, CUDA graphs for
the decode step on a GPU. See ``engine`` and ``paged``.

CLI: ``python -m megatron_dsa.inference generate --checkpoint DIR --size NAME --tokenizer PATH
--prompt "..." --max-new-tokens N [--mode sparse|dense]`` (greedy).
"""

from megatron_dsa.inference.engine import MODES, DSAInference, full_forward_logits
from megatron_dsa.inference.paged import KEY_FORMATS, CacheError, PagedCache

__all__ = ["MODES", "KEY_FORMATS", "CacheError", "DSAInference", "PagedCache", "full_forward_logits"]
