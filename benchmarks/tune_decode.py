"""The paged decode step's pieces timed under several launch choices, side by side in one process
(not a test).

    python benchmarks/tune_decode.py [--batches 32,64] [--positions 131072] [--heads 128]
        [--stages index,topk,attn,dense] [--out benchmarks/results] [--name h200]

At DeepSeek-V3.2's attention shape (``bench_inference.V32``: FP8 indexer keys 64 heads x 128,
latent rows 512 + 64, top-k 2048, cache blocks of 64 rows), each piece of one decode step is
replayed as a CUDA graph:

index  ``paged_indexer_scores`` under the variants of ``INDEX_VARIANTS`` (keys per block, warps,
       pipelining stages, programs in all); every variant's scores are compared with the first's.
topk   ``select_topk`` of those scores, ordered by score and in position order (the set checked
       against ``torch.topk``'s k-th value).
attn   ``sparse_mla_decode`` over the selection under ``ATTN_VARIANTS`` (launch tiles, key
       splits), outputs compared with the first variant's.
dense  ``dense_mla_decode`` (the baseline, same attention kernel) at several key splits.

Each row has the piece's HBM bytes and its time at the ``--hbm-gbps`` ceiling. Writes
tune_decode_<name>.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_inference import V32, graphed, paged_setup, time_ms  # noqa: E402
from results_io import invocation, run_record, write_json  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions, Tiles  # noqa: E402

ONE_BLOCK_EACH = 1 << 30  # programs: as many as key blocks (one block per program)
# (label, decode_index tiles, programs)
INDEX_VARIANTS = [
    ("(64,4,1) 2112", (64, 4, 1), 2112),
    ("(64,4,1) one block each", (64, 4, 1), ONE_BLOCK_EACH),
    ("(64,4,1) 1056", (64, 4, 1), 1056),
    ("(64,4,1) 4224", (64, 4, 1), 4224),
    ("(64,4,2) 2112", (64, 4, 2), 2112),
    ("(64,8,1) 2112", (64, 8, 1), 2112),
    ("(32,4,1) 4224", (32, 4, 1), 4224),
    ("(128,4,1) 2112", (128, 4, 1), 2112),
    ("(128,8,1) 2112", (128, 8, 1), 2112),
]
# (label, decode_attn tiles or None for the default, key splits or None for the rule, the
# selection's row order: position (as the engine's decode asks) or score)
ATTN_VARIANTS = [
    ("default", None, None, "position"),
    ("splits 2", None, 2, "position"),
    ("splits 4", None, 4, "position"),
    ("(64,8,3)", (64, 8, 3), None, "position"),
]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(batches, positions, heads, stages, hbm_gbps, repeats):
    from megatron_dsa.kernels import decode as dec

    rows = []
    dev, dtype = "cuda", torch.bfloat16
    for position in positions:
        for batch in batches:
            kv, keys, scales, table, lengths, q, qi, wi = paged_setup(batch, position, heads, V32, dev, dtype)
            D, v = kv.shape[-1], V32["kv_lora_rank"]
            key_bytes = batch * position * (V32["indexer_dim"] + 4)
            base = dict(batch=batch, position=position, heads=heads)
            first = None
            for label, t, programs in INDEX_VARIANTS:
                opts = KernelOptions(decode_index=Tiles(*t))

                def fn():
                    return dec.paged_indexer_scores(qi, wi, keys, scales, table, lengths, options=opts,
                                                    programs=programs)
                out = fn()
                first = out if first is None else first
                fin = torch.isfinite(first)
                err = rel(out[fin], first[fin]) if torch.equal(torch.isfinite(out), fin) else float("nan")
                step, ok = graphed(fn)
                ms = time_ms(step, repeats)
                rows.append(dict(base, stage="index", variant=label, ms=ms, graphed=ok, rel_err=err,
                                 bytes=key_bytes, bound_ms=1e3 * key_bytes / (hbm_gbps * 1e9)))
                print(json.dumps(rows[-1]), flush=True)
            scores = first
            by_score = dec.select_topk(scores, V32["topk"])
            sel = dec.select_topk(scores, V32["topk"], ordered=False)  # as the engine's decode asks
            if "topk" in stages:
                kth = torch.topk(scores, V32["topk"], dim=-1).values[:, -1]
                picked = scores.gather(1, by_score.clamp_min(0).long())
                same = bool((picked >= kth[:, None]).all()) and bool((by_score >= 0).all()) and torch.equal(
                    by_score.sort(-1).values, sel)
                score_bytes = scores.numel() * 4
                for ordered in (True, False):
                    step, ok = graphed(lambda: dec.select_topk(scores, V32["topk"], ordered=ordered))
                    rows.append(dict(base, stage="topk", variant="radix, " + ("by score" if ordered else "position order"),
                                     ms=time_ms(step, repeats), graphed=ok, above_kth=same, bytes=score_bytes,
                                     bound_ms=1e3 * score_bytes / (hbm_gbps * 1e9)))
                    print(json.dumps(rows[-1]), flush=True)
            if "attn" in stages:
                ref = None
                row_bytes = batch * min(V32["topk"], position) * D * 2
                for label, t, splits, rows_in in ATTN_VARIANTS + [("default, rows by score", None, None, "score")]:
                    opts = KernelOptions(decode_attn=None if t is None else Tiles(*t))
                    idx = by_score if rows_in == "score" else sel

                    def fn():
                        return dec.sparse_mla_decode(q, kv, table, idx, v, D**-0.5, lengths=lengths, splits=splits,
                                                     options=opts)[0]
                    out = fn()
                    ref = out if ref is None else ref
                    step, ok = graphed(fn)
                    rows.append(dict(base, stage="attn", variant=label, ms=time_ms(step, repeats), graphed=ok,
                                     rel_err=rel(out.float(), ref.float()), bytes=row_bytes,
                                     bound_ms=1e3 * row_bytes / (hbm_gbps * 1e9)))
                    print(json.dumps(rows[-1]), flush=True)
            if "dense" in stages:  # the baseline shares the attention kernel: its key splits
                ref = None
                for splits in (None, 2, 4, 8):
                    def fn():
                        return dec.dense_mla_decode(q, kv, table, lengths, v, D**-0.5, splits=splits)[0]
                    out = fn()
                    ref = out if ref is None else ref
                    step, ok = graphed(fn)
                    row_bytes = batch * position * D * 2
                    rows.append(dict(base, stage="dense", variant=f"splits {splits or 'rule'}",
                                     ms=time_ms(step, repeats), graphed=ok, rel_err=rel(out.float(), ref.float()),
                                     bytes=row_bytes, bound_ms=1e3 * row_bytes / (hbm_gbps * 1e9)))
                    print(json.dumps(rows[-1]), flush=True)
            del kv, keys, scales, table, q, qi, wi, scores, sel, by_score
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="32,64")
    p.add_argument("--positions", default="131072")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--stages", default="index,topk,attn,dense")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--hbm-gbps", type=float, default=4290.0, help="HBM read ceiling (H200 measured: 4290)")
    p.add_argument("--name", default="h200")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("tune_decode times CUDA kernels: no GPU here")
    stages = a.stages.split(",")
    rows = run([int(x) for x in a.batches.split(",")], [int(x) for x in a.positions.split(",")], a.heads, stages,
               a.hbm_gbps, a.repeats)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"tune_decode_{a.name}.json")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=V32, hbm_gbps=a.hbm_gbps,
                run=run_record(invocation(__file__, argv)))
    write_json(path, dict(meta=meta, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
