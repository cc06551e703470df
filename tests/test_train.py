"""The three training phases on Megatron-LM's loop (subprocesses, CPU, gloo), on the real corpus.

- each phase learns: LM loss falls (pretrain, sparse); the indexer KL falls (warm-up);
- warm-up leaves every non-indexer weight bit-identical and moves the indexers;
- in sparse training the indexer moves only through its KL (an LM-loss-only backward gives it
  exactly zero gradient);
- save -> resume reproduces the uninterrupted run's per-iteration losses exactly, also after a
  process was SIGKILLed in the middle of a save (the previous checkpoint stays loadable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch

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


def load_weights(ckpt_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the latest torch_dist checkpoint in ``ckpt_dir`` (no optimizer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp.mkdir(parents=True, exist_ok=True)
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
    """pretrain (40 it) -> warmup (15 it) -> sparse (15 it), each from the previous checkpoint."""
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
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

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
        DSAIndexerLossAutoScaler.set_loss_scale(torch.tensor(kl_scale))
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
        DSAIndexerLossAutoScaler.set_loss_scale(torch.tensor(1.0))


KILL_IN_SAVE = r"""
import os, signal, sys
import megatron.core.dist_checkpointing as dc
original = dc.save
def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
    result = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
    if checkpoint_dir.rstrip('/').endswith(os.environ['KILL_AT']):
        print('SIGKILL in the middle of saving', checkpoint_dir, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # shards written, tracker not yet updated
    return result
dc.save = save
from megatron_dsa.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_and_kill_during_save(corpus, tmp_path):
    """Uninterrupted 8 iterations vs. a run SIGKILLed while saving iteration 8, then resumed
    from iteration 4: the resumed iterations reproduce the uninterrupted losses exactly."""
    common = ["checkpoint.interval=4", "eval.interval=100", "train.lr_warmup_iters=2"]

    ref = tmp_path / "ref"
    ok(run_cli(phase_args("pretrain", corpus, ref, 8) + common))
    ref_loss = dict(scalars(ref / "pretrain_tb", "lm loss"))
    assert sorted(ref_loss) == list(range(1, 9))

    run = tmp_path / "run"
    killed = run_cli(phase_args("pretrain", corpus, run, 8) + common, code=KILL_IN_SAVE,
                     env_extra={"KILL_AT": "iter_0000008"})
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "SIGKILL in the middle of saving" in killed.stdout
    ckpt = run / "pretrain"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpt / "iter_0000008").exists()  # the interrupted save's leftovers

    # The previous checkpoint is loadable: preflight plans a resume and the run finishes.
    check = run_cli(phase_args("pretrain", corpus, run, 8) + common + ["--check"])
    ok(check)
    assert "resume from" in check.stdout
    shutil.rmtree(run / "pretrain_tb")
    resumed = run_cli(phase_args("pretrain", corpus, run, 8) + common)
    ok(resumed)
    assert "loading distributed checkpoint from" in resumed.stdout and "at iteration 4" in resumed.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    got = dict(scalars(run / "pretrain_tb", "lm loss"))
    assert sorted(got) == [5, 6, 7, 8]
    for it in got:
        assert got[it] == ref_loss[it], (it, got[it], ref_loss[it])
    # The final checkpoints of both runs hold identical weights.
    a, b = load_weights(ref / "pretrain", tmp_path / "a"), load_weights(ckpt, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def test_eval_iters_zero_trains_without_validation(corpus, tmp_path):
    # eval.iters=0 skips Megatron's validation (the one-step 16 x 128K measurement needs that)
    result = run_cli(phase_args("pretrain", corpus, tmp_path, 2, "eval.iters=0", "train.lr_warmup_iters=0"))
    ok(result)
    assert "validation loss" not in result.stdout + result.stderr
    assert (tmp_path / "pretrain" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
