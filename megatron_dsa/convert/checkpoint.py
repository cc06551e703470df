"""Reading and writing megatron-core distributed (torch_dist) checkpoints, one piece at a time.

Layout (Megatron-LM's training loop, ``megatron/training/checkpointing.py``)::

    <dir>/latest_checkpointed_iteration.txt     "NNN" or "release"
    <dir>/iter_NNNNNNN/ (or <dir>/release/)     dist_checkpointing.save(state_dict, ...)

where ``state_dict = {"model": model.sharded_state_dict(), "args": <Megatron args>,
"iteration": N, "checkpoint_version": 3.0, ...}`` (optimizer and RNG state as well when
saved by the trainer). A bare dist-checkpoint directory (``metadata.json`` inside) is
accepted too.

Any parallel layout. A torch_dist checkpoint stores every tensor as pieces of a GLOBAL tensor
(each rank writes its shard with its offsets: tensor-parallel rows/columns, the expert axis
that expert parallelism splits, the SwiGLU halves of a TP-split ``linear_fc1``, pipeline
stages owning different layers). Loading asks for pieces of those global tensors, and
dist_checkpointing reassembles whatever the writers' layout was. We always ask with the
layout of a TP=1 / EP=1 / PP=1 model on one process, so a checkpoint written with TP=8,
EP=64, PP=4 converts the same way as one written by a single process.

Streaming. We build that TP=1 model on the ``meta`` device (no memory, no initialisation)
only to get its sharded state dict: the names, global shapes and offsets megatron-core uses.
Then entries are loaded a few at a time (``dist_checkpointing.load`` with a partial sharded
state dict), up to a byte budget, so host memory holds about one budget of weights. One
exception: all fragments of one checkpoint key must be loaded together (torch_dist on a
single process), and megatron-core stacks the routed experts of a layer into one key per
weight, so the bound is max(budget, one layer's E x 2I x H expert fc1); 15 GB in bf16 for
the 671B shape, a few MB for the small model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from megatron_dsa import safe_load
from megatron_dsa.convert.errors import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
SPEC_KEY = "mdsa_model"
# bos/eos/pad ids of the model's tokenizer, recorded by from-hf (from the HF config) so that
# to-hf can write them back without a --tokenizer.
SPECIAL_IDS_KEY = "mdsa_special_ids"
SPECIAL_ID_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id")


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The dist-checkpoint directory of a Megatron-LM save dir (tracker) or a bare one, checked
    (``safe_load.verify``: metadata through the allow-list, storage files complete) before any
    of it is loaded."""
    safe_load.install()
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"checkpoint directory not found: {p}")
    if (p / "metadata.json").is_file():
        return _verified(p)
    tracker = p / TRACKER
    if not tracker.is_file():
        raise ConversionError(
            f"{p} is not a megatron checkpoint: no {TRACKER} and no metadata.json"
        )
    text = tracker.read_text().strip()
    if text == "release":
        sub = p / "release"
    else:
        try:
            sub = p / f"iter_{int(text):07d}"
        except ValueError:
            raise ConversionError(f"corrupt checkpoint tracker {tracker}: {text!r}") from None
    if not (sub / "metadata.json").is_file():
        raise ConversionError(
            f"checkpoint {sub} (named by {tracker}) is missing or not a torch_dist checkpoint "
            "(only the torch_dist format is supported)"
        )
    return _verified(sub)


def _verified(ckpt: Path) -> Path:
    try:
        safe_load.verify(ckpt)
    except safe_load.CheckpointError as error:
        raise ConversionError(str(error)) from None
    return ckpt


# torch.distributed.checkpoint wraps load failures in CheckpointException, a BaseException.
def _load_errors() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


@contextmanager
def _loading(ckpt: Path, what: str):
    """Any failure while loading ``ckpt`` as one ConversionError line."""
    try:
        yield
    except ConversionError:
        raise
    except _load_errors() as error:
        raise ConversionError(f"cannot read {what} of checkpoint {ckpt}: {safe_load.describe(error)}") from None


def ensure_world() -> None:
    """dist_checkpointing needs torch.distributed and megatron's parallel state (one process)."""
    from megatron.core import parallel_state

    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        return
    from megatron_dsa.distributed import init_single_process

    init_single_process()


