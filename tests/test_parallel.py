"""DSA under TP (+SP) and CP on CPU/gloo: multi-process runs compared with one rank.

Layer-function level: the one DSA core (``megatron_dsa.core.dsa_core``) fed with the one-rank
tensors split the way megatron splits them (heads over TP, sequence-parallel rows for the
indexer, megatron's load-balanced CP chunks) must give the same top-k indices (deliberate exact
ties), outputs, KL and input gradients as the reference math on one rank, in every phase; and
on one rank (a context of size 1) it is that math.
Model level: SGD steps of the tiny MoE under TP=2 / CP=2 / TP=2 x CP=2 give the one-rank
losses and parameters. Worker code: tests/parallel_workers.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import parallel_workers as W  # noqa: E402
from helpers import key_ordered_selection  # noqa: E402

from megatron_dsa import reference as R  # noqa: E402
from megatron_dsa.config import DSAConfigError  # noqa: E402
from megatron_dsa.parallel import cp_positions, cp_split, merge_candidates, streaming_topk  # noqa: E402
from megatron_dsa.parallel.comm import cp_owner, to_global_order  # noqa: E402

MODES = [("dense", True), ("warmup", True), ("sparse", True), ("sparse", False)]


# ---------------------------------------------------------------------------------------------
# Single-process pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_keys", [100, 65536, 65537, 300000])
def test_a_compact_selection_expands_to_the_same_keys(n_keys):
    """16 bits a key and each row's block ends give back the int32 selection exactly, in key
    blocks of 2^16 (a block's last key, a key at a block's start, several blocks); a selection
    whose rows are not in key order with the padding last is refused (None), not stored wrong."""
    gen = torch.Generator().manual_seed(n_keys)
    idx = key_ordered_selection(2, 9, 40, n_keys, gen)
    idx[0, 0] = -1
    idx[0, 0, :3] = torch.tensor([0, 65535, 65536] if n_keys > 65536 else [0, 1, n_keys - 1], dtype=torch.int32)
    packed = R.compact_selection(idx, n_keys)
    assert packed is not None
    low, ends = packed
    assert low.dtype == torch.int16 and low.shape == idx.shape and ends.shape == (2, 9, -(-n_keys // 65536))
    assert torch.equal(R.expand_selection(low, ends), idx)
    swapped = idx.clone()
    swapped[1, 2, :2] = torch.tensor([5, 3], dtype=torch.int32)  # descending
    hole = idx.clone()
    hole[1, 3, :3] = torch.tensor([-1, 4, 7], dtype=torch.int32)  # padding before a key
    for bad in (swapped, hole):
        assert R.compact_selection(bad, n_keys) is None


def test_the_kl_in_backward_keeps_a_compact_selection_with_the_same_gradients():
    """With ``compact_selection`` the training step's sparse attention (KL in its backward) keeps
    a key-ordered selection in 16 bits a key: int16 among its saved tensors, no int32 one, and
    the same output, KL and gradients as keeping it int32 (the layer's False, or the option off);
    a score-ordered selection is kept int32."""
    from megatron_dsa import ops
    from megatron_dsa.parallel import ParallelContext
    from megatron_dsa.parallel.sharded import sparse_attention_kl_in_backward

    gen = torch.Generator().manual_seed(0)
    B, S, H, D, V, HI, DI, K = 1, 24, 2, 12, 8, 2, 8, 6
    idx = key_ordered_selection(B, S, K, S, gen, causal=True)
    from types import SimpleNamespace

    from megatron_dsa.kernel_options import KernelOptions

    reference = ops.backend("reference", torch.device("cpu"))
    backend = SimpleNamespace(**dict(vars(reference), options=KernelOptions(compact_selection=True)))
    inputs = [torch.randn(*shape, generator=gen) for shape in ((B, S, H, D), (B, S, D), (B, S, HI, DI), (B, S, DI),
                                                                 (B, S, HI))]
    cot = torch.randn(B, S, H, V, generator=gen)
    results = {}
    for compact, sel in ((True, idx), (False, idx), (True, idx.flip(-1))):
        leaves = [x.clone().requires_grad_() for x in inputs]
        q, kv, qi, ki, wi = leaves
        kls, saved = [], []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.shape)) or t, lambda t: t):
            out = sparse_attention_kl_in_backward(backend, q, kv, sel, V, D ** -0.5, qi, ki, wi, ParallelContext(),
                                                  lambda: 1.0, kls.append, selection_shared=not compact)
        (out * cot).sum().backward()
        results[compact, sel is idx] = (out.detach(), kls[0], [x.grad for x in leaves], saved)
    (o1, kl1, g1, saved1), (o0, kl0, g0, saved0) = results[True, True], results[False, True]
    kept = lambda dtype, saved: (dtype, idx.shape) in saved  # noqa: E731
    assert kept(torch.int16, saved1) and not kept(torch.int32, saved1) and kept(torch.int32, saved0)
    assert torch.equal(o1, o0) and torch.equal(kl1, kl0)
    assert all(torch.equal(a, b) for a, b in zip(g1, g0))
    assert kept(torch.int32, results[True, False][3])  # not in key order: kept as it is
    int32_options = SimpleNamespace(**dict(vars(reference), options=KernelOptions(compact_selection=False)))
    for ops_, compacted in ((reference, True), (int32_options, False)):  # the option's default: on
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.shape)) or t, lambda t: t):
            leaves = [x.clone().requires_grad_() for x in inputs]
            sparse_attention_kl_in_backward(ops_, *leaves[:2], idx, V, D ** -0.5, *leaves[2:], ParallelContext(),
                                            lambda: 1.0, kls.append)
        assert kept(torch.int16, saved) == compacted and kept(torch.int32, saved) != compacted


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_layout_matches_megatron(cp):
    """cp_split / cp_positions / cp_owner agree with megatron-core's own zigzag split."""
    from megatron.core import utils as mu

    S = 32
    x = torch.arange(S)[None].expand(2, -1)
    for r in range(cp):
        class G:  # the two calls megatron makes on the group
            def size(self):
                return cp

            def rank(self):
                return r

        import torch.distributed as dist

        orig = (dist.get_world_size, dist.get_rank)
        dist.get_world_size, dist.get_rank = (lambda g=None: cp), (lambda g=None: r)
        try:
            want = mu._get_batch_on_this_cp_rank_per_sequence_balancing({"tokens": x.clone()}, G())["tokens"]
        finally:
            dist.get_world_size, dist.get_rank = orig
        assert torch.equal(cp_split(x, cp, r), want)
        assert torch.equal(cp_positions(S, cp, r), want[0])
        owner, row = cp_owner(want[0], S, cp)
        assert (owner == r).all() and torch.equal(row, torch.arange(S // cp))
    gathered = torch.cat([cp_split(x, cp, r) for r in range(cp)], dim=1)
    assert torch.equal(to_global_order(gathered, S, cp), x)


def test_tie_inputs_really_tie_at_the_selection_boundary():
    """The layer-function tests are only meaningful if ties decide the selection."""
    inp = W.tie_inputs(7)
    K = W.SHAPE["K"]
    scores = R.indexer_scores(inp["qi"], inp["ki"], inp["wi"])
    mask = R.causal_mask(torch.arange(W.SHAPE["S"]), torch.arange(W.SHAPE["S"]))
    vals = torch.sort(scores.masked_fill(~mask, float("-inf")), dim=-1, descending=True).values
    boundary_ties = (vals[..., K - 1] == vals[..., K]) & torch.isfinite(vals[..., K])
    assert boundary_ties.sum() >= 10


@pytest.mark.parametrize("order", ["forward", "reversed", "shuffled"])
def test_streaming_topk_equals_reference_in_any_shard_order(order):
    inp = W.tie_inputs(3)
    S, K = W.SHAPE["S"], W.SHAPE["K"]
    want = R.indexer_topk(inp["qi"], inp["ki"], inp["wi"], K)
    pos = torch.arange(S)
    shards = [(inp["ki"][:, a : a + 4], pos[a : a + 4]) for a in range(0, S, 4)]
    if order == "reversed":
        shards = shards[::-1]
    if order == "shuffled":
        shards = [shards[i] for i in torch.randperm(len(shards), generator=torch.Generator().manual_seed(0))]
    rows = cp_positions(S, 2, 1)  # non-contiguous query rows, as a CP rank holds them
    got = streaming_topk(inp["qi"][:, rows], inp["wi"][:, rows], rows, shards, K)
    assert torch.equal(got, want[:, rows])


def test_merge_breaks_ties_towards_the_smaller_global_position():
    v = torch.tensor([[1.0, 1.0]])
    p = torch.tensor([[9, 4]])
    vals, pos = merge_candidates(v, p, torch.tensor([[1.0, 2.0]]), torch.tensor([[2, 7]]), 3)
    assert pos.tolist() == [[7, 2, 4]] and vals.tolist() == [[2.0, 1.0, 1.0]]


# ---------------------------------------------------------------------------------------------
# Layer-function level, multi-process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_layer_function_on_one_rank_is_the_reference_math(kernel):
    """The same core with a size-1 context (no process group): what the one-rank layer runs."""
    from megatron_dsa import kernels
    from megatron_dsa.parallel import ParallelContext

    if kernel == "triton" and not kernels.available():
        pytest.skip("needs Triton with CUDA or TRITON_INTERPRET=1")
    W.check_core_against_reference(ParallelContext(), 7, MODES, kernel)


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2), (1, 4), (2, 2)], ids=["tp2", "cp2", "cp4", "tp2xcp2"])
def test_layer_function_matches_one_rank(tp, cp):
    """Top-k (exact, ties), outputs, KL, recall and dq/dkv/dqi/dki/dwi vs one rank, all phases;
    per-rank indexer FLOPs under TP are 1/TP of one rank's."""
    W.spawn(W.layer_function_worker, tp * cp, tp, cp, 7, MODES)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_indexer_rows_are_causally_balanced(tp):
    """Each TP rank scores blocks r and 2TP-1-r (equal causal work), and the gathered top-k is
    the one-rank top-k in row order (odd shard sizes fall back to the SP rows)."""
    W.spawn(W.balanced_topk_worker, tp, 5)


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2)], ids=["tp2", "cp2"])
def test_layer_function_on_the_kernels_matches_one_rank(tp, cp):
    """The same checks with the Triton kernels doing the rank's work (Triton's interpreter on
    CPU): top-k on the gathered keys, sparse / dense attention and the dense KL."""
    W.spawn(W.layer_function_worker, tp * cp, tp, cp, 7, MODES, "triton")


