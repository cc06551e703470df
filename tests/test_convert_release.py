"""The released checkpoints' features, on tiny models transformers writes itself: YaRN RoPE
(MLA and indexer, with its mscale), FP8 e4m3 weights with block scales (``weight_scale_inv``,
quantised by transformers' own ``Fp8Quantize``, the release's scheme), and both families:
DeepSeek-V3.2 (``DeepseekV32ForCausalLM``) and GLM-5 (``GlmMoeDsaForCausalLM``: interleaved
indexer RoPE, layers that reuse an earlier layer's top-k, 1e-5 norms with 1e-6 latent norms).

The FP8 sources also carry the release's MTP layer (added in its names, with
``num_nextn_predict_layers: 1``: transformers writes neither), which the import maps onto
megatron-core's MTP block: its head equals DeepSeek-V3's MTP formula computed from the HF tensors.

Each imported model gives transformers' logits (fp32, sparse, sequences longer than the top-k)
and greedy tokens; an FP8 source exports back to FP8 within e4m3 precision, a bf16 one
bit-exact; bad input stops with one line and writes nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_dsa.convert import export_to_hf, import_from_hf, load_model
from megatron_dsa.convert.cli import main as convert_main
from megatron_dsa.convert.fp8 import BlockScaling, quantized_in_release, scale_name
from test_convert import _fails, _hf_tensors, hf_model, our_logits, randomize_hf_, untie_indexer_

TOPK = 6
BLOCK = (8, 8)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=0.8, rope_theta=5000.0)
TINY = dict(
    vocab_size=300, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_attention_heads=4,
    num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=4, routed_scaling_factor=1.5,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, index_n_heads=4,
    index_head_dim=16, index_topk=TOPK, first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1,
)
FAMILIES = {
    "deepseek_v32": dict(num_hidden_layers=3, n_group=2, topk_group=2),
    # GLM-5's pattern: layers 2 and 3 reuse layer 1's top-k; 1e-5 decoder norms (its latents: 1e-6).
    "glm_moe_dsa": dict(num_hidden_layers=4, n_group=1, topk_group=1, rms_norm_eps=1e-5,
                        indexer_types=["full", "shared", "shared", "full"]),
}


def transformers_model(family: str, path: Path, dtype=torch.float32, **changes):
    """A tiny model of ``family`` with YaRN, random (transformers' init, norms and biases
    randomised, the indexer tie-free), saved by transformers."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    config_cls, model_cls = {"deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
                             "glm_moe_dsa": (GlmMoeDsaConfig, GlmMoeDsaForCausalLM)}[family]
    torch.manual_seed(7)
    cfg = config_cls(**{**TINY, **FAMILIES[family], "rope_parameters": dict(YARN), **changes})
    model = model_cls(cfg).eval()
    randomize_hf_(model)
    model.save_pretrained(str(path), max_shard_size="200KB")
    if dtype != torch.float32:  # as transformers keeps it: the router in fp32 (_keep_in_fp32_modules_strict)
        model = model_cls.from_pretrained(str(path), dtype=dtype)
        shutil.rmtree(path)
        model.save_pretrained(str(path), max_shard_size="200KB")
    return model


