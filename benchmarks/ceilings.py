"""The GPU's measured ceilings, the yardsticks for the kernel tables (not a test).

    python benchmarks/ceilings.py [--out DIR] [--update]

bf16 and fp8 (e4m3, torch._scaled_mm) GEMM throughput, HBM copy bandwidth, the bandwidth of
gathering random 1 KB rows (the 512 latent dims of an MLA row in bf16, as the sparse attention
does) and the rate of relaxed fp32 atomic adds into random rows (as the dkv reduction does), both
with Triton kernels shaped like ours; the add rate also by the size of the target (8 MB to
256 MB): whether a target that fits the L2 takes adds faster, which the attention backward's
key ranges count on.
Writes ceilings.json and prints a table. ``--update`` measures only what the json lacks and keeps
the rest: the kernel tables refuse to merge rows measured at other ceilings, so a new ceiling
must not re-measure the old ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import run_record, write_json  # noqa: E402

ATOMIC_TARGETS_MB = (8, 16, 32, 64, 256)  # fp32 add targets: within one L2 half, the whole L2, far beyond


def _time(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 1e3  # seconds


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_rows_kernel(SRC, IDX, OUT, W: tl.constexpr, BK: tl.constexpr):
        # Gather BK random rows of W bf16 and reduce them (one float out): read bandwidth only.
        i = tl.load(IDX + tl.program_id(0) * BK + tl.arange(0, BK)).to(tl.int64)
        x = tl.load(SRC + i[:, None] * W + tl.arange(0, W)[None, :])
        tl.store(OUT + tl.program_id(0), tl.sum(tl.sum(x.to(tl.float32), axis=1), axis=0))

    @triton.jit
    def _atomic_rows_kernel(DST, IDX, W: tl.constexpr, BK: tl.constexpr):
        # Relaxed fp32 atomic adds of a [BK, W] tile into BK random rows, as a dkv reduction.
        i = tl.load(IDX + tl.program_id(0) * BK + tl.arange(0, BK)).to(tl.int64)
        v = tl.zeros((BK, W), tl.float32) + 1.0
        tl.atomic_add(DST + i[:, None] * W + tl.arange(0, W)[None, :], v, sem="relaxed")
except ImportError:  # pragma: no cover
    triton = None


def measure(skip=(), dev="cuda") -> dict:
    """Every ceiling not named in ``skip``, plus the device and torch version."""
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    n = 8192
    if "bf16_gemm_tflops" not in skip or "fp8_gemm_tflops" not in skip:
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        if "bf16_gemm_tflops" not in skip:
            res["bf16_gemm_tflops"] = 2 * n**3 / _time(lambda: a @ b) / 1e12
        if "fp8_gemm_tflops" not in skip:
            a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=dev)
            res["fp8_gemm_tflops"] = 2 * n**3 / _time(
                lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e12
            del a8, b8
        del a, b
    if "hbm_copy_tbps" not in skip:
        src = torch.empty(1 << 30, device=dev, dtype=torch.float32)  # 4 GiB
        dst = torch.empty_like(src)
        res["hbm_copy_tbps"] = 2 * src.numel() * 4 / _time(lambda: dst.copy_(src), reps=5) / 1e12
        del src, dst
    rows, width, bk = 131072, 512, 32  # 131072 rows of 1 KB (bf16): 128 MB, more than the L2
    grid = ((1 << 24) // bk,)
    if "gather_1KB_rows_tbps" not in skip:
        kv = torch.randn(rows, width, device=dev, dtype=torch.bfloat16)
        idx = torch.randint(0, rows, (1 << 24,), device=dev, dtype=torch.int32)
        out = torch.empty(grid[0], device=dev)
        res["gather_1KB_rows_tbps"] = idx.numel() * width * 2 / _time(
            lambda: _gather_rows_kernel[grid](kv, idx, out, W=width, BK=bk, num_warps=4), reps=5) / 1e12
        del kv, out
    if "fp32_atomic_adds_per_s" not in skip or "fp32_atomic_adds_per_s_by_target_mb" not in skip:
        by_mb = {}
        for mb in ATOMIC_TARGETS_MB:
            target_rows = (mb << 20) // (width * 4)  # the 256 MB target: 131072 rows, as above
            acc = torch.zeros(target_rows, width, device=dev, dtype=torch.float32)
            idx = torch.randint(0, target_rows, (1 << 24,), device=dev, dtype=torch.int32)
            by_mb[str(mb)] = idx.numel() * width / _time(
                lambda: _atomic_rows_kernel[grid](acc, idx, W=width, BK=bk, num_warps=4), reps=3)
            del acc
        if "fp32_atomic_adds_per_s" not in skip:
            res["fp32_atomic_adds_per_s"] = by_mb["256"]
        if "fp32_atomic_adds_per_s_by_target_mb" not in skip:
            res["fp32_atomic_adds_per_s_by_target_mb"] = by_mb
    return res


def merged(old: dict, measured: dict, record: dict) -> dict:
    """ceilings.json's content after a run that measured ``measured`` (its device and torch
    version, and what ``old`` lacked): ``old``'s ceilings kept, the new ones added, and the runs
    listed with what each measured."""
    old = dict(old)
    runs = old.pop("runs", [])
    if "run" in old:  # the record of a json written by one run
        runs.append(old.pop("run"))
    new = sorted(k for k in measured if k not in old and k not in ("device", "torch"))
    return {**measured, **old, "runs": [*runs, {**record, "measured": new}]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--update", action="store_true",
                    help="measure only the ceilings --out's ceilings.json lacks, keep the others")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: ceilings.py measures a GPU; no CUDA device here")
    path = os.path.join(args.out, "ceilings.json")
    old = {}
    if args.update and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("device") != torch.cuda.get_device_name():
            sys.exit(f"error: --update: {path} was measured on {old.get('device')!r}, not on "
                     f"{torch.cuda.get_device_name()!r}; measure them all again")
    res = merged(old, measure(skip=set(old)), run_record())
    os.makedirs(args.out, exist_ok=True)
    write_json(path, res)
    for k in res["runs"][-1]["measured"]:
        v = res[k]
        print(f"{k:36s} {v:.4g}" if isinstance(v, float) else f"{k:36s} {v}")


if __name__ == "__main__":
    main()
