"""benchmarks/bench_inference.py: its arguments and what it writes (a tiny CPU run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_inference  # noqa: E402


def test_quick_run_writes_one_row_per_measurement(tmp_path):
    assert bench_inference.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "inference_quick.json").read_text())
    rows = data["records"]
    # 1 head count x (decode: 2 batches + prefill: 1) x 2 positions x 2 impls
    assert len(rows) == 12
    for r in rows:
        assert {"heads", "batch", "position", "phase", "impl", "ms_per_token"} <= set(r), r
        assert r["phase"] in ("decode", "prefill") and r["impl"] in ("dsa", "dense") and r["ms_per_token"] > 0
    assert set(data["meta"]["other_engines"]) == {"flashinfer", "sgl-kernel"}
    assert "| 8 | decode | 2 | 48 |" in (tmp_path / "inference_quick.md").read_text()
    assert (tmp_path / "inference_quick.png").stat().st_size > 0


def test_bad_arguments_stop_with_one_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_inference.main(["--batches", "1,x", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_inference.main(["--positions", "0", "--quick", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_update_measures_a_table_in_pieces(tmp_path):
    out = ["--quick", "--out", str(tmp_path)]
    assert bench_inference.main(out + ["--phases", "decode"]) == 0
    assert bench_inference.main(out + ["--phases", "prefill", "--update"]) == 0
    rows = json.loads((tmp_path / "inference_quick.json").read_text())["records"]
    assert sorted({r["phase"] for r in rows}) == ["decode", "prefill"] and len(rows) == 12
    assert all(r["measured"] for r in rows)
    runs = json.loads((tmp_path / "inference_quick.json").read_text())["meta"]["runs"]
    assert [run["command"] for run in runs] == [  # each piece's command, named by its rows
        f"python benchmarks/bench_inference.py --quick --out {tmp_path} --phases decode",
        f"python benchmarks/bench_inference.py --quick --out {tmp_path} --phases prefill --update"]
    assert {r["phase"]: r["run"] for r in rows} == {"decode": 0, "prefill": 1}
    assert "--phases prefill --update` (" in (tmp_path / "inference_quick.md").read_text()
    assert bench_inference.main(out + ["--phases", "prefill", "--update"]) == 0  # measured again: replaced
    assert len(json.loads((tmp_path / "inference_quick.json").read_text())["records"]) == 12
    data = json.loads((tmp_path / "inference_quick.json").read_text())
    data["meta"]["device"] = "another GPU"
    (tmp_path / "inference_quick.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="device"):
        bench_inference.main(out + ["--phases", "decode", "--update"])
