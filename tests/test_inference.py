"""Prefill + decode with the latent KV cache equals the model's own full forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_dsa import reference as R
from megatron_dsa.inference import DSAInference, full_forward_logits
from megatron_dsa.model import build_model, model_config, resolve_size

TOPK = 8


@pytest.fixture(scope="module")
def model(megatron_world):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    m = build_model("tiny", model_config("tiny", dsa_indexer_topk=TOPK, mdsa_mode="sparse")).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
    return m


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_decode_equals_full_forward(model, seed, mode):
    tokens = torch.randint(0, 512, (2, 26))
    full = full_forward_logits(model, tokens, mode)
    engine = DSAInference(model, mode, indexer_keys="fp32", block_size=4, prefill_chunk=3)
    logits, cache = engine.prefill(tokens[:, :5])  # prompt shorter than top-k (two chunks), decode past it
    steps = [logits]
    for t in range(5, tokens.shape[1]):
        steps.append(engine.step(tokens[:, t : t + 1], cache))
    decoded = torch.cat(steps, dim=1)
    assert cache.host_lengths == [26, 26]
    assert cache.kv[0].shape[1:] == (4, 32 + 16)
    assert (cache.keys[0] is not None) == (mode == "sparse")
    assert (decoded - full).abs().max().item() < 1e-5
    assert torch.equal(decoded.argmax(-1), full.argmax(-1))
    prefill_all, _ = engine.prefill(tokens)  # a long prefill (past top-k) too
    assert (prefill_all - full).abs().max().item() < 1e-5


def test_sparse_decode_differs_from_dense_past_topk(model):
    tokens = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    sparse, _ = DSAInference(model, "sparse", indexer_keys="fp32").prefill(tokens)
    dense, _ = DSAInference(model, "dense").prefill(tokens)
    diff = (sparse - dense).abs().amax(dim=(0, 2))
    assert diff[:TOPK].max() < 1e-5  # fewer cached keys than k: every key is selected
    assert diff[TOPK:].max() > 1e-3


def test_each_decode_step_selects_min_k_cached(model, monkeypatch):
    seen = []
    real = R.indexer_topk

    def spy(q, k, w, topk, **kwargs):
        out = real(q, k, w, topk, **kwargs)
        seen.append((k.shape[1], int((out[:, -1] >= 0).sum(-1).max())))
        return out

    def paged_spy(q, w, key_pool, key_scales, block_table, lengths, topk, **kwargs):
        out = real_paged(q, w, key_pool, key_scales, block_table, lengths, topk, **kwargs)
        seen.append((int(lengths.max()), int((out >= 0).sum(-1).max())))
        return out

    real_paged = R.paged_indexer_topk
    monkeypatch.setattr(R, "indexer_topk", spy)
    monkeypatch.setattr(R, "paged_indexer_topk", paged_spy)
    engine = DSAInference(model, "sparse")
    engine.generate(torch.randint(0, 512, (1, 3)), 12)
    selecting = sum(core.selects for core in engine.cores)
    # the prefill scores its 3 keys, then each of the 11 decode steps one more
    assert [n for n, _ in seen[::selecting]] == list(range(3, 3 + 12))
    assert all(sel == min(TOPK, n) for n, sel in seen)


def test_generate_cli(megatron_world, tmp_path, capsys):
    from megatron_dsa.convert import save_model_checkpoint
    from megatron_dsa.data import SentencePieceTokenizer
    from megatron_dsa.inference.__main__ import main
    from megatron_dsa.data.corpus import train_tokenizer

    torch.manual_seed(4)
    m = build_model("tiny", model_config("tiny", dsa_indexer_topk=TOPK)).eval()
    save_model_checkpoint(m, tmp_path / "ckpt", resolve_size("tiny"))
    tok_path = tmp_path / "tok.model"
    sources = [p.read_text() for p in sorted((Path(__file__).parents[1] / "megatron_dsa").rglob("*.py"))]
    tok_path.write_bytes(train_tokenizer(sources, 512))
    prompt = "def forward(self, x):"
    rc = main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--size", "tiny", "--set", f"dsa_indexer_topk={TOPK}",
               "--tokenizer", str(tok_path), "--prompt", prompt, "--max-new-tokens", "12", "--show-ids"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    tok = SentencePieceTokenizer(tok_path)
    ids = torch.tensor([tok.tokenize(prompt)])
    want = DSAInference(m, "sparse").generate(ids, 12, eos_id=tok.eos)[0].tolist()
    assert f"new ids: {want}" in out.err
    assert out.out == tok.detokenize(want) + "\n"


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_triton_kernels_in_the_engine_equal_the_full_forward(model, seed, mode):
    # The engine's ops with absolute positions (new queries against cached keys) on the Triton
    # backend, through the interpreter on CPU: what `bench_inference.py --kernel auto` runs on a GPU.
    tokens = torch.randint(0, 512, (2, 14))
    full = full_forward_logits(model, tokens, mode)
    engine = DSAInference(model, mode, kernel="triton", indexer_keys="fp32", block_size=8)
    logits, cache = engine.prefill(tokens[:, :5])
    steps = [logits] + [engine.step(tokens[:, t : t + 1], cache) for t in range(5, tokens.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_moe_runs_only_the_routed_experts(model, seed, monkeypatch):
    # megatron-core's SequentialMLP runs all experts; the engine runs the ones the router picked
    # (the same router, expert modules and combine) and still equals the full forward.
    from megatron.core.transformer.moe.experts import SequentialMLP

    tokens = torch.randint(0, 512, (1, 12))
    full = full_forward_logits(model, tokens, "sparse")
    calls = []
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, SequentialMLP):
            for e, expert in enumerate(experts.local_experts):
                monkeypatch.setattr(expert, "forward", (lambda f, e: lambda *a, **k: calls.append(e) or f(*a, **k))(
                    expert.forward, e))
    monkeypatch.setattr(SequentialMLP, "forward", lambda *a, **k: pytest.fail("SequentialMLP.forward ran"))
    engine = DSAInference(model, "sparse", indexer_keys="fp32")
    logits, cache = engine.prefill(tokens[:, :11])
    calls.clear()
    step = engine.step(tokens[:, 11:], cache)  # one token: top-4 of 8 experts per MoE layer
    n_moe = sum(isinstance(getattr(layer.mlp, "experts", None), SequentialMLP) for layer in model.decoder.layers)
    assert n_moe > 0 and len(calls) == 4 * n_moe
    assert (torch.cat([logits, step], dim=1) - full).abs().max().item() < 1e-5
