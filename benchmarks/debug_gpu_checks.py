"""GPU correctness matrix (not a test): per-output relative errors vs the reference for the sparse
attention and sparse KL kernels over shapes x launch configs.  python benchmarks/debug_gpu_checks.py"""
import itertools, os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_dsa import reference as R
from megatron_dsa.kernels import sparse_attn as A, indexer_kl as L

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

def idx_for(B, S, K):
    sc = torch.randn(S, S, device="cuda")
    idx = R.topk_from_scores(sc, R.causal_mask(torch.arange(S, device="cuda"), torch.arange(S, device="cuda")), K)
    return idx[None].repeat(B, 1, 1).contiguous()

torch.manual_seed(0)
cases = [(1, 660, 16, 64, 32, 160), (2, 660, 16, 64, 32, 160), (2, 660, 3, 64, 32, 160), (1, 1024, 16, 512, 64, 512)]
for (B, S, H, DV, DR, K), dt, atomic in itertools.product(cases, (torch.bfloat16, torch.float32), (0,)):
    A.ATOMIC_MODE = atomic
    D = DV + DR
    q = torch.randn(B, S, H, D, device="cuda").to(dt).requires_grad_()
    kv = torch.randn(B, S, D, device="cuda").to(dt).requires_grad_()
    idx = idx_for(B, S, K)
    o, l = A.sparse_mla_attention(q, kv, idx, DV, D**-0.5)
    go = torch.randn_like(o)
    gq, gkv = torch.autograd.grad(o, (q, kv), go)
    o2, l2 = R.sparse_mla_attention(q, kv, idx, DV, D**-0.5)
    gq2, gkv2 = torch.autograd.grad(o2, (q, kv), go)
    f = torch.isfinite(l2)
    print(f"attn B{B} S{S} H{H} D{DV}+{DR} K{K} {str(dt)[6:]} atomic{atomic}: out {rel(o,o2):.1e} lse {(l[f]-l2[f]).abs().max().item():.1e} dq {rel(gq,gq2):.1e} dkv {rel(gkv,gkv2):.1e}", flush=True)
kcases = [(1, 660, 16, 96, 3, 16, 160), (2, 660, 16, 96, 3, 16, 160), (2, 660, 16, 96, 4, 32, 160), (1, 1024, 16, 576, 64, 128, 512)]
for (B, S, H, D, HI, DI, K), dt, atomic in itertools.product(kcases, (torch.bfloat16, torch.float32), (0,)):
    A.ATOMIC_MODE = atomic
    qm = torch.randn(B, S, H, D, device="cuda").to(dt)
    kv = torch.randn(B, S, D, device="cuda").to(dt)
    qi = torch.randn(B, S, HI, DI, device="cuda").to(dt).requires_grad_()
    ki = torch.randn(B, S, DI, device="cuda").to(dt).requires_grad_()
    wi = torch.randn(B, S, HI, device="cuda").requires_grad_()
    idx = idx_for(B, S, K)
    kl = L.sparse_indexer_kl(qm, kv, qi, ki, wi, idx, D**-0.5)
    g = torch.randn_like(kl)
    gr = torch.autograd.grad(kl, (qi, ki, wi), g)
    kl2 = R.sparse_indexer_kl(qm, kv, qi, ki, wi, idx, D**-0.5)
    gr2 = torch.autograd.grad(kl2, (qi, ki, wi), g)
    print(f"kl B{B} S{S} H{H} D{D} HI{HI} DI{DI} K{K} {str(dt)[6:]} atomic{atomic}: kl {rel(kl,kl2):.1e} dqi {rel(gr[0],gr2[0]):.1e} dki {rel(gr[1],gr2[1]):.1e} dwi {rel(gr[2],gr2[2]):.1e}", flush=True)

# ---- KL forward / backward launch configs at 128K (timing only)
if "--no-timing" in sys.argv:
    sys.exit(0)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dsa import TOPK, cuda_time, make_inputs
from megatron_dsa.kernels import indexer as I
t = make_inputs(131072)
idx = I.indexer_topk(t.qi.detach(), t.ki.detach(), t.wi.detach(), TOPK, fp8=True)
for cfg in ((32, 8, 2), (64, 4, 2), (64, 8, 2), (32, 4, 2)):
    L.KL_FWD_CFG = cfg
    try:
        ms, _ = cuda_time(lambda: L.sparse_indexer_kl(t.q, t.kv, t.qi, t.ki, t.wi, idx, t.scale), reps=2)
        print("kl_fwd", cfg, f"{ms:.1f} ms", flush=True)
    except Exception as e:
        print("kl_fwd", cfg, repr(e)[:200])
L.KL_FWD_CFG = None
kl = L.sparse_indexer_kl(t.q, t.kv, t.qi, t.ki, t.wi, idx, t.scale)
for cfg in ((32, 8, 2), (64, 4, 2), (16, 4, 2)):
    L.KL_BWD_CFG = cfg
    try:
        ms, _ = cuda_time(lambda: torch.autograd.grad(kl, (t.qi, t.ki, t.wi), t.gkl, retain_graph=True), reps=2)
        print("kl_bwd", cfg, f"{ms:.1f} ms", flush=True)
    except Exception as e:
        print("kl_bwd", cfg, repr(e)[:200])
