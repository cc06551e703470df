"""The DSA attention core, forward + backward, side by side on one GPU (not a test).

    python benchmarks/bench_dsa.py --heads 16,32,64,128 --seqs 4096,16384,32768,65536,131072
        [--tp8] [--pattern] [--megatron-seqs 1024] [--tilelang-seqs ...] [--out DIR]

One row per (query heads, length): ours with the FP8 and the bf16 indexer (indexer top-k +
sparse MLA attention + sparse indexer KL, forward and backward), dense causal SDPA with the same
heads (MLA's MHA form, fused flash attention), and megatron-core 0.19.2's DSA with its default or
TileLang kernels where asked for and installed. Batch 1, bf16, random inputs, at one released
model's attention shape (``--model``, read from ``megatron_dsa.model.SIZES``): DeepSeek-V3.2 by
default (latent 576 / 512, indexer 64 x 128, top-k 2048; dense 192 / 128 a head) or GLM-5 (the
same latent and top-k, indexer 32 x 128; dense 256 / 256 a head).
Each row gives the time of every stage against its bound at the card's measured ceilings
(``ceilings.json``: FLOPs at the GEMM rate, gathered bytes at the gather rate, dkv adds at the
atomic rate into a target that L2 holds), TFLOP/s and the peak memory beyond the step's inputs,
outputs and gradients.
``--tp8``: also the per-rank case of TP=8 at 16 heads (the indexer scores the rows one of 8 ranks
scores under the causally balanced split; attention and KL as the rank runs them).
``--pattern``: also the attention stages on a selection shaped like a trained indexer's
(a local window, the first tokens and the rest spread), against random selections, and the
FP8 top-k of indexer inputs whose scores rise with the key's position (a recency bias).
``--kl-two-pass``: also the step with the sparse KL's target from its own pass over the selected
rows in the forward (the form before the attention's backward supplied it).
Writes dsa_<gpu>.json, .md and .png to --out (default benchmarks/results), named after the GPU
(dsa_h200.*; another model's dsa_h200_<model>.*). The stages' bounds use --out's ceilings.json,
which must come from the same GPU (the H100's table lives in results/h100 beside its own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dsa import kernels as KN  # noqa: E402
from megatron_dsa.flops import dense_attention_flops, dsa_flops  # noqa: E402
from megatron_dsa.kernel_options import DEFAULT_OPTIONS, KernelOptions  # noqa: E402
from megatron_dsa.parallel import ParallelContext  # noqa: E402
from megatron_dsa.parallel.sharded import own_rows_target  # noqa: E402
from results_io import device_tag, measured_by, save_figure, stamp_rows, write_atomic, write_json  # noqa: E402

# --model: its megatron_dsa.model size. "small": the verification MoE (8 heads, latent 128 + 32,
# indexer 4 x 64), whose 128K step is a target of its own.
MODELS = {"deepseek-v3.2": "deepseek-v3.2-671b", "glm-5": "glm-5", "small": "small"}
DEFAULT_MODEL = "deepseek-v3.2"
# The attention shape the functions below run at: DeepSeek-V3.2's until use_model() sets another.
DQK, DV, HI, DI, TOPK = 576, 512, 64, 128, 2048
DENSE_QK, DENSE_V = 192, 128  # dense SDPA's dims a head (MLA's MHA form)
STAGES = ("indexer_topk", "attn_fwd", "kl_fwd", "attn_bwd", "kl_bwd")
# Measured on the H200 by benchmarks/ceilings.py (results/ceilings.json); used when that file is absent.
CEILINGS = {"bf16_tflops": 792.0, "fp8_tflops": 1445.0, "hbm_tb_s": 4.29, "gather_tb_s": 5.7,
            "atomic_adds_per_s": 3.9e11, "atomic_adds_l2_per_s": 9.6e11}


def use_model(name: str, device: str = "h200", topk: int | None = None) -> str:
    """Sets the module's attention shape to a model's (absorbed latent, indexer, top-k, the MHA
    form's dims for dense SDPA); ``topk`` replaces the model's own. Returns the stem of its
    result files on ``device`` (``results_io.device_tag``); another top-k than the model's is in
    the name."""
    global DQK, DV, HI, DI, TOPK, DENSE_QK, DENSE_V
    from megatron_dsa.model import SIZES

    t = SIZES[MODELS[name]].transformer
    DQK, DV = t["kv_lora_rank"] + t["qk_pos_emb_head_dim"], t["kv_lora_rank"]
    HI, DI, TOPK = t["dsa_indexer_n_heads"], t["dsa_indexer_head_dim"], t["dsa_indexer_topk"]
    DENSE_QK, DENSE_V = t["qk_head_dim"] + t["qk_pos_emb_head_dim"], t["v_head_dim"]
    stem = f"dsa_{device}" if name == DEFAULT_MODEL else f"dsa_{device}_{name}"
    if topk is not None and topk != TOPK:
        stem, TOPK = f"{stem}_top{topk}", topk
    return stem


def cuda_time(fn, reps=3, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), ts


def peak_beyond(fn):
    """(process peak GiB, peak GiB above what was allocated before the call)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30, (torch.cuda.max_memory_allocated() - base) / 2**30


def make_inputs(S, H, dev="cuda", seed=0, options: KernelOptions = DEFAULT_OPTIONS):
    """Random inputs of one case, and the kernel options our step runs them with."""
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    t = SimpleNamespace(H=H, options=options)
    t.q = r(1, S, H, DQK).bfloat16().requires_grad_()
    t.kv = r(1, S, DQK).bfloat16().requires_grad_()
    # Indexer q/k as the model makes them: Hadamard-rotated, unit-ish scale.
    t.qi = r(1, S, HI, DI).bfloat16().requires_grad_()
    t.ki = r(1, S, DI).bfloat16().requires_grad_()
    t.wi = (r(1, S, HI) * (HI**-0.5 * DI**-0.5)).requires_grad_()
    t.gout = r(1, S, H, DV).bfloat16()
    t.gkl = torch.full((1, S), 1.0 / S, device=dev)
    t.scale = DQK**-0.5
    return t


def pattern_idx(S, dev="cuda", window=1024, sinks=64):
    """A selection shaped like a trained indexer's: the last ``window`` keys, the first ``sinks``
    and the rest of the top-k evenly spread over the keys between (distinct keys; rows shorter
    than the top-k take every earlier key, -1 padded)."""
    t = torch.arange(S, device=dev)[:, None]
    j = torch.arange(TOPK, device=dev)[None, :]
    spread = TOPK - window - sinks
    far = sinks + (j - window - sinks) * (t - window - sinks).clamp(min=0) // spread
    idx = torch.where(j < window, t - j, torch.where(j < window + sinks, j - window, far))
    idx = torch.where(t < TOPK, torch.where(j <= t, j, -1), idx)
    return idx[None].to(torch.int32).contiguous()  # the selection's dtype


def recency_inputs(qi, ki, wi):
    """Indexer inputs whose scores rise with the key's position (a recency bias: the top-k
    crowds the recent end, where the runs' bound is loosest): a shared direction added to every
    query and, ramped from 0 to 3 standard deviations of a product, to the keys; positive weights."""
    g = torch.Generator(device=qi.device).manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(DI, device=qi.device, generator=g), dim=0)
    ramp = torch.linspace(0.0, 3.0 * DI**0.5, ki.shape[1], device=ki.device)
    q = (qi.float() + u).to(qi.dtype)
    k = (ki.float() + ramp[None, :, None] * u).to(ki.dtype)
    return q, k, wi.abs()


