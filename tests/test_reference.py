"""The reference math against direct, brute-force evaluations of the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dsa import reference as R
from tests.helpers import F64, rand, rel_err







# ---- indexer ----------------------------------------------------------------------------------


def test_indexer_scores_equal_brute_force(seed):
    B, S, HI, DI = 2, 7, 3, 8
    q, k, w = rand(B, S, HI, DI), rand(B, S, DI), rand(B, S, HI)
    got = R.indexer_scores(q, k, w)
    want = torch.zeros(B, S, S, dtype=F64)
    for b in range(B):
        for t in range(S):
            for s in range(S):
                want[b, t, s] = sum(w[b, t, j] * max(0.0, float(q[b, t, j] @ k[b, s])) for j in range(HI))
    assert rel_err(got, want) < 1e-12


def deepseek_rotary(x: torch.Tensor, positions: torch.Tensor, base: float, interleaved: bool):
    """The reference inference code's apply_rotary_emb, written independently with complex
    numbers: interleaved=False pairs (i, i + d/2), interleaved=True pairs (2i, 2i + 1)."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    cis = torch.polar(torch.ones(len(positions), d // 2, dtype=F64), positions.to(F64)[:, None] * freqs)
    cis = cis.view([1, len(positions)] + [1] * (x.dim() - 3) + [d // 2])
    pairs = x.unflatten(-1, (2, d // 2)).transpose(-1, -2) if not interleaved else x.unflatten(-1, (d // 2, 2))
    y = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * cis)
    return y.transpose(-1, -2).flatten(-2) if not interleaved else y.flatten(-2)


def test_indexer_rope_is_half_split_on_first_dims(seed):
    """[rope | nope] layout with NON-interleaved rope; an interleaved implementation fails."""
    B, S, HI, DI, ROPE = 2, 9, 2, 16, 8
    positions = torch.arange(S) * 37  # large positions make the two forms differ clearly
    x = rand(B, S, HI, DI)
    cos, sin = R.rope_cos_sin(positions, ROPE, dtype=F64)
    got = R.apply_rope_half_split(x, cos, sin)
    want_rope = deepseek_rotary(x[..., :ROPE], positions, 10000.0, interleaved=False)
    assert rel_err(got[..., :ROPE], want_rope) < 1e-12
    assert torch.equal(got[..., ROPE:], x[..., ROPE:])  # nope dims untouched
    wrong = deepseek_rotary(x[..., :ROPE], positions, 10000.0, interleaved=True)
    assert rel_err(wrong, want_rope) > 0.1, "interleaved rope must not pass for half-split"


@pytest.mark.parametrize("mscale, mscale_all_dim", [(1.0, 1.0), (1.0, 0.8), (1.0, 0.0)])
def test_yarn_tables_equal_transformers_and_megatron_core(megatron_world, mscale, mscale_all_dim):
    """The indexer's YaRN cos/sin (frequencies and attention factor) are those transformers'
    DeepSeek-V3.2 applies to MLA and its indexer, and megatron-core's YarnRotaryEmbedding to MLA;
    the softmax factor is transformers' (megatron-core computes the same in AbsorbedMLA)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
    from transformers import DeepseekV32Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import yarn_apply_mscale

    yarn = R.YaRN(40.0, 4096, 32.0, 1.0, mscale, mscale_all_dim)
    rope = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                mscale=mscale, mscale_all_dim=mscale_all_dim, rope_theta=10000.0)
    hf_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](DeepseekV32Config(rope_parameters=rope,
                                                                        max_position_embeddings=163840))
    assert torch.equal(R.rope_inv_freq(64, 10000.0, yarn), hf_freq)
    assert yarn.attention_factor == pytest.approx(hf_factor, rel=1e-15)
    assert yarn.softmax_factor == pytest.approx(yarn_apply_mscale(rope, 1.0), rel=1e-15)
    positions = torch.tensor([0, 1, 5, 4095, 4096, 100000])
    cos, sin = R.rope_cos_sin(positions, 64, 10000.0, yarn=yarn)
    angles = positions.float()[:, None] * hf_freq[None]
    assert torch.allclose(cos, angles.cos() * hf_factor, rtol=0, atol=1e-6)
    mc = YarnRotaryEmbedding(64, rotary_base=10000.0, scaling_factor=40.0, original_max_position_embeddings=4096,
                             mscale=mscale, mscale_all_dim=mscale_all_dim, use_cpu_initialization=True)
    emb, mc_factor = mc(100001)
    assert torch.equal(emb[positions, 0, 0, :32].cpu(), angles) and mc_factor == pytest.approx(yarn.attention_factor)
    assert torch.equal(R.rope_cos_sin(positions, 64, 10000.0)[0], R.rope_cos_sin(positions, 64)[0])


def test_rope_preserves_relative_position(seed):
    """q.k after rope depends only on the distance between positions (checks the rotation)."""
    d = 8
    q, k = rand(1, 1, d), rand(1, 1, d)
    dots = []
    for p in (0, 5, 100):
        cq, sq = R.rope_cos_sin(torch.tensor([p + 3]), d, dtype=F64)
        ck, sk = R.rope_cos_sin(torch.tensor([p]), d, dtype=F64)
        dots.append(float(R.apply_rope_half_split(q, cq, sq) @ R.apply_rope_half_split(k, ck, sk).transpose(-1, -2)))
    assert max(dots) - min(dots) < 1e-10


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128])
def test_hadamard_orthonormal_and_sylvester(d):
    H = R.hadamard_transform(torch.eye(d, dtype=F64))
    assert torch.allclose(H @ H.T, torch.eye(d, dtype=F64), atol=1e-12)
    sylvester = torch.ones(1, 1, dtype=F64)
    while sylvester.shape[0] < d:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    assert torch.allclose(H, sylvester / math.sqrt(d), atol=1e-12)


def test_hadamard_keeps_dot_products_and_rejects_non_power_of_two(seed):
    a, b = rand(5, 32), rand(5, 32)
    assert torch.allclose((R.hadamard_transform(a) * R.hadamard_transform(b)).sum(-1), (a * b).sum(-1), atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        R.hadamard_transform(rand(3, 24))


def test_indexer_qkw_matches_formula(seed):
    B, S, HI, DI, ROPE, H = 2, 5, 4, 16, 8, 12
    q_proj, k_proj, w_proj = rand(B, S, HI * DI), rand(B, S, DI), rand(B, S, HI)
    g, beta = rand(DI), rand(DI)
    cos, sin = R.rope_cos_sin(torch.arange(S), ROPE, dtype=F64)
    q, k, w = R.indexer_qkw(q_proj, k_proj, w_proj, g, beta, cos, sin, n_heads=HI, eps=1e-6)
    k_ln = (k_proj - k_proj.mean(-1, keepdim=True)) / torch.sqrt(k_proj.var(-1, unbiased=False, keepdim=True) + 1e-6) * g + beta
    assert rel_err(k, R.hadamard_transform(R.apply_rope_half_split(k_ln, cos, sin))) < 1e-12
    assert rel_err(w, w_proj * HI**-0.5 * DI**-0.5) < 1e-15
    # The rotation leaves scores exactly as they are without it.
    q0, k0, _ = R.indexer_qkw(q_proj, k_proj, w_proj, g, beta, cos, sin, n_heads=HI, rotate=False)
    assert rel_err(R.indexer_scores(q, k, w), R.indexer_scores(q0, k0, w)) < 1e-12


# ---- top-k ------------------------------------------------------------------------------------


def test_topk_causal_min_k_and_padding(seed, small_chunks):
    B, S, HI, DI, K = 2, 23, 2, 8, 6
    q, k, w = rand(B, S, HI, DI), rand(B, S, DI), rand(B, S, HI)
    idx = R.indexer_topk(q, k, w, K)
    assert idx.shape == (B, S, K) and idx.dtype == torch.int32
    scores = R.indexer_scores(q, k, w)
    for t in range(S):
        n = min(K, t + 1)
        row = idx[:, t]
        assert (row[:, :n] >= 0).all() and (row[:, n:] == -1).all()
        assert (row[:, :n] <= t).all(), "a future token was selected"
        for b in range(B):
            # Compare selected scores (ReLU makes exact ties common), then the tie rule:
            # an unselected key never outranks a selected one, and ties go to smaller indices.
            want = torch.topk(scores[b, t, : t + 1], n).values
            got = scores[b, t, row[b, :n]]
            assert torch.equal(got.sort(descending=True).values, want)
            left_out = [s for s in range(t + 1) if s not in row[b, :n].tolist()]
            for s in left_out:
                tied = got == scores[b, t, s]
                assert not (row[b, :n][tied] > s).any(), "ties must go to the smaller index"


def test_topk_never_selects_future_with_custom_positions(seed):
    """Context-parallel style positions: keys and queries in a shuffled global layout."""
    S, K = 16, 5
    perm = torch.randperm(S)
    q, k, w = rand(1, S, 2, 8), rand(1, S, 8), rand(1, S, 2)
    idx = R.indexer_topk(q, k, w, K, q_pos=perm, k_pos=perm)
    for t in range(S):
        sel = idx[0, t][idx[0, t] >= 0]
        assert len(sel) == min(K, int(perm[t]) + 1)
        assert (perm[sel] <= perm[t]).all()


def test_topk_ties_go_to_the_smaller_index():
    scores = torch.zeros(1, 4, 4)
    idx = R.topk_from_scores(scores, R.causal_mask(torch.arange(4), torch.arange(4)), 2)
    assert idx[0].tolist() == [[0, -1], [0, 1], [0, 1], [0, 1]]


# ---- attention -------------------------------------------------------------------------------


def masked_dense_oracle(q, kv, idx, v_dim, scale):
    """Dense attention with -inf on every non-selected key (the spec's test oracle)."""
    B, S = idx.shape[:2]
    Sk = kv.shape[1]
    allowed = torch.zeros(B, S, Sk + 1, dtype=torch.bool)
    allowed.scatter_(2, torch.where(idx < 0, Sk, idx), True)
    scores = torch.einsum("bthd,bsd->bths", q, kv) * scale
    scores = scores.masked_fill(~allowed[:, :, None, :Sk], float("-inf"))
    return torch.einsum("bths,bsd->bthd", scores.softmax(-1), kv[..., :v_dim])


@pytest.mark.parametrize("B,S,H,D,V,K", [(1, 5, 1, 8, 4, 3), (2, 33, 3, 24, 16, 7), (1, 64, 4, 40, 32, 64), (2, 19, 2, 16, 8, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_attention_equals_masked_dense_oracle(seed, small_chunks, B, S, H, D, V, K, dtype):
    q, kv = rand(B, S, H, D, dtype=dtype), rand(B, S, D, dtype=dtype)
    idx = R.indexer_topk(rand(B, S, 2, 8), rand(B, S, 8), rand(B, S, 2), K)
    scale = D**-0.5
    out, lse = R.sparse_mla_attention(q, kv, idx, V, scale)
    want = masked_dense_oracle(q.double(), kv.double(), idx, V, scale)
    assert rel_err(out.double(), want) < (1e-12 if dtype == F64 else 1e-5)
    assert torch.isfinite(lse).all()


def test_rows_shorter_than_k_equal_dense_causal(seed, small_chunks):
    B, S, H, D, V, K = 2, 12, 3, 16, 8, 12  # K >= S: every row keeps all its eligible keys
    q, kv = rand(B, S, H, D), rand(B, S, D)
    idx = R.indexer_topk(rand(B, S, 2, 8), rand(B, S, 8), rand(B, S, 2), K)
    out, lse = R.sparse_mla_attention(q, kv, idx, V, 0.3)
    dense, dense_lse = R.dense_mla_attention(q, kv, V, 0.3)
    assert rel_err(out, dense) < 1e-12 and rel_err(lse, dense_lse) < 1e-12


@pytest.mark.parametrize("packed", [False, True])
def test_mha_form_equals_the_absorbed_attention(seed, small_chunks, packed):
    """MLA's MHA form (latents expanded per head by the up-projections) gives the absorbed
    form's output after the V up-projection, its lse, and the same gradients, W_UK's included."""
    B, S, H, dk, R_, L, dv = 2, 23, 3, 8, 4, 16, 6
    q_nope, q_rope = rand(B, S, H, dk, dtype=F64, requires_grad=True), rand(B, S, H, R_, dtype=F64, requires_grad=True)
    kv = rand(B, S, L + R_, dtype=F64, requires_grad=True)
    k_up, v_up = rand(H, dk, L, dtype=F64, requires_grad=True), rand(H, dv, L, dtype=F64, requires_grad=True)
    docs = dict(q_doc=torch.tensor([0] * 9 + [1] * 14), k_doc=torch.tensor([0] * 9 + [1] * 14)) if packed else {}
    # The layer's unabsorbed query: q_nope in the first dk columns, the rope part in the last R.
    q = torch.cat((q_nope, torch.zeros(B, S, H, L - dk, dtype=F64), q_rope), dim=-1)
    out, lse = R.dense_attention(*R.mha_form(q, kv, k_up, v_up), 0.3, **docs)
    latent, lse_abs = R.dense_mla_attention(R.absorb_query(q, k_up), kv, L, 0.3, **docs)
    want = torch.einsum("bthl,hdl->bthd", latent, v_up)
    assert out.shape == (B, S, H, dv) and rel_err(out, want) < 1e-12 and rel_err(lse, lse_abs) < 1e-12
    g = torch.randn_like(out)
    leaves = (q_nope, q_rope, kv, k_up, v_up)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="MHA form"):
        R.mha_form(q[..., :-1], kv, k_up, v_up)


def test_fully_masked_rows_give_zeros_not_nan(seed):
    B, S, H, D, V, K = 1, 6, 2, 8, 4, 3
    q, kv = rand(B, S, H, D, requires_grad=True), rand(B, S, D, requires_grad=True)
    idx = torch.full((B, S, K), -1)
    idx[0, 3, 0] = 2
    out, lse = R.sparse_mla_attention(q, kv, idx, V, 0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[0, [0, 1, 2, 4, 5]] == 0).all() and torch.isinf(lse[0, 0]).all()
    assert torch.allclose(out[0, 3], kv[0, 2, :V].expand(H, V))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kv.grad).all()


def test_chunked_attention_gradients_equal_unchunked(seed, monkeypatch):
    B, S, H, D, V, K = 2, 29, 3, 16, 8, 5
    q, kv = rand(B, S, H, D, requires_grad=True), rand(B, S, D, requires_grad=True)
    idx = R.indexer_topk(rand(B, S, 2, 8), rand(B, S, 8), rand(B, S, 2), K)
    grads = []
    for elements in (1 << 30, 53):
        monkeypatch.setattr(R, "CHUNK_ELEMENTS", elements)
        for fn in (lambda: R.sparse_mla_attention(q, kv, idx, V, 0.4), lambda: R.dense_mla_attention(q, kv, V, 0.4)):
            out, lse = fn()
            (out.square().sum() + lse.sum()).backward()
            grads.append((q.grad.clone(), kv.grad.clone()))
            q.grad = kv.grad = None
    for (gq, gkv), (cq, ckv) in zip(grads[:2], grads[2:]):
        assert rel_err(cq, gq) < 1e-12 and rel_err(ckv, gkv) < 1e-12


# ---- the KL objectives -----------------------------------------------------------------------


def test_kl_rows_forward_and_gradient(seed):
    n = 11
    mask = torch.rand(4, n) > 0.3
    mask[:, 0] = True
    p = torch.rand(4, n, dtype=F64) * mask
    p = p / p.sum(-1, keepdim=True)
    logits = rand(4, n, requires_grad=True)
    kl = R.kl_rows(p, logits, mask)
    for r in range(4):
        m = mask[r]
        log_q = torch.log_softmax(logits[r, m], -1)
        pr = p[r, m]
        want = (pr[pr > 0] * (pr[pr > 0].log() - log_q[pr > 0])).sum()
        assert abs(kl[r].item() - want.item()) < 1e-12
    kl.sum().backward()
    softmax = torch.softmax(logits.detach().masked_fill(~mask, float("-inf")), -1)
    assert torch.allclose(logits.grad, (softmax - p) * mask, atol=1e-12), "dKL/dI = softmax(I) - p"


def direct_target(q_main, kv, scale, allowed):
    scores = torch.einsum("bthd,bsd->bths", q_main, kv) * scale
    probs = scores.masked_fill(~allowed[:, :, None], float("-inf")).softmax(-1)
    p = probs.sum(2)
    return p / p.sum(-1, keepdim=True)


def test_dense_indexer_kl_equals_direct_computation(seed, small_chunks):
    B, S, H, D, HI, DI, K = 2, 17, 3, 12, 2, 8, 4
    q_main, kv = rand(B, S, H, D), rand(B, S, D)
    qi, ki, wi = rand(B, S, HI, DI, requires_grad=True), rand(B, S, DI, requires_grad=True), rand(B, S, HI, requires_grad=True)
    kl, recall = R.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, K)
    allowed = R.causal_mask(torch.arange(S), torch.arange(S))[None].expand(B, -1, -1)
    p = direct_target(q_main, kv, 0.3, allowed)
    logits = R.indexer_scores(qi, ki, wi)
    log_q = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    want = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - log_q), torch.zeros_like(p)).sum(-1)
    assert rel_err(kl, want) < 1e-10
    idx = R.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
    want_recall = (torch.gather(p, -1, idx.clamp_min(0)) * (idx >= 0)).sum(-1)
    assert rel_err(recall, want_recall) < 1e-12
    assert (recall[:, :K] > 1 - 1e-12).all(), "rows with <= K keys keep all the mass"
    g_direct = torch.autograd.grad(want.sum(), [qi, ki, wi])
    g_ours = torch.autograd.grad(kl.sum(), [qi, ki, wi])
    for a, b in zip(g_ours, g_direct):
        assert rel_err(a, b) < 1e-10


def test_sparse_indexer_kl_equals_direct_computation(seed, small_chunks):
    B, S, H, D, HI, DI, K = 2, 21, 4, 12, 3, 8, 5
    q_main, kv = rand(B, S, H, D), rand(B, S, D)
    qi, ki, wi = rand(B, S, HI, DI, requires_grad=True), rand(B, S, DI, requires_grad=True), rand(B, S, HI, requires_grad=True)
    idx = R.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
    kl = R.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3)
    allowed = torch.zeros(B, S, S + 1, dtype=torch.bool).scatter_(2, torch.where(idx < 0, S, idx), True)[..., :S]
    p = direct_target(q_main, kv, 0.3, allowed)  # renormalised over the selected set
    logits = R.indexer_scores(qi, ki, wi)
    log_q = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    want = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - log_q), torch.zeros_like(p)).sum(-1)
    assert rel_err(kl, want) < 1e-10
    for a, b in zip(torch.autograd.grad(kl.sum(), [qi, ki, wi]), torch.autograd.grad(want.sum(), [qi, ki, wi])):
        assert rel_err(a, b) < 1e-10


