"""The decode kernels over a paged cache vs the reference, on fresh random inputs: ragged lengths,
rows shorter than top-k, FP8 / fp32 / bf16 indexer keys, 8 to 128 heads.

Without CUDA the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1),
at small dims.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.kernels import available  # noqa: E402
from megatron_dsa.kernels import decode as D  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions, Tiles  # noqa: E402

pytestmark = pytest.mark.skipif(not available(), reason="needs Triton with CUDA or TRITON_INTERPRET=1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 4  # rows per cache block: small, so a sequence spans many blocks


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def paged(lengths, dim, dtype=torch.float32, spare_blocks=3):
    """A pool with the sequences' blocks in shuffled order (and unused ones), its block table and
    the same rows unpaged [B, max_len, dim]."""
    B = len(lengths)
    per_seq = -(-max(lengths) // BLOCK)
    pool_blocks = B * per_seq + spare_blocks
    order = torch.randperm(pool_blocks)[: B * per_seq].view(B, per_seq)
    rows = torch.randn(B, per_seq * BLOCK, dim, device=DEV).to(dtype)
    pool = torch.randn(pool_blocks, BLOCK, dim, device=DEV).to(dtype)  # unused rows: noise, never read
    pool[order.flatten()] = rows.view(B * per_seq, BLOCK, dim)
    return pool, order.to(DEV, torch.int32), rows, torch.tensor(lengths, device=DEV)


def assert_close(got, want, tol):
    assert not torch.isnan(got).any()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.float().abs().max().item()), err


def test_paged_rows_equal_the_unpaged_rows():
    pool, table, rows, lengths = paged([9, 3, 14], 8)
    pos = torch.tensor([[0, 5, 8, -1], [2, 1, 0, 0], [13, 4, 7, 12]], device=DEV)
    got = R.paged_rows(pool, table, pos)
    want = torch.stack([rows[b, pos[b].clamp_min(0)] for b in range(3)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("heads", [8, 16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_and_dense_decode_equal_the_reference(heads, dtype):
    v_dim, rope, topk = 32, 16, 12
    lengths = [23, 5, 40]  # the second shorter than top-k
    pool, table, _, lens = paged(lengths, v_dim + rope, dtype)
    q = torch.randn(len(lengths), heads, v_dim + rope, device=DEV).to(dtype)
    scale = (v_dim + rope) ** -0.5
    sel = torch.stack([torch.cat([torch.randperm(n, device=DEV)[:topk],
                                  torch.full((max(0, topk - n),), -1, device=DEV)]) for n in lengths]).to(torch.int32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # Default launches, then small blocks from the options (many blocks per split).
    for splits, options in ((1, KernelOptions()), (3, KernelOptions(decode_attn=Tiles(16, 4, 1)))):
        out, lse = D.sparse_mla_decode(q, pool, table, sel, v_dim, scale, lengths=lens, splits=splits, options=options)
        ref_out, ref_lse = R.sparse_mla_decode(q, pool, table, sel, v_dim, scale)
        assert out.dtype == dtype and out.shape == (3, heads, v_dim)
        assert_close(out, ref_out, tol)
        assert_close(lse, ref_lse, 1e-5 if dtype == torch.float32 else 1e-2)
        out, lse = D.dense_mla_decode(q, pool, table, lens, v_dim, scale, splits=splits, options=options)
        ref_out, ref_lse = R.dense_mla_decode(q, pool, table, lens, v_dim, scale)
        assert_close(out, ref_out, tol)
        assert_close(lse, ref_lse, 1e-5 if dtype == torch.float32 else 1e-2)


def test_sparse_decode_of_a_row_without_selection_is_zero_not_nan():
    pool, table, _, lens = paged([6, 6], 48)
    q = torch.randn(2, 8, 48, device=DEV)
    sel = torch.full((2, 8), -1, device=DEV, dtype=torch.int32)
    sel[0, :3] = torch.tensor([5, 0, 2])
    out, lse = D.sparse_mla_decode(q, pool, table, sel, 32, 0.1, lengths=lens, splits=2)
    ref_out, ref_lse = R.sparse_mla_decode(q, pool, table, sel, 32, 0.1)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == float("-inf")).all())
    assert_close(out, ref_out, 1e-5)


@pytest.mark.parametrize("keys", ["fp8", "fp32", "bf16"])
def test_paged_indexer_topk_equals_the_reference(keys):
    HI, DI, topk = 4, 32, 10
    lengths = [31, 7, 18]  # the second shorter than top-k
    B = len(lengths)
    pool, table, _, lens = paged(lengths, DI)
    scales = None
    if keys == "fp8":
        pool, scales = R.fp8_quantize(pool)
    elif keys == "bf16":
        pool = pool.to(torch.bfloat16)
    q = torch.randn(B, HI, DI, device=DEV)
    w = torch.randn(B, HI, device=DEV)
    scores = D.paged_indexer_scores(q, w, pool, scales, table, lens)
    width = table.shape[1] * BLOCK
    pos = torch.arange(width, device=DEV)[None].expand(B, -1)
    keys_f = R.dequantize_keys(R.paged_rows(pool, table, pos), None if scales is None else R.paged_rows(scales, table, pos))
    q_f = R.fp8_rounded(q) if keys == "fp8" else q  # FP8 keys: an FP8 query as well
    want = R.indexer_scores(q_f[:, None], keys_f, w[:, None])[:, 0].masked_fill(pos >= lens[:, None], float("-inf"))
    assert torch.equal(torch.isinf(scores), torch.isinf(want))
    finite = torch.isfinite(want)
    # Fewer keys per program (the options' launch) scores the same, up to the order in which a
    # GPU's e4m3 products accumulate.
    same = 1e-3 if keys == "fp8" and DEV == "cuda" else 1e-5
    small = D.paged_indexer_scores(q, w, pool, scales, table, lens, options=KernelOptions(decode_index=Tiles(16, 2, 1)))
    assert torch.equal(torch.isinf(small), torch.isinf(want))
    assert_close(small[finite], scores[finite], same)
    # A program looping over several key blocks (one per sequence; and uneven runs whose last
    # program passes the width) scores the same.
    for programs in (B, 2 * B + 1):
        looped = D.paged_indexer_scores(q, w, pool, scales, table, lens, programs=programs,
                                        options=KernelOptions(decode_index=Tiles(16, 2, 2)))
        assert torch.equal(torch.isinf(looped), torch.isinf(want))
        assert_close(looped[finite], scores[finite], same)
    # On a GPU the e4m3 products accumulate on the tensor cores at reduced precision; the
    # interpreter computes them in fp32.
    tol = 1e-2 if keys == "bf16" or (keys == "fp8" and DEV == "cuda") else 1e-5
    assert_close(scores[finite], want[finite], tol)
    got = D.paged_indexer_topk(q, w, pool, scales, table, lens, topk)
    ref = R.paged_indexer_topk(q, w, pool, scales, table, lens, topk)
    assert torch.equal((got >= 0).sum(-1), torch.tensor([10, 7, 10], device=DEV))
    # The same sets up to rounding: the selected scores agree.
    picked = lambda idx: torch.where(idx >= 0, want.gather(1, idx.clamp_min(0)), 0.0)  # noqa: E731
    assert_close(picked(got).sum(-1), picked(ref).sum(-1), max(tol, 1e-4))


@pytest.mark.parametrize("piece", [64, 8])  # one piece of each row, or several (the last one short)
def test_select_topk_keeps_the_reference_tie_rule_and_order(piece):
    scores = torch.randint(0, 4, (7, 40), device=DEV).float()  # many ties
    scores[0, 3:] = float("-inf")  # fewer eligible keys than k
    scores[1] = float("-inf")  # none
    scores[2] = torch.randn(40, device=DEV) * 1e30  # every digit of the order keys matters
    scores[3, ::3] = -0.0  # signed zeros, negatives and ties across pieces
    scores[3, 1::3] = torch.randn(14, device=DEV)[:len(range(1, 40, 3))]
    mask = torch.isfinite(scores)
    for k in (1, 7, 13, 40, 45):
        want = R.topk_from_scores(scores, mask, k)
        assert torch.equal(D.select_topk(scores, k, piece), want), k
        # Unordered: the same set in position order, the padding last.
        last = scores.shape[1]
        in_order = torch.where(want >= 0, want, last).sort(-1).values
        assert torch.equal(D.select_topk(scores, k, piece, ordered=False), in_order.masked_fill(in_order == last, -1)), k
    wide = torch.randn(3, 1000, device=DEV).half().float()  # fp16-rounded: ties among random scores
    wide[1, 600:] = float("-inf")
    for k in (1, 100, 700):
        assert torch.equal(D.select_topk(wide, k, 128), R.topk_from_scores(wide, torch.isfinite(wide), k)), k
