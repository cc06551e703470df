"""Real-data pipeline: text files -> sentencepiece tokenizer -> Megatron indexed datasets ->
megatron-core GPTDataset. See ``corpus.py``; CLI: ``python -m megatron_dsa.data build``.
The task mixture (natural text with synthetic long-range tasks, ``data.corpus: tasks``):
``tasks.py`` (the tasks, their format families, the solver) and ``mixture.py`` (the corpus)."""

from megatron_dsa.data.corpus import (
    DEFAULT_EXTENSIONS,
    DataError,
    Document,
    IndexedDatasetInfo,
    SentencePieceTokenizer,
    build_corpus,
    build_gpt_datasets,
    check_tokenizer_matches,
    collect_documents,
    default_source,
    load_manifest,
    load_tokenizer,
    split_documents,
    train_tokenizer,
    validate_indexed_dataset,
    write_indexed_dataset,
)
from megatron_dsa.data.mixture import (
    CORPUS_KINDS,
    build_task_corpus,
    check_corpus_for_run,
    read_answer_mask,
    read_split_tokens,
)

__all__ = [
    "CORPUS_KINDS",
    "build_task_corpus",
    "check_corpus_for_run",
    "read_answer_mask",
    "read_split_tokens",
    "DEFAULT_EXTENSIONS",
    "DataError",
    "Document",
    "IndexedDatasetInfo",
    "SentencePieceTokenizer",
    "build_corpus",
    "build_gpt_datasets",
    "check_tokenizer_matches",
    "collect_documents",
    "default_source",
    "load_manifest",
    "load_tokenizer",
    "split_documents",
    "train_tokenizer",
    "validate_indexed_dataset",
    "write_indexed_dataset",
]
