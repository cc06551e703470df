"""benchmarks/results_io.py: results files are written whole or not at all, and name the command
and code that measured them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import results_io as io  # noqa: E402


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.json"
    io.write_json(path, {"rows": [1, 2]})
    assert path.read_text() == '{\n "rows": [\n  1,\n  2\n ]\n}\n'
    with pytest.raises(TypeError):
        io.write_json(path, {"rows": object()})  # fails while serialising
    with pytest.raises(TypeError):
        io.write_atomic(path, None)  # fails while writing
    assert path.read_text().startswith('{\n "rows"') and [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_a_figure_that_fails_to_render_leaves_the_previous_png(tmp_path):
    class Figure:
        def __init__(self, fail):
            self.fail = fail

        def savefig(self, target, format, **kwargs):
            assert format == "png"
            Path(target).write_bytes(b"partial" if self.fail else b"whole")
            if self.fail:
                raise RuntimeError("renderer died")

    path = tmp_path / "plot.png"
    io.save_figure(Figure(False), path)
    with pytest.raises(RuntimeError, match="renderer died"):
        io.save_figure(Figure(True), path)
    assert path.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_the_source_digest_follows_the_code_not_the_machine(tmp_path):
    def tree(root: Path, body: str) -> Path:
        for top in io.SOURCE_DIRS:
            (root / top / "sub").mkdir(parents=True)
            (root / top / "sub" / "mod.py").write_text(f"# {top}\n")
        (root / "megatron_dsa" / "kernel.py").write_text(body)
        (root / "megatron_dsa" / "notes.md").write_text("not code")
        return root

    one, two = tree(tmp_path / "a", "x = 1\n"), tree(tmp_path / "b", "x = 1\n")
    assert io.source_digest(one) == io.source_digest(two)
    (two / "megatron_dsa" / "notes.md").write_text("other text")
    assert io.source_digest(one) == io.source_digest(two)  # only .py files count
    (two / "megatron_dsa" / "kernel.py").write_text("x = 2\n")
    assert io.source_digest(one) != io.source_digest(two)
    (two / "megatron_dsa" / "kernel.py").rename(two / "megatron_dsa" / "kernel2.py")
    (two / "megatron_dsa" / "kernel2.py").write_text("x = 1\n")
    assert io.source_digest(one) != io.source_digest(two)  # the path is part of it
    assert len(io.source_digest(REPO)) == 12


def test_the_run_record_names_command_code_and_machine(tmp_path):
    assert io.git_commit(tmp_path) is None  # a copied tree without git
    script = str(REPO / "benchmarks" / "bench_dsa.py")
    assert io.command_line([script, "--heads", "16,32", "--kernel-options", '{"a": 1}']) == (
        "python benchmarks/bench_dsa.py --heads 16,32 --kernel-options '{\"a\": 1}'")
    record = io.run_record([script, "--heads", "64"])
    assert record["command"] == "python benchmarks/bench_dsa.py --heads 64"
    assert record["source"] == io.source_digest() and record["device"] and record["torch"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI clones one): the commit, marked when files differ from it
        assert record["commit"].split()[0] == head.stdout.strip()
    assert io.run_record([script, "--heads", "64"]) == record  # one record per process and command


def test_rows_name_the_run_that_measured_them():
    earlier = {"command": "python benchmarks/bench_dsa.py --heads 128", "date": "2026-12-04 10:00 UTC",
               "commit": "abc1234", "source": "0123456789ab"}
    kept = [{"case": "128 heads", "run": 0}]
    new = [{"case": "16 heads"}, {"case": "32 heads"}]
    now = dict(earlier, command="python benchmarks/bench_dsa.py --heads 16,32", date="2026-12-05 09:00 UTC",
               commit=None, source="ba9876543210")
    runs = io.stamp_rows(new, [earlier], now)
    assert runs == [earlier, now] and [r["run"] for r in new] == [1, 1]
    lines = io.measured_by(runs, kept + new)
    assert lines == [
        "Measured by `python benchmarks/bench_dsa.py --heads 128` (2026-12-04 10:00 UTC; commit abc1234, "
        "sources 0123456789ab).",
        "Measured by `python benchmarks/bench_dsa.py --heads 16,32` (2026-12-05 09:00 UTC; commit not recorded, "
        "sources ba9876543210)."]
    assert io.measured_by(runs, new) == lines[1:]  # only the runs whose rows the table shows
    assert io.measured_by([], [{"case": "x"}, {"case": "y", "run": 3}]) == []  # older tables: no runs


def test_a_new_ceiling_is_added_without_remeasuring_the_others(tmp_path):
    """ceilings.py --update: the committed ceilings stay as measured (bench_dsa refuses to merge
    rows measured at other ceilings), the new one is added, and each run says what it measured;
    bench_dsa reads the new one where it uses it (the adds into a target L2 holds)."""
    import json

    import bench_dsa
    import ceilings

    old = {"device": "NVIDIA H200", "torch": "2.11", "bf16_gemm_tflops": 791.0, "fp8_gemm_tflops": 1445.0,
           "hbm_copy_tbps": 4.29, "gather_1KB_rows_tbps": 5.71, "fp32_atomic_adds_per_s": 3.9e11}
    (tmp_path / "ceilings.json").write_text(json.dumps(old))
    before = bench_dsa.load_ceilings(str(tmp_path))
    # a run measures what the json lacks (measure(skip=old's keys)); its own torch is newer
    measured = {"device": "NVIDIA H200", "torch": "2.12", "fp32_atomic_adds_per_s_by_target_mb": {"16": 9e11}}
    res = ceilings.merged(old, measured, {"command": "python benchmarks/ceilings.py --update"})
    assert {k: res[k] for k in old} == old  # kept as measured, the torch of their run included
    assert res["fp32_atomic_adds_per_s_by_target_mb"] == {"16": 9e11}
    assert res["runs"] == [{"command": "python benchmarks/ceilings.py --update",
                            "measured": ["fp32_atomic_adds_per_s_by_target_mb"]}]
    io.write_json(tmp_path / "ceilings.json", res)
    # the bench's ceilings take the fastest target size as the adds' rate into L2, the rest stays
    assert bench_dsa.load_ceilings(str(tmp_path)) == {**before, "atomic_adds_l2_per_s": 9e11}
    # a second run appends its record; a json written by one run had a single "run"
    again = ceilings.merged({**old, "run": {"command": "first"}}, {"device": "NVIDIA H200", "x": 1.0}, {"command": "2"})
    assert [r["command"] for r in again["runs"]] == ["first", "2"] and again["runs"][1]["measured"] == ["x"]


def test_result_files_are_named_after_the_gpu_and_its_own_ceilings(tmp_path):
    """Two GPUs' tables never share a file, and a table's bounds never use another GPU's ceilings."""
    import json

    import bench_dsa

    assert io.device_tag("NVIDIA H200") == "h200"
    assert io.device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert io.device_tag("NVIDIA A100-SXM4-80GB") == "a100"
    try:
        assert bench_dsa.use_model("glm-5", io.device_tag("NVIDIA H100 80GB HBM3")) == "dsa_h100_glm-5"
    finally:
        bench_dsa.use_model("deepseek-v3.2")
    (tmp_path / "ceilings.json").write_text(json.dumps({"device": "NVIDIA H200", "fp32_atomic_adds_per_s": 3.9e11}))
    assert bench_dsa.load_ceilings(str(tmp_path), "NVIDIA H200")["atomic_adds_per_s"] == 3.9e11
    with pytest.raises(SystemExit, match="measured on 'NVIDIA H200', not on 'NVIDIA H100 80GB HBM3'"):
        bench_dsa.load_ceilings(str(tmp_path), "NVIDIA H100 80GB HBM3")


