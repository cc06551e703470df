"""The verification study's evaluation suites, run on trained models.

``loss``: validation LM loss at several context lengths on the held-out split. ``recall``: the
indexer's top-k recall of the dense attention mass at several lengths and k, with the oracle
(the attention's own top-k). ``retrieval``: a built-in long-context retrieval suite on
code-like haystacks (single needle, multi-key needle, key-value recall in a long dict literal),
scored by exact match of the greedy answer and the answer's log-likelihood. ``heldout``: the
training mixture's tasks in held-out formats (``megatron_dsa.data.tasks.HELDOUT``), the items
the study scores, and the same tasks in the training formats (``build_task_suite`` with
``TRAIN``), scored beside them.
"""

from experiments.verify.suites.heldout import HELDOUT_FACTORS, build_heldout_suite, build_task_suite, factor_families
from experiments.verify.suites.loss import read_valid_tokens, validation_loss_at_lengths
from experiments.verify.suites.recall import indexer_recall_at_lengths
from experiments.verify.suites.retrieval import (
    TASKS,
    RetrievalItem,
    build_items,
    build_suite,
    model_predictor,
    score_items,
)

__all__ = [
    "HELDOUT_FACTORS",
    "TASKS",
    "RetrievalItem",
    "build_heldout_suite",
    "build_items",
    "build_suite",
    "build_task_suite",
    "factor_families",
    "indexer_recall_at_lengths",
    "model_predictor",
    "read_valid_tokens",
    "score_items",
    "validation_loss_at_lengths",
]
