#!/usr/bin/env python
"""Bytes moved per DSA layer per training step (forward + backward), per rank received.

Ours (megatron_dsa.parallel) vs megatron-core 0.19.2's DSA (indexer replicated on every TP
rank; under CP all-gather of the latent K/V and of the indexer keys). Only the traffic the
DSA core attention adds is counted: MLA's own sequence-parallel gathers of the latent KV
(identical in both designs) are left out. Formulas: see megatron_dsa/parallel/__init__.py.

    python scripts/comm_volume.py                    # small + 671B, 32K..128K, TP 8 / CP 4
    python scripts/comm_volume.py --tp 2 --cp 2 --model small --seq 32768
"""

from __future__ import annotations

import argparse

BF16, FP32, INT32 = 2, 4, 4

MODELS = {
    # H heads, Dqk = kv_lora + rope, Dv = kv_lora, HI, DI, K
    "small": dict(H=8, Dqk=128 + 32, Dv=128, HI=4, DI=64, K=512, hidden=512, q_lora=192),
    "671b": dict(H=128, Dqk=512 + 64, Dv=512, HI=64, DI=128, K=2048, hidden=7168, q_lora=1536),
}


def tp_bytes(m, S, tp, cp):
    """TP group traffic for one layer (sparse phase), per rank received, fwd + bwd."""
    f = (tp - 1) / tp
    s_cp = S // cp
    ours = {
        "indexer keys all-gather (+ grad reduce-scatter)": 2 * f * s_cp * m["DI"] * BF16,
        "top-k indices all-gather (int32)": f * s_cp * m["K"] * INT32,
        "sparse-KL partial p reduce-scatter (fp32)": f * s_cp * m["K"] * FP32,
    }
    alt_rows = 2 * 2 * f * s_cp * (m["H"] // tp) * (m["Dqk"] + m["Dv"]) * BF16  # (b) re-shard rows
    # megatron-core 0.19.2 (dsa.py:1273): the replicated indexer all-gathers x and qr over
    # the SP group (forward; inputs detached, so no backward traffic).
    mcore = {"x + qr all-gather (replicated indexer)": f * s_cp * (m["hidden"] + m["q_lora"]) * BF16}
    flops_ours = s_cp / tp * S * m["HI"] * m["DI"] * 2
    flops_mcore = s_cp * S * m["HI"] * m["DI"] * 2
    return ours, mcore, alt_rows, flops_ours, flops_mcore


def cp_bytes(m, S, cp, batch=1):
    """CP group traffic for one layer (sparse phase), per rank received, fwd + bwd."""
    f = (cp - 1) / cp
    s_cp = S // cp
    # Rows fetched: at most every selected row not owned here, at most the remote keys.
    remote_rows = min(f * S, s_cp * m["K"])
    ours = {
        "indexer keys all-gather (+ grad reduce-scatter)": 2 * f * S * m["DI"] * BF16,
        "selected-KV fetch: row ids (int64)": remote_rows * 8,
        "selected-KV fetch: rows (+ dKV rows back)": 2 * remote_rows * m["Dqk"] * BF16,
    }
    mcore = {
        "K/V latent all-gather (+ grad reduce-scatter)": 2 * f * S * m["Dqk"] * BF16,
        "indexer keys all-gather (+ grad reduce-scatter)": 2 * f * S * m["DI"] * BF16,
    }
    return ours, mcore


def gib(x):
    return x / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), action="append")
    ap.add_argument("--seq", type=int, action="append")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--cp", type=int, default=4)
    args = ap.parse_args()
    models = args.model or ["small", "671b"]
    seqs = args.seq or [32768, 65536, 131072]
    print(f"per rank, per layer, per step (fwd+bwd), sparse phase; TP={args.tp} (CP=1), CP={args.cp} (TP=1)")
    print(f"{'model':6} {'seq':>7} | {'TP ours':>10} {'TP (b) rows':>12} {'TP mcore':>10} "
          f"{'idx FLOP ours/mcore':>20} | {'CP ours':>10} {'CP mcore':>10} {'CP ratio':>9}")
    for name in models:
        m = MODELS[name]
        for S in seqs:
            t_ours, t_mcore, alt, fo, fm = tp_bytes(m, S, args.tp, 1)
            c_ours, c_mcore = cp_bytes(m, S, args.cp)
            to, tm = sum(t_ours.values()), sum(t_mcore.values())
            co, cm = sum(c_ours.values()), sum(c_mcore.values())
            print(
                f"{name:6} {S // 1024:>6}K | {gib(to):>8.3f}Gi {gib(alt):>10.3f}Gi {gib(tm):>8.3f}Gi "
                f"{fo / 1e12:>8.1f}T/{fm / 1e12:>7.1f}T | {gib(co):>8.3f}Gi {gib(cm):>8.3f}Gi {co / cm:>9.2f}"
            )
    print()
    print("TP ours = indexer-key all-gather + top-k index all-gather + sparse-KL partial-p reduce-scatter;")
    print("TP (b) = the alternative re-sharding attention by rows (q all-to-all + output back, fwd+bwd);")
    print("TP mcore = megatron-core replicates the indexer: all-gathers x and qr over TP, and every")
    print("           rank does ALL the indexer FLOPs (FLOP column, per rank: ours is 1/TP);")
    print("CP ours = indexer-key all-gather + fetch of the selected latent KV rows (fwd) and dKV (bwd);")
    print("CP mcore = all-gather of the latent K/V and indexer keys (+ reduce-scatter of their grads).")
    print("CP ours counts the WORST case (every remote row selected by some local query): with")
    print("S/CP x K >= S (long sequences) the union of the selections can reach all remote rows and")
    print("the fetch then moves as much as the all-gather; it saves when the union is smaller")
    print("(measure it with megatron_dsa.parallel.STATS['cp.kv_fetch.rows']).")
    print("Dense warm-up under CP uses the K/V all-gather (= CP mcore); under TP it adds one all-to-all")
    print("of the detached queries: (TP-1)/TP x S x H/TP x Dqk x 2 bytes.")


if __name__ == "__main__":
    main()