def ours_step(t, fp8, stages=None, idx=None, rows=None, kl_two_pass=False):
    """One forward + backward of our DSA core; ``rows`` (a slice of query rows, for the TP=8
    rank case) limits the indexer and the KL to those rows.

    As training runs it (``parallel.sharded.SparseAttentionKLInBackward``): the attention's
    backward also sums its recomputed probabilities over the heads, and the KL against that
    target runs after it (forward and backward). The ops are called one by one so that each
    stage is timed. ``kl_two_pass``: the KL's target from its own pass over the selected rows
    in the forward instead (what evaluation, without a backward, runs)."""

    def mark(name):
        if stages is not None:
            torch.cuda.synchronize()
            stages.append((name, time.perf_counter()))

    mark("start")
    if idx is None:
        if rows is None:
            idx = KN.indexer_topk(t.qi.detach(), t.ki.detach(), t.wi.detach(), TOPK, fp8=fp8, ordered=False,
                                   options=t.options)
        else:  # the rank scores its rows against every key; the selection is all-gathered
            own = KN.indexer_topk(t.qi.detach()[:, rows], t.ki.detach(), t.wi.detach()[:, rows], TOPK,
                                  q_pos=t.q_pos[rows], fp8=fp8, ordered=False, options=t.options)
            idx = t.idx_rest
            idx[:, rows] = own
    mark("indexer_topk")
    if not kl_two_pass:
        own = slice(None) if rows is None else rows
        with torch.no_grad():
            out, lse = KN.sparse_mla_attention(t.q, t.kv, idx, DV, t.scale, options=t.options)
        mark("attn_fwd")
        t.q.grad, t.kv.grad, head_sum = KN.sparse_mla_attention_backward(t.q.detach(), t.kv.detach(), idx, out, lse,
                                                                         t.gout, DV, t.scale, options=t.options)
        mark("attn_bwd")
        p = own_rows_target(head_sum[:, own], ParallelContext())  # training's target, one rank
        kl = KN.sparse_indexer_kl_from_target(t.qi[:, own], t.ki, t.wi[:, own], idx[:, own], p,
                                              options=t.options)
        mark("kl_fwd")
        torch.autograd.backward([kl], [t.gkl[:, : kl.shape[1]]])
        mark("kl_bwd")
        return idx
    out, lse = KN.sparse_mla_attention(t.q, t.kv, idx, DV, t.scale, options=t.options)
    mark("attn_fwd")
    if rows is None:
        kl = KN.sparse_indexer_kl(t.q, t.kv, t.qi, t.ki, t.wi, idx, t.scale, lse=lse,
                                  options=t.options)
    else:  # the rank's heads' share of the target for all rows, then its own rows' KL
        head_sum = KN.sparse_target_head_sum(t.q, t.kv, idx, t.scale, lse=lse, options=t.options)
        p = own_rows_target(head_sum[:, rows], ParallelContext())
        kl = KN.sparse_indexer_kl_from_target(t.qi[:, rows], t.ki, t.wi[:, rows], idx[:, rows], p,
                                              options=t.options)
    mark("kl_fwd")
    torch.autograd.backward([out], [t.gout])
    mark("attn_bwd")
    torch.autograd.backward([kl], [t.gkl[:, : kl.shape[1]]])
    mark("kl_bwd")
    return idx


