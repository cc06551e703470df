"""Top-k recall of the dense attention mass at lengths and k (experiments.verify.suites.recall)."""

from __future__ import annotations

import inspect

import pytest
import torch

from megatron_dsa import reference as R
from experiments.verify.suites import indexer_recall_at_lengths
from experiments.verify.suites import recall as recall_mod
from experiments.verify.suites.recall import oracle_topk_mass, topk_for_length
from megatron_dsa.layer import INDEXER_KL, TOPK_RECALL, DSACoreAttention, pop_indexer_losses
from megatron_dsa.model import build_model, dsa_layers, model_config

VOCAB = 512
FORWARD_SIG = inspect.signature(DSACoreAttention.forward)


def make(seed, **overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed % 10000)
    return build_model("tiny", model_config("tiny", **overrides))


def stream(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


class Capture:
    """Records (query, key, x, qr) of every DSA core-attention call, per layer number."""

    def __init__(self, model):
        self.calls: dict[int, list] = {}
        self.handles = [
            layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in dsa_layers(model)
        ]

    def _hook(self, module, args, kwargs):
        bound = FORWARD_SIG.bind(module, *args, **kwargs)
        a = dict(bound.arguments)
        a["query"] = module.absorbed_query(a["query"])  # the dense modes' query is unabsorbed
        self.calls.setdefault(module.layer_number, []).append(
            tuple(a[n].detach().clone() for n in ("query", "key", "x", "qr"))
        )

    def count(self):
        return sum(len(v) for v in self.calls.values())

    def remove(self):
        for h in self.handles:
            h.remove()


def direct_p(query, key, scale):
    """The head-summed, L1-normalised causal dense attention probability [B, S, S], float64,
    from a DSA core attention's query [S, B, H, D] and key [S, B, 1, D]."""
    q = query.permute(1, 0, 2, 3).double()  # [B, S, H, D]
    kv = key.squeeze(2).transpose(0, 1).double()  # [B, S, D]
    S = q.shape[1]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    scores = torch.einsum("bthd,bsd->bths", q, kv) * scale
    probs = scores.masked_fill(~mask[None, :, None, :], float("-inf")).softmax(-1)
    p = probs.sum(2)
    return p / p.sum(-1, keepdim=True)


def direct_oracle(layer, calls, k):
    """Oracle recall, float64: the sum of the k largest entries of p per row, averaged over
    every row of every call and over the rows with more than k eligible keys (None if none)."""
    all_sum = nontrivial_sum = 0.0
    rows = nontrivial_rows = 0
    for query, key, _, _ in calls:
        p = direct_p(query, key, layer.softmax_scale)
        B, S = p.shape[:2]
        best = p.topk(min(k, S), dim=-1).values.sum(-1)  # [B, S]
        all_sum += float(best.sum())
        nontrivial_sum += float(best[:, k:].sum())  # row t has t + 1 eligible keys
        rows += B * S
        nontrivial_rows += B * max(0, S - k)
    return all_sum / rows, (nontrivial_sum / nontrivial_rows if nontrivial_rows else None)


def check_oracle(model, res, cap, k, calls_per_k):
    """res (one (L, k) entry) against direct_oracle on the first k's captured layer inputs."""
    layers = {l.layer_number: l for l in dsa_layers(model)}
    nontrivial = res["oracle_per_layer_nontrivial"] or [None] * len(res["layers"])
    assert len(res["oracle_per_layer"]) == len(res["layers"]) == len(nontrivial)
    for n, got, got_nt in zip(res["layers"], res["oracle_per_layer"], nontrivial):
        want, want_nt = direct_oracle(layers[n], cap.calls[n][:calls_per_k], k)
        assert got == pytest.approx(want, abs=2e-5), (n, k)
        if want_nt is None:
            assert got_nt is None
        else:
            assert got_nt == pytest.approx(want_nt, abs=2e-5), (n, k)
    assert res["oracle_mean"] == pytest.approx(sum(res["oracle_per_layer"]) / len(res["layers"]))
    if res["oracle_per_layer_nontrivial"] is None:
        assert res["oracle_mean_nontrivial"] is None
    else:
        assert res["oracle_mean_nontrivial"] == pytest.approx(sum(nontrivial) / len(nontrivial))


def direct_recall_kl(layer, calls, k):
    """Mean over every query row of every call: recall of the head-summed dense attention mass
    in the indexer's top-k, and KL(p || softmax(I)); computed here from the layer's inputs."""
    indexer = layer.indexer_module()
    recall_sum = kl_sum = 0.0
    rows = 0
    for query, key, x, qr in calls:
        p = direct_p(query, key, layer.softmax_scale)
        B, S = p.shape[:2]
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        with torch.no_grad():
            qi, ki, wi = indexer(x.transpose(0, 1), qr.transpose(0, 1), torch.arange(S))
        logits = R.indexer_scores(qi, ki, wi)  # [B, S, S] fp32
        sel = R.topk_from_scores(logits, mask[None], min(k, S))  # the layer's tie rule
        got = torch.gather(p, -1, sel.clamp_min(0)) * (sel >= 0)
        recall_sum += float(got.sum())
        log_q = logits.double().masked_fill(~mask, float("-inf")).log_softmax(-1)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p))
        kl_sum += float(kl.sum())
        rows += B * S
    return recall_sum / rows, kl_sum / rows


