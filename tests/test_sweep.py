"""Scaling sweeps (launch/sweep.py, megatron_dsa/train/sweep.py): a grid of runs, each its own
job, one table; bad grid values stop before any job; a sweep cut short resumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _main():
    spec = importlib.util.spec_from_file_location("sweep_cli", REPO / "launch" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _sweep_file(tmp_path: Path, corpus: Path, grid: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(dict(
        out=str(tmp_path / "out"),
        config=str(REPO / "configs" / "{size}" / "{phase}.yaml"),
        overrides=[f"data.dir={corpus}", "train.iters=3", "train.micro_batch_size=2", "train.global_batch_size=2",
                   "train.lr_warmup_iters=0", "eval.iters=0", "logging.interval=1"],
        grid=dict(dict(size=["tiny"], layout=[{"dp": 1}], seq_length=[32], phase=["pretrain"]), **grid),
    )))
    return path


@pytest.mark.parametrize("grid,needles", [
    ({"layout": [{"tp": 1}, {"tq": 2}]}, ["unknown key(s) ['tq']"]),
    ({"phase": ["pretrain", "dense"]}, ["grid.phase 'dense' is not a phase"]),
    ({"seq_length": [32, 0]}, ["grid.seq_length 0 must be a positive integer"]),
    ({"layout": [{"dp": 1}, {"tp": 3}]}, ["point tiny-pretrain-s32-tp3 (3 processes)", "divisible by the tensor parallel size"]),
    ({"layout": [{"pp": 2}]}, ["point tiny-pretrain-s32-pp2", "layers"]),  # 3 layers do not split over 2 stages
], ids=["layout-key", "phase", "length", "tp-heads", "pp-layers"])
def test_bad_grid_value_stops_before_any_job(tmp_path, corpus, capsys, grid, needles):
    code = _main()(["--sweep", str(_sweep_file(tmp_path, corpus, grid))])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_two_point_sweep_writes_its_table_and_resumes(tmp_path, corpus, capsys):
    main = _main()
    out = tmp_path / "out"
    # A sweep cut short: the first point measured, the second's job stopped midway.
    assert main(["--sweep", str(_sweep_file(tmp_path, corpus, {}, "first.yaml"))]) == 0
    first = json.loads((out / "tiny-pretrain-s32-single" / "result.json").read_text())
    partial = out / "tiny-pretrain-s64-single"
    (partial / "ckpt").mkdir(parents=True)
    (partial / "log.txt").write_text("cut short\n")
    capsys.readouterr()

    assert main(["--sweep", str(_sweep_file(tmp_path, corpus, {"seq_length": [32, 64]}))]) == 0
    said = capsys.readouterr().out
    assert "tiny-pretrain-s32-single: measured before, skipped" in said
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["point"] for r in rows] == ["tiny-pretrain-s32-single", "tiny-pretrain-s64-single"]
    assert rows[0] == first
    for row in rows:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["tflops_per_device"] > 0 and row["peak_memory_gb"] > 0
        assert 0 < row["final_lm_loss"] < 10
    table = (out / "sweep.md").read_text()
    assert "2 of 2 points measured" in table and table.count("| tiny-pretrain-s") == 2
    assert (out / "sweep.png").stat().st_size > 0
