"""The task mixture: a built corpus's natural text with synthetic long-range tasks embedded.

``build_task_corpus(out, base, seq_length, ratio=, seed=)`` reads a corpus built by
``build_corpus`` (its tokenizer and token streams) and writes a corpus directory of the same
layout, so the trainer reads it through the same ``GPTDataset`` path::

    tokenizer.model                                 the base corpus's, copied
    train_text_document.bin / .idx                  every document exactly seq_length tokens
    valid_text_document.bin / .idx                  (seq_length - 1 of text, then EOD)
    train_answer_mask.bin / .idx                    1 on the tasks' answer tokens, 0 elsewhere,
    valid_answer_mask.bin / .idx                    document for document
    corpus.json                                     the manifest, ``"kind": "tasks"``

Each document is the next ``seq_length - 1`` tokens of the split's natural text (documents
joined by newlines); a ``ratio`` share of them (chosen per document from ``seed``) carry one
task of ``tasks`` in a training format family (``family``: ``tasks.TRAIN`` by default, the
``train_wide`` one with many more wordings and key styles, or ``train_varied``, wordings drawn
from random phrases): facts and their queries
spread over the whole document, ``seq_length // query_tokens`` queries each (at least one;
``query_tokens`` defaults to ``QUERY_TOKENS``), so the distance from a fact to its query ranges
over the whole context. Because every document is one
training sequence long, megatron-core's GPTDataset cuts each sample out of exactly one document
(a task never straddles two samples): a run must train at the corpus's ``seq_length``, which
``check_corpus_for_run`` (the trainer's preflight) enforces.

A run selects the corpus kind with ``data.corpus`` (``text`` | ``tasks``).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy

from megatron_dsa.data.corpus import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    DataError,
    corpus_kind,
    load_manifest,
    load_tokenizer,
    staged_directory,
    validate_indexed_dataset,
    write_indexed_dataset,
)
from megatron_dsa.data.tasks import FAMILIES, TASKS, TRAINING_FAMILIES, Family, TaskError, task_text

CORPUS_KINDS = ("text", "tasks")
QUERY_TOKENS = 2048  # default: one query per this many tokens of a task document
MASK_PREFIX = {"train": "train_answer_mask", "valid": "valid_answer_mask"}


def check_corpus_for_run(data_dir, corpus: str, seq_length: int) -> dict:
    """The corpus at ``data_dir`` is of kind ``corpus`` and, for a task mixture, was built for
    ``seq_length`` (so each training sample is one whole document). Returns the manifest."""
    manifest = load_manifest(data_dir)
    kind = corpus_kind(manifest)
    if kind != corpus:
        raise DataError(f"data.corpus is {corpus!r} but {data_dir} holds a {kind!r} corpus"
                        + (" (build it with `python -m megatron_dsa.data build-tasks`)" if corpus == "tasks" else ""))
    if kind == "tasks" and manifest["seq_length"] != seq_length:
        raise DataError(f"the task corpus {data_dir} was built for seq_length {manifest['seq_length']}, "
                        f"the run has data.seq_length {seq_length}: rebuild it for the run's length")
    return manifest


def read_split_tokens(data_dir, split: str) -> numpy.ndarray:
    """One split's token stream of a built corpus (int64)."""
    manifest = load_manifest(data_dir)
    info = validate_indexed_dataset(Path(data_dir) / manifest["splits"][split]["prefix"])
    return numpy.fromfile(info.prefix + ".bin", dtype=info.dtype).astype(numpy.int64)


def read_answer_mask(data_dir, split: str) -> numpy.ndarray:
    """The answer mask of a task corpus's split, aligned with ``read_split_tokens`` (uint8)."""
    manifest = load_manifest(data_dir)
    if corpus_kind(manifest) != "tasks":
        raise DataError(f"{data_dir} is not a task corpus: it has no answer mask")
    info = validate_indexed_dataset(Path(data_dir) / manifest["splits"][split]["answer_mask"])
    return numpy.fromfile(info.prefix + ".bin", dtype=info.dtype)


def _natural_text(base, split: str, newline: list[int], eod: int) -> list[int]:
    """A split's text with each document boundary (EOD) written as a newline."""
    out: list[int] = []
    for t in read_split_tokens(base, split).tolist():
        if t == eod:
            out += newline
        else:
            out.append(t)
    return out


DRAWS = 8  # a task document's sizes are random: draws before a length counts as too short


def _task_text(task: str, family: Family, length: int, filler: list[int], tokenizer, rng: random.Random,
               queries: int):
    for draw in range(DRAWS):
        try:
            return task_text(task, family, length, filler, tokenizer, rng, queries=queries)
        except TaskError as error:
            if draw == DRAWS - 1:
                raise DataError(f"seq_length {length + 1} is too short for the task mixture: {error}") from None


