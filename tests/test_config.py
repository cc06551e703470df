"""Bad DSA settings stop with one clear message at construction, before any compute."""

from __future__ import annotations

import pytest

from megatron_dsa.config import DSAConfigError, set_mode
from megatron_dsa.model import SIZES, model_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dsa_indexer_topk=0), "dsa_indexer_topk must be a positive integer"),
        (dict(dsa_indexer_topk=-4), "dsa_indexer_topk must be a positive integer"),
        (dict(dsa_indexer_n_heads=0), "dsa_indexer_n_heads must be a positive integer"),
        (dict(dsa_indexer_head_dim=33), "dsa_indexer_head_dim must be even"),
        (dict(dsa_indexer_head_dim=48), "must be a power of two"),
        (dict(dsa_indexer_head_dim=8), r"dsa_indexer_head_dim \(8\) is smaller than its rope dims \(16\)"),
        (dict(mdsa_indexer_rope_dim=7), "rope dims must be positive and even"),
        (dict(mdsa_mode="sparce"), "mdsa_mode must be one of"),
        (dict(mdsa_kernel="cuda"), "mdsa_kernel must be one of"),
        (dict(mdsa_indexer_sharing="global"), "mdsa_indexer_sharing must be one of"),
        (dict(mdsa_mode="warmup", dsa_indexer_loss_coeff=0.0), "warmup trains the indexer through its KL"),
        (dict(mdsa_indexer_sharing="shared", dsa_indexer_topk_freq=2), "choose one kind of sharing"),
        (dict(mdsa_fp8_indexer=True, mdsa_kernel="reference"), "FP8 indexer is a Triton kernel"),
        (dict(mdsa_indexer_dtype="fp16"), "mdsa_indexer_dtype must be one of"),
        (dict(mdsa_recall_rows=-1), "mdsa_recall_rows must be >= 0"),
        (dict(qk_layernorm=False), "NORMALISED query latent"),
        (dict(q_lora_rank=None), "q_lora_rank must be set"),
        (dict(not_a_field=1), "unknown transformer config fields"),
    ],
)
def test_bad_settings_fail_at_construction(overrides, message):
    with pytest.raises(DSAConfigError, match=message):
        model_config("tiny", **overrides)


def test_sizes_that_do_not_divide_fail_at_construction():
    # megatron-core's own check, raised before any module is built.
    with pytest.raises(ValueError, match="num_attention_heads"):
        model_config("tiny", num_attention_heads=6, tensor_model_parallel_size=4)


def test_unknown_size_and_mode_switch():
    with pytest.raises(DSAConfigError, match="unknown model size 'huge'"):
        model_config("huge")
    config = model_config("tiny")
    set_mode(config, "sparse")
    assert config.mdsa_mode == "sparse" and config.dsa.mode == "sparse"
    with pytest.raises(DSAConfigError, match="mdsa_mode must be one of"):
        set_mode(config, "fast")


def test_reuses_megatron_core_dsa_fields():
    config = model_config("tiny", dsa_indexer_topk=7, dsa_indexer_loss_coeff=0.5)
    assert config.experimental_attention_variant == "dsa"
    assert (config.dsa.topk, config.dsa.loss_coeff, config.dsa.n_heads, config.dsa.head_dim) == (7, 0.5, 2, 32)
    assert config.dsa.sparse_loss and config.dsa.rope_dim == config.qk_pos_emb_head_dim


def test_reference_671b_shape_validates_without_building():
    config = model_config("deepseek-v3.2-671b")
    s = config.dsa
    assert (s.n_heads, s.head_dim, s.topk, s.rope_dim) == (64, 128, 2048, 64)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (61, 7168, 128)
    assert (config.q_lora_rank, config.kv_lora_rank, config.num_moe_experts, config.moe_router_topk) == (1536, 512, 256, 8)
    assert config.moe_layer_freq == [0, 0, 0] + [1] * 58


def test_named_sizes_are_in_their_parameter_ranges(megatron_world):
    """tiny builds in seconds; small has ~20-60M parameters (counted from the built model)."""
    from megatron_dsa.model import build_model, count_parameters

    small = count_parameters(build_model("small"))
    assert 20e6 <= small <= 60e6, small
    assert set(SIZES) == {"tiny", "small", "deepseek-v3.2-671b"}
