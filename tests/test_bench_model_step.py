"""benchmarks/bench_model_step.py on CPU at tiny sizes: variant labels, errors, and the dense-KL choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


TINY = ["--size", "tiny", "--seq", "64", "--topk", "8", "--iters", "1", "--warmup-iters", "0"]


def _bench(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_model_step.py"), *TINY,
                           "--out", str(tmp_path), *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_dense_kl_and_precision_variants_are_labelled(tmp_path):
    proc = _bench(tmp_path, "--arms", "warmup,sparse,warmup_mse", "--dense-kl", "blockwise,fused",
                  "--precision", "bf16,fp8", "--transformer-impl", "local", "--compact-selection", "off,on")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["arm"]: r for r in json.loads((tmp_path / "model_step_tiny_64.json").read_text())["rows"]}
    # The KL's two implementations only for the KL warm-up, the selection's two forms only for the
    # sparse phase; every arm once per precision.
    assert set(rows) == {"warmup[blockwise,bf16]", "warmup[fused,bf16]", "warmup[blockwise,fp8]",
                         "warmup[fused,fp8]", "sparse[bf16,int32]", "sparse[bf16,compact]", "sparse[fp8,int32]",
                         "sparse[fp8,compact]", "warmup_mse[bf16]", "warmup_mse[fp8]"}
    assert rows["sparse[bf16,compact]"]["compact_selection"] is True
    assert rows["sparse[bf16,int32]"]["compact_selection"] is False
    for name, r in rows.items():
        if "bf16" in name:
            assert r["ms"] > 0 and r["dense_kl"] in ("blockwise", "fused"), r
        else:  # local linears have no FP8: recorded as that row's error, the sweep goes on
            assert "needs transformer_impl 'transformer_engine'" in r["error"], r
    assert "warmup[fused,bf16]" in (tmp_path / "model_step_tiny_64.md").read_text()


def test_workspace_sizes_and_offload_label_the_sparse_arms(tmp_path):
    """``--workspace-mib`` runs each sparse arm once per size of the kernels' chunked temporaries
    (``workspace_bytes``) and ``--offload-selection`` once per place of its kept selection,
    labelled and recorded; the other phases once."""
    proc = _bench(tmp_path, "--arms", "pretrain,sparse", "--workspace-mib", "1,64", "--offload-selection", "off,on",
                  "--transformer-impl", "local")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "model_step_tiny_64.json").read_text())
    rows = {r["arm"]: r for r in out["rows"]}
    assert set(rows) == {"pretrain", "sparse[gpu,ws1]", "sparse[gpu,ws64]", "sparse[host,ws1]", "sparse[host,ws64]"}
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows["sparse[host,ws1]"]["workspace_mib"] == 1 and "workspace_mib" not in rows["pretrain"]
    assert rows["sparse[host,ws64]"]["offload_selection"] is True and rows["sparse[gpu,ws1]"]["offload_selection"] is False
    assert out["meta"]["workspace_mib"] == "1,64" and out["meta"]["offload_selection"] == "off,on"
    text = (tmp_path / "model_step_tiny_64.md").read_text()
    assert "--workspace-mib 1,64" in text and "--offload-selection off,on" in text


@pytest.mark.parametrize("flag", [["--dense-kl", "fast"], ["--precision", "fp4"], ["--arms", "warmup_bogus"],
                                  ["--saved", "-1"], ["--compact-selection", "yes"], ["--offload-selection", ""],
                                  ["--workspace-mib", "0"],
                                  ["--workspace-mib", "1.5"]])
def test_bad_variants_fail_before_any_run(tmp_path, flag, monkeypatch):
    # main() itself (not a process): a bad value stops before any arm runs and writes nothing.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_model_step

    with pytest.raises(SystemExit) as stop:
        bench_model_step.main([*TINY, "--out", str(tmp_path), *flag])
    assert str(stop.value.code).startswith("error:")
    assert not list(tmp_path.iterdir())


def test_dense_kl_choice_travels_in_the_config():
    """The warm-up KL implementation is a kernel option of the model config (no process-wide
    switch); a bad value stops with one error naming the setting, before any module is built."""
    from megatron_dsa.config import DSAConfigError
    from megatron_dsa.model import model_config

    assert model_config("tiny").dsa.kernel_options.dense_kl == "fused"
    cfg = model_config("tiny", mdsa_kernel_options={"dense_kl": "blockwise", "attn_fwd": [64, 8, 2]})
    assert cfg.dsa.kernel_options.dense_kl == "blockwise" and cfg.dsa.kernel_options.attn_fwd.BK == 64
    for bad in ({"dense_kl": "fast"}, {"attn_fwd": [48, 8, 2]}, {"nope": 1}, {"key_passes": -1}):
        with pytest.raises(DSAConfigError, match="mdsa_kernel_options"):
            model_config("tiny", mdsa_kernel_options=bad)


def test_profile_lists_where_the_step_time_goes(tmp_path):
    proc = _bench(tmp_path, "--arms", "warmup", "--profile", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((tmp_path / "model_step_tiny_64.json").read_text())["rows"][0]
    prof = row["profile"]
    assert 1 <= len(prof) <= 3 and all(x["ms"] > 0 and 0 < x["share"] <= 1 for x in prof)
    assert [x["ms"] for x in prof] == sorted((x["ms"] for x in prof), reverse=True)
    assert "Where the time of one `warmup` step goes" in (tmp_path / "model_step_tiny_64.md").read_text()


def test_saved_lists_what_each_step_keeps_for_its_backward(tmp_path):
    proc = _bench(tmp_path, "--arms", "pretrain,sparse", "--saved", "100", "--transformer-impl", "local")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["arm"]: r for r in json.loads((tmp_path / "model_step_tiny_64.json").read_text())["rows"]}
    for r in rows.values():
        saved = r["saved"]
        assert saved["gib"] > 0 and saved["top"]
        gib = [x["gib"] for x in saved["top"]]
        assert gib == sorted(gib, reverse=True) and sum(gib) == pytest.approx(saved["gib"])
    # the sparse step's attention keeps its queries, latent rows, indexer inputs, the selection
    # (64 tokens x top-k 8 a layer, 16 bits a key) and its output: a custom Function's saved tensors count
    ops = {x["op"]: x for x in rows["sparse"]["saved"]["top"]}
    kl = ops["SparseAttentionKLInBackwardBackward"]
    layers = 3  # the tiny model
    assert kl["tensors"] >= 7 * layers and kl["gib"] * 2**30 > layers * 64 * 8 * 4
    assert not any("Sparse" in op for op in (x["op"] for x in rows["pretrain"]["saved"]["top"]))
    md = (tmp_path / "model_step_tiny_64.md").read_text()
    assert "What one `sparse` step keeps for its backward" in md and "| `SparseAttentionKLInBackwardBackward` |" in md


def test_recompute_applies_to_the_pretrain_and_sparse_arms(tmp_path):
    proc = _bench(tmp_path, "--arms", "pretrain,warmup,sparse", "--recompute", "full", "--transformer-impl", "local")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "model_step_tiny_64.json").read_text())
    assert out["meta"]["recompute"] == "full"
    assert [r["arm"] for r in out["rows"]] == ["pretrain", "warmup", "sparse"] and all("ms" in r for r in out["rows"])
    assert "--recompute full" in (tmp_path / "model_step_tiny_64.md").read_text()


def test_update_keeps_the_arms_not_measured_again(tmp_path):
    assert _bench(tmp_path, "--arms", "pretrain,sparse", "--transformer-impl", "local").returncode == 0
    proc = _bench(tmp_path, "--arms", "warmup,sparse", "--transformer-impl", "local", "--update")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "model_step_tiny_64.json").read_text())
    rows = out["rows"]
    assert [r["arm"] for r in rows] == ["pretrain", "warmup", "sparse"] and all(r["measured"] for r in rows)
    assert [r["run"] for r in rows] == [0, 1, 1] and len(out["meta"]["runs"]) == 2
    assert "--arms warmup,sparse" in out["meta"]["runs"][1]["command"]
    md = (tmp_path / "model_step_tiny_64.md").read_text()
    assert "--arms pretrain,sparse" in md and "--arms warmup,sparse" in md  # each piece's run
    proc = _bench(tmp_path, "--arms", "warmup", "--transformer-impl", "local", "--update", "--recompute", "full")
    assert proc.returncode != 0 and "recompute" in proc.stderr
