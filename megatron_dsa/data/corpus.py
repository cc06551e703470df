"""Real-data pipeline: a directory of text -> sentencepiece tokenizer + Megatron indexed datasets.

Layout of a built corpus directory ``<out>``::

    tokenizer.model                         sentencepiece model (BPE by default, byte fallback)
    train_text_document.bin / .idx          megatron-core IndexedDataset, one document per file
    valid_text_document.bin / .idx          held-out split, disjoint files from train
    corpus.json                             manifest (counts, vocab size, eod id, ...)

Every document ends with the EOD token. Reading back goes through megatron-core's own
``GPTDataset``, which concatenates documents and cuts sequences across document boundaries.

Everything is deterministic: files are walked in sorted order, the split is a hash of each
file's relative path and the tokenizer is trained single-pass on an evenly strided, fixed
subset of lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import struct
import sysconfig
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy
import sentencepiece
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg",
)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_VALID_FRACTION = 0.02
DEFAULT_MAX_SENTENCES = 500_000
# Megatron-LM's default --make-vocab-size-divisible-by (multiplied by TP size there).
DEFAULT_VOCAB_MULTIPLE = 128

TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "corpus.json"
TRAIN_PREFIX = "train_text_document"
VALID_PREFIX = "valid_text_document"
MANIFEST_VERSION = 1

# Third-party packages and caches live under the stdlib directory; they are not stdlib text.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Special ids fixed at training time; pad must differ from eod or megatron-core ignores it.
_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID = 0, 1, 2, 3
# 256 byte-fallback pieces + the 4 special pieces above.
_MIN_VOCAB_SIZE = 256 + 4
# .idx layout (megatron-core _IndexWriter): magic, u64 version, u8 dtype code, u64 sequence
# count, u64 document-index count (documents + 1), then int32 lengths, int64 byte pointers,
# int64 document indices.
_IDX_FIXED_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8


class DataError(ValueError):
    """Bad input to the data pipeline, reported with one clear message."""


@dataclass(frozen=True)
class Document:
    """One source file: ``path`` is relative to the source directory, POSIX style."""

    path: str
    text: str


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What ``validate_indexed_dataset`` learned from a .bin/.idx pair."""

    prefix: str
    dtype: type[numpy.number]
    num_documents: int
    num_tokens: int


# --------------------------------------------------------------------------------------------
# Source collection and split


def default_source() -> Path:
    """The running interpreter's standard library: always present, never downloaded."""
    return Path(sysconfig.get_paths()["stdlib"])


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < _MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size must be >= {_MIN_VOCAB_SIZE} (byte fallback), got {vocab_size}"
        )


def _check_valid_fraction(valid_fraction: float) -> None:
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}")


def _check_model_type(model_type: str) -> None:
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")


def _check_source(source: Path) -> None:
    if not source.exists():
        raise DataError(f"source directory does not exist: {source}")
    if not source.is_dir():
        raise DataError(f"source is not a directory: {source}")
    if not os.access(source, os.R_OK | os.X_OK):
        raise DataError(f"source directory is not readable: {source}")


def _normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    normalized = tuple(
        sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in extensions if e})
    )
    if not normalized:
        raise DataError("no file extensions given")
    return normalized


