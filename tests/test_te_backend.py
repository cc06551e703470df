"""Transformer Engine backend and FP8 settings, on a CPU machine without TE.

- ``model.transformer_impl`` resolves once (auto -> local here) and Megatron's
  ``--transformer-impl`` and our model config both get that value;
- the ``fp8`` section becomes Megatron's FP8 flags and the model config's FP8 fields;
- every bad combination (FP8 without TE, with local linears, without CUDA; TE requested but not
  installed; unknown values) stops with one ``error:`` line before any compute, writing nothing;
- the layer spec names TE modules for the linears under TE (simulated: megatron-core's TE
  classes exist as stand-ins when TE is absent) and megatron-core's local ones otherwise; the
  DSA core attention is ours on both and refuses FP8 inputs.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.test_launch import CONFIGS, base, cli, expect_error  # noqa: F401 (fixtures; corpus: conftest)


def load(corpus, tmp_path, *overrides: str):
    from megatron_dsa.train.config import load_config

    return load_config(CONFIGS / "tiny" / "pretrain.yaml", [*base(corpus, tmp_path)[2:], *overrides])


def megatron_args(argv: list[str]) -> argparse.Namespace:
    """Megatron's own parser over the trainer's flags (what ``run`` hands to Megatron)."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_dsa.train.flags import add_mdsa_args

    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    return add_mdsa_args(add_megatron_arguments(parser)).parse_args(argv)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.fixture
