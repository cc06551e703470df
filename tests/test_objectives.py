"""The indexer's selectable training objectives (``mdsa_indexer_objective``).

Each per-row loss against a direct row-by-row evaluation of its formula; its gradient w.r.t.
the indexer logits against the analytic one; the chunked dense / sparse ops against a direct
full computation (values and gradients w.r.t. the indexer's q, k, w); "kl" unchanged bit for
bit; config validation; ops routing; the tiny model's warm-up with every objective.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsa import ops
from megatron_dsa import reference as R
from tests.helpers import F64, rand, rel_err, set_indexer_loss_scale
from megatron_dsa.config import DSAConfigError, INDEXER_OBJECTIVES
from megatron_dsa.model import model_config

OBJECTIVES = ("kl", "reverse_kl", "mse", "listwise")






# ---- direct formulas, one row at a time ------------------------------------------------------


def top_set(p_row: torch.Tensor, m: torch.Tensor, topk) -> torch.Tensor:
    """Bool [n]: the top min(topk, |m|) entries of p_row inside m (the whole m if topk is None)."""
    if topk is None:
        return m.clone()
    eligible = m.nonzero().flatten()
    k = min(topk, eligible.numel())
    order = torch.argsort(p_row[eligible], descending=True, stable=True)[:k]
    t = torch.zeros_like(m)
    t[eligible[order]] = True
    return t


def direct_row(name: str, p: torch.Tensor, logits: torch.Tensor, m: torch.Tensor, topk=None) -> torch.Tensor:
    """One row's loss from its textbook formula (differentiable in logits)."""
    if not m.any():
        return logits.sum() * 0
    q = torch.softmax(logits[m], -1)
    pm = p[m]
    if name == "kl":
        keep = pm > 0
        return (pm[keep] * (pm[keep].log() - q[keep].log())).sum()
    if name == "reverse_kl":
        return (q * (q.log() - pm.log())).sum()
    if name == "mse":
        return ((q - pm) ** 2).sum()
    if name == "listwise":
        t = top_set(p, m, topk)[m]
        q_t = pm * t / (pm * t).sum()
        return -(q_t[t] * q[t].log()).sum()
    raise AssertionError(name)


def direct_rows(name, p, logits, mask, topk=None) -> torch.Tensor:
    """[...] losses over the leading dims of [..., n] inputs."""
    n = p.shape[-1]
    rows = [
        direct_row(name, pr, lr, mr, topk)
        for pr, lr, mr in zip(p.reshape(-1, n), logits.reshape(-1, n), mask.expand_as(p).reshape(-1, n))
    ]
    return torch.stack(rows).reshape(p.shape[:-1])


def analytic_grad(name, p, logits, mask, topk=None) -> torch.Tensor:
    """d loss_row / d logits, derived by hand (0 outside the mask).

    With q = softmax(I) over the mask and d q_s / d I_j = q_s (delta_sj - q_j):
      kl          sum p log(p/q)             -> q - p
      reverse_kl  L = sum q (log q - log p)  -> q_j (log q_j - log p_j - L)
      mse         sum (q - p)^2              -> 2 q_j ((q_j - p_j) - sum_s q_s (q_s - p_s))
      listwise    -sum_T q_T log q           -> q - q_T  (q_T: p renormalised over the top-k T)
    """
    mask = mask.expand_as(p)
    q = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0) * mask
    if name == "kl":
        g = q - p
    elif name == "reverse_kl":
        log_ratio = torch.where(mask, q.clamp_min(1e-300).log() - p.clamp_min(1e-300).log(), 0.0)
        loss = (q * log_ratio).sum(-1, keepdim=True)
        g = q * (log_ratio - loss)
    elif name == "mse":
        d = q - p
        g = 2 * q * (d - (q * d).sum(-1, keepdim=True))
    elif name == "listwise":
        n = p.shape[-1]
        t = torch.stack(
            [top_set(pr, mr, topk) for pr, mr in zip(p.reshape(-1, n), mask.reshape(-1, n))]
        ).reshape(p.shape)
        q_t = p * t
        q_t = q_t / q_t.sum(-1, keepdim=True).clamp_min(1e-300)
        g = q - q_t
    else:
        raise AssertionError(name)
    return g * mask


