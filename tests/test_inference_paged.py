"""The paged cache in the engine: a ragged batch equals each sequence alone and the full forward,
FP8 keys keep the greedy tokens, and a step the cache cannot hold stops with one error before
any compute. The graphed decode step equals the eager one on a GPU."""

from __future__ import annotations

import pytest
import torch

from megatron_dsa.inference import CacheError, DSAInference, full_forward_logits
from megatron_dsa.model import build_model, model_config

TOPK = 8


@pytest.fixture(scope="module")
def model(megatron_world):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    m = build_model("tiny", model_config("tiny", dsa_indexer_topk=TOPK, mdsa_mode="sparse"), max_seq_len=40).eval()
    return m.cuda() if torch.cuda.is_available() else m


def test_ragged_batch_equals_each_sequence_and_the_full_forward(model, seed):
    # Three sequences of different lengths (one shorter than top-k) share a small block pool;
    # each decode step advances all three, each at its own position.
    engine = DSAInference(model, "sparse", indexer_keys="fp32", block_size=4, prefill_chunk=5)
    lengths = [11, 3, 9]
    steps = 4
    seqs = [torch.randint(0, 512, (n + steps,)) for n in lengths]
    cache = engine.new_cache(max_sequences=3, max_length=24)
    logits = [[] for _ in seqs]
    for s, tokens in enumerate(seqs):
        assert cache.add_sequence() == s
        logits[s].append(engine.prefill_sequence(tokens[: lengths[s]], cache, s))
    for t in range(steps):
        step = engine.decode(torch.stack([tokens[lengths[s] + t] for s, tokens in enumerate(seqs)]), cache)
        for s in range(3):
            logits[s].append(step[s : s + 1])
    assert cache.host_lengths == [n + steps for n in lengths]
    for s, tokens in enumerate(seqs):
        got = torch.cat(logits[s])
        full = full_forward_logits(model, tokens[None], "sparse")[0].to(got.device)
        assert (got - full).abs().max().item() < 1e-5
        assert torch.equal(got.argmax(-1), full.argmax(-1))


def test_fp8_indexer_keys_decode_equals_prefill_over_the_same_keys(model, seed):
    # FP8 keys change the scores (an untrained indexer's near-ties, so the tokens may differ
    # from fp32 keys); the decode path and the prefill through the core read the same stored
    # keys and must agree. The stored keys are the fp32 keys within e4m3's rounding.
    tokens = torch.randint(0, 512, (1, 16))
    engine = DSAInference(model, "sparse", indexer_keys="fp8", block_size=4)
    whole, cache = engine.prefill(tokens)
    logits, cache_steps = engine.prefill(tokens[:, :5])
    steps = [logits]
    for t in range(5, tokens.shape[1]):
        steps.append(engine.step(tokens[:, t : t + 1], cache_steps))
    assert (torch.cat(steps, dim=1) - whole).abs().max().item() < 1e-5
    assert cache.keys[0].dtype == torch.float8_e4m3fn and cache.key_scales[0].shape == cache.keys[0].shape[:2]
    exact = DSAInference(model, "sparse", indexer_keys="fp32", block_size=4).prefill(tokens)[1]
    _, fp8_keys = cache.rows(0, 0, 16)
    _, fp32_keys = exact.rows(0, 0, 16)
    amax = fp32_keys.abs().amax(-1, keepdim=True)
    assert ((fp8_keys - fp32_keys).abs() <= amax / 16 + 1e-6).all() and not torch.equal(fp8_keys, fp32_keys)