def add_mtp_layer(path: Path, copies: bool = True) -> list[str]:
    """Append the release's MTP layer (numbered num_hidden_layers) in the release's names and
    set ``num_nextn_predict_layers: 1``: a decoder layer of the last one's kind (its tensors
    redrawn, so it is no copy of it), enorm, hnorm, eh_proj, shared_head.norm and, with
    ``copies``, the release's copies of the embedding and the output head. transformers neither
    builds nor writes it."""
    cfg = json.loads((path / "config.json").read_text())
    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    tensors = _hf_tensors(path)
    gen = torch.Generator().manual_seed(L)

    def redrawn(t: torch.Tensor) -> torch.Tensor:
        # Values of its own at the last layer's scale (vectors: norms and biases, moved a little),
        # so a mapping that read the last decoder layer instead would show.
        noise = torch.randn(t.shape, generator=gen)
        return (t.float() + 0.1 * noise if t.dim() == 1 else t.float().std() * noise).to(t.dtype)

    mtp = {k.replace(f"model.layers.{L - 1}.", f"model.layers.{L}."): redrawn(t)
           for k, t in tensors.items() if k.startswith(f"model.layers.{L - 1}.")}
    untie_indexer_(mtp[f"model.layers.{L}.self_attn.indexer.wq_b.weight"], cfg["index_n_heads"])  # as randomize_hf_
    dtype = tensors["model.embed_tokens.weight"].dtype
    for name, shape, scale in (("enorm.weight", (H,), 0.1), ("hnorm.weight", (H,), 0.1),
                               ("shared_head.norm.weight", (H,), 0.1), ("eh_proj.weight", (H, 2 * H), 0.1)):
        values = scale * torch.randn(shape, generator=gen) + (1.0 if name.endswith("norm.weight") else 0.0)
        mtp[f"model.layers.{L}.{name}"] = values.to(dtype)
    if copies:
        mtp[f"model.layers.{L}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        mtp[f"model.layers.{L}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(mtp, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _edit_config(path, num_nextn_predict_layers=1)
    return sorted(mtp)


def quantize_as_release(src: Path, dst: Path, block=BLOCK) -> Path:
    """``src`` with the weights the releases quantise stored as e4m3 + ``weight_scale_inv``,
    by transformers' own quantiser, and the release's ``quantization_config``."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(
        weight_block_size=list(block), scale_fmt=None)))
    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for f in sorted(set(index["weight_map"].values())):
        out = {}
        for name, tensor in load_file(str(src / f)).items():
            out.update(quantizer._quantize_one(name, tensor) if quantized_in_release(name) else {name: tensor})
        assert any(t.dtype == torch.float8_e4m3fn for t in out.values()) or "layers" not in f
        save_file(out, str(dst / f), metadata={"format": "pt"})
        weight_map.update({name: f for name in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = BlockScaling(block).to_hf_config()
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _dequantized(src: Path) -> dict[str, torch.Tensor]:
    """An FP8 directory's weights as transformers dequantises them (``Fp8Dequantize``)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    tensors = _hf_tensors(src)
    plain = {n: t for n, t in tensors.items() if not n.endswith("_scale_inv")}
    for name, t in plain.items():
        if t.dtype == torch.float8_e4m3fn:
            plain[name] = Fp8Dequantize(None)._dequantize_one(t, tensors[scale_name(name)], torch.float32)
    return plain


def _save_plain(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dequantized_by_transformers(src: Path, dst: Path) -> Path:
    """An FP8 directory's weights as transformers dequantises them, saved plain (without the MTP
    layer: transformers ignores only the full models' MTP layer index)."""
    L = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    plain = {n: t for n, t in _dequantized(src).items() if not n.startswith(f"model.layers.{L}.")}
    return _save_plain(src, dst, plain)


def mtp_layer_by_transformers(src: Path, dst: Path):
    """transformers' model of an FP8 directory with its MTP layer's decoder-layer tensors in
    place of the last decoder layer's (the same kind: transformers' loader fills a decoder layer
    with them), ``shared_head.norm`` as the final norm and ``shared_head.head`` as the output
    layer; and the MTP layer's own tensors (enorm, hnorm, eh_proj, embed_tokens) by short name."""
    L = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    tensors = _dequantized(src)
    mtp = {n.removeprefix(f"model.layers.{L}."): t for n, t in tensors.items() if n.startswith(f"model.layers.{L}.")}
    plain = {n: t for n, t in tensors.items() if not n.startswith((f"model.layers.{L}.", f"model.layers.{L - 1}."))}
    own = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")
    plain.update({f"model.layers.{L - 1}.{n}": t for n, t in mtp.items() if not n.startswith(own)})
    plain["model.norm.weight"] = mtp["shared_head.norm.weight"]
    plain["lm_head.weight"] = mtp["shared_head.head.weight"]
    return hf_model(_save_plain(src, dst, plain)), mtp


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def release(request, megatron_world, tmp_path_factory):
    """A transformers-written YaRN model of one family, quantised to FP8 as the release is,
    imported; and the transformers model of the same (dequantised) weights."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    transformers_model(family, root / "hf")
    mtp = add_mtp_layer(root / "hf")
    fp8 = quantize_as_release(root / "hf", root / "fp8")
    import_from_hf(fp8, root / "ckpt", max_shard_size="100KB")
    model, spec = load_model(root / "ckpt", mdsa_mode="sparse")
    hf = hf_model(dequantized_by_transformers(fp8, root / "dequantized"))
    return SimpleNamespace(family=family, root=root, fp8=fp8, ckpt=root / "ckpt", model=model.eval(), spec=spec, hf=hf,
                           mtp=mtp)


def test_import_records_the_release_settings(release):
    cfg = release.model.config
    assert release.spec.family == release.family
    assert cfg.rope_type == "yarn" and cfg.dsa.yarn.factor == 4.0 and cfg.dsa.yarn.mscale_all_dim == 0.8
    assert cfg.dsa.yarn.attention_factor != 1.0 and cfg.dsa.yarn.softmax_factor != 1.0  # both scales tested
    if release.family == "glm_moe_dsa":
        # The four decoder layers' pattern, then the MTP layer, which runs its own indexer.
        assert [c.selects for c in _cores(release.model)] == [True, False, False, True, True]
        assert cfg.layernorm_epsilon == 1e-5 and cfg.mdsa_latent_norm_eps == 1e-6


def _cores(model):
    from megatron_dsa.model import dsa_layers

    return dsa_layers(model)


def test_logits_equal_transformers(release):
    tokens = torch.randint(0, 300, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = release.hf(tokens).logits.float()
    ours = our_logits(release.model, tokens, "sparse")
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (our_logits(release.model, tokens, "dense") - theirs).abs().max().item() > 1e-3  # top-k did select


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def our_mtp_logits(model, tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, V] logits of our MTP block's (one) depth in the model's own forward: its output
    (after its final norm) through the shared output layer."""
    seen = []
    handle = model.mtp.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        our_logits(model, tokens, mode)
    finally:
        handle.remove()
    hidden = seen[0].chunk(2, dim=0)[1]  # [T, B, H]: the decoder's rows first, then the MTP depth's
    logits, _ = model.output_layer(hidden)
    return logits.transpose(0, 1).float()


def test_mtp_head_is_deepseek_v3_mtp_formula(release, tmp_path):
    """Our MTP depth's logits at position i equal DeepSeek-V3's MTP module computed from the HF
    tensors: h'_i = eh_proj(cat(enorm(embed(t_i+1)), hnorm(h_i))), with h_i transformers' final
    (normalised) hidden state, then the MTP layer's decoder layer (transformers'), shared_head.norm
    and shared_head.head. Sparse, 29 tokens with top-k 6: the MTP layer's own indexer selects."""
    hf = release.hf
    eps = hf.config.rms_norm_eps
    theirs_model, mtp = mtp_layer_by_transformers(release.fp8, tmp_path / "mtp")
    layer = theirs_model.model.layers[hf.config.num_hidden_layers - 1]
    theirs_model.model.layers = torch.nn.ModuleList([layer])  # the MTP layer alone, then its norm and head
    tokens = torch.randint(0, 300, (2, 29), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = hf.model(tokens).last_hidden_state[:, :-1]
        e = mtp["embed_tokens.weight"][tokens[:, 1:]]
        x = torch.cat([_rms_norm(e, mtp["enorm.weight"], eps), _rms_norm(h, mtp["hnorm.weight"], eps)], -1)
        x = x @ mtp["eh_proj.weight"].T
        theirs = theirs_model(inputs_embeds=x).logits.float()
    ours = our_mtp_logits(release.model, tokens, "sparse")[:, :-1]  # the last row has no next token
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max().item() < 1e-4
    # The MTP layer is wired to its own tensors: the main head's logits are others.
    assert (ours - our_logits(release.model, tokens, "sparse")[:, :-1]).abs().max().item() > 1e-2


def test_greedy_tokens_equal_transformers(release):
    from transformers import GenerationConfig

    from megatron_dsa.inference import DSAInference

    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    n = 16  # 21 tokens: decode steps past top-k 6
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = release.hf.generate(prompt, generation_config=gen)[0, prompt.shape[1]:]
    ours = DSAInference(release.model, "sparse").generate(prompt, n)[0]
    assert theirs.tolist() == ours.tolist()


def test_fp8_round_trip_within_e4m3_precision(release):
    out = release.root / "fp8_again"
    export_to_hf(release.ckpt, out, fp8_block=BLOCK)
    source, again = _hf_tensors(release.fp8), _hf_tensors(out)
    # Every tensor comes back, the MTP layer's (FP8 ones among them) included.
    assert any(t.dtype == torch.float8_e4m3fn for k, t in source.items() if k in release.mtp)
    assert source.keys() == again.keys()
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert config["quantization_config"] == json.loads((release.fp8 / "config.json").read_text())["quantization_config"]
    scaling = BlockScaling(BLOCK)
    differ = total = 0
    scale_error = 0.0
    for name, a in source.items():
        b = again[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype != torch.float8_e4m3fn:
            if name.endswith("_scale_inv"):
                scale_error = max(scale_error, ((a - b).abs() / a).max().item())
            else:
                assert torch.equal(a, b), name
            continue
        differ += int((a.view(torch.uint8) != b.view(torch.uint8)).sum())
        total += a.numel()
        wa, wb = (scaling.dequantize(t, s[scale_name(name)]) for t, s in ((a, source), (b, again)))
        # e4m3 keeps 3 mantissa bits: a value re-quantised may move by at most one step (2^-3 relative).
        step = 2.0 ** -3 * wa.abs() + 2.0 ** -9 * source[scale_name(name)].max()
        assert ((wa - wb).abs() <= step).all(), name
    print(f"{release.family}: {differ} of {total} e4m3 values differ after the round trip, "
          f"scales by {scale_error:.1e} at most")
    # Imported in fp32, the dequantised weights re-quantise to the same bytes.
    assert differ == 0 and scale_error < 1e-6


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_round_trip_is_bit_exact(megatron_world, tmp_path, family):
    """transformers' bf16 checkpoint with the release's MTP layer -> ours -> bf16: every tensor,
    the MTP layer's (and its copies of the embedding and output head) included."""
    transformers_model(family, tmp_path / "hf", dtype=torch.bfloat16)
    mtp = add_mtp_layer(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf2")
    a, b = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "hf2")
    assert set(mtp) <= a.keys() and a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if key.endswith("mlp.gate.weight"):
            # transformers keeps the router weight fp32; megatron-core holds it in params_dtype.
            assert a[key].dtype == torch.float32 and torch.equal(a[key].bfloat16().float(), b[key]), key
        else:
            assert torch.equal(a[key], b[key]), key
    cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg.get("indexer_types") == FAMILIES[family].get("indexer_types")
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["dtype"] == "bfloat16"
    assert cfg["num_nextn_predict_layers"] == 1


# ---- FP8 block scales -------------------------------------------------------------------------


def test_quantize_is_transformers_scheme_and_partial_blocks_dequantize():
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    torch.manual_seed(0)
    w = torch.randn(32, 48) * torch.logspace(-3, 1, 48)
    w[:16, :16] = 0  # an all-zero block keeps scale 1
    ours, scale = BlockScaling((16, 16)).quantize(w)
    theirs = Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[16, 16],
                                                                             scale_fmt=None)))._quantize_one("x.weight", w)
    assert torch.equal(ours.view(torch.uint8), theirs["x.weight"].view(torch.uint8))
    assert torch.equal(scale, theirs["x.weight_scale_inv"]) and scale[0, 0] == 1
    # A partial last block (the release's 576-row kv_a_proj_with_mqa: 4.5 blocks of 128).
    scaling = BlockScaling((16, 16))
    w = torch.randn(40, 20)
    q, s = scaling.quantize(w)
    assert s.shape == (3, 2) and q.shape == w.shape
    back = scaling.dequantize(q, s)
    assert ((back - w).abs() <= 2.0 ** -4 * w.abs() + 2.0 ** -9 * s.max()).all()
    assert scaling.check("x.weight", (40, 20), (3, 2)) is None
    assert "does not fit" in scaling.check("x.weight", (40, 20), (2, 2))


@pytest.fixture
def fp8_dir(release, tmp_path):
    return shutil.copytree(release.fp8, tmp_path / "bad")


# Bad input: one family is enough.
bad_input = pytest.mark.parametrize("release", ["deepseek_v32"], indirect=True)


def _rewrite_shard_without(directory: Path, victim: str) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    f = index["weight_map"].pop(victim)
    tensors = load_file(str(directory / f))
    del tensors[victim]
    save_file(tensors, str(directory / f), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def _edit_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (directory / "config.json").write_text(json.dumps(cfg))


@bad_input
def test_from_hf_missing_scale(fp8_dir, tmp_path, capsys):
    victim = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite_shard_without(fp8_dir, scale_name(victim))
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           f"the FP8 weight {victim} has no scale tensor {scale_name(victim)}")


@bad_input
def test_from_hf_block_size_that_does_not_fit(fp8_dir, tmp_path, capsys):
    _edit_config(fp8_dir, quantization_config=BlockScaling((12, 12)).to_hf_config())
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           "the block size does not fit the weight")
    _edit_config(fp8_dir, quantization_config={**BlockScaling().to_hf_config(), "weight_block_size": [128]})
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           "weight_block_size must be two positive integers")


