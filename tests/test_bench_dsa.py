"""benchmarks/bench_dsa.py's table in pieces (--update): which rows a partial run keeps, replaces
and refuses to mix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_dsa import merge_rows, previous_rows  # noqa: E402


def _row(case, heads, seq, ms):
    return {"case": case, "heads": heads, "seq": seq, "ours_fp8": {"ms": ms}}


def test_update_replaces_measured_rows_and_keeps_the_rest_in_table_order():
    kept = [_row("128 heads", 128, 4096, 1), _row("16 heads", 16, 4096, 1), _row("16 heads, TP=8 rank", 16, 32768, 1)]
    new = [_row("16 heads", 16, 4096, 2), _row("64 heads", 64, 131072, 2), _row("64 heads", 64, 4096, 2)]
    rows = merge_rows(kept, new)
    assert [(r["case"], r["seq"], r["ours_fp8"]["ms"]) for r in rows] == [
        ("128 heads", 4096, 1), ("64 heads", 4096, 2), ("64 heads", 131072, 2), ("16 heads", 4096, 2),
        ("16 heads, TP=8 rank", 32768, 1)]


def test_update_refuses_rows_from_another_setup(tmp_path):
    res = {"device": "H200", "torch": "2.11", "triton": "3.6", "ceilings": {"a": 1}, "config": {"topk": 2048}}
    path = tmp_path / "dsa_h200.json"
    assert previous_rows(str(path), dict(res)) == []  # nothing measured yet
    path.write_text(json.dumps({**res, "rows": [_row("16 heads", 16, 4096, 1)], "topk_checks": {"rows": 3}}))
    fresh = dict(res)
    assert previous_rows(str(path), fresh) == [_row("16 heads", 16, 4096, 1)]
    assert fresh["topk_checks"] == {"rows": 3}
    with pytest.raises(SystemExit, match="measured with triton '3.6'"):
        previous_rows(str(path), {**res, "triton": "3.7"})


@pytest.mark.parametrize("folder,tag", [("", "h200"), ("h100", "h100")])
def test_render_rewrites_the_committed_table_from_its_json(tmp_path, folder, tag):
    """--render (no GPU) turns each GPU's committed json back into its committed markdown table."""
    import shutil
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dsa.py"
    results = script.parent / "results" / folder
    shutil.copy(results / f"dsa_{tag}.json", tmp_path)
    proc = subprocess.run([sys.executable, str(script), "--render", "--device-tag", tag, "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / f"dsa_{tag}.md").read_text() == (results / f"dsa_{tag}.md").read_text()
    assert (tmp_path / f"dsa_{tag}.png").stat().st_size > 0


def test_rebound_recomputes_the_stored_bounds_at_the_l2_add_rate(tmp_path):
    """--rebound (no GPU) puts each row's stage bounds back to the formula at --out's ceilings:
    the dkv adds at the fastest rate of ceilings.json's target sizes (one L2 holds), the TP=8
    rank's indexer and KL at an eighth of the rows; the measured times stay."""
    import bench_dsa

    bench_dsa.use_model(bench_dsa.DEFAULT_MODEL, "h200", None)
    (tmp_path / "ceilings.json").write_text(json.dumps({
        "device": "H200", "bf16_gemm_tflops": 800.0, "fp8_gemm_tflops": 1400.0, "hbm_copy_tbps": 4.0,
        "gather_1KB_rows_tbps": 5.0, "fp32_atomic_adds_per_s": 4e11,
        "fp32_atomic_adds_per_s_by_target_mb": {"8": 9e11, "32": 1e12, "256": 4e11}}))
    c = bench_dsa.load_ceilings(str(tmp_path), "H200")
    assert c["atomic_adds_l2_per_s"] == 1e12 and c["atomic_adds_per_s"] == 4e11
    res = {"ceilings": {"old": 1}, "rows": [dict(_row("16 heads", 16, 1 << 17, 700), bounds_ms={"attn_bwd": 1.0}),
                                            dict(_row("16 heads, TP=8 rank", 16, 1 << 17, 400), bounds_ms={})]}
    bench_dsa.rebound(res, c)
    full, tp8 = (r["bounds_ms"] for r in res["rows"])
    pairs = bench_dsa.dsa_flops(1 << 17, 16, 576, 512, 64, 128, 2048)["attn_fwd"] / (2.0 * 16 * (576 + 512))
    assert full["attn_bwd"] == pytest.approx(1e3 * pairs * 576 / 1e12)  # the adds, not the FLOPs, at 16 heads
    assert tp8["attn_bwd"] == full["attn_bwd"] and tp8["indexer_topk"] == pytest.approx(full["indexer_topk"] / 8)
    assert res["ceilings"] is c and res["rows"][0]["ours_fp8"] == {"ms": 700}


def test_model_shapes_come_from_the_model_sizes():
    """--model takes the attention shape of a released model from megatron_dsa.model (GLM-5: 32
    indexer heads, dense 256 / 256 a head), and its table says which."""
    import bench_dsa

    try:
        assert bench_dsa.use_model("glm-5") == "dsa_h200_glm-5"
        assert (bench_dsa.DQK, bench_dsa.DV, bench_dsa.HI, bench_dsa.DI, bench_dsa.TOPK) == (576, 512, 32, 128, 2048)
        assert (bench_dsa.DENSE_QK, bench_dsa.DENSE_V) == (256, 256)
        res = {"device": "H200", "ceilings": bench_dsa.CEILINGS, "rows": [_row("64 heads", 64, 4096, 1)],
               "config": dict(batch=1, dqk=576, dv=512, idx_heads=32, idx_dim=128, topk=2048, dtype="bf16",
                              model="glm-5", dense_dims=[256, 256])}
        md = bench_dsa.to_markdown(res)
        assert "glm-5's shape" in md and "indexer 32 x 128" in md and "256 / 256 dims" in md
    finally:
        assert bench_dsa.use_model("deepseek-v3.2") == "dsa_h200"
    assert (bench_dsa.HI, bench_dsa.DENSE_QK, bench_dsa.DENSE_V) == (64, 192, 128)


@pytest.mark.parametrize("given,message", [('{"split_bwd": "nope"}', "split_bwd must be one of"),
                                           ('{"bogus": 1}', "unknown kernel options"),
                                           ("[1", "invalid loads value")])
def test_bad_kernel_options_fail_before_any_run(given, message, capsys):
    import bench_dsa

    # main() itself (not a process): a bad option stops before the CUDA check or any run, with
    # its error as the exit message or argparse's line on stderr
    with pytest.raises(SystemExit) as stop:
        bench_dsa.main(["--kernel-options", given])
    said = str(stop.value.code) + capsys.readouterr().err
    assert stop.value.code not in (0, None) and "error:" in said and message in said, said


def test_the_table_names_the_kernel_options_it_ran_with():
    import bench_dsa

    res = {"device": "H200", "ceilings": bench_dsa.CEILINGS, "rows": [_row("64 heads", 64, 4096, 1)],
           "config": dict(batch=1, dqk=576, dv=512, idx_heads=64, idx_dim=128, topk=2048, dtype="bf16",
                          kernel_options={"split_bwd": "stored_scores"})}
    assert 'options: {"split_bwd": "stored_scores"}' in bench_dsa.to_markdown(res)
    del res["config"]["kernel_options"]
    assert "options" not in bench_dsa.to_markdown(res)


def test_the_table_names_the_runs_behind_its_rows(tmp_path):
    """Each row keeps the index of the run that measured it, through --update: the table then
    names each run's command and code; a run whose rows were all measured again drops out."""
    import bench_dsa

    res = {"device": "H200", "torch": "2.11", "triton": "3.6", "ceilings": bench_dsa.CEILINGS,
           "config": dict(batch=1, dqk=576, dv=512, idx_heads=64, idx_dim=128, topk=2048, dtype="bf16")}
    run = {"command": "python benchmarks/bench_dsa.py --heads 128,64", "date": "2026-12-04 10:00 UTC",
           "commit": "abc1234", "source": "0123456789ab"}
    old = [dict(_row("128 heads", 128, 4096, 1), run=0), dict(_row("64 heads", 64, 4096, 1), run=0)]
    path = tmp_path / "dsa_h200.json"
    path.write_text(json.dumps({**res, "runs": [run], "rows": old}))
    fresh = dict(res)
    kept = previous_rows(str(path), fresh)
    assert fresh["runs"] == [run]
    again = {**run, "command": "python benchmarks/bench_dsa.py --heads 64 --update", "commit": None}
    fresh["runs"] = fresh["runs"] + [again]
    fresh["rows"] = merge_rows(kept, [dict(_row("64 heads", 64, 4096, 2), run=1)])
    md = bench_dsa.to_markdown(fresh)
    assert "Measured by `python benchmarks/bench_dsa.py --heads 128,64` (2026-12-04 10:00 UTC; commit abc1234" in md
    assert "Measured by `python benchmarks/bench_dsa.py --heads 64 --update` (2026-12-04 10:00 UTC; commit not recorded" in md
    fresh["rows"] = [dict(_row("128 heads", 128, 4096, 3), run=1), fresh["rows"][1]]
    assert "--heads 128,64" not in bench_dsa.to_markdown(fresh)


def test_the_pattern_table_gives_the_top_k_on_recency_biased_scores():
    """--pattern rows: the random selection's line gives its own top-k, the trained-indexer-shaped
    one's the top-k of recency-biased indexer inputs, or - where a row predates that timing."""
    import bench_dsa

    stages = dict(zip(bench_dsa.STAGES, (11.0, 2.0, 3.0, 4.0, 5.0)))
    row = dict(_row("16 heads", 16, 4096, 1), bounds_ms=dict(stages), flops={},
               ours_fp8={"ms": 25.0, "stages_ms": dict(stages)},
               ours_fp8_pattern={"ms": 15.0, "stages_ms": dict(stages, indexer_topk=0.0), "topk_recency_ms": 17.5})
    res = {"device": "H200", "ceilings": bench_dsa.CEILINGS, "rows": [row],
           "config": dict(batch=1, dqk=576, dv=512, idx_heads=64, idx_dim=128, topk=2048, dtype="bf16")}
    md = bench_dsa.to_markdown(res)
    assert "| 16 heads | 4K | random | 11.0 | 2.0 | 3.0 | 4.0 | 5.0 |" in md
    assert "| 16 heads | 4K | window + sinks + spread | 17.5 | 2.0 | 3.0 | 4.0 | 5.0 |" in md
    del row["ours_fp8_pattern"]["topk_recency_ms"]
    assert "| 16 heads | 4K | window + sinks + spread | - | 2.0 | 3.0 | 4.0 | 5.0 |" in bench_dsa.to_markdown(res)