def _decode(raw: bytes) -> str | None:
    """UTF-8 text, or None for binary / undecodable content."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def collect_documents(
    source: str | os.PathLike[str],
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[list[Document], int]:
    """Read matching text files under ``source`` in sorted order, up to ``max_bytes`` in total.

    Files that do not fit in the remaining budget are passed over (later, smaller ones may
    still fit). Binary, undecodable and whitespace-only files are skipped.

    Returns:
        The documents and the number of matching files skipped as binary or undecodable.
    """
    root = Path(source)
    _check_source(root)
    if max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    suffixes = _normalize_extensions(extensions)

    def unreadable(error: OSError) -> None:
        raise DataError(f"cannot read source directory {error.filename}: {error.strerror}")

    documents: list[Document] = []
    skipped = 0
    budget = max_bytes
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        # Sorting in place also fixes the order os.walk descends in.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".")
        )
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix.lower() not in suffixes or not path.is_file():
                continue
            try:
                size = path.stat().st_size
                if size > budget:
                    continue
                raw = path.read_bytes()
            except OSError as error:
                raise DataError(f"cannot read source file {path}: {error.strerror}") from error
            text = _decode(raw)
            if text is None:
                skipped += 1
                continue
            if not text.strip():
                continue
            documents.append(Document(path.relative_to(root).as_posix(), text))
            budget -= len(raw)
    if not documents:
        raise DataError(
            f"no usable text files in {root} (extensions {', '.join(suffixes)}, "
            f"max_bytes {max_bytes})"
        )
    return documents, skipped


def _split_key(path: str) -> float:
    """A stable pseudo-random number in [0, 1) per relative path."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    documents: Sequence[Document], valid_fraction: float = DEFAULT_VALID_FRACTION
) -> tuple[list[Document], list[Document]]:
    """Split into (train, valid) by hashing each relative path.

    A file lands in valid iff its hash key is below ``valid_fraction``, so adding or removing
    other files never moves it. Each split is clamped to at least one document, because
    megatron-core cannot build a dataset from an empty split.
    """
    _check_valid_fraction(valid_fraction)
    if len(documents) < 2:
        raise DataError(
            f"need at least 2 documents for a train/valid split, found {len(documents)}"
        )
    keys = [_split_key(d.path) for d in documents]
    by_key = sorted(range(len(documents)), key=keys.__getitem__)
    num_valid = min(max(sum(k < valid_fraction for k in keys), 1), len(documents) - 1)
    valid_ids = set(by_key[:num_valid])
    # Both splits keep the sorted walk order.
    train = [d for i, d in enumerate(documents) if i not in valid_ids]
    valid = [d for i, d in enumerate(documents) if i in valid_ids]
    return train, valid


# --------------------------------------------------------------------------------------------
# Tokenizer


