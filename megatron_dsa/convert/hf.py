"""megatron-dsa checkpoint <-> Hugging Face directory (``DeepseekV32ForCausalLM`` or
``GlmMoeDsaForCausalLM``; bf16/fp32 weights or the releases' FP8 block-scaled ones).

``export_to_hf`` streams: it loads about ``max_shard_size`` of weights from the dist
checkpoint at a time and writes each safetensors shard as soon as it is full, so host memory
stays around two shards, or one checkpoint key when that is larger (a layer's stacked experts
load together, and are held once more while split into the HF tensors). ``import_from_hf`` checks everything
(config, files, names, shapes) before it reads a weight, then converts the weights tensor by
tensor and parks each ``max_shard_size`` batch on disk beside the output
(``checkpoint.DiskBackedTensors``), mapped back for dist_checkpointing's one save call: host
memory stays around one shard, not the model. The save would copy every tensor that is a view
(megatron-core's sharded state dict splits the SwiGLU fc1 weights into views): the import
builds those pieces itself, per tensor, and parks them compact.

Both write into a temporary directory beside the destination and rename it at the end: an
error or an interrupt leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_dsa.convert import checkpoint as C
from megatron_dsa.convert import mapping as M
from megatron_dsa.convert.errors import ConversionError
from megatron_dsa.convert.fp8 import FLOAT8_NAMES, SCALE_SUFFIX, BlockScaling, quantized_in_release, scale_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '1.5GiB' / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ConversionError(f"cannot read the size {text!r} (e.g. 2GB, 500MB)")
    value, unit, b = m.groups()
    base = 1024 if b == "IB" else 1000
    mult = {"": 1, "K": base, "M": base**2, "G": base**3, "T": base**4}[unit]
    size = int(float(value) * mult)
    if size <= 0:
        raise ConversionError(f"size must be positive, got {text!r}")
    return size


class ShardWriter:
    """Collect named tensors into safetensors files of at most ``max_bytes`` (a bigger tensor
    gets a file of its own); ``finish`` names them model-0000i-of-0000n and writes the index."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + n > self.max:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# megatron -> HF
# --------------------------------------------------------------------------------------------