def random_rows(shape, p_floor=0.0):
    """p (a distribution over a random mask), logits, mask; the last row has an empty mask."""
    n = shape[-1]
    mask = torch.rand(shape) > 0.35
    mask[..., 0] = True
    mask.view(-1, n)[-1] = False
    p = (torch.rand(shape, dtype=F64) + p_floor) * mask
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return p, rand(*shape, requires_grad=True), mask


# ---- per-row functions -------------------------------------------------------------------------


@pytest.mark.parametrize("name, topk", [("kl", None), ("reverse_kl", None), ("mse", None), ("listwise", 3), ("listwise", None)])
def test_per_row_loss_and_gradient(seed, name, topk):
    p, logits, mask = random_rows((3, 4, 9), p_floor=0.05)  # p > 0 on the mask
    fn = R.objective_rows(name, topk)
    got = fn(p, logits, mask)
    want = direct_rows(name, p, logits.detach(), mask, topk)
    assert got.shape == (3, 4)
    assert rel_err(got, want) < 1e-12
    assert got.reshape(-1)[-1] == 0, "a row with no eligible key costs nothing"
    (grad,) = torch.autograd.grad(got.sum(), [logits])
    assert rel_err(grad, analytic_grad(name, p, logits.detach(), mask, topk)) < 1e-11
    assert not grad.reshape(-1, 9)[-1].any() and not (grad * ~mask).any()


def test_objectives_are_registered_under_the_config_names():
    assert tuple(R.INDEXER_OBJECTIVES) == INDEXER_OBJECTIVES == OBJECTIVES
    assert R.objective_rows("kl") is R.kl_rows
    with pytest.raises(ValueError, match="unknown indexer objective 'kll'"):
        R.objective_rows("kll")


def test_listwise_over_the_whole_set_is_kl_plus_entropy(seed):
    p, logits, mask = random_rows((5, 12))
    p[0, 1] = 0.0  # zero target entries are fine (0 log 0 = 0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    lw = R.listwise_rows(p, logits, mask)
    kl = R.kl_rows(p, logits, mask)
    entropy = torch.where(p > 0, -p * p.clamp_min(1e-300).log(), 0.0).sum(-1)
    assert rel_err(lw, kl + entropy) < 1e-12
    g1, g2 = (torch.autograd.grad(x.sum(), [logits])[0] for x in (lw, kl))
    assert rel_err(g1, g2) < 1e-12


