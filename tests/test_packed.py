"""Packed sequences: several documents in one sequence behave as each document run alone.

The rule (``reference.causal_mask`` with document ids): key s is eligible for query t iff both
are in the same document and s <= t. Core level: ``dsa_core`` with the document boundaries
(``cu_seqlens``) gives, in every phase, the top-k indices (exact ties included), outputs, KL,
recall and input gradients of each document run alone, with a document shorter than top-k, on
one rank and under CP=2 / TP=2 x CP=2 (megatron's packed layout: each document in 2 * CP
chunks). Model level: megatron-core's THD packing through the tiny model equals each document
alone. Worker code: tests/parallel_workers.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import parallel_workers as W  # noqa: E402

from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.config import DSAConfigError  # noqa: E402
from megatron_dsa.parallel import ParallelContext, cp_positions  # noqa: E402
from megatron_dsa.parallel.comm import cp_owner, to_global_order  # noqa: E402
from tests.helpers import set_indexer_loss_scale  # noqa: E402

MODES = [("dense", True), ("warmup", True), ("sparse", True), ("sparse", False)]
# S = 32, top-k 6: the first document (4 rows) is shorter than top-k. Every length is a
# multiple of 2 * CP for CP = 2.
DOCS = torch.tensor([0, 4, 16, 20, 32])


def test_document_rule():
    doc = R.document_ids(torch.tensor([0, 2, 5]), 5)
    assert doc.tolist() == [0, 0, 1, 1, 1]
    mask = R.causal_mask(torch.arange(5), torch.arange(5), doc, doc)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, want.bool())
    with pytest.raises(ValueError, match="document boundaries"):
        R.document_ids(torch.tensor([0, 3]), 5)


def test_topk_stays_inside_the_document():
    """A row selects min(k, rows of its document so far) keys, all in its document: every one
    of them in a document shorter than k (dense attention there)."""
    q, k, w = torch.randn(1, 9, 2, 4), torch.randn(1, 9, 4), torch.rand(1, 9, 2)
    doc = R.document_ids(torch.tensor([0, 3, 9]), 9)
    idx = R.indexer_topk(q, k, w, 4, q_doc=doc, k_doc=doc)
    for t in range(9):
        start = 0 if t < 3 else 3
        chosen = sorted(i for i in idx[0, t].tolist() if i >= 0)
        assert len(chosen) == min(4, t - start + 1) and set(chosen) <= set(range(start, t + 1))
        if t < 3:
            assert chosen == list(range(0, t + 1))


@pytest.mark.parametrize("cu", [DOCS, torch.tensor([0, 3, 16, 21, 32])], ids=["even", "odd"])
def test_packed_core_on_one_rank_equals_documents_alone(cu):
    W.check_core_against_reference(ParallelContext(), 7, MODES, "reference", cu)


@pytest.mark.parametrize("cp", [2, 4])
def test_packed_cp_layout_is_megatrons_thd_split(cp):
    """Each document in 2 * CP chunks, rank r holding chunks r and 2CP-1-r of every document
    (the split megatron-core's THD RoPE assumes); owners and the gather order agree with it."""
    S = 32
    cu = torch.tensor([0, 8, 24, 32]) if cp == 4 else DOCS
    held = [cp_positions(S, cp, r, cu_seqlens=cu) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(S))
    bounds = cu.tolist()
    for r, pos in enumerate(held):
        want = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            c = (b - a) // (2 * cp)
            want += list(range(a + r * c, a + (r + 1) * c)) + list(range(a + (2 * cp - 1 - r) * c, a + (2 * cp - r) * c))
        assert pos.tolist() == want
        owner, row = cp_owner(pos, S, cp, cu)
        assert (owner == r).all() and torch.equal(row, torch.arange(S // cp))
    x = torch.arange(S)[None]
    assert torch.equal(to_global_order(torch.cat([x[:, p] for p in held], dim=1), S, cp, cu_seqlens=cu), x)


def test_packed_documents_must_split_over_cp():
    with pytest.raises(DSAConfigError, match="multiple of 2 \\* context_parallel_size"):
        cp_positions(32, 2, 0, cu_seqlens=torch.tensor([0, 6, 32]))


@pytest.mark.parametrize("tp,cp", [(1, 2)], ids=["cp2"])
def test_packed_core_under_cp_equals_documents_alone(tp, cp):
    W.spawn(W.layer_function_worker, tp * cp, tp, cp, 7, MODES, "reference", DOCS)


# ---------------------------------------------------------------------------------------------
# Model level: megatron-core's THD packing through the tiny model
# ---------------------------------------------------------------------------------------------


def _model_losses(model, mode, tokens, labels, packed_seq_params, kl_weight):
    """Per-token LM losses [S] and the loss this test backpropagates: the LM sum plus the
    indexer KL weighted by ``kl_weight`` (a document's share of the packed rows, so the
    documents' gradients add up to the packed one's)."""
    from megatron_dsa.layer import pop_indexer_losses

    set_indexer_loss_scale(kl_weight)
    S = tokens.shape[0]
    per_token = model(tokens[None], torch.arange(S)[None], None, labels=labels[None],
                      packed_seq_params=packed_seq_params)[0]
    kl = pop_indexer_losses(model)
    if mode == "warmup":
        return per_token, sum(kl) * kl_weight
    return per_token, per_token.sum()


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_packed_model_equals_documents_alone(megatron_world, mode):
    """The tiny model on three packed documents (two shorter than top-k 16) through
    megatron-core's THD format: per-token losses and every parameter's gradient equal the
    documents run alone (the MoE's sequence-level auxiliary loss is off: it is defined per
    sequence, not per document)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_dsa.model import build_model, model_config

    lengths = [5, 20, 7]
    S = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    torch.manual_seed(3)
    config = model_config("tiny", mdsa_mode=mode, mdsa_kernel="reference", moe_aux_loss_coeff=0.0)
    model = build_model("tiny", config)
    tokens = torch.randint(0, 512, (S,))
    labels = torch.randint(0, 512, (S,))

    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    per_token, loss = _model_losses(model, mode, tokens, labels, packed, 1.0)
    loss.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    alone, grads = [], {}
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        doc_losses, doc_loss = _model_losses(model, mode, tokens[a:b], labels[a:b], None, (b - a) / S)
        doc_loss.backward()
        alone.append(doc_losses)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(per_token.detach(), torch.cat(alone).detach(), rtol=1e-5, atol=1e-5)
    assert set(grads) == set(want_grads) and grads
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{mode} {n}: {m}")