def test_kl_targets_are_never_differentiated(seed):
    B, S, H, D = 1, 9, 2, 8
    q_main, kv = rand(B, S, H, D, requires_grad=True), rand(B, S, D, requires_grad=True)
    qi, ki, wi = rand(B, S, 2, 8, requires_grad=True), rand(B, S, 8), rand(B, S, 2)
    kl, _ = R.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, 3)
    kl.sum().backward()
    assert q_main.grad is None and kv.grad is None and qi.grad is not None


_LONG_SEQUENCE = """
import resource, sys, torch
from megatron_dsa import reference as R
R.CHUNK_ELEMENTS = 1 << 22  # 16 MB fp32 chunks: the peak (~150-180 MB) stays far from one S^2 matrix
S, H, D, V, K = 8192, 2, 32, 16, 64
q, kv = torch.randn(1, S, H, D), torch.randn(1, S, D)
qi, ki, wi = torch.randn(1, S, 2, 16), torch.randn(1, S, 16), torch.randn(1, S, 2)
R.sparse_mla_attention(q[:, :64], kv[:, :64], R.indexer_topk(qi[:, :64], ki[:, :64], wi[:, :64], K), V, D**-0.5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
idx = R.indexer_topk(qi, ki, wi, K)
out, _ = R.sparse_mla_attention(q, kv, idx, V, D**-0.5)
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
ok = bool(torch.isfinite(out).all() and (idx < torch.arange(S)[:, None] + 1).all())
print(grown_mb, ok)
"""


