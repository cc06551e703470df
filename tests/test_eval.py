"""The retrieval suite and the loss-at-lengths helper (experiments.verify.suites)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from experiments.verify.suites import build_items, build_suite, score_items
from experiments.verify.suites.loss import plan_total
from experiments.verify.suites.retrieval import TASKS, FillerPool, synthetic_python


class ByteTokenizer:
    """One token per byte: lengths and positions are easy to reason about."""

    vocab_size = 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_items_have_needle_at_depth_and_right_answer(task, length):
    pool = FillerPool(TOK, None, min_tokens=2 * length)
    depths = [0.1, 0.5, 0.9]
    items = build_items(task, length, 3, TOK, pool, seed=7, depths=depths)
    for item, depth in zip(items, depths):
        assert len(item.tokens) == length  # prompt + answer, exactly as requested
        assert item.answer == TOK.tokenize(item.value)
        start, end = item.needle_spans[0]
        needle = TOK.detokenize(item.prompt[start:end])
        assert item.key in needle and item.value in needle
        assert _contains(item.prompt[start:end], item.answer)
        # the asked needle sits at the requested depth of the prompt (within a needle's length)
        slack = (end - start) / len(item.prompt) + 0.02
        assert abs(start / len(item.prompt) - depth) <= slack, (start, len(item.prompt), depth)
        # the query names the key and comes last; the value occurs in the prompt only in the needle
        tail = TOK.detokenize(item.prompt[-80:])
        assert item.key in tail and tail.rstrip().endswith("'")
        assert TOK.detokenize(item.prompt).count(item.value) == 1
        if task != "single":
            assert item.distractors and item.value not in item.distractors


def test_multikey_distractors_are_in_the_haystack():
    pool = FillerPool(TOK, None, min_tokens=8192)
    (item,) = build_items("multikey", 4096, 1, TOK, pool, num_keys=4)
    text = TOK.detokenize(item.prompt)
    assert len(item.distractors) == 3 and all(v in text for v in item.distractors)
    assert len(item.needle_spans) == 4


def test_haystack_from_texts_and_too_short_length():
    texts = [synthetic_python(random.Random(i), 50) for i in range(20)]
    items = build_suite(TOK, [2048], 2, texts=texts)
    assert {i.task for i in items} == set(TASKS) and all(len(i.tokens) == 2048 for i in items)
    with pytest.raises(ValueError, match="too short"):
        build_items("multikey", 40, 1, TOK, FillerPool(TOK, None, 100))


def _oracle(seqs):
    return [s[1:] + [0] for s in seqs]  # the true next token everywhere


def test_oracle_scores_100_and_random_scores_chance():
    items = build_suite(TOK, [512, 1024], 4, seed=3)
    oracle = score_items(items, _oracle)
    assert all(v["exact"] == 100.0 and v["token"] == 100.0 for v in oracle["by_length"].values())
    assert set(oracle["by_task_length"]) == set(TASKS)
    rng = random.Random(0)
    rand = score_items(items, lambda seqs: [[rng.randrange(256) for _ in s] for s in seqs])
    # chance: exact match 256^-6 ~ 0, token accuracy 1/256
    assert all(v["exact"] == 0.0 and v["token"] < 10.0 for v in rand["by_length"].values())
    # an oracle off by one token id everywhere: no exact matches
    shifted = score_items(items, lambda seqs: [[t + 1 for t in s] for s in _oracle(seqs)])
    assert all(v["exact"] == 0.0 for v in shifted["by_length"].values())


def test_plan_total_is_common_multiple():
    assert plan_total(10_000, [64, 128, 256]) == 9984
    assert plan_total(10_000, [64, 128, 256], max_total=1000) == 768
    with pytest.raises(ValueError):
        plan_total(100, [256])


def test_loss_at_lengths_on_tiny_model(megatron_world):
    from experiments.verify.suites import validation_loss_at_lengths
    from megatron_dsa.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    stream = torch.randint(0, 512, (1100,))
    out = validation_loss_at_lengths(model, stream, [64, 256], "dense", max_total=1024)
    assert set(out) == {64, 256} and all(math.isfinite(v) for v in out.values())
    # direct computation for L = 256: 4 windows, mean cross-entropy over the same 1024 targets
    x, y = stream[:1024].view(4, 256), stream[1:1025].view(4, 256)
    with torch.no_grad():
        logits = model(x, torch.arange(256)[None].expand(4, -1), None).float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert out[256] == pytest.approx(ref, rel=1e-4)
    # an untrained model is near uniform over the 512-token vocabulary
    assert abs(out[64] - math.log(512)) < 1.0
    sparse = validation_loss_at_lengths(model, stream, [256], "sparse", max_total=1024)
    assert math.isfinite(sparse[256]) and model.config.mdsa_mode == "dense"


def test_answer_log_likelihood_reads_the_answer_positions():
    items = build_suite(TOK, [512], 2, seed=5)
    # log-prob of next token at position t = -t / 1000: the answer's mean NLL is the mean of
    # (p - 1 .. p + n - 2) / 1000, which tells an off-by-one apart
    res = score_items(items, lambda seqs: (_oracle(seqs), [[-t / 1000 for t in range(len(s) - 1)] for s in seqs]))
    for item, r in zip(items, res["items"]):
        p, n = len(item.prompt), len(item.answer)
        assert r["answer_nll"] == pytest.approx(sum(range(p - 1, p - 1 + n)) / n / 1000)
    mean = sum(r["answer_nll"] for r in res["items"]) / len(items)
    assert res["by_length"][512]["nll"] == pytest.approx(mean)
    # a predictor without log-probabilities: no NLL, never a made-up number
    assert score_items(items, _oracle)["by_length"][512]["nll"] is None


def test_model_predictor_log_probs_equal_a_direct_log_softmax(megatron_world, monkeypatch):
    from experiments.verify.suites import model_predictor
    from experiments.verify.suites import retrieval
    from megatron_dsa.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    seqs = torch.randint(0, 512, (2, 11))
    monkeypatch.setattr(retrieval, "LOGPROB_CHUNK", 3)  # several slices, the last one short
    argmax, logp = model_predictor(model, "dense")(seqs.tolist())
    with torch.no_grad():
        logits = model(seqs, torch.arange(11)[None].expand(2, -1), None).float()
    want = torch.log_softmax(logits, -1)[:, :-1].gather(-1, seqs[:, 1:, None]).squeeze(-1)
    assert torch.tensor(logp).shape == (2, 10)
    assert torch.allclose(torch.tensor(logp), want, atol=1e-5)
    assert argmax == logits.argmax(-1).tolist()