# ---------------------------------------------------------------------------------------------
# Model level: the tiny MoE through megatron-core, a few SGD steps
# ---------------------------------------------------------------------------------------------


# megatron-core's mla_up_proj recomputation (the absorbed queries and latent rows dropped after
# the forward, rebuilt in the backward) and the selection parked in host memory, under TP x CP
# against one rank with the same settings (in the same processes as the plain sparse run).
UP_PROJ_RECOMPUTED_SELECTION_OFFLOADED = {"recompute_granularity": "selective", "recompute_modules": ["mla_up_proj"],
                                          "mdsa_kernel_options": {"offload_selection": True}}


@pytest.mark.parametrize(
    "tp,cp,runs",
    [(2, 1, ["dense", "warmup", "sparse"]), (1, 2, ["dense", "warmup", "sparse"]),
     (2, 2, ["sparse", ("sparse", UP_PROJ_RECOMPUTED_SELECTION_OFFLOADED)])],
    ids=["tp2", "cp2", "tp2xcp2"],
)
def test_model_training_steps_match_one_rank(tp, cp, runs):
    # Longer runs on GPUs: MDSA_PARALLEL_STEPS=20 (same per-step tolerances).
    W.spawn(W.model_worker, tp * cp, tp, cp, runs, 11, int(os.environ.get("MDSA_PARALLEL_STEPS", "2")), {})