@pytest.mark.parametrize(
    "variant, expect_layers",
    [({}, [1, 2, 3]), ({"mdsa_indexer_sharing": "shared"}, [1, 2, 3]), ({"dsa_indexer_topk_freq": 2}, [1, 3])],
    ids=["per_layer", "shared", "topk_freq2"],
)
def test_recall_matches_direct_computation(megatron_world, seed, variant, expect_layers):
    model = make(seed, mdsa_mode="dense", **variant)
    L, ks = 32, [1, 4, 12]
    # 5 windows of 32; batches of 2, 2, 1 windows: the unequal last batch checks row weighting.
    toks = stream(5 * L + 1, seed)
    cap = Capture(model)
    try:
        out = indexer_recall_at_lengths(model, toks, [L], topks=ks, max_batch_tokens=2 * L)
    finally:
        cap.remove()
    assert list(out) == [L] and list(out[L]) == ks
    # Layer inputs do not depend on k in warm-up (dense attention): one call per batch per k.
    n_calls = len(ks) * 3
    assert all(len(cap.calls[n]) == n_calls for n in (1, 2, 3))
    layers = {l.layer_number: l for l in dsa_layers(model)}
    for k in ks:
        res = out[L][k]
        assert res["layers"] == expect_layers and res["rows"] == 5 * L
        assert len(res["per_layer"]) == len(expect_layers) == len(res["kl_per_layer"])
        for n, got, got_kl, nontriv in zip(expect_layers, res["per_layer"], res["kl_per_layer"],
                                           res["per_layer_nontrivial"]):
            calls = cap.calls[n][:3]  # the first k's forwards (identical inputs for every k)
            want, want_kl = direct_recall_kl(layers[n], calls, k)
            assert got == pytest.approx(want, abs=2e-5), (n, k)
            assert got_kl == pytest.approx(want_kl, rel=1e-3, abs=1e-5), (n, k)
            # rows t < k select every eligible key (recall 1); the rest average to nontrivial
            assert (k + (L - k) * nontriv) / L == pytest.approx(got, abs=1e-9)
        assert res["mean"] == pytest.approx(sum(res["per_layer"]) / len(expect_layers))
        assert 0 < res["mean"] < 1  # random indexer, k < L: some mass is missed
        # the oracle: p's own top-k mass, measured in the first k's forwards (no extra forward)
        check_oracle(model, res, cap, k, calls_per_k=3)
        for got, best in zip(res["per_layer"] + res["per_layer_nontrivial"],
                             res["oracle_per_layer"] + res["oracle_per_layer_nontrivial"]):
            assert best >= got - 1e-6  # no selection of k keys beats p's own top-k
        assert res["oracle_mean"] < 1 - 1e-4  # k < L: even the best k keys miss some mass


