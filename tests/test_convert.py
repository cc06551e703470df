"""megatron-dsa checkpoints <-> Hugging Face DeepseekV32ForCausalLM (transformers, no custom code).

The indexer weights are made tie-free (each odd indexer head is the negation of the previous
one, so ReLU never zeroes a key's score for every head): with exact ties, HF's torch.topk and
our stable sort may keep different keys, which is a tie-breaking choice, not a conversion bug.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_dsa.convert import ConversionError, export_to_hf, import_from_hf, load_model, save_model_checkpoint
from megatron_dsa.convert.cli import main as convert_main
from megatron_dsa.model import build_model, model_config, resolve_size

TOPK = 8
REPO = Path(__file__).resolve().parents[1]


def untie_indexer_(weight: torch.Tensor, n_heads: int) -> None:
    w = weight.data.view(n_heads, -1, weight.shape[-1])
    w[1::2] = -w[0::2]


@torch.no_grad()
def randomize_tiny(model) -> None:
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.2)
        if name.endswith("bias"):
            p.normal_(0.0, 0.2)
        if name.endswith("indexer.wq_b.weight"):
            untie_indexer_(p, model.config.dsa.n_heads)
    for name, b in model.named_buffers():
        if name.endswith("expert_bias"):
            b.normal_(0.0, 0.1)


def train_sp_tokenizer(path: Path, vocab: int = 512) -> Path:
    from megatron_dsa.data.corpus import train_tokenizer

    texts = [Path(f).read_text() for f in sorted(glob.glob(str(REPO / "megatron_dsa/**/*.py"), recursive=True))]
    path.write_bytes(train_tokenizer(texts, vocab))
    return path


@pytest.fixture(scope="module")
def tiny(megatron_world, tmp_path_factory):
    """A randomised tiny model (top-k 8), its checkpoint, tokenizer and HF export."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_model("tiny", model_config("tiny", dsa_indexer_topk=TOPK, mdsa_mode="sparse")).eval()
    randomize_tiny(model)
    save_model_checkpoint(model, root / "ckpt", resolve_size("tiny"))
    tok = train_sp_tokenizer(root / "tok.model")
    rc = convert_main(["to-hf", "--checkpoint", str(root / "ckpt"), "--size", "tiny",
                       "--set", f"dsa_indexer_topk={TOPK}", "--tokenizer", str(tok),
                       "--out", str(root / "hf"), "--max-shard-size", "200KB"])
    assert rc == 0
    return dict(root=root, model=model, ckpt=root / "ckpt", hf=root / "hf", tok=tok)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def our_logits(model, tokens, mode):
    from megatron_dsa.inference import full_forward_logits

    return full_forward_logits(model, tokens, mode)


