"""Scaling sweeps: a YAML grid of runs, each its own torchrun job, one table and plot.

    python launch/sweep.py --sweep configs/sweeps/tiny_cpu.yaml

A sweep file::

    out: runs/sweeps/tiny                   # results: one directory per point, the table, the plot
    config: configs/{size}/{phase}.yaml     # the run config of a point ({size}, {phase} filled in)
    overrides: [train.iters=20, data.dir=runs/data/tiny]   # key=value for every point
    grid:                                   # every combination is a point
      size: [tiny]
      layout: [{tp: 1}, {tp: 2}, {cp: 2}, {pp: 2}, {ep: 2}, {tp: 2, pp: 2}]
      seq_length: [128, 256]
      phase: [pretrain, warmup, sparse]

A layout names Megatron's parallel sizes: ``tp``, ``cp``, ``pp``, ``vpp`` (virtual stages),
``ep`` and ``dp``; the job runs ``tp * cp * pp * dp`` processes. Every point starts from
scratch (``checkpoint.load_from`` null: throughput does not depend on the weights) and saves
into its own directory.

Before any job starts, the grid is read and every point goes through the trainer's preflight
for its world size (Megatron's own argument checks included): a bad value stops the sweep with
one ``error:`` line, exit status 2, and nothing written. Then the points run one after another;
each finished point writes ``result.json`` (tokens/s and TFLOP/s per device with the indexer's
FLOPs counted, the median over the measured iterations; peak memory of the last rank; the final
LM and indexer losses) and the table (``sweep.md``, ``sweep.json``) and plot (``sweep.png``) are
rewritten from every result so far. A sweep cut short keeps what it measured; run it again and
it skips the finished points and reruns the others from scratch. A point that fails (out of
memory at some length, say) is recorded as failed and the sweep goes on; the next run retries it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_dsa.train.config import PHASES, TrainConfigError

SWEEP_KEYS = ("out", "config", "overrides", "grid")
GRID_KEYS = ("size", "layout", "seq_length", "phase")
LAYOUT_KEYS = ("tp", "cp", "pp", "vpp", "ep", "dp")
# layout key -> Megatron flag (the run config's ``megatron:`` section)
LAYOUT_FLAGS = {"tp": "tensor-model-parallel-size", "cp": "context-parallel-size",
                "pp": "pipeline-model-parallel-size", "vpp": "num-virtual-stages-per-pipeline-rank",
                "ep": "expert-model-parallel-size"}
RESULT_FILE = "result.json"
COLUMNS = ("point", "size", "layout", "seq_length", "phase", "processes", "tokens_per_s",
           "tflops_per_device", "peak_memory_gb", "final_lm_loss", "final_indexer_loss", "status")


class SweepError(ValueError):
    """A bad sweep file or grid value; one line, raised before any job starts."""


@dataclass(frozen=True)
class Point:
    size: str
    layout: dict
    seq_length: int
    phase: str

    @property
    def processes(self) -> int:
        return self.layout.get("tp", 1) * self.layout.get("cp", 1) * self.layout.get("pp", 1) * self.layout.get("dp", 1)

    @property
    def layout_name(self) -> str:
        return "x".join(f"{k}{self.layout[k]}" for k in LAYOUT_KEYS if k in self.layout) or "single"

    @property
    def name(self) -> str:
        return f"{self.size}-{self.phase}-s{self.seq_length}-{self.layout_name}"


@dataclass
class Sweep:
    out: Path
    config: str
    overrides: list[str]
    points: list[Point]


# --------------------------------------------------------------------------------------------
# Reading the sweep file


def _list(grid: dict, key: str) -> list:
    values = grid[key]
    if not isinstance(values, list) or not values:
        raise SweepError(f"grid.{key} must be a non-empty list, got {values!r}")
    return values


def _layout(value: Any) -> dict:
    if not isinstance(value, dict):
        raise SweepError(f"grid.layout entry {value!r} must be a mapping of {list(LAYOUT_KEYS)} to sizes")
    unknown = sorted(set(value) - set(LAYOUT_KEYS))
    if unknown:
        raise SweepError(f"grid.layout entry {value!r}: unknown key(s) {unknown}; valid: {list(LAYOUT_KEYS)}")
    for key, size in value.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SweepError(f"grid.layout entry {value!r}: {key} must be a positive integer, got {size!r}")
    return {k: v for k, v in value.items() if v != 1}


def load_sweep(path: str | os.PathLike[str], out: str | None = None) -> Sweep:
    """Read and check a sweep file's shape (each point's run config is checked by
    ``check_points``); SweepError on anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"sweep file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path} must be a mapping with keys {list(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"unknown sweep key(s) {unknown}; valid: {list(SWEEP_KEYS)}")
    for key in ("config", "grid"):
        if key not in raw:
            raise SweepError(f"sweep file {path} needs {key!r}")
    out = out or raw.get("out")
    if not isinstance(out, str):
        raise SweepError(f"sweep 'out' must be a directory path (or pass --out), got {out!r}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepError(f"sweep 'overrides' must be a list of key=value strings, got {overrides!r}")
    grid = raw["grid"]
    if not isinstance(grid, dict):
        raise SweepError(f"sweep 'grid' must be a mapping with keys {list(GRID_KEYS)}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    missing = [k for k in GRID_KEYS if k not in grid]
    if unknown or missing:
        raise SweepError(f"grid keys must be {list(GRID_KEYS)}; unknown {unknown}, missing {missing}")
    from megatron_dsa.model import SIZES

    for size in _list(grid, "size"):
        if size not in SIZES:
            raise SweepError(f"grid.size {size!r} is not a model size; known: {sorted(SIZES)}")
    for phase in _list(grid, "phase"):
        if phase not in PHASES:
            raise SweepError(f"grid.phase {phase!r} is not a phase; one of {list(PHASES)}")
    for seq in _list(grid, "seq_length"):
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise SweepError(f"grid.seq_length {seq!r} must be a positive integer")
    layouts = [_layout(v) for v in _list(grid, "layout")]
    points = [Point(size, layout, seq, phase) for size, layout, seq, phase in
              itertools.product(grid["size"], layouts, grid["seq_length"], grid["phase"])]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SweepError("the grid repeats a point (two layouts that are the same?)")
    return Sweep(Path(out), str(raw["config"]), list(overrides), points)


def point_config(sweep: Sweep, point: Point) -> str:
    try:
        return sweep.config.format(size=point.size, phase=point.phase)
    except (KeyError, IndexError) as error:
        raise SweepError(f"sweep 'config' {sweep.config!r}: only {{size}} and {{phase}} can be filled in ({error})") from None


def point_overrides(sweep: Sweep, point: Point) -> list[str]:
    """The run config overrides of one point: the sweep's, then the point's own."""
    where = sweep.out.absolute() / point.name
    own = [f"model.size={point.size}", f"data.seq_length={point.seq_length}",
           "checkpoint.load_from=null", f"checkpoint.save={where / 'ckpt'}",
           f"logging.tensorboard_dir={where / 'tb'}", f"logging.metrics_file={where / 'metrics.jsonl'}"]
    for key, flag in LAYOUT_FLAGS.items():
        if key in point.layout:
            own.append(f"megatron.{flag}={point.layout[key]}")
    if point.layout.get("tp", 1) > 1:
        own.append("megatron.sequence-parallel=true")  # DSA and megatron's MoE need it under TP
    return [*sweep.overrides, *own]


@contextmanager
def _environment(world_size: int | None = None):
    """What launch/torchrun.sh sets: CUDA_DEVICE_MAX_CONNECTIONS=1 (TP and CP need it) and, for
    preflight, the job's world size."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "CUDA_DEVICE_MAX_CONNECTIONS")}
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if world_size is not None:
        os.environ["WORLD_SIZE"] = str(world_size)
        os.environ.pop("RANK", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_points(sweep: Sweep) -> None:
    """Every point through the trainer's preflight for its world size, before any job starts.
    Nothing is written: the points' directories do not exist yet (or hold earlier results)."""
    from megatron_dsa.config import DSAConfigError
    from megatron_dsa.data import DataError
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight

    for point in sweep.points:
        try:
            cfg = load_config(point_config(sweep, point), point_overrides(sweep, point))
            with _environment(point.processes):
                preflight(cfg)
        except (TrainConfigError, DataError, DSAConfigError) as error:
            raise SweepError(f"point {point.name} ({point.processes} processes): {error}") from None


# --------------------------------------------------------------------------------------------
# Running and collecting


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def collect(point_dir: Path) -> dict:
    """What one finished job measured: its metrics lines and its TensorBoard scalars."""
    from megatron_dsa.train.runner import read_scalars

    lines = []
    metrics = point_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    # The first measured iteration still pays for start-up (allocations, caches): left out
    # when there are others.
    steady = lines[1:] or lines
    scalars = read_scalars(point_dir / "tb")
    last = lambda tag: scalars[tag][-1][1] if scalars.get(tag) else None  # noqa: E731
    return dict(
        tokens_per_s=_median([m["tokens_per_s"] for m in steady]),
        tflops_per_device=_median([m["tflops_per_device"] for m in steady]),
        peak_memory_gb=max((m["peak_memory_gb"] for m in lines), default=None),
        final_lm_loss=last("lm loss"),
        final_indexer_loss=last("indexer loss"),
    )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_point(sweep: Sweep, point: Point) -> dict:
    """One point as its own job (torchrun for several processes); its result record."""
    from megatron_dsa.train.runner import phase_command, run_phase

    where = sweep.out / point.name
    if where.exists():  # a job cut short: start the point again from scratch
        shutil.rmtree(where)
    where.mkdir(parents=True)
    cmd = phase_command(point_config(sweep, point), point_overrides(sweep, point), nproc=point.processes)
    record = dict(point=point.name, size=point.size, layout=point.layout_name, seq_length=point.seq_length,
                  phase=point.phase, processes=point.processes)
    try:
        with _environment():
            seconds = run_phase(cmd, where / "log.txt", point.name)
    except SystemExit as failed:
        record.update(status="failed", error=str(failed).splitlines()[0])
    else:
        record.update(collect(where), status="ok", seconds=round(seconds, 1))
    _write_json(where / RESULT_FILE, record)
    return record


def results(sweep: Sweep) -> list[dict]:
    """The recorded results of the grid's points, in grid order (missing points left out)."""
    found = []
    for point in sweep.points:
        path = sweep.out / point.name / RESULT_FILE
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def write_table(sweep: Sweep) -> list[dict]:
    """sweep.md, sweep.json and sweep.png from every result so far."""
    rows = results(sweep)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    done = sum(r["status"] == "ok" for r in rows)
    header = (f"# Sweep {sweep.out.name}: {done} of {len(sweep.points)} points measured\n\n"
              "tokens/s and TFLOP/s per device (the indexer's FLOPs counted) are medians over the measured "
              "iterations; peak memory is the last rank's (CUDA allocated on GPUs, resident set on CPU).\n\n")
    (sweep.out / "sweep.md").write_text(header + "\n".join(lines) + "\n")
    _write_json(sweep.out / "sweep.json", rows)
    _plot(sweep.out / "sweep.png", rows)
    return rows


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get("tokens_per_s"):
            series.setdefault(f"{row['size']} {row['layout']} {row['phase']}", []).append(row)
    for label, points in series.items():
        points.sort(key=lambda r: r["seq_length"])
        seqs = [r["seq_length"] for r in points]
        axes[0].plot(seqs, [r["tokens_per_s"] for r in points], marker="o", label=label)
        axes[1].plot(seqs, [r["tflops_per_device"] for r in points], marker="o", label=label)
    for ax, what in zip(axes, ("tokens/s", "TFLOP/s per device (indexer counted)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(what)
    if series:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sweep(sweep: Sweep, echo=print) -> list[dict]:
    """Check every point, then run those without a successful result; the table after each."""
    check_points(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    for i, point in enumerate(sweep.points, 1):
        path = sweep.out / point.name / RESULT_FILE
        if path.is_file() and json.loads(path.read_text()).get("status") == "ok":
            echo(f"[sweep] {i}/{len(sweep.points)} {point.name}: measured before, skipped")
            continue
        echo(f"[sweep] {i}/{len(sweep.points)} {point.name}: {point.processes} process(es)")
        record = run_point(sweep, point)
        echo(f"[sweep] {point.name}: {record['status']}"
             + (f", {_cell(record.get('tokens_per_s'))} tokens/s" if record["status"] == "ok" else f" ({record['error']})"))
        write_table(sweep)
    return write_table(sweep)
