"""Real-data pipeline: text files -> sentencepiece tokenizer -> Megatron indexed datasets ->
megatron-core GPTDataset. See ``corpus.py``; CLI: ``python -m megatron_dsa.data build``."""

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

__all__ = [
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
