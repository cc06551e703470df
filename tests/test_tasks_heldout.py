"""Retrieval items of the mixture's tasks (experiments.verify.suites.heldout: held-out formats
and training formats) and the exact-match scorer (retrieval.score_items) checked against
hand-made cases."""

from __future__ import annotations

import dataclasses
import inspect
import random
import re

import pytest

from experiments.verify.suites import HELDOUT_FACTORS, build_heldout_suite, build_task_suite, factor_families, score_items
from experiments.verify.suites.retrieval import RetrievalItem
from megatron_dsa.data.tasks import HELDOUT, TASKS, TRAIN, TRAIN_WIDE, Family, solve


class Chars:
    """One token per character: lossless on concatenation, like the corpus's tokenizer."""

    def tokenize(self, text):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(map(chr, ids))


TOK = Chars()
# natural text: this interpreter's own library source, as characters
FILLER = TOK.tokenize((inspect.getsource(random) + inspect.getsource(re)) * 8)


def _query_family(prompt_text: str):
    for family in (TRAIN, HELDOUT):
        for wordings in family.wordings.values():
            for w in wordings:
                literal = w.query.split("{key}")[-1]
                head = w.query.split("{key}")[0]
                if prompt_text.endswith(literal) and head in prompt_text[-200:]:
                    return family.name
    return None


def test_heldout_items_at_every_length_are_solvable_and_heldout():
    lengths = (4096, 8192, 16384, 32768)
    items = build_heldout_suite(TOK, FILLER, lengths, 2, train_length=16384, seed=random.randrange(1000))
    assert len(items) == len(lengths) * len(TASKS) * 2
    for item in items:
        assert len(item.tokens) == item.length
        assert item.extrapolation == (item.length > 16384)
        text = TOK.detokenize(item.prompt)
        # solved from the text alone, and the recorded answer agrees
        assert solve(text) == (item.task, item.value) == (item.task, TOK.detokenize(item.answer))
        assert _query_family(text) == "heldout"
        assert set(item.key) <= set(HELDOUT.key_alphabet)
        # the asked fact starts near its depth; the distractors are other answers
        assert abs(item.needle_spans[0][0] / item.length - item.depth) < 0.1
        assert item.value not in item.distractors


def test_training_format_items_are_solvable_in_the_training_formats():
    lengths = (4096, 16384)
    seed = random.randrange(1000)
    items = build_task_suite(TOK, FILLER, lengths, 2, train_length=16384, family=TRAIN, seed=seed)
    assert len(items) == len(lengths) * len(TASKS) * 2
    for item in items:
        assert len(item.tokens) == item.length
        text = TOK.detokenize(item.prompt)
        assert solve(text) == (item.task, item.value) == (item.task, TOK.detokenize(item.answer))
        assert _query_family(text) == "train"
        assert set(item.key) <= set(TRAIN.key_alphabet)
        assert abs(item.needle_spans[0][0] / item.length - item.depth) < 0.1
    # the held-out suite is the same builder with the held-out family: the same items as before
    heldout = build_heldout_suite(TOK, FILLER, lengths, 2, train_length=16384, seed=seed)
    assert [i.tokens for i in heldout] == [
        i.tokens for i in build_task_suite(TOK, FILLER, lengths, 2, train_length=16384, family=HELDOUT, seed=seed)]
    assert all(_query_family(TOK.detokenize(i.prompt)) == "heldout" for i in heldout)