def test_out_of_blocks_stops_before_any_compute(model, monkeypatch):
    engine = DSAInference(model, "sparse", block_size=4)
    cache = engine.new_cache(max_sequences=2, num_blocks=5)
    for _ in range(2):
        cache.add_sequence()
    engine.prefill_sequence(torch.arange(10), cache, 0)  # 3 blocks
    engine.prefill_sequence(torch.arange(8), cache, 1)  # 2 blocks: the pool is full
    before = [t.clone() for t in cache.kv]
    monkeypatch.setattr(engine, "decode_step", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(CacheError, match="out of cache blocks: this step needs 1 more blocks of 4 tokens, 0 of 5"):
        engine.decode(torch.tensor([1, 2]), cache)  # sequence 1 needs a third block
    assert cache.host_lengths == [10, 8] and all(torch.equal(a, b) for a, b in zip(before, cache.kv))
    monkeypatch.undo()
    engine.decode(torch.tensor([1]), cache, seqs=[0])  # sequence 0's last block has room: fine
    cache.release(1)
    assert cache.free_blocks() == 2


def test_beyond_the_models_max_length_stops_before_any_compute(model, monkeypatch):
    engine = DSAInference(model, "dense", block_size=8)
    assert engine.max_length == 40
    _, cache = engine.prefill(torch.randint(0, 512, (1, 39)))
    monkeypatch.setattr(engine, "_prefill_attention", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(CacheError, match="position 40 is beyond the model's maximum length 40"):
        engine.step(torch.randint(0, 512, (1, 2)), cache)
    with pytest.raises(CacheError, match="position 44 is beyond the model's maximum length 40"):
        engine.prefill(torch.randint(0, 512, (1, 45)))
    with pytest.raises(CacheError, match="position 12 is beyond this cache's maximum length 12"):
        engine.prefill(torch.randint(0, 512, (1, 13)), capacity=12)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_graph_safe_step_equals_the_eager_step(model, mode):
    """The step a CUDA graph captures (every expert as two products over the stacked expert
    weights, no host reads) equals the eager step (only the routed experts), on any device."""
    engine = DSAInference(model, mode, indexer_keys="fp32", block_size=4)
    tokens = torch.randint(0, 512, (3, 9))
    _, cache = engine.prefill(tokens)
    for _ in range(3):
        seqs = torch.arange(3, device=engine.device)
        nxt = torch.randint(0, 512, (3,), device=engine.device)
        cache.reserve([0, 1, 2], [1, 1, 1])
        cache.advance([0, 1, 2], [1, 1, 1])
        with torch.no_grad():
            eager = engine.decode_step(nxt, seqs, cache, graphed=False)
            safe = engine.decode_step(nxt, seqs, cache, graphed=True)
        assert torch.isfinite(safe).all()
        assert (safe - eager).abs().max().item() <= 1e-5 * max(1.0, eager.abs().max().item())
    assert engine._expert_stacks  # the MoE layers ran the stacked path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_are_refused_without_cuda(model):
    with pytest.raises(RuntimeError, match="cuda_graphs=True needs the model on a CUDA device; it is on cpu"):
        DSAInference(model, "sparse", kernel="triton", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_graphed_decode_equals_eager(model, mode):
    tokens = torch.randint(0, 512, (3, 7), device="cuda")
    eager = DSAInference(model, mode, kernel="triton", indexer_keys="fp32", block_size=4)
    graphed = DSAInference(model, mode, kernel="triton", indexer_keys="fp32", block_size=4, cuda_graphs=True)
    want, got = eager.generate(tokens, 12), graphed.generate(tokens, 12)
    assert torch.equal(got, want)
    _, c1 = eager.prefill(tokens)
    _, c2 = graphed.prefill(tokens)
    nxt = tokens[:, -1]
    for _ in range(4):  # batch 3 runs the bucket of 4
        a, b = eager.decode(nxt, c1), graphed.decode(nxt, c2)
        assert (a - b).abs().max().item() < 1e-4
        nxt = a.argmax(-1)


def test_indexer_keys_default_to_how_the_model_scores(model):
    """Without a choice the cache keeps indexer keys as the model was trained to score them:
    the fp32 tiny model (no FP8 indexer) caches fp32 keys, so decoding matches transformers."""
    assert not model.config.dsa.fp8_indexer
    assert DSAInference(model, "sparse").indexer_keys == "fp32"
    assert DSAInference(model, "sparse", indexer_keys="fp8").indexer_keys == "fp8"
