"""The three training phases on Megatron-LM's loop (subprocesses, CPU, gloo), on the real corpus.

- each phase learns: LM loss falls (pretrain, sparse); the indexer KL falls (warm-up);
- warm-up leaves every non-indexer weight bit-identical and moves the indexers;
- in sparse training the indexer moves only through its KL (an LM-loss-only backward gives it
  exactly zero gradient);
- SIGKILL at random points of a run (inside a shard write too), each time resumed, ends with
  weights bit-identical to an uninterrupted run's;
- a non-finite loss or gradient stops the run naming the iteration and where, saves nothing of
  it, and a resume that skips the bad batch finishes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import set_indexer_loss_scale

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "tiny"
SEQ = 64


def run_cli(args: list[str], timeout: int = 240, env_extra: dict | None = None, code: str | None = None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "megatron_dsa.train.cli", *args]
    # Files, not pipes: a SIGKILLed run leaves helper processes (Megatron's checkpoint-writer
    # manager) that would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:  # end what the run left behind: its own process group, started here
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def phase_args(phase: str, corpus: Path, root: Path, iters: int, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIGS / f"{phase}.yaml"), f"data.dir={corpus}", f"data.seq_length={SEQ}",
        f"checkpoint.save={root / phase}", f"logging.tensorboard_dir={root / (phase + '_tb')}",
        f"train.iters={iters}", "train.micro_batch_size=4", "train.global_batch_size=4",
        f"eval.interval={iters}", "eval.iters=2", f"checkpoint.interval={iters}", "logging.interval=1",
        *extra,
    ]


def ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from megatron_dsa.train.runner import read_scalars

    return read_scalars(tb_dir)[tag]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def load_weights(ckpt_dir: Path, tmp: Path, iteration: int | None = None) -> dict[str, torch.Tensor]:
    """The model tensors of the latest (or the given iteration's) torch_dist checkpoint in
    ``ckpt_dir`` (no optimizer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp.mkdir(parents=True, exist_ok=True)
    if iteration is None:
        iteration = int((ckpt_dir / "latest_checkpointed_iteration.txt").read_text())
    out = tmp / f"{ckpt_dir.name}-{iteration}.pt"
    dcp_to_torch_save(str(ckpt_dir / f"iter_{iteration:07d}"), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")
            and "_extra_state" not in k}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~600 KB of this interpreter's stdlib -> tokenizer (vocab 512) -> indexed datasets."""
    from megatron_dsa.data import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "tiny"
    build_corpus(out, None, 512, max_bytes=600_000, valid_fraction=0.05)
    return out


@pytest.fixture(scope="session")
def phases(corpus, tmp_path_factory) -> Path:
    """pretrain (40 it) -> warmup (15 it) -> sparse (15 it), each from the previous checkpoint.
    (Its tests share one xdist worker: GROUPS in tests/conftest.py.)"""
    root = tmp_path_factory.mktemp("phases")
    ok(run_cli(phase_args("pretrain", corpus, root, 40, "train.lr_warmup_iters=4")))
    ok(run_cli(phase_args("warmup", corpus, root, 15, f"checkpoint.load_from={root / 'pretrain'}",
                          "train.lr=3e-3", "train.min_lr=3e-3")))
    ok(run_cli(phase_args("sparse", corpus, root, 15, f"checkpoint.load_from={root / 'warmup'}",
                          "train.lr=1e-3", "train.min_lr=1e-3", "model.overrides.dsa_indexer_topk=8")))
    return root


def test_pretrain_lm_loss_falls(phases):
    lm = [v for _, v in scalars(phases / "pretrain_tb", "lm loss")]
    assert len(lm) == 40
    assert mean(lm[-5:]) < mean(lm[:5]) - 0.5, lm


def test_warmup_kl_falls_and_only_indexers_move(phases, tmp_path):
    kl = [v for _, v in scalars(phases / "warmup_tb", "indexer kl")]
    assert len(kl) == 15
    assert mean(kl[-4:]) < 0.9 * mean(kl[:4]), kl
    recall = [v for _, v in scalars(phases / "warmup_tb", "indexer topk-recall")]
    assert all(0.0 < r <= 1.0 for r in recall)
    # Per-layer KL is logged for every layer.
    tags = {t for t in __import__("megatron_dsa.train.runner", fromlist=["x"]).read_scalars(phases / "warmup_tb")}
    assert {"indexer kl/layer1", "indexer kl/layer2", "indexer kl/layer3", "tokens-per-sec"} <= tags

    before = load_weights(phases / "pretrain", tmp_path)
    after = load_weights(phases / "warmup", tmp_path)
    assert before.keys() == after.keys()
    indexer = [k for k in before if ".indexer." in k]
    main = [k for k in before if ".indexer." not in k]
    assert indexer and len(main) > 20
    for key in main:
        assert torch.equal(before[key], after[key]), f"warm-up changed frozen weight {key}"
    moved = [k for k in indexer if not torch.equal(before[k], after[k])]
    # k_norm bias/weight and all projections of every layer train.
    assert len(moved) == len(indexer), sorted(set(indexer) - set(moved))
    # The validation LM loss is exactly the pretrained model's.
    assert scalars(phases / "warmup_tb", "lm loss validation")[-1][1] == pytest.approx(
        scalars(phases / "pretrain_tb", "lm loss validation")[-1][1], abs=0, rel=0)


def test_sparse_phase_learns_all_parameters(phases, tmp_path):
    lm = [v for _, v in scalars(phases / "sparse_tb", "lm loss")]
    kl = [v for _, v in scalars(phases / "sparse_tb", "indexer kl")]
    assert len(lm) == len(kl) == 15 and all(v > 0 for v in kl)
    assert mean(lm[-4:]) < mean(lm[:4]), lm
    before = load_weights(phases / "warmup", tmp_path)
    after = load_weights(phases / "sparse", tmp_path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".indexer." in k for k in changed) and any(".indexer." not in k for k in changed)


def test_sparse_indexer_moves_only_through_kl(megatron_world):
    """LM-loss-only backward (the KL scaled to zero) leaves every indexer gradient exactly zero,
    while the main model gets gradients; with the KL scale on, the indexer gets gradients."""
    from megatron_dsa.model import build_model, indexer_parameters, model_config
    from megatron_dsa.train.trainer import freeze_for_phase

    torch.manual_seed(0)
    cfg = model_config("tiny", mdsa_mode="sparse", dsa_indexer_topk=8)
    model = build_model("tiny", cfg)
    freeze_for_phase(model, "sparse")
    assert all(p.requires_grad for p in model.parameters())
    tokens = torch.randint(0, 512, (2, 32))
    positions = torch.arange(32).expand(2, 32)

    def grads(kl_scale: float):
        model.zero_grad(set_to_none=True)
        set_indexer_loss_scale(kl_scale)
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        idx = [p.grad for p in indexer_parameters(model)]
        ids = {id(p) for p in indexer_parameters(model)}
        main = [p.grad for p in model.parameters() if id(p) not in ids]
        return idx, main

    try:
        idx, main = grads(0.0)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in idx)
        assert sum(int(torch.count_nonzero(g)) for g in main if g is not None) > 1000
        main_lm_only = [None if g is None else g.clone() for g in main]
        idx, main = grads(1.0)
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in idx)
        # ... and the KL does not reach the main model (the indexer's inputs are detached).
        for a, b in zip(main_lm_only, main):
            assert (a is None and b is None) or torch.equal(a, b)
    finally:
        set_indexer_loss_scale(1.0)


