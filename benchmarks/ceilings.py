"""The GPU's measured ceilings, the yardsticks for the kernel tables (not a test).

    python benchmarks/ceilings.py [--out DIR]

bf16 and fp8 (e4m3, torch._scaled_mm) GEMM throughput, HBM copy bandwidth, the bandwidth of
gathering random 1 KB rows (the 512 latent dims of an MLA row in bf16, as the sparse attention
does) and the rate of relaxed fp32 atomic adds into random rows (as the dkv reduction does), both
with Triton kernels shaped like ours.
Writes ceilings.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import run_record, write_json  # noqa: E402


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


def measure(dev="cuda") -> dict:
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    res["bf16_gemm_tflops"] = 2 * n**3 / _time(lambda: a @ b) / 1e12
    a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=dev)
    res["fp8_gemm_tflops"] = 2 * n**3 / _time(
        lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e12
    del a, b, a8, b8
    src = torch.empty(1 << 30, device=dev, dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    res["hbm_copy_tbps"] = 2 * src.numel() * 4 / _time(lambda: dst.copy_(src), reps=5) / 1e12
    del src, dst
    rows, width, bk = 131072, 512, 32  # 131072 rows of 1 KB (bf16): 128 MB, more than the L2
    kv = torch.randn(rows, width, device=dev, dtype=torch.bfloat16)
    idx = torch.randint(0, rows, (1 << 24,), device=dev, dtype=torch.int32)
    out = torch.empty(idx.numel() // bk, device=dev)
    grid = (idx.numel() // bk,)
    res["gather_1KB_rows_tbps"] = idx.numel() * width * 2 / _time(
        lambda: _gather_rows_kernel[grid](kv, idx, out, W=width, BK=bk, num_warps=4), reps=5) / 1e12
    acc = torch.zeros(rows, width, device=dev, dtype=torch.float32)
    res["fp32_atomic_adds_per_s"] = idx.numel() * width / _time(
        lambda: _atomic_rows_kernel[grid](acc, idx, W=width, BK=bk, num_warps=4), reps=3)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    res = measure()
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "ceilings.json"), {**res, "run": run_record()})
    for k, v in res.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")


if __name__ == "__main__":
    main()