def test_listwise_top_k_keeps_only_the_largest_targets(seed):
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=F64)
    logits = torch.zeros(1, 4, dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    got = R.listwise_rows(p, logits, mask, topk=2)  # T = {1, 3}, q_T = (4/7, 3/7); log q = -log 4
    assert abs(got.item() - torch.log(torch.tensor(4.0, dtype=F64)).item()) < 1e-14
    assert R.listwise_rows(p, logits, mask, topk=9).item() == pytest.approx(R.listwise_rows(p, logits, mask).item(), abs=1e-14)


def test_reverse_kl_stays_finite_where_the_target_underflowed(seed):
    p, logits, mask = random_rows((2, 6))
    p[0, 0] = 0.0
    loss = R.reverse_kl_rows(p, logits, mask)
    (g,) = torch.autograd.grad(loss.sum(), [logits])
    assert torch.isfinite(loss).all() and torch.isfinite(g).all() and loss[0] > 0


# ---- through the chunked ops -----------------------------------------------------------------


def direct_target(q_main, kv, scale, allowed):
    scores = torch.einsum("bthd,bsd->bths", q_main, kv) * scale
    p = scores.masked_fill(~allowed[:, :, None], float("-inf")).softmax(-1).sum(2)
    return p / p.sum(-1, keepdim=True)


def check_against_direct(name, loss, p, allowed, qi, ki, wi, topk):
    """loss (ours, [B, S]) vs the direct full computation, and its gradients w.r.t. qi, ki, wi
    vs autograd of the direct loss AND vs the analytic logit gradient pulled back to qi, ki, wi."""
    logits = R.indexer_scores(qi, ki, wi)  # full [B, S, S], no chunks
    want = direct_rows(name, p, logits, allowed, topk)
    assert rel_err(loss, want) < 1e-10
    ours = torch.autograd.grad(loss.sum(), [qi, ki, wi])
    direct = torch.autograd.grad(want.sum(), [qi, ki, wi], retain_graph=True)
    g_logits = analytic_grad(name, p, logits.detach(), allowed, topk)
    analytic = torch.autograd.grad(logits, [qi, ki, wi], grad_outputs=g_logits)
    for a, b, c in zip(ours, direct, analytic):
        assert rel_err(a, b) < 1e-10 and rel_err(a, c) < 1e-10


def indexer_inputs(B, S, HI, DI):
    return rand(B, S, HI, DI, requires_grad=True), rand(B, S, DI, requires_grad=True), rand(B, S, HI, requires_grad=True)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_dense_objective_equals_direct_computation(seed, small_chunks, name):
    B, S, H, D, HI, DI, K = 2, 15, 3, 12, 2, 8, 4
    q_main, kv = rand(B, S, H, D), rand(B, S, D)
    qi, ki, wi = indexer_inputs(B, S, HI, DI)
    loss, recall = R.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, K, objective=name)
    _, recall_kl = R.dense_indexer_kl(q_main, kv, qi.detach(), ki.detach(), wi.detach(), 0.3, K)
    assert loss.shape == recall.shape == (B, S) and torch.equal(recall, recall_kl)
    allowed = R.causal_mask(torch.arange(S), torch.arange(S))[None].expand(B, -1, -1)
    p = direct_target(q_main, kv, 0.3, allowed)
    check_against_direct(name, loss, p, allowed, qi, ki, wi, K)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_sparse_objective_equals_direct_computation(seed, small_chunks, name):
    B, S, H, D, HI, DI, K = 2, 17, 4, 12, 3, 8, 5
    q_main, kv = rand(B, S, H, D), rand(B, S, D)
    qi, ki, wi = indexer_inputs(B, S, HI, DI)
    idx = R.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
    loss = R.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3, objective=name)
    assert loss.shape == (B, S)
    allowed = torch.zeros(B, S, S + 1, dtype=torch.bool).scatter_(2, torch.where(idx < 0, S, idx), True)[..., :S]
    p = direct_target(q_main, kv, 0.3, allowed)  # renormalised over the selected set
    # listwise in the sparse phase: T = the selected set itself
    check_against_direct(name, loss, p, allowed, qi, ki, wi, None)


def test_sparse_listwise_is_the_sparse_kl_plus_a_constant(seed):
    B, S, H, D, HI, DI, K = 1, 13, 2, 8, 2, 8, 4
    q_main, kv = rand(B, S, H, D), rand(B, S, D)
    qi, ki, wi = indexer_inputs(B, S, HI, DI)
    idx = R.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
    kl = R.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3)
    lw = R.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3, objective="listwise")
    allowed = torch.zeros(B, S, S + 1, dtype=torch.bool).scatter_(2, torch.where(idx < 0, S, idx), True)[..., :S]
    p = direct_target(q_main, kv, 0.3, allowed)
    entropy = torch.where(p > 0, -p * p.clamp_min(1e-300).log(), 0.0).sum(-1)
    assert rel_err(lw - kl, entropy) < 1e-10 and (entropy[:, 1:] > 0).all()  # row 0 has one key
    for a, b in zip(torch.autograd.grad(kl.sum(), [qi, ki, wi]), torch.autograd.grad(lw.sum(), [qi, ki, wi])):
        assert rel_err(b, a) < 1e-12


# ---- "kl" is today's computation, bit for bit ------------------------------------------------


def frozen_dense_kl(q_main, kv, q_idx, k_idx, w_idx, scale, topk):
    """dense_indexer_kl as it was before objectives existed (default positions)."""

    def chunk(qm, qp, qi, wi, kv_, kp, ki):
        mask = R.causal_mask(qp[0], kp)[None]
        with torch.no_grad():
            scores = torch.einsum("bthd,bsd->bths", R._up(qm), R._up(kv_)) * scale
            probs = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")), dim=-1)
            p = R.head_summed_target(probs.nan_to_num_(0.0))
        logits = R.indexer_scores(qi, ki, wi)
        kl = R.kl_rows(p, logits, mask)
        with torch.no_grad():
            sel = R.topk_from_scores(logits.detach(), mask, topk)
            recall = (torch.gather(p, -1, sel.clamp_min(0)) * (sel >= 0)).sum(-1)
        return kl, recall

    B, Sq, H = q_main.shape[:3]
    Sk = kv.shape[1]
    pos = torch.arange(Sq)
    step = R._chunk_size(B * max(H, q_idx.shape[2]) * Sk, Sq)
    return R._map_query_chunks(chunk, (q_main.detach(), pos[None], q_idx, w_idx), (kv.detach(), torch.arange(Sk), k_idx), step)


