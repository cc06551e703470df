"""Top-k recall of the dense attention mass at lengths and k (megatron_dsa.eval.recall)."""

from __future__ import annotations

import inspect

import pytest
import torch

from megatron_dsa import reference as R
from megatron_dsa.eval import indexer_recall_at_lengths
from megatron_dsa.eval.recall import topk_for_length
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
        a = bound.arguments
        self.calls.setdefault(module.layer_number, []).append(
            tuple(a[n].detach().clone() for n in ("query", "key", "x", "qr"))
        )

    def count(self):
        return sum(len(v) for v in self.calls.values())

    def remove(self):
        for h in self.handles:
            h.remove()


def direct_recall_kl(layer, calls, k):
    """Mean over every query row of every call: recall of the head-summed dense attention mass
    in the indexer's top-k, and KL(p || softmax(I)); computed here from the layer's inputs."""
    indexer = layer._get_indexer()
    recall_sum = kl_sum = 0.0
    rows = 0
    for query, key, x, qr in calls:
        q = query.permute(1, 0, 2, 3).double()  # [B, S, H, D]
        kv = key.squeeze(2).transpose(0, 1).double()  # [B, S, D]
        B, S = q.shape[:2]
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        scores = torch.einsum("bthd,bsd->bths", q, kv) * layer.softmax_scale
        probs = scores.masked_fill(~mask[None, :, None, :], float("-inf")).softmax(-1)
        p = probs.sum(2)
        p = p / p.sum(-1, keepdim=True)
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


def test_recall_is_one_when_k_covers_the_window(megatron_world, seed):
    model = make(seed, mdsa_mode="warmup")
    out = indexer_recall_at_lengths(model, stream(4 * 64 + 1, seed), [32, 64], topks=[32, 64, 100])
    for L, by_k in out.items():
        for k in ([32, 64, 100] if L == 32 else [64, 100]):
            res = by_k[k]
            assert res["mean"] == pytest.approx(1.0, abs=1e-5), (L, k)
            assert all(r == pytest.approx(1.0, abs=1e-5) for r in res["per_layer"])
            assert res["mean_nontrivial"] is None and res["per_layer_nontrivial"] is None
        if L == 64:
            assert by_k[32]["mean"] < 1 - 1e-4  # k = L/2 really misses mass: the test can fail


def test_recall_grows_with_k(megatron_world, seed):
    model = make(seed, mdsa_mode="warmup")
    ks = [1, 2, 4, 8, 16, 24, 32]
    out = indexer_recall_at_lengths(model, stream(3 * 32 + 1, seed), [32], topks=ks)[32]
    assert list(out) == ks
    for i in range(3):
        series = [out[k]["per_layer"][i] for k in ks]
        assert all(b >= a - 1e-6 for a, b in zip(series, series[1:])), series
        assert series[0] < series[-1] - 1e-3
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
