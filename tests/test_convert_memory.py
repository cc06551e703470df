"""from-hf holds about --max-shard-size of weights in host memory, not the model; to-hf about
one checkpoint key (a layer's stacked experts) more.

A DeepSeek-V3.2-shaped HF model of about 250 MB (fp32) is imported in a fresh process while a
thread samples the process's anonymous resident memory (RssAnon; parked weights and the HF
shards are file pages, which the OS can drop). With an 8 MB budget the peak growth must stay a
small fraction of the model; with a budget larger than the model the same probe sees the
converted weights held at once, so the measurement can tell the two apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, sys, threading, time
from pathlib import Path

import torch


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def build(hf: Path) -> None:
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV32Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=32,
        num_experts_per_tok=4, n_group=2, topk_group=2, routed_scaling_factor=1.5, kv_lora_rank=64,
        q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, index_n_heads=4,
        index_head_dim=32, index_topk=6, first_k_dense_replace=1, max_position_embeddings=256, rope_theta=5000.0,
    )
    DeepseekV32ForCausalLM(cfg).save_pretrained(str(hf), max_shard_size="50MB")


def quantize(hf: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from megatron_dsa.convert.fp8 import BlockScaling, quantized_in_release, scale_name

    out.mkdir()
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    scaling, weight_map = BlockScaling(), {}
    for f in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, t in load_file(str(hf / f)).items():
            if quantized_in_release(name):
                t, tensors[scale_name(name)] = scaling.quantize(t)
            tensors[name] = t
        save_file(tensors, str(out / f), metadata={"format": "pt"})
        weight_map.update({name: f for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((hf / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": scaling.to_hf_config()}))


def main() -> None:
    hf, out, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if budget == "build":
        build(hf)
        return
    if budget == "quantize":  # out: the FP8 copy of hf (the release's layout, 128 x 128 blocks)
        quantize(hf, out)
        return
    from megatron_dsa.convert import import_from_hf
    from megatron_dsa.convert import checkpoint as C

    C.ensure_world()
    if budget.startswith("export"):  # out is a checkpoint: export it, measuring the same way
        from megatron_dsa.convert import export_to_hf

        kind, budget = budget.split(":", 1)
        fp8 = (128, 128) if kind == "export-fp8" else None
        run = lambda: export_to_hf(out, out.with_name(out.name + "_" + kind), max_shard_size=budget,  # noqa: E731
                                   fp8_block=fp8)
    else:
        run = lambda: import_from_hf(hf, out, max_shard_size=budget)  # noqa: E731
    base = rss_anon()
    peak, done = [base], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run()
    done[0] = True
    thread.join()
    weights = sum(p.stat().st_size for p in out.rglob("*.distcp"))
    print(json.dumps({"growth": peak[0] - base, "checkpoint_bytes": weights}))


if __name__ == "__main__":  # megatron's save starts helper processes with spawn
    main()
'''


def _run(script: Path, *args: str) -> dict:
    # A fixed mmap threshold: by default glibc raises it whenever a large block is freed, then
    # serves later tensors from its heap, whose freed pages stay resident. RssAnon would count
    # memory no tensor holds, by an amount that varies from run to run.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc (Linux)")
def test_from_hf_holds_about_one_shard_of_weights(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    hf = tmp_path / "hf"
    _run(script, hf, "-", "build")
    small = _run(script, hf, tmp_path / "ckpt_small", "8MB")
    whole = _run(script, hf, tmp_path / "ckpt_whole", "100GB")
    model = small["checkpoint_bytes"]
    assert model > 100 * 2**20 and whole["checkpoint_bytes"] == model
    # One 8 MB batch at a time: a small fraction of the model (holding it all, as the import
    # did before, grew by 282 MB here: the converted weights plus megatron-core's copies of views).
    assert small["growth"] <= 0.2 * model, (small, model)
    # The probe sees held weights: with one batch for everything, every tensor the conversion
    # changes (all but those that pass through as file pages) is in memory at once.
    assert whole["growth"] >= 2 * small["growth"] and whole["growth"] >= 0.4 * model, (whole, small, model)
    # The export streams by checkpoint key: a layer's experts are one stacked key in megatron-core's
    # sharded state dict and load together, so its bound is that key (here 32 experts' fc1, 64 MiB;
    # held once as loaded and once split into gate/up) plus the shard being written.
    export = _run(script, hf, tmp_path / "ckpt_small", "export:8MB")
    stacked_fc1 = 32 * 2 * 512 * 512 * 4
    assert export["growth"] <= 2 * stacked_fc1 + 2 * 8 * 2**20 + 32 * 2**20, (export, model)
    # The release's FP8 layout both ways: the import dequantises one weight at a time, the
    # export quantises one tensor at a time (its bound is the same stacked key).
    _run(script, hf, tmp_path / "hf_fp8", "quantize")
    fp8_import = _run(script, tmp_path / "hf_fp8", tmp_path / "ckpt_fp8", "8MB")
    assert fp8_import["checkpoint_bytes"] == model and fp8_import["growth"] <= 0.2 * model, (fp8_import, model)
    fp8_export = _run(script, hf, tmp_path / "ckpt_fp8", "export-fp8:8MB")
    assert fp8_export["growth"] <= 2 * stacked_fc1 + 2 * 8 * 2**20 + 32 * 2**20, (fp8_export, model)
    hf_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    print(f"HF shards {hf_bytes / 2**20:.0f} MiB in {len(list(hf.glob('*.safetensors')))} files, checkpoint "
          f"{model / 2**20:.0f} MiB; peak growth (MiB): import {small['growth'] / 2**20:.0f} (8 MB budget), "
          f"{whole['growth'] / 2**20:.0f} (one batch); export {export['growth'] / 2**20:.0f}; FP8 import "
          f"{fp8_import['growth'] / 2**20:.0f}, FP8 export {fp8_export['growth'] / 2**20:.0f}")
