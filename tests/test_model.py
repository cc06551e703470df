"""The tiny DeepSeek-V3-style MoE through megatron-core's spec, on CPU, in every DSA mode."""

from __future__ import annotations

import pytest
import torch

from megatron_dsa import reference as R
from megatron_dsa.config import set_mode
from megatron_dsa.layer import DSACoreAttention, LightningIndexer, pop_indexer_losses
from megatron_dsa.model import build_model, dsa_layers, indexer_parameters, model_config
from tests.helpers import set_indexer_loss_scale


def make(megatron_world, seed, **overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed % 10000)
    model = build_model("tiny", model_config("tiny", **overrides))
    return model


def batch(b=2, s=48, vocab=512):
    # The model's device: CPU here, the GPU when the suite runs on one (MDSA on CUDA).
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, vocab, (b, s), device=dev)
    return tokens, torch.arange(s, device=dev)[None].expand(b, -1), tokens.roll(-1, dims=1)


def lm_loss(model, tokens, positions, labels):
    return model(tokens, positions, None, labels=labels).float().mean()


def non_indexer_parameters(model):
    idx = {id(p) for p in indexer_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in idx]


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_forward_backward_every_mode(megatron_world, seed, mode):
    model = make(megatron_world, seed, mdsa_mode=mode)
    assert len(dsa_layers(model)) == 3 and all(l.indexer is not None for l in dsa_layers(model))
    tokens, positions, labels = batch()
    set_indexer_loss_scale(1.0)
    loss = lm_loss(model, tokens, positions, labels)
    assert torch.isfinite(loss)
    kl = pop_indexer_losses(model)
    if mode == "warmup":
        assert len(kl) == 3 and all(torch.isfinite(k) and k > 0 for k in kl)
        sum(kl).backward()
    else:
        assert kl == []  # dense: no indexer work; sparse: the loss rides on the output
        loss.backward()
    main_grads = [p.grad for _, p in non_indexer_parameters(model)]
    idx_grads = [p.grad for p in indexer_parameters(model)]
    if mode == "dense":
        assert all(g is None or not g.any() for g in idx_grads)
        assert any(g is not None and g.abs().sum() > 0 for g in main_grads)
    if mode == "warmup":  # only the KL was backpropagated
        assert all(g is None for g in main_grads)
        assert all(g is not None and torch.isfinite(g).all() for g in idx_grads)
        assert any(g.abs().sum() > 0 for g in idx_grads)
    if mode == "sparse":
        assert any(g is not None and g.abs().sum() > 0 for g in main_grads)
        assert any(g is not None and g.abs().sum() > 0 for g in idx_grads)


@pytest.mark.parametrize("mode", ["dense", "warmup", "warmup_blockwise_kl", "sparse", "sparse_stored_scores"])
def test_triton_backend_equals_the_reference_in_the_model(megatron_world, seed, mode, monkeypatch):
    """The whole model on the kernels backend (Triton; the interpreter on CPU) equals the
    reference backend: losses, indexer losses and every gradient. The layer must find every
    op it calls in both backends (on the GPU 'auto' picks the kernels), and the config's kernel
    options reach them."""
    from megatron_dsa import kernels

    if not kernels.available():
        pytest.skip("needs Triton with CUDA or TRITON_INTERPRET=1")
    options = None  # fused warm-up KL: the default
    if mode == "warmup_blockwise_kl":  # the warm-up KL as the blockwise PyTorch op
        mode, options = "warmup", {"dense_kl": "blockwise"}
    if mode == "sparse_stored_scores":  # the split backward sharing its stored scores
        from megatron_dsa.kernels import sparse_attn

        mode, options = "sparse", {"attn_bwd_split": True, "split_bwd": "stored_scores"}
        real, launched = sparse_attn._dkv_product, []
        monkeypatch.setattr(sparse_attn, "_dkv_product", lambda *a, **k: launched.append(1) or real(*a, **k))
    tokens, positions, labels = batch(s=40)
    set_indexer_loss_scale(1.0)
    results = []
    for kernel in ("reference", "triton"):
        model = make(megatron_world, seed, mdsa_mode=mode, mdsa_kernel=kernel, dsa_indexer_topk=8,
                     mdsa_kernel_options=options)
        loss = lm_loss(model, tokens, positions, labels)
        kl = pop_indexer_losses(model)
        (sum(kl) if mode == "warmup" else loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), [k.detach() for k in kl], grads))
    (loss_r, kl_r, g_r), (loss_t, kl_t, g_t) = results
    assert torch.isfinite(loss_t) and abs(loss_t - loss_r) <= 1e-5 * abs(loss_r)
    assert len(kl_t) == len(kl_r) == (3 if mode == "warmup" else 0)
    for a, b in zip(kl_t, kl_r):
        # The KL of two close distributions is a small difference of O(log S) terms: fp32
        # rounding of those terms bounds its absolute error, not its relative one.
        assert torch.isfinite(a) and abs(a - b) <= 1e-4 * abs(b) + 1e-6
    assert g_t.keys() == g_r.keys() and g_t
    for name in g_r:
        err = (g_t[name] - g_r[name]).norm() / g_r[name].norm().clamp_min(1e-12)
        assert torch.isfinite(g_t[name]).all() and err < 1e-4, (name, float(err))
    if options and options.get("split_bwd"):
        assert launched, "the config's split_bwd did not reach the sparse backward"