def zero_grads(t):
    for x in (t.q, t.kv, t.qi, t.ki, t.wi):
        x.grad = None


def sdpa_step(S, H, dev="cuda"):
    q = torch.randn(1, H, S, DENSE_QK, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, H, S, DENSE_QK, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, H, S, DENSE_V, device=dev, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(1, H, S, DENSE_V, device=dev, dtype=torch.bfloat16)

    def fn():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(go)
        q.grad = k.grad = v.grad = None

    return fn


def megatron_step(t):
    """megatron-core 0.19.2 DSA core with kernels 'none': naive indexer top-k + KL, unfused attention."""
    from megatron.core.transformer.experimental_attention_variant import dsa as M

    S = t.q.shape[1]
    query = t.q.transpose(0, 1)  # [s, b, np, hn]
    key = t.kv.transpose(0, 1)[:, :, None, :]  # [s, b, 1, hn]
    value = t.kv[..., :DV].transpose(0, 1)[:, :, None, :]
    mask = torch.full((S, S), float("-inf"), device=t.q.device).triu_(1)
    pg = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1), cp=None)
    topk_idx, loss = M.FusedDSAIndexerLoss.apply(
        t.qi.transpose(0, 1), t.wi.transpose(0, 1), t.ki.transpose(0, 1),
        query.detach(), key.detach().expand(-1, -1, t.H, -1), t.scale, TOPK, 1.0, mask, True, pg,
    )
    out = M.unfused_dsa_fn(query, key, value, topk_idx, t.scale, mask=mask)
    torch.autograd.backward([out, loss], [torch.randn_like(out), torch.ones_like(loss)])


def _tilelang_ops():
    """megatron-core's TileLang DSA ops, or one clear error naming what failed to import."""
    from megatron.core.transformer.experimental_attention_variant.ops import tilelang_dsa as TL

    if TL.SparseMLA is None or TL.lighting_indexer is None or TL.SparseIndexerKLLoss is None:
        import importlib

        for mod in ("indexer", "sparse_mla", "tilelang_indexer_loss"):  # re-raise the real cause
            importlib.import_module(f"megatron.core.transformer.experimental_attention_variant.ops.{mod}")
        raise RuntimeError("megatron-core's TileLang DSA ops did not load")
    return TL


def megatron_tilelang_step(t):
    """megatron-core 0.19.2 DSA core with dsa_kernel_backend='tilelang': the two hooks dsa.py calls
    in the sparse phase (fused indexer top-k + streaming sparse KL, then absorbed SparseMLA), with
    the same inputs as ours; returns the top-k indices [1, S, k]."""
    TL = _tilelang_ops()
    from megatron.core.transformer.experimental_attention_variant import dsa_masking

    S = t.q.shape[1]
    starts, ends = dsa_masking.build_fused_indexer_varlen_bounds(
        sq=S, skv=S, device=t.q.device, mask=None, varlen_starts=None, varlen_ends=None, key_positions=None)
    query = t.q.transpose(0, 1)  # [s, b, np, hn]
    key = t.kv.transpose(0, 1)[:, :, None, :]  # [s, b, 1, hn]: the shared latent
    res = TL.run_fused_qk_topk_with_loss(
        t.qi.transpose(0, 1), t.ki.transpose(0, 1), t.wi.transpose(0, 1), TOPK, starts, ends, 8192,
        query.detach(), key.detach(), t.scale, 1.0, SimpleNamespace(tp=None))
    if res is None:
        raise RuntimeError("TileLang indexer+loss hook declined these shapes")
    idx, loss = res
    out = TL.run_fused_absorbed_sparse_attention(query, key, idx, t.scale, DV)
    if out is None:
        raise RuntimeError("TileLang SparseMLA hook declined these shapes")
    torch.autograd.backward([out, loss], [t.gout.transpose(0, 1), torch.ones_like(loss)])
    return idx


