"""Training-step cost of the small MoE per phase and indexer layout, side by side (not a test).

    python benchmarks/bench_model_step.py [--size small] [--seq 16384] [--batch 1]
        [--topk 512] [--arms dense,warmup,sparse,warmup_shared,...] [--iters 5] [--out DIR]
        [--dense-kl blockwise,fused] [--recompute none|core_attn|mla_up_proj|full]

One process, one GPU, random weights and tokens (cost does not depend on them). Each arm is a
(phase, indexer layout) pair and is timed the way the trainer runs it: forward + backward with
the phase's trainable set (``freeze_for_phase``) and loss (LM loss; the summed indexer KL in
warm-up). The optimizer step is left out (the same for every arm but warm-up, where it touches
only the indexers). Median of ``--iters`` after ``--warmup-iters``; peak memory per arm.
``--precision bf16,fp8`` times every arm once per precision, labelled ``arm[fp8]``: fp8 is
Transformer Engine's FP8 for the linears (hybrid format, delayed scaling; the DSA core stays in
bf16), so it needs ``--transformer-impl transformer_engine`` (or auto with TE installed).
``--profile N`` adds, per arm, one profiled step's N most expensive operators (where the time goes).
``--saved N`` adds, per arm, what one step's autograd graph keeps for its backward (the tensors its
operators saved, each storage once, parameters left out) and the N operators that keep the most:
where a phase's memory beyond another's goes, on any device.
``--dense-kl`` lists the warm-up KL implementations to time (``mdsa_kernel_options.dense_kl``;
default: fused); with more than one, each warm-up arm runs once per implementation, labelled
``warmup[fused]`` etc. ``--compact-selection off,on`` likewise runs each sparse arm with its
selection kept int32 and in 16 bits a key (``sparse[int32]``, ``sparse[compact]``),
``--offload-selection off,on`` on the GPU and in pinned host memory (``sparse[gpu]``, ``sparse[host]``), and
``--workspace-mib 2048,512`` with each size of the kernels' chunked temporaries (``sparse[ws512]``):
what a smaller workspace saves of the peak and costs in time.
Writes model_step_<size>_<seq>.json / .md to --out.
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
from bench_recompute import RECOMPUTE  # noqa: E402  (the same recomputation settings)
from results_io import invocation, measured_by, run_record, stamp_rows, write_atomic, write_json  # noqa: E402

LAYOUTS = {
    "per_layer": {},
    "shared": {"mdsa_indexer_sharing": "shared"},
    "freq2": {"dsa_indexer_topk_freq": 2},
    "freq4": {"dsa_indexer_topk_freq": 4},
    # per-layer indexers trained with another warm-up objective
    "reverse_kl": {"mdsa_indexer_objective": "reverse_kl"},
    "mse": {"mdsa_indexer_objective": "mse"},
    "listwise": {"mdsa_indexer_objective": "listwise"},
}
PHASE_MODE = {"pretrain": "dense", "warmup": "warmup", "sparse": "sparse"}
# --precision name -> config fields (the trainer's fp8 section maps to the same fields)
PRECISIONS = {
    "bf16": {},
    "fp8": {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 16, "fp8_amax_compute_algo": "max"},
}
DEFAULT_ARMS = ("pretrain,warmup,sparse,warmup_shared,sparse_shared,warmup_freq2,sparse_freq2,"
                "warmup_freq4,sparse_freq4")


def parse_arm(arm: str) -> tuple[str, str]:
    phase, _, layout = arm.partition("_")  # e.g. warmup_reverse_kl
    layout = layout or "per_layer"
    if phase not in PHASE_MODE or layout not in LAYOUTS:
        raise SystemExit(f"error: bad arm {arm!r}: phase in {sorted(PHASE_MODE)}, layout in {sorted(LAYOUTS)}")
    return phase, layout


def step_fns(model, phase: str, tokens, labels, positions):
    """(forward, step): the phase's loss, and the loss after its backward."""
    from megatron_dsa.layer import pop_indexer_losses

    def forward():
        out = model(tokens, positions, None, labels=labels)
        if phase == "warmup":
            loss = torch.stack(pop_indexer_losses(model)).sum()
            # The LM loss is computed for logging only (as in the trainer).
            out.float().mean().item()
            return loss
        return out.float().mean()

    def step():
        loss = forward()
        loss.backward()
        return loss

    return forward, step