def export_to_hf(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                 size: Optional[str] = None, tokenizer: Optional[str | os.PathLike[str]] = None,
                 max_shard_size: str | int = "2GB", overrides: Optional[dict[str, Any]] = None,
                 overwrite: bool = False, dtype: Optional[str] = None,
                 fp8_block: Optional[tuple[int, int]] = None) -> Path:
    """Write a from_pretrained-able HF directory for a megatron-dsa dist checkpoint.

    ``dtype`` ('bfloat16', 'float32', ...; default: the checkpoint's) is the weights' dtype on
    the HF side (the router stays float32). With ``fp8_block`` (rows, cols) the weights the
    releases quantise are written as e4m3 with block scales (``megatron_dsa.convert.fp8``)
    and config.json gets the release's ``quantization_config``."""
    budget = parse_size(max_shard_size)
    if dtype is not None and dtype not in M.DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(M.DTYPES)}, got {dtype!r}")
    scaling = None
    if fp8_block is not None:
        scaling = BlockScaling.from_hf_config({"quantization_config": {"quant_method": "fp8",
                                                                       "weight_block_size": list(fp8_block)}})
    C.check_output(out, overwrite, source=checkpoint, source_flag="--checkpoint")
    ckpt = C.resolve_checkpoint_dir(checkpoint)
    C.ensure_world()
    spec, ov = C.model_spec_for(ckpt, size, overrides or {})
    config = C.build_config(spec, ov)
    family = M.family_named(spec.family)
    M.check_exportable(config, family)
    indexer_rope = M.indexer_rope_of(config, family)
    metadata = C.tensors_metadata(ckpt)
    vocab = C.vocab_from_metadata(metadata, ckpt)
    entries = C.tensor_entries(C.meta_model(spec, config, vocab))
    dtypes = C.check_against_metadata(entries, metadata, ckpt)
    num_layers, mtp_layers = config.num_layers, config.mtp_num_layers
    for name, _ in entries:
        M.hf_names(name, num_layers)  # every tensor has a name on the HF side
    hf_tok = None
    if tokenizer is not None:
        from megatron_dsa.convert.tokenizer import build_hf_tokenizer, check_same_ids

        hf_tok = build_hf_tokenizer(tokenizer)
        check_same_ids(hf_tok, tokenizer)
        if len(hf_tok) > vocab:
            raise ConversionError(f"the tokenizer has {len(hf_tok)} ids but the model only {vocab} embeddings")
        special = C.tokenizer_special_ids(Path(tokenizer))
    else:
        # Without --tokenizer: the ids the checkpoint records (from-hf) or its training
        # tokenizer's; generation needs at least eos.
        special = C.special_ids_for(ckpt)
    param_dtype = M.DTYPES[dtype] if dtype is not None else dtypes["embedding.word_embeddings.weight"]
    hf_config = M.hf_config_dict(config, family, spec.first_k_dense, vocab, spec.max_seq_len, param_dtype, special)
    if scaling is not None:
        hf_config["quantization_config"] = scaling.to_hf_config()

    with C.staged_output(out, overwrite) as tmp:
        writer = ShardWriter(tmp, budget)
        for name, tensor in C.stream_tensors(entries, ckpt, dtypes, budget):
            for hf_name, t in M.to_hf_tensors(name, tensor, param_dtype, indexer_rope, num_layers, mtp_layers).items():
                if scaling is not None and quantized_in_release(hf_name):
                    t, scale_inv = scaling.quantize(t)
                    writer.add(scale_name(hf_name), scale_inv)
                writer.add(hf_name, t)
            del tensor
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if special:  # without any id the file would say nothing transformers does not default to
            gen = {k: v for k, v in special.items() if k != "pad_token_id"}
            (tmp / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}, indent=2) + "\n")
        if hf_tok is not None:
            hf_tok.save_pretrained(str(tmp))
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    return Path(out)


# --------------------------------------------------------------------------------------------
# HF -> megatron
# --------------------------------------------------------------------------------------------