def tilelang_topk_overlap(S=4096):
    """Same computation check: TileLang's selected sets vs ours (bf16 scoring) on one input."""
    t = make_inputs(S, 16)
    theirs = megatron_tilelang_step(t)
    ours = KN.indexer_topk(t.qi.detach(), t.ki.detach(), t.wi.detach(), TOPK, fp8=False)
    hits = total = 0
    rows = range(0, S, max(1, S // 256))
    for r in rows:
        a = set(ours[0, r][ours[0, r] >= 0].tolist())
        b = set(theirs[0, r][theirs[0, r] >= 0].tolist())
        hits += len(a & b)
        total += max(len(a), 1)
    return {"seq": S, "rows": len(rows), "overlap": hits / total}


def time_baseline(step, S, H, reps):
    """Time and peak of a megatron-core step on fresh inputs; OOM and errors are recorded."""
    try:
        t = make_inputs(S, H)
        ms, all_ms = cuda_time(lambda: (step(t), zero_grads(t)), reps=reps)
        peak, _ = peak_beyond(lambda: (step(t), zero_grads(t)))
        return {"ms": ms, "all_ms": all_ms, "peak_gib": peak}
    except torch.cuda.OutOfMemoryError as e:
        return {"oom": True, "error": str(e)[:160]}
    except Exception as e:
        traceback.print_exc()
        return {"error": repr(e)[:400]}
    finally:
        t = None
        torch.cuda.empty_cache()


def topk_checks(S=8192, rows=256):
    """bf16 kernel vs reference sets, and fp8 overlap, on the last `rows` queries of S."""
    from megatron_dsa import reference as R

    t = make_inputs(S, 16, seed=1)
    qi, ki, wi = t.qi.detach(), t.ki.detach(), t.wi.detach()
    got = KN.indexer_topk(qi, ki, wi, TOPK)[:, -rows:]
    got8 = KN.indexer_topk(qi, ki, wi, TOPK, fp8=True)[:, -rows:]
    qp = torch.arange(S - rows, S, device="cuda")
    ref = R.indexer_topk(qi[:, -rows:], ki, wi[:, -rows:], TOPK, q_pos=qp)
    same = exact = 0
    ov = []
    for r in range(rows):
        a, b, c = set(got[0, r].tolist()), set(ref[0, r].tolist()), set(got8[0, r].tolist())
        exact += a == b
        same += len(a ^ b) <= 2  # a boundary swap from fp32 summation order
        ov.append(len(c & b - {-1}) / max(1, len(b - {-1})))
    return {"rows": rows, "bf16_sets_identical": exact / rows, "bf16_sets_within_one_swap": same / rows,
            "fp8_overlap_mean": sum(ov) / rows, "fp8_overlap_min": min(ov)}


def load_ceilings(out_dir, device: str | None = None):
    """The ceilings in ``out_dir``'s ceilings.json (measured by ceilings.py), else the H200's
    defaults. With ``device``, ceilings measured on another GPU are an error: the bounds would
    describe the wrong machine."""
    path = os.path.join(out_dir, "ceilings.json")
    c = dict(CEILINGS)
    try:
        with open(path) as f:
            m = json.load(f)
        if device is not None and m.get("device") != device:
            sys.exit(f"error: {path} was measured on {m.get('device')!r}, not on {device!r}; run "
                     f"benchmarks/ceilings.py --out {out_dir} on this GPU first, or give another --out")
        c["bf16_tflops"] = round(m.get("bf16_gemm_tflops", c["bf16_tflops"]))
        c["fp8_tflops"] = round(m.get("fp8_gemm_tflops", c["fp8_tflops"]))
        c["hbm_tb_s"] = round(m.get("hbm_copy_tbps", c["hbm_tb_s"]), 2)
        c["gather_tb_s"] = round(m.get("gather_1KB_rows_tbps", c["gather_tb_s"]), 2)
        c["atomic_adds_per_s"] = m.get("fp32_atomic_adds_per_s", c["atomic_adds_per_s"])
        by_mb = m.get("fp32_atomic_adds_per_s_by_target_mb")
        if by_mb:  # the fastest target size: one that L2 holds
            c["atomic_adds_l2_per_s"] = max(by_mb.values())
    except (OSError, ValueError):
        pass
    return c


def stage_bounds(S, H, c, rows_frac=1.0):
    """Each stage's floor (ms) at the ceilings, with what sets it: max(FLOPs / rate, bytes or adds
    / rate). ``rows_frac``: the share of rows whose indexer and KL this rank computes."""
    fl = dsa_flops(S, H, DQK, DV, HI, DI, TOPK)
    pairs = fl["attn_fwd"] / (2.0 * H * (DQK + DV))
    b = {}
    sel_bytes = rows_frac * S * S / 2 * 4 * 2  # fp32 scores written once, read once
    b["indexer_topk"] = max(rows_frac * fl["indexer_scores"] / (c["fp8_tflops"] * 1e12), sel_bytes / (c["hbm_tb_s"] * 1e12))
    b["attn_fwd"] = max(fl["attn_fwd"] / (c["bf16_tflops"] * 1e12), pairs * DQK * 2 / (c["gather_tb_s"] * 1e12))
    # The KL's forward: the indexer logits over the set (its target comes from the attention
    # backward, whose bound does not change: the head sum adds K adds a head block and token).
    b["kl_fwd"] = max(rows_frac * fl["kl_fwd"] / (c["bf16_tflops"] * 1e12),
                      rows_frac * pairs * DI * 2 / (c["gather_tb_s"] * 1e12))
    # One fp32 add per (token, key, latent column), whatever the heads (the stored scores' dkv
    # product sums every head first), each at the rate of a target that L2 holds: key ranges
    # make any target L2-sized (their extra passes are not counted).
    adds = c["atomic_adds_l2_per_s"]
    b["attn_bwd"] = max(fl["attn_bwd"] / (c["bf16_tflops"] * 1e12), pairs * DQK / adds)
    b["kl_bwd"] = max(rows_frac * fl["kl_bwd"] / (c["bf16_tflops"] * 1e12), rows_frac * pairs * DI / adds)
    return {k: 1e3 * v for k, v in b.items()}, fl


def rebound(res: dict, c: dict) -> None:
    """Every row's stage bounds again, from ``c`` and the current formula (the shape set by
    ``use_model``); the rows' times stay as measured."""
    res["ceilings"] = c
    for r in res["rows"]:
        r["bounds_ms"] = stage_bounds(r["seq"], r["heads"], c, 1 / 8 if "TP=8" in r["case"] else 1.0)[0]


def io_gib(S, H):
    """The step's outputs and gradients (what any implementation must hold): out, dq, dkv, dqi, dki, dwi."""
    n = S * H * DV * 2 + S * H * DQK * 2 + S * DQK * 2 + S * HI * DI * 2 + S * DI * 2 + S * HI * 4
    return n / 2**30


def time_ours(t, fp8, reps, idx=None, rows=None, kl_two_pass=False):
    def fn():
        ours_step(t, fp8, idx=idx, rows=rows, kl_two_pass=kl_two_pass)
        zero_grads(t)

    ms, all_ms = cuda_time(fn, reps=reps)
    peak, extra = peak_beyond(fn)
    st = []
    ours_step(t, fp8, st, idx=idx, rows=rows, kl_two_pass=kl_two_pass)
    zero_grads(t)
    stages = {st[i][0]: 1e3 * (st[i][1] - st[i - 1][1]) for i in range(1, len(st))}
    return {"ms": ms, "all_ms": all_ms, "peak_gib": peak, "peak_extra_gib": extra, "stages_ms": stages}


def tp8_rank_rows(S):
    """The rows one TP=8 rank's indexer scores under the causally balanced split (rank 3 of 8:
    blocks 3 and 12 of 16), as a boolean row mask."""
    n = S // 16
    m = torch.zeros(S, dtype=torch.bool, device="cuda")
    m[3 * n:4 * n] = True
    m[12 * n:13 * n] = True
    return m


def bench_row(S, H, args, c, label=None, tp8=False, run=None):
    row = {"heads": H, "seq": S, "case": label or f"{H} heads", "measured": time.strftime("%Y-%m-%d")}
    if run is not None:
        row["run"] = run  # index into the results' "runs": command, commit, sources
    t = make_inputs(S, H, options=args.kernel_options)
    rows = None
    frac = 1.0
    if tp8:
        rows = tp8_rank_rows(S)
        frac = 1 / 8
        t.q_pos = torch.arange(S, device="cuda")
        t.idx_rest = KN.indexer_topk(t.qi.detach(), t.ki.detach(), t.wi.detach(), TOPK, fp8=True, ordered=False)
    bounds, fl = stage_bounds(S, H, c, frac)
    row["bounds_ms"] = bounds
    row["flops"] = {k: (v * frac if k in ("indexer_scores", "kl_fwd", "kl_bwd") else v) for k, v in fl.items()}
    io = io_gib(S, H)
    for name, fp8, two_pass in (("ours_fp8", True, False), ("ours_bf16", False, False),
                                ("ours_fp8_kl_two_pass", True, True)):
        if (name == "ours_bf16" and not args.bf16) or (two_pass and not args.kl_two_pass):
            continue
        try:
            r = time_ours(t, fp8, args.reps, rows=rows, kl_two_pass=two_pass)
            r["tflops"] = sum(row["flops"][k] for k in ("indexer_scores", "attn_fwd", "attn_bwd", "kl_fwd", "kl_bwd")) / r["ms"] / 1e9
            r["beyond_io_gib"] = r["peak_extra_gib"] - io
            row[name] = r
        except torch.cuda.OutOfMemoryError as e:
            row[name] = {"oom": True, "error": str(e)[:200]}
        except Exception as e:
            row[name] = {"error": repr(e)[:400]}
            traceback.print_exc()
        torch.cuda.empty_cache()
        print(S, H, name, {k: v for k, v in row[name].items() if k != "all_ms"}, flush=True)
    if args.pattern and not tp8:
        try:
            idx = pattern_idx(S)
            row["ours_fp8_pattern"] = time_ours(t, True, args.reps, idx=idx)
            del idx
            # the FP8 top-k of indexer inputs whose scores crowd the recent end
            rq, rk, rw = recency_inputs(t.qi.detach(), t.ki.detach(), t.wi.detach())
            topk = partial(KN.indexer_topk, rq, rk, rw, TOPK, fp8=True, ordered=False, options=t.options)
            row["ours_fp8_pattern"]["topk_recency_ms"] = cuda_time(topk, reps=args.reps)[0]
            del rq, rk, rw, topk
        except Exception as e:
            row["ours_fp8_pattern"] = {"error": repr(e)[:400]}
        print(S, H, "pattern", row["ours_fp8_pattern"].get("stages_ms"), flush=True)
    del t
    torch.cuda.empty_cache()
    if not tp8:
        try:
            fn = sdpa_step(S, H)
            ms, all_ms = cuda_time(fn, reps=args.reps)
            peak, extra = peak_beyond(fn)
            row["sdpa"] = {"ms": ms, "all_ms": all_ms, "peak_gib": peak,
                           "tflops": dense_attention_flops(S, H, DENSE_QK, DENSE_V) / ms / 1e9}
        except torch.cuda.OutOfMemoryError:
            row["sdpa"] = {"oom": True}
        except Exception as e:
            row["sdpa"] = {"error": repr(e)[:400]}
        fn = None
        torch.cuda.empty_cache()
        print(S, H, "sdpa", row["sdpa"], flush=True)
    return row


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                    help="the model whose attention shape is benchmarked")
    ap.add_argument("--topk", type=positive_int, default=None, help="keys a query selects (default: the model's)")
    ap.add_argument("--heads", default="16,32,64,128")
    ap.add_argument("--seqs", default="4096,16384,32768,65536,131072")
    ap.add_argument("--max-seq-for", default="", help="per-head length caps, e.g. 128:65536")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--megatron-seqs", default="", help="megatron-core's DSA with its default kernels at these lengths (16 heads)")
    ap.add_argument("--tilelang-seqs", default="", help="megatron-core's DSA with TileLang kernels at these lengths (needs tilelang)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="time the FP8 indexer only")
    ap.add_argument("--tp8", action="store_true", help="also the TP=8 rank case (16 heads)")
    ap.add_argument("--pattern", action="store_true", help="also a trained-indexer-shaped selection, and a recency-biased top-k")
    ap.add_argument("--kl-two-pass", action="store_true",
                    help="also the sparse KL with its target from a pass of its own in the forward (FP8 indexer)")
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--kernel-options", type=json.loads, default=None,
                    help="our kernels' options as JSON, e.g. '{\"split_bwd\": \"stored_scores\"}' (default: the defaults)")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of --out's json that this run does not measure (same case and "
                         "length are replaced), so the table can be measured in pieces; the device, versions and "
                         "ceilings must match")
    ap.add_argument("--render", action="store_true",
                    help="only re-write the model's .md and .png from --out's json (no GPU needed)")
    ap.add_argument("--rebound", action="store_true",
                    help="like --render, after recomputing the stored rows' stage bounds from --out's ceilings.json "
                         "(when the bounds' formula or the ceilings changed; no GPU needed)")
    ap.add_argument("--device-tag", default="h200",
                    help="--render: whose table, e.g. h100 for dsa_h100.json (a run names its files after its GPU)")
    args = ap.parse_args(argv)
    try:
        given = args.kernel_options
        args.kernel_options = KernelOptions.from_dict(given)
    except (TypeError, ValueError) as e:
        sys.exit(f"error: --kernel-options: {e}")
    if args.render or args.rebound:
        stem = use_model(args.model, args.device_tag, args.topk)
        path = os.path.join(args.out, stem + ".json")
        with open(path) as f:
            res = json.load(f)
        if args.rebound:
            rebound(res, load_ceilings(args.out, res["device"]))
            write_json(path, res)
        write_table(res, args.out, stem)
        return
    if not torch.cuda.is_available():
        sys.exit("error: bench_dsa.py times GPU kernels; no CUDA device here")
    stem = use_model(args.model, device_tag(torch.cuda.get_device_name()), args.topk)
    results = os.path.join(args.out, stem + ".json")
    os.makedirs(args.out, exist_ok=True)
    c = load_ceilings(args.out, torch.cuda.get_device_name())
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": c, "rows": [],
           "config": dict(batch=1, dqk=DQK, dv=DV, idx_heads=HI, idx_dim=DI, topk=TOPK, dtype="bf16",
                          **({} if args.model == DEFAULT_MODEL else dict(model=args.model, dense_dims=[DENSE_QK, DENSE_V])),
                          **({} if given is None else dict(kernel_options=given)))}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    kept = previous_rows(results, res) if args.update else []
    res["runs"] = stamp_rows([], res.get("runs", []))  # this run's record; rows name theirs by index
    if not args.no_checks:
        try:
            res["topk_checks"] = topk_checks()
            print("topk checks:", res["topk_checks"], flush=True)
        except Exception as e:
            res["topk_checks"] = {"error": repr(e)}
            traceback.print_exc()
    caps = dict(tuple(int(x) for x in kv.split(":")) for kv in args.max_seq_for.split(",") if kv)
    seqs = [int(s) for s in args.seqs.split(",") if s]
    for H in [int(h) for h in args.heads.split(",")]:
        for S in seqs:
            if S > caps.get(H, S):
                continue
            res["rows"].append(bench_row(S, H, args, c, run=len(res["runs"]) - 1))
            write_json(results, {**res, "rows": merge_rows(kept, res["rows"])})  # a killed run keeps its rows
    if args.tp8:
        for S in seqs:
            if S >= 32768:
                res["rows"].append(bench_row(S, 16, args, c, label="16 heads, TP=8 rank", tp8=True,
                                             run=len(res["runs"]) - 1))
    for key, step, wanted in (("megatron", megatron_step, args.megatron_seqs), ("tilelang", megatron_tilelang_step,
                                                                                 args.tilelang_seqs)):
        for S in [int(s) for s in wanted.split(",") if s]:
            res.setdefault(key, []).append(dict(seq=S, heads=16, **time_baseline(step, S, 16, args.reps)))
            print(S, key, res[key][-1], flush=True)
    res["rows"] = merge_rows(kept, res["rows"])
    write_json(results, res)
    print(write_table(res, args.out, stem))