@bad_input
def test_from_hf_fp8_without_quantization_config(fp8_dir, tmp_path, capsys):
    _edit_config(fp8_dir, quantization_config=None)
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           "FP8 weights", "no quantization_config")


@bad_input
def test_from_hf_unknown_model_type(fp8_dir, tmp_path, capsys):
    _edit_config(fp8_dir, model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"])
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           "unsupported model: model_type='deepseek_v4'", "'glm_moe_dsa'")


@bad_input
def test_from_hf_truncated_shard(fp8_dir, tmp_path, capsys):
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())
    shard = fp8_dir / sorted(set(index["weight_map"].values()))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           f"cannot read {shard}", "incomplete metadata")


# ---- the MTP layer: config.json and the weights must agree ------------------------------------


@bad_input
def test_from_hf_mtp_config_without_weights(fp8_dir, release, tmp_path, capsys):
    """transformers' save_pretrained drops the MTP layer but keeps num_nextn_predict_layers: one
    error naming --drop-mtp; with it, the model without MTP (and an export without it)."""
    for name in release.mtp:
        for victim in (name, scale_name(name)):
            if victim in json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]:
                _rewrite_shard_without(fp8_dir, victim)
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           "num_nextn_predict_layers", "no model.layers.3.*", "--drop-mtp")
    assert convert_main(["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out"), "--drop-mtp"]) == 0
    model, _ = load_model(tmp_path / "out", mdsa_mode="sparse")
    assert not hasattr(model, "mtp") and not model.config.mtp_num_layers
    tokens = torch.randint(0, 300, (1, 17), generator=torch.Generator().manual_seed(6))
    assert torch.equal(our_logits(model.eval(), tokens, "sparse"), our_logits(release.model, tokens, "sparse"))
    export_to_hf(tmp_path / "out", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert not [k for k in _hf_tensors(tmp_path / "hf") if k.startswith("model.layers.3.")]


@bad_input
def test_from_hf_mtp_weights_without_config(fp8_dir, tmp_path, capsys):
    _edit_config(fp8_dir, num_nextn_predict_layers=None)
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           "the weights hold layers [3] after the 3 decoder layers", "num_nextn_predict_layers=0", "--drop-mtp")
    _edit_config(fp8_dir, num_nextn_predict_layers=2)
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           "the weights hold layers [3]", "num_nextn_predict_layers=2")
    _edit_config(fp8_dir, num_nextn_predict_layers=None)
    assert convert_main(["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out"), "--drop-mtp"]) == 0


