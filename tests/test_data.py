"""Real-data pipeline: corpus build, tokenizer, indexed datasets, megatron-core GPTDataset."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_dsa.data import (
    DataError,
    SentencePieceTokenizer,
    build_corpus,
    build_gpt_datasets,
    check_tokenizer_matches,
    collect_documents,
    load_manifest,
    load_tokenizer,
    split_documents,
    validate_indexed_dataset,
)
from megatron_dsa.data import corpus as corpus_module
from megatron_dsa.data.__main__ import main as cli_main

VOCAB = 512
VALID_FRACTION = 0.1
SEQ = 64


def _stored_documents(prefix: Path) -> list[numpy.ndarray]:
    dataset = IndexedDataset(str(prefix))
    return [numpy.array(dataset[i]) for i in range(len(dataset))]


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~600 KB of real stdlib source in two directories, plus files that must be skipped."""
    root = tmp_path_factory.mktemp("source")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "pkg").mkdir()
    total = 0
    for i, path in enumerate(sorted(stdlib.glob("*.py"))):
        text = path.read_text(encoding="utf-8")
        if len(text) > 60_000:
            continue
        (root / ("pkg" if i % 3 else "") / path.name).write_text(text, encoding="utf-8")
        total += len(text)
        if total > 600_000:
            break
    (root / "binary.py").write_bytes(b"import os\x00\xff\xfe")  # NUL byte: binary
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (root / "blank.md").write_text("  \n\n")  # whitespace only
    (root / "image.png").write_bytes(b"\x89PNG not text")  # extension not matched
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.py").write_text("print('must not be read')\n")
    return root


