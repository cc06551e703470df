"""Training run configuration: one YAML file per phase and size, ``key=value`` overrides.

A run config is loaded and validated ONCE (``load_config``), before any compute: unknown keys,
wrong types and bad values raise one ``TrainConfigError`` whose message names the key and
lists the valid ones. Everything downstream reads the resulting ``RunConfig``.

Layout (every key optional except ``phase``; defaults below)::

    phase: pretrain | warmup | sparse
    model:       size, transformer_impl (auto | local | transformer_engine),
                 overrides (DSATransformerConfig fields, e.g. dsa_indexer_topk, or
                 mtp_num_layers / mtp_loss_scaling_factor for the multi-token-prediction loss)
    data:        dir (a corpus built by ``python -m megatron_dsa.data build``), seq_length,
                 corpus (text | tasks: the task mixture of ``build-tasks``, built for seq_length),
                 packed (documents as packed sequences, megatron-core's THD),
                 answer_loss_weight (tasks only: the loss weight of the answer tokens; the
                 logged LM loss is then the weighted mean)
    train:       iters, micro_batch_size, global_batch_size, lr, min_lr, lr_warmup_iters,
                 lr_decay_style, weight_decay, clip_grad, adam_beta1, adam_beta2, seed,
                 skip_iterations (batches a resumed run steps over)
    eval:        interval, iters (0: no validation)
    checkpoint:  save (this phase's torch_dist checkpoints), load_from (previous phase's, or one
                 ``python -m megatron_dsa.convert from-hf`` wrote), interval
    logging:     interval, tensorboard_dir, progress, metrics_file
    fp8:         format (e4m3 | hybrid; null = off), recipe, amax_history_len, amax_compute_algo,
                 first_last_layers_bf16, num_layers_at_start_in_bf16, num_layers_at_end_in_bf16,
                 param_gather (Transformer Engine's FP8 for the linears, see FP8_SETTINGS)
    megatron:    extra Megatron-LM flags, e.g. {use-distributed-optimizer: true}

Overrides: ``train.iters=50``, ``model.overrides.dsa_indexer_topk=8``, ``megatron.bf16=true``,
``fp8.format=hybrid``.
Values are parsed as YAML scalars (``1e-3`` -> float, ``true`` -> bool, ``null`` -> None).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_dsa.backends import TRANSFORMER_IMPLS
from megatron_dsa.model import SIZES

PHASES = ("pretrain", "warmup", "sparse")
# The model mode of each phase and the phase whose checkpoint it starts from.
PHASE_MODE = {"pretrain": "dense", "warmup": "warmup", "sparse": "sparse"}
PREVIOUS_PHASE = {"pretrain": None, "warmup": "pretrain", "sparse": "warmup"}
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


class TrainConfigError(ValueError):
    """A bad run configuration or bad run input; one clear message, raised before any compute."""


_NOTSET = object()

# key -> (default, allowed python types). None default = optional.
SCHEMA: dict[str, dict[str, tuple[Any, tuple[type, ...]]]] = {
    "model": {
        "size": ("tiny", (str,)),
        # auto: Transformer Engine where it is installed and CUDA is up, local elsewhere.
        "transformer_impl": ("auto", (str,)),
        "overrides": ({}, (dict,)),
    },
    "data": {
        "dir": (None, (str,)),
        "seq_length": (128, (int,)),
        "corpus": ("text", (str,)),
        # Documents (EOD-delimited) as packed sequences: attention, RoPE and the indexer stay
        # inside each document, and the loss skips the EOD -> next-document predictions.
        "packed": (False, (bool,)),
        # The loss weight of a task mixture's answer tokens (1: the plain LM loss).
        "answer_loss_weight": (1.0, (float, int)),
    },
    "train": {
        "iters": (100, (int,)),
        "micro_batch_size": (4, (int,)),
        "global_batch_size": (None, (int,)),
        "lr": (None, (float, int)),
        "min_lr": (None, (float, int)),
        "lr_warmup_iters": (0, (int,)),
        "lr_decay_style": ("cosine", (str,)),
        "weight_decay": (0.1, (float, int)),
        "clip_grad": (1.0, (float, int)),
        "adam_beta1": (0.9, (float, int)),
        "adam_beta2": (0.95, (float, int)),
        "seed": (1234, (int,)),
        # Iterations (1-based, as Megatron logs them) whose batch is consumed without a step,
        # e.g. the one a run stopped at with non-finite values.
        "skip_iterations": ([], (list, int)),
    },
    "eval": {
        "interval": (None, (int,)),
        "iters": (4, (int,)),
    },
    "checkpoint": {
        "save": (None, (str,)),
        "load_from": (None, (str,)),
        "interval": (None, (int,)),
    },
    "logging": {
        "interval": (10, (int,)),
        "tensorboard_dir": (None, (str,)),
        "progress": (True, (bool,)),
        # JSON lines of per-iteration tokens/s, TFLOP/s and peak memory (the last rank's).
        "metrics_file": (None, (str,)),
    },
    # All None = FP8 off. With a format, unset keys take Megatron's defaults (FP8_DEFAULTS).
    "fp8": {
        "format": (None, (str,)),
        "recipe": (None, (str,)),
        "amax_history_len": (None, (int,)),
        "amax_compute_algo": (None, (str,)),
        "first_last_layers_bf16": (None, (bool,)),
        "num_layers_at_start_in_bf16": (None, (int,)),
        "num_layers_at_end_in_bf16": (None, (int,)),
        "param_gather": (None, (bool,)),
    },
    "megatron": {},  # free-form: Megatron-LM flags, checked by Megatron's own parser
}
TOP_LEVEL = ("phase", *SCHEMA)

FP8_FORMATS = ("e4m3", "hybrid")
# Megatron's --fp8-recipe choices but 'custom' (it needs a quantizer factory, not wired here).
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_AMAX_ALGOS = ("most_recent", "max")
# Megatron-core 0.19.2's own defaults for the keys left unset.
FP8_DEFAULTS = {
    "recipe": "delayed", "amax_history_len": 1, "amax_compute_algo": "most_recent",
    "first_last_layers_bf16": False, "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1,
    "param_gather": False,
}
# fp8 key -> (Megatron flag, TransformerConfig field). The trainer passes each to Megatron's
# flags AND to our model config, so neither megatron.<flag> nor model.overrides.<field> may set it.
FP8_SETTINGS = {
    "format": ("fp8-format", "fp8"),
    "recipe": ("fp8-recipe", "fp8_recipe"),
    "amax_history_len": ("fp8-amax-history-len", "fp8_amax_history_len"),
    "amax_compute_algo": ("fp8-amax-compute-algo", "fp8_amax_compute_algo"),
    "first_last_layers_bf16": ("first-last-layers-bf16", "first_last_layers_bf16"),
    "num_layers_at_start_in_bf16": ("num-layers-at-start-in-bf16", "num_layers_at_start_in_bf16"),
    "num_layers_at_end_in_bf16": ("num-layers-at-end-in-bf16", "num_layers_at_end_in_bf16"),
    "param_gather": ("fp8-param-gather", "fp8_param"),
}
# Set by the trainer (Megatron flag -> config key that sets it). The MTP flags follow the
# model's mtp_num_layers / mtp_loss_scaling_factor (its size or model.overrides).
TRAINER_FLAGS = {"transformer-impl": "model.transformer_impl",
                 "mtp-num-layers": "model.overrides.mtp_num_layers",
                 "mtp-loss-scaling-factor": "model.overrides.mtp_loss_scaling_factor",
                 **{flag: f"fp8.{key}" for key, (flag, _) in FP8_SETTINGS.items()}}
# Model config fields with one source elsewhere (field -> config key that sets it).
TRAINER_FIELDS = {"transformer_impl": "model.transformer_impl",
                  **{field: f"fp8.{key}" for key, (_, field) in FP8_SETTINGS.items()}}
# Model config fields the trainer copies from Megatron's parsed flags (parallel layout and
# precision): Megatron builds its process groups, optimizer and schedule from the same flags,
# so a different value on the model config alone would disagree with them at run time.
MEGATRON_FIELDS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel",
    "bf16", "fp16", "params_dtype", "gradient_accumulation_fusion", "calculate_per_token_loss",
    "virtual_pipeline_model_parallel_size", "recompute_granularity", "recompute_method",
    "recompute_num_layers", "deterministic_mode", "fp8_margin", "fp8_wgrad",
)

# Reference learning rates of the DeepSeek-V3.2-Exp report's training phases for the indexer
# phases; pretraining of the tiny CPU model uses a larger one.
DEFAULT_LR = {"pretrain": 3e-3, "warmup": 1e-3, "sparse": 7.3e-6}


@dataclass
class RunConfig:
    """A validated run config. ``raw`` keeps the nested dict (written next to checkpoints)."""

    phase: str
    model: dict
    data: dict
    train: dict
    eval: dict
    checkpoint: dict
    logging: dict
    fp8: dict
    megatron: dict
    source: str | None = None

    @property
    def mode(self) -> str:
        return PHASE_MODE[self.phase]

    def as_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in TOP_LEVEL}


def _err(msg: str) -> TrainConfigError:
    return TrainConfigError(msg)


def _yaml_reason(error: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's own message spans several lines)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["train.iters=5", "model.overrides.dsa_indexer_topk=8"]`` -> [(path, value)]."""
    parsed = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise _err(f"bad override {item!r}: expected key=value with a dotted key, e.g. train.iters=50")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise _err(f"bad value in override {item!r}: {_yaml_reason(error)}") from None
        parsed.append((key.split("."), value))
    return parsed


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise _err(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _check_type(key: str, value: Any, types: tuple[type, ...]) -> Any:
    if value is None:
        return None
    if float in types and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any float literal.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and bool not in types:
        raise _err(f"{key} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise _err(f"{key} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")
    if float in types and isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value):
            raise _err(f"{key} must be finite, got {value!r}")
    return value


def validate_tree(tree: Any, source: str | None = None) -> RunConfig:
    """Check keys, types and values of a nested config dict; return the RunConfig."""
    where = f" in {source}" if source else ""
    if not isinstance(tree, dict):
        raise _err(f"config{where} must be a mapping of sections, got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(TOP_LEVEL))
    if unknown:
        raise _err(f"unknown config key(s) {unknown}{where}; valid top-level keys: {list(TOP_LEVEL)}")
    phase = tree.get("phase")
    if phase not in PHASES:
        raise _err(f"phase must be one of {list(PHASES)}, got {phase!r}{where}")

    sections: dict[str, dict] = {}
    for name, fields in SCHEMA.items():
        given = tree.get(name) or {}
        if not isinstance(given, dict):
            raise _err(f"section {name!r}{where} must be a mapping, got {given!r}")
        if name == "megatron":
            sections[name] = _check_megatron(given)
            continue
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise _err(
                f"unknown key(s) {[f'{name}.{k}' for k in unknown]}{where}; "
                f"valid keys of {name!r}: {sorted(fields)}"
            )
        section = {}
        for key, (default, types) in fields.items():
            value = given.get(key, copy.deepcopy(default))
            section[key] = _check_type(f"{name}.{key}", value, types)
        sections[name] = section

    cfg = RunConfig(phase=phase, source=source, **sections)
    _check_values(cfg)
    return cfg


def _check_megatron(flags: dict) -> dict:
    out = {}
    for key, value in flags.items():
        flag = str(key).replace("_", "-")
        if flag.startswith("mdsa-"):
            raise _err(f"megatron.{key}: --mdsa-* flags are set by the trainer, not by hand")
        if flag in TRAINER_FLAGS:
            raise _err(f"megatron.{key}: set {TRAINER_FLAGS[flag]} instead (the trainer passes it to "
                       "Megatron and to the model config alike)")
        if isinstance(value, (dict, list)) and not (isinstance(value, list) and all(
            isinstance(v, (int, float, str)) for v in value
        )):
            raise _err(f"megatron.{key} must be a scalar or a list of scalars, got {value!r}")
        out[flag] = value
    return out


def _positive(cfg: RunConfig, section: str, key: str, allow_none: bool = False) -> None:
    value = getattr(cfg, section)[key]
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise _err(f"{section}.{key} must be > 0, got {value!r}")


def _check_values(cfg: RunConfig) -> None:
    if cfg.model["size"] not in SIZES:
        raise _err(f"model.size must be one of {sorted(SIZES)}, got {cfg.model['size']!r}")
    if cfg.model["transformer_impl"] not in TRANSFORMER_IMPLS:
        raise _err(f"model.transformer_impl must be one of {list(TRANSFORMER_IMPLS)}, "
                   f"got {cfg.model['transformer_impl']!r}")
    if cfg.data["dir"] is None:
        raise _err("data.dir is required: a corpus built by `python -m megatron_dsa.data build`")
    from megatron_dsa.data.mixture import CORPUS_KINDS

    if cfg.data["corpus"] not in CORPUS_KINDS:
        raise _err(f"data.corpus must be one of {list(CORPUS_KINDS)}, got {cfg.data['corpus']!r}")
    from megatron_dsa.data.corpus import answer_weight_problem

    problem = answer_weight_problem(cfg.data["answer_loss_weight"], cfg.data["corpus"])
    if problem:
        raise _err(f"data.{problem}")
    if cfg.checkpoint["save"] is None:
        raise _err("checkpoint.save is required: the directory of this phase's checkpoints")
    for section, key, allow_none in (
        ("data", "seq_length", False), ("train", "iters", False),
        ("train", "micro_batch_size", False), ("train", "global_batch_size", True),
        ("train", "lr", True), ("eval", "interval", True),
        ("checkpoint", "interval", True), ("logging", "interval", False),
    ):
        _positive(cfg, section, key, allow_none)
    if cfg.eval["iters"] is None or cfg.eval["iters"] < 0:
        raise _err(f"eval.iters must be >= 0 (0: no validation), got {cfg.eval['iters']!r}")
    t = cfg.train
    if t["lr"] is None:
        t["lr"] = DEFAULT_LR[cfg.phase]
    if t["min_lr"] is None:
        t["min_lr"] = t["lr"] / 10
    if not 0 <= t["min_lr"] <= t["lr"]:
        raise _err(f"train.min_lr must be in [0, train.lr], got {t['min_lr']}")
    if t["global_batch_size"] is None:
        t["global_batch_size"] = t["micro_batch_size"]
    if t["lr_warmup_iters"] < 0 or t["lr_warmup_iters"] >= t["iters"]:
        raise _err(f"train.lr_warmup_iters must be in [0, train.iters), got {t['lr_warmup_iters']}")
    if t["lr_decay_style"] not in LR_DECAY_STYLES:
        raise _err(f"train.lr_decay_style must be one of {list(LR_DECAY_STYLES)}, got {t['lr_decay_style']!r}")
    for key in ("weight_decay", "clip_grad"):
        if t[key] < 0:
            raise _err(f"train.{key} must be >= 0, got {t[key]}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= t[key] < 1:
            raise _err(f"train.{key} must be in [0, 1), got {t[key]}")
    skip = t["skip_iterations"]
    skip = [skip] if isinstance(skip, int) and not isinstance(skip, bool) else list(skip)
    if any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= t["iters"] for i in skip):
        raise _err(f"train.skip_iterations must be a list of iterations in [1, train.iters={t['iters']}], "
                   f"got {t['skip_iterations']!r}")
    t["skip_iterations"] = sorted(set(skip))
    if cfg.eval["interval"] is None:
        cfg.eval["interval"] = t["iters"]
    if cfg.checkpoint["interval"] is None:
        cfg.checkpoint["interval"] = t["iters"]
    if not isinstance(cfg.model["overrides"], dict):
        raise _err("model.overrides must be a mapping of DSATransformerConfig fields")
    mode = cfg.model["overrides"].get("mdsa_mode")
    if mode is not None and mode != cfg.mode:
        raise _err(f"model.overrides.mdsa_mode is set by the phase ({cfg.phase} -> {cfg.mode}); got {mode!r}")
    for name in cfg.model["overrides"]:
        if name in TRAINER_FIELDS:
            raise _err(f"model.overrides.{name}: set {TRAINER_FIELDS[name]} instead")
        if name in MEGATRON_FIELDS:
            flag = "megatron.bf16 or megatron.fp16" if name == "params_dtype" else f"megatron.{name}"
            raise _err(f"model.overrides.{name} comes from Megatron's flags (its process groups and "
                       f"optimizer use the same value): set {flag} instead")
        if name in ("fp8_dot_product_attention", "fp8_multi_head_attention"):
            raise _err(f"model.overrides.{name} is not supported: the DSA core attention runs its own "
                       "kernels on high-precision inputs (FP8 applies to the linears only)")
    _check_override_types(cfg)
    _check_fp8(cfg)


def _check_override_types(cfg: RunConfig) -> None:
    """model.overrides values of the type their config field declares (an integer stays an
    integer: 2.5 is refused, not truncated when the layer reads it)."""
    from megatron_dsa.config import DSAConfigError, check_field_types

    try:
        cfg.model["overrides"] = check_field_types(cfg.model["overrides"])
    except DSAConfigError as error:
        raise _err(f"model.overrides.{error}") from None


def _check_fp8(cfg: RunConfig) -> None:
    """Valid FP8 settings (environment checks, TE and CUDA, are preflight's); fills defaults."""
    f = cfg.fp8
    explicit = {k for k, v in f.items() if v is not None and k != "format"}
    if f["format"] is None:
        stray = sorted(k for k in explicit if f[k] is not False)
        if stray:
            raise _err(f"fp8.{stray[0]} is set but fp8.format is null (FP8 off); "
                       f"set fp8.format to one of {list(FP8_FORMATS)}")
        return
    choices = (("format", FP8_FORMATS), ("recipe", FP8_RECIPES), ("amax_compute_algo", FP8_AMAX_ALGOS))
    for key, valid in choices:
        if f[key] is not None and f[key] not in valid:
            raise _err(f"fp8.{key} must be one of {list(valid)}, got {f[key]!r}")
    for key, value in FP8_DEFAULTS.items():
        if f[key] is None:
            f[key] = value
    amax = sorted(explicit & {"amax_history_len", "amax_compute_algo"})
    if amax and f["recipe"] != "delayed":
        raise _err(f"fp8.{amax[0]} applies to fp8.recipe 'delayed' only (got recipe {f['recipe']!r})")
    if f["amax_history_len"] < 1:
        raise _err(f"fp8.amax_history_len must be >= 1, got {f['amax_history_len']}")
    for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        if key in explicit and not f["first_last_layers_bf16"]:
            raise _err(f"fp8.{key} needs fp8.first_last_layers_bf16: true")
        if f[key] < 0:
            raise _err(f"fp8.{key} must be >= 0, got {f[key]}")
    if f["first_last_layers_bf16"] and f["recipe"] == "delayed":
        # megatron-core refuses this pair when it builds the config; say so in our terms.
        raise _err("fp8.first_last_layers_bf16 does not work with fp8.recipe 'delayed'; "
                   f"choose one of {[r for r in FP8_RECIPES if r != 'delayed']}")
    sharded = ("use-distributed-optimizer", "use-torch-fsdp2", "use-megatron-fsdp")
    if f["param_gather"] and not any(cfg.megatron.get(flag) for flag in sharded):
        raise _err("fp8.param_gather needs a sharded optimizer: megatron.use_distributed_optimizer: true "
                   "(or use_torch_fsdp2 / use_megatron_fsdp)")


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, validate everything once."""
    tree: Any = {}
    source = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise _err(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text())
        except yaml.YAMLError as error:
            raise _err(f"config file {p} is not valid YAML: {_yaml_reason(error)}") from None
        if tree is None:
            raise _err(f"config file {p} is empty")
        if not isinstance(tree, dict):
            raise _err(f"config file {p} must be a mapping of sections, got {type(tree).__name__}")
    for keys, value in parse_overrides(overrides or []):
        if keys[0] not in TOP_LEVEL:
            raise _err(f"unknown config key {'.'.join(keys)!r} (override); valid top-level keys: {list(TOP_LEVEL)}")
        _apply_override(tree, keys, value)
    return validate_tree(tree, source)