def common_state(ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing

    with _loading(ckpt, "the common state"):
        return dist_checkpointing.load_common_state_dict(str(ckpt))


def tensors_metadata(ckpt: Path) -> dict:
    from megatron.core import dist_checkpointing

    with _loading(ckpt, "the tensor metadata"):
        return dist_checkpointing.load_tensors_metadata(str(ckpt))


def special_ids_for(ckpt: Path) -> dict[str, int]:
    """bos/eos/pad ids of the checkpoint's tokenizer: those from-hf recorded, else those of the
    tokenizer file a training run names (Megatron's ``args.tokenizer_model``) if it still
    exists; {} when the checkpoint says nothing."""
    common = common_state(ckpt)
    recorded = common.get(SPECIAL_IDS_KEY)
    if isinstance(recorded, dict):
        return {k: v for k, v in recorded.items() if k in SPECIAL_ID_NAMES and isinstance(v, int)}
    path = getattr(common.get("args"), "tokenizer_model", None)
    if isinstance(path, str) and Path(path).is_file():
        return tokenizer_special_ids(Path(path))
    return {}


def tokenizer_special_ids(tokenizer_path: Path) -> dict[str, int]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def model_spec_for(ckpt: Path, size: Optional[str], overrides: dict[str, Any]):
    """(ModelSize, overrides) of the model stored in ``ckpt``.

    Order: an explicit ``size`` name; else the spec we stored (from-hf writes it); else the
    trainer's Megatron args (``mdsa_size`` + ``mdsa_model_overrides``).
    """
    from megatron_dsa.model import ModelSize, resolve_size

    common = common_state(ckpt)
    if size is not None:
        try:
            return resolve_size(size), dict(overrides)
        except ValueError as error:
            raise ConversionError(str(error)) from None
    if isinstance(common.get(SPEC_KEY), dict):
        return ModelSize.from_json(common[SPEC_KEY]), dict(overrides)
    args = common.get("args")
    if args is not None and getattr(args, "mdsa_size", None):
        stored = dict(json.loads(getattr(args, "mdsa_model_overrides", "{}") or "{}"))
        stored.update(overrides)
        return resolve_size(args.mdsa_size), stored
    raise ConversionError(
        f"checkpoint {ckpt} does not record its model size: pass --size NAME"
    )


# Overrides that only matter for training; a converter ignores them.
_RUNTIME_FIELDS = {"mdsa_mode", "mdsa_kernel"}


def build_config(spec, overrides: dict[str, Any], **extra):
    from megatron_dsa.model import model_config

    fields = {k: v for k, v in overrides.items() if k not in _RUNTIME_FIELDS}
    fields.update(extra)
    try:
        with _quiet():
            return model_config(spec, **fields)
    except (ValueError, TypeError, AssertionError) as error:
        raise ConversionError(f"invalid model configuration: {error}") from None


@contextmanager
def _quiet():
    """No warnings and no megatron-core log lines (its GPTModel deprecation notice would be a
    second stderr line beside a converter's one error line)."""
    import logging
    import warnings

    megatron_log = logging.getLogger("megatron.core")
    level = megatron_log.level
    megatron_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        megatron_log.setLevel(level)


def meta_model(spec, config, vocab_size: int):
    """The TP=1 model on the meta device: shapes and sharded-state-dict layout, no memory."""
    from megatron_dsa.model import build_model

    ensure_world()
    initialize, config.perform_initialization = config.perform_initialization, False  # nothing to fill
    try:
        with _quiet(), torch.device("meta"):
            return build_model(spec, config, vocab_size=vocab_size)
    finally:
        config.perform_initialization = initialize


def tensor_entries(model) -> list[tuple[str, Any]]:
    """(state-dict name, ShardedTensor | ShardedTensorFactory) of the model, in module order."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            out.append((name, entry))
    return out


def entry_key(entry) -> str:
    return entry.key


def entry_shape(entry) -> tuple[int, ...]:
    return tuple(entry.data.shape)


def entry_nbytes(entry, dtype: torch.dtype) -> int:
    return entry.data.numel() * torch.empty((), dtype=dtype).element_size()


def check_against_metadata(entries, metadata: dict, ckpt: Path) -> dict[str, torch.dtype]:
    """Every tensor the model needs is in the checkpoint with the right global shape.

    Returns the stored dtype per key. One ConversionError naming all problems otherwise.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    dtypes, problems = {}, []
    for name, entry in entries:
        key = entry.key
        if key not in metadata:
            problems.append(f"missing {key}")
            continue
        stored = metadata[key]
        dtypes[key] = stored.dtype
        if isinstance(entry, ShardedTensor):
            want = tuple(entry.global_shape)
        else:  # a factory (SwiGLU) over the full local tensor, TP=1: local == global (+ prepends)
            want = None
        if want is not None and tuple(stored.global_shape) != want:
            problems.append(f"{key}: checkpoint shape {tuple(stored.global_shape)}, model shape {want}")
        elif want is None:
            expected = tuple(entry.data.shape)
            if tuple(stored.global_shape)[-len(expected):] != expected:
                problems.append(f"{key}: checkpoint shape {tuple(stored.global_shape)}, model shape {expected}")
    if problems:
        head = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ConversionError(
            f"checkpoint {ckpt} does not match the model (wrong --size or overrides?): {head}"
        )
    return dtypes


def stream_tensors(entries, ckpt: Path, dtypes: dict[str, torch.dtype], budget_bytes: int
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) for every entry, loading about ``budget_bytes`` at a time."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    def flush(batch):
        request = {}
        for name, entry in batch:
            dtype = dtypes[entry.key]
            data = torch.empty(tuple(entry.data.shape), dtype=dtype, device="cpu")
            if isinstance(entry, ShardedTensor):
                entry = dataclasses.replace(entry, data=data, dtype=dtype)
            else:
                entry = dataclasses.replace(entry, data=data)
            request[name] = entry
        with _quiet(), _loading(ckpt, "the weights"):
            # Part of a key at a time (some experts of a stacked tensor): skip the check that
            # every shard of a key is requested.
            loaded = dist_checkpointing.load(request, str(ckpt), validate_access_integrity=False)
        for name, _ in batch:
            yield name, loaded[name]

    # All pieces of one checkpoint key load together: torch_dist on one process needs every
    # fragment of a global tensor in the same request (the experts of a layer are one stacked
    # key, so the memory bound is max(budget, one layer's stacked fc1 of all experts)).
    groups: dict[str, list] = {}
    for name, entry in entries:
        groups.setdefault(entry.key, []).append((name, entry))
    batch, size = [], 0
    for key, group in groups.items():
        n = sum(entry_nbytes(e, dtypes[key]) for _, e in group)
        if batch and size + n > budget_bytes:
            yield from flush(batch)
            batch, size = [], 0
        batch.extend(group)
        size += n
    if batch:
        yield from flush(batch)


def imported_model(directory: str | os.PathLike[str]):
    """(ModelSize, embedding rows) of a checkpoint ``from-hf`` wrote, read from its record
    (``mdsa_model``) and tensor metadata without loading a weight; None for a checkpoint
    without that record (a training run's)."""
    from megatron_dsa.model import ModelSize

    ckpt = resolve_checkpoint_dir(directory)
    record = common_state(ckpt).get(SPEC_KEY)
    if not isinstance(record, dict):
        return None
    try:
        spec = ModelSize.from_json(record)
    except (KeyError, TypeError, ValueError) as error:
        raise ConversionError(f"checkpoint {ckpt} has a corrupt model record ({SPEC_KEY}): {error!r}") from None
    return spec, vocab_from_metadata(tensors_metadata(ckpt), ckpt)


def vocab_from_metadata(metadata: dict, ckpt: Path) -> int:
    key = "embedding.word_embeddings.weight"
    if key not in metadata:
        raise ConversionError(f"checkpoint {ckpt} has no {key}: not a GPT model checkpoint of this project")
    return int(metadata[key].global_shape[0])


# --------------------------------------------------------------------------------------------
# Whole-model load (inference, tests) and save
# --------------------------------------------------------------------------------------------


def load_model(checkpoint: str | os.PathLike[str], size: Optional[str] = None,
               overrides: Optional[dict[str, Any]] = None, **config_extra):
    """Build our model (TP=1) and load a dist checkpoint into it. Returns (model, ModelSize)."""
    from megatron.core import dist_checkpointing

    from megatron_dsa.model import build_model

    ensure_world()
    ckpt = resolve_checkpoint_dir(checkpoint)
    spec, overrides = model_spec_for(ckpt, size, overrides or {})
    config = build_config(spec, overrides, **config_extra)
    metadata = tensors_metadata(ckpt)
    vocab = vocab_from_metadata(metadata, ckpt)
    check_against_metadata(tensor_entries(meta_model(spec, config, vocab)), metadata, ckpt)
    with _quiet():
        model = build_model(spec, config, vocab_size=vocab)
        sd = model.sharded_state_dict()
        with _loading(ckpt, "the weights"):
            loaded = dist_checkpointing.load(sd, str(ckpt))
        model.load_state_dict(loaded, strict=False)
    return model, spec


def check_output(out: str | os.PathLike[str], overwrite: bool = False,
                 source: str | os.PathLike[str] | None = None, source_flag: str = "--checkpoint") -> None:
    """Fail early (before any work) if the destination cannot be written, or is (or holds) the
    conversion's own input: ``--overwrite`` would replace it, destroying the source."""
    dest = Path(out).absolute()
    if source is not None:
        src, resolved = Path(source).resolve(), dest.resolve()
        if resolved == src or resolved in src.parents:
            raise ConversionError(f"--out {dest} {'is' if resolved == src else 'holds'} the input {source_flag} "
                                  f"{src}: writing there would replace it; choose another --out")
    if dest.exists() and not overwrite and not (dest.is_dir() and not any(dest.iterdir())):
        raise ConversionError(f"output {dest} already exists (pass --overwrite to replace it)")
    if not dest.parent.is_dir():
        raise ConversionError(f"parent directory of the output does not exist: {dest.parent}")


class DiskBackedTensors:
    """Tensors parked on disk and mapped back: a converter builds a whole model's state dict
    while holding about ``budget_bytes`` of new weights in memory at a time.

    ``add`` collects tensors and writes each ``budget_bytes`` batch to ``directory`` with
    ``torch.save``; ``load`` maps every batch back (``torch.load(mmap=True)``). The returned
    tensors are backed by the files' pages, which the checkpoint writer reads as it writes them
    and the OS can drop again. Each tensor is stored compact (its own storage), so the writer
    never has to clone a view. ``close`` drops the files.
    """

    def __init__(self, directory: Path, budget_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True)
        self.budget = max(1, int(budget_bytes))
        self._batch: dict[str, torch.Tensor] = {}
        self._size = 0
        self._files: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of a larger storage would save (and map) all of it
        self._batch[name] = t
        self._size += t.numel() * t.element_size()
        if self._size >= self.budget:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            path = self.directory / f"batch{len(self._files):05d}.pt"
            torch.save(self._batch, path)
            self._files.append(path)
            self._batch, self._size = {}, 0

    def load(self) -> dict[str, torch.Tensor]:
        self._flush()
        out: dict[str, torch.Tensor] = {}
        for path in self._files:
            out.update(torch.load(path, mmap=True, weights_only=True))
        return out

    def close(self) -> None:
        self._batch = {}
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def staged_output(out: str | os.PathLike[str], overwrite: bool = False):
    """Yield a temp dir beside ``out``; on success it is renamed to ``out``, on error removed."""
    dest = Path(out).absolute()
    if dest.exists() and not overwrite:
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            raise ConversionError(f"output {dest} already exists (pass --overwrite to replace it)")
    if not dest.parent.is_dir():
        raise ConversionError(f"parent directory of the output does not exist: {dest.parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def save_sharded_checkpoint(sharded: dict, out_dir: Path, spec, vocab_size: int,
                            overrides: Optional[dict[str, Any]] = None, iteration: int = 0,
                            special_ids: Optional[dict[str, int]] = None) -> Path:
    """Write a model sharded state dict as Megatron-LM does: tracker + iter_NNNNNNN/ with the
    model under 'model'. The common state also records the model spec (``mdsa_model``),
    Megatron-style args (``mdsa_size``, ``mdsa_model_overrides``, ``padded_vocab_size``) and
    the tokenizer's special ids when known (``mdsa_special_ids``)."""
    from megatron.core import dist_checkpointing

    sub = Path(out_dir) / f"iter_{iteration:07d}"
    sub.mkdir(parents=True)
    state = {
        "model": sharded,
        "iteration": iteration,
        "checkpoint_version": 3.0,
        SPEC_KEY: spec.to_json(),
        "args": argparse.Namespace(
            mdsa_size=spec.name, mdsa_model_overrides=json.dumps(overrides or {}),
            padded_vocab_size=vocab_size,
            # Written by one process as one TP=1 / PP=1 model: Megatron's loader reads these
            # (and warns when they are absent) before it reshards to the run's layout.
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        ),
    }
    if special_ids:
        state[SPECIAL_IDS_KEY] = {k: int(v) for k, v in special_ids.items() if k in SPECIAL_ID_NAMES and v is not None}
    with _quiet():
        dist_checkpointing.save(state, str(sub))
    (Path(out_dir) / TRACKER).write_text(str(iteration))
    return sub


def save_model_checkpoint(model, out_dir: str | os.PathLike[str], spec, iteration: int = 0) -> Path:
    """``save_sharded_checkpoint`` of a built model."""
    vocab = model.embedding.word_embeddings.weight.shape[0]
    return save_sharded_checkpoint(model.sharded_state_dict(), Path(out_dir), spec, vocab, iteration=iteration)