def test_oracle_topk_mass_chunks_match_float64(monkeypatch):
    from megatron_dsa import reference as R

    g = torch.Generator().manual_seed(0)
    S, B, H, D = 40, 2, 3, 8
    query, key = torch.randn(S, B, H, D, generator=g), torch.randn(S, B, 1, D, generator=g)
    ks = [1, 5, 39, 40, 64]
    p = direct_p(query, key, 0.7)
    want = torch.stack([p.topk(min(k, S), dim=-1).values.sum(-1) for k in ks], -1)
    for chunk in (R.CHUNK_ELEMENTS, B * H * S * 7, 1):  # one chunk, 7 rows, 1 row per chunk
        monkeypatch.setattr(R, "CHUNK_ELEMENTS", chunk)
        got = oracle_topk_mass(query, key, 0.7, ks)
        assert got.shape == (B, S, len(ks)) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.allclose(got[..., 3:], torch.ones(B, S, 2, dtype=torch.float64), atol=1e-6)  # k >= S
    assert (got[..., 0] < 1 - 1e-3).any()


def _smallest_k(p, ks):
    kmax = min(max(ks), p.shape[-1])
    top = torch.topk(p, kmax, dim=-1, largest=False, sorted=True).values.double().cumsum(-1)
    return top[..., [min(k, kmax) - 1 for k in ks]]


def _one_more(p, ks):
    return recall_mod_topk_mass(p, [k + 1 for k in ks])


recall_mod_topk_mass = recall_mod._topk_mass


@pytest.mark.parametrize("broken", [None, _smallest_k, _one_more], ids=["intact", "k_smallest", "k_plus_1_largest"])
def test_oracle_check_catches_breakage(megatron_world, seed, monkeypatch, broken):
    model = make(seed, mdsa_mode="warmup")
    L, ks = 32, [4, 12]
    cap = Capture(model)
    if broken is not None:
        monkeypatch.setattr(recall_mod, "_topk_mass", broken)
    try:
        out = indexer_recall_at_lengths(model, stream(2 * L + 1, seed), [L], topks=ks)
    finally:
        cap.remove()
    for k in ks:
        if broken is None:  # the same check passes on the intact code: the failures are real
            check_oracle(model, out[L][k], cap, k, calls_per_k=1)
        else:
            with pytest.raises(AssertionError):
                check_oracle(model, out[L][k], cap, k, calls_per_k=1)


def test_oracle_can_be_skipped(megatron_world, seed):
    model = make(seed, mdsa_mode="warmup")
    out = indexer_recall_at_lengths(model, stream(2 * 32 + 1, seed), [32], topks=[4], oracle=False)[32][4]
    assert 0 < out["mean"] < 1
    assert all(out[key] is None for key in ("oracle_mean", "oracle_per_layer", "oracle_mean_nontrivial",
                                            "oracle_per_layer_nontrivial"))


def test_recall_is_one_when_k_covers_the_window(megatron_world, seed):
    model = make(seed, mdsa_mode="warmup")
    out = indexer_recall_at_lengths(model, stream(4 * 64 + 1, seed), [32, 64], topks=[32, 64, 100])
    for L, by_k in out.items():
        for k in ([32, 64, 100] if L == 32 else [64, 100]):
            res = by_k[k]
            assert res["mean"] == pytest.approx(1.0, abs=1e-5), (L, k)
            assert all(r == pytest.approx(1.0, abs=1e-5) for r in res["per_layer"])
            assert res["mean_nontrivial"] is None and res["per_layer_nontrivial"] is None
            assert res["oracle_mean"] == pytest.approx(1.0, abs=1e-5), (L, k)
            assert all(r == pytest.approx(1.0, abs=1e-5) for r in res["oracle_per_layer"])
            assert res["oracle_mean_nontrivial"] is None and res["oracle_per_layer_nontrivial"] is None
        if L == 64:
            assert by_k[32]["mean"] < 1 - 1e-4  # k = L/2 really misses mass: the test can fail
            assert by_k[32]["mean"] <= by_k[32]["oracle_mean"] < 1 - 1e-4


