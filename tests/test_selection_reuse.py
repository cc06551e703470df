"""A layer that reuses an earlier layer's top-k attends, over its own latent KV, to exactly the
keys that layer selected (GLM-5's "shared" layers, dsa_indexer_topk_freq)."""

from __future__ import annotations

import pytest
import torch

from megatron_dsa import reference as R
from megatron_dsa.model import dsa_layers
from tests.test_model import batch, make


GLM_PATTERN = {"mdsa_indexer_types": ["full", "shared", "shared"]}


@pytest.mark.parametrize("kernel, layout", [("reference", GLM_PATTERN), ("reference", {"dsa_indexer_topk_freq": 2}),
                                            ("triton", GLM_PATTERN)])
def test_a_reusing_layer_attends_to_the_selecting_layers_keys(megatron_world, seed, kernel, layout):
    from megatron_dsa import kernels

    if kernel == "triton" and not kernels.available():
        pytest.skip("needs Triton with CUDA or TRITON_INTERPRET=1")
    model = make(megatron_world, seed, mdsa_mode="sparse", mdsa_kernel=kernel, dsa_indexer_topk=8, **layout)
    layers = dsa_layers(model)
    seen = {}

    def record(layer):
        def hook(module, args, out):
            seen[layer.layer_number] = (args[0].detach().clone(), args[1].detach().clone(), out.detach().clone(),
                                        None if layer._last_topk is None else layer._last_topk.clone())
        return hook

    for layer in layers:
        layer.register_forward_hook(record(layer))
    with torch.no_grad():
        model(*batch(s=40)[:2], None)
    reusing = [l for l in layers if not l.selects]
    assert reusing, "the layout must have a layer that reuses a selection"
    for layer in reusing:
        source = layer.__dict__["_selection_source"]
        topk = seen[source.layer_number][3]
        query, key, out, _ = seen[layer.layer_number]
        q, kv = query.permute(1, 0, 2, 3), key.squeeze(2).transpose(0, 1)
        assert topk.shape[:2] == q.shape[:2] and (topk >= 0).any()
        want, _ = R.sparse_mla_attention(q.float(), kv.float(), topk, layer.v_dim, layer.softmax_scale)
        got = out.reshape(q.shape[1], q.shape[0], q.shape[2], -1).transpose(0, 1)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # and not what the layer's own attention over the whole causal prefix would give
        dense, _ = R.dense_mla_attention(q.float(), kv.float(), layer.v_dim, layer.softmax_scale)
        assert not torch.allclose(got, dense, atol=1e-3)