# A training run with one fault point. FAULT names where the process blocks (writing MARKER
# first) so the test can SIGKILL it there from outside:
#   train:N      in the forward of training iteration N
#   shard:N:J    inside the .distcp write of the checkpoint of iteration N, after its J-th item
#   metadata:N   the shards of iteration N written, its .metadata not yet
#   tracker:N    iteration N's checkpoint complete, the tracker not yet pointing at it
FAULT_RUN = r"""
import functools, os, sys, time
from pathlib import Path
kind, *where = os.environ["FAULT"].split(":")
at = int(where[0])
marker = Path(os.environ["MARKER"])
saving = []

def block(what):
    marker.write_text(what)
    while True:
        time.sleep(60)

from megatron.training import checkpointing
save_checkpoint = checkpointing.save_checkpoint
def saving_checkpoint(iteration, *args, **kwargs):
    saving.append(iteration)
    try:
        return save_checkpoint(iteration, *args, **kwargs)
    finally:
        saving.pop()
checkpointing.save_checkpoint = saving_checkpoint
import megatron.training.training as training_loop
training_loop.save_checkpoint = saving_checkpoint

if kind == "train":
    from megatron_dsa.train import trainer
    forward_step = trainer.forward_step
    def blocking_forward_step(data_iterator, model, *args, **kwargs):
        from megatron.training import get_args
        if model.training and get_args().curr_iteration + 1 == at:
            block(f"forward of iteration {at}")
        return forward_step(data_iterator, model, *args, **kwargs)
    trainer.forward_step = blocking_forward_step
elif kind == "shard":
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    write_item = filesystem_async._write_item
    written = [0]
    @functools.wraps(write_item)
    def blocking_write_item(*args, **kwargs):
        result = write_item(*args, **kwargs)
        if saving and saving[-1] == at:
            written[0] += 1
            if written[0] == int(where[1]):
                stream = next(a for a in args if hasattr(a, "flush"))
                stream.flush()
                block(f"after item {written[0]} of a shard of iteration {at}")
        return result
    filesystem_async._write_item = blocking_write_item
elif kind == "metadata":
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    finish = FileSystemWriterAsync.finish
    def blocking_finish(self, *args, **kwargs):
        if saving and saving[-1] == at:
            block(f"before the .metadata of iteration {at}")
        return finish(self, *args, **kwargs)
    FileSystemWriterAsync.finish = blocking_finish
elif kind == "tracker":
    import megatron.core.dist_checkpointing as dc
    dist_save = dc.save
    def blocking_save(*args, **kwargs):
        result = dist_save(*args, **kwargs)
        if saving and saving[-1] == at:
            block(f"before the tracker names iteration {at}")
        return result
    dc.save = blocking_save

from megatron_dsa.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_until_blocked(args: list[str], fault: str, marker: Path, timeout: int = 240) -> str:
    """Start a run with FAULT_RUN, SIGKILL its process group once it blocks at the fault."""
    env = dict(os.environ, PYTHONPATH=str(REPO), FAULT=fault, MARKER=str(marker))
    env.pop("WORLD_SIZE", None)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", FAULT_RUN, *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        log = out.read()
    assert marker.exists(), f"the run never reached {fault}:\n{log[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def fault_points(rng: random.Random, iters: int, interval: int, trials: int) -> list[str]:
    """``trials`` kill points in increasing order of progress, at least one inside a shard
    write (each resumed run must reach the next one)."""
    saves = list(range(interval, iters + 1, interval))
    points = {(n, 0, f"train:{n}") for n in range(1, iters + 1)}
    points |= {(n, 1, f"shard:{n}:{rng.randint(1, 40)}") for n in saves}
    points |= {(n, 2, f"metadata:{n}") for n in saves}
    points |= {(n, 3, f"tracker:{n}") for n in saves}
    while True:
        chosen = sorted(rng.sample(sorted(points), trials))
        if any(p[2].startswith("shard") for p in chosen):
            return [p[2] for p in chosen]


def test_kill_at_random_points_resumes_bit_identical(corpus, tmp_path):
    """SIGKILL at random points of a short run (a forward, inside a shard file's write, between
    the shards and the metadata, between a complete checkpoint and its tracker), each time
    resuming the run: the final weights are bit-identical to an uninterrupted run's. The
    points are seeded (MDSA_FAULT_SEED to replay) and printed."""
    iters, interval, trials = 8, 2, 3
    seed = int(os.environ.get("MDSA_FAULT_SEED", int.from_bytes(os.urandom(4), "little")))
    points = fault_points(random.Random(seed), iters, interval, trials)
    print(f"MDSA_FAULT_SEED={seed}: kill points {points}")
    common = [f"checkpoint.interval={interval}", "eval.interval=100", "eval.iters=1", "train.lr_warmup_iters=2"]

    ref = tmp_path / "ref"
    ok(run_cli(phase_args("pretrain", corpus, ref, iters) + common))

    run = tmp_path / "run"
    args = phase_args("pretrain", corpus, run, iters) + common
    for i, point in enumerate(points):
        where = run_until_blocked(args, point, tmp_path / f"marker{i}")
        print(f"killed: {where}")
    resumed = run_cli(args)
    ok(resumed)
    ckpt = run / "pretrain"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    a, b = load_weights(ref / "pretrain", tmp_path / "a"), load_weights(ckpt, tmp_path / "b")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, (f"MDSA_FAULT_SEED={seed} {points}", different[:5])


# Non-finite values injected into the tiny model: NAN_AT="N:forward" makes layer 2's MoE output
# NaN in training iteration N; "N:grad" makes a gradient inf in the backward of iteration N.
NAN_RUN = r"""
import os, sys
from megatron_dsa.train import trainer
inner = trainer.model_provider
def model_provider(*args, **kwargs):
    from megatron.training import get_args
    model = inner(*args, **kwargs)
    layer = model.decoder.layers[1]
    step = lambda: get_args().curr_iteration + 1
    for fault in os.environ["NAN_AT"].split(","):
        at, kind = fault.split(":")
        if kind == "forward":
            def poison(module, inputs, output, at=int(at)):
                if module.training and step() == at:
                    return (output[0] * float("nan"), *output[1:])
            layer.mlp.register_forward_hook(poison)
        else:
            layer.mlp.shared_experts.linear_fc2.weight.register_hook(
                lambda g, at=int(at): g * float("inf") if step() == at else g)
    return model