def test_restamp_names_the_commit_whose_sources_a_run_measured(tmp_path):
    # a machine running a copy of the working tree beside an older git checkout records that
    # checkout's commit "(modified)"; the sources' digest finds the right one
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    for top in io.SOURCE_DIRS:
        (tmp_path / top).mkdir()
        (tmp_path / top / "a.py").write_text(f"# {top}\n")
    (tmp_path / "megatron_dsa" / "a-b.py").write_text("x = 0\n")  # '-' sorts before '/' in git's listing
    (tmp_path / "megatron_dsa" / "a").mkdir()
    (tmp_path / "megatron_dsa" / "a" / "k.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    old = git("rev-parse", "--short", "HEAD")
    measured = io.source_digest(tmp_path)
    (tmp_path / "megatron_dsa" / "a" / "k.py").write_text("x = 2\n")
    git("commit", "-qam", "two")
    (tmp_path / "README.md").write_text("docs only\n")
    git("add", "-A")
    git("commit", "-qm", "three")
    assert io.commit_of_sources(measured, tmp_path) == old
    assert io.commit_of_sources(io.source_digest(tmp_path), tmp_path) == git("rev-parse", "--short", "HEAD")

    table = tmp_path / "t.json"
    runs = [{"command": "python b.py", "commit": "0123abc (modified)", "source": measured},
            {"command": "python b.py --x", "commit": "0123abc (modified)", "source": "ffffffffffff"},
            {"command": "python b.py --y", "commit": "4567def", "source": "ffffffffffff"}]
    for run in runs:
        run["date"] = "2026-12-07 04:10 UTC"
    io.write_json(table, {"runs": runs, "rows": [{"run": 0}, {"run": 1}, {"run": 2}]})
    (tmp_path / "t.md").write_text("\n".join(io.measured_by(runs, [{"run": 0}, {"run": 1}, {"run": 2}])) + "\n")
    assert io.restamp(table, tmp_path) == [f"0123abc (modified) -> {old} (sources {measured})"]
    got = [r["commit"] for r in json.loads(table.read_text())["runs"]]
    assert got == [old, "0123abc (modified)", "4567def"]  # no commit holds those sources: left as it was
    md = (tmp_path / "t.md").read_text()
    assert f"commit {old}, sources {measured}" in md and "commit 0123abc (modified), sources ffffffffffff" in md
    assert io.restamp(table, tmp_path) == []
