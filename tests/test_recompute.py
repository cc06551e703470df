"""Activation recomputation (megatron-core's ``recompute_granularity``) over DSA layers: the
DSA core attention alone (selective, ``recompute_modules: [core_attn]``), MLA's up-projections
(``mla_up_proj``: the absorbed queries and latent rows the core attention keeps are dropped after
the forward and rebuilt in the backward) and whole layers (full) give the gradients of a run
without it. The memory it saves at 128K is measured on a GPU (``benchmarks/bench_recompute.py``)."""

from __future__ import annotations

import pytest
import torch

from megatron_dsa.config import DSAConfigError
from tests.helpers import set_indexer_loss_scale, tiny_lm_forward

RECOMPUTE = {
    "core_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "mla_up_proj": dict(recompute_granularity="selective", recompute_modules=["mla_up_proj"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def _loss_and_grads(mode: str, **overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_dsa.model import build_model, model_config

    set_indexer_loss_scale(1.0)
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    model = build_model("tiny", model_config("tiny", mdsa_mode=mode, mdsa_kernel="reference", **overrides))
    model.train()
    S = 64
    tokens = torch.randint(0, 512, (2, S), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.arange(S)[None].expand(2, -1), None, labels=tokens.roll(-1, 1)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes_after_forward(mode: str, **overrides) -> tuple[int, object]:
    """The bytes the autograd graph of one forward still holds once the forward is done (each
    saved tensor's storage counted once; a storage an output-discarding checkpoint freed counts
    0), and the model's config."""
    saved = []
    model, loss = tiny_lm_forward(saved, mdsa_mode=mode, mdsa_kernel="reference", **overrides)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in saved}
    held = sum(s.nbytes() for s in storages.values())
    loss.backward()  # the discarded tensors come back for it
    return held, model.config


def test_up_projection_recomputation_drops_the_absorbed_queries(megatron_world):
    """Without it every sparse layer keeps its absorbed queries [S, B, H, L + R] (576 a head at
    DeepSeek-V3.2's shape, 17 GB a layer at 128K x 128 heads) through the forward; with it
    they and the query up-projection's output are rebuilt in the backward instead. (The dense
    phases attend in MLA's MHA form, whose per-head tensors are made from those and kept by
    the attention itself: there the recomputation saves little.)"""
    held, cfg = _saved_bytes_after_forward("sparse")
    held_recomputed, _ = _saved_bytes_after_forward("sparse", **RECOMPUTE["mla_up_proj"])
    queries = 64 * 2 * cfg.num_attention_heads * (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim) * 4  # fp32 on CPU
    assert held - held_recomputed >= cfg.num_layers * queries, (held, held_recomputed)


def test_up_projection_recomputation_under_fp8_is_refused(monkeypatch):
    import dataclasses

    from megatron.core.transformer import transformer_config
    from megatron_dsa.config import validate
    from megatron_dsa.model import model_config

    cfg = model_config("tiny", mdsa_mode="sparse", **RECOMPUTE["mla_up_proj"])
    monkeypatch.setattr(transformer_config, "is_te_min_version", lambda *a, **k: True)
    with pytest.raises(DSAConfigError, match="mla_up_proj"):
        validate(dataclasses.replace(cfg, fp8="hybrid"))  # local modules, just to carry the flag


def _recorded_kl_after_a_step(mode: str, **overrides) -> torch.Tensor:
    from megatron_dsa.layer import INDEXER_KL
    from megatron_dsa.train.trainer import _pop_layer_metrics

    _pop_layer_metrics()  # nothing left from earlier tests
    _loss_and_grads(mode, **overrides)
    return _pop_layer_metrics()[INDEXER_KL]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("how", list(RECOMPUTE))
def test_recomputation_gives_the_same_gradients(megatron_world, mode, how):
    want_loss, want = _loss_and_grads(mode)
    loss, got = _loss_and_grads(mode, **RECOMPUTE[how])
    assert torch.equal(loss, want_loss) and set(got) == set(want) and got
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{how} {mode} {name}: {m}")


def test_recomputation_in_warmup_is_refused():
    from megatron_dsa.model import model_config

    with pytest.raises(DSAConfigError, match="in warmup recomputes nothing"):
        model_config("tiny", mdsa_mode="warmup", **RECOMPUTE["core_attn"])


@pytest.mark.parametrize("how", list(RECOMPUTE))
def test_recomputation_records_each_layers_kl_once(megatron_world, how):
    """The recomputed pass must not add a second record of the indexer KL to the logged metrics."""
    want = _recorded_kl_after_a_step("sparse")
    got = _recorded_kl_after_a_step("sparse", **RECOMPUTE[how])
    assert (want > 0).any()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("how", list(RECOMPUTE))
def test_recomputation_computes_each_layers_kl_once(megatron_world, monkeypatch, how):
    """The first, gradient-free pass skips the indexer loss (its graph is dropped); the rerun in
    the backward takes the KL in the attention's backward: no forward KL at all, one KL a layer."""
    from megatron_dsa import ops

    backend = ops.backend("reference", torch.device("cpu"))  # the namespace the layers call
    calls = {"forward": 0, "backward": 0}
    forward_kl, in_backward = backend.sparse_indexer_kl, backend.sparse_indexer_kl_and_grads

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(backend, "sparse_indexer_kl", counted("forward", forward_kl))
    monkeypatch.setattr(backend, "sparse_indexer_kl_and_grads", counted("backward", in_backward))
    _loss_and_grads("sparse", **RECOMPUTE[how])
    assert calls == {"forward": 0, "backward": 3}, calls