def test_lm_loss_gives_zero_gradient_to_indexer(megatron_world, seed):
    model = make(megatron_world, seed, mdsa_mode="sparse")
    set_indexer_loss_scale(0.0)  # the KL's backward runs with zero weight: only the LM loss
    try:
        lm_loss(model, *batch()).backward()
    finally:
        set_indexer_loss_scale(1.0)
    assert all(p.grad is None or not p.grad.any() for p in indexer_parameters(model))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in non_indexer_parameters(model))


def test_indexer_kl_gives_zero_gradient_to_everything_else(megatron_world, seed):
    # The MoE balance loss also rides on activations; switch it off to see the KL alone.
    model = make(
        megatron_world, seed, mdsa_mode="sparse", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0
    )
    set_indexer_loss_scale(1.0)
    (0.0 * lm_loss(model, *batch())).backward()  # the LM term contributes exactly zero
    assert all(p.grad is None or not p.grad.any() for _, p in non_indexer_parameters(model))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in indexer_parameters(model))


def test_sparse_with_topk_covering_the_sequence_equals_dense(megatron_world, seed):
    model = make(megatron_world, seed, mdsa_mode="dense", dsa_indexer_topk=64)
    tokens, positions, _ = batch(s=40)
    with torch.no_grad():
        dense = model(tokens, positions, None)
        set_mode(model.config, "sparse")
        sparse = model(tokens, positions, None)
    assert torch.allclose(dense, sparse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "warmup"])
def test_dense_modes_attend_in_the_mha_form_with_the_absorbed_gradients(megatron_world, seed, mode, monkeypatch,
                                                                          request):
    """The dense phases hand the core an unabsorbed query and attend per head (MLA's MHA form);
    the loss and every gradient equal the absorbed form's (the core unbound from the
    up-projections), the K up-projection's included. The warm-up's target reads each head's
    keys in the MHA form and the latent in the absorbed one."""
    from megatron_dsa import ops

    model = make(megatron_world, seed, mdsa_mode=mode)
    cores = [m for m in model.modules() if isinstance(m, DSACoreAttention)]
    tokens, positions, labels = batch()
    key_dims = []
    real = R.dense_indexer_kl
    monkeypatch.setattr(R, "dense_indexer_kl", lambda q, kv, *a, **k: key_dims.append(kv.dim()) or real(q, kv, *a, **k))
    ops._reference_backend.cache_clear()
    request.addfinalizer(ops._reference_backend.cache_clear)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        set_indexer_loss_scale(1.0)
        loss = lm_loss(model, tokens, positions, labels)
        if mode == "warmup":
            loss = sum(pop_indexer_losses(model))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert cores and all(c.dense_in_mha_form and c.consumes_absorbed_v_up_projection for c in cores)
    mha_loss, mha = loss_and_grads()
    assert key_dims == ([4] * len(cores) if mode == "warmup" else [])
    key_dims.clear()
    bound = [c.__dict__["_up_projections"] for c in cores]
    for c in cores:
        c.bind_up_projections(None)
    assert not any(c.dense_in_mha_form for c in cores)
    absorbed_loss, absorbed = loss_and_grads()
    assert key_dims == ([3] * len(cores) if mode == "warmup" else [])
    # fp32 rounding differs between the forms (the warm-up's small KL: ~3e-5 of itself)
    assert torch.allclose(mha_loss, absorbed_loss, rtol=1e-4, atol=0)
    assert mha.keys() == absorbed.keys() and mha
    if mode == "dense":
        assert any("linear_kv_up_proj" in n for n in mha)
    for n in mha:
        assert R_rel(mha[n], absorbed[n]) < 1e-4, n
    for c, fn in zip(cores, bound):
        c.bind_up_projections(fn)
    set_mode(model.config, "sparse")  # sparse attention stays absorbed
    assert not any(c.dense_in_mha_form or c.consumes_absorbed_v_up_projection for c in cores)


