"""Every check that can fail on bad input, run before any compute and before anything is written.

``preflight(cfg)`` validates the transformer implementation and FP8 settings against this
machine (Transformer Engine installed, CUDA, the GPU generation), the model config, the corpus
(manifest, tokenizer, indexed datasets, vocabulary against the model), the checkpoint
directories (this phase's and the previous phase's: phase, shape, vocabulary; or, for a
checkpoint ``from-hf`` imported, the model it records) and Megatron's own flags. It returns the ``plan`` the trainer runs (with the resolved ``transformer_impl``); every
failure is one ``TrainConfigError`` (or the data package's ``DataError`` / the config's
``DSAConfigError``), each a ``ValueError`` with one clear message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_dsa.train.config import PREVIOUS_PHASE, RunConfig, TrainConfigError

RUN_FILE = "mdsa_run.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
VOCAB_MULTIPLE = 128  # Megatron's default --make-vocab-size-divisible-by


def _err(msg: str) -> TrainConfigError:
    return TrainConfigError(msg)


def model_fingerprint(cfg: RunConfig, model_cfg, vocab_size: int, tokenizer_sha: str) -> dict:
    from megatron_dsa.model import parameter_shape, resolve_size

    shape = parameter_shape(model_cfg, resolve_size(cfg.model["size"]).first_k_dense)
    return {"size": cfg.model["size"], "shape": shape, "vocab_size": vocab_size,
            "tokenizer_sha256": tokenizer_sha}


def read_run_file(directory: str | os.PathLike[str]) -> dict | None:
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _err(f"corrupt run record {path}: {error}") from None


def has_checkpoint(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / TRACKER_FILE).is_file()


def _checkpoint_iteration(directory: Path) -> int:
    tracker = directory / TRACKER_FILE
    text = tracker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise _err(f"checkpoint tracker {tracker} is corrupt (content {text!r})") from None
    ckpt = directory / f"iter_{iteration:07d}"
    if not (ckpt / "metadata.json").is_file():
        raise _err(f"checkpoint {ckpt} named by {tracker} is missing or incomplete")
    from megatron_dsa import safe_load

    try:
        safe_load.verify(ckpt)  # readable through the allow-list, no storage file truncated
    except safe_load.CheckpointError as error:
        raise _err(f"{error} (named by {tracker})") from None
    return iteration


def _compare(kind: str, directory: Path, record: dict, expected: dict) -> None:
    for key in ("size", "vocab_size", "tokenizer_sha256"):
        if record.get(key) != expected[key]:
            what = "tokenizer" if key == "tokenizer_sha256" else key
            raise _err(
                f"{kind} {directory} was written for {what} {record.get(key)!r}, this run has "
                f"{expected[key]!r}"
            )
    theirs, ours = record.get("shape", {}), expected["shape"]
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}" for k in diff)
        raise _err(f"{kind} {directory} holds a model of another shape ({detail})")


# Model config fields that are a run's own choice (module backend, precision, dropout, the MoE
# balancer's and the indexer's training settings, the DSA kernels); every other field an imported
# model records, or a run sets, defines the function the weights compute and must agree.
RUN_CHOSEN_FIELDS = frozenset({
    "transformer_impl", "activation_func", "bf16", "params_dtype", "hidden_dropout", "attention_dropout",
    "moe_router_bias_update_rate", "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_router_dtype",
    "moe_token_dispatcher_type", "moe_grouped_gemm", "moe_shared_expert_overlap",
    "mdsa_mode", "mdsa_kernel", "mdsa_kernel_options", "mdsa_fp8_indexer", "mdsa_indexer_objective",
    "mdsa_indexer_dtype", "mdsa_recall_rows", "dsa_indexer_loss_coeff", "dsa_indexer_use_sparse_loss",
})


def _check_imported(src: Path, cfg: RunConfig, model_cfg, size, tokenizer) -> None:
    """A checkpoint ``python -m megatron_dsa.convert from-hf`` wrote (weights only, no run
    record) starts the warm-up or the sparse phase when it holds the run's model: every field
    it records, every shape field and every field the run's model.overrides set, but the run's
    own choices (``RUN_CHOSEN_FIELDS``); first_k_dense, the vocabulary, and the tokenizer where
    the import kept one."""
    from megatron_dsa.convert.checkpoint import imported_model
    from megatron_dsa.convert.errors import ConversionError
    from megatron_dsa.model import SHAPE_FIELDS, model_config

    try:
        imported = imported_model(src)
    except ConversionError as error:
        raise _err(f"checkpoint.load_from: {error}") from None
    if imported is None:
        raise _err(f"checkpoint.load_from {src} is neither a megatron-dsa run ({RUN_FILE} missing) nor a "
                   "checkpoint converted by `python -m megatron_dsa.convert from-hf`")
    spec, vocab = imported
    what = f"checkpoint.load_from {src} (imported from Hugging Face)"
    try:
        theirs = model_config(spec, mdsa_mode=model_cfg.mdsa_mode)
    except (ValueError, TypeError, AssertionError) as error:
        raise _err(f"{what} records a model this version cannot build: {error}") from None
    fields = sorted((set(spec.transformer) | set(SHAPE_FIELDS) | set(cfg.model["overrides"])) - RUN_CHOSEN_FIELDS)
    diff = [(f, getattr(theirs, f, None), getattr(model_cfg, f, None)) for f in fields
            if getattr(theirs, f, None) != getattr(model_cfg, f, None)]
    if spec.first_k_dense != size.first_k_dense:
        # A property of the named size: only model.size can change it.
        raise _err(f"{what} has {spec.first_k_dense} leading dense layers, model.size={size.name} has "
                   f"{size.first_k_dense}: choose a size with first_k_dense {spec.first_k_dense}")
    if diff:
        detail = ", ".join(f"{f}: checkpoint {a!r}, run {b!r}" for f, a, b in diff)
        fix = " ".join(f"model.overrides.{f}={json.dumps(a, default=str, separators=(',', ':'))}" for f, a, _ in diff)
        raise _err(f"{what} holds another model than this run (model.size={size.name}, model.overrides): "
                   f"{detail}; run with the checkpoint's settings: {fix}")
    if vocab != size.vocab_size:
        raise _err(f"{what} has {vocab} embedding rows (vocab_size), model.size={size.name} has {size.vocab_size}")
    kept = src / "tokenizer.model"
    if kept.is_file():
        import hashlib

        if hashlib.sha256(kept.read_bytes()).hexdigest() != tokenizer.unique_identifiers["sha256"]:
            raise _err(f"{what} came with the tokenizer {kept}, data.dir's is another ({tokenizer.path}): "
                       "tokenize the corpus with the model's tokenizer")


def resolve_backend(cfg: RunConfig) -> str:
    """``model.transformer_impl`` resolved for this machine; FP8 needs TE's linears, TE itself
    and a GPU with FP8 GEMMs. The one value Megatron's flags and the model config both get."""
    from megatron_dsa import backends
    from megatron_dsa.config import DSAConfigError

    requested, fmt = cfg.model["transformer_impl"], cfg.fp8["format"]
    if fmt is not None:
        problem = backends.fp8_problem(requested, cfg.fp8["recipe"], on_this_machine=True)
        if problem:
            raise _err(f"fp8.format {fmt!r} {problem}")
    try:
        return backends.resolve_transformer_impl(requested)
    except DSAConfigError as error:
        raise _err(f"model.transformer_impl: {error}") from None