trainer.model_provider = model_provider
from megatron_dsa.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def stopped_with(result, *needles: str) -> str:
    """Exit status 1, one ``error:`` line (the last one on stderr), no traceback."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_non_finite_stops_before_saving_and_resume_can_skip_the_batch(corpus, tmp_path):
    """A NaN forward in iteration 3, then an inf gradient in iteration 5: each run stops with one
    line naming the iteration and where (decoder layer 2; the parameter) and saves nothing of
    that iteration (the last good checkpoint stays the latest); the second run resumes from the
    last good checkpoint and steps over iteration 3's batch (train.skip_iterations)."""
    ckpt = tmp_path / "pretrain"
    args = phase_args("pretrain", corpus, tmp_path, 6, "checkpoint.interval=2", "eval.interval=100",
                      "eval.iters=1", "train.lr_warmup_iters=1")
    faults = {"NAN_AT": "3:forward,5:grad"}
    tracker = ckpt / "latest_checkpointed_iteration.txt"

    first = run_cli(args, code=NAN_RUN, env_extra=faults)
    stopped_with(first, "iteration 3: the output of decoder layer 2 went non-finite first", "the LM loss",
                 "last good checkpoint is iteration 2", "train.skip_iterations=[3]")
    assert tracker.read_text().strip() == "2" and not (ckpt / "iter_0000003").exists()

    second = run_cli(args + ["train.skip_iterations=[3]"], code=NAN_RUN, env_extra=faults)
    stopped_with(second, "iteration 5: a gradient is non-finite",
                 "decoder.layers.1.mlp.shared_experts.linear_fc2.weight", "last good checkpoint is iteration 4")
    # The second run resumed from the last good checkpoint, stepped over iteration 3's batch
    # and saved iteration 4 before it stopped.
    assert "at iteration 2" in second.stdout
    assert tracker.read_text().strip() == "4" and not (ckpt / "iter_0000005").exists()


