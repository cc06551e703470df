"""The sparse backward's dkv product alone, side by side in one process (not a test): the Triton
kernel and the Gluon one, over several key-range counts.

    python benchmarks/tune_dkv_product.py --heads 128 --seqs 65536 [--passes 0,2,4,8] [--out DIR]

The product dkv += sum over heads of (ds^T q + p^T dO), one fp32 add per (token, selected key,
column), as the "stored_scores" backward runs it: over the rows a chunk at a time (the stored
score gradients and probabilities of ``KernelOptions.workspace_bytes`` each; their values do not
change the time, so they are random), each chunk over every key range. The selection is the FP8
indexer's top-k of random inputs, its rows key-sorted with the ranges' starts as the backward
makes them. Each row: ms (median of --reps), the adds a second against the L2 and HBM add
ceilings of ``results/ceilings.json`` (if measured on this GPU), and dkv's error against the first
variant's (the Triton kernel at the default ranges). Writes tune_dkv_product.json to --out after
every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_dsa.kernel_options import DEFAULT_OPTIONS, KernelOptions  # noqa: E402
from megatron_dsa.kernels import sparse_attn as SA  # noqa: E402
from megatron_dsa.kernels import sparse_attn_ws as W  # noqa: E402
from megatron_dsa.kernels._common import rows_within  # noqa: E402
import bench_dsa  # noqa: E402
import tune_dsa  # noqa: E402
from results_io import device_tag, invocation, run_record, write_json  # noqa: E402

def variants(passes: list[int]) -> list[tuple[str, int, object]]:
    """(name, key ranges (0: the default), launch(ds, p, q, dout, idx, seg, dkv, t0, t1, pass_id, n)):
    the Triton kernel and the Gluon one at the default key ranges, then both at each of
    ``passes``."""
    def triton(*a):
        SA._dkv_product(*a, 512, KernelOptions(attn_dkv_product_kernel="triton"), dict(IEEE=False, UPCAST=False))

    def gluon(*a):
        W.dkv_product_ws(*a, 512)

    out = [("triton", 0, triton), ("gluon", 0, gluon)]
    out += [("gluon", p, gluon) for p in passes]
    return out + [("triton", p, triton) for p in passes]


def add_ceilings() -> dict:
    """This GPU's add rates from the ceilings its results directory holds (results/ for the H200,
    results/<gpu>/ else), if they were measured on it: into an L2-sized target, and into HBM."""
    device = torch.cuda.get_device_name()
    tag = device_tag(device)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", *([] if tag == "h200" else [tag]))
    try:
        with open(os.path.join(out, "ceilings.json")) as f:
            if json.load(f).get("device") != device:
                return {}
    except (OSError, ValueError):
        return {}
    c = bench_dsa.load_ceilings(out, device)
    return {"l2": c["atomic_adds_l2_per_s"], "hbm": c["atomic_adds_per_s"]}


def run(heads, seqs, passes, reps, out_dir, record):
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    ceil = add_ceilings()
    for S in seqs:
        for H in heads:
            torch.cuda.empty_cache()
            q, kv, qi, ki, wi, idx = tune_dsa.inputs(S, H)
            del kv, qi, ki, wi
            dout = torch.randn(1, S, H, 512, device="cuda", dtype=torch.bfloat16)
            K = idx.shape[-1]
            step = min(S, rows_within(DEFAULT_OPTIONS.workspace_bytes, H * K * 2))
            ds = torch.randn(1, step, H, K, device="cuda", dtype=torch.bfloat16)
            p = torch.randn_like(ds)
            dkv = torch.zeros(1, S, 576, device="cuda")
            default_passes = SA.key_passes(DEFAULT_OPTIONS, 1, S, 576, "stored_scores", True)
            ref = None
            adds = int((idx >= 0).sum()) * 576
            for name, n, launch in variants(passes):
                n = n or default_passes
                keys, _, seg = SA.key_segments(idx, S, n)

                def fn():
                    dkv.zero_()
                    for t0 in range(0, S, step):
                        for pass_id in range(n):
                            launch(ds, p, q, dout, keys, seg, dkv, t0, min(S, t0 + step), pass_id, n)

                row = dict(variant=name, heads=H, seq=S, key_ranges=n, chunk_rows=step, adds=adds)
                try:
                    row["ms"] = tune_dsa.cuda_ms(fn, reps)
                    row["adds_per_s"] = adds / (row["ms"] / 1e3)
                    for k, v in ceil.items():
                        row[f"of_{k}_add_ceiling"] = row["adds_per_s"] / v
                    fn()
                    row["finite"] = bool(torch.isfinite(dkv).all())
                    if ref is None:
                        ref = dkv.clone()
                    else:
                        row["rel_to_first"] = tune_dsa.rel([dkv], [ref])
                except Exception as e:  # a variant that does not launch is a result too
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_json(os.path.join(out_dir, "tune_dkv_product.json"), {"run": record, "rows": rows})
            q = idx = dout = ds = p = dkv = ref = None
    return rows


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers (argparse type)."""
    try:
        values = [bench_dsa.positive_int(x) for x in text.split(",") if x.strip()]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}") from None
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=positive_ints, default="128")
    p.add_argument("--seqs", type=positive_ints, default="65536")
    p.add_argument("--passes", type=positive_ints, default="",
                   help="key-range counts timed beside the default (comma-separated)")
    p.add_argument("--reps", type=bench_dsa.positive_int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    if not a.heads or not a.seqs:
        p.error("--heads and --seqs need at least one value")
    if not torch.cuda.is_available():
        sys.exit("error: tune_dkv_product.py times GPU kernels; no CUDA device here")
    run(a.heads, a.seqs, a.passes, a.reps, a.out, run_record(invocation(__file__, argv)))


if __name__ == "__main__":
    main()