def R_rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_sparse_differs_from_dense_when_topk_is_small(megatron_world, seed):
    model = make(megatron_world, seed, mdsa_mode="dense", dsa_indexer_topk=4)
    tokens, positions, _ = batch(s=40)
    with torch.no_grad():
        dense = model(tokens, positions, None)
        set_mode(model.config, "sparse")
        sparse = model(tokens, positions, None)
    assert torch.allclose(dense[:, :4], sparse[:, :4], rtol=1e-5, atol=1e-5)  # rows with <= k keys
    assert not torch.allclose(dense[:, 8:], sparse[:, 8:], rtol=1e-3, atol=1e-3)


def test_core_attention_receives_the_normalised_query_latent(megatron_world, seed):
    model = make(megatron_world, seed, mdsa_mode="sparse")
    attn = model.decoder.layers[0].self_attention
    seen = {}

    def grab(module, args, kwargs):
        seen["x"], seen["qr"] = kwargs["x"], kwargs["qr"]

    handle = attn.core_attention.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(*batch()[:2], None)
    handle.remove()
    latent, _ = attn.linear_q_down_proj(seen["x"])
    assert torch.allclose(seen["qr"], attn.q_layernorm(latent), atol=1e-6)
    assert not torch.allclose(seen["qr"], latent, atol=1e-3)


def test_indexer_inside_the_layer_matches_the_reference(megatron_world, seed):
    """The layer's indexer = reference.indexer_qkw on the same linear outputs."""
    model = make(megatron_world, seed, mdsa_mode="sparse")
    indexer = dsa_layers(model)[1].indexer
    x, qr = torch.randn(2, 10, 64), torch.randn(2, 10, 32)
    q, k, w = indexer(x, qr, torch.arange(10))
    cos, sin = R.rope_cos_sin(torch.arange(10), 16)
    q2, k2, w2 = R.indexer_qkw(
        qr @ indexer.wq_b.weight.T, x @ indexer.wk.weight.T, x @ indexer.weights_proj.weight.T,
        indexer.k_norm.weight, indexer.k_norm.bias, cos, sin, n_heads=2,
    )
    assert torch.allclose(q, q2, atol=1e-5) and torch.allclose(k, k2, atol=1e-5) and torch.allclose(w, w2)
    assert {n for n, _ in indexer.named_parameters()} == {
        "wq_b.weight", "wk.weight", "weights_proj.weight", "k_norm.weight", "k_norm.bias"
    }


def test_shared_indexer_is_one_set_of_weights(megatron_world, seed):
    model = make(megatron_world, seed, mdsa_mode="warmup", mdsa_indexer_sharing="shared")
    owners = [m for m in model.modules() if isinstance(m, LightningIndexer)]
    assert len(owners) == 1
    tokens, positions, labels = batch()
    lm_loss(model, tokens, positions, labels)
    losses = pop_indexer_losses(model)
    assert len(losses) == 3  # every layer applies the shared indexer to its own input
    sum(losses).backward()
    assert all(p.grad is not None for p in owners[0].parameters())
    names = [n for n, _ in model.named_parameters() if "indexer" in n]
    assert len(names) == 5 and all(n.startswith("decoder.layers.0.") for n in names)


def test_selection_every_n_layers_reuses_the_earlier_topk(megatron_world, seed):
    model = make(megatron_world, seed, mdsa_mode="sparse", dsa_indexer_topk_freq=2)
    layers = dsa_layers(model)
    assert [l.indexer is not None for l in layers] == [True, False, True]
    with torch.no_grad():
        model(*batch()[:2], None)
    # only a layer that lends its selection keeps it past its forward
    assert layers[0]._last_topk is not None and layers[1]._last_topk is None and layers[2]._last_topk is None


def test_topk_recall_and_kl_are_logged_per_layer(megatron_world, seed):
    from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    tracker.clear()  # values accumulate until a trainer reports them
    model = make(megatron_world, seed, mdsa_mode="warmup")
    lm_loss(model, *batch())
    pop_indexer_losses(model)
    values = {name: tracker.metrics[name].values.clone() for name in ("indexer_kl", "indexer_topk_recall")}
    assert (values["indexer_kl"] > 0).all() and values["indexer_kl"].shape == (3,)
    assert ((values["indexer_topk_recall"] > 0) & (values["indexer_topk_recall"] <= 1 + 1e-6)).all()
    tracker.clear()


def test_sparse_kl_is_computed_and_logged_in_the_backward(megatron_world, seed):
    """Training's sparse KL comes from the attention's backward: nothing is logged by the
    forward, each layer once by the backward, with the values a forward without gradients
    (evaluation, where the KL is computed in the forward) gives on the same batch."""
    from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    tracker.clear()
    model = make(megatron_world, seed, mdsa_mode="sparse")
    data = batch()
    model.eval()
    with torch.no_grad():
        lm_loss(model, *data)
    evaluated = tracker.metrics["indexer_kl"].values.clone()
    tracker.clear()
    model.train()
    loss = lm_loss(model, *data)
    assert "indexer_kl" not in tracker.metrics or not tracker.metrics["indexer_kl"].values.any()
    loss.backward()
    trained = tracker.metrics["indexer_kl"].values.clone()
    tracker.clear()
    assert evaluated.shape == (3,) and (evaluated > 0).all()
    assert torch.allclose(trained, evaluated, rtol=1e-5, atol=0), (trained, evaluated)