def _saved_by(node) -> list[torch.Tensor]:
    """The tensors one autograd node keeps for its backward: a custom Function's
    ``save_for_backward``, a built-in operator's ``_saved_*`` fields."""
    if hasattr(node, "saved_tensors"):
        return [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
    out = []
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                value = getattr(node, name)
            except RuntimeError:  # a field already released
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            out += [v for v in values if isinstance(v, torch.Tensor)]
    return out


def saved_for_backward(loss: torch.Tensor, params, top: int) -> dict:
    """What the graph behind ``loss`` keeps for its backward: GiB in all, and the ``top``
    operators by the bytes they keep (each storage counted once, by the first operator found to
    keep it; parameters left out). What a custom Function keeps as plain attributes is not seen."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: set[int] = set()
    by_op: dict[str, list[int]] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for t in _saved_by(node):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if not storage.nbytes() or key in param_storages or key in seen:
                continue
            seen.add(key)
            entry = by_op.setdefault(node.name(), [0, 0])
            entry[0] += storage.nbytes()
            entry[1] += 1
        stack.extend(fn for fn, _ in node.next_functions)
    ranked = sorted(by_op.items(), key=lambda kv: kv[1][0], reverse=True)
    return {"gib": sum(b for b, _ in by_op.values()) / 2**30,
            "top": [{"op": op, "gib": b / 2**30, "tensors": n} for op, (b, n) in ranked[:top]]}


def profile_step(step, cuda: bool, top: int) -> list[dict]:
    """One more step under torch.profiler: the ``top`` operators by their own (self) time on the
    device (CPU time without CUDA), i.e. where the step's time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    return [{"op": e.key[:90], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
            for e in events[:top] if getattr(e, attr) > 0]


