"""Bad DSA settings stop with one clear message at construction, before any compute."""

from __future__ import annotations

import math

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
        (dict(dsa_indexer_head_dim=48, mdsa_fp8_indexer=True), "needs a power-of-two dsa_indexer_head_dim"),
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
        # Refused, not truncated by the int() that reads them.
        (dict(dsa_indexer_topk=2.5), "dsa_indexer_topk must be an integer, got 2.5"),
        (dict(dsa_indexer_topk=True), "dsa_indexer_topk must be an integer, got True"),
        (dict(dsa_indexer_topk=16.9), "dsa_indexer_topk must be an integer, got 16.9"),
        (dict(dsa_indexer_topk="abc"), "dsa_indexer_topk must be an integer, got 'abc'"),
        (dict(dsa_indexer_n_heads=2.0), "dsa_indexer_n_heads must be an integer"),
        (dict(dsa_indexer_loss_coeff="high"), "dsa_indexer_loss_coeff must be a number"),
        (dict(mdsa_fp8_indexer=1), "mdsa_fp8_indexer must be true or false"),
        (dict(mdsa_kernel_options={"select_runs": 3}), "select_runs must be 0, a power of two or null"),
        (dict(mdsa_kernel_options={"select_cap": -1}), "select_cap must be an integer >= 0 or null"),
        (dict(mdsa_kernel_options={"select_sample": -4}), "select_sample must be an integer >= 0 or null"),
        (dict(mdsa_kernel_options={"select_guess": -0.5}), "select_guess must be a number >= 0 or null"),
        (dict(mdsa_kernel_options={"select_guess": float("nan")}), "select_guess must be a number >= 0 or null"),
        (dict(mdsa_kernel_options={"select_guess": True}), "select_guess must be a number >= 0 or null"),
        (dict(mdsa_kernel_options={"select_list_values": 1}), "select_list_values must be true, false or null"),
        (dict(mdsa_kernel_options={"select_max_registers": 8}), "select_max_registers must be an integer from 16"),
        (dict(mdsa_kernel_options={"select_max_registers": 64.0}), "select_max_registers must be an integer from 16"),
        (dict(mdsa_kernel_options={"select_overlap": "yes"}), "select_overlap must be true, false or null"),
        (dict(mdsa_kernel_options={"select_digit_bits": 4}), "select_digit_bits must be an integer from 5 to 8"),
        (dict(mdsa_kernel_options={"compact_selection": None}), "compact_selection must be true or false"),
        (dict(mdsa_kernel_options={"offload_selection": "on"}), "offload_selection must be true or false"),
        (dict(mdsa_kernel_options={"compact_selection": 0}), "compact_selection must be true or false"),
        (dict(mdsa_kernel_options={"select_overlap": 1}), "select_overlap must be true, false or null"),
        (dict(mdsa_kernel_options={"select_runs": 32, "score": [16, 4, 2]}), "must be a multiple of select_runs"),
        (dict(mdsa_kernel_options={"split_bwd": "stored"}), "split_bwd must be one of"),
        (dict(mdsa_kernel_options={"attn_dkv_product": [48, 4, 3]}), "tiles.BK must be a power of two"),
        (dict(mdsa_kernel_options={"dkv_product_columns": 96}), "dkv_product_columns must be a power of two >= 16"),
        (dict(mdsa_kernel_options={"dq_product_columns": 80}), "dq_product_columns must be one of"),
        (dict(mdsa_kernel_options={"dense_kl_rows": 8}), "dense_kl_rows must be a power of two >= 16"),
        (dict(mdsa_kernel_options={"scores_heads": 48}), "scores_heads must be a power of two >= 16"),
        (dict(mdsa_kernel_options={"dense_kl_span": 0}), "dense_kl_span must be a positive integer"),
        (dict(mdsa_kernel_options={"workspace_bytes": 0}), "workspace_bytes must be a positive integer"),
        (dict(mdsa_kernel_options={"workspace_bytes": 1.5e9}), "workspace_bytes must be a positive integer"),
    ],
)
def test_bad_settings_fail_at_construction(overrides, message):
    with pytest.raises(DSAConfigError, match=message):
        model_config("tiny", **overrides)


