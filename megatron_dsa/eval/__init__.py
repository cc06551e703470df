"""Evaluation helpers for the DSA verification experiment (issue 7).

``retrieval``: a built-in long-context retrieval suite on code-like haystacks (single needle,
multi-key needle, key-value recall in a long dict literal), scored by exact match of the
greedy answer. ``loss``: validation LM loss at several context lengths on the held-out split.
"""

from megatron_dsa.eval.loss import read_valid_tokens, validation_loss_at_lengths
from megatron_dsa.eval.recall import indexer_recall_at_lengths
from megatron_dsa.eval.retrieval import (
    TASKS,
    RetrievalItem,
    build_items,
    build_suite,
    model_predictor,
    score_items,
)

__all__ = [
    "TASKS",
    "RetrievalItem",
    "build_items",
    "build_suite",
    "indexer_recall_at_lengths",
    "model_predictor",
    "read_valid_tokens",
    "score_items",
    "validation_loss_at_lengths",
]
