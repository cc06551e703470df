"""benchmarks/bench_fp8_train.py on a CPU machine without Transformer Engine:

- bad input (unknown size / variant / phase, te_* without TE, FP8 without CUDA, a missing or
  mismatched corpus, a reserved --extra key) is one ``error:`` line and exit 2, before any run;
- the numbers of a run (loss of the last 10 iterations, median step time after the first 5)
  and the comparison table (a failed run shows as failed, never as a number);
- a run that fails or times out is recorded with its log tail, the runs that depend on it are
  skipped, and the outputs are still written;
- end to end on the tiny model: pretrain -> chain warm-up -> sparse with local_fp32, JSON and
  markdown with numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_fp8_train", REPO / "benchmarks" / "bench_fp8_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()



@pytest.fixture
def no_runs(monkeypatch):
    """The benchmark starting any process or trainer run fails the test: bad input stops before."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started on bad input: {args[:1]}")

    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(Popen=refuse, run=refuse))
    monkeypatch.setattr(bench, "execute", refuse)
    monkeypatch.setattr(bench.Bench, "run", refuse)


def error_of(capsys, argv: list[str]) -> str:
    code = bench.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, (code, err)
    return lines[0]


def small_args(corpus: Path, tmp_path: Path, *more: str) -> list[str]:
    return ["--data", str(corpus), "--sizes", "tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--iters", "3", "--seq-length", "64", "--micro-batch", "2", "--global-batch", "2", "--eval-iters", "1",
            "--warmup-iters", "2", *more]


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("flag, value, needle", [
    ("--variants", "local_fp32,fp4", "unknown variant 'fp4'"),
    ("--sizes", "tiny,huge", "unknown size 'huge'"),
    ("--phases", "pretrain,finetune", "unknown phase 'finetune'"),
    ("--extra", "fp8.recipe=delayed", "fp8.recipe is set by the benchmark"),
    ("--extra", "train.bogus=1", "train.bogus"),
])
def test_bad_names_stop_before_any_run(no_runs, capsys, corpus, tmp_path, flag, value, needle):
    argv = small_args(corpus, tmp_path, "--variants", "local_fp32")
    argv += [flag, value]
    assert needle in error_of(capsys, argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_te_variant_without_transformer_engine(no_runs, capsys, corpus, tmp_path):
    if bench.te_import_error() is None:
        pytest.skip("Transformer Engine is importable here")
    line = error_of(capsys, small_args(corpus, tmp_path, "--variants", "te_bf16,te_fp8"))
    assert "te_bf16 needs Transformer Engine" in line and "import transformer_engine.pytorch" in line
    assert "pip install megatron-dsa[te]" in line


def test_fp8_variant_without_cuda(no_runs, capsys, corpus, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(bench, "te_import_error", lambda: None)  # TE "importable", no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = error_of(capsys, small_args(corpus, tmp_path, "--variants", "te_bf16,te_fp8_tensorwise"))
    assert "te_fp8_tensorwise (FP8) needs a CUDA GPU" in line


def test_missing_or_mismatched_corpus(no_runs, capsys, corpus, tmp_path):
    line = error_of(capsys, small_args(tmp_path / "nope", tmp_path, "--variants", "local_fp32"))
    assert "--data" in line and "nope: no such directory" in line and "megatron_dsa.data build" in line
    line = error_of(capsys, small_args(tmp_path, tmp_path, "--variants", "local_fp32"))
    assert "not a built corpus" in line
    # The tiny corpus (vocabulary 512) named for the small model (8192).
    argv = small_args(corpus, tmp_path, "--variants", "local_fp32", "--sizes", "small")
    argv[1] = f"small={corpus}"
    assert "needs a vocabulary of 8192" in error_of(capsys, argv)


def test_corpus_per_size(corpus, tmp_path):
    """A bare directory serves the sizes of its vocabulary; the others get a corpus built."""
    data = bench.resolve_data(str(corpus), ["tiny", "small"], tmp_path)
    assert data["tiny"] == {"dir": str(corpus.absolute()), "build": False}
    assert data["small"] == {"dir": str(tmp_path / "data_small"), "build": True, "vocab_size": 8192}
    data = bench.resolve_data("build", ["tiny"], tmp_path)
    assert data["tiny"]["build"] and data["tiny"]["vocab_size"] == 512


# --------------------------------------------------------------------------------------------
# Numbers and table


def test_run_metrics_windows():
    loss = [(i, 10.0 - i * 0.1) for i in range(1, 31)]
    times = [(i, 1.0 if i <= 5 else 0.1 + 0.001 * i) for i in range(2, 31)]
    scalars = {"lm loss": loss, "iteration-time": times, "lm loss validation": [(30, 7.5)],
               "mem-max-allocated-bytes": [(1, 2**30), (30, 3 * 2**30)]}
    m = bench.run_metrics(scalars, "pretrain", seq=128, global_batch=4)
    assert m["loss"] == pytest.approx(sum(v for _, v in loss[-10:]) / 10)
    assert m["loss_first"] == 9.9 and m["val_loss"] == 7.5 and m["peak_gib"] == 3.0
    kept = [t for i, t in times if i > 5]  # iterations 1..5 left out
    assert m["timed_iters"] == len(kept) == 25
    assert m["ms_per_iter"] == pytest.approx(sorted(kept)[12] * 1e3)
    assert m["tokens_per_s"] == pytest.approx(4 * 128 / sorted(kept)[12])
    # The warm-up's objective is the indexer loss; a short run leaves out its first half.
    w = bench.run_metrics({"indexer loss": [(1, 0.5), (2, 0.4)], "lm loss": [(1, 6.0), (2, 6.0)],
                           "iteration-time": [(2, 9.0), (3, 1.0), (4, 1.0)]}, "warmup", 64, 2)
    assert w["loss"] == pytest.approx(0.45) and w["lm_loss"] == 6.0 and w["ms_per_iter"] == 1000.0


def test_parse_log_fallback():
    text = (" [2026] iteration        1/       3 | consumed samples: 2 | elapsed time per iteration (ms): 900.0 | "
            "lm loss: 6.25E+00 | loss scale: 1.0 |\n"
            " [2026] iteration        2/       3 | elapsed time per iteration (ms): 31.5 | lm loss: 6.125E+00 |\n")
    s = bench.parse_log(text)
    assert s["lm loss"] == [(1, 6.25), (2, 6.125)] and s["iteration-time"] == [(2, 0.0315)]


def rec(size, phase, variant, status="ok", loss=None, ms=None, role="bench"):
    metrics = {} if loss is None else {"loss": loss, "ms_per_iter": ms}
    return {"size": size, "phase": phase, "variant": variant, "role": role, "seq": 512, "status": status,
            "exit_code": 0 if status == "ok" else 1, "error": None if status == "ok" else "Traceback ...\nboom",
            "metrics": metrics, "wall_s": 10.0}


def test_comparison_and_markdown_with_a_failed_run():
    records = [
        rec("small", "pretrain", "te_bf16", loss=4.00, ms=200.0),
        rec("small", "pretrain", "te_fp8", loss=4.02, ms=150.0),
        rec("small", "warmup", "te_bf16", loss=0.5, ms=90.0, role="chain"),
        rec("small", "sparse", "te_bf16", loss=3.90, ms=400.0),
        rec("small", "sparse", "te_fp8", status="failed", loss=1.0, ms=1.0),
        rec("small", "sparse", "local_bf16", loss=3.80, ms=500.0),
    ]
    rows = bench.compare(records, ["te_fp8", "te_bf16", "local_bf16"])
    by = {(r["phase"], r["variant"]): r for r in rows}
    assert set(by) == {("pretrain", "te_fp8"), ("sparse", "te_fp8"), ("sparse", "local_bf16")}  # not the chain
    ok = by[("pretrain", "te_fp8")]
    assert ok["status"] == "ok" and ok["baseline"] == "te_bf16"
    assert ok["rel_loss_diff"] == pytest.approx(0.005) and ok["within_target"] is True
    assert ok["time_ratio"] == pytest.approx(0.75)
    bad = by[("sparse", "te_fp8")]
    assert bad["status"] == "te_fp8 failed"
    assert "loss" not in bad and "rel_loss_diff" not in bad and "time_ratio" not in bad
    assert by[("sparse", "local_bf16")]["rel_loss_diff"] == pytest.approx(-0.1 / 3.9)
    assert by[("sparse", "local_bf16")]["within_target"] is False

    meta = {"command": "python benchmarks/bench_fp8_train.py --data D", "device": "NVIDIA H200", "torch": "2.x",
            "transformer_engine": "2.9", "megatron_core": "0.19.2", "commit": "abc", "started": "now", "iters": 60,
            "chain_variant": "te_bf16", "warmup_iters": 10, "sparse_lr": 1e-4, "baseline": "te_bf16",
            "phases": ["pretrain", "sparse"], "variants": ["te_fp8", "te_bf16", "local_bf16"],
            "data": {"small": {"dir": "D", "build": False}}, "seq": {"small": 4096},
            "batch": {"small": {"pretrain": (4, 32), "warmup": (4, 16), "sparse": (4, 32)}}}
    md = bench.render_markdown(meta, records, rows)
    assert "`python benchmarks/bench_fp8_train.py --data D`" in md and "NVIDIA H200" in md
    assert "| small | pretrain | 512 | te_fp8 | 4 | 4.02 | +0.50% | yes | 200.0 | 150.0 | 0.750 |" in md
    line = next(line for line in md.splitlines() if line.startswith("| small | sparse | 512 | te_fp8 |"))
    assert "FAILED: te_fp8 failed" in line and "1.0" not in line.split("FAILED")[1]
    assert "| NO |" in md and "boom" in md and "**FAILED** (exit 1)" in md


# --------------------------------------------------------------------------------------------
# Failing runs (a stand-in trainer), then the real thing


def fake_trainer(monkeypatch, code: str):
    monkeypatch.setattr(bench, "trainer_command", lambda size, phase, overrides: [sys.executable, "-c", code])


def test_failed_run_is_recorded_and_the_sweep_goes_on(monkeypatch, capsys, corpus, tmp_path):
    """Every run fails: each is recorded with its log tail; the chain's warm-up (no pretrain
    checkpoint) is skipped and the sparse run starts from scratch instead."""
    fake_trainer(monkeypatch, "import sys; print('Traceback: FP8 GEMM needs 16-aligned dims'); sys.exit(3)")
    code = bench.main(small_args(corpus, tmp_path, "--variants", "local_fp32", "--phases", "pretrain,sparse"))
    assert code == 1
    data = json.loads((tmp_path / "out" / "fp8_train.json").read_text())
    runs = [(r["phase"], r["role"], r["status"], r["exit_code"]) for r in data["runs"]]
    assert runs == [("pretrain", "bench", "failed", 3), ("warmup", "chain", "skipped", None),
                    ("sparse", "bench", "failed", 3)]
    assert "16-aligned" in data["runs"][0]["error"] and "16-aligned" in data["runs"][2]["error"]
    why = "the chain's pretrain run (tiny pretrain local_fp32) failed"
    assert data["runs"][1]["error"] == why
    assert data["runs"][2]["start"] == f"scratch ({why})" and data["runs"][2]["load_from"] is None
    md = (tmp_path / "out" / "fp8_train.md").read_text()
    assert "**FAILED** (exit 3)" in md and "16-aligned" in md and "**SKIPPED**" in md


def test_chain_failure_sparse_runs_start_from_scratch(monkeypatch, capsys, corpus, tmp_path):
    """Only the chain's warm-up fails: the sparse run (a stand-in that succeeds) gets no
    checkpoint.load_from and still reports numbers."""
    script = (
        "import sys, pathlib\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
        "if 'warmup.yaml' in ' '.join(sys.argv): sys.exit('indexer warm-up broke')\n"
        "assert args['checkpoint.load_from'] == 'null', args['checkpoint.load_from']\n"
        "for i in range(1, 4):\n"
        "    print(f' [t] iteration {i:8d}/       3 | elapsed time per iteration (ms): 12.5 | lm loss: 5.5E+00 |')\n"
    )

    def command(size, phase, overrides):
        return [sys.executable, "-c", script, f"--config=configs/{size}/{phase}.yaml", *overrides]

    monkeypatch.setattr(bench, "trainer_command", command)
    code = bench.main(small_args(corpus, tmp_path, "--variants", "local_fp32", "--phases", "sparse"))
    assert code == 1  # the chain failed
    runs = json.loads((tmp_path / "out" / "fp8_train.json").read_text())["runs"]
    assert [(r["phase"], r["role"], r["status"]) for r in runs] == [
        ("pretrain", "chain", "ok"), ("warmup", "chain", "failed"), ("sparse", "bench", "ok")]
    assert "indexer warm-up broke" in runs[1]["error"]
    sparse = runs[2]
    assert sparse["start"].startswith("scratch (the chain's warmup run") and sparse["metrics_source"] == "log"
    assert sparse["metrics"]["loss"] == 5.5 and sparse["metrics"]["ms_per_iter"] == 12.5


def test_run_past_timeout_is_killed(monkeypatch, capsys, corpus, tmp_path):
    fake_trainer(monkeypatch, "import time; print('started', flush=True); time.sleep(60)")
    code = bench.main(small_args(corpus, tmp_path, "--variants", "local_fp32", "--phases", "pretrain",
                                 "--timeout", "2"))
    assert code == 1
    (run,) = json.loads((tmp_path / "out" / "fp8_train.json").read_text())["runs"]
    assert run["status"] == "timeout" and run["exit_code"] is None and run["wall_s"] < 30
    assert "killed after 2 s" in run["error"] and "started" in run["error"]


def test_end_to_end_tiny_cpu(capsys, corpus, tmp_path):
    """pretrain (its checkpoint is the chain's) -> 2-iteration warm-up -> sparse, local_fp32."""
    code = bench.main(small_args(corpus, tmp_path, "--variants", "local_fp32", "--phases", "pretrain,sparse",
                                 "--tag", "smoke"))
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert code == 0, out[-3000:] + json.dumps([r.get("error") for r in data["runs"]])[:3000]
    runs = {(r["phase"], r["role"]): r for r in data["runs"]}
    assert set(runs) == {("pretrain", "bench"), ("warmup", "chain"), ("sparse", "bench")}
    assert runs[("sparse", "bench")]["load_from"] == str(Path(runs[("warmup", "chain")]["run_dir"]) / "ckpt")
    assert runs[("warmup", "chain")]["load_from"] == str(Path(runs[("pretrain", "bench")]["run_dir"]) / "ckpt")
    for r in runs.values():
        m = r["metrics"]
        assert r["status"] == "ok" and r["exit_code"] == 0 and r["metrics_source"] == "tensorboard"
        assert math.isfinite(m["loss"]) and m["ms_per_iter"] > 0 and m["tokens_per_s"] > 0
        assert len(m["loss_series"]) == r["iters"]
        assert not (Path(r["run_dir"]) / "ckpt").exists()  # checkpoints removed at the end
        # recorded as a user re-runs it: `python`, the config relative to the repository
        assert r["command"][:4] == ["python", "-m", "megatron_dsa.train.cli", "--config"]
        assert r["command"][4] == f"configs/tiny/{r['phase']}.yaml"
    assert runs[("pretrain", "bench")]["metrics"]["loss"] > 4.0  # an LM loss (vocabulary 512)
    assert runs[("sparse", "bench")]["metrics"]["indexer_kl"] > 0  # the DSA core ran
    meta = data["meta"]
    assert meta["variants"] == ["local_fp32"] and meta["chain_variant"] == "local_fp32"
    assert meta["seq"] == {"tiny": 64} and meta["transformer_engine"] is None
    md = (tmp_path / "out" / "smoke.md").read_text()
    assert meta["command"] in md
    row = next(line for line in md.splitlines() if line.startswith("| tiny | sparse | local_fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "chain-warmup-local_fp32 checkpoint" and cells[4] == "ok"
    assert all(float(c.replace(",", "")) > 0 for c in (cells[5], cells[8], cells[9]))  # loss, ms/iter, tokens/s
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temp file
