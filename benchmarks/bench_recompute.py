"""Activation recomputation over DSA layers: peak memory and step time with and without, and the
gradients of each against none (not a test).

    python benchmarks/bench_recompute.py --size small --seq 131072 --phases pretrain,sparse \
        --recompute none,core_attn,mla_up_proj,full [--out benchmarks/results]

One process, one GPU (CPU works at small lengths), random weights and tokens, bf16. Each
(phase, recompute) pair builds the model from the same seed and runs ``--iters`` forward +
backward steps of the phase's loss (the LM loss; sparse attaches the indexer KL);
``core_attn`` is megatron-core's selective recomputation of the core attention (the DSA core:
indexer top-k, sparse attention, KL), ``mla_up_proj`` megatron-core's selective recomputation of
MLA's up-projections and RoPE (the absorbed queries and latent rows are dropped after the forward
and rebuilt in the backward), ``full`` recomputes whole layers (uniform, one layer per
checkpoint). Reported: median step time, peak memory (CUDA allocated), and the largest gradient
difference against ``none`` relative to that gradient's largest entry (with a second ``none`` run
for the run-to-run floor). Writes
recompute_<size>_<seq>.json / .md to --out. (Warm-up is left out: only the indexers train, on
detached inputs, so it keeps no activations to recompute and the config refuses it.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import invocation, run_record, write_atomic, write_json  # noqa: E402

RECOMPUTE = {
    "none": {},
    "core_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    # MLA's query / latent up-projections and RoPE: the absorbed queries the sparse attention
    # keeps are dropped after the forward and rebuilt in the backward
    "mla_up_proj": dict(recompute_granularity="selective", recompute_modules=["mla_up_proj"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
PHASE_MODE = {"pretrain": "dense", "sparse": "sparse"}


def run(args, phase: str, recompute: str, device) -> tuple[dict, dict]:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

    from megatron_dsa.model import build_model, model_config
    from megatron_dsa.train.trainer import freeze_for_phase

    cuda = device.type == "cuda"
    dtype = dict(params_dtype=torch.bfloat16, bf16=True) if cuda else {}
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = model_config(args.size, mdsa_mode=PHASE_MODE[phase], mdsa_kernel=args.kernel, **dtype,
                          **RECOMPUTE[recompute])
    model = build_model(args.size, config, max_seq_len=args.seq).to(device)
    model.train()
    freeze_for_phase(model, phase)
    DSAIndexerLossAutoScaler.set_loss_scale(torch.ones(1, device=device))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.vocab_size, (1, args.seq), generator=g).to(device)
    positions = torch.arange(args.seq, device=device)[None]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup_iters + args.iters):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        model(tokens, positions, None, labels=tokens.roll(-1, 1)).float().mean().backward()
        sync()
        if i >= args.warmup_iters:
            times.append(time.perf_counter() - t0)
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    res = {"phase": phase, "recompute": recompute, "ms": statistics.median(times) * 1e3,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    del model
    return res, grads


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_markdown(path: str, size: str, seq: int, device: str, rows: list[dict]) -> None:
    lines = [f"# Activation recomputation, {size} model, one {seq}-token sequence ({device})", "",
             "| phase | recompute | step ms | peak GB | max grad diff vs none (relative) |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        lines.append(f"| {r['phase']} | {r['recompute']} | {r['ms']:.0f} | {peak} | {r['grad_rel_diff']:.2e} |")
    write_atomic(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--phases", default="pretrain,sparse")
    p.add_argument("--recompute", default="none,core_attn,full")
    p.add_argument("--kernel", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup-iters", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    phases, modes = args.phases.split(","), args.recompute.split(",")
    bad = [x for x in phases if x not in PHASE_MODE] + [x for x in modes if x not in RECOMPUTE]
    if bad or modes[0] != "none":
        raise SystemExit(f"error: phases in {list(PHASE_MODE)}, recompute in {list(RECOMPUTE)} starting with none; got {bad or modes}")

    from megatron_dsa.distributed import init_single_process

    init_single_process()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for phase in phases:
        base = None
        # "none" twice: the second run's difference is the floor that bf16 and the kernels'
        # unordered fp32 atomic adds leave between two identical steps.
        for mode in [modes[0]] + modes:
            res, grads = run(args, phase, mode, device)
            if base is None:
                base = grads
            elif mode == "none":
                res["recompute"] = "none (run again)"
            res["grad_rel_diff"] = max(((grads[n] - base[n]).abs().max() / base[n].abs().max().clamp_min(1e-30)).item()
                                       for n in base)
            rows.append(res)
            print(json.dumps(res), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"recompute_{args.size}_{args.seq}")
    write_json(stem + ".json", {"size": args.size, "seq": args.seq, "device": device_name(device), "run": run_record(invocation(__file__, argv)),
                                "rows": rows}, indent=2)
    write_markdown(stem + ".md", args.size, args.seq, device_name(device), rows)
    print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