# ---------------------------------------------------------------------------------------------
# Bad parallel configurations fail at start-up with one clear message
# ---------------------------------------------------------------------------------------------


def test_heads_not_divisible_by_tp_is_rejected():
    from megatron_dsa.model import model_config

    with pytest.raises(DSAConfigError, match="divisible by the tensor parallel size"):
        model_config("tiny", tensor_model_parallel_size=3)


def test_triton_kernels_are_allowed_with_parallelism():
    from megatron_dsa.model import model_config

    cfg = model_config("tiny", context_parallel_size=2, mdsa_kernel="triton", mdsa_fp8_indexer=True)
    assert cfg.dsa.kernel == "triton" and cfg.dsa.fp8_indexer


def test_tp_switches_sequence_parallel_on_and_cp_comm_type_is_set():
    from megatron_dsa.model import model_config

    cfg = model_config("tiny", tensor_model_parallel_size=2, context_parallel_size=2)
    assert cfg.sequence_parallel and cfg.cp_comm_type == "all_gather"


def _bad_seq_worker(rank, world, port):
    W.init_dist(rank, world, port)
    import patches

    patches.apply_cpu_patches()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=2)
    model = W._build("sparse", 0, {"context_parallel_size": 2})
    tokens = torch.zeros(1, 5, dtype=torch.long)  # 5 rows per CP rank: 10 in all, not 4k
    with pytest.raises(DSAConfigError, match=r"divisible by 2 \* context_parallel_size"):
        model(tokens, torch.arange(5)[None], None)
    torch.distributed.destroy_process_group()


