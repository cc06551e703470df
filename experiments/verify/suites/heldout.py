"""Retrieval items of the training mixture's tasks: in held-out formats, and in its own formats.

Every item is one task of ``megatron_dsa.data.tasks`` in one format family, hidden in held-out
natural text: its first fact at a depth spread over 10-90% of the context, distractor facts of
the same task at the family's densities, the query last and the answer the item's last tokens.
Lengths above the training length are extrapolation and are marked so
(``RetrievalItem.extrapolation``). Scored by ``retrieval.score_items``.

``build_heldout_suite``: the ``HELDOUT`` family (wordings, key alphabet, distractor densities,
values per key and chain lengths disjoint from the training mixture's), the study's headline.
``build_task_suite(..., family=TRAIN)``: the same tasks in the training formats (new instances,
held-out text), which tells a model that retrieves but does not carry it over to new formats
from one that never learned to retrieve. ``factor_families``: the formats between the two, one
of HELDOUT's differences at a time, which tells which difference a model does not carry over.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from experiments.verify.suites.retrieval import RetrievalItem, Tokenizer
from megatron_dsa.data.tasks import HELDOUT, TASKS, Family, task_text


def build_task_suite(tokenizer: Tokenizer, filler: Sequence[int], lengths: Sequence[int], n_per: int,
                     train_length: int, family: Family, seed: int = 0,
                     tasks: Sequence[str] = TASKS) -> list[RetrievalItem]:
    """``n_per`` items of every task at every length in ``family``'s formats, their text cut
    from ``filler`` (held-out natural text, at least the longest length)."""
    if n_per < 1:
        raise ValueError(f"n_per must be >= 1, got {n_per}")
    if len(filler) < max(lengths):
        raise ValueError(f"{len(filler)} filler tokens are too few for length {max(lengths)}")
    items = []
    for length in lengths:
        for task in tasks:
            for i in range(n_per):
                rng = random.Random(f"{family.name}:{seed}:{task}:{length}:{i}")
                depth = 0.5 if n_per == 1 else 0.1 + 0.8 * i / (n_per - 1)
                start = rng.randrange(0, len(filler) - length + 1)
                text = task_text(task, family, length, filler[start:start + length], tokenizer, rng,
                                 density=family.densities[i % len(family.densities)], depth=depth)
                (q,) = text.queries
                items.append(RetrievalItem(
                    task, length, depth, text.tokens[:q.start], text.tokens[q.start:q.end], q.key, q.answer,
                    [q.needle], text.distractor_answers, extrapolation=length > train_length))
    return items


def build_heldout_suite(tokenizer: Tokenizer, filler: Sequence[int], lengths: Sequence[int], n_per: int,
                        train_length: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[RetrievalItem]:
    """The held-out-format items (``build_task_suite`` with the ``HELDOUT`` family)."""
    return build_task_suite(tokenizer, filler, lengths, n_per, train_length, HELDOUT, seed=seed, tasks=tasks)


# How HELDOUT differs from a training family, each difference a set of Family fields.
HELDOUT_FACTORS: dict[str, tuple[str, ...]] = {
    "wording": ("wordings",),
    "keys": ("key_alphabet", "key_first", "key_lengths", "more_key_styles"),
    "density": ("densities",),
    "values per key": ("values_per_key",),
    "hops": ("hops",),
}


def factor_families(train: Family) -> dict[str, Family]:
    """The formats between ``train`` and HELDOUT: ``train`` with one of HELDOUT's differences
    (``only <factor>``), HELDOUT with one of them put back to ``train``'s (``all but <factor>``),
    and the two ends (``training formats``, ``held-out formats``)."""
    families = {"training formats": train}
    for factor, fields in HELDOUT_FACTORS.items():
        families[f"only {factor}"] = replace(train, name=f"{train.name}+{factor}",
                                             **{f: getattr(HELDOUT, f) for f in fields})
    for factor, fields in HELDOUT_FACTORS.items():
        families[f"all but {factor}"] = replace(HELDOUT, name=f"heldout-{factor}",
                                                **{f: getattr(train, f) for f in fields})
    families["held-out formats"] = HELDOUT
    return families
