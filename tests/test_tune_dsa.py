"""benchmarks/tune_dsa.py's command line on CPU: the variant names it is asked for, checked
before any GPU work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tune_dsa import chosen_variants, main, variants  # noqa: E402


def test_variant_names_keep_the_commas_of_their_tiles():
    only = chosen_variants("stored_ds dq(64, 8, 3), stored_scores p1 dkv(64, 4, 3)", ["bwd"], [128])
    assert only == ["stored_ds dq(64, 8, 3)", "stored_scores p1 dkv(64, 4, 3)"]
    names = [name for name, _ in variants("bwd", 128)]
    assert [sum(o in n for n in names) for o in only] == [1, 1]  # each names exactly one variant
    assert chosen_variants("", ["fwd"], [16]) == []


def test_a_variant_that_names_nothing_fails_before_any_gpu_work():
    with pytest.raises(SystemExit, match=r"--variants \['stored_ds'\] name no variant of stages \['fwd'\]"):
        chosen_variants("stored_ds", ["fwd"], [128])
    with pytest.raises(SystemExit, match="unknown --stages"):
        main(["--stages", "bwd,fwdd"])
    # A name split at its tile's commas would have matched nearly everything (" 8").
    with pytest.raises(SystemExit, match="name no variant"):
        main(["--stages", "bwd", "--heads", "128", "--variants", "stored_ds dq(64, 8, 3),split dq(16, 8, 1)"])


def test_the_shape_comes_from_a_model_size_and_the_topk_from_the_command():
    """--model small --topk 2048: the verification MoE's latent and indexer at the 128K target's
    top-k, the dense anchor at its MHA dims; the json records the shape."""
    import bench_dsa
    import tune_dsa

    try:
        shape = tune_dsa.use_model("small", topk=2048)
        assert shape == dict(model="small", dqk=160, dv=128, idx_heads=4, idx_dim=64, topk=2048, dense_dims=[96, 64])
        assert (tune_dsa.TOPK, tune_dsa.QK_NOPE) == (2048, 64)
        assert "dense_sdpa 96/64" in [name for name, _ in variants("base", 8)]
        assert bench_dsa.use_model("small", "h100", topk=2048) == "dsa_h100_small_top2048"
        assert bench_dsa.use_model("small", "h100") == "dsa_h100_small"  # its own top-k: no suffix
    finally:
        tune_dsa.use_model("deepseek-v3.2")
    assert (tune_dsa.DQK, tune_dsa.TOPK, tune_dsa.QK_NOPE, tune_dsa.DENSE_QK) == (576, 2048, 128, 192)
    with pytest.raises(SystemExit):
        main(["--topk", "0"])