def run_arm(args, arm: str, device, precision: str = "bf16", kernel_options: dict | None = None) -> dict:
    from megatron_dsa.layer import pop_indexer_losses
    from megatron_dsa.model import build_model, model_config
    from megatron_dsa.train.trainer import freeze_for_phase

    phase, layout = parse_arm(arm)
    overrides = dict(params_dtype=torch.bfloat16, bf16=True, mdsa_mode=PHASE_MODE[phase],
                     dsa_indexer_topk=args.topk, mdsa_kernel=args.kernel, transformer_impl=args.transformer_impl,
                     mdsa_kernel_options=kernel_options, **LAYOUTS[layout], **PRECISIONS[precision])
    if phase != "warmup":  # the warm-up keeps no activations to recompute (the config refuses it)
        overrides.update(RECOMPUTE[args.recompute])
    torch.manual_seed(0)
    model = build_model(args.size, model_config(args.size, **overrides), max_seq_len=args.seq).to(device)
    freeze_for_phase(model, phase)
    vocab = model.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(args.seq, device=device)[None].expand(args.batch, -1)
    forward, step = step_fns(model, phase, tokens, labels, positions)

    def zero():
        for p in model.parameters():
            p.grad = None
        pop_indexer_losses(model)

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup_iters + args.iters):
        zero()
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup_iters:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{arm}: non-finite loss {loss.item()}")
    ms = statistics.median(times) * 1e3
    tokens_per_step = args.batch * args.seq
    res = {"arm": arm, "phase": phase, "layout": layout, "ms": ms, "tokens_per_s": tokens_per_step / ms * 1e3,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), "times_ms": [t * 1e3 for t in times]}
    if args.profile:
        zero()
        res["profile"] = profile_step(step, cuda, args.profile)
    if args.saved:
        zero()
        loss = forward()
        res["saved"] = saved_for_backward(loss, list(model.parameters()), args.saved)
        loss.backward()
        del loss
    del model, step, forward
    if cuda:
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--topk", type=int, default=512)
    p.add_argument("--kernel", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--arms", default=DEFAULT_ARMS)
    p.add_argument("--dense-kl", default=None,
                   help="comma list of the warm-up's dense indexer KL implementations to time: blockwise "
                        "(PyTorch) and/or fused (Triton); default: fused")
    p.add_argument("--compact-selection", default=None,
                   help="comma list of off,on: the sparse arms keep their selection for the backward in 16 bits a key "
                        "or int32 (mdsa_kernel_options.compact_selection; default: the option's default); with both, "
                        "each sparse arm runs once per value, labelled sparse[compact] etc.")
    p.add_argument("--offload-selection", default=None,
                   help="comma list of off,on: the sparse arms keep their selection for the backward in pinned host "
                        "memory or on the GPU (mdsa_kernel_options.offload_selection; default: the option's default); "
                        "with both, each sparse arm runs once per value, labelled sparse[host] / sparse[gpu]")
    p.add_argument("--workspace-mib", default=None,
                   help="comma list of mdsa_kernel_options.workspace_bytes for the sparse arms, in MiB (the largest "
                        "temporary the kernels split into chunks of rows: the indexer's scores, the backward's stored "
                        "scores); with several, each sparse arm runs once per value, labelled sparse[ws512] etc.")
    p.add_argument("--transformer-impl", default="auto", choices=("auto", "local", "transformer_engine"))
    p.add_argument("--precision", default="bf16", help=f"comma list of {list(PRECISIONS)} (fp8: TE's FP8 linears)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one more step per arm and list its N most expensive operators")
    p.add_argument("--saved", type=int, default=0, metavar="N",
                   help="after timing, list what one more step keeps for its backward: the total and the N "
                        "operators that keep the most")
    p.add_argument("--warmup-iters", type=int, default=2)
    p.add_argument("--update", action="store_true",
                   help="keep the existing json's rows of the arms this run does not measure (same settings): "
                        "a table measured in pieces; every row carries the date it was measured")
    p.add_argument("--recompute", default="none", choices=tuple(RECOMPUTE),
                   help="megatron-core's activation recomputation for the pretrain and sparse arms "
                        "(as bench_recompute.py: core_attn / mla_up_proj = selective, full = every layer)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.profile < 0 or args.saved < 0:
        raise SystemExit("error: --profile and --saved take a count >= 0")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        parse_arm(a)
    from megatron_dsa.distributed import init_single_process
    from megatron_dsa.kernel_options import DENSE_KL, KernelOptions

    kls = [k.strip() for k in (args.dense_kl or KernelOptions().dense_kl).split(",") if k.strip()]
    bad = [k for k in kls if k not in DENSE_KL]
    if bad or not kls:
        raise SystemExit(f"error: --dense-kl takes a comma list of {list(DENSE_KL)}, got {args.dense_kl!r}")
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if not precisions or any(x not in PRECISIONS for x in precisions):
        raise SystemExit(f"error: --precision takes a comma list of {list(PRECISIONS)}, got {args.precision!r}")
    # The sparse phase's on/off choices of what its backward keeps: (option, flag, labels off / on).
    switches = [("compact_selection", "compact-selection", ("int32", "compact")),
                ("offload_selection", "offload-selection", ("gpu", "host"))]
    chosen = {}
    for option, flag, _ in switches:
        given = getattr(args, option)
        values = [x.strip() for x in (given or "").split(",") if x.strip()]
        if any(x not in ("off", "on") for x in values) or (given is not None and not values):
            raise SystemExit(f"error: --{flag} takes a comma list of off,on, got {given!r}")
        chosen[option] = [x == "on" for x in values]
    workspaces = [x.strip() for x in (args.workspace_mib or "").split(",") if x.strip()]
    if any(not x.isdigit() or int(x) < 1 for x in workspaces) or (args.workspace_mib is not None and not workspaces):
        raise SystemExit(f"error: --workspace-mib takes a comma list of sizes >= 1 (MiB), got {args.workspace_mib!r}")
    # The sparse arms' kernel options and labels: every combination of the values asked for (a
    # label only where a choice has several values).
    sparse_variants = [({}, [])]
    for option, _, labels in switches:
        values = chosen[option]
        if values:
            sparse_variants = [({**o, option: v}, t + ([labels[v]] if len(values) > 1 else []))
                               for o, t in sparse_variants for v in values]
    sparse_variants = [({**o, **({} if ws is None else {"workspace_bytes": int(ws) << 20})},
                        t + ([f"ws{ws}"] if ws is not None and len(workspaces) > 1 else []))
                       for o, t in sparse_variants for ws in (workspaces or [None])]
    # (arm, kernel options, precision) runs: only the warm-up's KL objective has two implementations,
    # only the sparse phase keeps a selection for its backward.
    runs = []
    for arm in arms:
        phase, layout = parse_arm(arm)
        has_kl = phase == "warmup" and layout not in ("reverse_kl", "mse", "listwise")
        for prec in precisions:
            for k in (kls if has_kl else kls[:1]):
                for sparse_opts, sparse_tags in (sparse_variants if phase == "sparse" else [({}, [])]):
                    opts = {"dense_kl": k, **sparse_opts}
                    tags = ([k] if has_kl and len(kls) > 1 else []) + ([prec] if len(precisions) > 1 else []) + sparse_tags
                    runs.append((arm, opts, prec, f"{arm}[{','.join(tags)}]" if tags else arm))
    init_single_process()
    # CPU only for checking the script itself at tiny sizes (--size tiny --seq 64).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for arm, opts, prec, name in runs:
        try:
            r = run_arm(args, arm, device, prec, opts)
            r.update(arm=name, dense_kl=opts["dense_kl"], precision=prec,
                     **{option: opts[option] for option, _, _ in switches if option in opts},
                     **({"workspace_mib": opts["workspace_bytes"] >> 20} if "workspace_bytes" in opts else {}))
        except torch.OutOfMemoryError:
            r = {"arm": name, "error": "out of memory"}
            torch.cuda.empty_cache()
        except Exception as exc:  # recorded, the sweep goes on
            traceback.print_exc()
            r = {"arm": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "times_ms"}), flush=True)
    meta = {"size": args.size, "seq": args.seq, "batch": args.batch, "topk": args.topk, "kernel": args.kernel,
            "recompute": args.recompute, "iters": args.iters,
            "dense_kl": ",".join(kls), "precision": ",".join(precisions),
            **{option: ",".join("on" if v else "off" for v in chosen[option]) for option, _, _ in switches
               if chosen[option]},
            **({"workspace_mib": ",".join(workspaces)} if workspaces else {}),
            "transformer_impl": args.transformer_impl,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    today = time.strftime("%Y-%m-%d")
    for r in rows:
        r["measured"] = today
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"model_step_{args.size}_{args.seq}")
    kept, runs = [], []
    if args.update and os.path.exists(stem + ".json"):
        kept, runs = kept_rows(stem + ".json", meta, rows)
    meta["runs"] = stamp_rows(rows, runs, run_record(invocation(__file__, argv)))
    rows = kept + rows
    write_json(stem + ".json", {"meta": meta, "rows": rows}, indent=2)
    text = render_markdown(meta, rows)
    write_atomic(stem + ".md", text)
    print(text)
    return 0


