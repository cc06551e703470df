"""The warp-specialised Gluon FP8 scoring (``kernels/indexer_ws.py``) against the reference and the
Triton scoring, and the option that chooses it.

The kernel runs only on an sm_90 GPU (Triton's interpreter does not run Gluon): there the top-k it
leads to is compared with the reference on the dequantised FP8 inputs and with the Triton
scoring's, at 16 to 128 indexer heads, with rows shorter than the top-k, sizes that are not
multiples of the key or query blocks, queries offset into the keys, unsorted key positions,
packed documents, and rows long enough that the selection bounds its threshold from the scoring's
run maxima. Everywhere, the option's values are checked, and a forced Gluon scoring that cannot
run is one clear error.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from megatron_dsa import kernels as K  # noqa: E402
from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions  # noqa: E402
from megatron_dsa.kernels import indexer_ws as X  # noqa: E402
from helpers import check_topk  # noqa: E402

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GLUON = KernelOptions(score_kernel="gluon")
TRITON = KernelOptions(score_kernel="triton")


def _dequantised(q, k):
    """The FP8 inputs as the kernels see them: e4m3 values times their scales, in fp32."""
    q8, qs = K.fp8_quantize(q)
    k8, ks = K.fp8_quantize(k)
    return q8.float() * qs[..., None], k8.float() * ks[..., None]


def _scores(q, k, w):
    """``reference.indexer_scores`` a head at a time (its all-heads product would not fit)."""
    out = torch.zeros(q.shape[0], q.shape[1], k.shape[1], device=q.device)
    for j in range(q.shape[2]):
        out += (q[:, :, j] @ k.transpose(1, 2)).relu() * w[:, :, j, None]
    return out


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon scoring needs an sm_90 GPU (Triton's interpreter does not run Gluon)")
@pytest.mark.parametrize("B,S,Sk,HI,topk,case", [
    (1, 1000, 1000, 64, 256, "causal"),  # rows shorter than the top-k; 1000 = 15.6 key blocks
    (2, 777, 777, 64, 64, "causal"),  # a last query block of one row, two sequences
    (1, 4100, 4100, 64, 256, "causal"),  # long rows: the selection starts from the run maxima
    (1, 600, 1500, 64, 128, "offset"),  # the queries are the last 600 of 1500 keys
    (1, 500, 500, 64, 64, "shuffled"),  # unsorted key positions: every block masked
    (1, 900, 900, 64, 64, "packed"),  # documents: key blocks before a block's first are -inf
    (1, 1500, 1500, 32, 128, "causal"),  # GLM-5's 32 indexer heads
    (1, 1500, 1500, 128, 128, "causal"),
    (1, 1500, 1500, 16, 128, "packed"),
])
def test_gluon_scoring_selects_the_reference_top_k(B, S, Sk, HI, topk, case):
    q = R.hadamard_transform(torch.randn(B, S, HI, 128, device=DEV))
    k = R.hadamard_transform(torch.randn(B, Sk, 128, device=DEV))
    w = torch.randn(B, S, HI, device=DEV)
    q_pos = k_pos = q_doc = k_doc = None
    if case == "offset":
        q_pos = torch.arange(Sk - S, Sk, device=DEV)
    elif case == "shuffled":
        k_pos = torch.randperm(Sk, device=DEV)
        q_pos = torch.randint(0, Sk, (S,), device=DEV)
    elif case == "packed":
        q_doc = k_doc = R.document_ids(torch.tensor([0, 5, 300, 301, 700, S], device=DEV), S)
    kw = dict(q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, fp8=True)
    got = K.indexer_topk(q, k, w, topk, options=GLUON, **kw)
    triton_sel = K.indexer_topk(q, k, w, topk, options=TRITON, **kw)
    qd, kd = _dequantised(q, k)
    oracle = R.indexer_topk(qd, kd, w, topk, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc)
    qp, kp = R._positions(q_pos, S, DEV), R._positions(k_pos, Sk, DEV)
    mask = R.causal_mask(qp, kp, q_doc, k_doc)
    scores = _scores(qd, kd, w)
    # fp8 tensor-core products accumulate with reduced precision: near-ties within 1e-2 may swap
    check_topk(got, oracle, scores, mask, 1e-2)
    check_topk(got, triton_sel, scores, mask, 1e-2)


def test_score_kernel_option():
    assert KernelOptions().score_kernel == "auto"
    with pytest.raises(ValueError, match="score_kernel must be one of"):
        KernelOptions(score_kernel="cuda")


def test_forced_gluon_scoring_that_cannot_run_is_one_error():
    q = torch.randn(1, 40, 4, 32, device=DEV)
    k = torch.randn(1, 40, 32, device=DEV)
    w = torch.randn(1, 40, 4, device=DEV)
    for fp8 in (True, False):
        with pytest.raises(ValueError, match="score_kernel='gluon' cannot run these inputs"):
            K.indexer_topk(q, k, w, 8, fp8=fp8, options=GLUON)


def test_gluon_scoring_checks_its_inputs():
    q = torch.zeros(1, 8, 64, 128, device=DEV)
    k = torch.zeros(1, 8, 128, device=DEV)
    if not ON_HOPPER:
        assert "sm_90" in X.supported(q, k, True, 8) or "CUDA" in X.supported(q, k, True, 8)
        return
    assert X.supported(q, k, True, 8) is None and X.supported(q, k, True, 0) is None
    assert "FP8 indexer" in X.supported(q, k, False, 8)
    assert "head dim 128" in X.supported(q[..., :64], k[..., :64], True, 8)
    assert "16, 32, 64 or 128 indexer heads" in X.supported(q[:, :, :48], k, True, 8)
    assert "divide 64" in X.supported(q, k, True, 128)
    assert X.queries_per_block(64) == 8 and X.queries_per_block(128) == 4


def test_auto_takes_gluon_from_its_measured_indexer_heads(monkeypatch):
    # where the kernel could run, "auto" takes it from AUTO_MIN_HEADS indexer heads; the device's
    # answer is replaced so that the choice is seen on any machine (the patched launch scores
    # nothing: only the choice is checked)
    ran = []
    monkeypatch.setattr(X, "supported", lambda q, k, fp8, runs: None)
    monkeypatch.setattr(X, "score_chunk_ws", lambda q8, *a: ran.append(q8.shape[2]))
    monkeypatch.setattr(X, "AUTO_MIN_HEADS", 8)
    k = torch.randn(1, 24, 32, device=DEV)
    for HI in (4, 8, 16):
        q = torch.randn(1, 24, HI, 32, device=DEV)
        K.indexer_topk(q, k, torch.randn(1, 24, HI, device=DEV), 4, fp8=True)
    assert ran[0] == 8 and set(ran) == {8, 16}
    monkeypatch.setattr(X, "AUTO_MIN_HEADS", None)  # not measured faster: never
    ran.clear()
    K.indexer_topk(q, k, torch.randn(1, 24, 16, device=DEV), 4, fp8=True)
    assert ran == []