@bad_input
def test_from_hf_mtp_copy_of_the_embedding_that_differs(fp8_dir, tmp_path, capsys):
    """megatron-core's MTP layer shares the model's embedding: a release whose MTP copy differs
    cannot be represented, and says so before anything is written."""
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())
    victim = "model.layers.3.embed_tokens.weight"
    f = fp8_dir / index["weight_map"][victim]
    tensors = load_file(str(f))
    tensors[victim] = tensors[victim].clone()
    tensors[victim][7, 0] += 1.0
    save_file(tensors, str(f), metadata={"format": "pt"})
    _fails(capsys, ["from-hf", "--hf", str(fp8_dir), "--out", str(tmp_path / "out")],
           f"{victim} differs from model.embed_tokens.weight", "--drop-mtp")
    # The comparison reads a block of rows at a time: the changed row is in a later block.
    from megatron_dsa.convert.hf import HFReader

    reader = HFReader(fp8_dir, BlockScaling(BLOCK))
    assert not reader.same_values("model.embed_tokens.weight", victim, block_bytes=4 * 48 * 3)
    assert reader.same_values("lm_head.weight", "model.layers.3.shared_head.head.weight", block_bytes=4 * 48 * 3)


# ---- the full shapes, on the meta device -------------------------------------------------------