UPDATE_SAME = ("size", "seq", "batch", "topk", "recompute", "device", "transformer_impl")


def kept_rows(path: str, meta: dict, new: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of the json at ``path`` whose arms this run does not measure again, and the
    records of the runs that measured them; refuses a table measured with other settings (its
    rows would not compare)."""
    with open(path) as f:
        old = json.load(f)
    for field in UPDATE_SAME:
        if old["meta"].get(field) != meta[field]:
            raise SystemExit(f"error: --update: {path} has {field} {old['meta'].get(field)!r}, this run {meta[field]!r}")
    fresh = {r["arm"] for r in new}
    return [r for r in old["rows"] if r["arm"] not in fresh], old["meta"].get("runs", [])


def _step_counts(meta: dict, rows: list[dict]) -> str:
    """How many timed steps each arm's median is over: one number, or per arm where they differ."""
    counts = {r["arm"]: len(r["times_ms"]) for r in rows if r.get("times_ms")}
    if len(set(counts.values())) > 1:
        return ", ".join(f"{n} ({arm})" for arm, n in counts.items())
    return str(next(iter(counts.values()), meta.get("iters", "?")))


def render_markdown(meta: dict, rows: list[dict]) -> str:
    base = next((r["ms"] for r in rows if r.get("arm") == "pretrain" and "ms" in r), None)
    recompute = meta.get("recompute", "none")
    lines = [f"# Training step (fwd+bwd) of the {meta['size']} MoE, {meta['batch']} x {meta['seq']} tokens, top-k {meta['topk']}",
             "", f"`python benchmarks/bench_model_step.py --size {meta['size']} --seq {meta['seq']} --batch {meta['batch']} "
             f"--topk {meta['topk']} --dense-kl {meta['dense_kl']} --precision {meta['precision']} --transformer-impl {meta['transformer_impl']}"
             f"{' --recompute ' + recompute if recompute != 'none' else ''}"
             f"{' --compact-selection ' + meta['compact_selection'] if meta.get('compact_selection') else ''}"
             f"{' --offload-selection ' + meta['offload_selection'] if meta.get('offload_selection') else ''}"
             f"{' --workspace-mib ' + meta['workspace_mib'] if meta.get('workspace_mib') else ''}"
             f"` on {meta['device']}, torch {meta['torch']}; "
             f"median of {_step_counts(meta, rows)}" + (" (the recomputation applies to the pretrain and sparse arms)"
                                                       if recompute != "none" else "") + ".", ""]
    by = measured_by(meta.get("runs", []), rows)
    lines += [*by, ""] if by else []
    dates = sorted({r["measured"] for r in rows if "measured" in r}, reverse=True)
    if len(dates) > 1:
        lines += ["Measured " + "; ".join(f"{d}: {', '.join(r['arm'] for r in rows if r.get('measured') == d)}"
                                          for d in dates) + ".", ""]
    lines += ["| arm | phase | indexer layout | ms / step | tokens/s | vs dense pretrain | peak GB |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arm']} | | | {r['error']} | | | |")
            continue
        rel = f"{base / r['ms']:.2f}x" if base else ""
        lines.append(f"| {r['arm']} | {r['phase']} | {r['layout']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{rel} | {r['peak_gb']:.1f} |")
    for r in rows:
        if r.get("profile"):
            lines += ["", f"Where the time of one `{r['arm']}` step goes (torch.profiler, self time per operator, "
                          f"{'device' if meta['device'] != 'cpu' else 'CPU'}):", "",
                      "| operator | ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{x['op']}` | {x['ms']:.2f} | {x['share']:.0%} | {x['calls']} |" for x in r["profile"]]
    for r in rows:
        if r.get("saved"):
            lines += ["", f"What one `{r['arm']}` step keeps for its backward: {r['saved']['gib']:.2f} GiB "
                          "(autograd's saved tensors, each storage once, parameters left out); the operators "
                          "keeping the most:", "", "| operator | GiB | tensors |", "|---|---|---|"]
            lines += [f"| `{x['op']}` | {x['gib']:.3f} | {x['tensors']} |" for x in r["saved"]["top"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
