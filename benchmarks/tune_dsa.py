"""Per-kernel timings and launch-config variants at one sequence length (not a test).

    python benchmarks/tune_dsa.py [--seq 131072] [--out DIR]

Times: indexer scoring alone vs scoring + selection (bf16 / fp8, several tile configs),
sparse attention forward / backward (dkv by tl.atomic_add, by paired red.v2 PTX, or skipped),
sparse KL forward / backward.  Checks the red.v2 path against tl.atomic_add.  Writes tune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_dsa import DV, TOPK, cuda_time, make_inputs  # noqa: E402
from megatron_dsa.kernels import indexer as I  # noqa: E402
from megatron_dsa.kernels import indexer_kl as L  # noqa: E402
from megatron_dsa.kernels import sparse_attn as A  # noqa: E402


def indexer_ab(seqs, out, reps):
    """The indexer top-k's variants side by side: the previous selection (5 passes over each
    row), the spilled candidates (3 passes), and without the final score sort; then the scoring
    kernel alone in several launch configs.  Checks that every variant returns the previous
    path's indices."""
    res = {}
    path = os.path.join(out, "tune_indexer.json")
    variants = [("previous", 0, True), ("spill", 4096, True), ("spill+unordered", 4096, False)]  # name, CAP, ordered
    score_cfgs = [
        dict(BM=64, BN=256, num_warps=8, num_stages=3),
        dict(BM=64, BN=128, num_warps=4, num_stages=3),
        dict(BM=64, BN=64, num_warps=4, num_stages=3),
        dict(BM=128, BN=128, num_warps=8, num_stages=3),
        dict(BM=64, BN=128, num_warps=8, num_stages=3),
    ]
    for S in seqs:
        t = make_inputs(S)
        qi, ki, wi = t.qi.detach(), t.ki.detach(), t.wi.detach()
        for kind, fp8 in (("bf16", False), ("fp8", True)):
            r = {}
            base = None
            for name, cap, ordered in variants:
                I.SELECT_CFG["CAP"] = cap
                run = lambda: I.indexer_topk(qi, ki, wi, TOPK, fp8=fp8, ordered=ordered)  # noqa: E731
                r[name + "_ms"], _ = cuda_time(run, reps=reps)
                got = run()
                if base is None:
                    base = got
                elif ordered:
                    r[name + "_equal"] = bool(torch.equal(got, base))
                else:
                    r[name + "_equal_sets"] = bool(torch.equal(got.sort(-1).values, base.sort(-1).values))
                del got
            del base
            I.SELECT_CFG["CAP"] = 4096
            default = dict(I.SCORE_CFG[kind])
            I._TIMING_SKIP_SELECT = True
            for cfg in score_cfgs:
                I.SCORE_CFG[kind] = cfg
                key = "score_only_BM{BM}_BN{BN}_w{num_warps}_s{num_stages}_ms".format(**cfg)
                try:
                    r[key], _ = cuda_time(lambda: I.indexer_topk(qi, ki, wi, TOPK, fp8=fp8), reps=reps)
                except Exception as e:  # e.g. out of shared memory
                    r[key] = repr(e)[:200]
            I._TIMING_SKIP_SELECT = False
            I.SCORE_CFG[kind] = default
            res[f"{S}_{kind}"] = r
            print(S, kind, r, flush=True)
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
        del t, qi, ki, wi
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--indexer-ab", default=None, metavar="SEQS",
                    help="only the indexer variants at these lengths (comma list); writes tune_indexer.json")
    a = ap.parse_args()
    if a.indexer_ab:
        indexer_ab([int(s) for s in a.indexer_ab.split(",")], a.out, a.reps)
        return
    S = a.seq
    res = {"seq": S}
    t = make_inputs(S)
    qi, ki, wi = t.qi.detach(), t.ki.detach(), t.wi.detach()

    def rec(k, v):
        res[k] = v
        print(k, v, flush=True)
        with open(os.path.join(a.out, "tune.json"), "w") as f:
            json.dump(res, f, indent=1)

    # ---- indexer
    variants = [
        dict(BM=64, BN=128, num_warps=8, num_stages=3),
        dict(BM=128, BN=128, num_warps=8, num_stages=3),
        dict(BM=64, BN=256, num_warps=8, num_stages=3),
        dict(BM=128, BN=64, num_warps=4, num_stages=4),
        dict(BM=128, BN=256, num_warps=8, num_stages=2),
    ]
    for kind, fp8 in (("bf16", False), ("fp8", True)):
        for v in variants:
            I.SCORE_CFG[kind] = v
            name = f"idx_{kind}_BM{v['BM']}_BN{v['BN']}_w{v['num_warps']}_s{v['num_stages']}"
            try:
                I._TIMING_SKIP_SELECT = True
                ms_s, _ = cuda_time(lambda: I.indexer_topk(qi, ki, wi, TOPK, fp8=fp8), reps=a.reps)
                I._TIMING_SKIP_SELECT = False
                ms_f, _ = cuda_time(lambda: I.indexer_topk(qi, ki, wi, TOPK, fp8=fp8), reps=a.reps)
                rec(name, {"score_ms": ms_s, "full_ms": ms_f})
            except Exception as e:
                I._TIMING_SKIP_SELECT = False
                rec(name, {"error": repr(e)[:300]})
        I.SCORE_CFG[kind] = variants[0]
    for tile, nw in ((2048, 8), (4096, 8), (1024, 4)):
        I.SELECT_CFG = dict(TILE=tile, num_warps=nw, CAP=4096)
        try:
            ms_f, _ = cuda_time(lambda: I.indexer_topk(qi, ki, wi, TOPK), reps=a.reps)
            rec(f"select_TILE{tile}_w{nw}", {"full_ms": ms_f})
        except Exception as e:
            rec(f"select_TILE{tile}_w{nw}", {"error": repr(e)[:300]})
    I.SELECT_CFG = dict(TILE=2048, num_warps=8, CAP=4096)

    idx = I.indexer_topk(qi, ki, wi, TOPK)
    q, kv = t.q.detach(), t.kv.detach()
    # ---- attention forward configs
    for cfg in (None, (64, 4, 2), (32, 4, 2), (16, 4, 2)):
        A.FWD_CFG = cfg
        try:
            ms, _ = cuda_time(lambda: A.sparse_attn_fwd(q, kv, idx, DV, t.scale), reps=a.reps)
            rec(f"attn_fwd_{cfg}", ms)
        except Exception as e:
            rec(f"attn_fwd_{cfg}", repr(e)[:300])
    A.FWD_CFG = None
    out, lse = A.sparse_attn_fwd(q, kv, idx, DV, t.scale)
    # ---- attention backward: atomic modes and configs
    ref = None
    from megatron_dsa.kernels import _common as C, _csr

    for mode in (0, 2, 1, "sorted"):
        C.REDUCE_MODE = "sorted" if mode == "sorted" else "atomic"
        A.ATOMIC_MODE = 0 if mode == "sorted" else mode
        _csr.clear_cache()  # time the CSR build too (one per bwd call in the pipeline)
        try:
            ms, _ = cuda_time(lambda: A.sparse_attn_bwd(q, kv, idx, out, lse, t.gout, DV, t.scale), reps=a.reps)
            entry = {"ms": ms}
            if mode != 1:
                dq, dkv = A.sparse_attn_bwd(q, kv, idx, out, lse, t.gout, DV, t.scale)
                if ref is None:
                    ref = (dq.float(), dkv.float())
                else:
                    entry["dq_rel"] = ((dq.float() - ref[0]).norm() / ref[0].norm()).item()
                    entry["dkv_rel"] = ((dkv.float() - ref[1]).norm() / ref[1].norm()).item()
            rec(f"attn_bwd_atomic{mode}", entry)
        except Exception as e:
            rec(f"attn_bwd_atomic{mode}", repr(e)[:300])
    C.REDUCE_MODE = "sorted"
    A.ATOMIC_MODE = 0
    for cfg in ((16, 8, 2), (32, 4, 2), (64, 8, 2)):
        A.BWD_CFG = cfg
        try:
            ms, _ = cuda_time(lambda: A.sparse_attn_bwd(q, kv, idx, out, lse, t.gout, DV, t.scale), reps=a.reps)
            rec(f"attn_bwd_cfg{cfg}", ms)
        except Exception as e:
            rec(f"attn_bwd_cfg{cfg}", repr(e)[:300])
    A.BWD_CFG = None
    # ---- sparse KL
    qi_g = t.qi.detach().requires_grad_()
    ki_g = t.ki.detach().requires_grad_()
    wi_g = t.wi.detach().requires_grad_()
    ms, _ = cuda_time(lambda: L.sparse_indexer_kl(q, kv, qi_g, ki_g, wi_g, idx, t.scale), reps=a.reps)
    rec("kl_fwd", ms)
    ms, _ = cuda_time(lambda: L.sparse_indexer_kl(q, kv, qi_g, ki_g, wi_g, idx, t.scale, lse=lse), reps=a.reps)
    rec("kl_fwd_lse_reused", ms)
    kl = L.sparse_indexer_kl(q, kv, qi_g, ki_g, wi_g, idx, t.scale)
    ms, _ = cuda_time(lambda: torch.autograd.grad(kl, (qi_g, ki_g, wi_g), t.gkl, retain_graph=True), reps=a.reps)
    rec("kl_bwd", ms)
    for mode in ("atomic", "sorted"):
        C.KL_REDUCE_MODE = mode
        ms, _ = cuda_time(lambda: torch.autograd.grad(kl, (qi_g, ki_g, wi_g), t.gkl, retain_graph=True), reps=a.reps)
        rec(f"kl_bwd_{mode}", ms)
    C.KL_REDUCE_MODE = None


if __name__ == "__main__":
    main()
