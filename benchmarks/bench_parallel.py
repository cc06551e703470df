"""DSA training-step cost under tensor and context parallelism (not a test). Launch with torchrun:

    torchrun --nproc-per-node 8 benchmarks/bench_parallel.py --size small \\
        --layouts tp1,tp2,tp4,tp8,cp2,cp4,cp8,tp2cp2 --seqs 32768,65536,131072 --modes sparse,warmup

``--layer`` times the DSA layer's parallel parts instead, against the alternatives: the
TP-sharded indexer against a replicated one, and under CP the fetched KV rows against
all-gathering the KV (megatron-core's way); see ``run_layer_point``.

For every layout (TP x CP; the ranks left over are data-parallel replicas running the same
layout), sequence length and phase: forward + backward of the model on one sequence split the
way megatron-core splits it (CP: load-balanced chunks; TP: sequence parallel), random weights
and tokens. Per point: the slowest rank's median step time, the largest peak memory, the bytes
the DSA layers' own collectives received on one rank (``megatron_dsa.parallel.STATS``: the
indexer keys, top-k indices, partial targets, fetched KV rows; not megatron's linear-layer
TP/SP traffic) and the indexer FLOPs per rank. Rank 0 writes parallel_<size>_w<world>.json /
.md to --out. A point that runs out of memory is recorded as such and the sweep goes on.
Runs on CPU with gloo too (tiny sizes, for checking the script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import invocation, run_record, save_figure, write_atomic  # noqa: E402

PHASE_MODE = {"pretrain": "dense", "warmup": "warmup", "sparse": "sparse"}


def parse_layout(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(?:tp(\d+))?(?:cp(\d+))?", text)
    if not text or not m:
        raise SystemExit(f"error: bad layout {text!r} (examples: tp2, cp4, tp2cp2)")
    return int(m.group(1) or 1), int(m.group(2) or 1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_point(args, tp: int, cp: int, seq: int, phase: str, device) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsa.layer import pop_indexer_losses
    from megatron_dsa.model import build_model, dsa_layers, model_config
    from megatron_dsa.parallel import STATS, cp_split
    from megatron_dsa.train.trainer import freeze_for_phase

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    try:
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        gpu = device.type == "cuda"
        cfg = model_config(
            args.size, mdsa_mode=PHASE_MODE[phase], dsa_indexer_topk=args.topk,
            tensor_model_parallel_size=tp, context_parallel_size=cp,
            params_dtype=torch.bfloat16 if gpu else torch.float32, bf16=gpu,
        )
        model = build_model(args.size, cfg, max_seq_len=seq).to(device)
        freeze_for_phase(model, phase)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, model.vocab_size, (1, seq), generator=g).to(device)
        labels = tokens.roll(-1, dims=1)
        positions = torch.arange(seq, device=device)[None]
        cp_rank = ps.get_context_parallel_rank()
        tok, pos, lab = (cp_split(t, cp, cp_rank) for t in (tokens, positions, labels))

        def step():
            out = model(tok, pos, None, labels=lab)
            losses = pop_indexer_losses(model)
            loss = torch.stack(losses).sum() if phase == "warmup" else out.float().mean()
            loss.backward()
            for p in model.parameters():
                p.grad = None

        times, nbytes = [], 0
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup_iters + args.iters):
            for layer in dsa_layers(model):
                layer.indexer_flops = 0
            STATS.reset()
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if i >= args.warmup_iters:
                times.append(time.perf_counter() - t0)
                nbytes = STATS.total()
        flops = sum(layer.indexer_flops for layer in dsa_layers(model))
        res = {"ms": statistics.median(times) * 1e3, "dsa_bytes": nbytes, "indexer_flops": flops,
               "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}
        del model
        return res
    finally:
        ps.destroy_model_parallel()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _run_everywhere(point, world: int) -> tuple[list, str]:
    """Run one sweep point on this rank and gather every rank's result: (results, the first
    rank's error or ""). A point that fails is recorded and the sweep goes on."""
    try:
        mine = point()
    except torch.OutOfMemoryError:
        mine = {"error": "out of memory"}
    except Exception as exc:
        traceback.print_exc()
        mine = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone, next((r["error"] for r in everyone if "error" in r), "")


