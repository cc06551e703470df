"""Packed sequences through the trainer (``data.packed``).

- the batch: a micro-batch's rows laid end to end, one document piece per EOD-delimited run of
  tokens (a row's start always starting one), positions restarting per document, no loss on an
  EOD's prediction of the next document; under CP each rank holds megatron's THD chunks;
- a trainer run with packing trains, and its second step's logged LM loss equals the loss of
  each document of that batch run alone through the model at the first step's weights;
- packing under CP with documents that do not split into 2 * CP chunks stops in preflight
  with one error (the Triton kernels take packed sequences: tests/test_packed_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.test_train import CONFIGS, ok, run_cli, scalars

SEQ = 64


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """A corpus of short documents (one line of this interpreter's stdlib each, about 20
    tokens): a 64-token sample holds several of them."""
    from megatron_dsa.data import build_corpus, default_source

    source = tmp_path_factory.mktemp("short_docs_src")
    lines = [line for name in ("argparse.py", "textwrap.py", "dataclasses.py")
             for line in (default_source() / name).read_text().splitlines() if line.strip()]
    for n, line in enumerate(lines):
        (source / f"doc{n:05d}.py").write_text(line + "\n")
    out = tmp_path_factory.mktemp("short_docs") / "c"
    build_corpus(out, source, 512, valid_fraction=0.1)
    return out


def documents_of(row: list[int], eod: int) -> list[tuple[int, int]]:
    """[start, end) of each document piece of one row, by a plain walk over its tokens."""
    pieces, start = [], 0
    for i, token in enumerate(row):
        if token == eod:
            pieces.append((start, i + 1))
            start = i + 1
    if start < len(row):
        pieces.append((start, len(row)))
    return pieces


def test_packed_batch_follows_the_documents():
    from megatron_dsa.train.trainer import packed_inputs

    eod = 2
    torch.manual_seed(0)
    tokens = torch.randint(3, 50, (3, 17))
    # EOD at a row's first and last token, two in a row, and a row without any.
    for r, c in ((0, 0), (0, 5), (0, 6), (0, 16), (1, 9)):
        tokens[r, c] = eod
    labels = torch.randint(3, 50, (3, 17))
    loss_mask = torch.ones(3, 17)
    loss_mask[1, 3] = 0  # the dataset's own mask is kept
    tok, lab, mask, pos, params = packed_inputs(tokens, labels, loss_mask, eod=eod, cp_size=1, cp_rank=0)

    want_cu, want_pos = [0], []
    for r in range(3):
        for a, b in documents_of(tokens[r].tolist(), eod):
            want_cu.append(r * 17 + b)
            want_pos += list(range(b - a))
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == want_cu == params.cu_seqlens_kv.tolist()
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == max(b - a for a, b in zip(want_cu[:-1], want_cu[1:]))
    assert torch.equal(tok, tokens.reshape(1, -1)) and torch.equal(lab, labels.reshape(1, -1))
    assert pos[0].tolist() == want_pos
    want_mask = [0.0 if t == eod or (i == 17 + 3) else 1.0 for i, t in enumerate(tokens.reshape(-1).tolist())]
    assert mask[0].tolist() == want_mask


def test_packed_batch_under_cp_holds_megatrons_thd_chunks():
    """Each CP rank holds chunks r and 2CP-1-r of every document; the boundaries stay global."""
    from megatron_dsa.train.trainer import packed_inputs

    eod = 2
    tokens = torch.full((2, 16), 7)
    tokens[0, 3] = tokens[0, 11] = tokens[1, 7] = eod  # documents of 4, 8, 4, 8, 8 tokens
    tokens = tokens + torch.arange(32).reshape(2, 16) * (tokens != eod) * 10
    held = []
    for rank in range(2):
        tok, _, _, pos, params = packed_inputs(tokens, tokens, torch.ones(2, 16), eod=eod, cp_size=2, cp_rank=rank)
        assert params.cu_seqlens_q.tolist() == [0, 4, 12, 16, 24, 32]
        held.append(tok[0])
    flat = tokens.reshape(-1)
    want = [flat[a + r * (b - a) // 4: a + (r + 1) * (b - a) // 4].tolist()
            + flat[a + (3 - r) * (b - a) // 4: a + (4 - r) * (b - a) // 4].tolist()
            for r in range(2) for a, b in zip([0, 4, 12, 16, 24], [4, 12, 16, 24, 32])]
    assert held[0].tolist() == sum(want[:5], []) and held[1].tolist() == sum(want[5:], [])


@pytest.mark.parametrize("cp", [2, 4])
def test_unpacked_batch_under_cp_is_megatrons_split(monkeypatch, cp):
    """Without packing each CP rank gets what Megatron-LM's get_batch_on_this_cp_rank hands it
    (the layout megatron-core's attention and RoPE under CP assume), every tensor alike."""
    import torch.distributed as dist
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_dsa.train.trainer import this_cp_rank

    batch = {name: torch.randint(0, 512, (2, 8 * cp)) for name in ("tokens", "labels", "loss_mask", "position_ids")}
    for rank in range(cp):
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: cp)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        theirs = get_batch_on_this_cp_rank({**batch, "cu_seqlens": None}, is_hybrid_cp=False, cp_group=object())
        ours = this_cp_rank(*batch.values(), cp_size=cp, cp_rank=rank)
        for name, mine in zip(batch, ours):
            assert torch.equal(mine, theirs[name]), (name, rank)