def frozen_sparse_kl(q_main, kv, q_idx, k_idx, w_idx, topk_idx, scale):
    """sparse_indexer_kl as it was before objectives existed."""

    def chunk(qm, idx, qi, wi, kv_, ki):
        valid = idx >= 0
        with torch.no_grad():
            sel = R.gather_tokens(kv_, idx)
            scores = torch.einsum("bthd,btkd->bthk", R._up(qm), R._up(sel)) * scale
            probs = torch.softmax(scores.masked_fill(~valid[:, :, None], float("-inf")), dim=-1)
            p = R.head_summed_target(probs.nan_to_num_(0.0))
        k_sel = R.gather_tokens(ki, idx)
        logits = (torch.einsum("btjd,btkd->btjk", R._up(qi), R._up(k_sel)).relu() * wi[..., None]).sum(dim=2)
        return (R.kl_rows(p, logits, valid),)

    B, Sq, H = q_main.shape[:3]
    K = topk_idx.shape[-1]
    step = R._chunk_size(B * K * max(H, q_idx.shape[2], kv.shape[-1]), Sq)
    (kl,) = R._map_query_chunks(chunk, (q_main.detach(), topk_idx, q_idx, w_idx), (kv.detach(), k_idx), step)
    return kl


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 97])
def test_default_objective_is_bit_identical_to_before(seed, monkeypatch, dtype, chunk_elements):
    monkeypatch.setattr(R, "CHUNK_ELEMENTS", chunk_elements)
    B, S, H, D, HI, DI, K = 2, 19, 3, 12, 2, 8, 5
    q_main, kv = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, D, dtype=dtype)
    qi, ki, wi = (torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((B, S, HI, DI), (B, S, DI), (B, S, HI)))
    idx = R.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
    runs = {
        "default": lambda: (*R.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, K), R.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3)),
        "kl": lambda: (
            *R.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, K, objective="kl"),
            R.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3, objective="kl"),
        ),
        "ops": lambda: (
            *ops.indexer_loss_backend("reference", q_main.device, "kl").dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, K),
            ops.indexer_loss_backend("reference", q_main.device, "kl").sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3),
        ),
        "before": lambda: (*frozen_dense_kl(q_main, kv, qi, ki, wi, 0.3, K), frozen_sparse_kl(q_main, kv, qi, ki, wi, idx, 0.3)),
    }
    results = {}
    for key, run in runs.items():
        dense, recall, sparse = run()
        grads = torch.autograd.grad(dense.sum() + 2 * sparse.sum(), [qi, ki, wi])
        results[key] = (dense.detach(), recall, sparse.detach(), *grads)
    for key in ("default", "kl", "ops"):
        assert all(torch.equal(a, b) for a, b in zip(results[key], results["before"])), key


# ---- config and routing ----------------------------------------------------------------------


def test_objective_defaults_to_kl_and_is_resolved():
    assert model_config("tiny").dsa.objective == "kl"
    for name in OBJECTIVES:
        config = model_config("tiny", mdsa_indexer_objective=name)
        assert config.mdsa_indexer_objective == config.dsa.objective == name


@pytest.mark.parametrize("bad", ["KL", "kll", "cross_entropy", ""])
def test_unknown_objective_fails_at_construction(bad):
    with pytest.raises(DSAConfigError, match="mdsa_indexer_objective must be one of"):
        model_config("tiny", mdsa_indexer_objective=bad)


def test_reference_ops_refuse_an_unknown_objective(seed):
    q_main, kv = rand(1, 4, 2, 8), rand(1, 4, 8)
    qi, ki, wi = indexer_inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown indexer objective"):
        R.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, 2, objective="nope")
    with pytest.raises(ValueError, match="unknown indexer objective"):
        R.sparse_indexer_kl(q_main, kv, qi, ki, wi, R.indexer_topk(qi, ki, wi, 2), 0.3, objective="nope")