def queries_per_document(seq_length: int, query_tokens: int) -> int:
    return max(1, seq_length // query_tokens)


def _documents(stream: list[int], seq_length: int, ratio: float, seed: int, split: str,
               tasks: tuple[str, ...], family: Family, tokenizer, eod: int, stats: dict, queries: int):
    """(tokens, answer mask) of each document of one split."""
    content = seq_length - 1
    for i in range(len(stream) // content):
        window = stream[i * content:(i + 1) * content]
        rng = random.Random(f"{seed}:{split}:{i}")
        if rng.random() < ratio:
            task = rng.choice(tasks)
            text = _task_text(task, family, content, window, tokenizer, rng, queries)
            stats["task_documents"][task] = stats["task_documents"].get(task, 0) + 1
            stats["answer_tokens"] += sum(text.answer_mask)
            yield text.tokens + [eod], text.answer_mask + [0]
        else:
            yield window + [eod], [0] * seq_length


def build_task_corpus(out, base, seq_length: int, *, ratio: float = 0.5, seed: int = 0,
                      tasks=TASKS, query_tokens: int = QUERY_TOKENS, family: str = "train",
                      overwrite: bool = False) -> dict:
    """Write the task mixture of the corpus at ``base`` to ``out`` (see the module docstring);
    nothing is left at ``out`` when it fails. Returns the manifest."""
    out_dir, base_dir = Path(out).absolute(), Path(base).absolute()
    tasks = tuple(tasks)
    if out_dir.exists() and not overwrite:
        raise DataError(f"output directory already exists (pass overwrite): {out_dir}")
    if out_dir == base_dir:
        raise DataError("the task corpus must go to another directory than its base corpus")
    if not 0.0 < ratio <= 1.0:
        raise DataError(f"ratio (the share of documents with a task) must be in (0, 1], got {ratio}")
    if not tasks or any(t not in TASKS for t in tasks):
        raise DataError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 2:
        raise DataError(f"seq_length must be an integer >= 2, got {seq_length!r}")
    if isinstance(query_tokens, bool) or not isinstance(query_tokens, int) or query_tokens < 1:
        raise DataError(f"query_tokens (one query per this many tokens) must be a positive integer, "
                        f"got {query_tokens!r}")
    if family not in TRAINING_FAMILIES:
        raise DataError(f"family must be a training format family {list(TRAINING_FAMILIES)}, got {family!r}")
    formats = FAMILIES[family]
    queries = queries_per_document(seq_length, query_tokens)
    base_manifest = load_manifest(base_dir)
    if corpus_kind(base_manifest) != "text":
        raise DataError(f"the base corpus {base_dir} must be a text corpus, not {corpus_kind(base_manifest)!r}")
    tokenizer = load_tokenizer(base_dir)
    eod, newline = base_manifest["eod"], tokenizer.tokenize("\n")
    streams = {split: _natural_text(base_dir, split, newline, eod) for split in ("train", "valid")}
    for split, stream in streams.items():
        # a sample reads one token past its document (the label of the EOD): two at least
        if len(stream) < 2 * (seq_length - 1):
            raise DataError(f"the base corpus's {split} split has {len(stream)} tokens, fewer than two "
                            f"documents of seq_length {seq_length}")
    probe = random.Random(seed)  # every task fits the length: one clear error before any file is written
    for task in tasks:
        _task_text(task, formats, seq_length - 1, streams["valid"][:seq_length - 1], tokenizer, probe, queries)

    with staged_directory(out_dir) as staging:
        shutil.copyfile(base_dir / base_manifest["tokenizer"], staging / base_manifest["tokenizer"])
        splits = {}
        for split, prefix in (("train", "train_text_document"), ("valid", "valid_text_document")):
            stats = {"task_documents": {}, "answer_tokens": 0}
            docs = list(_documents(streams[split], seq_length, ratio, seed, split, tasks, formats, tokenizer, eod,
                                   stats, queries))
            n_docs, n_tokens = write_indexed_dataset(staging / prefix, (d for d, _ in docs), tokenizer.vocab_size)
            write_indexed_dataset(staging / MASK_PREFIX[split], (m for _, m in docs), 2)
            validate_indexed_dataset(staging / prefix)
            validate_indexed_dataset(staging / MASK_PREFIX[split])
            splits[split] = {"prefix": prefix, "answer_mask": MASK_PREFIX[split], "documents": n_docs,
                             "tokens": n_tokens, **stats}
        manifest = {
            **{k: base_manifest[k] for k in ("tokenizer", "tokenizer_type", "vocab_size", "eod", "pad", "dtype")},
            "version": MANIFEST_VERSION, "kind": "tasks", "base": str(base_dir), "seq_length": seq_length,
            "ratio": ratio, "seed": seed, "tasks": list(tasks), "family": family,
            "query_tokens": query_tokens, "queries_per_document": queries, "splits": splits,
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