class SentencePieceTokenizer:
    """A sentencepiece model with the interface megatron-core's GPTDataset needs.

    ``eod`` is the sentencepiece ``</s>`` id and ``pad`` a separate ``<pad>`` id; GPTDataset
    pads only the last partial validation sample with ``pad`` and masks it out of the loss.
    ``unique_identifiers`` hashes the model file so megatron-core's index cache changes when
    the tokenizer does.

    ``detokenize(tokenize(text)) == text`` holds for any text that does not contain the
    sentencepiece whitespace marker U+2581 ("▁").
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        model_path = Path(path)
        if not model_path.is_file():
            raise DataError(f"tokenizer file not found: {model_path}")
        proto = model_path.read_bytes()
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except RuntimeError as error:
            raise DataError(f"not a sentencepiece model: {model_path}") from error
        self.path = str(model_path.resolve())
        self._sha256 = hashlib.sha256(proto).hexdigest()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def unique_identifiers(self) -> OrderedDict[str, str]:
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"),
             ("sha256", self._sha256)]
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


def _training_sentences(texts: Iterable[str], max_sentences: int) -> list[str]:
    """Non-blank lines, evenly strided down to ``max_sentences`` so every file can contribute."""
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    stride = max(1, math.ceil(len(lines) / max_sentences))
    return lines[::stride]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = DEFAULT_MAX_SENTENCES,
) -> bytes:
    """Train a sentencepiece model on ``texts`` and return the serialized model.

    Identity normalization and kept whitespace make it lossless on source code; byte fallback
    means no id is ever ``unk``. The input is fixed and unshuffled, so BPE training is
    deterministic (this sentencepiece has no seed option; unigram's EM is not guaranteed to
    be bit-identical across thread counts).
    """
    _check_vocab_size(vocab_size)
    _check_model_type(model_type)
    sentences = _training_sentences(texts, max_sentences)
    if not sentences:
        raise DataError("no text to train the tokenizer on")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=16384,
            shuffle_input_sentence=False,
            unk_id=_UNK_ID,
            bos_id=_BOS_ID,
            eos_id=_EOS_ID,
            pad_id=_PAD_ID,
            minloglevel=2,
        )
    except RuntimeError as error:
        # e.g. "Vocabulary size too high (4096). Please set it to a value <= 1234."
        raise DataError(f"tokenizer training failed: {str(error).split('] ')[-1]}") from error
    return model.getvalue()


def check_tokenizer_matches(
    tokenizer: SentencePieceTokenizer, vocab_size: int, multiple: int = DEFAULT_VOCAB_MULTIPLE
) -> None:
    """Check that a model with embedding size ``vocab_size`` fits ``tokenizer``.

    Rule: ``vocab_size`` must be either the tokenizer's vocab size exactly, or that size
    padded up to the next multiple of ``multiple`` (Megatron pads the embedding to a multiple
    of make_vocab_size_divisible_by * tensor_parallel_size; pass that product). Smaller would
    leave token ids without an embedding row; anything larger means a different tokenizer.
    """
    if multiple <= 0:
        raise DataError(f"multiple must be positive, got {multiple}")
    actual = tokenizer.vocab_size
    padded = math.ceil(actual / multiple) * multiple
    if vocab_size not in (actual, padded):
        allowed = f"{actual}" if padded == actual else f"{actual} or {padded}"
        raise DataError(
            f"model vocab size {vocab_size} does not match tokenizer {tokenizer.path} "
            f"(vocab {actual}): expected {allowed} (padded to a multiple of {multiple})"
        )


# --------------------------------------------------------------------------------------------
# Indexed datasets


def write_indexed_dataset(
    prefix: str | os.PathLike[str], documents: Iterable[Sequence[int]], vocab_size: int
) -> tuple[int, int]:
    """Write token documents with megatron-core's IndexedDatasetBuilder.

    Each document becomes one sequence; the caller appends the EOD token.

    Returns:
        (number of documents, number of tokens).
    """
    prefix = str(prefix)
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    num_documents = num_tokens = 0
    try:
        for ids in documents:
            builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
            num_documents += 1
            num_tokens += len(ids)
    except BaseException:
        # finalize() is what normally closes the .bin; the caller discards the directory.
        builder.data_file.close()
        raise
    builder.finalize(get_idx_path(prefix))
    return num_documents, num_tokens


def validate_indexed_dataset(prefix: str | os.PathLike[str]) -> IndexedDatasetInfo:
    """Check a .bin/.idx pair is complete and consistent before megatron-core reads it.

    megatron-core trusts the .idx (its checks are ``assert`` statements, and a short .bin only
    fails when a sample is read), so this checks the header, that the .idx has exactly the
    size its counts imply, that sequence pointers are the running sum of lengths, and that
    sum(lengths) * itemsize equals the .bin size. Reads only the .idx.
    """
    prefix = str(prefix)
    idx_path, bin_path = Path(get_idx_path(prefix)), Path(get_bin_path(prefix))
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"indexed dataset file missing: {path}")

    def corrupt(reason: str) -> DataError:
        return DataError(f"corrupt indexed dataset {prefix}: {reason}")

    idx_size = idx_path.stat().st_size
    if idx_size < _IDX_FIXED_BYTES:
        raise corrupt(f".idx is {idx_size} bytes, shorter than its {_IDX_FIXED_BYTES}-byte header")
    idx = numpy.memmap(idx_path, dtype=numpy.uint8, mode="r")
    header = idx[:_IDX_FIXED_BYTES].tobytes()
    if not header.startswith(_INDEX_HEADER):
        raise corrupt(".idx has a bad magic header")
    version, code, num_sequences, num_document_indices = struct.unpack_from(
        "<QBQQ", header, len(_INDEX_HEADER)
    )
    if version != 1:
        raise corrupt(f".idx has unsupported version {version}")
    if code not in {d.value for d in DType}:
        raise corrupt(f".idx has unknown dtype code {code}")
    expected_idx_size = _IDX_FIXED_BYTES + num_sequences * (4 + 8) + num_document_indices * 8
    if idx_size != expected_idx_size:
        raise corrupt(
            f".idx is {idx_size} bytes but its counts ({num_sequences} sequences) "
            f"imply {expected_idx_size}"
        )
    offset = _IDX_FIXED_BYTES
    lengths = numpy.frombuffer(idx, numpy.int32, num_sequences, offset)
    pointers = numpy.frombuffer(idx, numpy.int64, num_sequences, offset + lengths.nbytes)
    document_indices = numpy.frombuffer(
        idx, numpy.int64, num_document_indices, offset + lengths.nbytes + pointers.nbytes
    )
    if (
        num_document_indices == 0
        or document_indices[0] != 0
        or document_indices[-1] != num_sequences
        or numpy.any(numpy.diff(document_indices) < 0)
    ):
        raise corrupt(".idx document indices are inconsistent")
    if numpy.any(lengths < 0):
        raise corrupt(".idx has negative sequence lengths")
    dtype = DType.dtype_from_code(code)
    ends = numpy.cumsum(lengths, dtype=numpy.int64) * DType.size(dtype)
    if num_sequences and (pointers[0] != 0 or numpy.any(pointers[1:] != ends[:-1])):
        raise corrupt(".idx sequence pointers do not match the sequence lengths")
    expected_bin_size = int(ends[-1]) if num_sequences else 0
    bin_size = bin_path.stat().st_size
    if bin_size != expected_bin_size:
        raise corrupt(
            f".bin is {bin_size} bytes but the .idx describes {expected_bin_size} "
            f"(truncated or mismatched pair?)"
        )
    num_tokens = expected_bin_size // DType.size(dtype)
    return IndexedDatasetInfo(prefix, dtype, num_document_indices - 1, num_tokens)


# --------------------------------------------------------------------------------------------
# Corpus build


def _split_stats(documents: Sequence[Document], num_tokens: int) -> dict[str, int]:
    return {
        "documents": len(documents),
        "bytes": sum(len(d.text.encode("utf-8")) for d in documents),
        "tokens": num_tokens,
    }


def build_corpus(
    out: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    vocab_size: int = 4096,
    *,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    model_type: str = "bpe",
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    overwrite: bool = False,
) -> dict:
    """Build tokenizer + train/valid indexed datasets + manifest from a directory of text.

    ``source`` defaults to the running interpreter's standard library. Everything is written
    into a temporary directory next to ``out`` and renamed into place only when complete, so a
    failed build leaves nothing at ``out``. An existing ``out`` is an error unless
    ``overwrite``.

    Returns:
        The manifest, also written to ``<out>/corpus.json``.
    """
    out_dir = Path(out).absolute()
    source_dir = Path(source).absolute() if source is not None else default_source()
    # Cheap argument checks first, so bad input fails before any file is read.
    if out_dir.exists() and not overwrite:
        raise DataError(f"output directory already exists (pass overwrite): {out_dir}")
    _check_vocab_size(vocab_size)
    _check_valid_fraction(valid_fraction)
    _check_model_type(model_type)
    suffixes = _normalize_extensions(extensions)

    documents, skipped = collect_documents(source_dir, suffixes, max_bytes)
    train_docs, valid_docs = split_documents(documents, valid_fraction)

    with staged_directory(out_dir) as staging:
        manifest = _build_into(
            staging, source_dir, train_docs, valid_docs, skipped,
            vocab_size=vocab_size, extensions=suffixes, max_bytes=max_bytes,
            valid_fraction=valid_fraction, model_type=model_type, max_sentences=max_sentences,
        )
    return manifest


@contextlib.contextmanager
def staged_directory(out_dir: Path):
    """Yield an empty sibling of ``out_dir`` to build in; when the body succeeds its files are
    synced and it replaces ``out_dir`` in one rename, else it is removed: a failed or interrupted
    build leaves nothing half-written."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem (atomic); mkdir honours the umask.
    staging = _sibling(out_dir, "partial")
    staging.mkdir()
    try:
        yield staging
        _sync_files(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _build_into(
    staging: Path,
    source_dir: Path,
    train_docs: list[Document],
    valid_docs: list[Document],
    skipped: int,
    *,
    vocab_size: int,
    extensions: tuple[str, ...],
    max_bytes: int,
    valid_fraction: float,
    model_type: str,
    max_sentences: int,
) -> dict:
    model = train_tokenizer((d.text for d in train_docs), vocab_size, model_type, max_sentences)
    (staging / TOKENIZER_FILE).write_bytes(model)
    tokenizer = SentencePieceTokenizer(staging / TOKENIZER_FILE)
    eod = tokenizer.eod

    splits = {}
    for name, prefix, docs in (
        ("train", TRAIN_PREFIX, train_docs),
        ("valid", VALID_PREFIX, valid_docs),
    ):
        token_docs = (tokenizer.tokenize(d.text) + [eod] for d in docs)
        _, num_tokens = write_indexed_dataset(staging / prefix, token_docs, tokenizer.vocab_size)
        validate_indexed_dataset(staging / prefix)
        splits[name] = {"prefix": prefix, **_split_stats(docs, num_tokens)}

    manifest = {
        "version": MANIFEST_VERSION,
        "source": str(source_dir),
        "extensions": list(extensions),
        "max_bytes": max_bytes,
        "valid_fraction": valid_fraction,
        "files_skipped_binary": skipped,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_type": f"sentencepiece-{model_type}",
        "vocab_size": tokenizer.vocab_size,
        "eod": eod,
        "pad": tokenizer.pad,
        "dtype": DType.optimal_dtype(tokenizer.vocab_size).__name__,
        "splits": splits,
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _sync_files(directory: Path) -> None:
    """Flush file contents to disk before the rename publishes them."""
    for path in directory.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is swapped out, then removed."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    old = _sibling(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Reading back


def load_manifest(data_dir: str | os.PathLike[str]) -> dict:
    """Read ``<data_dir>/corpus.json``."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"not a built corpus (no {MANIFEST_FILE}): {Path(data_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"corrupt manifest {path}: {error}") from error
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"unsupported manifest version {manifest.get('version')!r} in {path}")
    return manifest


def _check_tokenizer_for_corpus(tokenizer: SentencePieceTokenizer, manifest: dict) -> None:
    if (tokenizer.vocab_size, tokenizer.eod) != (manifest["vocab_size"], manifest["eod"]):
        raise DataError(
            f"tokenizer {tokenizer.path} (vocab {tokenizer.vocab_size}, eod {tokenizer.eod}) does "
            f"not match the corpus (vocab {manifest['vocab_size']}, eod {manifest['eod']})"
        )


def load_tokenizer(data_dir: str | os.PathLike[str]) -> SentencePieceTokenizer:
    """The tokenizer of a built corpus, checked against its manifest."""
    manifest = load_manifest(data_dir)
    tokenizer = SentencePieceTokenizer(Path(data_dir) / manifest["tokenizer"])
    _check_tokenizer_for_corpus(tokenizer, manifest)
    return tokenizer


def corpus_kind(manifest: dict) -> str:
    """"text" (``build_corpus``) or "tasks" (the task mixture, ``mixture.build_task_corpus``)."""
    return manifest.get("kind", "text")


def answer_weight_problem(weight, kind: str) -> str | None:
    """Why ``weight`` cannot be a run's answer-token loss weight over a corpus of ``kind``, or None."""
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
            and weight > 0):
        return f"answer_loss_weight must be a positive number, got {weight!r}"
    if weight != 1 and kind != "tasks":
        return (f"answer_loss_weight {weight} needs a task mixture (a run needs data.corpus: tasks); "
                f"a {kind!r} corpus has no answers")
    return None


@dataclass
class AnswerWeightedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus each split's answer mask (text prefix -> mask prefix) and the loss
    weight of the answer tokens."""

    answer_masks: dict[str, str] | None = None
    answer_loss_weight: float = 1.0


class _SameSamples:
    """A GPTDataset's sample lookup (its document, sample and shuffle indices) over another
    low-level dataset with the same document lengths."""

    def __init__(self, dataset: GPTDataset, low_level):
        self._of, self.dataset = dataset, low_level

    def __getattr__(self, name):
        return getattr(self._of, name)


class AnswerWeightedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset over a task mixture, whose loss mask weighs the tasks' answer
    tokens by ``answer_loss_weight`` (the other tokens keep 1). The answer mask is read with the
    same document, sample and shuffle indices as the tokens, so it covers exactly the sample's
    tokens whatever the shuffle; the weight multiplies megatron-core's own mask (padding and
    batch-padding samples stay 0), so it reaches the loss through every path that carries the
    mask (context-parallel slices, packed sequences)."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        mask_prefix = config.answer_masks[dataset_path]
        self.answer_mask = IndexedDataset(mask_prefix, multimodal=False, mmap=config.mmap_bin_files)
        if not numpy.array_equal(self.answer_mask.sequence_lengths, indexed_dataset.sequence_lengths):
            raise DataError(f"the answer mask {mask_prefix} does not have the documents of {dataset_path}")

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        if idx is None:
            return item
        marks, _, _ = GPTDataset._query_document_sample_shuffle_indices(_SameSamples(self, self.answer_mask), idx)
        marks = torch.from_numpy(marks == 1)
        answers = marks[1:] if self.config.add_extra_token_to_sequence else marks
        weight = torch.where(answers, float(self.config.answer_loss_weight), 1.0)
        item["loss_mask"] = item["loss_mask"] * weight.to(item["loss_mask"].dtype)
        return item


def build_gpt_datasets(
    data_dir: str | os.PathLike[str],
    sequence_length: int,
    *,
    answer_loss_weight: float = 1.0,
    tokenizer: SentencePieceTokenizer | None = None,
    random_seed: int = 1234,
    train_samples: int | None = None,
    valid_samples: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    create_attention_mask: bool = False,
    mmap_bin_files: bool = True,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[GPTDataset | None, GPTDataset | None]:
    """megatron-core GPTDatasets (train, valid) over a corpus built by ``build_corpus``.

    Samples are ``sequence_length`` tokens cut from the shuffled concatenation of documents
    (EOD-separated), with no position/attention reset and loss on every token, including EOD.
    ``*_samples=None`` means one epoch; a number repeats epochs as needed.
    ``answer_loss_weight`` != 1 (a task mixture only): the loss mask weighs the tasks' answer
    tokens by it (``AnswerWeightedGPTDataset``).

    ``create_attention_mask`` is off by default: megatron-core would materialize a dense
    [S, S] mask per sample, which is prohibitive at long context.

    Works with torch.distributed uninitialized or initialized (megatron-core then builds the
    index cache on rank 0 first, all ranks must call this, and ranks where
    ``is_built_on_rank()`` is False get None). Index caches go to ``cache_dir`` (default
    ``<data_dir>/gpt_index_cache``, which ``build_corpus(overwrite=True)`` replaces with the
    data; a cache_dir elsewhere must be cleared by hand when the corpus is rebuilt, because
    megatron-core keys it on the prefix path, not the file contents).
    """
    if sequence_length <= 0:
        raise DataError(f"sequence_length must be positive, got {sequence_length}")
    data_path = Path(data_dir).absolute()
    manifest = load_manifest(data_path)
    if tokenizer is None:
        tokenizer = load_tokenizer(data_path)
    else:
        _check_tokenizer_for_corpus(tokenizer, manifest)

    problem = answer_weight_problem(answer_loss_weight, corpus_kind(manifest))
    if problem:
        raise DataError(f"{data_path}: {problem}")
    weighted = answer_loss_weight != 1
    prefixes, answer_masks = [], {}
    for split, samples in (("train", train_samples), ("valid", valid_samples)):
        info = validate_indexed_dataset(data_path / manifest["splits"][split]["prefix"])
        if weighted:
            answer_masks[info.prefix] = validate_indexed_dataset(
                data_path / manifest["splits"][split]["answer_mask"]).prefix
        # With add_extra_token_to_sequence a sample needs sequence_length + 1 tokens; one epoch
        # shorter than that yields an empty dataset.
        if samples is None and info.num_tokens < sequence_length + 1:
            raise DataError(
                f"{split} split has {info.num_tokens} tokens, fewer than one sample of "
                f"sequence_length {sequence_length} + 1"
            )
        prefixes.append(info.prefix)

    config_cls, extra = (AnswerWeightedGPTDatasetConfig, dict(answer_masks=answer_masks,
                                                              answer_loss_weight=float(answer_loss_weight))) \
        if weighted else (GPTDatasetConfig, {})
    config = config_cls(
        **extra,
        random_seed=random_seed,
        sequence_length=sequence_length,
        blend_per_split=[([prefixes[0]], None), ([prefixes[1]], None), None],
        path_to_cache=str(cache_dir if cache_dir is not None else data_path / "gpt_index_cache"),
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        AnswerWeightedGPTDataset if weighted else GPTDataset, [train_samples, valid_samples, None],
        is_built_on_rank, config
    ).build()
    return train, valid