def precision_fields(cfg: RunConfig, transformer_impl: str) -> dict:
    """The model config fields that come from model.transformer_impl and the fp8 section."""
    from megatron_dsa.train.config import FP8_SETTINGS

    fields = {"transformer_impl": transformer_impl}
    if cfg.fp8["format"] is not None:
        fields.update({field: cfg.fp8[key] for key, (_, field) in FP8_SETTINGS.items()})
    return fields


def check_megatron_flags(argv: list[str]):
    """Parse the Megatron flags the trainer will pass, so a bad one fails here, in one line;
    returns the parsed namespace."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from megatron_dsa.train.flags import add_mdsa_args

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # noqa: D401 - argparse hook
            raise _err(f"bad Megatron flag (config section 'megatron'): {message}")

    parser = _Parser(allow_abbrev=False, add_help=False)
    add_mdsa_args(add_megatron_arguments(parser))
    return parser.parse_args(argv)


def check_megatron_settings(argv: list[str]) -> None:
    """Everything Megatron will check of its flags, run here: its argument validation (world
    size against TP x PP x CP, precision pairs, ...) for this launch's world size, then our model
    config with the parallel layout and precision taken from those flags, as the trainer builds
    it (heads and experts against TP and EP, sequence parallel, ...). Otherwise such settings
    pass ``--check`` and stop inside Megatron with a traceback."""
    import contextlib
    import io
    import traceback

    from patches.training import apply_training_cpu_patches

    from megatron_dsa.config import DSAConfigError
    from megatron_dsa.train.flags import phase_model_config

    args = check_megatron_flags(argv)
    # What Megatron's parse_args adds before validating.
    args.rank = int(os.environ.get("RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # The run applies this one before Megatron validates its flags (a no-op where CUDA exists).
    apply_training_cpu_patches(only={"device_arch_on_cpu"})
    from megatron.training.arguments import validate_args

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every argument
            validate_args(args, {})
    except Exception as error:  # noqa: BLE001 - any refusal, reported in one line
        frame = traceback.extract_tb(error.__traceback__)[-1]
        reason = str(error).strip().splitlines()[0] if str(error).strip() else f"`{frame.line}` failed"
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        raise _err(f"Megatron rejects these settings (config section 'megatron', world size "
                   f"{args.world_size}): {reason} ({where})") from None
    try:
        phase_model_config(args)
    except (DSAConfigError, TypeError, ValueError, AssertionError) as error:
        raise _err(f"bad model config under the Megatron flags (world size {args.world_size}, "
                   f"config section 'megatron'): {error}") from None


def check_packing(cfg: RunConfig, data_dir: Path, manifest: dict) -> None:
    """Packed sequences (data.packed) under context parallelism: every document must split
    into 2 * CP equal chunks (megatron's packed CP layout)."""
    from megatron_dsa.data.packing import unsplittable_documents

    cp = int(cfg.megatron.get("context-parallel-size") or 1)
    if cp == 1:
        return
    multiple = 2 * cp
    if cfg.data["seq_length"] % multiple:
        raise _err(f"data.packed with context_parallel_size {cp}: data.seq_length {cfg.data['seq_length']} "
                   f"must be a multiple of 2 * CP = {multiple} (each document is cut into 2 * CP chunks)")
    for split in ("train", "valid"):
        bad, total, first = unsplittable_documents(data_dir / manifest["splits"][split]["prefix"], multiple)
        if bad:
            raise _err(f"data.packed with context_parallel_size {cp}: every document must split into 2 * CP = "
                       f"{multiple} equal chunks, but {bad} of the {total} documents of the {split} split of "
                       f"{data_dir} do not (the first holds {first} tokens); pad the corpus's documents to a "
                       f"multiple of {multiple} or set data.packed=false")


def preflight(cfg: RunConfig, check_flags: bool = True) -> dict:
    """Validate everything about a run; return the plan (nothing is written)."""
    from megatron_dsa.config import DSAConfigError
    from megatron_dsa.data import DataError, check_corpus_for_run, check_tokenizer_matches, load_tokenizer
    from megatron_dsa.data import validate_indexed_dataset
    from megatron_dsa.model import model_config, resolve_size

    size = resolve_size(cfg.model["size"])
    seq = cfg.data["seq_length"]
    if seq > size.max_seq_len:
        raise _err(f"data.seq_length {seq} exceeds model size {size.name!r}'s max_seq_len {size.max_seq_len}")
    transformer_impl = resolve_backend(cfg)
    precision = precision_fields(cfg, transformer_impl)
    try:
        model_cfg = model_config(size, **{**cfg.model["overrides"], **precision, "mdsa_mode": cfg.mode})
    except (DSAConfigError, TypeError, ValueError, AssertionError) as error:
        where = "model.overrides, fp8" if cfg.fp8["format"] else "model.overrides"
        raise _err(f"bad model config (model.size={size.name}, {where}): {error}") from None

    # Corpus: manifest, tokenizer, splits, vocabulary against the model.
    data_dir = Path(cfg.data["dir"]).absolute()
    if not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} does not exist (build it: python -m megatron_dsa.data build --out {data_dir} ...)")
    manifest = check_corpus_for_run(data_dir, cfg.data["corpus"], seq)
    tokenizer = load_tokenizer(data_dir)
    check_tokenizer_matches(tokenizer, size.vocab_size, VOCAB_MULTIPLE)
    padded = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if padded != size.vocab_size:
        raise DataError(
            f"model vocab size {size.vocab_size} ({size.name}) does not match tokenizer "
            f"{tokenizer.path}: Megatron pads its {tokenizer.vocab_size} tokens to {padded}"
        )
    for split in ("train", "valid"):
        info = validate_indexed_dataset(data_dir / manifest["splits"][split]["prefix"])
        if info.num_tokens < seq + 1:
            raise DataError(f"{split} split of {data_dir} has {info.num_tokens} tokens, fewer than one sample of data.seq_length {seq} + 1")
    if cfg.data["packed"]:
        check_packing(cfg, data_dir, manifest)
    expected = model_fingerprint(cfg, model_cfg, size.vocab_size, tokenizer.unique_identifiers["sha256"])

    # This phase's checkpoint directory: resume only a run of the same phase and shape.
    save = Path(cfg.checkpoint["save"]).absolute()
    resume = False
    if save.exists() and not save.is_dir():
        raise _err(f"checkpoint.save {save} exists and is not a directory")
    if save.is_dir():
        record = read_run_file(save)
        if record is None and any(save.iterdir()):
            raise _err(f"checkpoint.save {save} is not empty and holds no megatron-dsa run ({RUN_FILE}); choose an empty or new directory")
        if record is not None:
            if record.get("phase") != cfg.phase:
                raise _err(f"checkpoint.save {save} holds a {record.get('phase')!r} run; this is a {cfg.phase!r} run (use another directory)")
            _compare("checkpoint.save", save, record, expected)
            theirs = record.get("transformer_impl")  # absent in records written before it was kept
            if theirs is not None and theirs != transformer_impl and has_checkpoint(save):
                # TE and local modules name and fuse their parameters differently: a resumed run
                # must rebuild the modules it saved.
                raise _err(f"checkpoint.save {save} was trained with transformer_impl {theirs!r}; this run "
                           f"resolves model.transformer_impl={cfg.model['transformer_impl']!r} to "
                           f"{transformer_impl!r}: resume with model.transformer_impl={theirs}")
            if has_checkpoint(save):
                _checkpoint_iteration(save)
                resume = True

    # The previous phase's checkpoint (weights only), unless resuming.
    pretrained = None
    load_from = cfg.checkpoint["load_from"]
    if load_from is not None:
        src = Path(load_from).absolute()
        if src == save:
            raise _err("checkpoint.load_from must differ from checkpoint.save (resuming from save is automatic)")
        if not src.is_dir() or not has_checkpoint(src):
            raise _err(f"checkpoint.load_from {src} holds no checkpoint ({TRACKER_FILE} missing)")
        want = PREVIOUS_PHASE[cfg.phase]
        if want is None:
            raise _err(f"phase 'pretrain' starts from scratch; checkpoint.load_from must be null (got {src})")
        record = read_run_file(src)
        if record is None:
            _check_imported(src, cfg, model_cfg, size, tokenizer)
        else:
            if record.get("phase") != want:
                raise _err(f"checkpoint.load_from {src} holds a {record.get('phase')!r} checkpoint; the {cfg.phase!r} phase starts from a {want!r} checkpoint")
            _compare("checkpoint.load_from", src, record, expected)
        _checkpoint_iteration(src)
        pretrained = str(src)

    if cfg.logging["tensorboard_dir"] is not None:
        tb = Path(cfg.logging["tensorboard_dir"])
        if tb.exists() and not tb.is_dir():
            raise _err(f"logging.tensorboard_dir {tb} exists and is not a directory")

    plan = {
        "transformer_impl": transformer_impl,
        "data_dir": str(data_dir),
        "save": str(save),
        "resume": resume,
        "pretrained": None if resume else pretrained,
        "record": {"phase": cfg.phase, **expected, "transformer_impl": transformer_impl, "config": cfg.as_dict()},
        "metrics_file": None if cfg.logging["metrics_file"] is None else str(Path(cfg.logging["metrics_file"]).absolute()),
    }
    cfg.checkpoint["save"] = str(save)
    if check_flags:
        from megatron_dsa.train.flags import megatron_argv

        check_megatron_settings(megatron_argv(cfg, plan))
    return plan


def write_run_file(plan: dict) -> list[Path]:
    """Record phase and shape in the save directory (atomically: temp file + rename); returns
    the directories this created (for ``remove_run_file``)."""
    save = Path(plan["save"])
    created = []
    for parent in (save, *save.parents):
        if parent.exists():
            break
        created.append(parent)
    save.mkdir(parents=True, exist_ok=True)
    tmp = save / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(plan["record"], indent=2, default=str) + "\n")
    os.replace(tmp, save / RUN_FILE)
    return created


def remove_run_file(plan: dict, created: list[Path] | None = None) -> None:
    """Undo ``write_run_file`` for a run that saved no checkpoint: the record, and the
    directories it created if they are empty now."""
    (Path(plan["save"]) / RUN_FILE).unlink(missing_ok=True)
    for directory in created or []:
        try:
            directory.rmdir()
        except OSError:  # not empty: something else lives there now
            break
