"""Triton kernels vs the reference, on fresh random inputs.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 is
set below before triton is imported), at small shapes.  With CUDA they run on the GPU.
"""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from megatron_dsa import kernels as K  # noqa: E402
from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions, Tiles  # noqa: E402
from helpers import check_topk, key_ordered_selection  # noqa: E402

pytestmark = pytest.mark.skipif(not K.available(), reason="needs Triton with CUDA or TRITON_INTERPRET=1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BIG = DEV == "cuda"  # larger shapes on the GPU


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


# The sparse backwards: one pass or several key ranges (the L2-resident adds), and the
# attention's backward as one kernel or two (dq, then dkv with the keys as the products' rows);
# the split one's kernels recomputing the scores or sharing the stored ones.
VARIANTS = {
    "one_pass": KernelOptions(key_passes=1, attn_bwd_split=False),
    # A 1 KB workspace: the key ranges' sort, the head sum's way back to slot order, dq's fp32
    # rows and sum(dO * O) go a row or two at a time.
    "key_ranges": KernelOptions(key_passes=3, attn_bwd_split=False, workspace_bytes=1 << 10),
    "split": KernelOptions(key_passes=1, attn_bwd_split=True, split_bwd="recompute"),
    "split_key_ranges": KernelOptions(key_passes=4, attn_bwd_split=True, split_bwd="recompute",
                                      workspace_bytes=1 << 10),
    "split_stored_ds": KernelOptions(key_passes=4, attn_bwd_split=True, split_bwd="stored_ds"),
    # the storing kernel's heads in groups of 16 (the head sum added across the groups)
    "split_stored_scores": KernelOptions(key_passes=4, attn_bwd_split=True, split_bwd="stored_scores",
                                         scores_heads=16),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _finite(*ts):
    for t in ts:
        assert not torch.isnan(t).any(), "NaN in output"


def _fp32_leaves(*ts):
    """fp32 copies (leaves, same requires_grad) for the higher-precision oracle.

    For bf16 inputs the oracle is the reference run in fp32: the reference's own bf16 path
    accumulates its gather backward (index scatter-add) in bf16, ~1-2e-2 off on dkv / dk_idx,
    while the kernels accumulate in fp32.
    """
    return [t.detach().float().requires_grad_(t.requires_grad) for t in ts]


TOPK_CASES = [
    # B, Sq, Sk, HI, DI, topk, dtype, positions
    (1, 70, 70, 4, 32, 16, torch.float32, "causal"),
    (2, 45, 45, 3, 16, 64, torch.bfloat16, "causal"),  # every row shorter than topk
    (1, 50, 90, 2, 64, 24, torch.float32, "offset"),  # queries are the last 50 of 90 keys
    (1, 33, 40, 2, 32, 12, torch.float32, "shuffled"),  # unsorted key positions
]


@pytest.mark.parametrize("B,Sq,Sk,HI,DI,topk,dtype,pos", TOPK_CASES)
def test_indexer_topk(B, Sq, Sk, HI, DI, topk, dtype, pos):
    if BIG:
        Sq, Sk, topk = Sq * 20, Sk * 20, topk * 8
    q = torch.randn(B, Sq, HI, DI, device=DEV).to(dtype)
    k = torch.randn(B, Sk, DI, device=DEV).to(dtype)
    w = torch.randn(B, Sq, HI, device=DEV)
    q_pos = k_pos = None
    if pos == "offset":
        q_pos = torch.arange(Sk - Sq, Sk, device=DEV)
    elif pos == "shuffled":
        k_pos = torch.randperm(Sk, device=DEV)
        q_pos = torch.randint(0, Sk, (Sq,), device=DEV)
    got = K.indexer_topk(q, k, w, topk, q_pos, k_pos)
    ref = R.indexer_topk(q, k, w, topk, q_pos, k_pos)
    qp = R._positions(q_pos, Sq, DEV)
    kp = R._positions(k_pos, Sk, DEV)
    check_topk(got, ref, R.indexer_scores(q, k, w), R.causal_mask(qp, kp), 1e-4)


def test_indexer_topk_ties_go_to_smaller_index():
    B, S, HI, DI, topk = 1, 60, 2, 16, 10
    # Small integers and powers of two: every score is exact, so equal keys tie exactly.
    distinct = torch.randint(-2, 3, (4, DI), device=DEV).float()
    k = distinct[torch.randint(0, 4, (S,), device=DEV)][None]  # many exactly equal keys
    q = torch.randint(-2, 3, (B, S, HI, DI), device=DEV).float()
    w = 2.0 ** torch.randint(-2, 3, (B, S, HI), device=DEV).float()
    got = K.indexer_topk(q, k, w, topk)
    ref = R.indexer_topk(q, k, w, topk)
    for t in range(S):
        assert set(got[0, t].tolist()) == set(ref[0, t].tolist()), t


def test_fp8_quantize_is_bit_identical_to_the_reference():
    """The one-pass Triton quantiser equals the PyTorch one bit for bit: random vectors (bf16 and
    fp32, all-zero vectors at the amax floor) and every e4m3 value, every midpoint between two
    neighbours (ties to even) and the floats just either side of each midpoint."""
    from megatron_dsa.kernels import indexer as I

    def same(x):
        a, sa = I.fp8_quantize(x)
        b, sb = R.fp8_quantize(x)
        assert torch.equal(sa, sb)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    for shape, dtype in (((2, 37, 3, 64), torch.float32), ((1, 50, 128), torch.bfloat16), ((1, 9, 2, 48), torch.bfloat16)):
        x = (torch.randn(*shape, device=DEV) * 3).to(dtype)
        x[:, 0] = 0
        same(x)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([grid, mid, mid.nextafter(mid + 1), mid.nextafter(mid - 1), torch.tensor([-0.0])])
    # A second column of 448 fixes each row's scale at exactly 1: the values are quantised as they are.
    same(torch.stack([v, torch.full_like(v, 448.0)], -1)[None].to(DEV))


def test_indexer_topk_selection_launch():
    """The scoring's and the selection's launches (keys per tile or step, warps, stages) change
    their loops, not the result: steps shorter than a row equal the reference, ties included."""
    S, HI, DI, topk = (2000, 8, 64, 256) if BIG else (90, 3, 16, 24)
    q, k, w = torch.randn(2, S, HI, DI, device=DEV), torch.randn(2, S, DI, device=DEV), torch.randn(2, S, HI, device=DEV)
    k[1, S // 3 :] = k[1, : S - S // 3].clone()  # exact ties at the threshold
    got = K.indexer_topk(q, k, w, topk, options=KernelOptions(select=Tiles(32, 2, 2), score=Tiles(16, 2, 2)))
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    check_topk(got, R.indexer_topk(q, k, w, topk), R.indexer_scores(q, k, w), mask, 1e-4)


def test_selection_register_cap_reaches_its_launch(monkeypatch):
    """``select_max_registers`` is the selection launch's maxnreg (by default the measured cap on
    the GPU, none in the interpreter); with 64 the selection (spilling on the GPU) equals the
    reference."""
    from megatron_dsa.kernels import indexer as KI

    real, launches = KI._select_kernel, []

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs.get("maxnreg"))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(KI, "_select_kernel", Recorded())
    S, HI, DI, topk = (2000, 8, 64, 256) if BIG else (90, 3, 16, 24)
    q, k, w = torch.randn(2, S, HI, DI, device=DEV), torch.randn(2, S, DI, device=DEV), torch.randn(2, S, HI, device=DEV)
    k[1, S // 3 :] = k[1, : S - S // 3].clone()  # exact ties at the threshold
    got = K.indexer_topk(q, k, w, topk, options=KernelOptions(select_max_registers=64))
    assert launches and set(launches) == {64}
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    check_topk(got, R.indexer_topk(q, k, w, topk), R.indexer_scores(q, k, w), mask, 1e-4)
    launches.clear()
    default = KI.SELECT_MAX_REGISTERS if DEV == "cuda" else None
    assert torch.equal(K.indexer_topk(q, k, w, topk), got) and set(launches) == {default}


def test_selection_overlapping_the_next_chunks_scoring_selects_the_same():
    """With ``select_overlap`` the chunks of rows alternate between two score buffers (on CUDA
    each chunk is selected on a second stream while the next one is scored): over many chunks,
    the same top-k as one buffer, ordered or as sets, and as the reference (ties included)."""
    S, HI, DI, topk = (3000, 8, 64, 256) if BIG else (70, 2, 16, 12)
    q, k, w = torch.randn(1, S, HI, DI, device=DEV), torch.randn(1, S, DI, device=DEV), torch.randn(1, S, HI, device=DEV)
    k[0, S // 2 :] = k[0, : S - S // 2].clone()  # exact ties at the threshold
    rows = 64 if BIG else 16  # the scoring tile's query rows: the smallest chunk
    few_rows = KernelOptions(workspace_bytes=2 * rows * S * 4, select_overlap=True)  # a chunk a buffer
    one_buffer = KernelOptions(select_overlap=False)
    got = K.indexer_topk(q, k, w, topk, options=few_rows)
    assert torch.equal(got, K.indexer_topk(q, k, w, topk, options=one_buffer))
    sets = K.indexer_topk(q, k, w, topk, ordered=False, options=few_rows)
    assert torch.equal(sets, K.indexer_topk(q, k, w, topk, ordered=False, options=one_buffer))
    assert torch.equal(sets.sort(dim=-1).values, got.sort(dim=-1).values)
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    check_topk(got, R.indexer_topk(q, k, w, topk), R.indexer_scores(q, k, w), mask, 1e-4)


@pytest.mark.parametrize("cap,group,bits,sample,values", [
    (0, 2, None, None, False), (2, 2, None, None, True), (4096, 0, None, None, True), (4096, 2, None, None, False),
    (36, 2, None, None, True), (0, 2, 5, None, False), (4096, 2, 8, None, True), (36, 2, 6, None, False),
    (36, 2, None, 0, False), (4096, 0, None, 0, True), (36, 0, None, 8, True)])
def test_indexer_topk_selection_paths(cap, group, bits, sample, values):
    """Every selection path equals the reference: the threshold resolved from the keys at or
    above the run maxima's bound (group > 0, cap large: long rows; cap 36: the rows whose list
    fits) or a sample's (where the runs' list passes the cap, or group 0: listed from the row;
    sample 0: none), from the listed keys sharing its top bits (group 0, or short rows), from
    more row passes (cap 0), or per row either way (cap 2: random rows fit, rows with crowded
    ties do not); with the default 7-bit digits and 5-, 6- and 8-bit ones (the last digit is
    what is left of the 32 bits); the lists holding their keys' scores (``values``) or
    gathering them from the row.  ``ordered=False`` returns the same sets, each
    row in key order (-1 last) on every path: the attention's backward takes such rows without
    sorting them."""
    S, HI, DI, topk = (2000, 8, 64, 256) if BIG else (90, 3, 16, 24)
    q = torch.randn(2, S, HI, DI, device=DEV)
    k = torch.randn(2, S, DI, device=DEV)
    k[1, S // 3 :] = k[1, : S - S // 3].clone()  # batch 1: keys repeat: exact ties at the threshold
    w = torch.randn(2, S, HI, device=DEV)
    opts = KernelOptions(select_runs=group, select_cap=cap, select_digit_bits=bits, select_sample=sample,
                         select_list_values=values,
                         select_guess=0)  # the guessed bound: test_selection_checks_its_guessed_bound
    got = K.indexer_topk(q, k, w, topk, options=opts)
    ref = R.indexer_topk(q, k, w, topk)
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    check_topk(got, ref, R.indexer_scores(q, k, w), mask, 1e-4)
    unordered = K.indexer_topk(q, k, w, topk, ordered=False, options=opts)
    assert torch.equal(unordered.sort(-1).values, got.sort(-1).values)
    keys = torch.where(unordered >= 0, unordered, torch.iinfo(unordered.dtype).max)
    assert bool((keys[..., 1:] >= keys[..., :-1]).all()), "unordered rows are not in key order"
    packed = K.compact_selection(unordered, S)  # what a training step keeps for its backward
    assert packed is not None and torch.equal(K.expand_selection(*packed), unordered)


@pytest.mark.parametrize("group", [2, 0])
def test_selection_checks_its_sampled_bound(group):
    """A sample unlike its row: every 4th key's score is 10x (positive weights, so relu scales
    it), so the sampled keys crowd the top and the sample's bound lies above the threshold
    (fewer than top-k keys reach it). The selection must notice and take the row's passes: the
    same top-k as the reference. Rows whose scores rise with the key's position (the top-k
    crowded at the recent end, where the runs' bound is loosest) too."""
    S, HI, DI, topk = (2000, 8, 64, 256) if BIG else (90, 3, 16, 24)
    q = torch.randn(1, S, HI, DI, device=DEV)
    k = torch.randn(1, S, DI, device=DEV)
    k[0, ::4] *= 10.0
    w = torch.rand(1, S, HI, device=DEV) + 0.1
    # A cap below top-k: the runs' list always passes it, so every long row tries the sample
    # (no guessed bound first, which the same cap would refuse too).
    opts = KernelOptions(select_runs=group, select_sample=4, select_cap=topk - 1, select_guess=0)
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    counts = torch.zeros(4, dtype=torch.int32, device=DEV)
    check_topk(K.indexer_topk(q, k, w, topk, options=opts, path_counts=counts), R.indexer_topk(q, k, w, topk),
               R.indexer_scores(q, k, w), mask, 1e-4)
    assert counts[0] == 0 and counts[1] == 0 and counts[3] > 0, counts  # no list fits a cap below top-k
    # Scores that rise with the key's position (q = e0, w = 1: a key's score is its k[0]),
    # the top-k crowded at the recent end: the runs' bound lists about 100 keys of a long row,
    # past the cap, and the sample's (every other key) about 82, which the selection takes.
    S, topk = 130, 50
    q = torch.zeros(1, S, 1, DI, device=DEV)
    q[..., 0] = 1.0
    k = torch.zeros(1, S, DI, device=DEV)
    k[0, :, 0] = torch.arange(S, device=DEV) + 5.0 + 3.0 * torch.randn(S, device=DEV)
    w = torch.ones(1, S, 1, device=DEV)
    opts = KernelOptions(select_runs=group, select_sample=2, select_cap=90, select_guess=0)
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    counts = torch.zeros(4, dtype=torch.int32, device=DEV)
    check_topk(K.indexer_topk(q, k, w, topk, options=opts, path_counts=counts), R.indexer_topk(q, k, w, topk),
               R.indexer_scores(q, k, w), mask, 1e-4)
    assert counts[0] == 0 and counts[2] > 0, counts  # the sample's list served the long rows


@pytest.mark.parametrize("margin,tight", [(0.25, False), (0.01, False), (0.25, True), (50.0, True)])
def test_selection_checks_its_guessed_bound(margin, tight):
    """The bound guessed from the threshold of a row of the chunk selected before
    (``select_guess``: that many standard deviations of the row's run maxima lower): rows it
    serves, rows where it lies above the threshold (margin 0.01: fewer than top-k keys reach it)
    and rows where it lists past the cap (``tight``: 1.5 x top-k; margin 50) take the runs' bound
    instead; ``path_counts`` shows which bounds served, and every case equals the reference
    (ties included) and the selection without a guess (its lists holding their keys' scores)."""
    S, HI, DI, topk = (2000, 8, 64, 256) if BIG else (90, 3, 16, 24)
    # At margin 0.01 the interpreter's short rows fall through on 4-21 of 88 guessed rows a two-
    # sequence batch: four sequences make a batch where none does unlikely enough to rely on.
    B = 4 if margin == 0.01 and not BIG else 2
    q = torch.randn(B, S, HI, DI, device=DEV)
    k = torch.randn(B, S, DI, device=DEV)
    k[1, S // 3 :] = k[1, : S - S // 3].clone()  # batch 1: keys repeat: exact ties at the threshold
    w = torch.randn(B, S, HI, device=DEV)
    counts = torch.zeros(4, dtype=torch.int32, device=DEV)
    rows = 64 if BIG else 16  # the scoring tile's query rows: chunks of one or two tiles
    opts = KernelOptions(select_runs=2, select_guess=margin, select_cap=topk * 3 // 2 if tight else 4096,
                         select_sample=0, workspace_bytes=2 * rows * B * S * 4)
    got = K.indexer_topk(q, k, w, topk, options=opts, path_counts=counts)
    guessed, runs, sampled, passes = counts.tolist()
    assert guessed + runs + sampled + passes == B * S and sampled == 0
    if margin == 50.0:  # every guess lists past the cap
        assert guessed == 0 and runs > 0, counts
    elif tight:  # some lists pass the cap, those rows fall through
        assert runs > 0, counts
    elif margin == 0.01:  # some guesses lie above the threshold
        assert guessed > 0 and runs > 0, counts
    else:
        assert guessed > 0, counts
    ref = R.indexer_topk(q, k, w, topk)
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    check_topk(got, ref, R.indexer_scores(q, k, w), mask, 1e-4)
    unguessed = dataclasses.replace(opts, select_guess=0, select_list_values=True)
    assert torch.equal(got, K.indexer_topk(q, k, w, topk, options=unguessed))


def test_selection_path_counts_refuses_a_wrong_buffer():
    """``path_counts`` must be int32 [4] on the inputs' device: one clear error, nothing run."""
    q, k, w = torch.randn(1, 8, 2, 16, device=DEV), torch.randn(1, 8, 16, device=DEV), torch.randn(1, 8, 2, device=DEV)
    with pytest.raises(ValueError, match="path_counts must be an int32 tensor of shape"):
        K.indexer_topk(q, k, w, 4, path_counts=torch.zeros(3, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="path_counts must be an int32 tensor of shape"):
        K.indexer_topk(q, k, w, 4, path_counts=torch.zeros(4, dtype=torch.int64, device=DEV))


def test_indexer_topk_refuses_runs_that_split_a_scoring_tile_before_any_compute(monkeypatch):
    """select_runs must divide the scoring tile's keys: one error, raised before the inputs are
    quantised or any kernel runs."""
    from megatron_dsa.kernels import indexer as I

    def no_compute(*_):
        raise AssertionError("quantised before the options were checked")

    monkeypatch.setattr(I, "fp8_quantize", no_compute)
    q, k, w = torch.randn(1, 8, 2, 64, device=DEV), torch.randn(1, 8, 64, device=DEV), torch.randn(1, 8, 2, device=DEV)
    runs = 2 * (I.SCORE_CFG["fp8"]["BN"] if DEV == "cuda" else 32)
    with pytest.raises(ValueError, match=f"select_runs={runs} must divide the scoring tile"):
        K.indexer_topk(q, k, w, 4, fp8=True, options=KernelOptions(select_runs=runs))


def _rows_in_key_order(B, S, K, n_keys):
    """Rows of distinct keys < n_keys in ascending order, -1 padded, of lengths 0..K (an empty
    row, a full row, one holding the first and last key of a block of 2^16 and the last key)."""
    idx = key_ordered_selection(B, S, K, n_keys, torch.Generator().manual_seed(int(torch.randint(1 << 30, ()))))
    idx[0, 0], idx[0, 1] = -1, torch.randperm(n_keys)[:K].sort().values.to(torch.int32)
    edges = sorted({0, min(65535, n_keys - 1), min(65536, n_keys - 1), n_keys - 1})
    idx[0, 2] = -1
    idx[0, 2, :len(edges)] = torch.tensor(edges, dtype=torch.int32)
    return idx


@pytest.mark.parametrize("n_keys,K_", [(100, 37), (65537, 64), (300000, 33)])
def test_compact_selection_equals_the_reference(n_keys, K_):
    """The one-pass packing gives the reference's int16 low halves and block ends, unpacking
    gives the int32 rows back, and a row out of key order, with padding before a key, or with a
    key past the last block is refused (None) as the reference refuses it."""
    idx = _rows_in_key_order(2, 5, K_, n_keys)
    got, want = K.compact_selection(idx.to(DEV), n_keys), R.compact_selection(idx, n_keys)
    assert got is not None and want is not None
    assert got[0].dtype == torch.int16 and got[1].dtype == torch.int32
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert torch.equal(K.expand_selection(*got).cpu(), idx)
    assert torch.equal(R.expand_selection(*want), idx)
    bad = []
    for slots, keys in (((0, 1), (5, 3)), ((0, 1, 2), (-1, 4, 7)), ((0,), (R.selection_key_blocks(n_keys) << 16,))):
        b = idx.clone()
        b[1, 3] = -1
        b[1, 3, list(slots)] = torch.tensor(keys, dtype=torch.int32)
        bad.append(b)
    for b in bad:
        assert R.compact_selection(b, n_keys) is None
        assert K.compact_selection(b.to(DEV), n_keys) is None


@pytest.mark.parametrize("B,S,HI,DI,topk", [(1, 150, 4, 64, 32)])
def test_indexer_topk_fp8(B, S, HI, DI, topk):
    if BIG:
        S, topk = 4096, 512
    q = R.hadamard_transform(torch.randn(B, S, HI, DI, device=DEV))
    k = R.hadamard_transform(torch.randn(B, S, DI, device=DEV))
    w = torch.randn(B, S, HI, device=DEV)
    got = K.indexer_topk(q, k, w, topk, fp8=True)
    # Exact oracle: the reference on the dequantised fp8 inputs.
    q8, qs = K.fp8_quantize(q)
    k8, ks = K.fp8_quantize(k)
    qd, kd = q8.float() * qs[..., None], k8.float() * ks[..., None]
    oracle = R.indexer_topk(qd, kd, w, topk)
    mask = R.causal_mask(torch.arange(S, device=DEV), torch.arange(S, device=DEV))
    # fp8 tensor-core products accumulate with reduced precision on Hopper (the H200 showed
    # order swaps beyond 2e-3 of the row max): near-ties within 1e-2 may swap.
    check_topk(got, oracle, R.indexer_scores(qd, kd, w), mask, 1e-2)
    # Overlap with the full-precision top-k (rows with fewer eligible keys than topk count 1).
    ref = R.indexer_topk(q, k, w, topk)
    hits = ((got[..., :, None] == ref[..., None, :]) & (ref[..., None, :] >= 0)).any(-1).sum(-1)
    overlap = (hits.float() / (ref >= 0).sum(-1).clamp_min(1)).mean().item()
    # e4m3 quantisation alone costs ~2% of the set on Gaussian data (measured 97.8% on the H200
    # at 8K / top-2048, 98% here); the 99% goal is not met on such data, see benchmarks/NOTES.md.
    assert overlap >= (0.97 if BIG else 0.95), overlap


SELECTORS = ("reference", "kernel", "kernel_unordered", "kernel_fp8", "cp_streaming", "tp", "decode_reference",
             "decode_kernel")


def _select(selector: str) -> torch.Tensor:
    """A top-k selection made by ``selector`` on small random inputs (rows shorter than the top-k)."""
    from megatron_dsa import ops
    from megatron_dsa.kernels import decode
    from megatron_dsa.parallel.comm import ParallelContext
    from megatron_dsa.parallel.sharded import tp_indexer_topk
    from megatron_dsa.parallel.topk import streaming_topk

    B, S, HI, DI, topk = 2, 12, 2, 16, 5
    if selector.startswith("decode"):  # two sequences of 7 and 3 cached keys in blocks of 4
        pool = torch.randn(4, 4, DI, device=DEV)
        table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=DEV)
        lengths = torch.tensor([7, 3], dtype=torch.int32, device=DEV)
        q, w = torch.randn(B, HI, DI, device=DEV), torch.randn(B, HI, device=DEV)
        fn = R.paged_indexer_topk if selector == "decode_reference" else decode.paged_indexer_topk
        return fn(q, w, pool, None, table, lengths, topk, ordered=False)
    q, k = torch.randn(B, S, HI, DI, device=DEV), torch.randn(B, S, DI, device=DEV)
    w = torch.randn(B, S, HI, device=DEV)
    pos = torch.arange(S, device=DEV)
    if selector == "reference":
        return R.indexer_topk(q, k, w, topk)
    if selector.startswith("kernel"):
        return K.indexer_topk(q, k, w, topk, fp8=selector == "kernel_fp8", ordered=selector == "kernel")
    if selector == "cp_streaming":  # the reference's CP ring: key chunks with global positions
        return streaming_topk(q, w, pos, [(k[:, 6:], pos[6:]), (k[:, :6], pos[:6])], topk)
    return tp_indexer_topk(ops.backend("triton", torch.device(DEV)), q, k, w, pos, topk, ParallelContext(), [0])


@pytest.mark.parametrize("selector", SELECTORS)
def test_every_top_k_is_the_int32_selection(selector):
    """One selection contract whoever selects: [B, Sq, K] (decoding [B, K]) int32, -1 padded.
    (The TP all-gather and the CP fetch's compact indices: tests/parallel_workers.py.)"""
    sel = _select(selector)
    assert sel.dtype == torch.int32, (selector, sel.dtype)
    assert sel.shape[0] == 2 and sel.shape[-1] == 5
    assert bool((sel >= -1).all()) and bool((sel == -1).any())  # short rows are -1 padded


def test_sparse_ops_take_only_the_int32_selection():
    """The sparse attention and the KL accept the int32 selection (equal to the reference in the
    tests above) and refuse an int64 one, which would double what they keep for the backward."""
    B, S, H, D, topk = 1, 10, 2, 48, 4
    q, kv = torch.randn(B, S, H, D, device=DEV), torch.randn(B, S, D, device=DEV)
    qi, ki, wi = torch.randn(B, S, 2, 16, device=DEV), torch.randn(B, S, 16, device=DEV), torch.randn(B, S, 2, device=DEV)
    idx = R.indexer_topk(qi, ki, wi, topk)
    out, _ = K.sparse_mla_attention(q, kv, idx, 32, D**-0.5)
    assert rel(out, R.sparse_mla_attention(q, kv, idx, 32, D**-0.5)[0]) < 1e-5
    kl = K.sparse_indexer_kl(q, kv, qi, ki, wi, idx, D**-0.5)
    assert rel(kl, R.sparse_indexer_kl(q, kv, qi, ki, wi, idx, D**-0.5)) < 1e-5
    for call in (lambda i: K.sparse_mla_attention(q, kv, i, 32, D**-0.5),
                 lambda i: K.sparse_indexer_kl(q, kv, qi, ki, wi, i, D**-0.5),
                 lambda i: K.sparse_target_head_sum(q, kv, i, D**-0.5)):
        with pytest.raises(TypeError, match="int32"):
            call(idx.long())


def test_sparse_attention_beyond_32_bit_row_offsets_is_one_error():
    """A sequence whose latent rows pass 2^31 elements stops before any kernel runs (the rows are
    addressed with 32-bit offsets); the check reads only the shape, so a broadcast view stands in."""
    q = torch.randn(1, 1, 2, 48, device=DEV)
    kv = torch.randn(1, 1, 1 << 20, device=DEV).expand(1, 2048, 1 << 20)  # 2^31 elements, 4 MB
    idx = torch.zeros(1, 1, 4, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="32-bit offsets"):
        K.sparse_mla_attention(q, kv, idx, 32, 0.1)


ATTN_CASES = [
    # B, S, H, v_dim, rope, topk, dtype
    (1, 50, 3, 32, 16, 24, torch.float32),
    (2, 21, 16, 64, 32, 24, torch.bfloat16),  # topk > S: -1 tails (two partial key tiles of 16)
    (1, 20, 2, 48, 0, 8, torch.float32),  # v_dim not a power of two, no rope part
    (1, 9, 2, 512, 64, 8, torch.bfloat16),  # the 671B model's 576 / 512 dims
    (1, 19, 64, 32, 16, 8, torch.float32),  # one 64-head block (GLM-5's heads per GPU)
    (1, 13, 128, 32, 16, 8, torch.bfloat16),  # two blocks (DeepSeek-V3.2 at TP=1)
    (1, 11, 70, 48, 16, 8, torch.float32),  # a partial second block, v_dim not a power of two
    (1, 9, 2, 512, 64, 8, torch.float32),
]


def _random_idx(B, S, Sk, topk, holes=True):
    scores = torch.randn(S, Sk, device=DEV)
    idx = R.topk_from_scores(scores, R.causal_mask(torch.arange(S, device=DEV), torch.arange(Sk, device=DEV)), topk)
    idx = idx[None].repeat(B, 1, 1)
    if holes:  # unused slots in the middle, and one row with no key at all
        idx[:, :: 3, 0] = -1
        idx[:, min(4, S - 1)] = -1
    return idx.contiguous()


def _attention_inputs(B, S, H, v_dim, rope, topk, dtype):
    """q, kv (leaves), a causal selection with holes and the softmax scale (x20 rows on a GPU)."""
    if BIG:
        S, topk = S * 20, topk * 4
    D = v_dim + rope
    q = torch.randn(B, S, H, D, device=DEV).to(dtype).requires_grad_()
    kv = torch.randn(B, S, D, device=DEV).to(dtype).requires_grad_()
    return q, kv, _random_idx(B, S, S, topk), D**-0.5


@pytest.mark.parametrize("B,S,H,v_dim,rope,topk,dtype", ATTN_CASES)
def test_sparse_mla_attention(B, S, H, v_dim, rope, topk, dtype, variant):
    q, kv, idx, scale = _attention_inputs(B, S, H, v_dim, rope, topk, dtype)
    out, lse = K.sparse_mla_attention(q, kv, idx, v_dim, scale, options=variant)
    assert out.dtype == dtype
    q32, kv32 = _fp32_leaves(q, kv)
    out_r, lse_r = R.sparse_mla_attention(q32, kv32, idx, v_dim, scale)
    assert out.shape == out_r.shape
    assert lse.shape == lse_r.shape and lse.dtype == torch.float32
    _finite(out, lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    fin = torch.isfinite(lse_r)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, out_r) < tol
    assert (lse[fin] - lse_r[fin]).abs().max().item() < 10 * tol
    go = torch.randn_like(out)
    gq, gkv = torch.autograd.grad(out, (q, kv), go)
    gq_r, gkv_r = torch.autograd.grad(out_r, (q32, kv32), go.float())
    _finite(gq, gkv)
    assert gq.dtype == dtype and gkv.dtype == dtype
    # bf16: the score gradients enter the tensor cores rounded to bf16; with few keys per row
    # that alone puts dq up to ~1e-2 off the fp32 reference (measured 0.94e-2 over 40 seeds).
    gtol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert rel(gq, gq_r) < gtol and rel(gkv, gkv_r) < gtol


def _check_indexer_grads(kl, kl_r, leaves, leaves_r, tol):
    """The indexer gradients of a kernel KL equal the (fp32) reference's, in the inputs' dtypes."""
    g = torch.randn_like(kl)
    grads = torch.autograd.grad(kl, leaves, g)
    grads_r = torch.autograd.grad(kl_r, leaves_r, g)
    for a, b, x in zip(grads, grads_r, leaves):
        _finite(a)
        assert a.dtype == x.dtype and rel(a, b) < tol


def _sparse_kl_inputs(B, S, H, D, HI, DI, topk, dtype):
    """Main queries and latent KV (no grad), indexer q/k/w (leaves), a causal selection with holes."""
    qm = torch.randn(B, S, H, D, device=DEV).to(dtype)
    kv = torch.randn(B, S, D, device=DEV).to(dtype)
    qi = torch.randn(B, S, HI, DI, device=DEV).to(dtype).requires_grad_()
    ki = torch.randn(B, S, DI, device=DEV).to(dtype).requires_grad_()
    wi = torch.randn(B, S, HI, device=DEV).requires_grad_()
    return qm, kv, qi, ki, wi, _random_idx(B, S, S, topk)


@pytest.mark.parametrize(
    "B,S,H,D,HI,DI,topk,dtype",
    [(1, 40, 3, 48, 4, 32, 24, torch.float32), (2, 33, 16, 96, 3, 16, 40, torch.bfloat16),
     (1, 17, 128, 48, 2, 16, 8, torch.bfloat16), (1, 15, 70, 48, 3, 16, 8, torch.float32),
     (1, 9, 2, 576, 64, 128, 8, torch.bfloat16)],  # the 671B model's 576 latent dims, 64 x 128 indexer
)
@pytest.mark.parametrize("with_lse", [True, False])
def test_sparse_indexer_kl(B, S, H, D, HI, DI, topk, dtype, with_lse):
    if BIG:
        S, topk = S * 20, topk * 4
    qm, kv, qi, ki, wi, idx = _sparse_kl_inputs(B, S, H, D, HI, DI, topk, dtype)
    scale = D**-0.5
    options = KernelOptions()
    # The target's per-head lse from the attention forward (v_dim is irrelevant to it), or built.
    lse = K.sparse_mla_attention(qm, kv, idx, D - 16, scale)[1] if with_lse else None
    kl = K.sparse_indexer_kl(qm, kv, qi, ki, wi, idx, scale, lse=lse, options=options)
    qm32, kv32, qi32, ki32, wi32 = _fp32_leaves(qm, kv, qi, ki, wi)
    kl_r = R.sparse_indexer_kl(qm32, kv32, qi32, ki32, wi32, idx, scale)
    _finite(kl)
    assert kl.shape == kl_r.shape and kl.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(kl, kl_r) < tol
    _check_indexer_grads(kl, kl_r, (qi, ki, wi), (qi32, ki32, wi32), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_lse", [True, False])
def test_sparse_kl_in_two_steps(dtype, with_lse):
    """The TP path's two ops equal the reference's: the target's head sum (per rank's heads),
    then the KL against a given target (values and indexer gradients); and the two steps over
    two halves of the heads, summed, equal the one-step KL."""
    B, S, H, D, HI, DI, topk = 2, 33, 4, 48, 3, 16, 24
    if BIG:
        S, topk = S * 20, topk * 4
    qm, kv, qi, ki, wi, idx = _sparse_kl_inputs(B, S, H, D, HI, DI, topk, dtype)
    idx[0, 5] = -1  # a row with no key: target 0, KL 0
    scale = D**-0.5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    qm32, kv32, qi32, ki32, wi32 = _fp32_leaves(qm, kv, qi, ki, wi)
    halves = (slice(0, H // 2), slice(H // 2, H))
    parts = []
    for h in halves:  # two "TP ranks", each with half of the heads
        lse = K.sparse_mla_attention(qm[:, :, h], kv, idx, D - 16, scale)[1] if with_lse else None
        part = K.sparse_target_head_sum(qm[:, :, h], kv, idx, scale, lse=lse)
        _finite(part)
        assert part.shape == idx.shape and part.dtype == torch.float32
        assert rel(part, R.sparse_target_head_sum(qm32[:, :, h], kv32, idx, scale)) < tol
        parts.append(part)
    summed = parts[0] + parts[1]  # the KL normalises each row itself
    kl = K.sparse_indexer_kl_from_target(qi, ki, wi, idx, summed)
    kl_r = R.sparse_indexer_kl_from_target(qi32, ki32, wi32, idx, summed)
    kl_one = R.sparse_indexer_kl(qm32, kv32, qi32, ki32, wi32, idx, scale)
    _finite(kl)
    assert float(kl[0, 5]) == 0.0
    assert rel(kl, kl_r) < tol and rel(kl, kl_one) < tol
    _check_indexer_grads(kl, kl_r, (qi, ki, wi), (qi32, ki32, wi32), tol)
    # a row's target is its weights over their sum: any positive scale per row gives the same KL,
    # and weights at -1 slots are ignored
    row_scale = torch.rand(B, S, 1, device=summed.device) * 10 + 0.1
    scaled = (summed * row_scale).masked_fill(idx < 0, 7.0)
    assert rel(K.sparse_indexer_kl_from_target(qi, ki, wi, idx, scaled), kl) < 1e-5
    assert rel(R.sparse_indexer_kl_from_target(qi32, ki32, wi32, idx, scaled), kl_r) < 1e-5


@pytest.mark.parametrize("B,S,HI,DI,topk,dtype,crowded", [
    (2, 33, 3, 16, 24, torch.float32, False),
    (1, 37, 5, 48, 40, torch.bfloat16, False),  # rows shorter than top-k, odd heads and dims
    (1, 29, 4, 32, 16, torch.float32, True),  # many rows add into the same few keys
    (1, 9, 64, 128, 8, torch.bfloat16, False),  # DeepSeek-V3.2's indexer, 64 x 128
])
def test_sparse_kl_and_grads(B, S, HI, DI, topk, dtype, crowded):
    """The KL's value and gradients in one call (the attention's backward, which has the KL's
    gradient first) equal the reference's autograd through ``sparse_indexer_kl_from_target``;
    a row with no key or no target weight gives KL 0 (and the latter no gradient), no NaN."""
    if BIG:
        S, topk = S * 20, topk * 4
    _, _, qi, ki, wi, idx = _sparse_kl_inputs(B, S, 1, 16, HI, DI, topk, dtype)
    if crowded:
        idx = _crowded_idx(B, S, S, topk, hot=topk + 3)
    idx[0, min(5, S - 1)] = -1
    weights = torch.rand(B, S, topk, device=DEV).masked_fill(torch.rand(B, S, topk, device=DEV) < 0.3, 0.0)
    zero_row = min(2, S - 1)
    weights[0, zero_row] = 0.0  # keys but no target: KL 0 whatever the logits, so no gradient
    g = torch.randn(B, S, device=DEV)
    kl, dq, dk, dw = K.sparse_indexer_kl_and_grads(qi, ki, wi, idx, weights, g)
    assert float(kl[0, zero_row]) == 0.0 and not dq[0, zero_row].any() and not dw[0, zero_row].any()
    qi32, ki32, wi32 = _fp32_leaves(qi, ki, wi)
    kl_r, *grads_r = R.sparse_indexer_kl_and_grads(qi32, ki32, wi32, idx, weights, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _finite(kl, dq, dk, dw)
    assert float(kl[0, min(5, S - 1)]) == 0.0
    assert rel(kl, kl_r) < tol
    for got, want, x in zip((dq, dk, dw), grads_r, (qi, ki, wi)):
        assert got.dtype == x.dtype and got.shape == x.shape and rel(got, want) < tol
    # a scalar gradient (or one of shape [1], as the layers pass it) is every row's
    kl_s, *grads_s = K.sparse_indexer_kl_and_grads(qi, ki, wi, idx, weights, torch.tensor([0.5], device=DEV))
    _, *grads_sr = R.sparse_indexer_kl_and_grads(qi32, ki32, wi32, idx, weights, torch.full((B, S), 0.5, device=DEV))
    assert rel(kl_s, kl) < 1e-6
    for got, want in zip(grads_s, grads_sr):
        assert rel(got, want) < tol


def test_sparse_kl_and_grads_refuses_mismatched_shapes():
    _, _, qi, ki, wi, idx = _sparse_kl_inputs(1, 12, 1, 16, 2, 16, 8, torch.float32)
    weights = torch.rand(1, 12, 8, device=DEV)
    for fn in (K.sparse_indexer_kl_and_grads, R.sparse_indexer_kl_and_grads):
        with pytest.raises(ValueError, match="grad_kl"):
            fn(qi, ki, wi, idx, weights, torch.ones(1, 11, device=DEV))
        with pytest.raises(ValueError, match="weights"):
            fn(qi, ki, wi, idx, weights[:, :, :7], torch.ones(1, 12, device=DEV))


def _crowded_idx(B, S, Sk, topk, hot):
    """Every query picks its slots among the same `hot` keys (many queries per key), in a random
    order, with -1 slots sprinkled in and one row all -1."""
    rows = torch.stack([torch.randperm(hot, device=DEV)[:topk] for _ in range(B * S)]).view(B, S, topk)
    idx = rows.clone()
    idx[torch.rand(B, S, topk, device=DEV) < 0.2] = -1
    idx[:, min(3, S - 1)] = -1
    idx = idx + torch.where(idx >= 0, Sk - hot, 0)  # the hot keys: the last ones
    return idx.to(torch.int32).contiguous()


@pytest.mark.parametrize("H", [3, 70, 150])
@pytest.mark.parametrize("keys_rows", [True, False])
def test_kl_target_either_layout_equals_the_reference(H, keys_rows):
    """The KL target's two kernels (heads or selected keys as the products' rows) give the
    reference's head sum at any head count, with the attention's lse or building it, and a row
    without keys sums to 0."""
    B, S, D, topk = 1, 19, 48, 8
    if BIG:
        S, topk = S * 20, topk * 4
    qm = torch.randn(B, S, H, D, device=DEV)
    kv = torch.randn(B, S, D, device=DEV)
    idx = _random_idx(B, S, S, topk)
    scale = D**-0.5
    options = KernelOptions(kl_target_keys_rows=keys_rows)
    ref = R.sparse_target_head_sum(qm, kv, idx, scale)
    for lse in (None, K.sparse_mla_attention(qm, kv, idx, D - 16, scale)[1]):
        got = K.sparse_target_head_sum(qm, kv, idx, scale, lse=lse, options=options)
        _finite(got)
        assert rel(got, ref) < 1e-5
        assert float(got[0, min(4, S - 1)].abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_backward_crowded_keys(dtype, variant):
    """Duplicate selections across queries: the per-key reduction (dkv, dk_idx) must sum every
    (query, slot) pair that chose the key, in every key range."""
    # More queries than keys, ~20 queries choosing each hot key per batch row.
    B, S, Sk, H, v_dim, rope, HI, DI, topk, hot = 2, 31, 29, 4, 32, 16, 3, 16, 12, 13
    D = v_dim + rope
    q = torch.randn(B, S, H, D, device=DEV).to(dtype).requires_grad_()
    kv = torch.randn(B, Sk, D, device=DEV).to(dtype).requires_grad_()
    qi = torch.randn(B, S, HI, DI, device=DEV).to(dtype).requires_grad_()
    ki = torch.randn(B, Sk, DI, device=DEV).to(dtype).requires_grad_()
    wi = torch.randn(B, S, HI, device=DEV).requires_grad_()
    idx = _crowded_idx(B, S, Sk, topk, hot)
    scale = D**-0.5
    out, lse = K.sparse_mla_attention(q, kv, idx, v_dim, scale, options=variant)
    kl = K.sparse_indexer_kl(q.detach(), kv.detach(), qi, ki, wi, idx, scale, lse=lse, options=variant)
    q32, kv32, qi32, ki32, wi32 = _fp32_leaves(q, kv, qi, ki, wi)
    out_r, _ = R.sparse_mla_attention(q32, kv32, idx, v_dim, scale)
    kl_r = R.sparse_indexer_kl(q32.detach(), kv32.detach(), qi32, ki32, wi32, idx, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, out_r) < tol and rel(kl, kl_r) < tol
    go, g = torch.randn_like(out), torch.randn_like(kl)
    got = torch.autograd.grad([out, kl], [q, kv, qi, ki, wi], [go, g])
    ref = torch.autograd.grad([out_r, kl_r], [q32, kv32, qi32, ki32, wi32], [go.float(), g])
    for a, b in zip(got, ref):
        _finite(a)
        assert rel(a, b) < tol


@pytest.mark.parametrize("H,dtype", [(3, torch.float32), (70, torch.float32), (128, torch.bfloat16)])
def test_sparse_attention_backward_gives_the_kl_target(H, dtype, variant):
    """The attention's backward with the KL's target from the same pass: dq and dkv equal the
    autograd op's, and the probabilities summed over the heads equal the reference's head sum
    (in the selection's slot order after the key ranges' sort; 0 at -1 slots and for a row
    without keys), at one head block, a partial second block and two 64-head blocks."""
    q, kv, idx, scale = _attention_inputs(1, 15, H, 32, 16, 8, dtype)
    S, v_dim = q.shape[1], 32
    out, lse = K.sparse_mla_attention(q, kv, idx, v_dim, scale, options=variant)
    go = torch.randn_like(out)
    dq, dkv, p = K.sparse_mla_attention_backward(q.detach(), kv.detach(), idx, out.detach(), lse, go, v_dim, scale,
                                                 options=variant)
    dq_op, dkv_op = torch.autograd.grad(out, (q, kv), go)
    q32, kv32 = _fp32_leaves(q, kv)
    p_r = R.sparse_target_head_sum(q32, kv32, idx, scale)
    _finite(dq, dkv, p)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert p.shape == idx.shape and p.dtype == torch.float32
    assert rel(p, p_r) < tol
    assert float(p[idx < 0].abs().sum()) == 0.0 and float(p[0, min(4, S - 1)].abs().sum()) == 0.0
    # The same kernels as the op's backward: equal up to the order of the fp32 atomic adds
    # (and, in bf16, the rounding of sums that order changes).
    assert rel(dq, dq_op) < tol and rel(dkv, dkv_op) < tol


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_key_segments_split_each_row_by_key_range(chunk_rows):
    """The backward's key ranges: rows sorted by key (-1 last), the permutation that sorts them,
    and per range the first slot at or after its start; in one piece or 5 rows at a time."""
    from megatron_dsa.kernels.sparse_attn import key_segments

    B, S, Sk, topk, passes = 2, 23, 40, 9, 4
    idx = _crowded_idx(B, S, Sk, topk, 30)
    keys, order, seg = key_segments(idx, Sk, passes, chunk_rows)
    assert keys.dtype == idx.dtype and order.dtype == torch.int16 and seg.dtype == torch.int32
    assert torch.equal(torch.gather(idx, -1, order.long()), keys)
    bounds = [p * Sk // passes for p in range(passes + 1)]
    for b in range(B):
        for t in range(S):
            row = keys[b, t]
            n = int((row >= 0).sum())
            assert bool((row[n:] == -1).all()) and bool((row[:n] >= 0).all())
            assert row[:n].tolist() == sorted(idx[b, t][idx[b, t] >= 0].tolist())
            for p, lo in enumerate(bounds):
                assert int(seg[b, t, p]) == int((row[:n] < lo).sum()), (b, t, p)
    # Rows already in key order (the selection's unordered output) are kept as they are.
    same, none, seg2 = key_segments(keys, Sk, passes, chunk_rows)
    assert same is keys and none is None and torch.equal(seg2, seg)


def test_sparse_backward_takes_rows_in_key_order_as_they_are():
    """With key ranges, a selection already in key order (the indexer's unordered rows) skips the
    sort: dq, dkv and the KL's head sum equal those of the same sets in another slot order
    (the head sum permuted alike)."""
    q, kv, idx, scale = _attention_inputs(1, 15, 3, 32, 16, 8, torch.float32)
    big = torch.iinfo(idx.dtype).max
    in_order, _ = torch.sort(torch.where(idx >= 0, idx, big), dim=-1)
    in_order = torch.where(in_order == big, -1, in_order)
    shuffled = torch.gather(in_order, -1, torch.argsort(torch.rand(in_order.shape, device=DEV), dim=-1))
    opts = KernelOptions(key_passes=3)
    got = {}
    for name, sel in (("in_order", in_order), ("shuffled", shuffled)):
        out, lse = K.sparse_mla_attention(q.detach(), kv.detach(), sel, 32, scale, options=opts)
        go = torch.ones_like(out)
        got[name] = K.sparse_mla_attention_backward(q.detach(), kv.detach(), sel, out, lse, go, 32, scale,
                                                    options=opts)
    (dq_a, dkv_a, p_a), (dq_b, dkv_b, p_b) = got["in_order"], got["shuffled"]
    _finite(dq_a, dkv_a, p_a)
    assert rel(dq_a, dq_b) < 1e-5 and rel(dkv_a, dkv_b) < 1e-5
    to_key_order = torch.argsort(torch.where(shuffled >= 0, shuffled, big), dim=-1, stable=True)
    assert rel(p_a, torch.gather(p_b, -1, to_key_order)) < 1e-5


@pytest.mark.parametrize("pos", ["causal", "offset"])
def test_dense_indexer_kl(pos):
    B, Sq, Sk, H, D, HI, DI, topk = 2, 24, 30, 4, 48, 3, 16, 8
    if BIG:
        Sq, Sk = 500, 700
    qm = torch.randn(B, Sq, H, D, device=DEV)
    kv = torch.randn(B, Sk, D, device=DEV)
    qi = torch.randn(B, Sq, HI, DI, device=DEV, requires_grad=True)
    ki = torch.randn(B, Sk, DI, device=DEV, requires_grad=True)
    wi = torch.randn(B, Sq, HI, device=DEV, requires_grad=True)
    q_pos = torch.arange(Sk - Sq, Sk, device=DEV) if pos == "offset" else None
    k_pos = None if pos == "offset" else torch.arange(Sk, device=DEV)
    if pos == "causal":
        q_pos = torch.arange(Sq, device=DEV)
    kl, recall = K.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk, q_pos, k_pos)
    kl_r, recall_r = R.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk, q_pos, k_pos)
    _finite(kl, recall)
    assert rel(kl, kl_r) < 1e-5 and rel(recall, recall_r) < 1e-5
    g = torch.randn_like(kl)
    for a, b in zip(torch.autograd.grad(kl, (qi, ki, wi), g), torch.autograd.grad(kl_r, (qi, ki, wi), g)):
        _finite(a)
        assert rel(a, b) < 1e-5


@pytest.mark.skipif(DEV != "cuda", reason="needs a query tensor of more than 2^31 elements (4.4 GB): GPU only")
def test_fused_dense_indexer_kl_rows_past_2_31_elements():
    """At 128 heads x 576 a row's offset in q passes 2^31 elements from 29K rows on (the
    warm-up at DeepSeek-V3.2's shape, 32K): the last rows' KL and gradients equal the same rows
    computed alone, at small offsets (their keys are the first Sk - n rows)."""
    from megatron_dsa.kernels.dense_kl import fused_dense_indexer_kl

    S, H, D, HI, DI, n = 30000, 128, 576, 64, 128, 64
    qm = torch.randn(1, S, H, D, device=DEV, dtype=torch.bfloat16)
    kv = torch.randn(1, S, D, device=DEV, dtype=torch.bfloat16)
    qi = torch.randn(1, S, HI, DI, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(1, S, DI, device=DEV, dtype=torch.bfloat16)
    wi = torch.randn(1, S, HI, device=DEV, requires_grad=True)
    kl, _ = fused_dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, 2048)
    g = torch.zeros_like(kl)
    g[:, -n:] = 1.0
    dqi, dwi = torch.autograd.grad(kl, (qi, wi), g)
    tail_q, tail_i, tail_w = (x[:, -n:].detach().clone().requires_grad_(x.requires_grad) for x in (qm, qi, wi))
    pos = torch.arange(S - n, S, device=DEV)
    kl_t, _ = fused_dense_indexer_kl(tail_q, kv, tail_i, ki, tail_w, D**-0.5, 2048, q_pos=pos)
    dqi_t, dwi_t = torch.autograd.grad(kl_t.sum(), (tail_i, tail_w))
    _finite(kl, dqi, dwi)
    assert rel(kl[:, -n:], kl_t) < 1e-5
    assert rel(dqi[:, -n:].float(), dqi_t.float()) < 1e-2 and rel(dwi[:, -n:], dwi_t) < 1e-5


@pytest.mark.skipif(DEV != "cuda", reason="needs keys of more than 2^31 elements (4.4 GB): GPU only")
def test_fused_dense_indexer_kl_over_each_heads_keys_past_2_31_elements():
    """Each head's keys [1, S, 128, 192] pass 2^31 elements from 87K rows on (the warm-up's
    target in the MHA form at 128K): the last rows' KL and gradients over 90K keys equal the
    reference's."""
    from megatron_dsa.kernels.dense_kl import fused_dense_indexer_kl

    S, n, H, D, HI, DI = 90000, 32, 128, 192, 64, 128
    keys = torch.randn(1, S, H, D, device=DEV, dtype=torch.bfloat16)
    assert keys.numel() > 2**31
    qm = torch.randn(1, n, H, D, device=DEV, dtype=torch.bfloat16)
    qi = torch.randn(1, n, HI, DI, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    ki = torch.randn(1, S, DI, device=DEV, dtype=torch.bfloat16)
    wi = torch.randn(1, n, HI, device=DEV, requires_grad=True)
    pos = torch.arange(S - n, S, device=DEV)
    kl, _ = fused_dense_indexer_kl(qm, keys, qi, ki, wi, D**-0.5, 2048, q_pos=pos)
    kl_r, _ = R.dense_indexer_kl(qm, keys, qi, ki, wi, D**-0.5, 2048, q_pos=pos)
    _finite(kl)
    assert rel(kl, kl_r) < 2e-2
    for a, b in zip(torch.autograd.grad(kl.sum(), (qi, wi)), torch.autograd.grad(kl_r.sum(), (qi, wi))):
        _finite(a)
        assert rel(a.float(), b.float()) < 2e-2


# Every pair of (heads folded, positions, dtype) values once: 6 of the 12 combinations.
FUSED_KL_CASES = [("one_group", "none", torch.float32), ("one_group", "offset", torch.bfloat16),
                  ("one_group", "unsorted", torch.float32), ("two_groups", "none", torch.bfloat16),
                  ("two_groups", "offset", torch.float32), ("two_groups", "unsorted", torch.bfloat16)]


@pytest.mark.parametrize("fold,pos,dtype", FUSED_KL_CASES)
def test_fused_dense_indexer_kl(dtype, pos, fold):
    """The fused warm-up KL kernels equal the reference: KL, recall and the indexer gradients;
    sizes not multiples of the blocks, a split D (32 + 8), rows with fewer keys than top-k,
    several key spans per query block, the indexer heads folded into one dot or two groups."""
    from megatron_dsa.kernels import dense_kl

    B, Sq, Sk, H, D, HI, DI, topk = 2, 37, 45, 3, 40, 3, 24, 8
    if BIG:
        Sq, Sk, H, D, HI, DI, topk = 700, 900, 8, 160, 4, 64, 64
    rows = 16 * 4 if fold == "one_group" else 16 * 2  # 16-row query blocks, 4 or 2 of the 4 (padded) heads per dot
    options = KernelOptions(dense_kl_rows=rows, dense_kl_span=256 if BIG else 32)
    blk = dense_kl._kl_blocks(HI, BIG, options)
    assert blk["NG"] == (1 if fold == "one_group" else 2) and blk["SPAN"] < Sk
    qm = torch.randn(B, Sq, H, D, device=DEV, dtype=dtype)
    kv = torch.randn(B, Sk, D, device=DEV, dtype=dtype)
    qi = torch.randn(B, Sq, HI, DI, device=DEV, dtype=dtype, requires_grad=True)
    ki = torch.randn(B, Sk, DI, device=DEV, dtype=dtype, requires_grad=True)
    wi = torch.randn(B, Sq, HI, device=DEV, dtype=dtype, requires_grad=True)
    q_pos = k_pos = None
    if pos in ("offset", "unsorted"):
        q_pos, k_pos = torch.arange(Sk - Sq, Sk, device=DEV), torch.arange(Sk, device=DEV)
    if pos == "unsorted":  # the kernels must not assume ordered positions
        q_pos, k_pos = q_pos[torch.randperm(Sq, device=DEV)], k_pos[torch.randperm(Sk, device=DEV)]
    kl, recall = dense_kl.fused_dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk, q_pos, k_pos, options=options)
    kl_r, recall_r = R.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk, q_pos, k_pos)
    _finite(kl, recall)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(kl, kl_r) < tol and rel(recall, recall_r) < (1e-5 if dtype == torch.float32 else 5e-2)
    g = torch.rand_like(kl)
    for a, b in zip(torch.autograd.grad(kl, (qi, ki, wi), g), torch.autograd.grad(kl_r, (qi, ki, wi), g)):
        _finite(a)
        assert a.dtype == b.dtype and rel(a, b) < tol


@pytest.mark.parametrize("impl,dtype", [("fused", torch.float32), ("fused", torch.bfloat16),
                                        ("blockwise", torch.float32)])
def test_dense_indexer_kl_over_each_heads_keys(impl, dtype):
    """The warm-up KL over MLA's MHA form (each head's keys [B, Sk, H, dk + R]) equals the
    reference there, and in fp32 the absorbed form's KL: the same target from 1/3 the products.
    Odd sizes, two key spans, sampled recall rows."""
    B, Sq, H, L, dk, R_, HI, DI, topk = 2, 37, 3, 40, 24, 8, 3, 24, 8
    if BIG:
        Sq, H, L, dk, R_, HI, DI, topk = 700, 16, 512, 128, 64, 8, 64, 64
    scale = (dk + R_) ** -0.5
    q = torch.randn(B, Sq, H, L + R_, device=DEV)  # unabsorbed: q_nope in the first dk columns
    kv = torch.randn(B, Sq, L + R_, device=DEV)
    k_up = torch.randn(H, dk, L, device=DEV) / L**0.5
    q_mha, k_mha, _ = R.mha_form(q, kv, k_up, torch.randn(H, 4, L, device=DEV))
    qi = torch.randn(B, Sq, HI, DI, device=DEV, requires_grad=True)
    ki = torch.randn(B, Sq, DI, device=DEV, requires_grad=True)
    wi = torch.randn(B, Sq, HI, device=DEV, requires_grad=True)
    assert k_mha.shape == (B, Sq, H, dk + R_)
    rows = R.recall_sample_rows(Sq, 9, DEV)
    kl_r, recall_r = R.dense_indexer_kl(q_mha, k_mha, qi, ki, wi, scale, topk, recall_rows=rows)
    kl_a, recall_a = R.dense_indexer_kl(R.absorb_query(q, k_up), kv, qi, ki, wi, scale, topk, recall_rows=rows)
    assert rel(kl_r, kl_a) < 1e-5 and rel(recall_r, recall_a) < 1e-5
    # The kernels against the reference on the same (cast) inputs.
    cast = lambda x: x.detach().to(dtype).requires_grad_(x.requires_grad)  # noqa: E731
    mine, ref = [cast(x) for x in (qi, ki, wi)], [cast(x) for x in (qi, ki, wi)]
    q_mha, k_mha = cast(q_mha), cast(k_mha)
    kl, recall = K.dense_indexer_kl(q_mha, k_mha, *mine, scale, topk, recall_rows=rows,
                                    options=KernelOptions(dense_kl=impl, dense_kl_span=256 if BIG else 32))
    kl_r, recall_r = R.dense_indexer_kl(q_mha, k_mha, *ref, scale, topk, recall_rows=rows)
    _finite(kl, recall)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(kl, kl_r) < tol and rel(recall, recall_r) < (1e-5 if dtype == torch.float32 else 5e-2)
    g = torch.rand_like(kl_r)
    for a, b in zip(torch.autograd.grad(kl, mine, g), torch.autograd.grad(kl_r, ref, g)):
        _finite(a)
        assert a.dtype == b.dtype and rel(a.float(), b.float()) < tol


def test_dense_indexer_kl_rejects_keys_of_another_shape():
    q = torch.randn(1, 6, 3, 16)
    idx = (torch.randn(1, 6, 2, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 2))
    for keys in (torch.randn(1, 6, 2, 16), torch.randn(1, 6, 12), torch.randn(1, 6, 3, 16, 1)):
        for op in (R.dense_indexer_kl, K.dense_indexer_kl):
            with pytest.raises(ValueError, match="fit neither"):
                op(q, keys, *idx, 0.25, 2)


@pytest.mark.parametrize("V", [32, 40])
def test_sparse_attention_backward_delta_kernel(V):
    """The backward's sum(dO * O) as one kernel (each input read once) equals the fp32 sum of the
    products, on a value width that is not a power of two too, over several programs' blocks of
    rows and a ragged last one; the gradients through it match the reference."""
    from megatron_dsa.kernels import sparse_attn

    B, S, H, D, topk = 1, 150, 4, V + 16, 8
    rows_per_program = sparse_attn.ROWWISE_DOT_ELEMENTS // triton.next_power_of_2(V)
    assert B * S * H > 2 * rows_per_program and B * S * H % rows_per_program
    dout = torch.randn(B, S, H, V, device=DEV, dtype=torch.bfloat16)
    out = torch.randn(B, S, H, V, device=DEV, dtype=torch.bfloat16)
    delta = sparse_attn._rowwise_dot(dout, out)
    ref = (dout.double() * out.double()).sum(-1)
    _finite(delta)
    assert delta.dtype == torch.float32 and delta.shape == (B, S, H)
    assert rel(delta.double(), ref) < 1e-6
    q = torch.randn(B, S, H, D, device=DEV, requires_grad=True)
    kv = torch.randn(B, S, D, device=DEV, requires_grad=True)
    idx = R.indexer_topk(torch.randn(B, S, 2, 8), torch.randn(B, S, 8), torch.randn(B, S, 2), topk).to(DEV)
    g = torch.randn(B, S, H, V, device=DEV)
    o, _ = K.sparse_mla_attention(q, kv, idx, V, D**-0.5)
    o_r, _ = R.sparse_mla_attention(q, kv, idx, V, D**-0.5)
    for a, b in zip(torch.autograd.grad(o, (q, kv), g), torch.autograd.grad(o_r, (q, kv), g)):
        _finite(a)
        assert rel(a, b) < 1e-5


def test_split_backward_form_and_key_ranges_by_default():
    """By default the backward is split on a wide latent or from 64-head blocks, and shares stored
    scores (measured faster at 16 to 128 heads); a set option always wins. Key ranges: L2-sized in the one-kernel backward and in the stored
    scores' dkv product, one pass in the split forms that add per head block and on the CPU."""
    from megatron_dsa.kernels.sparse_attn import (DKV_PRODUCT_RANGE_BYTES, L2_TARGET_BYTES, NARROW_LATENT,
                                                  key_passes, split_backward, split_form)

    # split from 64-head blocks, and on a wide latent at any head count; a set option wins
    assert split_backward(KernelOptions(), 64, 512) and split_backward(KernelOptions(), 64, 128)
    assert split_backward(KernelOptions(), 16, 512) and not split_backward(KernelOptions(), 16, NARROW_LATENT)
    assert not split_backward(KernelOptions(attn_bwd_split=False), 16, 512)
    assert split_backward(KernelOptions(attn_bwd_split=True), 16, 128)
    assert split_form(KernelOptions()) == "stored_scores"
    for form in ("recompute", "stored_ds", "stored_scores"):
        assert split_form(KernelOptions(split_bwd=form)) == form
    S, D = 1 << 17, 576
    assert key_passes(KernelOptions(), 1, S, D, "stored_scores", True) == -(-S * D * 4 // DKV_PRODUCT_RANGE_BYTES) == 8
    assert key_passes(KernelOptions(), 1, S, D, None, True) == -(-S * D * 4 // L2_TARGET_BYTES) == 9
    for form in ("recompute", "stored_ds"):
        assert key_passes(KernelOptions(), 1, S, D, form, True) == 1
    assert key_passes(KernelOptions(), 1, S, D, "stored_scores", False) == 1
    assert key_passes(KernelOptions(key_passes=3), 1, S, D, "recompute", True) == 3


@pytest.mark.parametrize("form,dq_columns", [("stored_ds", 16), ("stored_scores", 16), ("stored_scores", 48),
                                             ("stored_scores", 96)])
@pytest.mark.parametrize("passes", [1, 3])
def test_stored_scores_in_row_chunks(passes, form, dq_columns, monkeypatch):
    """The split backward's stored score gradients (and probabilities), a chunk of rows at a time
    (ragged last chunk, two head blocks, value columns in two blocks plus the rope's, heads
    summed in two groups; the dq product's heads in two blocks of 64, or with key ranges in one
    padded block of 128, its default; its 48 columns in one tile a program, in three, or in two
    of 32 with the last half past the latent):
    dq and dkv equal the reference's, with and without key-sorted ranges.
    Fresh buffers are NaN-filled, so a slot that no launch wrote and a product reads would show."""
    from megatron_dsa.kernels import sparse_attn

    class NaNFilledEmpty:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            t = torch.empty(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

    B, S, H, D, V, topk = 2, 23, 70, 48, 32, 8
    monkeypatch.setattr(sparse_attn, "torch", NaNFilledEmpty())
    q = torch.randn(B, S, H, D, device=DEV, requires_grad=True)
    kv = torch.randn(B, S, D, device=DEV, requires_grad=True)
    idx = _random_idx(B, S, S, topk)
    g = torch.randn(B, S, H, V, device=DEV)
    options = KernelOptions(key_passes=passes, attn_bwd_split=True, split_bwd=form,
                            workspace_bytes=5 * B * H * topk * 4,  # stored rows: 5 per chunk
                            dq_product_columns=dq_columns, dkv_product_columns=16, dkv_product_heads=64,
                            dq_product_heads=64 if passes == 1 else None)
    o, _ = K.sparse_mla_attention(q, kv, idx, V, D**-0.5, options=options)
    o_r, _ = R.sparse_mla_attention(q, kv, idx, V, D**-0.5)
    for a, b in zip(torch.autograd.grad(o, (q, kv), g), torch.autograd.grad(o_r, (q, kv), g)):
        _finite(a)
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("H", [4, 70])
def test_key_range_backward_in_row_chunks(H):
    """The key-range backward's fp32 dq buffer holds a chunk of rows at a time (ragged last
    chunk, two head blocks): the gradients equal the reference's."""
    B, S, D, V, topk = 2, 23, 48, 32, 8
    q = torch.randn(B, S, H, D, device=DEV, requires_grad=True)
    kv = torch.randn(B, S, D, device=DEV, requires_grad=True)
    idx = _random_idx(B, S, S, topk)
    g = torch.randn(B, S, H, V, device=DEV)
    options = KernelOptions(key_passes=3, attn_bwd_split=False, workspace_bytes=2 * 5 * B * H * D * 4)  # dq: 5 rows
    o, _ = K.sparse_mla_attention(q, kv, idx, V, D**-0.5, options=options)
    o_r, _ = R.sparse_mla_attention(q, kv, idx, V, D**-0.5)
    for a, b in zip(torch.autograd.grad(o, (q, kv), g), torch.autograd.grad(o_r, (q, kv), g)):
        _finite(a)
        assert rel(a, b) < 1e-5


def test_workspace_bytes_bounds_the_chunks_not_the_results(monkeypatch):
    """A workspace of a few rows splits the indexer's fp32 score buffer, the warm-up KL's recall
    gathers and the blockwise KL's temporaries into many chunks of rows (counted): the same
    top-k, KL, recall and indexer gradients as in one chunk."""
    from megatron_dsa.kernels import indexer, indexer_kl

    chunks = []
    B, S, H, D, HI, DI, topk = 2, 50, 3, 24, 2, 16, 8

    class RecordedEmpty:  # the indexer's score buffer: [B, rows, Sk] fp32
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            t = torch.empty(*args, **kwargs)
            if t.dim() == 3 and t.dtype == torch.float32 and t.shape[-1] == S:
                chunks.append(("scores", t.shape[1]))
            return t

    real_target, real_gather = indexer_kl._dense_target, R.gather_tokens
    monkeypatch.setattr(indexer, "torch", RecordedEmpty())
    monkeypatch.setattr(R, "gather_tokens", lambda *a: chunks.append(("recall", 1)) or real_gather(*a))
    monkeypatch.setattr(indexer_kl, "_dense_target", lambda *a: chunks.append(("blockwise", 1)) or real_target(*a))
    qi = torch.randn(B, S, HI, DI, device=DEV, requires_grad=True)
    ki = torch.randn(B, S, DI, device=DEV, requires_grad=True)
    wi = torch.randn(B, S, HI, device=DEV, requires_grad=True)
    tiny = 16 * B * S * 4  # 16 query rows of fp32 scores; an eighth of it is under one KL row
    whole = K.indexer_topk(qi, ki, wi, topk)
    bufs = 2 if BIG else 1  # on CUDA the selection overlaps the next chunk's scoring: two buffers
    assert chunks == [("scores", 64 if BIG else 16 * 4)] * bufs  # one chunk: every (padded) row
    chunks.clear()
    assert torch.equal(K.indexer_topk(qi, ki, wi, topk, options=KernelOptions(workspace_bytes=tiny)), whole)
    assert chunks == [("scores", 64 if BIG else 16)] * bufs
    qm, kv = torch.randn(B, S, H, D, device=DEV), torch.randn(B, S, D, device=DEV)
    for impl in ("fused", "blockwise"):
        runs = []
        for workspace in (2 << 30, tiny):
            chunks.clear()
            kl, recall = K.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk,
                                            options=KernelOptions(dense_kl=impl, workspace_bytes=workspace))
            runs.append([kl, recall, *torch.autograd.grad(kl.sum(), (qi, ki, wi))])
            # blockwise: forward and backward a chunk of rows each; fused: the recall's gathers
            kind, n = ("blockwise", 2) if impl == "blockwise" else ("recall", 1)
            assert sum(c[0] == kind for c in chunks) == (n if workspace > tiny else n * S), chunks
        for a, b in zip(*runs):
            _finite(a)
            assert rel(a, b) < 1e-6


def test_fused_dense_indexer_kl_takes_any_gradient_layout():
    """Batch 1 with the KL's gradient a transposed view (strides (1, 1), as after a row
    exchange between TP ranks): the same indexer gradients as a contiguous one."""
    from megatron_dsa.kernels import dense_kl

    S, H, D, HI, DI, topk = 20, 2, 32, 2, 16, 4
    qm, kv = torch.randn(1, S, H, D, device=DEV), torch.randn(1, S, D, device=DEV)
    qi = torch.randn(1, S, HI, DI, device=DEV, requires_grad=True)
    ki, wi = torch.randn(1, S, DI, device=DEV), torch.randn(1, S, HI, device=DEV)
    kl, _ = dense_kl.fused_dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk)
    g = torch.rand(S, 1, device=DEV)
    (a,) = torch.autograd.grad(kl, qi, g.t(), retain_graph=True)
    (b,) = torch.autograd.grad(kl, qi, g.flatten()[None].clone())  # strides (S, 1)
    _finite(a)
    assert g.t().stride() == (1, 1) and rel(a, b) < 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_dense_indexer_kl_recall_rows(fused):
    """Recall measured on sampled rows only equals the reference's recall at those rows (the
    fused op scores the recall's top-k for those rows alone); the KL is unchanged."""
    options = KernelOptions(dense_kl="fused" if fused else "blockwise")
    B, S, H, D, HI, DI, topk = 2, 40, 3, 40, 3, 24, 8
    qm, kv = torch.randn(B, S, H, D, device=DEV), torch.randn(B, S, D, device=DEV)
    qi, ki = torch.randn(B, S, HI, DI, device=DEV), torch.randn(B, S, DI, device=DEV)
    wi = torch.randn(B, S, HI, device=DEV)
    rows = R.recall_sample_rows(S, 7, DEV)
    kl, recall = K.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk, recall_rows=rows, options=options)
    kl_r, recall_r = R.dense_indexer_kl(qm, kv, qi, ki, wi, D**-0.5, topk)
    _finite(kl, recall)
    assert recall.shape == (B, rows.numel()) and rel(recall, recall_r[:, rows]) < 1e-5
    assert rel(kl, kl_r) < 1e-5


def test_fused_dense_indexer_kl_is_taken_when_switched_on(monkeypatch):
    from megatron_dsa.kernels import dense_kl

    calls = []
    monkeypatch.setattr(dense_kl, "fused_dense_indexer_kl", lambda *a, **k: calls.append(1) or ("kl", "recall"))
    args = [torch.randn(1, 4, 2, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 2)]
    assert K.dense_indexer_kl(*args, 0.3, 2) == ("kl", "recall") and calls == [1]  # the default
    K.dense_indexer_kl(*args, 0.3, 2, objective="mse")  # other objectives: the blockwise path
    K.dense_indexer_kl(*args, 0.3, 2, options=KernelOptions(dense_kl="blockwise"))
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", ["none", "causal", "offset", "decode", "cp"])
def test_dense_mla_attention(dtype, pos, monkeypatch):
    B, S, H, D, v_dim = 2, 37, 3, 40, 32
    if BIG:
        S, H, D, v_dim = 1000, 8, 160, 128
    # offset: a prefill chunk after 5 cached keys; decode: one query after all of them;
    # cp: context-parallel rank 0 of 2, which owns chunks 0 and 3 of 4 (megatron's layout)
    c = S // 2
    Sk = {"offset": S + 5, "cp": 4 * c}.get(pos, S)
    Sq = {"decode": 1, "cp": 2 * c}.get(pos, S)
    q = torch.randn(B, Sq, H, D, device=DEV, dtype=dtype, requires_grad=True)
    kv = torch.randn(B, Sk, D, device=DEV, dtype=dtype, requires_grad=True)
    q_pos = {"none": None, "causal": torch.arange(S, device=DEV), "offset": torch.arange(5, Sk, device=DEV),
             "decode": torch.arange(Sk - 1, Sk, device=DEV),
             "cp": torch.cat([torch.arange(c, device=DEV), torch.arange(3 * c, 4 * c, device=DEV)])}[pos]
    k_pos = None if pos == "none" else torch.arange(Sk, device=DEV)
    out, lse = K.dense_mla_attention(q, kv, v_dim, D**-0.5, q_pos, k_pos)
    out_r, lse_r = R.dense_mla_attention(q, kv, v_dim, D**-0.5, q_pos, k_pos)
    _finite(out, lse)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and rel(out, out_r) < tol and rel(lse, lse_r) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, kv), g), torch.autograd.grad(out_r, (q, kv), g)):
        _finite(a)
        assert rel(a, b) < tol
    if pos != "decode":  # these masks run on the fused attention, never the chunked reference
        monkeypatch.setattr(R, "dense_mla_attention", lambda *a, **k: pytest.fail("fell back to the reference"))
    out2, none = K.dense_mla_attention(q, kv, v_dim, D**-0.5, q_pos, k_pos, need_lse=False)
    assert none is None and torch.equal(out2, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos", ["none", "offset", "cp"])
def test_dense_attention_mha_form(dtype, pos, monkeypatch):
    """Per-head keys and values (MLA's MHA form, qk and v dims differing) on the fused SDPA."""
    B, S, H, Dqk, Dv = 2, 37, 3, 24, 16
    if BIG:
        S, H, Dqk, Dv = 1000, 16, 192, 128
    c = S // 2
    Sk = {"offset": S + 5, "cp": 4 * c}.get(pos, S)
    Sq = {"cp": 2 * c}.get(pos, S)
    q = torch.randn(B, Sq, H, Dqk, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Sk, H, Dqk, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Sk, H, Dv, device=DEV, dtype=dtype, requires_grad=True)
    q_pos = {"none": None, "offset": torch.arange(5, Sk, device=DEV),
             "cp": torch.cat([torch.arange(c, device=DEV), torch.arange(3 * c, 4 * c, device=DEV)])}[pos]
    k_pos = None if pos == "none" else torch.arange(Sk, device=DEV)
    out, lse = K.dense_attention(q, k, v, Dqk**-0.5, q_pos, k_pos)
    out_r, lse_r = R.dense_attention(q, k, v, Dqk**-0.5, q_pos, k_pos)
    _finite(out, lse)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.shape == (B, Sq, H, Dv) and out.dtype == dtype and rel(out, out_r) < tol and rel(lse, lse_r) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(out_r, (q, k, v), g)):
        _finite(a)
        assert rel(a, b) < tol
    monkeypatch.setattr(R, "dense_attention", lambda *a, **k: pytest.fail("fell back to the reference"))
    out2, none = K.dense_attention(q, k, v, Dqk**-0.5, q_pos, k_pos, need_lse=False)
    assert none is None and torch.equal(out2, out)


def test_available():
    assert K.available()