def test_recall_grows_with_k(megatron_world, seed):
    model = make(seed, mdsa_mode="warmup")
    ks = [1, 2, 4, 8, 16, 24, 32]
    out = indexer_recall_at_lengths(model, stream(3 * 32 + 1, seed), [32], topks=ks)[32]
    assert list(out) == ks
    for i in range(3):
        series = [out[k]["per_layer"][i] for k in ks]
        assert all(b >= a - 1e-6 for a, b in zip(series, series[1:])), series
        assert series[0] < series[-1] - 1e-3
        best = [out[k]["oracle_per_layer"][i] for k in ks]
        assert all(b >= a - 1e-9 for a, b in zip(best, best[1:])), best
        assert all(o >= r - 1e-6 for o, r in zip(best, series)), (best, series)
        best_nt = [out[k]["oracle_per_layer_nontrivial"][i] for k in ks if k < 32]
        got_nt = [out[k]["per_layer_nontrivial"][i] for k in ks if k < 32]
        assert all(o >= r - 1e-6 for o, r in zip(best_nt, got_nt)), (best_nt, got_nt)
    # KL does not depend on k (objective "kl"); only the selection does
    kls = [out[k]["kl"] for k in ks]
    assert max(kls) - min(kls) < 1e-5 * max(1.0, abs(kls[0]))


def test_ratios_map_to_k_per_length(megatron_world, seed):
    assert topk_for_length(64, topk_ratios=[0.5, 0.25, 0.01]) == [1, 16, 32]
    assert topk_for_length(32, topks=[40, 8, 8]) == [8, 40]
    model = make(seed, mdsa_mode="warmup")
    out = indexer_recall_at_lengths(model, stream(2 * 64 + 1, seed), [64, 32], topk_ratios=[0.25, 0.5])
    assert list(out) == [32, 64]
    assert list(out[32]) == [8, 16] and list(out[64]) == [16, 32]
    assert out[64][16]["k_over_L"] == 0.25 and out[32][16]["k_over_L"] == 0.5


def test_state_restored_afterwards(megatron_world, seed):
    from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

    model = make(seed, mdsa_mode="sparse")
    model.train()
    cfg = model.config
    settings, topk = cfg.dsa, cfg.dsa_indexer_topk
    flops = [l.indexer_flops for l in dsa_layers(model)]
    hooks = [len(l._forward_pre_hooks) for l in dsa_layers(model)]
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    # a trainer's not-yet-logged values: the evaluation must leave them alone
    tracker.record(INDEXER_KL, torch.tensor(0.75), 2, 3)
    before = {name: e.values.clone() for name, e in tracker.metrics.items()}
    out = indexer_recall_at_lengths(model, stream(2 * 32 + 1, seed), [32], topks=[4])
    assert 0 < out[32][4]["mean"] < 1
    assert cfg.mdsa_mode == "sparse" and cfg.dsa is settings and cfg.dsa_indexer_topk == topk == 16
    assert cfg.dsa.topk == 16 and cfg.dsa.mode == "sparse"
    assert all(m.training for m in model.modules())
    assert [len(l._forward_pre_hooks) for l in dsa_layers(model)] == hooks  # the oracle's are gone
    assert [l.indexer_flops for l in dsa_layers(model)] == flops
    assert pop_indexer_losses(model) == []
    after = {name: e.values for name, e in tracker.metrics.items()}
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert TOPK_RECALL not in after or not after[TOPK_RECALL].any()

    # ... and also when the forward fails half-way
    def boom(*a, **k):
        raise RuntimeError("boom")

    handle = dsa_layers(model)[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            indexer_recall_at_lengths(model, stream(2 * 32 + 1, seed), [32], topks=[4])
    finally:
        handle.remove()
    assert cfg.mdsa_mode == "sparse" and cfg.dsa is settings and cfg.dsa_indexer_topk == 16
    assert all(m.training for m in model.modules())
    assert [len(l._forward_pre_hooks) for l in dsa_layers(model)] == hooks
    assert all(torch.equal(tracker.metrics[n].values, before[n]) for n in before)
    tracker.clear()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[32], topks=[0]), "top-k"),
        (dict(lengths=[32], topks=[4, -1]), "top-k"),
        (dict(lengths=[32], topks=[2.5]), "top-k"),
        (dict(lengths=[32], topks=[]), "topks"),
        (dict(lengths=[32], topk_ratios=[0.0]), "ratio"),
        (dict(lengths=[32], topk_ratios=[1.5]), "ratio"),
        (dict(lengths=[32]), "exactly one"),
        (dict(lengths=[32], topks=[4], topk_ratios=[0.5]), "exactly one"),
        (dict(lengths=[0], topks=[4]), "length"),
        (dict(lengths=[], topks=[4]), "lengths"),
        (dict(lengths=[200], topks=[4]), "stream has 129"),
        (dict(lengths=[96, 128], topks=[4]), "too few"),  # lcm 384 > the stream
        (dict(lengths=[32], topks=[4], max_batch_tokens=0), "max_batch_tokens"),
        (dict(lengths=[32], topks=[4], max_total=0), "max_total"),
    ],
)
def test_bad_inputs_raise_before_compute(megatron_world, seed, kwargs, match):
    model = make(seed, mdsa_mode="dense")
    cap = Capture(model)
    try:
        with pytest.raises(ValueError, match=match):
            indexer_recall_at_lengths(model, stream(129, seed), **kwargs)
    finally:
        cap.remove()
    assert cap.count() == 0 and model.config.mdsa_mode == "dense" and model.config.dsa.topk == 16


