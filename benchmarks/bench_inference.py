"""Inference cost per token vs position: prefill and decode, DSA (sparse) vs dense (not a test).

    python benchmarks/bench_inference.py [--size small] [--positions 1024,4096,...,131072]
        [--modes sparse,dense] [--decode-steps 8] [--kernel reference|auto] [--dtype bf16]
        [--checkpoint DIR] [--out benchmarks/results] [--quick]

For each position P and mode: prefill P tokens (time, and time per token), then decode
``--decode-steps`` tokens one at a time from position P with the latent KV cache (median time
per step). The model is ``--size`` with random weights unless ``--checkpoint`` is given
(weights do not change the cost). Batch 1, one GPU (CPU fallback: use --quick at tiny sizes).
Writes inference_<size>.json and inference_<size>.png to --out. An out-of-memory point is
recorded as such and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_POSITIONS = "1024,2048,4096,8192,16384,32768,65536,131072"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def build(args, device, dtype):
    from megatron_dsa.distributed import init_single_process
    from megatron_dsa.model import build_model, model_config

    init_single_process()
    overrides = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, mdsa_mode="sparse")
    if args.topk:
        overrides["dsa_indexer_topk"] = args.topk
    if args.checkpoint:
        from megatron_dsa.convert import load_model

        model, _ = load_model(args.checkpoint, size=args.size, overrides={"dsa_indexer_topk": args.topk} if args.topk else {})
        model = model.to(dtype)
    else:
        model = build_model(args.size, model_config(args.size, **overrides), max_seq_len=max(args.positions) + 64)
    return model.to(device).eval()


def run_point(engine, vocab, pos, steps, device):
    gen = torch.Generator(device="cpu").manual_seed(pos)
    prompt = torch.randint(0, vocab, (1, pos), generator=gen).to(device)
    (logits, cache), t_prefill = timed(lambda: engine.prefill(prompt, capacity=pos + steps + 1))
    nxt = logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        logits, dt = timed(lambda: engine.step(nxt, cache))
        nxt = logits[:, -1:].argmax(-1)
        times.append(dt)
    return dict(prefill_s=t_prefill, prefill_ms_per_token=1e3 * t_prefill / pos,
                decode_ms_per_token=1e3 * statistics.median(times), decode_ms_all=[1e3 * t for t in times],
                cache_mb=cache.nbytes() / 2**20)


def plot(records, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "prefill_ms_per_token", "prefill: ms per prompt token"),
                           (axes[1], "decode_ms_per_token", "decode: ms per generated token")):
        for mode in sorted({r["mode"] for r in records}):
            pts = [(r["position"], r[key]) for r in records if r["mode"] == mode and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label="DSA (sparse)" if mode == "sparse" else "dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position (tokens in context)")
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--positions", default=DEFAULT_POSITIONS)
    p.add_argument("--modes", default="sparse,dense")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--kernel", default="reference", choices=("reference", "auto", "triton"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny size, short positions")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.positions, args.decode_steps, args.dtype = "tiny", "16,64,256", 3, "fp32"
        args.topk = args.topk or 16
    args.positions = [int(x) for x in args.positions.split(",")]
    modes = args.modes.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    from megatron_dsa.inference import DSAInference

    model = build(args, device, dtype)
    vocab = model.embedding.word_embeddings.weight.shape[0]
    cfg = model.config
    meta = dict(size=args.size, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                dtype=args.dtype, kernel=args.kernel, topk=cfg.dsa.topk, layers=cfg.num_layers,
                heads=cfg.num_attention_heads, kv_lora_rank=cfg.kv_lora_rank,
                indexer=f"{cfg.dsa.n_heads}x{cfg.dsa.head_dim}", decode_steps=args.decode_steps, batch=1)
    records = []
    for mode in modes:
        engine = DSAInference(model, mode, kernel=args.kernel)
        run_point(engine, vocab, min(args.positions), 1, device)  # warm-up
        for pos in args.positions:
            rec = dict(mode=mode, position=pos)
            try:
                rec.update(run_point(engine, vocab, pos, args.decode_steps, device))
            except torch.OutOfMemoryError:
                rec["error"] = "out of memory"
            except Exception as error:  # noqa: BLE001 - record and go on
                rec["error"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            if device == "cuda":
                rec["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "decode_ms_all"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"inference_{args.size}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=2)
    plot(records, stem + ".png", f"{args.size} model, batch 1, {meta['device']}, {args.dtype}, top-k {cfg.dsa.topk}")
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