def test_indexer_rope_follows_the_positions_it_is_given(megatron_world, seed):
    """Same length, other positions (decode, context parallel): no stale rotary tables."""
    model = make(megatron_world, seed, mdsa_mode="sparse")
    indexer = dsa_layers(model)[0].indexer
    x, qr = torch.randn(1, 6, 64), torch.randn(1, 6, 32)
    indexer(x, qr, torch.arange(6))
    shifted = torch.arange(6) + 100
    q, k, _ = indexer(x, qr, shifted)
    cos, sin = R.rope_cos_sin(shifted, 16)
    _, k2, _ = R.indexer_qkw(
        qr @ indexer.wq_b.weight.T, x @ indexer.wk.weight.T, x @ indexer.weights_proj.weight.T,
        indexer.k_norm.weight, indexer.k_norm.bias, cos, sin, n_heads=2,
    )
    assert torch.allclose(k, k2, atol=1e-5)


@pytest.mark.parametrize("setting", ["activation", "fp32"])
def test_indexer_scores_in_the_activation_dtype(megatron_world, seed, setting, monkeypatch):
    """mdsa_indexer_dtype: 'activation' hands the loss and top-k ops the indexer's q and k in
    the attention's dtype (bf16 under bf16), 'fp32' keeps them fp32; w stays fp32 either way."""
    model = make(megatron_world, seed, mdsa_mode="warmup", mdsa_indexer_dtype=setting).to(torch.bfloat16)
    seen = []
    real = R.dense_indexer_kl

    def spy(q_main, kv, q_idx, k_idx, w_idx, *args, **kwargs):
        seen.append((q_main.dtype, q_idx.dtype, k_idx.dtype, w_idx.dtype))
        return real(q_main, kv, q_idx, k_idx, w_idx, *args, **kwargs)

    monkeypatch.setattr(R, "dense_indexer_kl", spy)
    from megatron_dsa import ops

    ops._reference_backend.cache_clear()
    try:
        tokens, positions, labels = batch(s=16)
        lm_loss(model, tokens, positions, labels)
    finally:
        ops._reference_backend.cache_clear()
    want = torch.bfloat16 if setting == "activation" else torch.float32
    assert len(seen) == 3 and all(s == (torch.bfloat16, want, want, torch.float32) for s in seen)
    kl = pop_indexer_losses(model)
    assert all(torch.isfinite(k) and k > 0 for k in kl)


def test_warmup_recall_is_measured_on_sampled_rows(megatron_world, seed, monkeypatch):
    """mdsa_recall_rows caps the rows the warm-up's recall diagnostic scores (0: all rows)."""
    seen = []
    real = R.dense_indexer_kl

    def spy(*args, recall_rows=None, **kwargs):
        seen.append(None if recall_rows is None else recall_rows.tolist())
        return real(*args, recall_rows=recall_rows, **kwargs)

    monkeypatch.setattr(R, "dense_indexer_kl", spy)
    from megatron_dsa import ops

    for rows, want in ((4, [3, 7, 11, 15]), (0, None), (16, None)):
        ops._reference_backend.cache_clear()
        seen.clear()
        model = make(megatron_world, seed, mdsa_mode="warmup", mdsa_kernel="reference", mdsa_recall_rows=rows)
        lm_loss(model, *batch(s=16))
        assert seen == [want] * 3, (rows, seen)
        assert all(torch.isfinite(k) for k in pop_indexer_losses(model))
    ops._reference_backend.cache_clear()


def test_v32_slice_has_the_release_attention_and_indexer(megatron_world):
    """The v32-slice size (the model step benchmark's) keeps DeepSeek-V3.2's hidden size, heads,
    MLA and indexer dims exactly; only the layer count, experts and vocabulary shrink. Built on
    the meta device: its shapes and its size (~0.7B parameters), no memory."""
    from megatron_dsa.convert import checkpoint as C
    from megatron_dsa.model import count_parameters, dsa_layers, resolve_size

    slice_, release = resolve_size("v32-slice"), resolve_size("deepseek-v3.2-671b")
    same = ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
            "qk_pos_emb_head_dim", "v_head_dim", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk")
    assert {k: slice_.transformer[k] for k in same} == {k: release.transformer[k] for k in same}
    config = C.build_config(slice_, {})
    model = C.meta_model(slice_, config, slice_.vocab_size)
    assert len(dsa_layers(model)) == 2
    assert 0.5e9 < count_parameters(model) < 1.0e9