@pytest.mark.parametrize("train", [TRAIN, TRAIN_WIDE], ids=lambda f: f.name)
def test_factor_families_change_one_difference_at_a_time(train):
    """``only <f>``: the training family with HELDOUT's fields of factor f and nothing else;
    ``all but <f>``: HELDOUT with the training family's fields of f; every field where the two
    families differ belongs to one factor; and each family's items are solvable from their text."""
    families = factor_families(train)
    assert (list(families)[0], list(families)[-1]) == ("training formats", "held-out formats")
    fields = [f.name for f in dataclasses.fields(Family) if f.name != "name"]

    def differ(a, b):
        return {f for f in fields if getattr(a, f) != getattr(b, f)}

    apart = differ(train, HELDOUT)
    assert apart and apart <= set().union(*HELDOUT_FACTORS.values())
    for factor, fs in HELDOUT_FACTORS.items():
        assert differ(families[f"only {factor}"], train) == set(fs) & apart, factor
        assert differ(families[f"all but {factor}"], HELDOUT) == set(fs) & apart, factor
    seed = random.randrange(1000)
    for label, family in families.items():
        items = build_task_suite(TOK, FILLER, (4096,), 1, train_length=4096, family=family, seed=seed)
        assert [i.task for i in items] == list(TASKS)
        alphabet = {c for first, rest in family.key_styles for c in first + rest}
        for item in items:
            text = TOK.detokenize(item.prompt)
            assert solve(text) == (item.task, item.value) == (item.task, TOK.detokenize(item.answer)), label
            assert set(item.key) <= alphabet, label


def test_heldout_suite_rejects_bad_input():
    with pytest.raises(ValueError, match="too few"):
        build_heldout_suite(TOK, FILLER[:1000], (4096,), 1, train_length=4096)
    with pytest.raises(ValueError, match="n_per"):
        build_heldout_suite(TOK, FILLER, (4096,), 0, train_length=4096)


def _item(prompt: str, answer: str, length_extra: str = "", depth: float = 0.5, extrapolation=False):
    p, a = TOK.tokenize(prompt + length_extra), TOK.tokenize(answer)
    return RetrievalItem("multikey", len(p) + len(a), depth, p, a, "K", answer, [(0, 1)], ["70113"],
                         extrapolation=extrapolation)


def _predictor(answers: dict[int, str], shift: int = 0):
    """A model that, at the position before each item's answer, emits the given text (teacher
    forced: position t predicts token t + 1), ``shift`` positions late; elsewhere token 0."""
    def predict(seqs):
        out = []
        for seq in seqs:
            pred = [0] * len(seq)
            text = answers[len(seq)]
            start = len(seq) - len(text) - 1 + shift
            for j, t in enumerate(TOK.tokenize(text)):
                if 0 <= start + j < len(seq):
                    pred[start + j] = t
            out.append(pred)
        return out
    return predict


def test_scorer_on_hand_made_cases():
    context = "filler\n<entry name=\"K\" val=\"70113\"/>\nmore filler\n<entry name=\"Q\" val=\"52640\"/>\n"
    item = _item(context + '<lookup name="Q"/> yields ', "52640")
    n = item.length
    right = score_items([item], _predictor({n: "52640"}))
    assert right["items"][0]["exact"] and right["by_length"][n]["exact"] == 100.0
    # read one position late (off by one in the scorer or the model): no match
    late = score_items([item], _predictor({n: "52640"}, shift=1))
    assert not late["items"][0]["exact"] and late["by_length"][n]["exact"] == 0.0
    # one digit off: not exact, 4 of 5 tokens right
    digit = score_items([item], _predictor({n: "52641"}))
    assert not digit["items"][0]["exact"] and digit["items"][0]["token_acc"] == pytest.approx(0.8)
    # the value at the wrong depth (the other key's, earlier in the context): no match, and
    # it shares no token position with the answer
    wrong = score_items([item], _predictor({n: "70113"}))
    assert not wrong["items"][0]["exact"] and wrong["by_length"][n]["exact"] == 0.0


def test_scorer_groups_by_length_and_marks_extrapolation():
    short = _item("ctx ", "11111")
    long = _item("a longer context ", "22222", extrapolation=True)
    both = score_items([short, long], _predictor({short.length: "11111", long.length: "22229"}))
    assert both["by_length"][short.length] == {**both["by_length"][short.length], "exact": 100.0, "extrapolation": False}
    assert both["by_length"][long.length]["exact"] == 0.0 and both["by_length"][long.length]["extrapolation"]
