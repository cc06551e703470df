"""The warp-specialised Gluon kernels (``kernels/sparse_attn_ws.py``: the forward, the backward's
dkv product) against the reference and the Triton kernels, and the options that choose them.

The kernels run only on an sm_90 GPU (Triton's interpreter does not run Gluon): there they are
compared with the reference in fp32 at 16 to 128 heads (partial head blocks included), with
selections shorter than a key block pair, -1 slots inside and at the end of rows, rows with no
valid key and key ranges. Everywhere, the options' values and the head count "auto" takes the
forward from are checked, and a forced Gluon kernel that cannot run is one clear error.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions  # noqa: E402
from megatron_dsa.kernels import sparse_attn as SA  # noqa: E402
from megatron_dsa.kernels import sparse_attn_ws as W  # noqa: E402

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEEDS_HOPPER = "the Gluon kernel needs an sm_90 GPU (Triton's interpreter does not run Gluon)"


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def test_the_option_takes_three_values():
    assert KernelOptions().attn_fwd_kernel == "auto"
    assert KernelOptions.from_dict({"attn_fwd_kernel": "triton"}).attn_fwd_kernel == "triton"
    with pytest.raises(ValueError, match="attn_fwd_kernel must be one of"):
        KernelOptions(attn_fwd_kernel="cuda")


@pytest.mark.parametrize("choice, tiles", [("attn_fwd_kernel", "attn_fwd"),
                                           ("attn_dkv_product_kernel", "attn_dkv_product")])
def test_triton_tiles_for_a_stage_forced_to_gluon_are_refused(choice, tiles):
    # the tiles would never apply: a forced Gluon kernel runs or raises, it does not fall back
    with pytest.raises(ValueError, match=f"{tiles} tiles launch the Triton kernel, which {choice}='gluon' never"):
        KernelOptions.from_dict({choice: "gluon", tiles: [64, 4, 2]})
    for other in ("auto", "triton"):
        assert getattr(KernelOptions.from_dict({choice: other, tiles: [64, 4, 2]}), tiles).BK == 64


def test_forcing_gluon_where_it_cannot_run_is_one_error():
    # fp32 inputs; on a machine without an sm_90 GPU the reason is the device
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 8, 16, 576, device=dev)
    kv = torch.randn(1, 8, 576, device=dev)
    idx = torch.zeros(1, 8, 4, dtype=torch.int32, device=dev)
    why = W.supported(q, kv, 512)
    assert why is not None
    with pytest.raises(ValueError, match="attn_fwd_kernel='gluon' cannot run these inputs"):
        SA.sparse_attn_fwd(q, kv, idx, 512, 576**-0.5, KernelOptions(attn_fwd_kernel="gluon"))


def test_supported_names_each_requirement():
    if ON_HOPPER:
        q = torch.randn(1, 2, 64, 576, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(1, 2, 576, device="cuda", dtype=torch.bfloat16)
        assert W.supported(q, kv, 512) is None
        assert "bf16" in W.supported(q.float(), kv.float(), 512)
        assert W.supported(q[:, :, :32], kv, 512) is None  # a partial head block runs
        assert "512 + 64 latent" in W.supported(q, kv, 256)
        wide = torch.randn(1, 2, 64, 584, device="cuda", dtype=torch.bfloat16)[..., :576]  # rows 584 apart
        assert "multiples of 16 elements" in W.supported(wide, kv, 512)
        # the dkv product: q, dO and the stored scores
        dout = torch.randn(1, 2, 64, 512, device="cuda", dtype=torch.bfloat16)
        ds = torch.empty(1, 2, 64, 2048, device="cuda", dtype=torch.bfloat16)
        assert W.dkv_product_supported(ds, q, dout) is None
        assert "dO (got torch.float32)" in W.dkv_product_supported(ds, q, dout.float())
        assert "top-k a multiple of 16" in W.dkv_product_supported(ds[..., :130], q, dout)
        wide_q = torch.randn(1, 2, 256, 576, device="cuda", dtype=torch.bfloat16)
        assert "at most 128 heads" in W.dkv_product_supported(ds, wide_q, dout)
    else:
        q = torch.randn(1, 2, 64, 576, dtype=torch.bfloat16)
        assert W.supported(q, q[:, :, 0], 512) is not None


def test_auto_takes_gluon_from_its_measured_head_count(monkeypatch):
    # where the kernel could run, "auto" takes it from AUTO_MIN_HEADS heads and the Triton kernel
    # below; the device's answer is replaced so that the choice is seen on any machine
    ran = []
    monkeypatch.setattr(W, "supported", lambda q, kv, v_dim: None)
    monkeypatch.setattr(W, "sparse_attn_fwd_ws", lambda q, *a: ran.append(q.shape[2]) or ("gluon", None))
    kv = torch.randn(1, 8, 576, dtype=torch.bfloat16)
    idx = torch.randint(0, 8, (1, 8, 4), dtype=torch.int32)
    for H in (W.AUTO_MIN_HEADS - 1, W.AUTO_MIN_HEADS, 128):
        q = torch.randn(1, 8, H, 576, dtype=torch.bfloat16)
        out, _ = SA.sparse_attn_fwd(q.to(DEV), kv.to(DEV), idx.to(DEV), 512, 576**-0.5)
        assert (out == "gluon") == (H >= W.AUTO_MIN_HEADS)
    assert ran == [W.AUTO_MIN_HEADS, 128]
    out, _ = SA.sparse_attn_fwd(q, kv, idx, 512, 576**-0.5, KernelOptions(attn_fwd_kernel="gluon"))
    assert out == "gluon"


def _selection(S, Sk, K, masked_rows):
    """Causal top-K of random scores, -1 padded, with a few -1 slots inside rows."""
    pos = torch.arange(Sk, device="cuda")
    t = torch.arange(S, device="cuda") + (Sk - S)
    sc = torch.rand(S, Sk, device="cuda").masked_fill(pos[None, :] > t[:, None], -1.0)
    v, i = sc.topk(min(K, Sk), dim=1)
    i = torch.where(v < 0, -1, i).int()
    idx = torch.full((S, K), -1, dtype=torch.int32, device="cuda")
    idx[:, :i.shape[1]] = i
    idx[1::7, 3] = -1  # a skipped slot inside a row
    idx[:masked_rows] = -1
    return idx[None]


@pytest.mark.skipif(not ON_HOPPER, reason=NEEDS_HOPPER)
@pytest.mark.parametrize("B,H,S,Sk,K,masked_rows", [
    (1, 64, 67, 300, 130, 2),     # fewer than two key blocks' worth, odd length
    (1, 32, 67, 300, 130, 2),     # half a head block (rows 32..63 are zero and not stored)
    (2, 96, 129, 1000, 512, 1),   # a full head block and a half one
    (1, 16, 33, 700, 300, 0),     # below the heads "auto" takes it from: forced
    (2, 128, 301, 1000, 256, 0),  # two sequences, two head blocks, one block pair
    (1, 64, 129, 4000, 2048, 3),  # the full selection, rows of fewer valid keys than K
])
def test_gluon_forward_equals_the_reference(B, H, S, Sk, K, masked_rows):
    q = torch.randn(B, S, H, 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(B, Sk, 576, device="cuda", dtype=torch.bfloat16)
    idx = torch.cat([_selection(S, Sk, K, masked_rows) for _ in range(B)])
    scale = 576**-0.5
    out, lse = W.sparse_attn_fwd_ws(q, kv, idx, 512, scale)
    out_r, lse_r = R.sparse_mla_attention(q.float(), kv.float(), idx, 512, scale)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = ((out.double() - out_r.double()).norm() / out_r.double().norm()).item()
    assert err < 1e-2, err
    has = torch.isfinite(lse_r)
    assert torch.equal(has, torch.isfinite(lse))
    assert (lse[has] - lse_r[has]).abs().max().item() < 1e-2
    assert (out[~has] == 0).all()
    # the dispatch picks it by default (from AUTO_MIN_HEADS heads), and the Triton kernel agrees
    out_d, _ = SA.sparse_attn_fwd(q, kv, idx, 512, scale, KernelOptions(attn_fwd_kernel="gluon"))
    assert torch.equal(out_d, out)
    if H >= W.AUTO_MIN_HEADS:
        assert torch.equal(SA.sparse_attn_fwd(q, kv, idx, 512, scale)[0], out)
    out_t, _ = SA.sparse_attn_fwd(q, kv, idx, 512, scale, KernelOptions(attn_fwd_kernel="triton"))
    assert ((out_t.double() - out.double()).norm() / out_t.double().norm()).item() < 1e-2


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(not ON_HOPPER, reason=NEEDS_HOPPER)
@pytest.mark.parametrize("B,H,S,Sk,K,masked_rows,passes", [
    (1, 64, 67, 300, 128, 2, 1),     # fewer keys than a block pair, odd length
    (2, 96, 129, 1000, 512, 1, 3),   # a full head block and a half one, key ranges (sorted slots)
    (1, 128, 65, 4000, 2048, 3, 1),  # the full selection, two head blocks
    (1, 128, 40, 3000, 1024, 0, 4),  # key ranges at 128 heads
    (1, 32, 33, 700, 304, 0, 1),     # half a head block
])
def test_gluon_dkv_product_equals_the_reference(B, H, S, Sk, K, masked_rows, passes):
    # the stored-scores backward with its dkv product in Gluon and in Triton, against the
    # reference in fp32
    q = torch.randn(B, S, H, 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(B, Sk, 576, device="cuda", dtype=torch.bfloat16)
    idx = torch.cat([_selection(S, Sk, K, masked_rows) for _ in range(B)])
    dout = torch.randn(B, S, H, 512, device="cuda", dtype=torch.bfloat16)
    scale = 576**-0.5
    out, lse = SA.sparse_attn_fwd(q, kv, idx, 512, scale)
    ref = R.sparse_mla_attention_backward(q.float(), kv.float(), idx, out.float(), lse, dout.float(), 512, scale)
    grads = {}
    for kernel in ("triton", "gluon"):
        opts = KernelOptions(attn_bwd_split=True, split_bwd="stored_scores", key_passes=passes,
                             attn_dkv_product_kernel=kernel)
        grads[kernel] = SA.sparse_attn_bwd(q, kv, idx, out, lse, dout, 512, scale, opts, head_sum=True)
    base = grads["triton"]
    for kernels, got in grads.items():
        for g, want, b, name in zip(got, ref, base, ("dq", "dkv", "head sum")):
            assert torch.isfinite(g).all(), (kernels, name)
            assert _rel(g, want) < 2e-2, (kernels, name, _rel(g, want))
            assert _rel(g, b) < 1e-2, (kernels, name, _rel(g, b))
        # dq and the head sum come from the same Triton kernels (the head sum's adds in any order)
        assert _rel(got[0], base[0]) < 1e-6 and _rel(got[2], base[2]) < 1e-6, kernels


@pytest.mark.skipif(not ON_HOPPER, reason=NEEDS_HOPPER)
@pytest.mark.parametrize("B,H,S,passes", [(2, 128, 700, 3), (1, 48, 1000, 1), (1, 128, 3000, 4)])
def test_gluon_dkv_product_equals_a_pytorch_sum(B, H, S, passes):
    # the kernel alone (the value columns in pairs, the rope columns on alternate blocks), with
    # many work items a program (more tokens x column blocks than SMs), rows from t0, key ranges,
    # -1 slots: against the fp32 sum over heads of ds^T q + p^T dO, added per selected key. At
    # S = Sk the early rows have keys in the first ranges only: their items in the later passes
    # are skipped
    Sk, K, t0 = 3000, 256, 37
    q = torch.randn(B, S, H, 576, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(B, S, H, 512, device="cuda", dtype=torch.bfloat16)
    idx = torch.cat([_selection(S, Sk, K, 2) for _ in range(B)])
    idx_s, _, seg = SA.key_segments(idx, Sk, passes)
    rows = S - t0
    ds = torch.randn(B, rows, H, K, device="cuda", dtype=torch.bfloat16)
    p = torch.randn(B, rows, H, K, device="cuda", dtype=torch.bfloat16)
    dkv = torch.zeros(B, Sk, 576, device="cuda")
    for pass_id in range(passes):
        W.dkv_product_ws(ds, p, q, dout, idx_s, seg, dkv, t0, S, pass_id, passes, 512)
    part = torch.einsum("bthk,bthd->btkd", ds.float(), q[:, t0:].float())
    part[..., :512] += torch.einsum("bthk,bthd->btkd", p.float(), dout[:, t0:].float())
    keys = idx_s[:, t0:].long()
    ok = keys >= 0
    want = torch.zeros_like(dkv)
    for b in range(B):
        want[b].index_add_(0, keys[b][ok[b]], part[b][ok[b]])
    assert torch.isfinite(dkv).all()
    assert _rel(dkv, want) < 1e-5, _rel(dkv, want)


def test_backward_kernel_options():
    assert KernelOptions().attn_dkv_product_kernel == "auto"
    with pytest.raises(ValueError, match="attn_dkv_product_kernel must be one of"):
        KernelOptions(attn_dkv_product_kernel="cuda")
    # forced where it cannot run (fp32 here; on a machine without an sm_90 GPU, the device)
    q = torch.randn(1, 8, 16, 576, device=DEV)
    kv = torch.randn(1, 8, 576, device=DEV)
    idx = torch.zeros(1, 8, 4, dtype=torch.int32, device=DEV)
    out, lse = SA.sparse_attn_fwd(q, kv, idx, 512, 576**-0.5)
    opts = KernelOptions(attn_bwd_split=True, split_bwd="stored_scores", attn_dkv_product_kernel="gluon")
    with pytest.raises(ValueError, match="attn_dkv_product_kernel='gluon' cannot run these inputs"):
        SA.sparse_attn_bwd(q, kv, idx, out, lse, torch.randn_like(out), 512, 576**-0.5, opts)
