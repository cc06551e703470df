"""megatron-dsa checkpoints <-> Hugging Face DeepseekV32ForCausalLM (transformers, no custom code).

Most models here have tie-free indexer weights (each odd indexer head is the negation of the
previous one, so ReLU never zeroes a key's score for every head). ReLU makes exact ties common
otherwise (every head's q.k <= 0 gives a score of exactly 0); our top-k keeps the smaller
index on ties, transformers' ``torch.topk`` promises no order. The ``tied`` models keep those
ties: they match transformers exactly once its indexer's top-k is stable
(``hf_indexer_topk(stable=True)``), and with its own top-k they differ only from the first row
whose k-th and (k+1)-th scores tie (reported when they do).
"""

from __future__ import annotations

import glob
import json
import shutil
from contextlib import contextmanager
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
def randomize_hf_(model) -> None:
    """A transformers model's norms, biases and router bias random (its init leaves them at 1 / 0,
    where a mapping mistake would not show) and its indexer tie-free."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
        if name.endswith("indexer.wq_b.weight"):
            untie_indexer_(p, model.config.index_n_heads)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.1)


@torch.no_grad()
def randomize_tiny(model, untie: bool = True) -> None:
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.2)
        if name.endswith("bias"):
            p.normal_(0.0, 0.2)
        if untie and name.endswith("indexer.wq_b.weight"):
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
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
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


@contextmanager
def hf_indexer_topk(stable: bool, ties: list | None = None):
    """transformers' indexer with a stable top-k (ties to the smaller index, our rule) or its
    own; ``ties`` collects (layer, batch, row) of every row whose k-th and (k+1)-th eligible
    scores are equal, i.e. where the selection depends on the tie rule."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_module

    inside = {}
    forward, topk = hf_module.DeepseekV32Indexer.forward, torch.Tensor.topk

    def indexer_forward(self, *args, **kwargs):
        inside["layer"] = self.layer_idx
        try:
            return forward(self, *args, **kwargs)
        finally:
            inside.pop("layer")

    def tensor_topk(scores, k, dim=-1, largest=True, sorted=True):
        if "layer" not in inside:
            return topk(scores, k, dim, largest, sorted)
        assert dim in (-1, scores.dim() - 1) and largest
        ordered, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        if ties is not None and scores.shape[-1] > k:
            eligible = torch.isfinite(scores).sum(-1)
            tied = (ordered[..., k - 1] == ordered[..., k]) & (eligible > k)
            first_row = scores.shape[-1] - scores.shape[-2]  # decode: the queries are the last rows
            for b, t in tied.nonzero().tolist():
                ties.append((inside["layer"], b, first_row + t))
        if stable:
            return torch.return_types.topk((ordered[..., :k], order[..., :k]))
        return topk(scores, k, dim, largest, sorted)

    hf_module.DeepseekV32Indexer.forward = indexer_forward
    torch.Tensor.topk = tensor_topk
    try:
        yield ties
    finally:
        hf_module.DeepseekV32Indexer.forward = forward
        torch.Tensor.topk = topk