class HFReader:
    """Names, shapes and dtypes (from headers, no data read) and tensors of an HF safetensors
    directory.

    Experts are read in either layout: per expert (``experts.{j}.gate_proj.weight``, what
    save_pretrained writes) or fused (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``).
    FP8 block-scaled weights (``scaling``: the checkpoint's ``quantization_config``) are
    dequantised to float32 as each is read, so memory holds one weight at a time.
    """

    _EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

    def __init__(self, directory: Path, scaling: Optional[BlockScaling] = None):
        from safetensors import safe_open

        self.dir, self.scaling = directory, scaling
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConversionError(f"corrupt {index}: {error}") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise ConversionError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise ConversionError(f"missing weight files in {directory}: {missing} (listed in {INDEX_FILE})")
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fp8: set[str] = set()
        for f in files:
            try:
                with safe_open(str(directory / f), framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f
                        info = h.get_slice(k)
                        self.shapes[k] = tuple(info.get_shape())
                        if info.get_dtype() in FLOAT8_NAMES:
                            self.fp8.add(k)
            except Exception as error:  # noqa: BLE001 - unreadable file
                raise ConversionError(f"cannot read {directory / f}: {error}") from None
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if self.where.get(k) != f)
            if absent:
                raise ConversionError(f"{len(absent)} tensors listed in {INDEX_FILE} are not in their files, e.g. {absent[:3]}")
        self.used: set[str] = set()

    @classmethod
    def of_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "HFReader":
        """A reader of names and shapes only (e.g. a transformers model built on the meta device)."""
        reader = cls.__new__(cls)
        reader.dir, reader.scaling, reader.where, reader.fp8, reader.used = None, None, {}, set(), set()
        reader.shapes = {k: tuple(v) for k, v in shapes.items()}
        return reader

    def mismatches(self, entries, num_layers: int, mtp_num_layers: Optional[int] = None,
                   skip_from_layer: Optional[int] = None) -> list[str]:
        """Where our model's tensors (``checkpoint.tensor_entries``) and this directory's differ:
        a tensor of ours without its HF tensors or with another shape, an HF tensor that is none
        of ours (FP8 scales aside, and the layers from ``skip_from_layer`` on: MTP layers that
        are not imported). The release's copies of the embedding and output head in each MTP
        layer (``mapping.mtp_shared_copies``) may be absent; present, they need our shape."""
        problems, wanted = [], set()
        for name, entry in entries:
            names, _ = M.hf_names(name, num_layers)
            for copy in M.mtp_shared_copies(name, num_layers, mtp_num_layers):
                wanted.add(copy)
                got = self.shape(copy)
                if got is not None and tuple(got) != tuple(entry.data.shape):
                    problems.append(f"{copy}: shape {tuple(got)}, expected {tuple(entry.data.shape)}")
            for hf_name, shape in zip(names, M.hf_shapes(name, tuple(entry.data.shape), num_layers)):
                wanted.add(self.names_for_check(hf_name))
                got = self.shape(hf_name)
                if got is None:
                    problems.append(f"missing tensor {hf_name}")
                elif tuple(got) != tuple(shape):
                    problems.append(f"{hf_name}: shape {tuple(got)}, expected {tuple(shape)}")
        extra = []
        for k in self.shapes:
            m = re.match(r"model\.layers\.(\d+)\.", k)
            skipped = skip_from_layer is not None and m is not None and int(m.group(1)) >= skip_from_layer
            if (k in wanted or skipped or k.endswith("rotary_emb.inv_freq")
                    or self.is_scale_of_fp8(k)):
                continue
            extra.append(k)
        if extra:
            problems.append(f"{len(extra)} unexpected tensors, e.g. {extra[:3]}")
        return problems

    def fp8_problems(self) -> list[str]:
        """What stops the FP8 weights from being dequantised (checked before any is read)."""
        if not self.fp8:
            return []
        if self.scaling is None:
            return [f"{len(self.fp8)} FP8 weights (e.g. {min(self.fp8)}) but config.json has no quantization_config "
                    "(their block size is unknown)"]
        problems = [self.scaling.check(k, self.shapes[k], self.shapes.get(scale_name(k))) for k in sorted(self.fp8)]
        return [p for p in problems if p]

    def is_scale_of_fp8(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in self.fp8

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        self.used.add(name)
        with safe_open(str(self.dir / self.where[name]), framework="pt") as h:
            return h.get_tensor(name)

    def _fused(self, name: str):
        m = self._EXPERT.match(name)
        if not m:
            return None
        prefix, j, part = m.groups()
        fused = f"{prefix}.gate_up_proj" if part != "down_proj" else f"{prefix}.down_proj"
        return fused, int(j), part

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        if name in self.shapes:
            return self.shapes[name]
        f = self._fused(name)
        if f and f[0] in self.shapes:
            shape = self.shapes[f[0]]
            if f[2] == "down_proj":
                return shape[1:]
            return (shape[1] // 2, *shape[2:])
        return None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name in self.fp8:
            return self.scaling.dequantize(self._read(name), self._read(scale_name(name)))
        if name in self.where:
            return self._read(name)
        fused, j, part = self._fused(name)
        self.used.add(fused)
        with safe_open(str(self.dir / self.where[fused]), framework="pt") as h:
            t = h.get_slice(fused)[j]
        if part == "down_proj":
            return t
        half = t.shape[0] // 2
        return t[:half] if part == "gate_proj" else t[half:]

    def same_values(self, name: str, other: str, block_bytes: int = 64 << 20) -> bool:
        """Whether two stored tensors hold the same values (``other`` read in ``name``'s dtype),
        compared about ``block_bytes`` of rows at a time (an embedding need not fit twice)."""
        from safetensors import safe_open

        if self.shapes[name] != self.shapes[other]:
            return False
        if name in self.fp8 or other in self.fp8:
            return torch.equal(self.get(name), self.get(other))
        rows = self.shapes[name][0] if self.shapes[name] else 1
        row_bytes = 4 * max(1, math.prod(self.shapes[name][1:]))
        step = max(1, block_bytes // row_bytes)
        with safe_open(str(self.dir / self.where[name]), framework="pt") as a, \
                safe_open(str(self.dir / self.where[other]), framework="pt") as b:
            x, y = a.get_slice(name), b.get_slice(other)
            for start in range(0, rows, step):
                first = x[start:start + step]
                if not torch.equal(first, y[start:start + step].to(first.dtype)):
                    return False
        return True

    def names_for_check(self, name: str) -> str:
        f = self._fused(name)
        return f[0] if (name not in self.shapes and f) else name


_SIZE_CHECK_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_moe_experts", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_router_topk", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_topk_scaling_factor", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "rotary_base",
    "mdsa_indexer_types",
)


def _size_differences(a, b) -> list[str]:
    diffs = [f"{f}: {a.transformer.get(f)} vs {b.transformer.get(f)}" for f in _SIZE_CHECK_FIELDS
             if a.transformer.get(f) != b.transformer.get(f)]
    if a.first_k_dense != b.first_k_dense:
        diffs.append(f"first_k_dense: {a.first_k_dense} vs {b.first_k_dense}")
    if a.family != b.family:
        diffs.append(f"family: {a.family} vs {b.family}")
    return diffs


def _json_overrides(spec, named) -> dict[str, Any]:
    out = {}
    for k, v in spec.transformer.items():
        if k in ("params_dtype", "bf16", "transformer_impl") or named.transformer.get(k) == v:
            continue
        if isinstance(v, (int, float, str, bool, list)) or v is None:
            out[k] = v
    return out


def _choose_spec(hf: dict, size: Optional[str], drop_mtp: bool = False):
    from megatron_dsa.model import SIZES, resolve_size

    spec = M.size_from_hf_config(hf, drop_mtp=drop_mtp)
    if size is not None:
        try:
            named = resolve_size(size)
        except ValueError as error:
            raise ConversionError(str(error)) from None
        diffs = _size_differences(spec, named)
        if diffs:
            raise ConversionError(f"the HF model does not have the shape of size {size!r}: " + "; ".join(diffs))
        return dataclasses.replace(spec, name=named.name), _json_overrides(spec, named)
    for named in SIZES.values():
        if not _size_differences(spec, named) and named.vocab_size == spec.vocab_size:
            return dataclasses.replace(spec, name=named.name), _json_overrides(spec, named)
    return spec, {}


def _mtp_problems(reader: HFReader, hf: dict, drop_mtp: bool) -> list[str]:
    """The multi-token-prediction layers config.json names against those the weights hold
    (layers from ``num_hidden_layers`` on). ``drop_mtp`` imports none of them, whatever is there."""
    if drop_mtp:
        return []
    L, n = hf["num_hidden_layers"], M.mtp_layers_of(hf)
    held = sorted({int(m.group(1)) for k in reader.shapes if (m := re.match(r"model\.layers\.(\d+)\.", k))
                   and int(m.group(1)) >= L})
    if n and not held:
        return [f"config.json names {n} multi-token-prediction layer(s) (num_nextn_predict_layers) but the "
                f"weights hold no model.layers.{L}.* (transformers' save_pretrained drops them): pass "
                "--drop-mtp to import the model without them"]
    if held and held != list(range(L, L + n)):
        return [f"the weights hold layers {held} after the {L} decoder layers but config.json names "
                f"num_nextn_predict_layers={n}: fix config.json, or pass --drop-mtp to import without them"]
    return []


def _mtp_copy_problems(reader: HFReader, entries, num_layers: int, mtp_num_layers: Optional[int]) -> list[str]:
    """The release's copies of the embedding and output head in its MTP layers must equal the
    model's: megatron-core's MTP block uses the model's own (read and compared before any
    conversion)."""
    problems = []
    for name, _ in entries:
        copies = [c for c in M.mtp_shared_copies(name, num_layers, mtp_num_layers) if reader.shape(c) is not None]
        if not copies:
            continue
        main_name = M.hf_names(name, num_layers)[0][0]
        for copy in copies:
            if not reader.same_values(main_name, copy):
                problems.append(f"{copy} differs from {main_name} (megatron-core's MTP layer shares it with "
                                "the model): pass --drop-mtp to import without the MTP layer")
    return problems


def import_from_hf(hf_dir: str | os.PathLike[str], out: str | os.PathLike[str], size: Optional[str] = None,
                   overwrite: bool = False, max_shard_size: str | int = "2GB", drop_mtp: bool = False) -> Path:
    """Write a megatron-dsa dist checkpoint (Megatron-LM layout, iteration 0) from an HF directory;
    about ``max_shard_size`` of converted weights is held in memory at a time.

    The multi-token-prediction layers that config.json names (``num_nextn_predict_layers``:
    the releases' layer ``num_hidden_layers``) become megatron-core's MTP block; a config that
    names them without their weights, or weights without the config, stop with one error.
    ``drop_mtp`` imports the model without them (e.g. a checkpoint re-saved by transformers,
    which drops them but keeps the config key)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    budget = parse_size(max_shard_size)
    C.check_output(out, overwrite, source=hf_dir, source_flag="--hf")
    src = Path(hf_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{src} has no config.json: not a Hugging Face model directory")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"corrupt {cfg_path}: {error}") from None
    family = M.check_hf_config(hf)
    reader = HFReader(src, BlockScaling.from_hf_config(hf))
    spec, overrides = _choose_spec(hf, size, drop_mtp)
    C.ensure_world()
    config = C.build_config(spec, {})
    indexer_rope = M.indexer_rope_of(config, family)
    model = C.meta_model(spec, config, hf["vocab_size"])
    sharded = model.sharded_state_dict()
    entries = C.tensor_entries(model)

    # Every check before any weight is converted.
    num_layers, mtp_layers = config.num_layers, config.mtp_num_layers
    problems = _mtp_problems(reader, hf, drop_mtp)
    if not problems:
        problems = reader.mismatches(entries, num_layers, mtp_layers, skip_from_layer=num_layers + (mtp_layers or 0))
        problems += reader.fp8_problems()
    if not problems:
        problems = _mtp_copy_problems(reader, entries, num_layers, mtp_layers)
    if problems:
        head = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ConversionError(f"{src} does not match its config.json: {head}")

    with C.staged_output(out, overwrite) as tmp:
        parked = C.DiskBackedTensors(tmp / "converting", budget)
        pieces: list[ShardedTensor] = []

        def park(x):
            if isinstance(x, ShardedTensor):
                parked.add(str(len(pieces)), x.data)
                pieces.append(x)
                x.data = None  # the parked copy replaces it below
            return x

        try:
            for name, entry in entries:
                names, _ = M.hf_names(name, num_layers)
                item = {name: dataclasses.replace(entry, data=M.from_hf_tensors(
                    name, [reader.get(n) for n in names], entry.data.dtype, indexer_rope, num_layers))}
                apply_factories(item)  # what the save would do, one tensor at a time
                dict_list_map_inplace(park, item)
                sharded[name] = item[name]
            weights = parked.load()
            for i, piece in enumerate(pieces):
                piece.data = weights.pop(str(i))
            special = {k: hf[k] for k in C.SPECIAL_ID_NAMES if isinstance(hf.get(k), int)}
            C.save_sharded_checkpoint(sharded, tmp, spec, hf["vocab_size"], overrides, special_ids=special)
        finally:
            pieces = weights = None
            parked.close()
        if (src / "tokenizer.model").is_file():
            shutil.copyfile(src / "tokenizer.model", tmp / "tokenizer.model")
    return Path(out)
