"""The Triton path for packed sequences: each kernel against the reference on packed inputs
(document ids), and the packed core on the Triton kernels equal to each document run alone.

Without CUDA the kernels run through Triton's interpreter at small shapes. Documents: one
shorter than top-k, odd lengths, boundaries that fall inside a kernel's query and key blocks.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from megatron_dsa import kernels as K  # noqa: E402
from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions  # noqa: E402

pytestmark = pytest.mark.skipif(not K.available(), reason="needs Triton with CUDA or TRITON_INTERPRET=1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# 41 rows: documents of 3 (shorter than top-k 8), 17, 1 and 20 rows; no boundary on a block edge.
CU = torch.tensor([0, 3, 20, 21, 41])


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _docs(S=41, cu=CU):
    return R.document_ids(cu.to(DEV), S)


@pytest.mark.parametrize("layout", ["whole", "cp_chunks"])
def test_indexer_topk_packed(layout):
    """The kernel's top-k equals the reference's with the document rule (scores on a dyadic grid
    tie exactly, so the sets must be identical) and never leaves the query's document. 100 rows:
    the last document's query blocks skip the key blocks wholly before it."""
    S, HI, DI, topk = 100, 2, 16, 8
    doc = _docs(S, torch.tensor([0, 3, 40, 41, 100]))
    q = (torch.randint(-2, 3, (2, S, HI, DI), device=DEV) / 2).float()
    k = (torch.randint(-2, 3, (2, S, DI), device=DEV) / 2).float()
    w = (torch.randint(1, 4, (2, S, HI), device=DEV) / 4).float()
    q_pos = None
    if layout == "cp_chunks":  # a CP rank's rows: two runs of positions, keys the whole sequence
        q_pos = torch.cat([torch.arange(5, 30), torch.arange(70, 95)]).to(DEV)
        q = q[:, q_pos]
        w = w[:, q_pos]
    qp = R._positions(q_pos, q.shape[1], DEV)
    got = K.indexer_topk(q, k, w, topk, q_pos=q_pos, q_doc=doc[qp], k_doc=doc)
    want = R.indexer_topk(q, k, w, topk, q_pos=q_pos, q_doc=doc[qp], k_doc=doc)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    chosen = got.clamp_min(0)
    assert bool(((doc[chosen] == doc[qp][None, :, None]) | (got < 0)).all())
    # Unpacked, rows of the later documents would pick keys of earlier ones: the rule matters.
    assert not torch.equal(K.indexer_topk(q, k, w, topk, q_pos=q_pos).sort(-1).values, got.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_mla_attention_packed(dtype):
    B, S, H, D, V = 1, 41, 2, 24, 16
    doc = _docs(S)
    q = torch.randn(B, S, H, D, device=DEV).to(dtype).requires_grad_()
    kv = torch.randn(B, S, D, device=DEV).to(dtype).requires_grad_()
    out, lse = K.dense_mla_attention(q, kv, V, D ** -0.5, q_doc=doc, k_doc=doc)
    q32, kv32 = (t.detach().float().requires_grad_() for t in (q, kv))
    ref, ref_lse = R.dense_mla_attention(q32, kv32, V, D ** -0.5, q_doc=doc, k_doc=doc)
    g = torch.randn_like(ref)
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert not torch.isnan(out).any()
    assert rel(out, ref) < tol and rel(lse, ref_lse) < 1e-5
    assert rel(q.grad, q32.grad) < tol and rel(kv.grad, kv32.grad) < tol
    # Each document alone gives the same rows.
    for a, b in zip(CU[:-1].tolist(), CU[1:].tolist()):
        alone, _ = R.dense_mla_attention(q32[:, a:b].detach(), kv32[:, a:b].detach(), V, D ** -0.5)
        assert rel(out[:, a:b].detach(), alone) < tol


@pytest.mark.parametrize("dense_kl", ["fused", "blockwise"])
def test_dense_indexer_kl_packed(dense_kl):
    """KL, recall and the indexer gradients against the reference with the document rule; the
    fused kernels at several key spans and head groups (boundaries inside them)."""
    B, S, H, D, HI, DI, topk = 2, 41, 3, 20, 4, 16, 8
    doc = _docs(S)
    q = torch.randn(B, S, H, D, device=DEV)
    kv = torch.randn(B, S, D, device=DEV)
    leaves = [torch.randn(B, S, HI, DI, device=DEV), torch.randn(B, S, DI, device=DEV),
              torch.rand(B, S, HI, device=DEV)]
    mine = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    kl, recall = K.dense_indexer_kl(q, kv, *mine, D ** -0.5, topk, q_doc=doc, k_doc=doc,
                                    options=KernelOptions(dense_kl=dense_kl, dense_kl_span=16))
    want, want_recall = R.dense_indexer_kl(q, kv, *ref, D ** -0.5, topk, q_doc=doc, k_doc=doc)
    g = torch.rand_like(want)
    (kl * g).sum().backward()
    (want * g).sum().backward()
    assert not torch.isnan(kl).any() and rel(kl, want) < 1e-5 and rel(recall, want_recall) < 1e-4
    # The first document (3 rows) is shorter than top-k: its recall is exactly 1.
    assert torch.allclose(recall[:, :3], torch.ones_like(recall[:, :3]))
    for a, b in zip(mine, ref):
        assert rel(a.grad, b.grad) < 1e-4
    unpacked, _ = R.dense_indexer_kl(q, kv, *leaves, D ** -0.5, topk)
    assert rel(kl.detach(), unpacked) > 1e-3  # the rule changes the rows after the first document


def test_sparse_kernels_need_nothing_more():
    """The sparse attention reads only the selected indices: with a packed top-k it equals the
    dense attention of each document (top-k covering every eligible key)."""
    B, S, H, D, V, topk = 1, 41, 2, 24, 16, 24
    doc = _docs(S)
    q, kv = torch.randn(B, S, H, D, device=DEV), torch.randn(B, S, D, device=DEV)
    qi, ki, wi = torch.randn(B, S, 2, 16, device=DEV), torch.randn(B, S, 16, device=DEV), torch.rand(B, S, 2, device=DEV)
    idx = K.indexer_topk(qi, ki, wi, topk, q_doc=doc, k_doc=doc)
    out, _ = K.sparse_mla_attention(q, kv, idx, V, D ** -0.5)
    want, _ = R.dense_mla_attention(q, kv, V, D ** -0.5, q_doc=doc, k_doc=doc)
    assert rel(out, want) < 1e-5


def test_packed_core_on_the_triton_kernels_equals_documents_alone(monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    import parallel_workers as W

    monkeypatch.setattr(W, "ON_GPU", torch.cuda.is_available())  # the kernels run where Triton can

    from megatron_dsa.parallel import ParallelContext

    modes = [("dense", True), ("warmup", True), ("sparse", True), ("sparse", False)]
    W.check_core_against_reference(ParallelContext(), 11, modes, "triton", torch.tensor([0, 3, 16, 21, 32]))
