"""Inference cost per token vs position for one attention layer at DeepSeek-V3.2's shape: DSA
(FP8 indexer over the paged keys, top-k, sparse absorbed-MLA decode) vs dense absorbed-MLA
decode over every cached row, decode and prefill (not a test).

    python benchmarks/bench_inference.py [--heads 128,16] [--batches 1,8,32,64]
        [--positions 1024,...,131072] [--prefill-chunk 2048] [--hbm-gbps 4800]
        [--out benchmarks/results] [--name h200] [--quick]

Shape: kv_lora_rank 512 + rope 64 latent rows (bf16), indexer 64 heads x 128 dims (keys FP8
with a per-token scale), top-k 2048; 128 heads, and 16 for one rank of TP=8.

decode   a paged cache of ``batch`` sequences each ``position`` tokens long (block size 64);
         one step: dsa = ``paged_indexer_topk`` (unordered, as the engine's decode asks) +
         ``sparse_mla_decode``, dense =
         ``dense_mla_decode`` (ours, ``megatron_dsa.kernels.decode``). ms per token = step / batch.
prefill  one chunk of ``--prefill-chunk`` queries ending at ``position``: dsa = the training
         kernels' ``indexer_topk`` + ``sparse_mla_attention`` over the latent rows, dense =
         PyTorch's fused attention over per-head keys and values (192 / 128 dims, as MLA
         prefill runs; the latent's up-projection not counted). ms per token = chunk / its tokens.

Each row carries its bound per token (``bound_ms_per_token``): the larger of its HBM bytes (the
latent rows read, dsa: top-k rows, dense: every cached row; plus dsa's indexer keys, FP8 + scale)
over ``--hbm-gbps`` and its FLOPs over the measured matrix ceilings. Other engines' DSA kernels (FlashInfer, sgl-kernel) are listed in the meta with
the reason they were not measured. Writes inference_<name>.json/.md/.png to --out; an
out-of-memory point is recorded as such and the sweep goes on. ``--quick``: tiny dims on the CPU
(the reference ops), to check the script itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import invocation, measured_by, run_record, save_figure, stamp_rows, write_atomic, write_json  # noqa: E402

DEFAULT_POSITIONS = "1024,2048,4096,8192,16384,32768,65536,131072"
V32 = dict(kv_lora_rank=512, rope=64, indexer_heads=64, indexer_dim=128, topk=2048, block_size=64, head_qk=192,
           head_v=128)
QUICK = dict(kv_lora_rank=32, rope=16, indexer_heads=4, indexer_dim=32, topk=16, block_size=8, head_qk=24, head_v=16)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, repeats: int) -> float:
    fn()  # compile / warm up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def graphed(fn):
    """``fn`` captured as a CUDA graph (after a warm-up on a side stream), so a decode step is
    timed as the GPU runs it, not as Python launches it; eager where capture fails."""
    if not torch.cuda.is_available():
        return fn, False
    from megatron_dsa.inference.graphs import capture

    try:
        graph, _ = capture(fn)
    except Exception as error:  # noqa: BLE001 - recorded in the row
        print(f"CUDA graph capture failed, timing eagerly: {error}", flush=True)
        torch.cuda.synchronize()
        return fn, False
    return graph.replay, True


def bound_ms_per_token(phase: str, impl: str, position: int, heads: int, shape: dict, chunk: int,
                       hbm_gbps: float, bf16_tflops: float, fp8_tflops: float) -> float:
    """The larger of the HBM-bytes and the FLOPs bound per token, in ms.

    decode  bytes: the latent rows read (dsa: the top-k rows; dense: every cached row) + the
            indexer keys read (dsa: every cached key, FP8 + scale).
    prefill FLOPs: dsa = FP8 indexer scoring over the cached keys + attention over the top-k latent
            rows (576 / 512 dims); dense = attention over every cached row (192 / 128 dims per
            head). Bytes: the cached rows and keys read once per chunk."""
    D, v = shape["kv_lora_rank"] + shape["rope"], shape["kv_lora_rank"]
    row = D * 2  # bf16
    key = shape["indexer_dim"] + 4  # e4m3 + fp32 scale
    selected = min(shape["topk"], position)
    if phase == "decode":
        nbytes = selected * row + position * key if impl == "dsa" else position * row
        flops = 2 * heads * (D + v) * (selected if impl == "dsa" else position)
        index_flops = 2 * shape["indexer_heads"] * shape["indexer_dim"] * position if impl == "dsa" else 0
    else:
        if impl == "dsa":
            nbytes = (position * row + position * key) / chunk
            flops = 2 * heads * (D + v) * selected
            index_flops = 2 * shape["indexer_heads"] * shape["indexer_dim"] * position
        else:
            nbytes = position * heads * (shape["head_qk"] + shape["head_v"]) * 2 / chunk
            flops = 2 * heads * (shape["head_qk"] + shape["head_v"]) * position
            index_flops = 0
    seconds = max(nbytes / (hbm_gbps * 1e9), flops / (bf16_tflops * 1e12) + index_flops / (fp8_tflops * 1e12))
    return 1e3 * seconds


def paged_setup(batch, position, heads, shape, device, dtype):
    from megatron_dsa import ops

    bs = shape["block_size"]
    per_seq = -(-position // bs)
    D = shape["kv_lora_rank"] + shape["rope"]
    kv = torch.randn(batch * per_seq, bs, D, device=device, dtype=dtype)
    keys, scales = ops.fp8_quantize(torch.randn(1, batch * per_seq * bs, shape["indexer_dim"], device=device))
    keys, scales = keys.view(batch * per_seq, bs, -1), scales.view(batch * per_seq, bs)
    table = torch.randperm(batch * per_seq, device=device).view(batch, per_seq).to(torch.int32)
    lengths = torch.full((batch,), position, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, D, device=device, dtype=dtype)
    qi = torch.randn(batch, shape["indexer_heads"], shape["indexer_dim"], device=device, dtype=dtype)
    wi = torch.randn(batch, shape["indexer_heads"], device=device)
    return kv, keys, scales, table, lengths, q, qi, wi


def decode_point(impl, batch, position, heads, shape, device, dtype, dec, repeats):
    kv, keys, scales, table, lengths, q, qi, wi = paged_setup(batch, position, heads, shape, device, dtype)
    D, v = kv.shape[-1], shape["kv_lora_rank"]
    scale = D**-0.5
    if impl == "dsa":
        def step():
            sel = dec.paged_indexer_topk(qi, wi, keys, scales, table, lengths, shape["topk"], ordered=False)
            return dec.sparse_mla_decode(q, kv, table, sel, v, scale)
    else:
        def step():
            return dec.dense_mla_decode(q, kv, table, lengths, v, scale)
    step, is_graphed = graphed(step)
    return time_ms(step, repeats) / batch, is_graphed


def prefill_point(impl, position, heads, shape, device, dtype, backend, chunk, repeats):
    chunk = min(chunk, position)
    D, v = shape["kv_lora_rank"] + shape["rope"], shape["kv_lora_rank"]
    if impl == "dsa":
        kv = torch.randn(1, position, D, device=device, dtype=dtype)
        q = torch.randn(1, chunk, heads, D, device=device, dtype=dtype)
        q_pos = torch.arange(position - chunk, position, device=device)
        qi = torch.randn(1, chunk, shape["indexer_heads"], shape["indexer_dim"], device=device, dtype=dtype)
        ki = torch.randn(1, position, shape["indexer_dim"], device=device, dtype=dtype)
        wi = torch.randn(1, chunk, shape["indexer_heads"], device=device)
        fp8 = backend.name != "reference"

        def run():
            sel = backend.indexer_topk(qi, ki, wi, shape["topk"], q_pos=q_pos, fp8=fp8)
            return backend.sparse_mla_attention(q, kv, sel, v, D**-0.5)
    else:
        # Dense MLA prefill as engines run it: per-head keys and values (nope + rope, value dims)
        # through PyTorch's fused attention, causal with the chunk's queries at the end. The
        # up-projection of the cached latent rows is not counted (in dense's favour).
        from torch.nn.attention.bias import causal_lower_right

        dqk, dv = shape["head_qk"], shape["head_v"]
        q = torch.randn(1, heads, chunk, dqk, device=device, dtype=dtype)
        k = torch.randn(1, heads, position, dqk, device=device, dtype=dtype)
        vv = torch.randn(1, heads, position, dv, device=device, dtype=dtype)
        bias = causal_lower_right(chunk, position)

        def run():
            return torch.nn.functional.scaled_dot_product_attention(q, k, vv, attn_mask=bias)
    with torch.no_grad():
        return time_ms(run, repeats) / chunk


def model_decode_rows(size: str, positions: list[int], device: str, repeats: int) -> list[dict]:
    """The whole model's decode step at batch 1 through the engine (paged cache, Triton decode
    kernels, CUDA graphs on a GPU), DSA vs dense, after a prefill of ``position`` random tokens."""
    from megatron_dsa.distributed import init_single_process
    from megatron_dsa.inference import DSAInference
    from megatron_dsa.model import build_model, model_config

    init_single_process()
    cuda = device == "cuda"
    overrides = dict(params_dtype=torch.bfloat16, bf16=True, mdsa_mode="sparse") if cuda else dict(mdsa_mode="sparse")
    torch.manual_seed(0)
    model = build_model(size, model_config(size, **overrides), max_seq_len=max(positions) + repeats + 8).to(device)
    rows = []
    for pos in positions:
        for impl in ("dsa", "dense"):
            rec = dict(heads=model.config.num_attention_heads, batch=1, position=pos, phase="decode", impl=impl,
                       model=size, graphed=cuda)
            try:
                engine = DSAInference(model, "sparse" if impl == "dsa" else "dense",
                                      kernel="triton" if cuda else "reference", cuda_graphs=cuda)
                tokens = torch.randint(0, model.vocab_size, (1, pos), device=device)
                logits, cache = engine.prefill(tokens, capacity=pos + repeats + 2)
                nxt = logits[:, -1].argmax(-1)

                def step():
                    return engine.decode(nxt, cache)

                rec["ms_per_token"] = time_ms(step, repeats)
                rec["s_per_million_tokens"] = rec["ms_per_token"] * 1e3
                del engine, cache, logits
            except torch.OutOfMemoryError:
                rec["error"] = "out of memory"
            except Exception as error:  # noqa: BLE001 - record and go on
                rec["error"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            if cuda:
                torch.cuda.empty_cache()
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    return rows


def other_engines() -> dict:
    """Other engines' DSA kernels: why they were not measured."""
    found = {}
    for name, module in (("flashinfer", "flashinfer"), ("sgl-kernel", "sgl_kernel")):
        if importlib.util.find_spec(module) is None:
            found[name] = "not installed on this machine (no network on the GPU machine)"
        else:
            found[name] = "installed; no row: its sparse MLA API is not wired into this benchmark yet"
    return found