def fake_fp8_gpu(monkeypatch):
    """TE "installed" and an FP8-capable GPU "present" (Hopper), for the checks that read them."""
    import megatron.core.transformer.transformer_config as transformer_config

    from megatron_dsa import backends

    monkeypatch.setattr(backends, "te_installed", lambda: True)
    monkeypatch.setattr(transformer_config, "is_te_min_version", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


# --------------------------------------------------------------------------------------------
# Backend resolution


@pytest.mark.parametrize("te, cuda, expected", [
    (False, False, "local"), (True, False, "local"), (False, True, "local"),
    (True, True, "transformer_engine"),
])
def test_auto_resolution(monkeypatch, te, cuda, expected):
    from megatron_dsa import backends

    monkeypatch.setattr(backends, "te_installed", lambda: te)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert backends.resolve_transformer_impl("auto") == expected
    assert backends.resolve_transformer_impl("local") == "local"


def test_auto_is_local_on_this_machine():
    from megatron_dsa.backends import resolve_transformer_impl, te_installed
    from megatron_dsa.model import model_config

    assert not te_installed() and not torch.cuda.is_available()
    assert resolve_transformer_impl() == "local"
    assert model_config("tiny").transformer_impl == "local"


def test_transformer_engine_without_te_is_a_clear_error():
    from megatron_dsa.config import DSAConfigError
    from megatron_dsa.backends import resolve_transformer_impl
    from megatron_dsa.model import model_config

    for call in (lambda: resolve_transformer_impl("transformer_engine"),
                 lambda: model_config("tiny", transformer_impl="transformer_engine")):
        with pytest.raises(DSAConfigError,
                           match=r"not installed; install the 'te' extra: pip install -e \.\[te\]"):
            call()
    with pytest.raises(DSAConfigError, match="must be one of"):
        resolve_transformer_impl("te")


def test_spec_refuses_te_when_it_disappears(monkeypatch):
    """A config made where TE was present, built where it is not: the spec says so."""
    from megatron_dsa import backends, model
    from megatron_dsa.config import DSAConfigError
    from megatron_dsa.spec import backend_for

    monkeypatch.setattr(backends, "te_installed", lambda: True)
    cfg = model.model_config("tiny", transformer_impl="transformer_engine")
    monkeypatch.setattr(backends, "te_installed", lambda: False)
    with pytest.raises(DSAConfigError, match=r"pip install -e \.\[te\]"):
        backend_for(cfg)


def test_model_config_refuses_fp8_on_local_linears():
    from megatron_dsa.config import DSAConfigError
    from megatron_dsa.model import model_config

    with pytest.raises(DSAConfigError, match="needs transformer_impl 'transformer_engine'"):
        model_config("tiny", fp8="hybrid")


# --------------------------------------------------------------------------------------------
# Trainer: Megatron's flags and the model config from the same values


@pytest.mark.parametrize("impl", [None, "auto", "local"])
def test_local_backend_reaches_megatron_and_model_config(corpus, tmp_path, impl):
    from megatron_dsa.train.preflight import preflight
    from megatron_dsa.train.flags import megatron_argv
    from megatron_dsa.train.flags import phase_model_config

    cfg = load(corpus, tmp_path, *([f"model.transformer_impl={impl}"] if impl else []))
    plan = preflight(cfg)
    argv = megatron_argv(cfg, plan)
    assert plan["transformer_impl"] == "local" and argv.count("--transformer-impl") == 1
    assert flag(argv, "--transformer-impl") == "local"
    assert not any(a.startswith("--fp8") for a in argv)
    args = megatron_args(argv)
    model_cfg = phase_model_config(args)
    assert args.transformer_impl == model_cfg.transformer_impl == "local"
    assert args.fp8 is None and model_cfg.fp8 is None
    assert not (tmp_path / "save").exists()


def test_explicit_local_on_a_te_gpu_stays_local_in_both(corpus, tmp_path, fake_fp8_gpu):
    """Where auto would pick TE, an explicit local must reach Megatron and the model alike."""
    from megatron_dsa.train.preflight import preflight
    from megatron_dsa.train.flags import megatron_argv
    from megatron_dsa.train.flags import phase_model_config

    cfg = load(corpus, tmp_path, "model.transformer_impl=local")
    argv = megatron_argv(cfg, preflight(cfg))
    args = megatron_args(argv)
    assert args.transformer_impl == phase_model_config(args).transformer_impl == "local"
    auto = load(corpus, tmp_path)
    assert flag(megatron_argv(auto, preflight(auto)), "--transformer-impl") == "transformer_engine"


def test_fp8_settings_reach_megatron_and_model_config(corpus, tmp_path, fake_fp8_gpu):
    from megatron_dsa.train.preflight import preflight
    from megatron_dsa.train.flags import megatron_argv
    from megatron_dsa.train.flags import phase_model_config

    cfg = load(corpus, tmp_path, "fp8.format=hybrid", "fp8.recipe=tensorwise",
               "fp8.first_last_layers_bf16=true", "fp8.num_layers_at_end_in_bf16=2",
               "fp8.param_gather=true", "megatron.use_distributed_optimizer=true")
    plan = preflight(cfg)
    argv = megatron_argv(cfg, plan)
    assert plan["transformer_impl"] == flag(argv, "--transformer-impl") == "transformer_engine"
    assert flag(argv, "--fp8-format") == "hybrid" and flag(argv, "--fp8-recipe") == "tensorwise"
    assert "--first-last-layers-bf16" in argv and "--fp8-param-gather" in argv
    assert flag(argv, "--num-layers-at-start-in-bf16") == "1"  # Megatron's default, filled in
    assert flag(argv, "--num-layers-at-end-in-bf16") == "2"
    args = megatron_args(argv)
    model_cfg = phase_model_config(args)
    assert args.transformer_impl == model_cfg.transformer_impl == "transformer_engine"
    assert args.fp8 == model_cfg.fp8 == "hybrid"
    assert args.fp8_recipe == model_cfg.fp8_recipe == "tensorwise"
    assert model_cfg.first_last_layers_bf16 and model_cfg.fp8_param
    assert (model_cfg.num_layers_at_start_in_bf16, model_cfg.num_layers_at_end_in_bf16) == (1, 2)
    assert not (tmp_path / "save").exists()


def test_fp8_delayed_recipe_defaults_and_amax_flags(corpus, tmp_path, fake_fp8_gpu):
    from megatron_dsa.train.preflight import preflight
    from megatron_dsa.train.flags import megatron_argv
    from megatron_dsa.train.flags import phase_model_config

    cfg = load(corpus, tmp_path, "fp8.format=e4m3", "fp8.amax_history_len=1024", "fp8.amax_compute_algo=max")
    assert cfg.fp8["recipe"] == "delayed"
    argv = megatron_argv(cfg, preflight(cfg))
    assert flag(argv, "--fp8-format") == "e4m3" and flag(argv, "--fp8-recipe") == "delayed"
    assert flag(argv, "--fp8-amax-history-len") == "1024" and flag(argv, "--fp8-amax-compute-algo") == "max"
    assert "--first-last-layers-bf16" not in argv and "--num-layers-at-start-in-bf16" not in argv
    model_cfg = phase_model_config(megatron_args(argv))
    assert (model_cfg.fp8_amax_history_len, model_cfg.fp8_amax_compute_algo) == (1024, "max")


# --------------------------------------------------------------------------------------------
# Bad combinations: one error line before any compute, nothing written


@pytest.mark.parametrize("overrides, needles", [
    (["fp8.format=hybrid"], ("needs Transformer Engine", "not installed", "pip install -e .[te]")),
    (["fp8.format=hybrid", "model.transformer_impl=local"], ("fp8.format 'hybrid'", "'local'")),
    (["model.transformer_impl=transformer_engine"], ("model.transformer_impl", "pip install -e .[te]")),
    (["model.transformer_impl=te"], ("model.transformer_impl must be one of", "transformer_engine")),
    (["fp8.format=e5m2"], ("fp8.format must be one of", "e4m3", "hybrid")),
    (["fp8.format=hybrid", "fp8.recipe=custom"], ("fp8.recipe must be one of", "mxfp8")),
    (["fp8.format=hybrid", "fp8.amax_compute_algo=mean"], ("fp8.amax_compute_algo must be one of",)),
    (["fp8.recipe=mxfp8"], ("fp8.recipe is set but fp8.format is null",)),
    (["fp8.format=hybrid", "fp8.recipe=tensorwise", "fp8.amax_history_len=16"],
     ("applies to fp8.recipe 'delayed' only",)),
    (["fp8.format=hybrid", "fp8.first_last_layers_bf16=true"], ("first_last_layers_bf16", "'delayed'")),
    (["fp8.format=hybrid", "fp8.recipe=blockwise", "fp8.num_layers_at_start_in_bf16=2"],
     ("needs fp8.first_last_layers_bf16",)),
    (["fp8.format=hybrid", "fp8.param_gather=true"], ("use_distributed_optimizer",)),
    (["fp8.fromat=hybrid"], ("fp8.fromat", "valid keys of 'fp8'")),
    (["megatron.fp8_format=hybrid"], ("set fp8.format instead",)),
    (["megatron.transformer_impl=transformer_engine"], ("set model.transformer_impl instead",)),
    (["model.overrides.fp8=hybrid"], ("model.overrides.fp8: set fp8.format instead",)),
    (["model.overrides.fp8_multi_head_attention=true"], ("not supported", "high-precision")),
])
def test_bad_backend_and_fp8_settings(cli, corpus, tmp_path, overrides, needles):
    expect_error(cli(*base(corpus, tmp_path), *overrides), *needles)
    assert not (tmp_path / "save").exists() and not (tmp_path / "tb").exists()


def test_fp8_without_cuda(cli, corpus, tmp_path, monkeypatch):
    from megatron_dsa import backends

    monkeypatch.setattr(backends, "te_installed", lambda: True)
    expect_error(cli(*base(corpus, tmp_path), "fp8.format=hybrid"), "needs a CUDA GPU")
    assert not (tmp_path / "save").exists()


def test_mxfp8_on_hopper(cli, corpus, tmp_path, fake_fp8_gpu):
    expect_error(cli(*base(corpus, tmp_path), "fp8.format=e4m3", "fp8.recipe=mxfp8"),
                 "compute capability 10.0", "9.0")
    assert not (tmp_path / "save").exists()


def test_check_accepts_fp8_on_a_te_gpu(cli, corpus, tmp_path, fake_fp8_gpu):
    code, out, err = cli(*base(corpus, tmp_path), "fp8.format=hybrid", "--check")
    assert code == 0 and out.startswith("ok:"), (code, out, err)
    assert "(transformer_engine modules, FP8 hybrid (delayed))" in out, out
    code, out, err = cli(*base(corpus, tmp_path), "model.transformer_impl=local", "--check")
    assert code == 0 and "(local modules)" in out, (code, out, err)
    assert not (tmp_path / "save").exists()


# --------------------------------------------------------------------------------------------
# Layer specs


def _layer_parts(spec):
    """(attention submodules, indexer submodules, mlp submodules, norms) of one layer spec."""
    attn = spec.submodules.self_attention.submodules
    indexer = attn.core_attention.submodules.indexer.submodules
    return attn, indexer, spec.submodules.mlp.keywords["submodules"], spec.submodules


def test_local_spec_uses_local_modules():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_dsa.layer import DSACoreAttention, ReplicatedLinear
    from megatron_dsa.model import model_config
    from megatron_dsa.spec import SequenceParallelTorchNorm, dsa_layer_specs

    dense, moe = dsa_layer_specs(model_config("tiny"), first_k_dense=1)[:2]
    attn, indexer, mlp, layer = _layer_parts(dense)
    assert attn.core_attention.module is DSACoreAttention
    for name in ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj"):
        assert getattr(attn, name) is ColumnParallelLinear, name
    assert attn.linear_proj is RowParallelLinear
    assert (indexer.wq_b, indexer.wk, indexer.weights_proj) == (ReplicatedLinear,) * 3
    assert (mlp.linear_fc1, mlp.linear_fc2) == (ColumnParallelLinear, RowParallelLinear)
    assert layer.input_layernorm is layer.pre_mlp_layernorm is SequenceParallelTorchNorm
    experts = moe.submodules.mlp.keywords["submodules"].experts
    assert experts.func is SequentialMLP
    assert experts.keywords["submodules"].linear_fc1 is ColumnParallelLinear


def test_te_spec_uses_te_modules(megatron_world, monkeypatch):
    """TE simulated: megatron-core's TE classes are importable stand-ins without TE, so the
    spec's choices can be compared by identity."""
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.extensions.transformer_engine_spec_provider as provider

    from megatron_dsa import backends, model
    from megatron_dsa.layer import DSACoreAttention, ReplicatedLinear
    from megatron_dsa.spec import TEReplicatedLinear, dsa_block_spec, dsa_layer_specs

    monkeypatch.setattr(backends, "te_installed", lambda: True)
    monkeypatch.setattr(provider, "is_te_min_version", lambda *a, **k: True)
    cfg = model.model_config("tiny", transformer_impl="transformer_engine")
    dense, moe = dsa_layer_specs(cfg, first_k_dense=1)[:2]
    attn, indexer, mlp, layer = _layer_parts(dense)
    # The DSA core stays ours; every linear around it is TE's.
    assert attn.core_attention.module is DSACoreAttention
    assert attn.linear_q_up_proj is attn.linear_kv_up_proj is te_ext.TEColumnParallelLinear
    assert attn.linear_q_down_proj is attn.linear_kv_down_proj is te_ext.TELinear  # duplicated
    assert attn.linear_proj is te_ext.TERowParallelLinear
    assert attn.q_layernorm is te_ext.TENorm
    assert indexer.wq_b is indexer.wk is TEReplicatedLinear
    assert indexer.weights_proj is ReplicatedLinear  # too narrow for TE's FP8 GEMM
    # Dense MLP unfused (the separate pre-MLP norm must not be applied twice).
    assert (mlp.linear_fc1, mlp.linear_fc2) == (te_ext.TEColumnParallelLinear, te_ext.TERowParallelLinear)
    assert layer.input_layernorm is layer.pre_mlp_layernorm is te_ext.TENorm
    moe_sub = moe.submodules.mlp.keywords["submodules"]
    routed = moe_sub.experts.keywords["submodules"]
    assert routed.linear_fc1 is te_ext.TEColumnParallelLinear
    assert moe_sub.shared_experts.keywords["submodules"].linear_fc1 is te_ext.TEColumnParallelLinear
    assert dsa_block_spec(cfg, first_k_dense=1).layer_norm is te_ext.TENorm


class FakeTELinear(torch.nn.Module):
    """TE's Linear as far as the indexer sees it: megatron's TELinear signature, and TE's
    ``.view(-1, in_features)`` of the input (which fails on non-contiguous inputs)."""

    built: list[dict] = []

    def __init__(self, input_size, output_size, *, parallel_mode, config, init_method, bias,
                 skip_bias_add, skip_weight_param_allocation, **kwargs):
        super().__init__()
        FakeTELinear.built.append(dict(parallel_mode=parallel_mode, bias=bias, **kwargs))
        self.weight = torch.nn.Parameter(torch.randn(output_size, input_size))

    def forward(self, x):
        out = x.view(-1, x.shape[-1]) @ self.weight.t()
        return out.view(*x.shape[:-1], -1), None


def test_te_indexer_linears_are_duplicated_and_take_transposed_inputs(monkeypatch):
    import megatron.core.extensions.transformer_engine as te_ext
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_dsa import backends, model
    from megatron_dsa.layer import LightningIndexer
    from megatron_dsa.spec import _indexer_linears

    monkeypatch.setattr(backends, "te_installed", lambda: True)
    monkeypatch.setattr(te_ext, "TELinear", FakeTELinear)
    FakeTELinear.built.clear()
    cfg = model.model_config("tiny", transformer_impl="transformer_engine")
    spec = ModuleSpec(module=LightningIndexer, submodules=_indexer_linears(TESpecProvider()))
    indexer = build_module(spec, config=cfg)
    assert isinstance(indexer.wq_b, FakeTELinear) and isinstance(indexer.wk, FakeTELinear)
    assert [b["parallel_mode"] for b in FakeTELinear.built] == ["duplicated", "duplicated"]
    assert not any("gather_output" in b for b in FakeTELinear.built)
    # The DSA core hands the indexer [s, b, ...] activations transposed to batch-first.
    s, b = 16, 3
    x = torch.randn(s, b, cfg.hidden_size).transpose(0, 1)
    qr = torch.randn(s, b, cfg.q_lora_rank).transpose(0, 1)
    assert not x.is_contiguous()
    q, k, w = indexer(x, qr, torch.arange(s))
    assert q.shape[:2] == (b, s) and torch.isfinite(q).all() and torch.isfinite(k).all()


def test_dsa_core_refuses_fp8_inputs(megatron_world, monkeypatch):
    """Under FP8 the core attention checks that TE handed it high-precision tensors."""
    import dataclasses

    import megatron.core.transformer.transformer_config as transformer_config
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.model import model_config
    from megatron_dsa.spec import dsa_attention_spec

    plain = model_config("tiny")
    attn = build_module(dsa_attention_spec(plain, LocalSpecProvider()), config=plain, layer_number=1)
    assert not attn.core_attention._forward_pre_hooks  # no check without FP8
    monkeypatch.setattr(transformer_config, "is_te_min_version", lambda *a, **k: True)
    fp8 = dataclasses.replace(plain, fp8="hybrid")  # local modules, just to carry the flag
    attn = build_module(dsa_attention_spec(fp8, LocalSpecProvider()), config=fp8, layer_number=1)
    s, b, h, d = 8, 1, fp8.num_attention_heads, fp8.kv_lora_rank + fp8.qk_pos_emb_head_dim
    query, key = torch.randn(s, b, h, d), torch.randn(s, b, 1, d)
    x, qr = torch.randn(s, b, fp8.hidden_size), torch.randn(s, b, fp8.q_lora_rank)
    with pytest.raises(RuntimeError, match="FP8 tensor as query"):
        attn.core_attention(query.to(torch.float8_e4m3fn), key, value=None, attention_mask=None, x=x, qr=qr)
    with pytest.raises(RuntimeError, match="FP8 tensor as x"):
        attn.core_attention(query, key, value=None, attention_mask=None, x=x.to(torch.float8_e5m2), qr=qr)
    out = attn.core_attention(query, key, value=None, attention_mask=None, x=x, qr=qr)
    width = fp8.v_head_dim if attn.core_attention.dense_in_mha_form else fp8.kv_lora_rank  # dense: MHA form
    assert out.shape == (s, b, h * width) and torch.isfinite(out).all()