def test_parallel_path_accepts_only_kl():
    with pytest.raises(DSAConfigError, match="tensor/context-parallel indexer loss is the KL"):
        model_config("tiny", tensor_model_parallel_size=2, mdsa_indexer_objective="mse")


@pytest.mark.parametrize("kind", ["auto", "reference", "triton"])
@pytest.mark.parametrize("name", ["reverse_kl", "mse", "listwise"])
def test_other_objectives_route_with_the_objective_bound(seed, kind, name):
    """The dense (warm-up) op is the configured backend's blockwise one with the objective bound
    (its cost does not depend on the objective); the sparse op is the reference's (the fused
    sparse kernel implements only the KL). Values and gradients equal the reference's."""
    be = ops.indexer_loss_backend(kind, torch.device("cpu"), name)
    assert be.objective == name
    assert be.name == ("triton+reference" if kind == "triton" else "reference")
    B, S, H, D, HI, DI, K = 1, 9, 2, 8, 2, 8, 3
    q_main, kv = rand(B, S, H, D), rand(B, S, D)
    qi, ki, wi = indexer_inputs(B, S, HI, DI)
    idx = R.indexer_topk(qi.detach(), ki.detach(), wi.detach(), K)
    got, recall = be.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, K)
    want, recall_want = R.dense_indexer_kl(q_main, kv, qi, ki, wi, 0.3, K, objective=name)
    tol = 1e-6 if kind == "triton" else 1e-10  # the kernels' op accumulates in fp32
    assert torch.isfinite(got).all() and rel_err(got, want) < tol and rel_err(recall, recall_want) < tol
    g = torch.rand_like(want)
    for a, b in zip(torch.autograd.grad(got, [qi, ki, wi], g.to(got.dtype)), torch.autograd.grad(want, [qi, ki, wi], g)):
        assert torch.isfinite(a).all() and rel_err(a, b) < tol
    got = be.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3, lse=None)
    assert torch.equal(got, R.sparse_indexer_kl(q_main, kv, qi, ki, wi, idx, 0.3, objective=name))


def test_kl_keeps_the_configured_backend():
    assert ops.indexer_loss_backend("reference", torch.device("cpu"), "kl") is ops.backend("reference", torch.device("cpu"))
    assert ops.indexer_loss_backend("auto", torch.device("cpu")) is ops.backend("auto", torch.device("cpu"))


# ---- the tiny model ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBJECTIVES)
def test_tiny_model_warmup_with_each_objective(megatron_world, seed, name):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsa.layer import pop_indexer_losses
    from megatron_dsa.model import build_model, indexer_parameters

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed % 10000)
    model = build_model("tiny", model_config("tiny", mdsa_mode="warmup", mdsa_indexer_objective=name))
    tokens = torch.randint(0, 512, (2, 32))
    positions = torch.arange(32)[None].expand(2, -1)
    loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).float().mean()
    assert torch.isfinite(loss)
    losses = pop_indexer_losses(model)
    assert len(losses) == 3 and all(torch.isfinite(x) and x >= 0 for x in losses)
    if name != "mse":  # kl / reverse_kl / listwise are > 0 for a random indexer (mse could be ~0)
        assert all(x > 0 for x in losses)
    sum(losses).backward()
    idx = {id(p) for p in indexer_parameters(model)}
    assert all(p.grad is None for p in model.parameters() if id(p) not in idx), "main model frozen"
    grads = [p.grad for p in indexer_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["reverse_kl", "mse", "listwise"])
def test_tiny_model_sparse_phase_with_other_objectives(megatron_world, seed, name):
    """The sparse loss rides on the attention output: one LM backward trains both."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_dsa.model import build_model, indexer_parameters

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed % 10000)
    model = build_model("tiny", model_config("tiny", mdsa_mode="sparse", dsa_indexer_topk=8, mdsa_indexer_objective=name))
    set_indexer_loss_scale(1.0)
    tokens = torch.randint(0, 512, (2, 32))
    loss = model(tokens, torch.arange(32)[None].expand(2, -1), None, labels=tokens.roll(-1, dims=1)).float().mean()
    loss.backward()
    grads = [p.grad for p in indexer_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