def test_loss_terms_named_when_non_finite(megatron_world):
    """The first non-finite term is named: a decoder layer's output before the LM loss, a
    layer's indexer KL, a MoE auxiliary loss; finite terms pass."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    from megatron_dsa.layer import INDEXER_KL
    from megatron_dsa.train import trainer

    nan = float("nan")
    mask = torch.ones(2, 4)
    tracker = get_moe_metrics_tracker().metrics

    def clear():
        trainer._pop_layer_metrics()
        trainer._LAYER_FINITE.clear()
        for entry in tracker.values():
            entry.values.zero_()

    try:
        clear()
        trainer.loss_func(mask, None, "sparse", torch.ones(2, 4))  # all finite: no error
        with pytest.raises(trainer.NonFiniteError, match="the LM loss is non-finite"):
            trainer.loss_func(mask, None, "sparse", torch.full((2, 4), nan))
        clear()
        trainer._LAYER_FINITE.extend([(1, torch.tensor(True)), (2, torch.tensor(False)), (3, torch.tensor(False))])
        with pytest.raises(trainer.NonFiniteError, match="the output of decoder layer 2 went non-finite first"):
            trainer.loss_func(mask, None, "sparse", torch.full((2, 4), nan))
        clear()
        save_to_aux_losses_tracker(INDEXER_KL, torch.tensor(0.3), 1, 3)
        save_to_aux_losses_tracker(INDEXER_KL, torch.tensor(nan), 3, 3)
        with pytest.raises(trainer.NonFiniteError, match="the indexer KL of layer 3 is non-finite"):
            trainer.loss_func(mask, None, "sparse", torch.ones(2, 4))
        clear()
        save_to_aux_losses_tracker("seq_load_balancing_loss", torch.tensor(float("inf")), 2, 3)
        with pytest.raises(trainer.NonFiniteError, match="MoE seq_load_balancing_loss of layer 2 is non-finite"):
            trainer.loss_func(mask, None, "sparse", torch.ones(2, 4))
    finally:
        clear()


def test_a_run_that_fails_leaves_no_run_record(tmp_path, monkeypatch, corpus):
    """The run record (mdsa_run.json) is written only once Megatron accepted its flags, and
    removed again with the directory it created when the run stops before any checkpoint:
    otherwise the next run with other settings is refused that directory. (And the run reads
    checkpoints through the allow-list from before Megatron's first load.)"""
    import megatron.training
    import megatron.training.arguments as arguments

    from megatron_dsa import safe_load
    from megatron_dsa.train import trainer

    installed = []
    monkeypatch.setattr(safe_load, "install", lambda: installed.append(True))
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    save = tmp_path / "runs" / "save"
    cfg = load_config(CONFIGS / "pretrain.yaml", [f"data.dir={corpus}", f"checkpoint.save={save}",
                                                  "data.seq_length=32"])
    plan = preflight(cfg, check_flags=False)

    def refused(*args, **kwargs):
        assert installed  # before Megatron parses (and later loads) anything
        raise AssertionError("Megatron refuses a flag")

    monkeypatch.setattr(arguments, "parse_and_validate_args", refused)
    with pytest.raises(AssertionError, match="refuses"):
        trainer.run(cfg, plan)
    assert not save.exists()

    monkeypatch.setattr(arguments, "parse_and_validate_args", lambda **kwargs: object())
    monkeypatch.setattr("megatron.training.argument_utils.pretrain_cfg_container_from_args", lambda *a: None)

    def crashes(*args, **kwargs):
        assert (save / "mdsa_run.json").is_file()  # written before the loop starts
        raise RuntimeError("out of memory")

    monkeypatch.setattr(megatron.training, "pretrain", crashes)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.run(cfg, plan)
    assert not (tmp_path / "runs").exists()


def test_single_process_run_holds_its_rendezvous_port(corpus, tmp_path, monkeypatch):
    """Outside torchrun the run hands Megatron a store bound to its port before Megatron starts:
    no window between choosing the port and binding it in which a concurrent job (another test,
    another run) could take it. Under torchrun Megatron's own env:// rendezvous stays."""
    import socket

    import megatron.training
    import megatron.training.arguments as arguments

    from megatron_dsa.train import trainer
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    cfg = load_config(CONFIGS / "pretrain.yaml", [f"data.dir={corpus}", f"checkpoint.save={tmp_path / 'save'}",
                                                  "data.seq_length=32"])
    plan = preflight(cfg, check_flags=False)
    monkeypatch.setattr(arguments, "parse_and_validate_args", lambda **kwargs: object())
    monkeypatch.setattr("megatron.training.argument_utils.pretrain_cfg_container_from_args", lambda *a: None)
    stores = []

    def starts(*args, store=None, **kwargs):
        stores.append(store)
        if store is not None:
            assert os.environ["MASTER_PORT"] == str(store.port) and os.environ["WORLD_SIZE"] == "1"
            with socket.socket() as sock, pytest.raises(OSError):  # the port is taken, by the store
                sock.bind(("127.0.0.1", store.port))
        raise RuntimeError("stop here")

    monkeypatch.setattr(megatron.training, "pretrain", starts)
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.run(cfg, plan)
    assert isinstance(stores[0], torch.distributed.TCPStore)

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.run(cfg, plan)
    assert stores[1] is None


def test_layer_metrics_average_only_the_layers_that_recorded(megatron_world):
    """With a selection reused between layers (dsa_indexer_topk_freq) the reusing layers record
    no recall / KL: the logged mean is over the recording layers, not diluted by their zeros."""
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    from megatron_dsa.layer import INDEXER_KL, TOPK_RECALL
    from megatron_dsa.train import trainer

    trainer._pop_layer_metrics()  # values an earlier in-process forward left in the tracker
    for layer, (kl, recall) in {1: (0.2, 0.5), 3: (0.4, 0.7)}.items():
        save_to_aux_losses_tracker(INDEXER_KL, torch.tensor(kl), layer, 3)
        save_to_aux_losses_tracker(TOPK_RECALL, torch.tensor(recall), layer, 3)
    mask = torch.ones(2, 4)
    _, n, report = trainer.loss_func(mask, None, "sparse", torch.zeros(2, 4))
    assert int(n) == 8
    assert report["indexer topk-recall"].tolist() == pytest.approx([0.6 * 8, 8])
    assert report["indexer kl"].tolist() == pytest.approx([0.3 * 8, 8])
    assert "indexer topk-recall/layer1" in report and "indexer topk-recall/layer3" in report
    assert "indexer topk-recall/layer2" not in report


def test_sparse_kl_from_the_backward_is_reported_after_the_step(megatron_world, monkeypatch):
    """A sparse training step's KL is recorded by the attention's backward, after the loss
    function: that function leaves the tracker alone, and after the step the log gets the mean
    over the microbatches; a non-finite KL stops the run there, naming the iteration."""
    from types import SimpleNamespace

    import megatron.core.num_microbatches_calculator as microbatches
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    from megatron_dsa.layer import INDEXER_KL
    from megatron_dsa.train import trainer

    args = SimpleNamespace(pipeline_model_parallel_size=1, mdsa_phase="sparse", num_layers=3, curr_iteration=4)
    monkeypatch.setattr(trainer, "_args", lambda: args)
    monkeypatch.setattr(microbatches, "get_num_microbatches", lambda: 2)
    trainer._pop_layer_metrics()  # values an earlier in-process forward left in the tracker
    training = SimpleNamespace(training=True, config=SimpleNamespace(pipeline_model_parallel_size=1))
    try:
        assert trainer.metrics_after_step() and not trainer.metrics_after_step(SimpleNamespace(
            pipeline_model_parallel_size=1, mdsa_phase="warmup"))
        for microbatch_kl in (0.2, 0.4):  # two microbatches: forward (the loss function), backward
            _, _, report = trainer.loss_func(torch.ones(2, 4), training, "sparse", torch.zeros(2, 4))
            assert "indexer kl" not in report
            save_to_aux_losses_tracker(INDEXER_KL, torch.tensor(microbatch_kl), 2, 3)
        logged = trainer.layer_metrics_after_step()
        assert float(logged["indexer kl"]) == pytest.approx(0.3) and set(logged) == {"indexer kl", "indexer kl/layer2"}
        assert not trainer.layer_metrics_after_step()  # read once
        save_to_aux_losses_tracker(INDEXER_KL, torch.tensor(float("nan")), 3, 3)
        with pytest.raises(trainer.NonFiniteError, match="iteration 5: the indexer KL of layer 3 is non-finite"):
            trainer.layer_metrics_after_step()
    finally:
        trainer._pop_layer_metrics()


def test_no_apex_weight_gradient_fusion_on_the_gpu(monkeypatch):
    """On CUDA without Apex's fused weight-gradient extension Megatron's default fusion would
    fail at model construction: the trainer turns it off."""
    from megatron_dsa.train import flags
    from megatron_dsa.train.config import load_config

    cfg = load_config(CONFIGS / "pretrain.yaml", ["data.dir=/nonexistent"])
    plan = {"data_dir": "/nonexistent", "transformer_impl": "local"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flags, "_apex_wgrad_fusion_installed", lambda: False)
    assert "--no-gradient-accumulation-fusion" in flags.megatron_argv(cfg, plan)
    monkeypatch.setattr(flags, "_apex_wgrad_fusion_installed", lambda: True)
    assert "--no-gradient-accumulation-fusion" not in flags.megatron_argv(cfg, plan)


@pytest.fixture(scope="session")
def mtp_run(corpus, tmp_path_factory):
    """One short pretraining run with an MTP layer, without validation (eval.iters=0), saving
    every iteration: (its result, its directory). (Its tests share one xdist worker: GROUPS in
    tests/conftest.py.)"""
    root = tmp_path_factory.mktemp("mtp")
    result = run_cli(phase_args("pretrain", corpus, root, 2, "model.overrides.mtp_num_layers=1",
                                "train.lr_warmup_iters=0", "eval.iters=0", "checkpoint.interval=1"))
    ok(result)
    return result, root


def test_eval_iters_zero_trains_without_validation(mtp_run):
    # eval.iters=0 skips Megatron's validation (the one-step 16 x 128K measurement needs that)
    result, root = mtp_run
    assert "validation loss" not in result.stdout + result.stderr
    assert (root / "pretrain" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_mtp_loss_trains_the_mtp_layer(mtp_run, tmp_path):
    """model.overrides.mtp_num_layers=1 through the trainer (one short pretraining run, a
    checkpoint per iteration): Megatron logs the MTP loss, and the step between the two
    checkpoints moves the MTP layer's weights but not its indexer (pretraining leaves every
    indexer out). The warm-up's freezing and KL of the MTP indexer: tests/test_mtp.py."""
    _, root = mtp_run
    losses = [v for _, v in scalars(root / "pretrain_tb", "mtp_1 loss")]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses), losses
    first, second = (load_weights(root / "pretrain", tmp_path / "w", i) for i in (1, 2))
    # megatron-core stores the MTP layer's decoder layer as mtp.layers.0.transformer_layer.*
    mtp = [k for k in first if k.startswith("mtp.layers.0.")]
    indexer = {k for k in mtp if ".indexer." in k}
    assert indexer and len(mtp) > len(indexer) + 10
    moved = {k for k in mtp if not torch.equal(first[k], second[k])}
    assert not moved & indexer
    for part in ("eh_proj", "enorm", "hnorm", "final_layernorm", "self_attention.linear_q_down_proj", "mlp.router"):
        assert any(part in k for k in moved), (part, sorted(moved))


def test_validation_metrics_do_not_reach_the_next_training_step(megatron_world):
    """Megatron's evaluate, as the trainer wraps it, drops the indexer metrics its forwards
    recorded (under pipeline parallelism no loss function pops the other stages'), and a second
    run in the same process does not wrap it twice."""
    import types

    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    from megatron_dsa.layer import INDEXER_KL
    from megatron_dsa.train import trainer

    def evaluate(*args, **kwargs):  # a validation forward on a stage without the loss function
        save_to_aux_losses_tracker(INDEXER_KL, torch.tensor(0.5), 2, 3)
        return "results"

    module = types.SimpleNamespace(evaluate=evaluate)
    trainer._pop_layer_metrics()
    trainer._wrap_once(module, "evaluate", trainer._drop_validation_metrics)
    once = module.evaluate
    trainer._wrap_once(module, "evaluate", trainer._drop_validation_metrics)
    assert module.evaluate is once
    assert module.evaluate() == "results"
    assert not get_moe_metrics_tracker().metrics[INDEXER_KL].values.any()
