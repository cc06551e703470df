"""Shared fixtures: a one-process megatron-core world on CPU (gloo)."""

from __future__ import annotations

import os

import pytest
import torch  # (does not import triton)

# Without a GPU the Triton kernels run through Triton's interpreter. Triton reads the switch
# once, so it is set here, before any test module (or megatron-core) imports triton. The
# interpreter's re-patching of triton.language at every helper call inside a kernel is skipped:
# it changes nothing (tests/helpers.py says why) and took half of the kernel tests' time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from helpers import skip_repeated_interpreter_patching

    skip_repeated_interpreter_patching()

# megatron-core and Megatron-LM wrap their fused functions (bias-GeLU/GeGLU, the router's scores)
# in torch.compile. On CPU each trainer process a test starts spent ~4 of its ~14 s tracing and
# compiling them for a few steps; run eagerly they give the same values (the kernels under test
# are ours, not those). torch.compile reads the switch at each call, and subprocesses inherit it.
if not torch.cuda.is_available():
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# Under xdist (launch/test.sh: two workers on CI's two cores) each worker, and every process it
# starts (they inherit OMP_NUM_THREADS), computes on its share of the cores. Otherwise each one
# starts a thread per core, the workers' threads take turns on the same cores, and the
# torch-bound tests run about twice as long. An OMP_NUM_THREADS of one's own is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // _WORKERS))
    torch.set_num_threads(max(1, _cores // _WORKERS))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small corpus (~200 KB of this interpreter's stdlib, vocab 512, the tiny model's) shared
    by the tests that only need some valid data; test_train.py builds a larger one of its own."""
    from megatron_dsa.data import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "c"
    build_corpus(out, None, 512, max_bytes=200_000, valid_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world size 1) + megatron-core parallel state + RNG tracker."""
    import patches

    patches.apply_cpu_patches()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        # A private store, no MASTER_PORT in the environment: subprocesses started by tests
        # would inherit it.
        from megatron_dsa.distributed import local_store

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, store=local_store(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (printed on failure), so inputs differ from run to run."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many tiny query chunks so the chunked (and checkpointed) paths are exercised."""
    from megatron_dsa import reference

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 97)


@pytest.fixture(autouse=True)
def fresh_metrics_tracker():
    """Each test gets its own megatron-core metrics tracker: it is process-global and sizes each
    metric by the first model's layer count, so a test of another depth (an MTP layer, another
    size) would otherwise fail on whichever test ran first."""
    import sys

    moe_logging = sys.modules.get("megatron.core.transformer.moe.moe_logging")
    if moe_logging is not None:
        moe_logging.set_moe_metrics_tracker(moe_logging.MoEMetricsTracker())
    yield


# --------------------------------------------------------------------------------------------
# Scheduling under xdist (launch/test.sh: -n 2 --dist loadgroup)
#
# The tests of each group in GROUPS share an expensive module- or session-scoped fixture: they
# run on one worker, which builds it once (on two workers both would). The groups are named here,
# by node id prefix: xdist's own mark (xdist_group) works by changing the test's node id, which
# pytest 9 no longer lets it do. The longest tests and groups start first, longest first, so that
# none of them is left running alone at the end; the rest follow in collection order, each to
# whichever worker is free.

GROUPS = {
    "train_phases": ("tests/test_train.py::test_pretrain_lm_loss_falls",  # the fixture `phases`
                     "tests/test_train.py::test_warmup_kl_falls_and_only_indexers_move",
                     "tests/test_train.py::test_sparse_phase_learns_all_parameters"),
    "train_mtp_run": ("tests/test_train.py::test_eval_iters_zero_trains_without_validation",  # `mtp_run`
                      "tests/test_train.py::test_mtp_loss_trains_the_mtp_layer"),
    "launch_data_parallel_run": ("tests/test_launch.py::test_torchrun_two_processes_data_parallel",
                                 "tests/test_launch.py::test_context_parallel_warmup_equals_one_process"),
    "convert": ("tests/test_convert.py::",),  # the fixtures `tiny` and `tied`
}

# Node id prefixes, longest first (a group starts where its first member would). The seconds:
# one run of launch/test.sh on two cores.
LONG_FIRST = (
    "tests/test_experiment.py::test_smoke_pipeline_end_to_end",  # 185
    "tests/test_launch.py::test_context_parallel_warmup_equals_one_process",  # 67 with its group
    "tests/test_convert_memory.py::test_from_hf_holds_about_one_shard_of_weights",  # 63
    "tests/test_pipeline_train.py::test_pipeline_parallel_warmup_logs_every_stage_and_resumes",  # 53
    "tests/test_train.py::test_kill_at_random_points_resumes_bit_identical",  # 52
    "tests/test_launch.py::test_two_nodes_train_checkpoint_and_resume_on_one_node",  # 50
    "tests/test_train.py::test_pretrain_lm_loss_falls",  # 44 with its group
    "tests/test_bench_fp8_train.py::test_end_to_end_tiny_cpu",  # 41
    "tests/test_import.py::test_sparse_run_starts_from_the_imported_weights",  # 2 x 30
    "tests/test_sweep.py::test_two_point_sweep_writes_its_table_and_resumes",  # 25
    "tests/test_model.py::test_triton_backend_equals_the_reference_in_the_model",  # 24 + 14
    "tests/test_train.py::test_non_finite_stops_before_saving_and_resume_can_skip_the_batch",  # 23
    "tests/test_convert_release.py::test_full_size_key_maps_one_to_one",  # 21 + 17
    "tests/test_parallel.py::test_layer_function_on_the_kernels_matches_one_rank",  # 2 x 19
    "tests/test_bench_model_step.py::test_update_keeps_the_arms_not_measured_again",  # 19
    "tests/test_bench_parallel.py::test_parallel_benchmark_sweeps_layouts_on_two_ranks",  # 18
    "tests/test_packed_train.py::test_packed_training_step_equals_documents_alone",  # 13
    "tests/test_bench_parallel.py::test_parallel_layer_benchmark_compares_the_alternatives",  # 12
    "tests/test_train.py::test_eval_iters_zero_trains_without_validation",  # 12 with its group
    "tests/test_parallel.py::test_pipeline_training_steps_match_one_rank",  # 12 + 7
    "tests/test_parallel.py::test_layer_function_on_one_rank_is_the_reference_math",  # 12
)


def group_of(nodeid: str) -> str | None:
    return next((name for name, prefixes in GROUPS.items() if nodeid.startswith(prefixes)), None)


def _loadgroup(config) -> bool:
    # an xdist worker has dist "no" and loadgroup set from the controller's --dist
    return config.getoption("dist", "no") == "loadgroup" or bool(getattr(config.option, "loadgroup", False))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """LONG_FIRST's tests, and the rest of their groups, first and in its order (the same order
    on every worker; the scheduler hands the work out in it). Only under loadgroup."""
    if not _loadgroup(config):
        return
    last = len(LONG_FIRST)
    rank = {item.nodeid: next((i for i, p in enumerate(LONG_FIRST) if item.nodeid.startswith(p)), last)
            for item in items}
    group_rank: dict[str, int] = {}
    for item in items:
        group = group_of(item.nodeid)
        if group is not None:
            group_rank[group] = min(group_rank.get(group, last), rank[item.nodeid])
    items.sort(key=lambda item: group_rank.get(group_of(item.nodeid), rank[item.nodeid]))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """loadgroup with GROUPS as the groups, in the workers' order (LONG_FIRST)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class GroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or super()._split_scope(nodeid)

    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # newer xdist would sort the work by group size
    return GroupScheduling(config, log)
