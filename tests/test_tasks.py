"""The task mixture: synthetic long-range tasks in natural text (megatron_dsa.data.tasks,
megatron_dsa.data.mixture), the solver that reads them back, and the trainer's corpus option."""

from __future__ import annotations

import dataclasses

import random
import re

import numpy
import pytest
import torch

from megatron_dsa.data import (
    DataError,
    build_gpt_datasets,
    build_task_corpus,
    check_corpus_for_run,
    load_tokenizer,
    read_answer_mask,
    read_split_tokens,
)
from megatron_dsa.data.tasks import (FAMILIES, HELDOUT, TASKS, TRAIN, TRAIN_VARIED, TRAIN_WIDE, TaskError, _key_re, solve,
                                    task_text)
from megatron_dsa.train.config import TrainConfigError, load_config

SEQ = 512


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text corpus whose held-out split holds a few documents of SEQ tokens."""
    from megatron_dsa.data import build_corpus

    out = tmp_path_factory.mktemp("text") / "c"
    build_corpus(out, None, 512, max_bytes=200_000, valid_fraction=0.3)
    return out


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus)


@pytest.fixture(scope="module")
def text(corpus):
    """Natural text tokens (the corpus's train split), repeated up to 40K tokens."""
    stream = read_split_tokens(corpus, "train").tolist()
    return (stream * (1 + 40_000 // len(stream)))[:40_000]


@pytest.fixture(scope="module")
def mixture(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks") / "mix"
    build_task_corpus(out, corpus, SEQ, ratio=0.6, seed=3)
    return out


def _solve_all(tok, t):
    """Every query of a task text, solved from the decoded text before its answer."""
    for q in t.queries:
        assert solve(tok.detokenize(t.tokens[:q.start])) == (t.task, q.answer)
        assert tok.detokenize(t.tokens[q.start:q.end]) == q.answer


@pytest.mark.parametrize("family", [TRAIN, HELDOUT, TRAIN_WIDE], ids=lambda f: f.name)
@pytest.mark.parametrize("task", TASKS)
def test_every_text_is_solvable_from_the_text_alone(tok, text, family, task):
    rng = random.Random(f"{family.name}{task}{random.random()}")
    for length, queries in ((1024, 1), (16384, 8)):  # a training document at long context
        start = rng.randrange(0, len(text) - length)
        t = task_text(task, family, length, text[start:start + length], tok, rng, queries=queries)
        assert len(t.tokens) == len(t.answer_mask) == length and len(t.queries) == queries
        _solve_all(tok, t)
        # the mask marks the answers' tokens, nothing else
        marked = {i for i, m in enumerate(t.answer_mask) if m}
        assert marked == {i for q in t.queries for i in range(q.start, q.end)}
    for depth in (0.1, 0.5, 0.9):  # an evaluation item: the answer ends the text
        t = task_text(task, family, 4096, text[:4096], tok, rng, depth=depth)
        (q,) = t.queries
        assert q.end == 4096 and abs(q.needle[0] / 4096 - depth) < 0.15
        _solve_all(tok, t)


@pytest.mark.parametrize("task", TASKS)
def test_every_wording_is_solvable(tok, text, task):
    """Each wording of each family alone (the generator draws one per fact group) makes texts
    the solver reads back, keys of every length included."""
    from dataclasses import replace

    rng = random.Random(f"{task}{random.random()}")
    for family in FAMILIES.values():
        for wording in family.wordings[task]:
            only = replace(family, wordings={**family.wordings, task: (wording,)})
            t = task_text(task, only, 4096, text, tok, rng, queries=6)
            literal = max(re.split(r"\{\w+\}", wording.define), key=len)  # its longest fixed text
            assert literal in tok.detokenize(t.tokens)
            _solve_all(tok, t)
            assert {len(q.key) for q in t.queries} <= set(family.key_lengths)


def test_solver_reads_the_facts_not_the_record(tok, text):
    """Changing the fact in the text changes what the solver answers: it finds the answer in the
    text (off by one in the value, or the key's fact removed, and it no longer agrees)."""
    t = task_text("multikey", TRAIN, 2048, text, tok, random.Random(1), depth=0.4)
    (q,) = t.queries
    context = tok.detokenize(t.tokens[:q.start])
    wrong = str(int(q.answer) + 1)
    assert solve(context.replace(q.answer, wrong)) == ("multikey", wrong)
    assert solve(re.sub(rf"(?m)^.*{q.key}.*{q.answer}.*$", "", context)) is None
    assert solve(context + "unrelated tail") is None


def test_training_and_heldout_formats_are_disjoint(tok, text):
    """Template wordings, key alphabets, densities, values per key and chain lengths never overlap;
    no training text holds a held-out wording, and every key of a family is of its alphabet."""
    def literals(family):
        return {re.sub(r"\{\w+\}", "\0", getattr(w, part)) for ws in family.wordings.values()
                for w in ws for part in ("define", "query", "hop") if getattr(w, part)}

    assert set(FAMILIES) == {"train", "heldout", "train_wide", "train_varied"}
    assert not literals(TRAIN) & literals(HELDOUT)
    assert not set(TRAIN.key_alphabet) & set(HELDOUT.key_alphabet)
    assert not set(TRAIN.densities) & set(HELDOUT.densities)
    assert not set(TRAIN.values_per_key) & set(HELDOUT.values_per_key)
    assert not set(TRAIN.hops) & set(HELDOUT.hops)
    heldout_pieces = {p for lit in literals(HELDOUT) for p in lit.split("\0") if len(p.strip()) > 4}
    rng = random.Random(7)
    for task in TASKS:
        for family, other in ((TRAIN, HELDOUT), (HELDOUT, TRAIN)):
            t = task_text(task, family, 8192, text, tok, rng, queries=4)
            decoded = tok.detokenize(t.tokens)
            assert all(set(q.key) <= set(family.key_alphabet) for q in t.queries)
            assert not any(set(q.key) & set(other.key_alphabet) for q in t.queries)
            if family is TRAIN:
                assert not [p for p in heldout_pieces if p in decoded]
            assert t.density in family.densities


def test_heldout_answers_are_written_in_a_way_the_text_or_the_training_shows():
    """A multi-value answer joins its values with a separator the context never shows: a held-out
    one must be one the training formats use, or no model could answer exactly."""
    for family in (TRAIN, TRAIN_WIDE, TRAIN_VARIED):
        taught = {w.sep for w in family.wordings["multivalue"]}
        assert {w.sep for w in HELDOUT.wordings["multivalue"]} <= taught


@pytest.mark.parametrize("wide", [TRAIN_WIDE, TRAIN_VARIED], ids=lambda f: f.name)
def test_the_wider_training_families_stay_disjoint_from_the_heldout_one(tok, text, wide):
    """A wider family's wordings hold no held-out phrase (nor its text one), none of its keys is
    of the held-out key type (and the other way round), its sizes are not held-out ones, the
    held-out chain length lies between training ones, and its items are solved from their text."""
    def pieces(family):
        return {p for ws in family.wordings.values() for w in ws for part in (w.define, w.query, w.hop)
                for p in re.split(r"\{\w+\}", part) if len(p.strip()) > 4}

    assert not pieces(wide) & pieces(HELDOUT)
    assert all(len(wide.wordings[t]) >= 25 for t in TASKS)
    for size in ("densities", "values_per_key", "hops"):
        assert not set(getattr(wide, size)) & set(getattr(HELDOUT, size))
    assert min(wide.hops) < HELDOUT.hops[0] < max(wide.hops)  # held-out chains between training ones
    rng = random.Random(3)
    for task in TASKS:
        for family, other in ((wide, HELDOUT), (HELDOUT, wide)):
            t = task_text(task, family, 8192, text, tok, rng, queries=8)
            assert all(re.fullmatch(_key_re(family), q.key) for q in t.queries)
            assert not any(re.fullmatch(_key_re(other), q.key) for q in t.queries)
            if family is wide:
                decoded = tok.detokenize(t.tokens)
                assert not [p for p in pieces(HELDOUT) if p in decoded]
        item = task_text(task, wide, 4096, text, tok, rng, queries=1, depth=0.5)
        (q,) = item.queries
        assert solve(tok.detokenize(item.tokens[:q.start])) == (task, q.answer)
    keys = [q.key for task in TASKS for q in task_text(task, wide, 8192, text, tok, rng, queries=24).queries]
    # every key style is drawn: with '_', with digits, capitalised
    assert any("_" in k for k in keys) and any(re.search(r"\d", k) for k in keys) and any(k[0].isupper() for k in keys)


def test_the_varied_family_has_no_recurring_phrasing():
    """Every query template of the varied family is its own (none shared by two wordings, nor with
    another training family), and no phrase of its facts is in more than a few percent of them."""
    queries = [w.query for ws in TRAIN_VARIED.wordings.values() for w in ws]
    assert len(queries) == len(set(queries)) == 200 * len(TASKS)
    assert not set(queries) & {w.query for f in (TRAIN, TRAIN_WIDE) for ws in f.wordings.values() for w in ws}
    for task in ("passkey", "multikey", "multivalue"):
        defines = [w.define for w in TRAIN_VARIED.wordings[task]]
        assert max(defines.count(d) for d in defines) <= 4, task


def test_bad_task_settings_raise(tok, text):
    rng = random.Random(0)
    with pytest.raises(TaskError, match="unknown task"):
        task_text("sorting", TRAIN, 1024, text, tok, rng)
    with pytest.raises(TaskError, match="too short"):
        task_text("multivalue", HELDOUT, 64, text, tok, rng)
    with pytest.raises(TaskError, match="exactly one query"):
        task_text("copy", TRAIN, 1024, text, tok, rng, queries=2, depth=0.5)
    with pytest.raises(TaskError, match="has no wordings for task 'copy'"):
        task_text("copy", dataclasses.replace(TRAIN, wordings={}), 1024, text, tok, rng)


def test_mixture_samples_are_whole_documents_with_their_answer_mask(mixture, tok, tmp_path):
    """Every GPTDataset sample (what the trainer reads) is one whole document, and the answer mask
    beside it marks answers the solver finds in the sample's own text: also past the first epoch,
    where megatron-core reshuffles the documents (a run longer than the mixture)."""
    tokens, mask = read_split_tokens(mixture, "train"), read_answer_mask(mixture, "train")
    assert len(tokens) == len(mask) and len(tokens) % SEQ == 0
    docs, masks = tokens.reshape(-1, SEQ), mask.reshape(-1, SEQ)
    train, _ = build_gpt_datasets(mixture, SEQ, cache_dir=tmp_path / "cache", train_samples=5 * len(docs) // 2)
    assert len(train) >= 2 * len(docs)
    starts = {tuple(d[:16]): i for i, d in enumerate(docs)}
    solved = 0
    for i in range(0, len(train), max(1, len(train) // 12)):
        sample = train[i]["tokens"].numpy()
        doc = starts[tuple(sample[:16])]
        assert numpy.array_equal(sample, docs[doc])
        m = masks[doc]
        for start in numpy.flatnonzero(numpy.diff(numpy.concatenate([[0], m])) == 1):
            end = start + int(numpy.argmin(m[start:])) if m[start:].min() == 0 else SEQ
            found = solve(tok.detokenize(docs[doc][:start].tolist()))
            assert found is not None and found[1] == tok.detokenize(docs[doc][start:end].tolist())
            solved += 1
    assert solved > 0


def test_mixture_manifest_ratio_and_seed(mixture, corpus, tmp_path):
    from megatron_dsa.data import load_manifest

    m = load_manifest(mixture)
    assert (m["kind"], m["seq_length"], m["seed"], m["ratio"], m["family"]) == ("tasks", SEQ, 3, 0.6, "train")
    train = m["splits"]["train"]
    share = sum(train["task_documents"].values()) / train["documents"]
    assert 0.35 < share < 0.85 and set(train["task_documents"]) <= set(TASKS)
    assert train["answer_tokens"] == int(read_answer_mask(mixture, "train").sum()) > 0
    # one seed, one corpus; another seed, another
    again = build_task_corpus(tmp_path / "again", corpus, SEQ, ratio=0.6, seed=3)
    assert numpy.array_equal(read_split_tokens(tmp_path / "again", "train"), read_split_tokens(mixture, "train"))
    assert again["splits"] == m["splits"]
    build_task_corpus(tmp_path / "other", corpus, SEQ, ratio=0.6, seed=4)
    assert not numpy.array_equal(read_split_tokens(tmp_path / "other", "train"), read_split_tokens(mixture, "train"))


def _answer_spans(mask_row) -> int:
    return int((numpy.diff(numpy.concatenate([[0], mask_row])) == 1).sum())


def test_query_tokens_sets_the_queries_per_document(mixture, corpus, tmp_path):
    """One query per ``query_tokens`` tokens of a task document (at least one): every task
    document holds exactly that many answers, and the manifest says so."""
    from megatron_dsa.data import load_manifest

    assert load_manifest(mixture)["queries_per_document"] == 1  # the default QUERY_TOKENS > SEQ
    m = build_task_corpus(tmp_path / "dense", corpus, SEQ, ratio=1.0, seed=3, query_tokens=256,
                          tasks=["passkey", "multikey"])
    assert (m["query_tokens"], m["queries_per_document"]) == (256, 2)
    masks = read_answer_mask(tmp_path / "dense", "train").reshape(-1, SEQ)
    assert [_answer_spans(row) for row in masks] == [2] * len(masks)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(DataError, match="query_tokens"):
            build_task_corpus(tmp_path / "bad", corpus, SEQ, query_tokens=bad)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("scale", ["h200", "h200_2k", "pilot", "h200_512", "h200_512_wide", "h200_from_2k_wide"])
def test_the_studys_mixtures_fit_their_training_length(tok, text, scale):
    """Every task at its densest, with the queries a scale's mixture asks per document, fits the
    scale's training length (tokenized with this small vocabulary, longer than the study's)."""
    from experiments.verify.settings import SCALES
    from megatron_dsa.data.mixture import queries_per_document

    s = SCALES[scale]
    length, queries = s["train_length"], queries_per_document(s["train_length"], s["tasks"]["query_tokens"])
    assert queries >= length // 512  # at least one query per 512 tokens: dense enough to learn from
    family = FAMILIES[s["tasks"].get("family", "train")]
    rng = random.Random(0)
    for task in TASKS:
        t = task_text(task, family, length - 1, text, tok, rng, queries=queries, density=max(family.densities))
        assert len(t.queries) == queries


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_length=SEQ, ratio=0.0), "ratio"),
    (dict(seq_length=SEQ, ratio=1.5), "ratio"),
    (dict(seq_length=SEQ, tasks=["passkey", "sorting"]), "tasks must be"),
    (dict(seq_length=48), "too short"),
    (dict(seq_length=10**7), "fewer than two documents"),
])
def test_bad_mixture_input_raises_and_leaves_nothing(corpus, tmp_path, kwargs, message):
    out = tmp_path / "mix"
    seq = kwargs.pop("seq_length")
    with pytest.raises(DataError, match=message):
        build_task_corpus(out, corpus, seq, **kwargs)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mixture_refuses_a_task_corpus_as_base_and_an_existing_out(mixture, corpus, tmp_path):
    with pytest.raises(DataError, match="must be a text corpus"):
        build_task_corpus(tmp_path / "x", mixture, SEQ)
    with pytest.raises(DataError, match="already exists"):
        build_task_corpus(mixture, corpus, SEQ)


def test_run_selects_the_corpus_kind(mixture, corpus, tmp_path):
    """data.corpus in the run YAML: the trainer's preflight reads the corpus only if it is that
    kind and, for the mixture, built for the run's length."""
    assert check_corpus_for_run(mixture, "tasks", SEQ)["kind"] == "tasks"
    assert check_corpus_for_run(corpus, "text", SEQ).get("kind", "text") == "text"
    with pytest.raises(DataError, match="holds a 'text' corpus"):
        check_corpus_for_run(corpus, "tasks", SEQ)
    with pytest.raises(DataError, match="built for seq_length 512"):
        check_corpus_for_run(mixture, "tasks", 256)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"phase: pretrain\ndata:\n  dir: {mixture}\n  seq_length: {SEQ}\n  corpus: tasks\n"
                        f"checkpoint:\n  save: {tmp_path / 'ckpt'}\n")
    assert load_config(cfg_path).data["corpus"] == "tasks"
    assert load_config(cfg_path, ["data.corpus=text"]).data["corpus"] == "text"
    with pytest.raises(TrainConfigError, match="data.corpus must be one of"):
        load_config(cfg_path, ["data.corpus=mixture"])
    assert load_config(cfg_path, ["data.answer_loss_weight=5"]).data["answer_loss_weight"] == 5
    with pytest.raises(TrainConfigError, match="needs data.corpus: tasks"):
        load_config(cfg_path, ["data.corpus=text", "data.answer_loss_weight=5"])
    with pytest.raises(TrainConfigError, match="answer_loss_weight must be a positive number"):
        load_config(cfg_path, ["data.answer_loss_weight=0"])


def test_preflight_checks_the_corpus_kind(mixture, tmp_path):
    from megatron_dsa.train.preflight import preflight

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"phase: pretrain\ndata:\n  dir: {mixture}\n  seq_length: {SEQ}\n  corpus: tasks\n"
                        f"checkpoint:\n  save: {tmp_path / 'ckpt'}\n")
    assert preflight(load_config(cfg_path), check_flags=False)["data_dir"] == str(mixture)
    with pytest.raises(DataError, match="holds a 'tasks' corpus"):
        preflight(load_config(cfg_path, ["data.corpus=text"]), check_flags=False)
    with pytest.raises(DataError, match="built for seq_length"):
        preflight(load_config(cfg_path, ["data.seq_length=256"]), check_flags=False)


def test_cli_build_tasks(corpus, tmp_path, capsys):
    from megatron_dsa.data.__main__ import main

    assert main(["build-tasks", "--base", str(corpus), "--out", str(tmp_path / "m"), "--seq-length", str(SEQ)]) == 0
    assert "with tasks" in capsys.readouterr().out
    assert main(["build-tasks", "--base", str(corpus), "--out", str(tmp_path / "n"), "--seq-length", "48"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "too short" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "n").exists()
    # the wide family through the CLI; the held-out family is no training family
    assert main(["build-tasks", "--base", str(corpus), "--out", str(tmp_path / "w"), "--seq-length", str(SEQ),
                 "--family", "train_wide", "--ratio", "1"]) == 0
    assert "train_wide formats" in capsys.readouterr().out
    from megatron_dsa.data import load_manifest, read_split_tokens
    from megatron_dsa.data.corpus import load_tokenizer

    assert load_manifest(tmp_path / "w")["family"] == "train_wide"
    tokens = read_split_tokens(tmp_path / "w", "train").tolist()
    assert not numpy.array_equal(tokens, read_split_tokens(tmp_path / "m", "train"))
    text = load_tokenizer(tmp_path / "w").detokenize(tokens[:20 * SEQ])
    wide_only = {w.define.split("{")[0] for ws in TRAIN_WIDE.wordings.values() for w in ws} - \
        {w.define.split("{")[0] for ws in TRAIN.wordings.values() for w in ws}
    assert any(p.strip() and p in text for p in wide_only)  # wordings only the wide family has
    with pytest.raises(SystemExit):
        main(["build-tasks", "--base", str(corpus), "--out", str(tmp_path / "h"), "--seq-length", str(SEQ),
              "--family", "heldout"])
    with pytest.raises(DataError, match="training format family"):
        build_task_corpus(tmp_path / "h", corpus, SEQ, family="heldout")
    assert not (tmp_path / "h").exists()


def test_answer_loss_weight_marks_exactly_the_answer_labels(mixture, tmp_path):
    """With answer_loss_weight w the loss mask is w on the labels that are answer tokens and 1
    elsewhere, for the sample's own document whatever the shuffle; 1 leaves GPTDataset as is."""
    tokens, mask = read_split_tokens(mixture, "train"), read_answer_mask(mixture, "train")
    stream_start = {tuple(tokens[i:i + 16]): i for i in range(0, len(tokens), SEQ)}
    plain, _ = build_gpt_datasets(mixture, SEQ, cache_dir=tmp_path / "plain")
    weighted, valid = build_gpt_datasets(mixture, SEQ, answer_loss_weight=4.0, cache_dir=tmp_path / "w")
    assert type(plain).__name__ == "GPTDataset" and len(weighted) == len(plain)
    answers = 0
    for i in range(len(weighted)):
        item, base = weighted[i], plain[i]
        assert numpy.array_equal(item["tokens"].numpy(), base["tokens"].numpy())
        start = stream_start[tuple(item["tokens"][:16].tolist())]
        # labels = tokens shifted by one; the last label opens the next document (never an answer)
        labels_are_answers = numpy.zeros(SEQ, bool)
        labels_are_answers[:SEQ - 1] = mask[start + 1:start + SEQ] == 1
        expected = numpy.where(labels_are_answers, 4.0, 1.0) * base["loss_mask"].numpy()
        assert numpy.array_equal(item["loss_mask"].numpy(), expected)
        answers += int(labels_are_answers.sum())
    assert answers > 0
    assert read_answer_mask(mixture, "valid").sum() > 0  # the held-out split is weighted too
    assert any(valid[i]["loss_mask"].max() == 4.0 for i in range(len(valid)))


def test_answer_weight_reaches_the_trainers_loss(mixture, tmp_path, megatron_world):
    """The trainer's loss is the loss mask's weighted sum over the per-token losses (label
    positions), divided by the mask's sum: a weighted sample's answer labels count 4 times."""
    from megatron_dsa.train import trainer

    weighted, _ = build_gpt_datasets(mixture, SEQ, answer_loss_weight=4.0, cache_dir=tmp_path / "w")
    item = next(weighted[i] for i in range(len(weighted)) if weighted[i]["loss_mask"].max() == 4.0)
    mask = item["loss_mask"][None]
    answers = mask == 4.0
    losses = torch.where(answers, 2.0, 1.0)  # per-token losses as the model returns them, [b, s]
    trainer._pop_layer_metrics()
    loss, num_tokens, report = trainer.loss_func(mask, None, "sparse", losses)
    n_answers, n_other = int(answers.sum()), int((~answers).sum())
    assert float(loss) == pytest.approx(4 * 2.0 * n_answers + n_other)
    assert int(num_tokens) == 4 * n_answers + n_other
    assert report["lm loss"].tolist() == pytest.approx([float(loss), int(num_tokens)])


def test_answer_loss_weight_needs_a_task_mixture_and_a_positive_weight(mixture, corpus, tmp_path):
    with pytest.raises(DataError, match="needs a task mixture"):
        build_gpt_datasets(corpus, SEQ, answer_loss_weight=2.0, cache_dir=tmp_path / "a")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DataError, match="answer_loss_weight must be a positive number"):
            build_gpt_datasets(mixture, SEQ, answer_loss_weight=bad, cache_dir=tmp_path / "b")