@pytest.fixture(scope="module")
def corpus(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "corpus"
    build_corpus(out, source, VOCAB, valid_fraction=VALID_FRACTION)
    return out


@pytest.fixture
def corpus_copy(corpus: Path, tmp_path: Path) -> Path:
    """A private copy for tests that damage files."""
    return Path(shutil.copytree(corpus, tmp_path / "corpus"))


# --------------------------------------------------------------------------------------------
# Build


def test_collect_skips_binary_blank_and_unmatched_files(source: Path) -> None:
    documents, skipped = collect_documents(source)
    paths = [d.path for d in documents]
    assert skipped == 2  # binary.py (NUL) and latin1.txt (not UTF-8)
    assert not {"binary.py", "latin1.txt", "blank.md", "image.png"} & set(paths)
    assert not any(p.startswith("__pycache__/") for p in paths)
    # Root files first, then pkg/, each sorted: a deterministic walk.
    root_files = [p for p in paths if "/" not in p]
    pkg_files = [p for p in paths if p.startswith("pkg/")]
    assert paths == root_files + pkg_files
    assert root_files == sorted(root_files) and pkg_files == sorted(pkg_files)
    assert len(root_files) > 3 and len(pkg_files) > 6


def test_max_bytes_caps_the_corpus(source: Path) -> None:
    documents, _ = collect_documents(source, max_bytes=50_000)
    total = sum(len(d.text.encode()) for d in documents)
    assert 0 < total <= 50_000
    everything, _ = collect_documents(source)
    assert len(documents) < len(everything)


def test_manifest_and_files(corpus: Path, source: Path) -> None:
    manifest = load_manifest(corpus)
    documents, _ = collect_documents(source)
    train, valid = split_documents(documents, VALID_FRACTION)
    assert manifest["vocab_size"] == VOCAB
    assert (manifest["eod"], manifest["pad"], manifest["dtype"]) == (2, 3, "uint16")
    assert manifest["files_skipped_binary"] == 2
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert manifest["splits"]["valid"]["documents"] == len(valid)
    for name in ("train", "valid"):
        split = manifest["splits"][name]
        info = validate_indexed_dataset(corpus / split["prefix"])
        assert (info.num_documents, info.num_tokens) == (split["documents"], split["tokens"])
        assert info.dtype is numpy.uint16
    assert sorted(p.name for p in corpus.iterdir()) == [
        "corpus.json", "tokenizer.model",
        "train_text_document.bin", "train_text_document.idx",
        "valid_text_document.bin", "valid_text_document.idx",
    ]
    assert _leftovers(corpus.parent, corpus.name) == []


def test_stored_documents_are_the_split_files_plus_eod(corpus: Path, source: Path) -> None:
    tokenizer = load_tokenizer(corpus)
    documents, _ = collect_documents(source)
    expected = dict(zip(("train", "valid"), split_documents(documents, VALID_FRACTION)))
    for name, docs in expected.items():
        stored = _stored_documents(corpus / f"{name}_text_document")
        assert len(stored) == len(docs)
        for ids, doc in zip(stored, docs):
            assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
            assert tokenizer.detokenize(ids[:-1]) == doc.text, doc.path


def test_valid_split_is_disjoint_and_stable(source: Path) -> None:
    documents, _ = collect_documents(source)
    train, valid = split_documents(documents, VALID_FRACTION)
    train_paths, valid_paths = {d.path for d in train}, {d.path for d in valid}
    assert train_paths.isdisjoint(valid_paths)
    assert train_paths | valid_paths == {d.path for d in documents}
    assert 1 <= len(valid) < len(documents) / 3
    # Membership depends on the path only, not on order or on the other files.
    _, valid_reversed = split_documents(documents[::-1], VALID_FRACTION)
    assert {d.path for d in valid_reversed} == valid_paths
    fewer = documents[1::2] + [d for d in documents[::2] if d.path in valid_paths]
    train2, valid2 = split_documents(fewer, VALID_FRACTION)
    assert {d.path for d in valid2} == valid_paths
    assert {d.path for d in train2} == {d.path for d in fewer} - valid_paths


def test_split_keeps_one_document_on_each_side(source: Path) -> None:
    documents, _ = collect_documents(source)
    train, valid = split_documents(documents[:2], 1e-9)
    assert len(train) == len(valid) == 1


def test_build_is_deterministic_and_overwrite_replaces(
    corpus: Path, source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "again"
    (out / "stale").mkdir(parents=True)
    with pytest.raises(DataError, match="already exists"):
        build_corpus(out, source, VOCAB, valid_fraction=VALID_FRACTION)
    build_corpus(out, source, VOCAB, valid_fraction=VALID_FRACTION, overwrite=True)
    assert not (out / "stale").exists()
    for name in ("tokenizer.model", "train_text_document.bin", "train_text_document.idx",
                 "valid_text_document.bin", "valid_text_document.idx"):
        assert (out / name).read_bytes() == (corpus / name).read_bytes(), name
    assert _leftovers(tmp_path, "again") == []


def test_failed_build_leaves_nothing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = corpus_module.write_indexed_dataset
    written: list[Path] = []

    def write_then_fail(prefix, documents, vocab_size):
        if written:
            # Fail while writing valid, with tokenizer and train split already in staging.
            assert Path(f"{written[0]}.bin").stat().st_size > 0
            assert (written[0].parent / "tokenizer.model").is_file()
            raise RuntimeError("disk full")
        written.append(Path(prefix))
        return real_write(prefix, documents, vocab_size)

    monkeypatch.setattr(corpus_module, "write_indexed_dataset", write_then_fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        build_corpus(out, source, VOCAB)
    assert written[0].parent.parent == tmp_path  # staging was a sibling of out...
    assert list(tmp_path.iterdir()) == []  # ...and it is gone; out never appeared


def test_cli_build(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = cli_main(["build", "--source", str(source), "--out", str(out), "--vocab-size", "384",
                   "--max-bytes", "200000", "--valid-fraction", "0.2"])
    printed = capsys.readouterr().out
    manifest = json.loads((out / "corpus.json").read_text())
    assert rc == 0
    assert manifest["vocab_size"] == 384 and manifest["max_bytes"] == 200_000
    assert f"train: {manifest['splits']['train']['documents']} documents" in printed
    assert f"{manifest['splits']['valid']['tokens']} tokens" in printed


def test_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc = cli_main(["build", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                   "--vocab-size", "512"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: no usable text files in")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn x  +  1\n",
        "    indented\n\n\n        more   spaces   \n",
        "Grüße, naïve café — 東京 ☃ 😀",
        "",
    ],
)
def test_tokenizer_round_trip(corpus: Path, text: str) -> None:
    tokenizer = load_tokenizer(corpus)
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.unk not in ids  # byte fallback covers every character
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_tokenizer_interface(corpus: Path) -> None:
    tokenizer = load_tokenizer(corpus)
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.eod, tokenizer.pad) == (2, 3)
    assert tokenizer.eod not in tokenizer.tokenize("a</s>b")  # text never yields the EOD id
    ids = tokenizer.unique_identifiers
    assert set(ids) == {"class", "sha256"} and len(ids["sha256"]) == 64


def test_missing_tokenizer(corpus_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer file not found"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    (corpus_copy / "tokenizer.model").unlink()
    with pytest.raises(DataError, match="tokenizer file not found"):
        build_gpt_datasets(corpus_copy, SEQ)


def test_corrupt_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "bad.model")


def test_check_tokenizer_matches() -> None:
    tokenizer = SimpleNamespace(vocab_size=500, path="t.model")
    check_tokenizer_matches(tokenizer, 500)
    check_tokenizer_matches(tokenizer, 512)  # padded to a multiple of 128
    check_tokenizer_matches(tokenizer, 768, multiple=384)  # e.g. 128 * TP=3
    for bad in (499, 640, 4096):
        with pytest.raises(DataError, match=rf"model vocab size {bad} does not match.*500 or 512"):
            check_tokenizer_matches(tokenizer, bad)


def test_foreign_tokenizer_rejected(corpus: Path) -> None:
    foreign = SimpleNamespace(vocab_size=VOCAB + 1, eod=2, path="other.model")
    with pytest.raises(DataError, match="does not match the corpus"):
        build_gpt_datasets(corpus, SEQ, tokenizer=foreign)


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_empty_source(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="no usable text files"):
        build_corpus(tmp_path / "out", tmp_path / "src", VOCAB)
    (tmp_path / "src" / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / "src" / "notes.xyz").write_text("text, but not a chosen extension")
    with pytest.raises(DataError, match="no usable text files"):
        build_corpus(tmp_path / "out", tmp_path / "src", VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unreadable_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="source directory does not exist"):
        build_corpus(tmp_path / "out", tmp_path / "missing", VOCAB)
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(DataError, match="source is not a directory"):
        build_corpus(tmp_path / "out", tmp_path / "file.txt", VOCAB)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 100}, "vocab_size must be >= 260"),
        ({"valid_fraction": 0.0}, r"valid_fraction must be in \(0, 1\)"),
        ({"model_type": "wordpiece"}, "model_type must be"),
        ({"max_bytes": 0}, "max_bytes must be positive"),
    ],
)
def test_bad_arguments(source: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        build_corpus(tmp_path / "out", source, **{"vocab_size": VOCAB, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_large_for_corpus(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").write_text(f"tiny file number {i}\n")
    with pytest.raises(DataError, match="tokenizer training failed: Vocabulary size too high"):
        build_corpus(tmp_path / "out", tmp_path / "src", 4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_truncated_bin(corpus_copy: Path) -> None:
    bin_path = corpus_copy / "train_text_document.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"\.bin is .* bytes but the \.idx describes"):
        validate_indexed_dataset(corpus_copy / "train_text_document")
    with pytest.raises(DataError, match="corrupt indexed dataset .*train_text_document"):
        build_gpt_datasets(corpus_copy, SEQ)


def _add_to_last_pointer(idx: bytes, delta: int) -> bytes:
    count = int.from_bytes(idx[18:26], "little")  # after magic, version and dtype code
    assert count >= 2
    at = 34 + 4 * count + 8 * (count - 1)
    pointer = int.from_bytes(idx[at : at + 8], "little") + delta
    return idx[:at] + pointer.to_bytes(8, "little") + idx[at + 8 :]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda idx: b"XXIDIDX\x00\x00" + idx[9:], "bad magic header"),
        (lambda idx: idx[:9] + (2).to_bytes(8, "little") + idx[17:], "unsupported version 2"),
        (lambda idx: idx[:17] + b"\x63" + idx[18:], "unknown dtype code 99"),
        (lambda idx: idx[:-8], r"\.idx is .* bytes but its counts"),
        (lambda idx: idx[:20], "shorter than its 34-byte header"),
        # Last int64 sequence pointer (they follow the int32 lengths) off by one token.
        (lambda idx: _add_to_last_pointer(idx, 2), "sequence pointers do not match"),
    ],
)
def test_corrupt_idx(corpus_copy: Path, damage, message: str) -> None:
    idx_path = corpus_copy / "valid_text_document.idx"
    idx_path.write_bytes(damage(idx_path.read_bytes()))
    with pytest.raises(DataError, match=message):
        build_gpt_datasets(corpus_copy, SEQ)


def test_missing_bin(corpus_copy: Path) -> None:
    (corpus_copy / "valid_text_document.bin").unlink()
    with pytest.raises(DataError, match="indexed dataset file missing: .*valid_text_document.bin"):
        build_gpt_datasets(corpus_copy, SEQ)


def test_not_a_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a built corpus"):
        build_gpt_datasets(tmp_path, SEQ)


def test_sequence_longer_than_split(corpus: Path) -> None:
    valid_tokens = load_manifest(corpus)["splits"]["valid"]["tokens"]
    with pytest.raises(DataError, match=f"valid split has {valid_tokens} tokens"):
        build_gpt_datasets(corpus, valid_tokens)


# --------------------------------------------------------------------------------------------
# megatron-core GPTDataset


def _expected_samples(dataset, stored: list[numpy.ndarray]):
    """idx -> the SEQ + 1 tokens GPTDataset should return, rebuilt from the stored documents
    in GPTDataset's own (shuffled) document order."""
    order = numpy.asarray(dataset.document_index)
    stream = numpy.concatenate([stored[d] for d in order]).astype(numpy.int64)
    starts = numpy.concatenate([[0], numpy.cumsum([len(stored[d]) for d in order])])

    def expected(idx: int) -> numpy.ndarray:
        doc, offset = dataset.sample_index[dataset.shuffle_index[idx]]
        begin = starts[doc] + offset
        return stream[begin : begin + SEQ + 1]

    return expected


def test_gpt_dataset_samples_match_stored_tokens(corpus: Path, tmp_path: Path) -> None:
    train, valid = build_gpt_datasets(corpus, SEQ, cache_dir=tmp_path / "cache")
    manifest = load_manifest(corpus)
    eod = manifest["eod"]
    for name, dataset in (("train", train), ("valid", valid)):
        tokens_total = manifest["splits"][name]["tokens"]
        # One epoch, last partial sample dropped, one extra token for the shifted labels.
        assert len(dataset) == (tokens_total - 1) // SEQ
        stored = _stored_documents(corpus / f"{name}_text_document")
        # Every document is used exactly once in one epoch.
        assert sorted(numpy.asarray(dataset.document_index)) == list(range(len(stored)))
        expected_sample = _expected_samples(dataset, stored)
        crossed_boundary = False
        for idx in range(len(dataset)):
            sample = dataset[idx]
            expected = expected_sample(idx)
            assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
            assert torch.equal(sample["tokens"], torch.from_numpy(expected[:-1]))
            assert torch.equal(sample["labels"], torch.from_numpy(expected[1:]))
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert torch.all(sample["loss_mask"] == 1.0)
            assert "attention_mask" not in sample
            crossed_boundary |= bool((sample["tokens"] == eod).any())
        assert crossed_boundary, f"no {name} sample spans an EOD: documents are not concatenated"


def test_gpt_dataset_sample_counts_and_cache(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    train, valid = build_gpt_datasets(
        corpus, SEQ, train_samples=50_000, valid_samples=10, cache_dir=cache
    )
    assert len(train) >= 50_000  # more epochs than one
    assert len(valid) >= 10
    assert len(list(cache.glob("*-GPTDataset-train-shuffle_index.npy"))) == 1
    # Second build hits the cache and yields the same samples.
    train2, _ = build_gpt_datasets(
        corpus, SEQ, train_samples=50_000, valid_samples=10, cache_dir=cache
    )
    assert torch.equal(train[123]["tokens"], train2[123]["tokens"])


def test_gpt_dataset_default_cache_inside_corpus(corpus_copy: Path) -> None:
    build_gpt_datasets(corpus_copy, SEQ)
    assert len(list((corpus_copy / "gpt_index_cache").glob("*-GPTDataset-*.npy"))) == 6
    # megatron-core's own default would be <prefix>/cache/, a directory beside the .bin/.idx.
    assert not (corpus_copy / "train_text_document").exists()


def test_gpt_dataset_same_with_and_without_distributed(corpus: Path, tmp_path: Path, megatron_world) -> None:
    """Built under an initialised gloo world here, and without torch.distributed in a fresh
    process: the same samples."""
    import subprocess
    import sys

    assert torch.distributed.is_initialized()
    train, valid = build_gpt_datasets(corpus, SEQ, cache_dir=tmp_path / "dist")
    code = (
        "import sys, torch; from megatron_dsa.data import build_gpt_datasets; "
        "assert not torch.distributed.is_initialized(); "
        f"t, v = build_gpt_datasets({str(corpus)!r}, {SEQ}, cache_dir={str(tmp_path / 'plain')!r}); "
        "print(len(t), len(v), t[7]['tokens'].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n_train, n_valid, tokens = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (int(n_train), int(n_valid)) == (len(train), len(valid))
    assert tokens == str(train[7]["tokens"].tolist())
