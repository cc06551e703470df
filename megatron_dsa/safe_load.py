"""Opening torch_dist checkpoints without running code from them: one allow-list, one loader.

A megatron-core torch_dist checkpoint directory holds ``metadata.json`` (JSON), ``.metadata``
(a pickle: torch.distributed.checkpoint's ``Metadata``, read by ``FileSystemReader`` with plain
``pickle.load``), ``*.distcp`` files (raw tensor bytes, plus objects saved with ``torch.save``:
the common state with Megatron's args, RNG state, the rerun state, and Transformer Engine's
extra state, read by torch's ``DefaultLoadPlanner.load_bytes`` with ``weights_only=False``)
and, in old checkpoints, ``common.pt``. Unpickling runs whatever the file names: a crafted
``.metadata`` or stored object executes code when the checkpoint is opened.

``install()`` (called by every path here that opens a checkpoint: the converters,
``load_model``, ``generate``, the trainer's resume and ``load_from``) routes those reads
through one allow-list:

- ``.metadata``: a restricted unpickler that constructs only the classes torch's checkpoint
  metadata consists of (``METADATA_GLOBALS``) and refuses any other global with one
  ``UntrustedCheckpointError``;
- stored objects and ``common.pt``: ``torch.load(weights_only=True)`` (tensors, containers,
  primitives) admitting ``OBJECT_GLOBALS`` too: megatron-core's own list
  (``megatron.core.safe_globals.SAFE_GLOBALS``: argparse.Namespace, its enums, numpy RNG
  state, ...), which is what a Megatron-LM training checkpoint holds.

``verify(directory)`` checks a checkpoint before anything is loaded: ``.metadata`` readable
through the allow-list, every storage file it names present, inside the directory and long
enough for the bytes it points to (a truncated ``.distcp`` or ``.metadata`` is found here,
not as a traceback in the middle of a load).

What this does not cover: tensor bytes are not checksummed (a flipped bit loads as a
different weight), and a checkpoint can still hold any values its shapes allow. Other formats
(Megatron's legacy ``torch`` format, ``.pt`` files given to ``torch.load`` elsewhere) are not
opened by this project.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from pathlib import Path
from typing import Any

METADATA_FILE = ".metadata"


class CheckpointError(ValueError):
    """A checkpoint that cannot be opened (missing, truncated, corrupt, or refused)."""


class UntrustedCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint file names a class or function outside the allow-list."""


# (module, name) of every global the pickled Metadata of torch.distributed.checkpoint holds
# (torch 2.x; names from pickling a megatron-core save), plus torch dtypes (checked by type).
METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id when the save was given a Path
    ("pathlib", "PurePosixPath"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.distributed.checkpoint.planner", "BytesIOWriteData"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
})