def record_key(r: dict) -> tuple:
    return (r.get("model", "one layer"), r["heads"], r["phase"], r["batch"], r["position"], r["impl"])


def kept_records(path: str, meta: dict, new: list[dict]) -> tuple[list[dict], list[dict]]:
    """The records of the json at ``path`` that ``new`` does not measure again, and the records of
    the runs that measured them; refuses a table from another device or shape (its rows would not
    compare)."""
    with open(path) as f:
        old = json.load(f)
    for field in ("device", "shape"):
        if old["meta"].get(field) != meta[field]:
            raise SystemExit(f"error: --update: {path} was measured with {field} {old['meta'].get(field)!r}, "
                             f"this run with {meta[field]!r}")
    fresh = {record_key(r) for r in new}
    return [r for r in old["records"] if record_key(r) not in fresh], old["meta"].get("runs", [])


def write_markdown(path, meta, records):
    lines = [f"# Inference cost per token, one attention layer ({meta['device']})", "",
             f"Shape: {meta['shape']}; bounds at HBM {meta['hbm_gbps']} GB/s, bf16 {meta['bf16_tflops']} / fp8 "
             f"{meta['fp8_tflops']} TFLOP/s. Decode: {meta['decode_impl']}. Prefill: {meta['prefill_impl']}. Other engines: {meta['other_engines']}.", "",
             "| what | heads | phase | batch | position | dsa ms/token | dense ms/token | dense / dsa | dsa / its bound | dense / its bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {record_key(r): r for r in records}
    dates = sorted({r["measured"] for r in records if "measured" in r}, reverse=True)
    by = measured_by(meta.get("runs", []), records)
    if by:
        lines[-2:-2] = [*by, ""]
    if len(dates) > 1:
        runs = {d: sorted({f"{r['phase']} {r.get('model', str(r['heads']) + ' heads')}" for r in records
                           if r.get("measured") == d}) for d in dates}
        lines[-2:-2] = ["Measured " + "; ".join(f"{d}: {', '.join(w)}" for d, w in runs.items()) + ".", ""]
    for (what, heads, phase, batch, pos, impl), r in sorted(keyed.items()):
        if impl != "dsa":
            continue
        d = keyed.get((what, heads, phase, batch, pos, "dense"), {})
        head = f"| {what} | {heads} | {phase} | {batch} | {pos} |"
        if "ms_per_token" not in r or "ms_per_token" not in d:
            lines.append(f"{head} {r.get('error', r.get('ms_per_token'))} | {d.get('error', d.get('ms_per_token'))} | | | |")
            continue
        ratio = d["ms_per_token"] / r["ms_per_token"]
        bounds = (f"{r['ms_per_token'] / r['bound_ms_per_token']:.2f}x | {d['ms_per_token'] / d['bound_ms_per_token']:.2f}x"
                  if "bound_ms_per_token" in r else " | ")
        lines.append(f"{head} {r['ms_per_token']:.4f} | {d['ms_per_token']:.4f} | {ratio:.2f}x | {bounds} |")
    write_atomic(path, "\n".join(lines) + "\n")


def plot(records, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if "model" not in r]  # the plot is the one-layer sweep
    panels = sorted({(r["heads"], r["phase"]) for r in records})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (heads, phase) in zip(axes[0], panels):
        for impl in ("dsa", "dense"):
            for batch in sorted({r["batch"] for r in records if r["phase"] == phase}):
                pts = [(r["position"], 1e6 * r["ms_per_token"] / 1e3) for r in records
                       if (r["heads"], r["phase"], r["impl"], r["batch"]) == (heads, phase, impl, batch)
                       and "ms_per_token" in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", linestyle="-" if impl == "dsa" else "--",
                            label=f"{'DSA' if impl == 'dsa' else 'dense'} batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel("GPU seconds per million tokens")
        ax.set_title(f"{phase}, {heads} heads")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="128,16")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--positions", default=DEFAULT_POSITIONS)
    p.add_argument("--phases", default="decode,prefill")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--hbm-gbps", type=float, default=4290.0,
                   help="HBM bandwidth for the bound (H200, measured by benchmarks/ceilings.py: 4290)")
    p.add_argument("--bf16-tflops", type=float, default=791.0, help="bf16 matrix ceiling (H200 measured: 791)")
    p.add_argument("--fp8-tflops", type=float, default=1445.0, help="fp8 matrix ceiling (H200 measured: 1445)")
    p.add_argument("--name", default=None, help="results stem: inference_<name> (default: the device)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--model", default=None, help="also time this model size's whole decode step at batch 1 "
                   "(engine, paged cache, CUDA graphs), e.g. small")
    p.add_argument("--model-positions", default="1024,16384,131072")
    p.add_argument("--no-layer", dest="layer", action="store_false", help="skip the one-layer sweep")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny dims, short positions, the reference ops")
    p.add_argument("--kernel-options", default=None, metavar="JSON",
                   help="KernelOptions of the one-layer sweep as a JSON mapping, e.g. {\"decode_index\": [512, 8, 2]} (default: the measured defaults)")
    p.add_argument("--update", action="store_true",
                   help="keep the existing json's records this run does not measure (same device and shape): "
                        "a table measured in pieces; every record carries the date it was measured")
    args = p.parse_args(argv)
    try:
        heads = [int(x) for x in args.heads.split(",")]
        batches = [int(x) for x in args.batches.split(",")]
        positions = [int(x) for x in args.positions.split(",")]
    except ValueError:
        p.error("--heads, --batches and --positions take comma-separated integers")
    phases = args.phases.split(",")
    if any(x < 1 for x in heads + batches + positions) or args.prefill_chunk < 1 or args.repeats < 1:
        p.error("heads, batches, positions, --prefill-chunk and --repeats must be >= 1")
    if not set(phases) <= {"decode", "prefill"}:
        p.error("--phases takes decode and/or prefill")
    shape = dict(QUICK if args.quick else V32)
    if args.quick:
        heads, batches, positions, args.prefill_chunk, args.repeats = [8], [1, 2], [16, 48], 8, 1
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu" and not args.quick:
        p.error("the benchmark needs a GPU; --quick runs a tiny CPU check of the script")
    from megatron_dsa import ops
    from megatron_dsa.kernel_options import KernelOptions

    try:
        options = KernelOptions.from_dict(json.loads(args.kernel_options) if args.kernel_options else None)
    except ValueError as error:  # json.JSONDecodeError is one
        p.error(f"--kernel-options: {error}")
    kind = "reference" if args.quick else "triton"
    dec = ops.decode_backend(kind, torch.device(device), options)
    backend = ops.backend(kind, torch.device(device), options)
    dtype = torch.bfloat16
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", shape=shape, dtype="bf16",
                decode_impl=f"{dec.name}: megatron_dsa.kernels.decode (dense: ours, absorbed)",
                prefill_impl=f"{backend.name}: training kernels (dense: PyTorch SDPA, per-head 192/128 dims, "
                                 "latent up-projection not counted)",
                hbm_gbps=args.hbm_gbps, bf16_tflops=args.bf16_tflops, fp8_tflops=args.fp8_tflops,
                other_engines=other_engines(), prefill_chunk=args.prefill_chunk,
                kernel_options=json.loads(args.kernel_options) if args.kernel_options else {})
    records = []
    for h in (heads if args.layer else []):
        for phase in phases:
            for batch in (batches if phase == "decode" else [1]):
                for pos in positions:
                    for impl in ("dsa", "dense"):
                        rec = dict(heads=h, batch=batch, position=pos, phase=phase, impl=impl)
                        chunk = min(args.prefill_chunk, pos)
                        rec["bound_ms_per_token"] = bound_ms_per_token(phase, impl, pos, h, shape, chunk,
                                                                       args.hbm_gbps, args.bf16_tflops,
                                                                       args.fp8_tflops)
                        try:
                            if phase == "decode":
                                rec["ms_per_token"], rec["graphed"] = decode_point(impl, batch, pos, h, shape, device, dtype, dec,
                                                                   args.repeats)
                            else:
                                rec["ms_per_token"] = prefill_point(impl, pos, h, shape, device, dtype, backend,
                                                                    args.prefill_chunk, args.repeats)
                            rec["s_per_million_tokens"] = rec["ms_per_token"] * 1e3
                        except torch.OutOfMemoryError:
                            rec["error"] = "out of memory"
                        except Exception as error:  # noqa: BLE001 - record and go on
                            rec["error"] = f"{type(error).__name__}: {error}"
                            traceback.print_exc()
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        records.append(rec)
                        print(json.dumps(rec), flush=True)
    if args.model:
        model_positions = [16, 40] if args.quick else [int(x) for x in args.model_positions.split(",")]
        records += model_decode_rows(args.model, model_positions, device, args.repeats)
    today = time.strftime("%Y-%m-%d")
    for r in records:
        r.setdefault("measured", today)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"inference_{args.name or ('quick' if args.quick else 'gpu')}")
    kept, runs = [], []
    if args.update and os.path.exists(stem + ".json"):
        kept, runs = kept_records(stem + ".json", meta, records)
    meta["runs"] = stamp_rows(records, runs, run_record(invocation(__file__, argv)))
    records = kept + records
    write_json(stem + ".json", dict(meta=meta, records=records), indent=2)
    write_markdown(stem + ".md", meta, records)
    plot(records, stem + ".png", f"one DSA layer at DeepSeek-V3.2's shape, {meta['device']}")
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
