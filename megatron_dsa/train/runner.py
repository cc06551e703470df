"""Run training phases as processes and read back what they logged.

The main job (``megatron_dsa.train.main``) and the verification study (``experiments/verify``)
both run each phase as ``python -m megatron_dsa.train.cli --config <yaml> key=value ...`` in a
process of its own, keep its whole log, echo the lines a person watches, and read the phase's
TensorBoard scalars afterwards. This module is that one runner.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
ECHO_WIDTH = 240
TAIL_LINES = 30


def phase_command(config: str | os.PathLike[str], overrides: list[str], nproc: int = 1) -> list[str]:
    """The command of one phase: ``launch/train.py`` under torchrun for several processes."""
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    str(REPO / "launch" / "train.py")]
    else:
        launcher = [sys.executable, "-m", "megatron_dsa.train.cli"]
    return [*launcher, "--config", str(config), *overrides]


def _watched(line: str) -> bool:
    """The progress line (`` [phase] [####....] ...``), validation, checkpoint saves, errors."""
    return ("] [" in line[:40] or "validation loss at" in line or line.startswith("error:")
            or "successfully saved checkpoint" in line)


def run_phase(cmd: list[str], log_path: Path, name: str) -> float:
    """Run one phase with this checkout on its path, keep its full log at ``log_path``, echo
    the watched lines; SystemExit with the log's last lines when it fails. Returns seconds."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        for line in proc.stdout:
            log.write(line)
            if _watched(line):
                print(line.rstrip()[:ECHO_WIDTH], flush=True)
        code = proc.wait()
    if code != 0:
        tail = "\n".join(Path(log_path).read_text().splitlines()[-TAIL_LINES:])
        raise SystemExit(f"error: phase {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
    return time.perf_counter() - start


def read_scalars(tb_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a TensorBoard directory: tag -> [(step, value)] (last write per step wins);
    {} when the directory does not exist."""
    if not Path(tb_dir).is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {}
        for event in acc.Scalars(tag):
            by_step[event.step] = event.value
        out[tag] = sorted(by_step.items())
    return out


def first_last(series: list[tuple[int, float]], n: int) -> tuple[Optional[float], Optional[float]]:
    """Means of a series' first and last values (up to ``n`` each, at most a quarter of it);
    (None, None) for an empty series."""
    values = [v for _, v in series]
    if not values:
        return None, None
    k = max(1, min(n, len(values) // 4 or 1))
    return sum(values[:k]) / k, sum(values[-k:]) / k
