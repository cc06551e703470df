"""Inference for megatron-dsa models: prefill + token-by-token decode with a latent KV cache and
an indexer key cache per layer, sparse (top-k) or dense attention. See ``engine``.

CLI: ``python -m megatron_dsa.inference generate --checkpoint DIR --size NAME --tokenizer PATH
--prompt "..." --max-new-tokens N [--mode sparse|dense]`` (greedy).
"""

from megatron_dsa.inference.engine import MODES, DSAInference, KVCache, full_forward_logits

__all__ = ["MODES", "DSAInference", "KVCache", "full_forward_logits"]