def write_table(res: dict, out: str, stem: str) -> str:
    """<stem>.md and <stem>.png in ``out`` from the results; returns the markdown."""
    md = to_markdown(res)
    write_atomic(os.path.join(out, stem + ".md"), md)
    try:
        plot(res, os.path.join(out, stem + ".png"))
    except Exception as e:
        print("plot failed:", e)
    return md


def previous_rows(path: str, res: dict) -> list[dict]:
    """The rows of an earlier run's json for --update; refuses one measured on another device,
    torch or triton, or at other ceilings (its rows would not be comparable)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    for key in ("device", "torch", "triton", "ceilings", "config"):
        if old.get(key) != res.get(key):
            sys.exit(f"error: --update: {path} was measured with {key} {old.get(key)!r}, this run has "
                     f"{res.get(key)!r}; measure the whole table again")
    if "topk_checks" in old:
        res.setdefault("topk_checks", old["topk_checks"])
    res["runs"] = old.get("runs", [])
    return old["rows"]


def merge_rows(kept: list[dict], new: list[dict]) -> list[dict]:
    """``kept`` with the rows of ``new`` in place of those of the same case and length, then the
    rest of ``new``; heads descending, then length, as a full run orders them."""
    fresh = {(r["case"], r["seq"]): r for r in new}
    rows = [fresh.pop((r["case"], r["seq"]), r) for r in kept] + list(fresh.values())
    tp8 = [r for r in rows if "TP=8" in r["case"]]
    rest = sorted((r for r in rows if "TP=8" not in r["case"]), key=lambda r: (-r["heads"], r["seq"]))
    return rest + sorted(tp8, key=lambda r: r["seq"])


def _ms(r):
    if not r:
        return "-"
    if r.get("oom"):
        return "OOM"
    if "ms" not in r:
        return "error"
    return f"{r['ms']:.0f}"


def to_markdown(res):
    c, g = res["ceilings"], res["config"]
    dense_qk, dense_v = g.get("dense_dims", (192, 128))
    model = f"{g['model']}'s shape: " if "model" in g else ""
    lines = [
        f"DSA attention core, forward + backward, on {res['device']} (torch {res.get('torch')}, triton "
        f"{res.get('triton')}): {model}batch 1, top-k {g['topk']}, indexer {g['idx_heads']} x {g['idx_dim']}, Dqk "
        f"{g['dqk']} / Dv {g['dv']}, bf16, random inputs; median of 3. Dense: causal SDPA (flash) with the same heads, "
        f"MLA's {dense_qk} / {dense_v} dims. Ceilings: bf16 "
        f"{c['bf16_tflops']:.0f} / fp8 {c['fp8_tflops']:.0f} TFLOP/s, HBM {c['hbm_tb_s']} TB/s, row gathers "
        f"{c['gather_tb_s']} TB/s, fp32 atomic adds {c['atomic_adds_per_s']:.2g}/s"
        + (f" ({c['atomic_adds_l2_per_s']:.2g}/s into targets L2 holds, the bounds' rate)."
           if "atomic_adds_l2_per_s" in c else ".")
        + (f" Our kernels' options: {json.dumps(g['kernel_options'])}." if "kernel_options" in g else ""), "",
        "| case | seq | ours fp8 ms | bound ms | ours bf16 ms | dense SDPA ms | dense / ours | dense / bound | ours TFLOP/s "
        "| peak GiB (beyond in/out/grads) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    dates = {}
    for r in res["rows"]:
        dates.setdefault(r.get("measured", "an earlier run"), []).append(r["case"])
    if len(dates) > 1:  # a table measured in pieces (--update) says which rows came from which run
        lines.insert(1, "Rows measured " + "; ".join(
            f"{day}: {' / '.join(dict.fromkeys(cases))}" for day, cases in sorted(dates.items(), reverse=True)) + ".")
        lines.insert(1, "")
    runs = measured_by(res.get("runs", []), res["rows"])
    if runs:
        lines[1:1] = ["", *runs]
    for r in res["rows"]:
        a, b, d = r.get("ours_fp8"), r.get("ours_bf16"), r.get("sdpa")
        ratio = f"{d['ms'] / a['ms']:.2f}x" if a and "ms" in a and d and "ms" in d else "-"
        bound = sum(r["bounds_ms"][s] for s in STAGES) if "bounds_ms" in r else None  # the stages' floors
        bound_ms = f"{bound:.0f}" if bound else "-"
        at_bound = f"{d['ms'] / bound:.2f}x" if bound and d and "ms" in d else "-"
        tf = f"{a['tflops']:.0f}" if a and "tflops" in a else "-"
        pk = f"{a['peak_gib']:.1f} ({a['beyond_io_gib']:.1f})" if a and "peak_gib" in a else "-"
        lines.append(f"| {r['case']} | {r['seq'] // 1024}K | {_ms(a)} | {bound_ms} | {_ms(b)} | {_ms(d)} | {ratio} | "
                     f"{at_bound} | {tf} | {pk} |")
    lines += ["", "Stages of ours (FP8 indexer), ms measured / ms bound at the ceilings (share of the bound reached):", "",
              "| case | seq | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for r in res["rows"]:
        a = r.get("ours_fp8")
        if not a or "stages_ms" not in a:
            continue
        cells = [f"{a['stages_ms'][s]:.1f} / {r['bounds_ms'][s]:.1f} ({r['bounds_ms'][s] / a['stages_ms'][s]:.0%})" for s in STAGES]
        lines.append(f"| {r['case']} | {r['seq'] // 1024}K | " + " | ".join(cells) + " |")
    pats = [r for r in res["rows"] if r.get("ours_fp8_pattern", {}).get("stages_ms")]
    if pats:
        lines += ["", "Random selections vs a trained-indexer-shaped one (last 1024 keys, first 64, the rest spread), ms; "
                  "the second's indexer_topk on indexer inputs whose scores rise with the key's position "
                  "(a recency bias; - where not measured):",
                  "", "| case | seq | selection | " + " | ".join(STAGES) + " |", "|---|---|---|" + "---|" * len(STAGES)]
        for r in pats:
            for lab, k in (("random", "ours_fp8"), ("window + sinks + spread", "ours_fp8_pattern")):
                st = dict(r[k]["stages_ms"])
                st["indexer_topk"] = st["indexer_topk"] if k == "ours_fp8" else r[k].get("topk_recency_ms")
                lines.append(f"| {r['case']} | {r['seq'] // 1024}K | {lab} | "
                             + " | ".join("-" if st[s] is None else f"{st[s]:.1f}" for s in STAGES) + " |")
    two = [r for r in res["rows"] if r.get("ours_fp8_kl_two_pass", {}).get("stages_ms") and r.get("ours_fp8", {}).get("stages_ms")]
    if two:
        lines += ["", "The sparse KL's target from the attention's backward (the training step) vs from a pass of its own "
                  "over the selected rows in the forward, FP8 indexer, ms:", "",
                  "| case | seq | target from | step | " + " | ".join(STAGES) + " | peak GiB |", "|---|---|---|---|" + "---|" * (len(STAGES) + 1)]
        for r in two:
            for lab, k in (("the attention backward", "ours_fp8"), ("its own pass", "ours_fp8_kl_two_pass")):
                a = r[k]
                lines.append(f"| {r['case']} | {r['seq'] // 1024}K | {lab} | {a['ms']:.0f} | "
                             + " | ".join(f"{a['stages_ms'][s]:.1f}" for s in STAGES) + f" | {a['peak_gib']:.1f} |")
    for key in ("megatron", "tilelang"):
        for m in res.get(key, []):
            lines.append(f"\nmegatron-core 0.19.2 DSA ({key}) at {m['seq'] // 1024}K, 16 heads: "
                         + (f"{m['ms']:.0f} ms, {m['peak_gib']:.1f} GiB" if "ms" in m else ("OOM" if m.get("oom") else m.get("error", "?"))))
    if "topk_checks" in res:
        lines += ["", f"Top-k checks (8K, last 256 rows): {res['topk_checks']}"]
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({r["heads"] for r in res["rows"] if "TP" not in r["case"]})
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, H in enumerate(heads):
        rs = [r for r in res["rows"] if r["heads"] == H and "TP" not in r["case"]]
        col = f"C{i}"
        for key, style in (("ours_fp8", "o-"), ("sdpa", "s--")):
            xs = [r["seq"] for r in rs if r.get(key, {}).get("ms")]
            ys = [r[key]["ms"] for r in rs if r.get(key, {}).get("ms")]
            if xs:
                ax[0].plot(xs, ys, style, color=col, label=f"{'DSA' if key == 'ours_fp8' else 'dense'} {H}h")
        xs = [r["seq"] for r in rs if r.get("ours_fp8", {}).get("ms") and r.get("sdpa", {}).get("ms")]
        ax[1].plot(xs, [r["sdpa"]["ms"] / r["ours_fp8"]["ms"] for r in rs if r["seq"] in xs], "o-", color=col, label=f"{H} heads")
    ax[0].set_ylabel("fwd + bwd ms")
    ax[0].set_yscale("log")
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_ylabel("dense time / DSA time")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("sequence")
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"DSA core vs dense attention on {res['device']}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
