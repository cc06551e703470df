"""benchmarks/bench_parallel.py runs under torchrun (2 CPU ranks, gloo) and reports what it
should: the TP-sharded indexer does 1/TP of the scoring per rank, CP moves DSA bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_parallel_benchmark_sweeps_layouts_on_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(REPO / "benchmarks" / "bench_parallel.py"), "--size", "tiny", "--layouts", "tp1,tp2,cp2",
           "--seqs", "64", "--modes", "sparse,warmup", "--topk", "16", "--iters", "1", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = json.loads((tmp_path / "parallel_tiny_w2.json").read_text())
    rows = table["rows"]
    assert table["meta"]["complete"] is True and not list(tmp_path.glob("*.tmp"))
    assert table["meta"]["run"]["command"].startswith("python benchmarks/bench_parallel.py --size tiny --layouts")
    assert "cut short" not in (tmp_path / "parallel_tiny_w2.md").read_text()
    assert len(rows) == 6 and not [r for r in rows if "error" in r]
    by = {(r["phase"], r["tp"], r["cp"]): r for r in rows}
    for phase in ("sparse", "warmup"):
        one, tp2, cp2 = by[(phase, 1, 1)], by[(phase, 2, 1)], by[(phase, 1, 2)]
        assert one["indexer_flops"] > 0 and tp2["indexer_flops"] * 2 == one["indexer_flops"]
        assert one["dsa_bytes"] == 0 and tp2["dsa_bytes"] > 0 and cp2["dsa_bytes"] > 0
        assert all(r["ms"] > 0 for r in (one, tp2, cp2))
    assert "| sparse | 64 | 2 | 1 |" in (tmp_path / "parallel_tiny_w2.md").read_text()
    assert (tmp_path / "parallel_tiny_w2.png").stat().st_size > 0


def test_parallel_layer_benchmark_compares_the_alternatives(tmp_path):
    """--layer: the TP-sharded indexer scores 1/TP of the rows a replicated one does; under CP the
    fetched and the all-gathered KV give the same attention output, each with its bytes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(REPO / "benchmarks" / "bench_parallel.py"), "--layer", "--layer-dims", "4,48,32,4,16",
           "--layouts", "tp2,cp2", "--seqs", "64", "--topk", "16", "--iters", "1", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = json.loads((tmp_path / "parallel_layer_w2.json").read_text())
    assert table["meta"]["complete"] is True and not list(tmp_path.glob("*.tmp"))
    by = {(r["tp"], r["cp"]): r for r in table["rows"]}
    assert set(by) == {(2, 1), (1, 2)} and not [r for r in by.values() if "error" in r]
    tp2, cp2 = by[(2, 1)], by[(1, 2)]
    assert tp2["rows_sharded"] * 2 == tp2["rows_replicated"] == 64 and "fetch_ms" not in tp2
    assert tp2["same_topk"] is True and cp2["same_topk"] is True
    assert cp2["same_output"] is True and cp2["fetch_bytes"] > 0 and cp2["allgather_bytes"] > 0
    assert cp2["fetch_ms"] > 0 and cp2["allgather_ms"] > 0
    assert "| 64 | 1 | 2 |" in (tmp_path / "parallel_layer_w2.md").read_text()


def test_parallel_benchmark_rejects_bad_layer_dims():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_parallel.py"), "--layer", "--layer-dims", "16,576"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0 and "--layer-dims takes five integers" in proc.stderr