def direct_borrowed(source, source_calls, layer, calls, k):
    """The share of ``layer``'s own p inside the top-k that ``source``'s indexer selects, per
    row, from the captured inputs: (mean over every row, over rows with more than k eligible
    keys, and the layer's own oracle over those rows; the last two None if there are none)."""
    all_sum = nontrivial_sum = best_sum = 0.0
    rows = nontrivial_rows = 0
    for (_, _, x, qr), (query, key, _, _) in zip(source_calls, calls):
        p = direct_p(query, key, layer.softmax_scale)
        B, S = p.shape[:2]
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        with torch.no_grad():
            qi, ki, wi = source.indexer_module()(x.transpose(0, 1), qr.transpose(0, 1), torch.arange(S))
        sel = R.topk_from_scores(R.indexer_scores(qi, ki, wi), mask[None], min(k, S))
        got = (torch.gather(p, -1, sel.clamp_min(0).long()) * (sel >= 0)).sum(-1)  # [B, S]
        best = p.topk(min(k, S), dim=-1).values.sum(-1)
        all_sum += float(got.sum())
        nontrivial_sum += float(got[:, k:].sum())
        best_sum += float(best[:, k:].sum())
        rows += B * S
        nontrivial_rows += B * max(0, S - k)
    if not nontrivial_rows:
        return all_sum / rows, None, None
    return all_sum / rows, nontrivial_sum / nontrivial_rows, best_sum / nontrivial_rows


def test_borrowed_selection_recall_matches_direct_computation(megatron_world, seed):
    """GLM-5's pattern (layers 2 and 3 reuse layer 1's top-k): the recall of each reusing
    layer's own attention mass inside the selection it borrows, and its oracle; 1 when k covers
    the window; no entry for a model whose every layer selects."""
    model = make(seed, mdsa_mode="dense", mdsa_indexer_types=["full", "shared", "shared"])
    L, ks = 32, [4, 12, 32]
    toks = stream(3 * L + 1, seed)  # batches of 2 and 1 windows: the unequal last batch checks row weighting
    cap = Capture(model)
    try:
        out = indexer_recall_at_lengths(model, toks, [L], topks=ks, max_batch_tokens=2 * L)
    finally:
        cap.remove()
    layers = {l.layer_number: l for l in dsa_layers(model)}
    for i, k in enumerate(ks):
        b = out[L][k]["borrowed"]
        assert b["layers"] == [2, 3] and b["sources"] == [1, 1]
        for j, n in enumerate(b["layers"]):
            calls = slice(2 * i, 2 * i + 2)  # this k's forwards
            want_all, want_nt, want_best = direct_borrowed(layers[1], cap.calls[1][calls], layers[n], cap.calls[n][calls], k)
            assert b["per_layer"][j] == pytest.approx(want_all, abs=2e-5), (n, k)
            if k < L:
                assert b["per_layer_nontrivial"][j] == pytest.approx(want_nt, abs=2e-5), (n, k)
                assert b["oracle_per_layer_nontrivial"][j] == pytest.approx(want_best, abs=2e-5), (n, k)
                assert want_nt < want_best - 1e-4  # a random indexer's keys miss what the best k hold
            else:
                assert b["per_layer_nontrivial"] is None and b["per_layer"][j] == pytest.approx(1.0, abs=1e-6)
    per_layer = indexer_recall_at_lengths(make(seed, mdsa_mode="dense"), toks, [L], topks=[4], max_batch_tokens=2 * L)
    assert "borrowed" not in per_layer[L][4]