def test_long_sequence_runs_in_chunks_without_s2_memory():
    """8K tokens on CPU: peak extra memory stays far below one S x S x H fp32 matrix. Measured in
    a fresh process (after a small warm-up call), so other tests' allocations do not blur it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _LONG_SEQUENCE], capture_output=True, text=True, cwd=repo,
                          env=dict(os.environ, PYTHONPATH=str(repo)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown, ok = proc.stdout.split()
    grown_mb, full_mb = float(grown), 8192 * 8192 * 2 * 4 / 2**20  # one S^2 x H fp32 matrix: 512 MB
    assert ok == "True"
    assert grown_mb < full_mb / 2, f"peak grew {grown_mb:.0f} MB; one S^2 matrix is {full_mb:.0f} MB"


def test_recall_sample_rows():
    assert R.recall_sample_rows(10, 0) is None and R.recall_sample_rows(10, 10) is None
    assert R.recall_sample_rows(10, 4).tolist() == [0, 3, 6, 9]  # evenly spaced, ending at the last row
    assert R.recall_sample_rows(17, 4).tolist() == [1, 6, 11, 16]
    rows = R.recall_sample_rows(131072, 4096)
    assert rows.numel() == 4096 and rows[-1] == 131071 and bool((rows.diff() == 32).all())


def test_dense_indexer_kl_recall_rows_are_the_full_recall_at_those_rows():
    B, S, H, D, HI, DI = 2, 20, 3, 16, 2, 8
    qm, kv = torch.randn(B, S, H, D), torch.randn(B, S, D)
    qi, ki, wi = torch.randn(B, S, HI, DI), torch.randn(B, S, DI), torch.randn(B, S, HI)
    kl, recall = R.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, 4)
    rows = R.recall_sample_rows(S, 6)
    kl2, recall2 = R.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, 4, recall_rows=rows)
    assert torch.equal(kl2, kl) and recall2.shape == (B, rows.numel())
    assert torch.equal(recall2, recall[:, rows])