def test_numeric_strings_for_float_fields():
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number.
    assert model_config("tiny", dsa_indexer_loss_coeff="1e-3").dsa_indexer_loss_coeff == 1e-3


def test_indexer_head_dim_that_is_not_a_power_of_two():
    """Only the Hadamard rotation (and so the FP8 indexer) needs a power of two; Hugging Face's
    model accepts e.g. 48, and scoring is the same dot products unrotated."""
    import torch

    from megatron_dsa.reference import indexer_qkw, indexer_scores, rope_cos_sin

    config = model_config("tiny", dsa_indexer_head_dim=48)
    assert config.dsa.head_dim == 48
    torch.manual_seed(0)
    B, S, HI, D = 1, 5, 2, 32
    cos, sin = rope_cos_sin(torch.arange(S), 16)
    args = (torch.randn(B, S, HI * D), torch.randn(B, S, D), torch.randn(B, S, HI), torch.ones(D), torch.zeros(D), cos, sin)
    rotated = indexer_scores(*indexer_qkw(*args, n_heads=HI))
    plain = indexer_scores(*indexer_qkw(*args, n_heads=HI, rotate=False))
    torch.testing.assert_close(rotated, plain, rtol=1e-5, atol=1e-5)
    args48 = (torch.randn(B, S, HI * 48), torch.randn(B, S, 48), torch.randn(B, S, HI), torch.ones(48), torch.zeros(48), cos, sin)
    assert torch.isfinite(indexer_scores(*indexer_qkw(*args48, n_heads=HI))).all()


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
    # The release's YaRN: factor 40 over 4096 positions, mscale = mscale_all_dim = 1.
    assert config.rope_type == "yarn" and s.yarn.factor == 40 and s.yarn.original_max_position_embeddings == 4096
    assert s.yarn.attention_factor == 1.0 and abs(s.yarn.softmax_factor - (0.1 * math.log(40) + 1) ** 2) < 1e-12


def test_glm5_shape_validates_without_building():
    config = model_config("glm-5")
    s = config.dsa
    assert (s.n_heads, s.head_dim, s.topk, s.rope_dim, s.yarn) == (32, 128, 2048, 64, None)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (78, 6144, 64)
    assert (config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim) == (192, 64, 256)
    assert (config.layernorm_epsilon, config.mdsa_latent_norm_eps, config.rotary_base) == (1e-5, 1e-6, 1e6)
    assert config.moe_layer_freq == [0, 0, 0] + [1] * 75 and SIZES["glm-5"].family == "glm_moe_dsa"


def test_yarn_and_indexer_types_are_validated():
    with pytest.raises(DSAConfigError, match="rotary_scaling_factor >= 1"):
        model_config("tiny", rope_type="yarn", rotary_scaling_factor=0.5)
    with pytest.raises(DSAConfigError, match="rope_type must be 'rope' or 'yarn'"):
        model_config("tiny", rope_type="ntk")
    with pytest.raises(DSAConfigError, match="first layer must be 'full'"):
        model_config("tiny", mdsa_indexer_types=["shared", "full", "full"])
    with pytest.raises(DSAConfigError, match="for each of the 3 layers"):
        model_config("tiny", mdsa_indexer_types=["full", "full"])
    config = model_config("tiny", mdsa_indexer_types=["full", "shared", "full"])
    assert [config.dsa.selects(i) for i in (1, 2, 3)] == [True, False, True]


def test_named_sizes_are_in_their_parameter_ranges(megatron_world):
    """tiny builds in seconds; small has ~20-60M parameters (counted from the built model)."""
    from megatron_dsa.model import build_model, count_parameters

    small = count_parameters(build_model("small"))
    assert 20e6 <= small <= 60e6, small
    assert set(SIZES) == {"tiny", "small", "v32-slice", "deepseek-v3.2-671b", "glm-5"}