def test_sequence_not_divisible_by_2cp_fails_before_compute():
    W.spawn(_bad_seq_worker, 2)


def test_expert_parallel_from_config_matches_one_rank():
    """EP=2 through megatron-core's MoE settings (expert_model_parallel_size): same loss and
    gradients as one rank (each expert sees the batch of both EP ranks, so twice the gradient)."""
    W.spawn(W.expert_parallel_worker, 2, 2, 5)


# ---------------------------------------------------------------------------------------------
# Pipeline parallel: megatron-core's schedules over DSA layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world,layouts", [(2, [(1, 2, None), (1, 2, 2)]), (4, [(2, 2, None)])], ids=["pp2+vpp2", "tp2xpp2"],
)
def test_pipeline_training_steps_match_one_rank(world, layouts):
    """Two SGD steps of the 4-layer tiny model through megatron-core's pipeline schedule (1F1B,
    and interleaved with two virtual stages per rank), two microbatches, in all three phases:
    the last stage's LM loss, every parameter's gradient and the stepped parameters equal one
    rank's. The warm-up's KL reaches every stage (attached to the layer outputs under PP)."""
    W.spawn(W.pipeline_worker, world, layouts, ["dense", "warmup", "sparse"], 13, 2)


def test_shared_indexer_across_pipeline_stages_is_refused():
    from megatron_dsa.model import model_config

    with pytest.raises(DSAConfigError, match="shared indexer needs every layer on one pipeline stage"):
        model_config("tiny", num_layers=4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                     mdsa_indexer_sharing="shared")


def test_selection_reused_across_pipeline_stages_is_refused():
    from megatron_dsa.model import model_config

    ok = model_config("tiny", num_layers=4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                      dsa_indexer_topk_freq=2)
    assert ok.dsa.topk_freq == 2
    with pytest.raises(DSAConfigError, match="a stage would reuse a selection made on another stage"):
        model_config("tiny", num_layers=4, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                     pipeline_dtype=torch.float32, dsa_indexer_topk_freq=2)