@pytest.mark.parametrize("size", ["deepseek-v3.2-671b", "glm-5"])
def test_full_size_key_maps_one_to_one(megatron_world, size):
    """Our model and transformers' of each family's full shape, both on the meta device (no
    weights): every tensor of ours has its HF tensors with its shape, every HF tensor is one of
    ours, and every weight the release quantises is tiled by its 128 x 128 blocks. The MTP
    layer, which transformers does not build, in the release's names: a decoder layer of the
    last one's kind, enorm, hnorm, eh_proj, shared_head.norm and the copies of the embedding
    and the output head."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from megatron_dsa.convert import checkpoint as C
    from megatron_dsa.convert import mapping as M
    from megatron_dsa.convert.hf import HFReader
    from megatron_dsa.model import count_parameters, resolve_size

    spec = resolve_size(size)
    config = C.build_config(spec, {})
    assert config.mtp_num_layers == 1
    ours = C.meta_model(spec, config, spec.vocab_size)
    family = M.family_named(spec.family)
    hf_config = M.hf_config_dict(config, family, spec.first_k_dense, spec.vocab_size, spec.max_seq_len, torch.bfloat16)
    assert hf_config["num_nextn_predict_layers"] == 1
    with torch.device("meta"), no_init_weights():
        theirs = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    assert type(theirs).__name__ == family.architecture
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    L, H, V = config.num_layers, config.hidden_size, spec.vocab_size
    mtp = {k.replace(f"model.layers.{L - 1}.", f"model.layers.{L}."): s for k, s in shapes.items()
           if k.startswith(f"model.layers.{L - 1}.")}
    mtp.update({f"model.layers.{L}.{n}": s for n, s in (
        ("enorm.weight", (H,)), ("hnorm.weight", (H,)), ("shared_head.norm.weight", (H,)),
        ("eh_proj.weight", (H, 2 * H)))})
    copies = {f"model.layers.{L}.embed_tokens.weight": (V, H), f"model.layers.{L}.shared_head.head.weight": (V, H)}
    reader = HFReader.of_shapes({**shapes, **mtp, **copies})
    assert reader.mismatches(C.tensor_entries(ours), L, config.mtp_num_layers) == []
    assert HFReader.of_shapes({**shapes, **mtp}).mismatches(C.tensor_entries(ours), L, config.mtp_num_layers) == []
    # ... and back: the spec read from the HF config is the named size's.
    again = M.size_from_hf_config(hf_config, name=size)
    assert {k: again.transformer.get(k) for k in spec.transformer if k != "transformer_impl"} == {
        k: v for k, v in spec.transformer.items() if k != "transformer_impl"}
    assert (again.first_k_dense, again.vocab_size, again.max_seq_len, again.family) == (
        spec.first_k_dense, spec.vocab_size, spec.max_seq_len, spec.family)
    mtp_parameters = sum(math.prod(s) for k, s in mtp.items() if not k.endswith("e_score_correction_bias"))
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters()) + mtp_parameters
    print(f"{size}: {count_parameters(ours) / 1e9:.1f}B parameters ({mtp_parameters / 1e9:.1f}B in the MTP layer), "
          f"{len(shapes) + len(mtp) + len(copies)} HF tensors")
    # The release's FP8 layout of the same names: every quantised weight has its 128 x 128 grid.
    scaling = BlockScaling()
    per_expert = [n for name, entry in C.tensor_entries(ours) for n, shape in
                  zip(M.hf_names(name, L)[0], M.hf_shapes(name, tuple(entry.data.shape), L))
                  if quantized_in_release(n) and scaling.check(n, shape, scaling.grid(shape)) is None]
    assert len(per_expert) > 0.9 * len(C.tensor_entries(ours))
