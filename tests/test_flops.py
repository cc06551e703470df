"""The FLOP counter (megatron_dsa.flops): the indexer's O(S^2) term is counted, for one
attention core (the benchmarks) and for the whole model (the trainer's TFLOP/s)."""

from __future__ import annotations

import pytest

from megatron_dsa.flops import Shape, causal_pairs, dsa_flops, forward_terms, sparse_pairs, training_terms
from megatron_dsa.model import model_config


def test_dsa_flops_counts_indexer_term():
    S, HI, DI = 131072, 64, 128
    f = dsa_flops(S, 16, 576, 512, HI, DI, 2048)
    assert f["indexer_scores"] == pytest.approx(2 * HI * DI * S * (S + 1) / 2)
    assert f["indexer_scores"] == pytest.approx(1.4e14, rel=0.02)  # the spec's lower bound
    assert f["total"] > f["indexer_scores"] + f["attn_fwd"] + f["attn_bwd"]
    nb = dsa_flops(S, 16, 576, 512, HI, DI, 2048, backward=False, sparse_kl=False)
    assert nb["total"] == pytest.approx(nb["indexer_scores"] + nb["attn_fwd"])


def test_pair_counts():
    assert causal_pairs(5) == 15
    assert sparse_pairs(5, 2) == 1 + 2 * 4  # row 0 sees one key, the others two
    assert sparse_pairs(5, 10) == causal_pairs(5)


def test_the_model_counts_the_indexer_only_where_it_runs():
    shape = Shape.from_config(model_config("tiny"), vocab_size=512)
    seq = 128
    dense, warmup, sparse = (training_terms(shape, seq, phase) for phase in ("pretrain", "warmup", "sparse"))
    assert dense["indexer_scores"] == 0 and dense["indexer_kl"] == 0
    # warm-up trains the O(S^2) scoring (3x); sparse selects without gradient (1x)
    pair_cost = 2 * shape.idx_heads * shape.idx_dim + 2 * shape.idx_heads
    assert warmup["indexer_scores"] == 3 * shape.num_layers * causal_pairs(seq) * pair_cost
    assert sparse["indexer_scores"] == shape.num_layers * causal_pairs(seq) * pair_cost


def test_each_mtp_depth_counts_one_more_moe_layer_its_projection_and_an_output_pass():
    seq = 128
    plain = Shape.from_config(model_config("tiny"), vocab_size=512)
    mtp = Shape.from_config(model_config("tiny", mtp_num_layers=1), vocab_size=512)
    assert (plain.mtp_layers, mtp.mtp_layers) == (0, 1)
    for phase in ("pretrain", "warmup", "sparse"):
        a, b = training_terms(plain, seq, phase), training_terms(mtp, seq, phase)
        L = plain.num_layers
        for per_layer in ("mla_projections", "attention", "indexer_projections", "indexer_scores", "indexer_kl"):
            assert b[per_layer] == pytest.approx(a[per_layer] * (L + 1) / L), (phase, per_layer)
        mult = 1 if phase == "warmup" else 3  # the main model is frozen in warm-up
        moe = 2 * seq * plain.hidden * (plain.experts + 3 * plain.moe_topk * plain.moe_ffn + 3 * plain.shared_ffn)
        assert b["mlp_moe"] - a["mlp_moe"] == pytest.approx(mult * moe)
        assert b["output_layer"] == pytest.approx(2 * a["output_layer"])
        assert b["mtp_projections"] == pytest.approx(mult * 2 * seq * 2 * plain.hidden ** 2)


def test_each_phase_counts_attention_in_the_form_it_attends_in():
    """The dense phases attend (and the warm-up's target scores) in MLA's MHA form, per head
    d_qk + d_rope scores and d_v values a pair; the sparse phase over the absorbed latent."""
    shape = Shape.from_config(model_config("v32-slice"), vocab_size=512)
    seq, H, L = 4096, shape.heads, shape.num_layers
    dense, warmup, sparse = (forward_terms(shape, seq, mode) for mode in ("dense", "warmup", "sparse"))
    mha = 2 * H * (shape.qk_dim + shape.rope_dim)
    assert (shape.qk_dim, shape.rope_dim, shape.v_dim, shape.kv_lora) == (128, 64, 128, 512)
    assert dense["attention"] == warmup["attention"] == L * causal_pairs(seq) * (mha + 2 * H * shape.v_dim)
    assert sparse["attention"] == L * sparse_pairs(seq, shape.topk) * 2 * H * (2 * shape.kv_lora + shape.rope_dim)
    assert warmup["indexer_kl"] == L * causal_pairs(seq) * mha
    assert dense["mla_projections"] == sparse["mla_projections"]