def object_globals() -> list:
    """Classes a stored object may hold beyond weights_only's tensors and primitives:
    megatron-core's list for its own checkpoints (the one it registers with torch)."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    return list(SAFE_GLOBALS)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            if isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise UntrustedCheckpointError(
            f"names {module}.{name}, which torch_dist checkpoint metadata never holds "
            "(refused: unpickling it could run code)"
        )


def load_metadata(stream) -> Any:
    """Unpickle a ``.metadata`` stream through the allow-list."""
    return _MetadataUnpickler(stream).load()


class _RestrictedPickle:
    """Stands in for the ``pickle`` module inside torch.distributed.checkpoint.filesystem:
    ``load`` is the restricted one (FileSystemReader.read_metadata calls ``pickle.load``); the
    rest (``dump``, used by the writer) is pickle's."""

    load = staticmethod(load_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


def safe_torch_load(source) -> Any:
    """``torch.load`` of an object file or stream: weights_only plus ``object_globals()``."""
    import re

    import torch

    try:
        with torch.serialization.safe_globals(object_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a paragraph of advice on how to turn the check off.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"names {found.group(1)}" if found else f"holds something weights_only refuses ({str(error).splitlines()[0]})"
        raise UntrustedCheckpointError(f"a stored object {what}, outside the allow-list of "
                                       "megatron_dsa.safe_load (refused: unpickling it could run code)") from None


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """torch's DefaultLoadPlanner.load_bytes, with the weights_only load instead of
    ``torch.load(value, weights_only=False)``."""
    obj = safe_torch_load(value)
    if self.flatten_state_dict:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def _load_common(checkpoint_dir: str):
    """megatron-core's legacy ``common.pt`` reader, through the allow-list."""
    from megatron.core.dist_checkpointing.mapping import CheckpointingException

    path = os.path.join(checkpoint_dir, "common.pt")
    try:
        return safe_torch_load(path)
    except FileNotFoundError as error:
        raise CheckpointingException(f"Common file {path} does not exist") from error


_LOCK = threading.Lock()
_INSTALLED = False


def install() -> None:
    """Route every checkpoint read of this process through the allow-list (idempotent)."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from megatron.core.dist_checkpointing import serialization
        from torch.distributed.checkpoint import default_planner, filesystem

        if getattr(filesystem, "pickle", None) is not pickle:
            raise RuntimeError("torch.distributed.checkpoint.filesystem no longer reads .metadata with "
                               "pickle; megatron_dsa.safe_load must be updated for this torch version")
        filesystem.pickle = _RestrictedPickle()
        default_planner.DefaultLoadPlanner.load_bytes = _load_bytes
        serialization.load_common = _load_common
        _INSTALLED = True


def describe(error: BaseException) -> str:
    """One line for an exception raised while loading: torch's CheckpointException (a
    BaseException whose text is a traceback per rank) is reduced to its first rank's error."""
    from torch.distributed.checkpoint.api import CheckpointException

    while isinstance(error, CheckpointException) and error.failures:
        inner = next(iter(error.failures.values()))
        error = inner[0] if isinstance(inner, tuple) else getattr(inner, "exception", inner)
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, CheckpointError) else f"{type(error).__name__}: {text}"


def verify(directory: str | os.PathLike[str]) -> Any:
    """Check a torch_dist checkpoint directory before loading it; returns its Metadata.

    One CheckpointError naming the file otherwise: ``.metadata`` missing, truncated, corrupt or
    naming a class outside the allow-list; a storage file missing, outside the directory or
    shorter than the bytes the metadata places in it."""
    ckpt = Path(directory)
    meta_path = ckpt / METADATA_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {METADATA_FILE} (an interrupted or partial save?)")
    try:
        with open(meta_path, "rb") as f:
            metadata = load_metadata(f)
    except UntrustedCheckpointError as error:
        raise UntrustedCheckpointError(f"refusing to open checkpoint {ckpt}: {meta_path.name} {error}") from None
    except Exception as error:  # noqa: BLE001 - any unreadable pickle: truncated, garbage
        reason = "it is truncated" if isinstance(error, EOFError) else f"{type(error).__name__}: {error}"
        raise CheckpointError(f"checkpoint file {meta_path} is corrupt ({reason})") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(getattr(metadata, "state_dict_metadata", None), dict) or not isinstance(storage, dict):
        raise CheckpointError(f"checkpoint file {meta_path} is corrupt (not torch_dist checkpoint metadata)")
    needed: dict[str, int] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(rel, str) or not isinstance(offset, int) or not isinstance(length, int):
            raise CheckpointError(f"checkpoint file {meta_path} is corrupt (bad storage entry {info!r})")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise UntrustedCheckpointError(f"refusing to open checkpoint {ckpt}: {meta_path.name} points "
                                           f"outside the checkpoint directory ({rel!r})")
        needed[rel] = max(needed.get(rel, 0), offset + length)
    for rel, end in sorted(needed.items()):
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (named by {meta_path.name})")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(f"checkpoint file {path} is truncated: {size} bytes, its entries "
                                  f"in {meta_path.name} reach byte {end}")
    return metadata
