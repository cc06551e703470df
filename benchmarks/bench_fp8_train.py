"""FP8 training with Transformer Engine on the DSA model: loss and step time, bf16 vs FP8.

    python benchmarks/bench_fp8_train.py --data runs/verify/h200/data --sizes tiny,small \\
        --variants te_bf16,te_fp8 [--phases pretrain,sparse] [--iters 40] [--seq-length 4096]

Every (size, phase, variant) is one real trainer run, ``python -m megatron_dsa.train.cli --config
configs/<size>/<phase>.yaml key=value ...``, in its own process, with the same seed, data and
batch for every variant. Per run: the mean training loss of the last 10 iterations (LM loss;
the indexer loss in warm-up), the validation loss, the median Megatron iteration time after
the first 5 iterations, tokens/s, peak memory (CUDA) and wall time, read from the run's
TensorBoard scalars (its log as a fallback). The table compares every variant with the bf16
baseline (``te_bf16`` if listed): relative loss difference (target: within 1%) and the step-time
ratio variant / baseline (< 1 is faster).

Variants (``VARIANTS``): local_fp32 (CPU smoke tests), local_bf16, te_bf16, te_fp8 (hybrid
E4M3/E5M2, delayed scaling, amax history 16, max), te_fp8_tensorwise (hybrid, current scaling).

Phases: ``pretrain`` (dense MLA from scratch: the DSA core does not run), ``warmup`` and
``sparse`` (the DSA core runs: indexer + top-k sparse attention between TE's FP8 linears).
The trainer accepts a warm-up only from a pretrain checkpoint and a sparse run only from a
warm-up checkpoint, so per size one chain is built once, with one non-FP8 variant
(``chain_variant``): its pretrain run (the benchmark's own when it is listed) -> a short warm-up
(``--warmup-iters``) -> every variant's sparse run starts from that one warm-up checkpoint. Should
the chain fail, the warm-up / sparse runs start from scratch instead (every variant alike), so
the DSA core still runs under FP8; the table says where each run started.

Bad input (unknown size / variant / phase, a missing corpus, ``te_*`` without an importable
Transformer Engine, FP8 without a CUDA GPU of compute capability >= 8.9, a bad ``--extra``)
stops with one ``error:`` line before any run. A failed run is recorded with its exit status
and the tail of its log, and the sweep goes on. ``<out>/<tag>.json`` / ``.md`` are rewritten
(atomically) after every run. Run directories (logs, TensorBoard, the chain's checkpoints) go
under ``--work`` (default runs/<tag>). A size whose vocabulary no ``--data`` corpus has gets a
small corpus built from this interpreter's standard library (recorded in the table header);
``--data build`` asks for that for every size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from results_io import package_version, run_record, write_atomic  # noqa: E402

PHASES = ("pretrain", "warmup", "sparse")
# The training objective each phase logs (Megatron's TensorBoard tag).
LOSS_TAG = {"pretrain": "lm loss", "warmup": "indexer loss", "sparse": "lm loss"}
LOSS_WINDOW = 10  # mean of the last N iterations' loss
TIME_SKIP = 5  # iterations left out of the median step time
LOSS_TARGET = 0.01  # |relative loss difference| FP8 must stay within
# Corpus built for a size that no --data corpus fits (stdlib text, bytes per size).
BUILT_CORPUS_BYTES = {"tiny": 3_000_000, "small": 24_000_000}
TE_INSTALL = "pip install megatron-dsa[te] (in this checkout: pip install -e .[te])"


@dataclass(frozen=True)
class Variant:
    """Named precision settings: the trainer overrides they stand for."""

    name: str
    transformer_impl: str
    bf16: bool
    fp8: dict = field(default_factory=dict)

    @property
    def is_fp8(self) -> bool:
        return bool(self.fp8)

    @property
    def uses_te(self) -> bool:
        return self.transformer_impl == "transformer_engine"

    def overrides(self) -> list[str]:
        out = [f"model.transformer_impl={self.transformer_impl}", f"megatron.bf16={str(self.bf16).lower()}"]
        return out + [f"fp8.{k}={v}" for k, v in self.fp8.items()]


VARIANTS = {v.name: v for v in (
    Variant("local_fp32", "local", False),
    Variant("local_bf16", "local", True),
    Variant("te_bf16", "transformer_engine", True),
    Variant("te_fp8", "transformer_engine", True,
            {"format": "hybrid", "recipe": "delayed", "amax_history_len": 16, "amax_compute_algo": "max"}),
    Variant("te_fp8_tensorwise", "transformer_engine", True, {"format": "hybrid", "recipe": "tensorwise"}),
)}
# Config keys the benchmark or the variants set: --extra may not set them.
RESERVED = ("data.dir", "data.seq_length", "train.iters", "checkpoint.save", "checkpoint.load_from",
            "checkpoint.interval", "logging.tensorboard_dir", "model.transformer_impl", "megatron.bf16",
            "model.size", "phase")
RESERVED_PREFIXES = ("fp8.",)


class BenchError(ValueError):
    """Bad benchmark input: one message, raised before any run."""


# --------------------------------------------------------------------------------------------
# Input


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_fp8_train.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="corpus directory (python -m megatron_dsa.data build), or size=DIR entries, "
                        "comma-separated, e.g. small=runs/verify/h200/data,tiny=runs/data/tiny; 'build': "
                        "build a stdlib corpus for every size no directory serves")
    p.add_argument("--sizes", default="tiny,small", help="model sizes (configs/<size>/), default: %(default)s")
    p.add_argument("--variants", default="te_bf16,te_fp8", help=f"of {', '.join(VARIANTS)}; default: %(default)s")
    p.add_argument("--phases", default="pretrain,sparse", help=f"of {', '.join(PHASES)}; default: %(default)s")
    p.add_argument("--iters", type=int, default=40, help="training iterations per run (default: %(default)s)")
    p.add_argument("--seq-length", type=int, default=4096,
                   help="sequence length (capped at each size's max_seq_len: tiny 512); default: %(default)s")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch size (default: the config's)")
    p.add_argument("--global-batch", type=int, default=None, help="global batch size (default: the config's)")
    p.add_argument("--eval-iters", type=int, default=2, help="validation iterations at the end of each run")
    p.add_argument("--warmup-iters", type=int, default=5,
                   help="iterations of the chain's indexer warm-up that sparse runs start from")
    p.add_argument("--sparse-lr", type=float, default=1e-4,
                   help="constant lr of the sparse runs (the report's 7.3e-6 would not move the model "
                        "in a short run); default: %(default)s")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="trainer overrides for every run, e.g. model.overrides.dsa_indexer_topk=256")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where <tag>.json/.md go")
    p.add_argument("--tag", default="fp8_train", help="file name stem (default: %(default)s)")
    p.add_argument("--work", default=None, help="run directories (default: runs/<tag> in the repo)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate, print the runs, run nothing")
    return p


def _names(text: str, valid, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise BenchError(f"--{what} is empty; choose from {list(valid)}")
    bad = [x for x in items if x not in valid]
    if bad:
        raise BenchError(f"unknown {what[:-1] if what != 'phases' else 'phase'} {bad[0]!r}; "
                         f"valid: {', '.join(valid)}")
    if len(set(items)) != len(items):
        raise BenchError(f"--{what} lists a name twice: {text!r}")
    return items


def known_sizes() -> list[str]:
    return sorted(d.name for d in (REPO / "configs").iterdir()
                  if all((d / f"{ph}.yaml").is_file() for ph in PHASES))


def te_import_error() -> str | None:
    """None when ``import transformer_engine.pytorch`` works, else the reason."""
    import importlib

    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # ImportError, or a broken build's OSError / RuntimeError
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def check_environment(variants: list[str]) -> None:
    """TE importable for te_* variants; a CUDA GPU with FP8 GEMMs for FP8 variants."""
    te = [v for v in variants if VARIANTS[v].uses_te]
    if te:
        reason = te_import_error()
        if reason is not None:
            raise BenchError(f"variant {te[0]} needs Transformer Engine, but `import transformer_engine.pytorch` "
                             f"failed ({reason}); install it: {TE_INSTALL}, or use local_bf16 / local_fp32")
    fp8 = [v for v in variants if VARIANTS[v].is_fp8]
    if fp8:
        import torch

        if not torch.cuda.is_available():
            raise BenchError(f"variant {fp8[0]} (FP8) needs a CUDA GPU; none is available")
        cap = tuple(torch.cuda.get_device_capability())
        if cap < (8, 9):
            raise BenchError(f"variant {fp8[0]} (FP8) needs a GPU of compute capability 8.9 or newer "
                             f"(Ada / Hopper); this one has {cap[0]}.{cap[1]}")


def check_extra(extra: list[str]) -> None:
    for item in extra:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--extra {item!r}: expected key=value, e.g. model.overrides.dsa_indexer_topk=256")
        if key in RESERVED or key.startswith(RESERVED_PREFIXES):
            raise BenchError(f"--extra {item!r}: {key} is set by the benchmark or the variants "
                             "(see --variants, --iters, --seq-length, --data)")


def _padded_vocab(manifest: dict) -> int:
    from megatron_dsa.train.preflight import VOCAB_MULTIPLE

    return -(-int(manifest["vocab_size"]) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def resolve_data(spec: str, sizes: list[str], work: Path) -> dict[str, dict]:
    """size -> {"dir": corpus, "build": bool}. Bare DIRs serve every size of their vocabulary;
    size=DIR names one; a size left without a corpus gets one built under ``work``."""
    from megatron_dsa.data import DataError, load_manifest
    from megatron_dsa.model import resolve_size

    explicit, bare, build = {}, [], False
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        size, sep, path = item.partition("=")
        if item == "build":
            build = True
        elif sep and size in known_sizes():
            explicit[size] = Path(path)
        else:
            bare.append(Path(item))
    if not explicit and not bare and not build:
        raise BenchError("--data is empty: give a corpus built by `python -m megatron_dsa.data build`")
    manifests = {}
    for path in [*explicit.values(), *bare]:
        if not path.is_dir():
            raise BenchError(f"--data {path}: no such directory (build a corpus: "
                             f"python -m megatron_dsa.data build --out {path} --vocab-size 8192 (small) / 512 (tiny))")
        try:
            manifests[path] = load_manifest(path)
        except DataError as error:
            raise BenchError(f"--data {path}: {error}") from None
    out = {}
    for size in sizes:
        vocab = resolve_size(size).vocab_size
        if size in explicit:
            path = explicit[size]
            if _padded_vocab(manifests[path]) != vocab:
                raise BenchError(f"--data {size}={path}: its tokenizer has {manifests[path]['vocab_size']} tokens; "
                                 f"model size {size!r} needs a vocabulary of {vocab}")
            out[size] = {"dir": str(path.absolute()), "build": False}
            continue
        match = next((p for p in bare if _padded_vocab(manifests[p]) == vocab), None)
        if match is not None:
            out[size] = {"dir": str(match.absolute()), "build": False}
        else:
            out[size] = {"dir": str((work / f"data_{size}").absolute()), "build": True, "vocab_size": vocab}
    return out


@dataclass
class Plan:
    sizes: list[str]
    variants: list[str]
    phases: list[str]
    data: dict
    seq: dict  # size -> sequence length
    batch: dict  # size -> phase -> (micro, global)
    work: Path
    out: Path
    chain: str


def chain_variant(variants: list[str]) -> str:
    """The non-FP8 settings of the warm-up chain: a TE one when any TE variant is listed (the
    chain's checkpoint then has TE's module layout), else the first variant."""
    if any(VARIANTS[v].uses_te for v in variants):
        return next((v for v in variants if VARIANTS[v].uses_te and not VARIANTS[v].is_fp8), "te_bf16")
    return variants[0]


def validate(args) -> Plan:
    """Every input check; raises BenchError (or the trainer's config errors) before any run."""
    sizes = _names(args.sizes, known_sizes(), "sizes")
    variants = _names(args.variants, list(VARIANTS), "variants")
    phases = _names(args.phases, PHASES, "phases")
    for name in ("iters", "seq_length", "eval_iters", "warmup_iters", "timeout"):
        if getattr(args, name) <= 0:
            raise BenchError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("micro_batch", "global_batch"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise BenchError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not (args.sparse_lr > 0 and math.isfinite(args.sparse_lr)):
        raise BenchError(f"--sparse-lr must be > 0, got {args.sparse_lr}")
    check_extra(args.extra)
    check_environment(variants)
    work = Path(args.work or REPO / "runs" / args.tag).absolute()
    out = Path(args.out).absolute()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        raise BenchError(f"--tag {args.tag!r}: letters, digits, '_', '-', '.' only")
    data = resolve_data(args.data, sizes, work)
    from megatron_dsa.model import resolve_size

    seq = {s: min(args.seq_length, resolve_size(s).max_seq_len) for s in sizes}
    plan = Plan(sizes, variants, phases, data, seq, {}, work, out, chain_variant(variants))
    check_configs(args, plan)
    return plan


def check_configs(args, plan: Plan) -> None:
    """Load (and, where the corpus exists, preflight) every run's config with placeholder
    directories: bad --extra keys, batch sizes or Megatron flags fail here, not in run 7."""
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight

    with tempfile.TemporaryDirectory() as tmp:
        for size in plan.sizes:
            for phase in PHASES:
                for variant in sorted({*plan.variants, plan.chain}):
                    overrides = run_overrides(args, plan, size, phase, variant, Path(tmp) / "run", None)
                    cfg = load_config(config_path(size, phase), overrides)
                    micro, glob = cfg.train["micro_batch_size"], cfg.train["global_batch_size"]
                    if glob % micro:
                        raise BenchError(f"size {size}: global batch {glob} is not a multiple of micro-batch {micro}")
                    plan.batch.setdefault(size, {})[phase] = (micro, glob)
                    if not plan.data[size]["build"]:
                        preflight(cfg)


# --------------------------------------------------------------------------------------------
# Runs


def config_path(size: str, phase: str) -> Path:
    return REPO / "configs" / size / f"{phase}.yaml"


def run_overrides(args, plan: Plan, size: str, phase: str, variant: str, run_dir: Path,
                  load_from: str | None, iters: int | None = None) -> list[str]:
    iters = iters or args.iters
    ov = [
        f"data.dir={plan.data[size]['dir']}", f"data.seq_length={plan.seq[size]}", f"train.iters={iters}",
        f"checkpoint.save={run_dir / 'ckpt'}", f"checkpoint.interval={iters}",
        f"checkpoint.load_from={load_from if load_from else 'null'}",
        f"logging.tensorboard_dir={run_dir / 'tb'}", "logging.interval=1", "logging.progress=false",
        f"eval.interval={iters}", f"eval.iters={args.eval_iters}",
    ]
    if args.micro_batch:
        ov.append(f"train.micro_batch_size={args.micro_batch}")
    if args.global_batch:
        ov.append(f"train.global_batch_size={args.global_batch}")
    if phase == "pretrain":
        ov.append(f"train.lr_warmup_iters={iters // 10}")
    if phase == "sparse":
        ov += [f"train.lr={args.sparse_lr}", f"train.min_lr={args.sparse_lr}", "train.lr_decay_style=constant"]
    if _cuda():
        ov.append("megatron.log_memory_to_tensorboard=true")
    return [*ov, *args.extra, *VARIANTS[variant].overrides()]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer_command(size: str, phase: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_dsa.train.cli", "--config", str(config_path(size, phase)), *overrides]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # One process per run: the trainer sets up its own world of one on a free port.
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def execute(cmd: list[str], log_path: Path, timeout: float) -> tuple[int | None, float]:
    """Run one trainer process (its own process group) into a log file. Returns (exit status,
    or None on timeout; wall seconds). Whatever the run leaves behind in its group is ended."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        code = None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        finally:
            # Helpers a run leaves (checkpoint writers) and a run interrupted with Ctrl-C.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, time.perf_counter() - start


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def error_tail(log_path: Path, lines: int = 30, chars: int = 4000) -> str:
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    tail = "\n".join(text[-lines:])
    return tail[-chars:]


# --------------------------------------------------------------------------------------------
# Metrics of one run


_LOG_LINE = re.compile(r"\biteration\s+(\d+)/\s*\d+\s*\|(.*)")


def parse_log(text: str) -> dict[str, list[tuple[int, float]]]:
    """Megatron's per-iteration log lines -> {"iteration-time": [(it, s)], "<loss>": [(it, v)]}."""
    out: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        m = _LOG_LINE.search(line)
        if not m:
            continue
        it = int(m.group(1))
        for part in m.group(2).split("|"):
            key, sep, value = part.partition(":")
            if not sep:
                continue
            key = key.strip()
            try:
                number = float(value.strip().split()[0])
            except (ValueError, IndexError):
                continue
            if key == "elapsed time per iteration (ms)":
                if it > 1:  # the first iteration's includes start-up (TensorBoard leaves it out too)
                    out.setdefault("iteration-time", {})[it] = number / 1e3
            elif key in ("lm loss", "indexer loss", "indexer kl"):
                out.setdefault(key, {})[it] = number
    return {k: sorted(v.items()) for k, v in out.items()}


def read_run_scalars(run_dir: Path) -> tuple[dict, str]:
    """(scalars, source): TensorBoard when it has the losses, else the log."""
    scalars: dict = {}
    tb = run_dir / "tb"
    if tb.is_dir():
        try:
            import logging

            from megatron_dsa.train.runner import read_scalars

            logging.getLogger("tensorboard").setLevel(logging.WARNING)

            scalars = read_scalars(tb)
        except Exception:  # a broken event file: fall back to the log
            scalars = {}
    if scalars.get("lm loss") and scalars.get("iteration-time"):
        return scalars, "tensorboard"
    log = run_dir / "train.log"
    parsed = parse_log(log.read_text(errors="replace")) if log.is_file() else {}
    merged = {**parsed, **{k: v for k, v in scalars.items() if v}}
    return merged, "log" if parsed else "tensorboard"


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def run_metrics(scalars: dict, phase: str, seq: int, global_batch: int) -> dict:
    """The numbers of one run from its scalars (see the module docstring)."""
    loss = [v for _, v in scalars.get(LOSS_TAG[phase], [])]
    times = scalars.get("iteration-time", [])
    m: dict = {"loss_series": loss, "iteration_ms": [t * 1e3 for _, t in times]}
    if loss:
        window = loss[-LOSS_WINDOW:]
        m["loss"] = sum(window) / len(window) if all(math.isfinite(v) for v in window) else float("nan")
        m["loss_first"], m["loss_final"] = loss[0], loss[-1]
    if phase != "pretrain" and scalars.get("lm loss") and LOSS_TAG[phase] != "lm loss":
        lm = [v for _, v in scalars["lm loss"]][-LOSS_WINDOW:]
        m["lm_loss"] = sum(lm) / len(lm)
    if scalars.get("indexer kl"):
        kl = [v for _, v in scalars["indexer kl"]][-LOSS_WINDOW:]
        m["indexer_kl"] = sum(kl) / len(kl)
    val = scalars.get("lm loss validation", [])
    if val:
        m["val_loss"] = val[-1][1]
    if times:
        # Iterations 1..TIME_SKIP left out (compilation, allocator warm-up); the first half of a
        # run too short for that. Megatron logs no time for iteration 1 anyway.
        last = times[-1][0]
        skip = TIME_SKIP if last > 2 * TIME_SKIP else last // 2
        kept = _finite(t for it, t in times if it > skip)
        if kept:
            m["ms_per_iter"] = statistics.median(kept) * 1e3
            m["timed_iters"] = len(kept)
            m["tokens_per_s"] = global_batch * seq / statistics.median(kept)
    mem = scalars.get("mem-max-allocated-bytes", [])
    if mem:
        m["peak_gib"] = max(v for _, v in mem) / 2**30
    return m


# --------------------------------------------------------------------------------------------
# Comparison table


def baseline_variant(variants: list[str]) -> str | None:
    """te_bf16 when listed, else the first non-FP8 variant."""
    if "te_bf16" in variants:
        return "te_bf16"
    return next((v for v in variants if not VARIANTS.get(v, Variant(v, "", True)).is_fp8), None)


def _ok(rec: dict | None) -> bool:
    return bool(rec) and rec.get("status") == "ok"


def compare(records: list[dict], variants: list[str]) -> list[dict]:
    """One row per (size, phase, variant other than the baseline): losses, relative loss
    difference, step times and their ratio. A failed side is named, never a number."""
    base = baseline_variant(variants)
    bench = [r for r in records if r.get("role") == "bench"]
    keys = []
    for r in bench:
        if (r["size"], r["phase"]) not in keys:
            keys.append((r["size"], r["phase"]))
    rows = []
    for size, phase in keys:
        runs = {r["variant"]: r for r in bench if r["size"] == size and r["phase"] == phase}
        b = runs.get(base)
        for v in variants:
            if v == base or v not in runs:
                continue
            r = runs[v]
            row = {"size": size, "phase": phase, "seq": r.get("seq"), "baseline": base, "variant": v}
            if b is None:
                row["status"] = "no baseline run"
            elif not _ok(b):
                row["status"] = f"{base} {b.get('status', 'failed')}"
            elif not _ok(r):
                row["status"] = f"{v} {r.get('status', 'failed')}"
            else:
                row["status"] = "ok"
            bm, rm = (b or {}).get("metrics", {}), r.get("metrics", {})
            if _ok(b):
                row["baseline_loss"], row["baseline_ms"] = bm.get("loss"), bm.get("ms_per_iter")
            if _ok(r):
                row["loss"], row["ms"] = rm.get("loss"), rm.get("ms_per_iter")
            if row["status"] == "ok":
                bl, rl = row.get("baseline_loss"), row.get("loss")
                if bl is not None and rl is not None and math.isfinite(bl) and math.isfinite(rl) and bl != 0:
                    row["rel_loss_diff"] = (rl - bl) / abs(bl)
                    row["within_target"] = abs(row["rel_loss_diff"]) <= LOSS_TARGET
                bt, rt = row.get("baseline_ms"), row.get("ms")
                if bt and rt:
                    row["time_ratio"] = rt / bt
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing if value is None else "nan"
    return format(value, spec)


def render_markdown(meta: dict, records: list[dict], rows: list[dict]) -> str:
    lines = [
        "# FP8 training with Transformer Engine: DSA model, bf16 vs FP8", "",
        f"`{meta['command']}`", "",
        f"on {meta['device']}, torch {meta['torch']}, Transformer Engine {meta['transformer_engine'] or 'not installed'}, "
        f"megatron-core {meta['megatron_core']}, commit {meta['commit'] or 'not recorded'}"
        + (f", sources {meta['source']}" if "source" in meta else "") + f"; {meta['started']}.", "",
        f"{meta['iters']} iterations per run; loss = mean training loss of the last {LOSS_WINDOW} iterations "
        "(LM loss; warm-up: indexer loss); ms/iter = median Megatron iteration time after the first "
        f"{TIME_SKIP}; same seed, data and batch for every variant. pretrain: dense MLA from scratch (the DSA "
        "core idle); warmup / sparse: the DSA core (indexer, top-k attention) between the linears.",
    ]
    if {"warmup", "sparse"} & set(meta["phases"]):
        lines[-1] += (f" Warm-up and sparse runs start from one chain per size ({meta['chain_variant']}: "
                      f"pretrain -> {meta['warmup_iters']}-iteration warm-up); sparse lr {meta['sparse_lr']} constant.")
    for size, d in meta["data"].items():
        built = " (built by this benchmark from the standard library)" if d.get("build") else ""
        batch = ", ".join(f"{ph} {mb}/{gb}" for ph, (mb, gb) in meta["batch"].get(size, {}).items()
                          if ph in meta["phases"] or ph == "warmup" and "sparse" in meta["phases"])
        lines.append(f"- {size}: seq {meta['seq'][size]}, micro/global batch {batch}, corpus `{d['dir']}`{built}")
    title = f"{meta['baseline']} vs the other variants" if meta["baseline"] else "no bf16 baseline listed"
    lines += ["", f"## {title} (target: loss within {LOSS_TARGET:.0%})", "",
              "| size | phase | seq | variant | baseline loss | variant loss | rel. diff | within 1% | "
              "baseline ms/iter | variant ms/iter | time ratio (variant / baseline) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['size']} | {r['phase']} | {r.get('seq') or '-'} | {r['variant']} | "
                         f"{_fmt(r.get('baseline_loss'), '.5g')} | {_fmt(r.get('loss'), '.5g')} | "
                         f"FAILED: {r['status']} | - | {_fmt(r.get('baseline_ms'), '.1f')} | "
                         f"{_fmt(r.get('ms'), '.1f')} | - |")
            continue
        within = r.get("within_target")
        lines.append(
            f"| {r['size']} | {r['phase']} | {r['seq']} | {r['variant']} | {_fmt(r.get('baseline_loss'), '.5g')} | "
            f"{_fmt(r.get('loss'), '.5g')} | {_fmt(r.get('rel_loss_diff'), '+.2%')} | "
            f"{'-' if within is None else ('yes' if within else 'NO')} | {_fmt(r.get('baseline_ms'), '.1f')} | "
            f"{_fmt(r.get('ms'), '.1f')} | {_fmt(r.get('time_ratio'), '.3f')} |")
    if not rows:
        lines.append("| (no pair to compare: list a bf16 baseline and another variant) |||||||||||")
    lines += ["", "## Runs", "",
              "| size | phase | variant | starts from | status | loss (last 10) | first loss | val loss | ms/iter | "
              "tokens/s | peak GiB | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        m = rec.get("metrics", {})
        name = rec["variant"] + (" (chain)" if rec.get("role") == "chain" else "")
        status = rec["status"] if rec["status"] == "ok" else f"**{rec['status'].upper()}**"
        if rec.get("exit_code") not in (None, 0):
            status += f" (exit {rec['exit_code']})"
        lines.append(
            f"| {rec['size']} | {rec['phase']} | {name} | {rec.get('start') or '-'} | {status} | "
            f"{_fmt(m.get('loss'), '.5g')} | "
            f"{_fmt(m.get('loss_first'), '.5g')} | {_fmt(m.get('val_loss'), '.5g')} | {_fmt(m.get('ms_per_iter'), '.1f')} | "
            f"{_fmt(m.get('tokens_per_s'), ',.0f')} | {_fmt(m.get('peak_gib'), '.2f')} | {_fmt(rec.get('wall_s'), '.0f')} |")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        for rec in failed:
            chain = " (chain)" if rec.get("role") == "chain" else ""
            lines += [f"### {rec['size']} {rec['phase']} {rec['variant']}{chain}: {rec['status']}"
                      + (f" (exit {rec['exit_code']})" if rec.get("exit_code") is not None else ""), "",
                      "```", (rec.get("error") or "").replace("```", "'''"), "```", ""]
    lines += ["", "## Variants", ""]
    for name in dict.fromkeys([*meta["variants"], meta["chain_variant"]]):
        lines.append(f"- `{name}`: `{' '.join(VARIANTS[name].overrides())}`")
    return "\n".join(lines).rstrip() + "\n"


def _clean(obj):
    """JSON-safe: non-finite floats -> null, paths -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(out: Path, tag: str, meta: dict, records: list[dict]) -> tuple[Path, Path]:
    rows = compare(records, meta["variants"])
    js, md = out / f"{tag}.json", out / f"{tag}.md"
    write_atomic(js, json.dumps(_clean({"meta": meta, "comparison": rows, "runs": records}), indent=2) + "\n")
    write_atomic(md, render_markdown(meta, records, rows))
    return js, md


def environment_meta(argv: list[str]) -> dict:
    """The run's command, code and machine (results_io.run_record) and Transformer Engine's version."""
    te = None
    for dist in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        te = te or package_version(dist)
    if te is None:
        try:
            import transformer_engine

            te = getattr(transformer_engine, "__version__", None)
        except Exception:
            te = None
    run = run_record([__file__, *argv])
    run["started"] = run.pop("date")
    return {**run, "transformer_engine": te}


# --------------------------------------------------------------------------------------------
# Main


@dataclass(frozen=True)
class Step:
    """One trainer run of a size: ``key`` names its directory; ``source`` is the key of the run
    whose checkpoint it starts from; ``keep`` keeps its checkpoint for the runs after it."""

    phase: str
    variant: str
    role: str  # "bench" (in the table) or "chain" (only there to give a checkpoint)
    iters: int
    key: str
    source: str | None = None
    keep: bool = False


def schedule(plan: Plan, iters: int, warmup_iters: int) -> list[Step]:
    """The runs of one size, in order: pretrain (the chain variant first), the chain's pretrain
    if no benchmark run gives it, warm-up runs, the chain's short warm-up, sparse runs."""
    chain, steps = plan.chain, []
    pre = f"pretrain-{chain}" if "pretrain" in plan.phases and chain in plan.variants else f"chain-pretrain-{chain}"
    need = bool({"warmup", "sparse"} & set(plan.phases))
    if "pretrain" in plan.phases:
        for v in sorted(plan.variants, key=lambda v: v != chain):
            steps.append(Step("pretrain", v, "bench", iters, f"pretrain-{v}", keep=need and v == chain))
    if need and pre.startswith("chain-"):
        steps.append(Step("pretrain", chain, "chain", iters, pre, keep=True))
    if "warmup" in plan.phases:
        steps += [Step("warmup", v, "bench", iters, f"warmup-{v}", pre) for v in plan.variants]
    if "sparse" in plan.phases:
        steps.append(Step("warmup", chain, "chain", warmup_iters, f"chain-warmup-{chain}", pre, keep=True))
        steps += [Step("sparse", v, "bench", iters, f"sparse-{v}", f"chain-warmup-{chain}") for v in plan.variants]
    return steps


class Bench:
    """Runs the schedule of every size, recording each run and rewriting the outputs after it."""

    def __init__(self, args, plan: Plan, meta: dict):
        self.args, self.plan, self.meta = args, plan, meta
        self.steps = schedule(plan, args.iters, args.warmup_iters)
        self.total = len(self.steps) * len(plan.sizes)
        self.records: list[dict] = []

    def command(self, size: str, step: Step, scratch: bool = False) -> list[str]:
        work = self.plan.work / size
        load_from = str(work / step.source / "ckpt") if step.source and not scratch else None
        return trainer_command(size, step.phase, run_overrides(
            self.args, self.plan, size, step.phase, step.variant, work / step.key, load_from, step.iters))

    def record(self, size: str, step: Step, **fields) -> dict:
        plan = self.plan
        micro, glob = plan.batch[size][step.phase]
        rec = {"size": size, "phase": step.phase, "variant": step.variant, "role": step.role, "seq": plan.seq[size],
               "micro_batch": micro, "global_batch": glob, "iters": step.iters,
               "run_dir": str(plan.work / size / step.key), "exit_code": None, "error": None, "metrics": {}, **fields}
        self.records.append(rec)
        write_results(plan.out, self.args.tag, self.meta, self.records)
        return rec

    def label(self, size: str, step: Step) -> str:
        n = len(self.records) + 1
        return f"[{n}/{self.total}] {size} {step.phase} {step.variant}" + (" (chain)" if step.role == "chain" else "")

    def run_size(self, size: str) -> None:
        """The size's schedule. Without the chain's checkpoint (a chain run failed) the benchmark
        runs of warm-up and sparse start from scratch (legal for the trainer, the same for every
        variant), so the DSA core still runs under every variant."""
        done: dict[str, dict] = {}
        error = self.build_corpus(size) if self.plan.data[size]["build"] else None
        for step in self.steps:
            src = done.get(step.source) if step.source else None
            lost = None
            if src is not None and not _ok(src):  # the root cause, through skipped runs
                lost = src["error"] if src["status"] == "skipped" else (
                    f"the chain's {src['phase']} run ({size} {src['phase']} {src['variant']}) {src['status']}")
            why = error or (lost if step.role == "chain" else None)
            if why:
                print(f"=== {self.label(size, step)}: skipped ({why})", flush=True)
                done[step.key] = self.record(size, step, status="skipped", error=why)
            else:
                done[step.key] = self.run(size, step, lost)
        if not self.args.keep_checkpoints:
            for step in self.steps:
                shutil.rmtree(self.plan.work / size / step.key / "ckpt", ignore_errors=True)

    def run(self, size: str, step: Step, lost: str | None = None) -> dict:
        """One trainer run; ``lost``: why its source checkpoint is missing (it starts from scratch)."""
        args, plan = self.args, self.plan
        run_dir = plan.work / size / step.key
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cmd = self.command(size, step, scratch=lost is not None)
        (run_dir / "command.json").write_text(json.dumps(cmd) + "\n")
        start = "scratch" if not step.source else f"scratch ({lost})" if lost else f"{step.source} checkpoint"
        print(f"\n=== {self.label(size, step)}, from {start}: {shlex.join(cmd[1:])}", flush=True)
        log = run_dir / "train.log"
        try:
            code, wall = execute(cmd, log, args.timeout)
        except OSError as exc:  # could not start at all
            code, wall = -1, 0.0
            log.write_text(f"could not start: {exc}\n")
        # recorded the way a user re-runs it: `python`, the repository's files relative to it
        portable = ["python", *(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO) + os.sep) else c
                                for c in cmd[1:])]
        fields = {"exit_code": code, "wall_s": wall, "command": portable, "start": start,
                  "load_from": str(plan.work / size / step.source / "ckpt") if step.source and not lost else None}
        metrics = {}
        try:
            scalars, fields["metrics_source"] = read_run_scalars(run_dir)
            metrics = run_metrics(scalars, step.phase, plan.seq[size], plan.batch[size][step.phase][1])
        except Exception as exc:  # the numbers are lost, the run's status is not
            fields["metrics_error"] = f"{type(exc).__name__}: {exc}"
        if code is None:
            status, err = "timeout", f"killed after {args.timeout:.0f} s\n" + error_tail(log)
        elif code != 0:
            status, err = "failed", error_tail(log)
        elif "loss" not in metrics:
            status, err = "failed", "exit 0 but no training loss was logged\n" + error_tail(log)
        elif not math.isfinite(metrics["loss"]):
            status, err = "failed", "non-finite training loss\n" + error_tail(log)
        else:
            status, err = "ok", None
        if status == "ok":
            print(f"    ok: loss {metrics['loss']:.5g} (last {LOSS_WINDOW}), "
                  f"{_fmt(metrics.get('ms_per_iter'), '.1f')} ms/iter, {wall:.0f} s", flush=True)
        else:
            last = err.strip().splitlines()[-1:] or [""]
            print(f"    {status.upper()} (exit {code}): {last[0][:300]}  [log: {log}]", flush=True)
        if not step.keep and not args.keep_checkpoints:
            shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
        return self.record(size, step, status=status, error=err, metrics=metrics, **fields)

    def build_corpus(self, size: str) -> str | None:
        """Build the size's corpus from stdlib text (or reuse one built before); an error or None."""
        from megatron_dsa.data import build_corpus, load_manifest, load_tokenizer

        d = self.plan.data[size]
        path = Path(d["dir"])
        try:
            if _padded_vocab(load_manifest(path)) == d["vocab_size"]:
                print(f"corpus for {size}: reusing {path}", flush=True)
                return None
        except (ValueError, KeyError):
            pass
        print(f"corpus for {size}: building {path} (vocab {d['vocab_size']}, stdlib text)", flush=True)
        try:
            build_corpus(path, None, d["vocab_size"], max_bytes=BUILT_CORPUS_BYTES.get(size, 3_000_000),
                         overwrite=True)
            load_tokenizer(path)
        except Exception as exc:
            return f"could not build a corpus for {size}: {type(exc).__name__}: {exc}"
        return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import warnings

    try:
        with warnings.catch_warnings():  # megatron-core's import-time chatter about TE / Apex
            warnings.simplefilter("ignore")
            plan = validate(args)
    except ValueError as error:  # BenchError, the trainer's TrainConfigError / DataError / DSAConfigError
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    meta = {**environment_meta(sys.argv[1:] if argv is None else argv),
            "sizes": plan.sizes, "variants": plan.variants, "phases": plan.phases,
            "baseline": baseline_variant(plan.variants), "chain_variant": plan.chain, "iters": args.iters,
            "warmup_iters": args.warmup_iters, "sparse_lr": args.sparse_lr, "eval_iters": args.eval_iters,
            "seq": plan.seq, "batch": plan.batch, "data": plan.data, "extra": args.extra,
            "variant_overrides": {v: VARIANTS[v].overrides() for v in plan.variants},
            "loss_window": LOSS_WINDOW, "time_skip": TIME_SKIP, "loss_target": LOSS_TARGET}
    c = VARIANTS[plan.chain]
    cross = [v for v in plan.variants if (VARIANTS[v].transformer_impl, VARIANTS[v].bf16) != (c.transformer_impl, c.bf16)]
    if cross and {"warmup", "sparse"} & set(plan.phases):
        print(f"note: the chain runs as {plan.chain}; the warm-up/sparse runs of {', '.join(cross)} load its "
              "checkpoint into other modules or another precision", flush=True)
    bench = Bench(args, plan, meta)
    print(f"{bench.total} runs; results: {plan.out / args.tag}.json/.md; run directories: {plan.work}", flush=True)
    if args.dry_run:
        for size in plan.sizes:
            for step in bench.steps:
                print(f"# {size} {step.phase} {step.variant} ({step.role})\n{shlex.join(bench.command(size, step))}")
        return 0
    plan.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        for size in plan.sizes:
            bench.run_size(size)
    finally:
        meta["wall_s"] = time.perf_counter() - t0
        js, md = write_results(plan.out, args.tag, meta, bench.records)
    print("\n" + md.read_text())
    print(f"results: {js}\n         {md}")
    return 0 if all(r["status"] == "ok" for r in bench.records) else 1


if __name__ == "__main__":
    sys.exit(main())