def _train_args(corpus, root, *extra):
    return ["--config", str(CONFIGS / "pretrain.yaml"), f"data.dir={corpus}", f"data.seq_length={SEQ}",
            "data.packed=true", f"checkpoint.save={root / 'ckpt'}", f"logging.tensorboard_dir={root / 'tb'}",
            "train.iters=2", "train.micro_batch_size=2", "train.global_batch_size=2", "train.lr_warmup_iters=0",
            "eval.iters=0", "checkpoint.interval=1", "logging.interval=1", *extra]


def test_packed_training_step_equals_documents_alone(megatron_world, short_docs, tmp_path):
    """Step 2's logged LM loss (at the weights step 1 saved) is the token-weighted mean of the
    LM losses of each document piece of its batch run alone, unpacked, EOD predictions left out."""
    from megatron_dsa.convert.checkpoint import load_model
    from megatron_dsa.data import build_gpt_datasets, load_tokenizer

    corpus = short_docs
    ok(run_cli(_train_args(corpus, tmp_path, "model.overrides.mdsa_kernel=reference")))
    lm = scalars(tmp_path / "tb", "lm loss")
    assert [i for i, _ in lm] == [1, 2] and all(torch.isfinite(torch.tensor(v)) for _, v in lm)

    eod = load_tokenizer(corpus).eod
    train, _ = build_gpt_datasets(corpus, SEQ, random_seed=1234, train_samples=4)
    batch = [train[i] for i in (2, 3)]  # the second global batch of two samples
    model, _ = load_model(tmp_path / "ckpt" / "iter_0000001", mdsa_kernel="reference")
    model.eval()
    total, count, pieces = 0.0, 0, 0
    with torch.no_grad():
        for sample in batch:
            tokens, labels = sample["tokens"].long(), sample["labels"].long()
            for a, b in documents_of(tokens.tolist(), eod):
                losses = model(tokens[None, a:b], torch.arange(b - a)[None], None, labels=labels[None, a:b])[0]
                keep = (tokens[a:b] != eod) & (sample["loss_mask"][a:b] > 0)
                total += float(losses[keep].double().sum())
                count += int(keep.sum())
                pieces += 1
    assert pieces >= 4  # the batch holds several documents
    assert lm[1][1] == pytest.approx(total / count, rel=1e-5)


def _preflight(corpus, tmp_path, *overrides):
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight

    return preflight(load_config(CONFIGS / "pretrain.yaml", [*_train_args(corpus, tmp_path)[2:], *overrides]),
                     check_flags=False)


def test_packing_preflight_refuses_documents_that_do_not_split_over_cp(corpus, tmp_path):
    from megatron_dsa.data.packing import unsplittable_documents
    from megatron_dsa.train.config import TrainConfigError

    assert _preflight(corpus, tmp_path)["data_dir"]
    assert _preflight(corpus, tmp_path, "model.overrides.mdsa_kernel=triton")["data_dir"]  # packing runs on both
    bad, total, first = unsplittable_documents(corpus / "train_text_document", 4)
    assert 0 < bad <= total and first % 4
    with pytest.raises(TrainConfigError, match=f"{bad} of the {total} documents of the train split .* do not "
                                               f"\\(the first holds {first} tokens\\)"):
        _preflight(corpus, tmp_path, "megatron.context_parallel_size=2")