def _median_ms(fn, device, iters: int, warmup: int) -> float:
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_layer_point(args, tp: int, cp: int, seq: int, device) -> dict:
    """The DSA layer's parallel parts alone, on random tensors of --layer-dims, against the
    alternatives: the indexer top-k of the sequence-parallel shard (ours) vs of all CP-local
    rows (a replicated indexer); under CP, the sparse attention (fwd+bwd) on the selected KV rows
    fetched from their owners (ours) vs on the all-gathered KV (megatron-core's way), with the
    bytes each receives and a check that both give the same output."""
    from megatron.core import parallel_state as ps

    from megatron_dsa import ops as OPS
    from megatron_dsa.parallel import STATS, cp_positions
    from megatron_dsa.parallel.comm import ParallelContext
    from megatron_dsa.parallel.sharded import gather_indexer_keys, gather_kv, own_rows, tp_indexer_topk
    from megatron_dsa.parallel.fetch import fetch_selected

    H, DQK, DV, HI, DI = args.layer_dims
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    try:
        ctx = ParallelContext(tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
                              cp_group=ps.get_context_parallel_group() if cp > 1 else None)
        gpu = device.type == "cuda"
        dt = torch.bfloat16 if gpu else torch.float32
        # The CP-local rows' tensors are the same on every TP rank (each takes its rows of them);
        # the indexer keys of own rows differ from rank to rank.
        g = torch.Generator(device=device).manual_seed(1 + ctx.cp_rank)
        g_own = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())
        rnd = lambda *s, gen=g: torch.randn(*s, device=device, generator=gen)  # noqa: E731
        s_cp = seq // cp
        rows = own_rows(ctx, s_cp)
        qi, wi = rnd(1, s_cp, HI, DI).to(dt), rnd(1, s_cp, HI) * (HI * DI) ** -0.5
        ki = gather_indexer_keys(rnd(1, rows.stop - rows.start, DI, gen=g_own).to(dt), ctx, seq)
        q_pos = cp_positions(seq, cp, ctx.cp_rank, device)
        ops = OPS.backend("auto", device)

        def replicated():
            return ops.indexer_topk(qi, ki, wi, args.topk, q_pos=q_pos, ordered=False)

        def sharded():  # the layer's path: balanced row exchange, own rows' top-k, all-gather
            return tp_indexer_topk(ops, qi[:, rows], ki, wi[:, rows], q_pos, args.topk, ctx, [0])

        it, wu = args.iters, args.warmup_iters
        res = {"rows_sharded": rows.stop - rows.start, "rows_replicated": s_cp,
               "indexer_sharded_ms": _median_ms(sharded, device, it, wu),
               "indexer_replicated_ms": _median_ms(replicated, device, it, wu)}
        sel = replicated()
        res["same_topk"] = bool(torch.equal(sharded().sort(-1).values, sel.sort(-1).values))
        if cp > 1:
            q = rnd(1, s_cp, H // tp, DQK).to(dt).requires_grad_()
            kv = rnd(1, s_cp, DQK).to(dt).requires_grad_()
            gout = rnd(1, s_cp, H // tp, DV).to(dt)
            scale = DQK**-0.5

            def fetched():
                buf, idx, _ = fetch_selected(kv, sel, seq, ctx.cp_group)
                out, _ = ops.sparse_mla_attention(q, buf[None], idx, DV, scale)
                out.backward(gout)
                return out.detach()

            def allgathered():
                out, _ = ops.sparse_mla_attention(q, gather_kv(kv, ctx, seq), sel, DV, scale)
                out.backward(gout)
                return out.detach()

            outs = {}
            for name, fn in (("fetch", fetched), ("allgather", allgathered)):
                STATS.reset()
                outs[name] = fn().float()
                res[name + "_bytes"] = STATS.total()
                res[name + "_ms"] = _median_ms(fn, device, it, wu)
            tol = 1e-2 if gpu else 1e-5
            res["same_output"] = bool(torch.allclose(outs["fetch"], outs["allgather"], atol=tol, rtol=tol))
        return res
    finally:
        ps.destroy_model_parallel()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def write_layer_tables(args, rows: list, world: int, gpu: bool, final: bool) -> str:
    meta = {"layer_dims": args.layer_dims, "world": world, "topk": args.topk, "iters": args.iters,
            "device": torch.cuda.get_device_name() if gpu else "cpu (gloo)", "torch": torch.__version__,
            "complete": final, "run": args.run}
    H, DQK, DV, HI, DI = args.layer_dims
    lines = [f"# The DSA layer's parallel parts against the alternatives, {world} ranks, top-k {args.topk}", "",
             f"`torchrun --nproc-per-node {world} benchmarks/bench_parallel.py --layer --layer-dims "
             f"{','.join(map(str, args.layer_dims))} --layouts {args.layouts} --seqs {args.seqs} --topk {args.topk}` "
             f"on {meta['device']}: {H} heads (split over TP), latent {DQK}/{DV}, indexer {HI} x {DI}; slowest rank's "
             "median. Indexer: the top-k of this rank's half of the rows, causally balanced (blocks r and 2TP-1-r of "
             "2TP), with the row exchange and the index all-gather (ours), against all CP-local rows (replicated); "
             "same sets checked. KV under CP: the sparse attention fwd+bwd on the fetched selected rows (ours) against "
             "the all-gathered KV; MiB received by one rank.", "",
             "| seq | TP | CP | indexer ms: ours (rows) / replicated (rows) | ours / replicated | same top-k | "
             "sparse attention + KV ms: fetched / all-gathered | MiB received: fetched / all-gathered | same output |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['tp']} | {r['cp']} | {r['error']} | | | | | |")
            continue
        ix = (f"{r['indexer_sharded_ms']:.1f} ({r['rows_sharded']}) / "
              f"{r['indexer_replicated_ms']:.1f} ({r['rows_replicated']})")
        ratio = f"{r['indexer_sharded_ms'] / r['indexer_replicated_ms']:.2f}"
        same_k = "yes" if r.get("same_topk") else "NO"
        kv = mb = same = "-"
        if "fetch_ms" in r:
            kv = f"{r['fetch_ms']:.1f} / {r['allgather_ms']:.1f}"
            mb = f"{r['fetch_bytes'] / 2**20:.3g} / {r['allgather_bytes'] / 2**20:.3g}"
            same = "yes" if r["same_output"] else "NO"
        lines.append(f"| {r['seq']} | {r['tp']} | {r['cp']} | {ix} | {ratio} | {same_k} | {kv} | {mb} | {same} |")
    if not final:
        lines += ["", "(Sweep in progress or cut short: the rows above are the finished points.)"]
    md = "\n".join(lines) + "\n"
    stem = os.path.join(args.out, f"parallel_layer_w{world}")
    os.makedirs(args.out, exist_ok=True)
    for path, text in ((stem + ".json", json.dumps({"meta": meta, "rows": rows}, indent=2)), (stem + ".md", md)):
        write_atomic(path, text)
    return md


def write_tables(args, rows: list, world: int, gpu: bool, final: bool) -> str:
    """parallel_<size>_w<world>.json / .md under --out with the points so far (each file written
    whole, then renamed into place); returns the markdown."""
    meta = {"size": args.size, "world": world, "topk": args.topk, "iters": args.iters,
            "device": torch.cuda.get_device_name() if gpu else "cpu (gloo)", "torch": torch.__version__,
            "complete": final, "run": args.run}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"parallel_{args.size}_w{world}")
    lines = [f"# DSA step (fwd+bwd) of the {args.size} MoE under TP x CP, {world} ranks, top-k {args.topk}", "",
             f"`torchrun --nproc-per-node {world} benchmarks/bench_parallel.py --size {args.size} "
             f"--layouts {args.layouts} --seqs {args.seqs} --modes {args.modes} --topk {args.topk}` on {meta['device']}.",
             "Slowest rank's median; DSA bytes = what the DSA layers' own collectives received on one rank.", "",
             "| phase | seq | TP | CP | ms / step | peak GB | DSA MiB received | indexer GFLOP / rank |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['phase']} | {r['seq']} | {r['tp']} | {r['cp']} | {r['error']} | | | |")
        else:
            peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
            lines.append(f"| {r['phase']} | {r['seq']} | {r['tp']} | {r['cp']} | {r['ms']:.1f} | {peak} | "
                         f"{r['dsa_bytes'] / 2**20:.3g} | {r['indexer_flops'] / 1e9:.3g} |")
    if not final:
        lines += ["", "(Sweep in progress or cut short: the rows above are the finished points.)"]
    md = "\n".join(lines) + "\n"
    for path, text in ((stem + ".json", json.dumps({"meta": meta, "rows": rows}, indent=2)), (stem + ".md", md)):
        write_atomic(path, text)
    return md


def plot_steps(rows: list, path: str) -> None:
    """Step time per layout, one panel per phase, against the sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = sorted({r["phase"] for r in rows})
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for tp, cp in sorted({(r["tp"], r["cp"]) for r in rows if r["phase"] == phase}):
            pts = sorted((r["seq"], r["ms"]) for r in rows
                         if r["phase"] == phase and (r["tp"], r["cp"]) == (tp, cp) and "ms" in r)
            if pts:
                ax.plot(*zip(*pts), "o-", label="one rank" if tp * cp == 1 else f"TP={tp} CP={cp}")
        ax.set(xscale="log", yscale="log", xlabel="sequence", ylabel="ms / step", title=phase)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--layouts", default="tp1,tp2,cp2")
    p.add_argument("--seqs", default="32768,65536,131072")
    p.add_argument("--modes", default="sparse", help="phases: pretrain (dense), warmup, sparse")
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup-iters", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--layer", action="store_true",
                   help="time the DSA layer's parallel parts against the alternatives (replicated indexer, "
                        "all-gathered KV) instead of model steps; writes parallel_layer_w<world>.json / .md")
    p.add_argument("--layer-dims", default="16,576,512,64,128", metavar="H,DQK,DV,HI,DI",
                   help="--layer's shapes: heads, latent dims (keys, values), indexer heads and dim")
    args = p.parse_args(argv)
    args.run = run_record(invocation(__file__, argv))
    try:
        args.layer_dims = [int(x) for x in args.layer_dims.split(",")]
        assert len(args.layer_dims) == 5
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --layer-dims takes five integers H,DQK,DV,HI,DI, got {args.layer_dims!r}")
    layouts = [parse_layout(x) for x in args.layouts.split(",") if x]
    seqs = [int(s) for s in args.seqs.split(",") if s]
    phases = [m for m in args.modes.split(",") if m]
    bad = [m for m in phases if m not in PHASE_MODE]
    if bad:
        raise SystemExit(f"error: unknown phase(s) {bad}; one of {sorted(PHASE_MODE)}")
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("error: launch with torchrun (e.g. torchrun --nproc-per-node 2 benchmarks/bench_parallel.py)")
    world = int(os.environ["WORLD_SIZE"])
    for tp, cp in layouts:
        if world % (tp * cp):
            raise SystemExit(f"error: layout tp{tp}cp{cp} needs a multiple of {tp * cp} ranks, got {world}")
    for s in seqs:
        if s % (2 * max(cp for _, cp in layouts)):
            raise SystemExit(f"error: sequence {s} must split into 2 x CP chunks")

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        import patches

        patches.apply_cpu_patches()
    dist.init_process_group("nccl" if gpu else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    rank = dist.get_rank()
    rows = []
    if args.layer:
        for seq in seqs:
            for tp, cp in layouts:
                everyone, error = _run_everywhere(lambda: run_layer_point(args, tp, cp, seq, device), world)
                row = {"seq": seq, "tp": tp, "cp": cp}
                if error:
                    row["error"] = error
                else:  # slowest rank's times, largest bytes, every rank's output check
                    row.update({k: (all(r[k] for r in everyone) if isinstance(everyone[0][k], bool)
                                    else max(r[k] for r in everyone)) for k in everyone[0]})
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
                    write_layer_tables(args, rows, world, gpu, final=False)
        if rank == 0:
            print(write_layer_tables(args, rows, world, gpu, final=True))
        dist.barrier()
        dist.destroy_process_group()
        return 0
    for phase in phases:
        for seq in seqs:
            for tp, cp in layouts:
                everyone, error = _run_everywhere(lambda: run_point(args, tp, cp, seq, phase, device), world)
                row = {"phase": phase, "seq": seq, "tp": tp, "cp": cp}
                if error:
                    row["error"] = error
                else:
                    row.update(ms=max(r["ms"] for r in everyone), dsa_bytes=max(r["dsa_bytes"] for r in everyone),
                               indexer_flops=max(r["indexer_flops"] for r in everyone),
                               peak_gb=max((r["peak_gb"] or 0) for r in everyone) if gpu else None)
                rows.append(row)
                if rank == 0:  # the tables so far: a sweep cut short keeps its finished points
                    print(json.dumps(row), flush=True)
                    write_tables(args, rows, world, gpu, final=False)
    if rank == 0:
        print(write_tables(args, rows, world, gpu, final=True))
        plot_steps(rows, os.path.join(args.out, f"parallel_{args.size}_w{world}.png"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