@pytest.fixture(scope="module", params=[2, 3], ids=["2-indexer-heads", "3-indexer-heads"])
def tied(request, megatron_world, tmp_path_factory):
    """A randomised tiny model whose indexer scores tie (plain random indexer weights: ReLU
    zeroes every head's score for ~1 in 4 (2 heads) or 8 (3 heads) keys), exported to HF."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    heads = request.param
    root = tmp_path_factory.mktemp(f"tied{heads}")
    torch.manual_seed(heads)
    model_parallel_cuda_manual_seed(heads)
    overrides = dict(dsa_indexer_topk=TOPK, dsa_indexer_n_heads=heads)
    model = build_model("tiny", model_config("tiny", mdsa_mode="sparse", **overrides)).eval()
    randomize_tiny(model, untie=False)
    save_model_checkpoint(model, root / "ckpt", resolve_size("tiny"))
    rc = convert_main(["to-hf", "--checkpoint", str(root / "ckpt"), "--size", "tiny", "--out", str(root / "hf"),
                       *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]])
    assert rc == 0
    return dict(model=model, hf=root / "hf", heads=heads)


@pytest.mark.parametrize("seq", [40, 116])
def test_hf_logits_with_tied_scores(tied, seq):
    """Tied indexer scores: equal to transformers with a stable top-k on its side; with its own
    top-k, any difference starts at or after a row whose k-th and (k+1)-th scores tie."""
    hf = hf_model(tied["hf"])
    tokens = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(seq))
    ours = our_logits(tied["model"], tokens, "sparse")
    ties: list = []
    with torch.no_grad(), hf_indexer_topk(stable=True, ties=ties):
        stable = hf(tokens).logits.float()
    assert ties, "the model has no tied rows: this test would compare nothing new"
    assert (ours - stable).abs().max().item() < 1e-4, (ours - stable).abs().max().item()
    with torch.no_grad(), hf_indexer_topk(stable=False):
        default = hf(tokens).logits.float()
    differs = ((ours - default).abs().amax(-1) > 1e-4).nonzero().tolist()
    first_tie = {b: min(t for _, bb, t in ties if bb == b) for _, b, _ in ties}
    print(f"{tied['heads']} heads, {seq} tokens: {len(set(ties))} tied rows, first per sequence "
          f"{first_tie}; max difference {(ours - stable).abs().max().item():.1e} with a stable top-k, "
          f"{(ours - default).abs().max().item():.1e} in {len(differs)} rows with transformers' own")
    unexplained = [(b, t) for b, t in differs if t < first_tie.get(b, seq)]
    assert not unexplained, (f"rows {unexplained} differ before any tie; tied (layer, batch, row): "
                             f"{sorted(set(ties))[:20]}")


def test_greedy_generation_with_tied_scores_matches_stable_hf(tied):
    from transformers import GenerationConfig

    from megatron_dsa.inference import DSAInference

    hf = hf_model(tied["hf"])
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    n = 42  # past where the default top-k's generation departed (17-36 tokens)
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    ties: list = []
    with torch.no_grad(), hf_indexer_topk(stable=True, ties=ties):
        theirs = hf.generate(prompt, generation_config=gen)[0, prompt.shape[1]:]
    assert ties
    ours = DSAInference(tied["model"], "sparse").generate(prompt, n)[0]
    assert theirs.tolist() == ours.tolist()


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


def foreign_hf_model(path: Path, **changes):
    """A DeepSeek-V3.2-shaped model this project did not write (random, transformers' own init)."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(5)
    cfg = DeepseekV32Config(**{**dict(
        vocab_size=300, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=4, n_group=2, topk_group=2, routed_scaling_factor=1.5, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, index_n_heads=4,
        index_head_dim=16, index_topk=6, first_k_dense_replace=2, max_position_embeddings=256,
        rope_theta=5000.0, initializer_range=0.1,
    ), **changes})
    model = DeepseekV32ForCausalLM(cfg).eval()
    randomize_hf_(model)
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
    # ... and keeps the special token ids (no --tokenizer: from-hf recorded them).
    cfg2 = json.loads((tmp_path / "hf2" / "config.json").read_text())
    gen2 = json.loads((tmp_path / "hf2" / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        assert cfg2[key] == getattr(hf.config, key) is not None and gen2[key] == cfg2[key], key


def test_import_indexer_head_dim_not_a_power_of_two(megatron_world, tmp_path):
    """transformers accepts index_head_dim 48; only our Hadamard rotation wanted a power of two."""
    hf = foreign_hf_model(tmp_path / "hf", index_head_dim=48)
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _ = load_model(tmp_path / "ckpt", mdsa_mode="sparse")
    assert model.config.dsa.head_dim == 48
    tokens = torch.randint(0, 300, (2, 25), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits.float()
    assert (our_logits(model.eval(), tokens, "sparse") - theirs).abs().max().item() < 1e-4


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
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "unsupported model: model_type='llama'"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0}),
         "YaRN rope_parameters without original_max_position_embeddings"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "'linear'"),
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


class _Payload:
    """Unpickling this creates ``path``: what a crafted checkpoint could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _damaged_checkpoint(tiny, tmp_path, how: str, payload: Path) -> Path:
    import pickle

    from megatron.core import dist_checkpointing

    ckpt = tmp_path / "ckpt"
    if how == "crafted stored object":
        # A real checkpoint whose common state holds an object that runs code when unpickled.
        sub = ckpt / "iter_0000000"
        sub.mkdir(parents=True)
        dist_checkpointing.save({"model": tiny["model"].sharded_state_dict(), "x": _Payload(payload)}, str(sub))
        (ckpt / "latest_checkpointed_iteration.txt").write_text("0")
        return ckpt
    shutil.copytree(tiny["ckpt"], ckpt)
    sub = ckpt / "iter_0000000"
    meta, shard = sub / ".metadata", next(sub.glob("*.distcp"))
    if how == "truncated .metadata":
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    elif how == "truncated .distcp":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "crafted .metadata":
        meta.write_bytes(pickle.dumps({"state": _Payload(payload)}))
    return ckpt


_DAMAGE = [
    ("truncated .metadata", (".metadata is corrupt", "truncated")),
    ("truncated .distcp", ("__0_0.distcp is truncated",)),
    ("crafted .metadata", ("refusing to open checkpoint", ".metadata names _io.open")),
    ("crafted stored object", ("a stored object names _io.open", "refused")),
]


@pytest.mark.parametrize("how, fragments", _DAMAGE)
def test_to_hf_of_a_damaged_or_crafted_checkpoint(tiny, tmp_path, capsys, how, fragments):
    """One error line naming the file, nothing written; a crafted checkpoint's payload (here:
    creating a file) does not run."""
    payload = tmp_path / "payload-ran"
    ckpt = _damaged_checkpoint(tiny, tmp_path, how, payload)
    _fails(capsys, ["to-hf", "--checkpoint", str(ckpt), "--size", "tiny", "--out", str(tmp_path / "out")], *fragments)
    assert not payload.exists()


@pytest.mark.parametrize("how, fragments", _DAMAGE[2:])
def test_generate_and_load_model_refuse_crafted_checkpoints(tiny, tmp_path, capsys, how, fragments):
    from megatron_dsa.inference.__main__ import main as generate_main

    payload = tmp_path / "payload-ran"
    ckpt = _damaged_checkpoint(tiny, tmp_path, how, payload)
    with pytest.raises(ConversionError, match=fragments[0]):
        load_model(ckpt, size="tiny")
    capsys.readouterr()  # what the direct call printed
    rc = generate_main(["generate", "--checkpoint", str(ckpt), "--size", "tiny", "--tokenizer", str(tiny["tok"]),
                        "--prompt", "def ", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and fragments[0] in err, err
    assert not payload.exists()


def test_out_that_is_or_holds_the_input_is_refused(tiny, tmp_path, capsys):
    """--overwrite with --out equal to (or above) the input would delete the source."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf)
    before = sorted(p.name for p in hf.iterdir())
    for out in (hf, tmp_path):
        rc = convert_main(["from-hf", "--hf", str(hf), "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and "would replace it" in err, err
    rc = convert_main(["to-hf", "--checkpoint", str(tiny["ckpt"]), "--size", "tiny", "--out", str(tiny["ckpt"]),
                       "--overwrite"])
    assert rc == 2 and "would replace it" in capsys.readouterr().err
    assert sorted(p.name for p in hf.iterdir()) == before and (tiny["ckpt"] / "iter_0000000" / ".metadata").is_file()


def test_failure_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    from megatron_dsa.convert import mapping

    calls = {"n": 0}
    real = mapping.to_hf_tensors

    def flaky(name, tensor, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk on fire")
        return real(name, tensor, *args)

    monkeypatch.setattr(mapping, "to_hf_tensors", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_to_hf(tiny["ckpt"], tmp_path / "out", size="tiny", max_shard_size="50KB")
    assert calls["n"] == 20
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_conversion_error_is_value_error():
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ConversionError, match="cannot read the size"):
        export_to_hf("/nonexistent", "/tmp/x", max_shard_size="lots")