def test_export_layout(tiny):
    hf = tiny["hf"]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV32ForCausalLM"] and cfg["model_type"] == "deepseek_v32"
    for key, value in dict(index_n_heads=2, index_head_dim=32, index_topk=TOPK, q_lora_rank=32, kv_lora_rank=32,
                           qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                           num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                           n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                           vocab_size=512, num_hidden_layers=3).items():
        assert cfg[key] == value, key
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((hf / f).is_file() for f in files)
    names = set(index["weight_map"])
    for name in ("model.layers.0.self_attn.indexer.wq_b.weight", "model.layers.0.self_attn.indexer.k_norm.bias",
                 "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.experts.7.up_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.2.mlp.shared_experts.down_proj.weight"):
        assert name in names, name
    with safe_open(str(hf / index["weight_map"]["model.layers.1.mlp.gate.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    assert not list(tiny["root"].glob(".hf.tmp-*"))


@pytest.mark.parametrize("seq", [6, 40])
def test_hf_logits_match_ours(tiny, seq):
    hf = hf_model(tiny["hf"])
    assert hf.config.index_topk == TOPK
    tokens = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        theirs = hf(tokens).logits.float()
    ours = our_logits(tiny["model"], tokens, "sparse")
    assert (ours - theirs).abs().max().item() < 1e-4
    dense = our_logits(tiny["model"], tokens, "dense")
    gap = (dense - theirs).abs().max().item()
    if seq > TOPK:
        assert gap > 1e-3  # the sparse path is really being compared
    else:
        assert gap < 1e-4  # fewer keys than top-k: sparse == dense


def test_tokenizer_export(tiny):
    from transformers import AutoTokenizer

    from megatron_dsa.data import SentencePieceTokenizer

    ours = SentencePieceTokenizer(tiny["tok"])
    theirs = AutoTokenizer.from_pretrained(str(tiny["hf"]))
    text = (REPO / "megatron_dsa/reference.py").read_text()[:3000] + "\n\t  x = 12345  # café 東京 🙂"
    ids = ours.tokenize(text)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids
    assert theirs.decode(ids) == ours.detokenize(ids)
    assert theirs.eos_token_id == ours.eos and theirs.pad_token_id == ours.pad


def test_greedy_generation_matches_hf(tiny):
    from transformers import GenerationConfig

    from megatron_dsa.inference import DSAInference

    hf = hf_model(tiny["hf"])
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    n = 14  # 20 tokens in all: decode steps past top-k 8
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = hf.generate(prompt, generation_config=gen)[0, prompt.shape[1]:]
    ours = DSAInference(tiny["model"], "sparse").generate(prompt, n)[0]
    assert theirs.tolist() == ours.tolist()


def _model_tensors(ckpt, **kw):
    model, _ = load_model(ckpt, **kw)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return sd


def test_round_trip_ours_hf_ours(tiny):
    out = tiny["root"] / "ckpt2"
    import_from_hf(tiny["hf"], out, size="tiny")
    before = _model_tensors(tiny["ckpt"], size="tiny", overrides={"dsa_indexer_topk": TOPK})
    after = _model_tensors(out)  # size and top-k recorded by from-hf
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    model, spec = load_model(out)
    assert spec.name == "tiny" and model.config.dsa.topk == TOPK


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def foreign_hf_model(path: Path):
    """A DeepSeek-V3.2-shaped model this project did not write (random, transformers' own init)."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(5)
    cfg = DeepseekV32Config(
        vocab_size=300, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=4, n_group=2, topk_group=2, routed_scaling_factor=1.5, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, index_n_heads=4,
        index_head_dim=16, index_topk=6, first_k_dense_replace=2, max_position_embeddings=256,
        rope_theta=5000.0, initializer_range=0.1,
    )
    model = DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            if name.endswith("indexer.wq_b.weight"):
                untie_indexer_(p, cfg.index_n_heads)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return model


def test_import_foreign_hf_and_back(megatron_world, tmp_path):
    hf = foreign_hf_model(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, spec = load_model(tmp_path / "ckpt", mdsa_mode="sparse")
    assert spec.first_k_dense == 2 and model.config.dsa.topk == 6 and model.config.rotary_base == 5000.0
    model.eval()
    for seq in (4, 25):
        tokens = torch.randint(0, 300, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            theirs = hf(tokens).logits.float()
        ours = our_logits(model, tokens, "sparse")
        assert (ours - theirs).abs().max().item() < 1e-4, seq
    # HF -> ours -> HF is bit-exact (same names, dtypes and bits).
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf2")
    a, b = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "hf2")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---- bad inputs: one clear message, nothing written -------------------------------------------


def _copy_hf(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fails(capsys, argv, *fragments):
    rc = convert_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    out = Path(argv[argv.index("--out") + 1])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "not a DeepSeek-V3.2 checkpoint"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0}), "yarn"),
        (dict(norm_topk_prob=False), "norm_topk_prob"),
        (dict(num_experts_per_tok=6), "2 * topk_group"),
        (dict(q_lora_rank=None), "q_lora_rank"),
        (dict(index_head_dim=64), "shape"),
    ],
)
def test_from_hf_rejects(tiny, tmp_path, capsys, changes, fragment):
    bad = _copy_hf(tiny["hf"], tmp_path / "bad", **changes)
    _fails(capsys, ["from-hf", "--hf", str(bad), "--out", str(tmp_path / "out")], fragment)


def test_from_hf_missing_shard_and_wrong_size(tiny, tmp_path, capsys):
    bad = _copy_hf(tiny["hf"], tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (bad / victim).unlink()
    _fails(capsys, ["from-hf", "--hf", str(bad), "--out", str(tmp_path / "out")], "missing weight files", victim)
    _fails(capsys, ["from-hf", "--hf", str(tiny["hf"]), "--size", "small", "--out", str(tmp_path / "out")],
           "shape of size 'small'")


def test_to_hf_rejects(tiny, tmp_path, capsys):
    ckpt = str(tiny["ckpt"])
    _fails(capsys, ["to-hf", "--checkpoint", ckpt, "--size", "small", "--out", str(tmp_path / "o")],
           "does not match the model")
    _fails(capsys, ["to-hf", "--checkpoint", str(tmp_path), "--size", "tiny", "--out", str(tmp_path / "o")],
           "not a megatron checkpoint")
    _fails(capsys, ["to-hf", "--checkpoint", ckpt, "--size", "tiny", "--set", "dsa_indexer_topk_freq=2",
                    "--out", str(tmp_path / "o")], "dsa_indexer_topk_freq")
    _fails(capsys, ["to-hf", "--checkpoint", ckpt, "--size", "tiny", "--tokenizer", str(tmp_path / "none.model"),
                    "--out", str(tmp_path / "o")], "tokenizer file not found")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    rc = convert_main(["to-hf", "--checkpoint", ckpt, "--size", "tiny", "--out", str(tmp_path / "taken")])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "x").read_text() == "keep"


def test_failure_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    from megatron_dsa.convert import mapping

    calls = {"n": 0}
    real = mapping.to_hf_tensors

    def flaky(name, tensor):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk on fire")
        return real(name, tensor)

    monkeypatch.setattr(mapping, "to_hf_tensors", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_to_hf(tiny["ckpt"], tmp_path / "out", size="tiny", max_shard_size="50KB")
    assert calls["n"] == 20
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_conversion_error_is_value_error():
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ConversionError, match="cannot read the size"):
        export_to_hf("/nonexistent", "/tmp/x", max_shard_size="lots")
