"""Per-kernel timings of the DSA core's stages under several kernel options, side by side in one
process (not a test).

    python benchmarks/tune_dsa.py --heads 16,64,128 --seqs 32768 [--stages fwd,bwd,kl] [--variants stored] [--profile] [--out DIR]
    python benchmarks/tune_dsa.py --model small --topk 2048 --heads 8 --seqs 131072   # the verification MoE's shape

For each head count and length: the indexer's top-k (``topk``, once per length), the sparse
attention forward and backward (as training runs it: returning the KL's head-summed target too)
and the sparse KL forward (with its own target pass, as evaluation runs it) and backward, each
under the option variants listed below (launch tiles, the backward's kernels and what they share,
the number of key ranges the gradient adds are split into); ``warmup_kl``: the warm-up's dense KL
with its target over the latent (absorbed queries) or each head's keys (MHA form); ``delta``: the
backward's sum(dO * O) as its kernel and as PyTorch's fp32 copies. Every variant's
outputs are compared with the first variant's (same inputs and indices), so a variant that is
fast but wrong shows as such. The selections are the indexer's top-k of random inputs.
Writes tune_dsa.json to --out after every row (``rows``: one per stage, variant, heads and length;
``run``: the command and code that measured them; ``shape``: the model's attention dims and
top-k), so a run cut short keeps what it timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_dsa import kernels as KN  # noqa: E402
from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.kernels import sparse_attn  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions, Tiles  # noqa: E402
import bench_dsa  # noqa: E402
from bench_dsa import cuda_time  # noqa: E402
from bench_model_step import profile_step  # noqa: E402
from results_io import invocation, run_record, write_json  # noqa: E402

WARMUP_TARGET_FORMS = ("absorbed", "mha")


def _take_shape() -> None:
    """The attention shape the functions below run at: bench_dsa's current one (DeepSeek-V3.2's
    until ``use_model`` sets another). QK_NOPE: the per-head key dims beside the rope's
    (DQK - DV) in the MHA form."""
    global DQK, DV, HI, DI, TOPK, DENSE_QK, DENSE_V, QK_NOPE
    DQK, DV, HI, DI, TOPK = bench_dsa.DQK, bench_dsa.DV, bench_dsa.HI, bench_dsa.DI, bench_dsa.TOPK
    DENSE_QK, DENSE_V = bench_dsa.DENSE_QK, bench_dsa.DENSE_V
    QK_NOPE = DENSE_QK - (DQK - DV)


_take_shape()


def use_model(name: str, topk: int | None = None) -> dict:
    """Takes bench_dsa's shape of ``name`` (``topk`` replacing the model's); returns it."""
    bench_dsa.use_model(name, topk=topk)
    _take_shape()
    return dict(model=name, dqk=DQK, dv=DV, idx_heads=HI, idx_dim=DI, topk=TOPK, dense_dims=[DENSE_QK, DENSE_V])


def cuda_ms(fn, reps=3):
    return cuda_time(fn, reps=reps)[0]


def rel(got, ref, chunk=1 << 26):
    """||got - ref|| / ||ref|| over lists of tensors, in fp64 chunks: the 128-head gradients would
    not fit as one fp32 copy."""
    num = den = 0.0
    for g, r in zip(got, ref, strict=True):
        g, r = g.flatten(), r.flatten()
        for i in range(0, r.numel(), chunk):
            a, b = g[i:i + chunk].double(), r[i:i + chunk].double()
            num += (a - b).square().sum().item()
            den += b.square().sum().item()
    return (num / max(den, 1e-60)) ** 0.5


def all_finite(parts):
    return all(bool(torch.isfinite(x).all()) for x in parts)


def variants(stage: str, heads: int) -> list[tuple[str, KernelOptions]]:
    big = heads >= 64
    if stage == "fwd":
        # From 64 heads a 64-key block's scores are m64n32k16 products per warpgroup: each reads
        # 3 KB of shared memory (q's tile again) for 64K FLOPs, more than shared memory feeds
        # the tensor cores. 128 keys make them m64n64k16, at one pipeline stage and some spilled
        # registers (sm_90 compile: 221 KB of shared memory, 800 B of spills).
        # The warp-specialised Gluon kernel (two warpgroups take alternate 64-key blocks, each a
        # full m64n64 product; fewer heads than 64 as zero rows) at every head count, so the head
        # count "auto" takes it from is measured; the Triton tiles beside it.
        tiles = [(64, 8, 2), (32, 8, 2), (128, 8, 1)] if big else [(64, 4, 2), (64, 8, 2), (32, 4, 3)]
        gluon = [("fwd gluon", KernelOptions(attn_fwd_kernel="gluon"))]
        return gluon + [(f"fwd{t}", KernelOptions(attn_fwd_kernel="triton", attn_fwd=Tiles(*t))) for t in tiles]
    if stage == "bwd":
        # the stored scores' dkv product in Gluon (every head a program, one warpgroup adds while
        # the other multiplies) or Triton, the rest of the backward as by default
        kernels = [(f"stored_scores dkv {k}", KernelOptions(attn_bwd_split=True, split_bwd="stored_scores",
                                                             attn_dkv_product_kernel=k)) for k in ("gluon", "triton")]
        if big:
            rc = "recompute"
            out = kernels + [("split p1 dq(64,8,1) dkv(64,4,1)", KernelOptions(key_passes=1, split_bwd=rc))]
            out += [(f"split p{p}", KernelOptions(key_passes=p, split_bwd=rc)) for p in (4,)]
            out += [(f"split dq{t}", KernelOptions(key_passes=1, split_bwd=rc, attn_bwd=Tiles(*t)))
                    for t in ((32, 8, 2), (32, 8, 1))]
            out += [(f"split dkv{t}", KernelOptions(key_passes=1, split_bwd=rc, attn_dkv=Tiles(*t)))
                    for t in ((64, 8, 1),)]
            # The kernels sharing stored scores: dq as their product ("stored_ds"); also dkv over
            # every head at once ("stored_scores"), one add per (token, key, column)
            out += [(f"split stored_ds dq{t}", KernelOptions(key_passes=1, split_bwd="stored_ds",
                                                              attn_dq_product=Tiles(*t)))
                    for t in ((64, 8, 3), (32, 8, 3))]
            out += [(f"split stored_scores p{p} dkv{t}", KernelOptions(key_passes=p, split_bwd="stored_scores",
                                                                       attn_dkv_product=Tiles(*t)))
                    for p, t in ((1, (64, 4, 3)), (1, (64, 8, 2)), (1, (32, 4, 3)), (4, (64, 4, 3)), (10, (64, 4, 3)),
                                 (16, (64, 4, 3)))]
            # The dq product at 64 heads a program (the default: every head), and its columns a
            # program (the default 192: three programs a token, each reading the row's score
            # gradients; 64 reads them nine times, 128 and 256 leave a half-masked group)
            out += [(f"stored_scores dq heads{h} cols{c} dq{t}",
                     KernelOptions(split_bwd="stored_scores", dq_product_heads=h, dq_product_columns=c,
                                   attn_dq_product=Tiles(*t)))
                    for h, c, t in ((64, 192, (64, 8, 3)), (128, 256, (64, 8, 2)), (128, 192, (64, 8, 3)),
                                    (128, 64, (64, 8, 3)), (128, 192, (32, 8, 3)))]
            # The storing kernel's tiles: a gathered product over slices of the latent (q and dO
            # streamed from L2 instead of held whole: pipeline stages, more programs an SM)
            out += [(f"split stored_scores scores{t}", KernelOptions(split_bwd="stored_scores", attn_scores=Tiles(*t)))
                    for t in ((128, 8, 2), (128, 8, 3), (64, 8, 2), (64, 8, 3), (64, 4, 3))]
            # Its heads a program (the default 64: 120 registers and 96 KB at (128, 8, 3), two
            # programs an SM; sm_90 compile, Triton 3.6): every head at once (204 and 144 KB, one
            # program), which gathers each selected row once rather than once per group of 64;
            # at 64 heads 128 keys, 8 warps, 2 stages (122, 64 KB, two), 64 keys, 4 warps,
            # 3 stages (128, 72 KB, three), and 256 keys (206, 96 KB, one), which read a token's q
            # and dO half as often
            out += [(f"stored_scores scores heads{h} {t}",
                     KernelOptions(split_bwd="stored_scores", scores_heads=h, attn_scores=Tiles(*t)))
                    for h, t in ((128, (128, 8, 3)), (64, (128, 8, 2)), (64, (64, 4, 3)), (64, (128, 4, 2)),
                                 (64, (256, 8, 2)))]
            return out
        out = kernels + [("fused p1 (32,8,2)", KernelOptions(key_passes=1, attn_bwd_split=False))]
        out += [(f"fused p{p}", KernelOptions(key_passes=p, attn_bwd_split=False)) for p in (4, 10, 20)]
        out += [(f"split p{p}", KernelOptions(key_passes=p, attn_bwd_split=True, split_bwd="recompute"))
                for p in (1, 10)]
        out += [(f"split {form} p1", KernelOptions(key_passes=1, attn_bwd_split=True, split_bwd=form))
                for form in ("stored_ds", "stored_scores")]
        # the default on a wide latent: the stored scores with the dkv product's key ranges; the
        # storing kernel's tiles where its heads (the products' columns) are few
        out += [("split stored_scores auto-passes", KernelOptions(attn_bwd_split=True, split_bwd="stored_scores"))]
        out += [(f"split stored_scores scores{t}", KernelOptions(attn_bwd_split=True, split_bwd="stored_scores",
                                                                  attn_scores=Tiles(*t)))
                for t in ((64, 4, 3), (128, 4, 3), (64, 8, 3))]
        # the dq product's tiles below 64 heads (the default (64, 8, 2))
        out += [(f"split stored_scores dq{t}", KernelOptions(attn_bwd_split=True, split_bwd="stored_scores",
                                                              attn_dq_product=Tiles(*t)))
                for t in ((64, 8, 3), (64, 4, 3))]
        out += [(f"fused p10 {t}", KernelOptions(key_passes=10, attn_bwd_split=False, attn_bwd=Tiles(*t)))
                for t in ((16, 8, 2), (32, 8, 3))]
        # a narrow latent (the small models' 160 = 128 + 32) leaves 8 warps little to share
        out += [(f"fused auto-passes {t}", KernelOptions(attn_bwd_split=False, attn_bwd=Tiles(*t)))
                for t in ((32, 4, 2), (64, 4, 2), (16, 4, 2))]
        return out
    if stage == "base":
        return [("indexer_topk fp8", KernelOptions()), (f"dense_sdpa {DENSE_QK}/{DENSE_V}", KernelOptions())]
    if stage == "delta":  # the backward's sum(dO * O): its kernel, and PyTorch's fp32 copies a chunk at a time
        return [("delta kernel", KernelOptions()), ("delta pytorch fp32 chunks", KernelOptions())]
    if stage == "warmup_kl":  # the warm-up's dense KL, its target over the latent or each head's keys
        return [(f"warmup kl target {form}", KernelOptions()) for form in WARMUP_TARGET_FORMS]
    if stage == "topk":  # the FP8 indexer's scoring + selection: the runs' maxima bound or not; the selection's launch
        out = [(f"indexer_topk fp8 select_runs={r}", KernelOptions(select_runs=r)) for r in (8, 0, 4, 16)]
        return out + [(f"indexer_topk fp8 select{t}", KernelOptions(select=Tiles(*t)))
                      for t in ((1024, 4, 1), (2048, 4, 1), (1024, 8, 1), (4096, 8, 1), (4096, 16, 1), (2048, 8, 2))] + [
            (f"indexer_topk fp8 score{t}", KernelOptions(score=Tiles(*t)))
            for t in ((256, 4, 3), (256, 8, 3), (128, 8, 3), (64, 4, 3), (64, 4, 4), (128, 4, 2))]
    if stage == "select":  # the selection beside the next chunk's scoring or after it; its registers and warps
        out = [(f"indexer_topk fp8 select_overlap={o} select_max_registers={m}",
                KernelOptions(select_overlap=o, select_max_registers=m))
               for o, m in ((True, None), (False, None), (True, 64))]
        # the sampled bound's keys between samples (0: the runs' bound alone)
        out += [(f"indexer_topk fp8 select_sample={n}", KernelOptions(select_sample=n)) for n in (0, 16, 64)]
        # the bound guessed from the last row's threshold, that many standard deviations lower
        out += [(f"indexer_topk fp8 select_guess={g}", KernelOptions(select_guess=g)) for g in (0.05, 0.1, 0.25)]
        # lists holding their keys' scores, alone and with the guess (whose lists are longer)
        out += [("indexer_topk fp8 select_list_values=True", KernelOptions(select_list_values=True))]
        out += [(f"indexer_topk fp8 select_list_values=True select_guess={g}",
                 KernelOptions(select_list_values=True, select_guess=g)) for g in (0.1, 0.25)]
        # fewer warps a row: no barriers across warps, more rows in flight an SM
        out += [(f"indexer_topk fp8 select_overlap=True select{t}", KernelOptions(select=Tiles(*t)))
                for t in ((256, 1, 1), (512, 1, 1), (512, 2, 1), (1024, 4, 1))]
        # narrower digits: more histogram passes, each cheaper (Triton's histogram takes a ballot
        # per bit of the bin and a popcount per bin a thread holds), and fewer registers
        out += [(f"indexer_topk fp8 select_digit_bits={d}", KernelOptions(select_digit_bits=d)) for d in (5, 6, 8)]
        return out + [("indexer_topk fp8 select_digit_bits=5 select_max_registers=64",
                       KernelOptions(select_digit_bits=5, select_max_registers=64))]
    if stage == "kl":  # the target kernel with the heads or the selected keys as the products' rows
        out = [(f"kl target {'keys' if rows else 'heads'} as rows {t}",
                KernelOptions(kl_target_keys_rows=rows, kl_target=Tiles(*t)))
               for rows, t in ((False, (32, 4, 2)), (False, (64, 4, 2)), (True, (64, 4, 1)), (True, (32, 4, 2)),
                               (True, (64, 8, 1)), (True, (128, 8, 1)))]
        # the logits' forward and backward over the set (training takes the target from the
        # attention's backward and runs only these)
        return out + [(f"kl fwd{f} bwd{b}", KernelOptions(kl_fwd=Tiles(*f), kl_bwd=Tiles(*b)))
                      for f, b in (((64, 4, 2), (64, 4, 2)), ((128, 4, 2), (128, 4, 2)), ((64, 2, 2), (64, 2, 2)),
                                   ((128, 8, 2), (128, 8, 2)))] + [
            # the backward's key blocks deeper in flight or across two warpgroups, the forward as
            # by default (sm_90 compile, 64 x 128 indexer: (64, 4, 2) 255 registers with 8 spill
            # stores, 82 KB, two programs an SM; (64, 4, 3) the same, 9 spills; (32, 4, 3) 244, 58
            # KB, two; (64, 8, 2) 215, 82 KB, one)
            (f"kl bwd{b}", KernelOptions(kl_bwd=Tiles(*b))) for b in ((64, 4, 3), (32, 4, 3), (64, 8, 2), (32, 4, 2))]
    raise ValueError(stage)


def pytorch_rowwise_dot(dout, out, chunk_bytes=256 << 20):
    """sum(dout * out, -1) as the backward computed it before its kernel: fp32 copies of a chunk
    of rows of each (within ``chunk_bytes``), their product, its sum."""
    B, S, H, V = out.shape
    delta = torch.empty(B, S, H, dtype=torch.float32, device=out.device)
    step = max(1, chunk_bytes // (B * H * V * 4))
    for t0 in range(0, S, step):
        delta[:, t0:t0 + step] = (dout[:, t0:t0 + step].float() * out[:, t0:t0 + step].float()).sum(-1)
    return delta


def sdpa_step(S: int, H: int):
    """Dense causal attention fwd + bwd with the same heads (MLA's MHA dims), fused SDPA."""
    import torch.nn.functional as F

    q, k = (torch.randn(1, H, S, DENSE_QK, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, H, S, DENSE_V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(1, H, S, DENSE_V, device="cuda", dtype=torch.bfloat16)

    def fn():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)
        q.grad = k.grad = v.grad = None

    return fn


def inputs(S: int, H: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # bf16 draws, no fp32 copies (q's would be 38 GB at 128K x 128 heads)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device="cuda", generator=g, dtype=dtype)  # noqa: E731
    q = r(1, S, H, DQK)
    kv = r(1, S, DQK)
    qi = r(1, S, HI, DI)
    ki = r(1, S, DI)
    wi = r(1, S, HI, dtype=torch.float32) * (HI**-0.5 * DI**-0.5)
    idx = KN.indexer_topk(qi, ki, wi, TOPK, fp8=True, ordered=False)
    return q, kv, qi, ki, wi, idx


def warmup_target_inputs(q, kv, seed: int = 2) -> dict:
    """The warm-up target's queries and keys in both forms from one latent and K up-projection:
    absorbed queries over the latent [1, S, DQK], and MLA's MHA form (each head's keys, QK_NOPE +
    rope dims). The same scores, up to bf16 rounding."""
    g = torch.Generator(device=q.device).manual_seed(seed)
    H = q.shape[2]
    k_up = (torch.randn(H, QK_NOPE, DV, device=q.device, generator=g) * DV**-0.5).to(q.dtype)
    q_mha, k_mha, _ = R.mha_form(q, kv, k_up, k_up[:, :1])
    return {"absorbed": (R.absorb_query(q, k_up), kv), "mha": (q_mha, k_mha)}


def run(heads, seqs, stages, reps, out_dir, only=(), profile=False, record=None, shape=None):
    rows = []
    scale = DQK**-0.5
    os.makedirs(out_dir, exist_ok=True)
    record = record or run_record()

    def keep(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(os.path.join(out_dir, "tune_dsa.json"), {"run": record, "shape": shape, "rows": rows})

    def timed(row, fn):
        row["ms"] = cuda_ms(fn, reps)
        if profile:  # where the variant's time goes, kernel by kernel
            row["kernels"] = profile_step(fn, True, 8)
    for S in seqs:
        for H in heads:
            torch.cuda.empty_cache()
            q, kv, qi, ki, wi, idx = inputs(S, H)
            gout = torch.randn(1, S, H, DV, device="cuda", dtype=torch.bfloat16)
            gkl = torch.full((1, S), 1.0 / S, device="cuda")
            for stage in stages:
                ref = None
                for i, (name, opt) in enumerate(variants(stage, H)):
                    if i and only and not any(o in name for o in only):  # the first is the reference
                        continue
                    row = dict(stage=stage, variant=name, heads=H, seq=S)
                    try:
                        if stage == "base":
                            if name.startswith("indexer"):
                                fn = lambda: KN.indexer_topk(qi, ki, wi, TOPK, fp8=True, ordered=False)  # noqa: E731
                            else:
                                fn = sdpa_step(S, H)
                            row["ms"] = cuda_ms(fn, reps)
                            keep(row)
                            continue
                        if stage == "warmup_kl":  # forward + backward, the recall on 64 sampled rows
                            qm, keys = warmup_target_inputs(q, kv)[name.split()[-1]]
                            a, b, c = (x.clone().requires_grad_() for x in (qi, ki, wi))
                            rows_ = R.recall_sample_rows(S, 64, q.device)
                            warm_scale = (QK_NOPE + DQK - DV) ** -0.5

                            def fn():
                                kl, _ = KN.dense_indexer_kl(qm, keys, a, b, c, warm_scale, TOPK, recall_rows=rows_,
                                                            options=opt)
                                return [kl] + list(torch.autograd.grad(kl, (a, b, c), gkl))

                            timed(row, fn)
                            got = [x.detach() for x in fn()]
                            del qm, keys
                        elif stage == "delta":
                            out = KN.sparse_mla_attention(q, kv, idx, DV, scale)[0]
                            fn = ((lambda: sparse_attn._rowwise_dot(gout, out)) if name == "delta kernel"
                                  else (lambda: pytorch_rowwise_dot(gout, out)))
                            timed(row, fn)
                            got = [fn()]
                            row["gbytes_read"] = 2 * out.numel() * out.element_size() / 1e9
                            del out
                        elif stage in ("topk", "select"):
                            if H != heads[0]:  # the indexer does not depend on the attention's heads
                                continue
                            got = []
                            for label, (a, b, c) in (("random", (qi, ki, wi)), ("recency", bench_dsa.recency_inputs(qi, ki, wi))):
                                fn = lambda: KN.indexer_topk(a, b, c, TOPK, fp8=True, ordered=False, options=opt)  # noqa
                                row[f"{label}_ms"] = cuda_ms(fn, reps)
                                paths = torch.zeros(4, dtype=torch.int32, device=a.device)
                                KN.indexer_topk(a, b, c, TOPK, fp8=True, ordered=False, options=opt, path_counts=paths)
                                # rows listed from the guess, the runs' maxima, the sample; rows passed over
                                row[f"{label}_paths"] = paths.tolist()
                                if profile and label == "random":  # the scoring's and the selection's shares
                                    row["kernels"] = profile_step(fn, True, 8)
                                got.append(fn().sort(-1).values.float())
                            row["ms"] = row["random_ms"]
                        elif stage == "fwd":
                            fn = lambda: KN.sparse_mla_attention(q, kv, idx, DV, scale, options=opt)  # noqa: E731
                            timed(row, fn)
                            got = [fn()[0]]
                        elif stage == "bwd":  # as training runs it: with the KL's head-summed target
                            o, lse = KN.sparse_mla_attention(q, kv, idx, DV, scale, options=opt)

                            def fn():
                                return KN.sparse_mla_attention_backward(q, kv, idx, o, lse, gout, DV, scale, options=opt)

                            timed(row, fn)
                            got = [x for x in fn() if x is not None]
                            del o, lse
                        else:
                            a, b, c = (x.clone().requires_grad_() for x in (qi, ki, wi))
                            lse = KN.sparse_mla_attention(q, kv, idx, DV, scale, options=opt)[1]
                            fwd = lambda: KN.sparse_indexer_kl(q, kv, a, b, c, idx, scale, lse=lse, options=opt)  # noqa
                            row["fwd_ms"] = cuda_ms(fwd, reps)
                            kl = fwd()
                            bwd = lambda: torch.autograd.grad(kl, (a, b, c), gkl, retain_graph=True)  # noqa: E731
                            row["bwd_ms"] = cuda_ms(bwd, reps)
                            row["ms"] = row["fwd_ms"] + row["bwd_ms"]
                            got = [kl.detach()] + list(bwd())
                        if ref is None:
                            ref = got
                        else:
                            row["rel_to_first"] = rel(got, ref)
                        row["finite"] = all_finite(got)
                        del got
                    except Exception as e:  # a variant that does not launch is a result too
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    torch.cuda.empty_cache()
                    keep(row)
            q = kv = qi = ki = wi = idx = gout = None
    return rows


STAGES = ("base", "topk", "select", "fwd", "bwd", "kl", "warmup_kl", "delta")


def chosen_variants(text: str, stages: list[str], heads: list[int]) -> list[str]:
    """``--variants``' substrings, split at the commas outside parentheses (names hold tiles such
    as ``dq(64, 8, 3)``); each must name a variant of the stages and head counts asked for."""
    only = [v.strip() for v in re.split(r",(?![^()]*\))", text) if v.strip()]
    names = [name for stage in stages for H in heads for name, _ in variants(stage, H)]
    unknown = [v for v in only if not any(v in name for name in names)]
    if unknown:
        raise SystemExit(f"error: --variants {unknown} name no variant of stages {stages} at heads {heads}; "
                         f"variants: {sorted(set(names))}")
    return only


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(bench_dsa.MODELS), default=bench_dsa.DEFAULT_MODEL,
                   help="the model whose attention shape is timed (bench_dsa.py's)")
    p.add_argument("--topk", type=bench_dsa.positive_int, default=None, help="keys a query selects (default: the model's)")
    p.add_argument("--heads", default="16,64,128")
    p.add_argument("--seqs", default="32768")
    p.add_argument("--stages", default="base,topk,fwd,bwd,kl")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also each variant's time per kernel (torch.profiler)")
    p.add_argument("--variants", default="", help="comma-separated substrings (commas inside parentheses "
                   "belong to a name): time only the variants named so (and each stage's first, the reference)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    heads, stages = [int(x) for x in a.heads.split(",")], a.stages.split(",")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"error: unknown --stages {bad}; known: {list(STAGES)}")
    shape = use_model(a.model, a.topk)
    only = chosen_variants(a.variants, stages, heads)
    if not torch.cuda.is_available():
        sys.exit("error: tune_dsa.py times GPU kernels; no CUDA device here")
    run(heads, [int(x) for x in a.seqs.split(",")], stages, a.reps, a.out, only, a.profile,
        run_record(invocation(__file__, argv)), shape)


if __name__ == "__main__":
    main()
