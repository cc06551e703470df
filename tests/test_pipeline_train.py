"""The trainer under pipeline parallelism: PP=2 over two CPU processes (launch/torchrun.sh,
gloo) runs the warm-up phase, logs the indexer KL and top-k recall of the layers of BOTH
stages (each stage's layers record into its own process; the values are reduced over the
pipeline group after the step), checkpoints, and a run resumed from the checkpoint logs the
same next-step values as the uninterrupted one.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.test_launch import CONFIGS, REPO, _env


def _warmup_pp2(corpus, save, tb, cwd):
    env = dict(_env(), NPROC_PER_NODE="2")
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "--config", str(CONFIGS / "tiny" / "warmup.yaml"),
         f"data.dir={corpus}", "data.seq_length=32", f"checkpoint.save={save}", "checkpoint.load_from=null",
         f"logging.tensorboard_dir={tb}", "train.iters=3", "train.lr_warmup_iters=0", "train.micro_batch_size=2",
         "train.global_batch_size=4", "eval.iters=0", "checkpoint.interval=2", "logging.interval=1",
         "megatron.pipeline_model_parallel_size=2", "model.overrides.num_layers=4"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    from megatron_dsa.train.runner import read_scalars

    return read_scalars(tb)


def test_pipeline_parallel_warmup_logs_every_stage_and_resumes(corpus, tmp_path):
    full = _warmup_pp2(corpus, tmp_path / "save", tmp_path / "tb", tmp_path)
    for tag in ("indexer kl", "indexer topk-recall"):
        for layer in (1, 2, 3, 4):  # layers 1-2 on the first stage, 3-4 on the last
            values = full[f"{tag}/layer{layer}"]
            assert [i for i, _ in values] == [1, 2, 3] and all(v > 0 for _, v in values), (tag, layer)
        mean = [sum(full[f"{tag}/layer{n}"][i][1] for n in (1, 2, 3, 4)) / 4 for i in range(3)]
        assert [v for _, v in full[tag]] == pytest.approx(mean, rel=1e-5)
    # Resume from the iteration-2 checkpoint: iteration 3 logs what the uninterrupted run did.
    save = tmp_path / "resumed"
    shutil.copytree(tmp_path / "save", save)
    shutil.rmtree(save / "iter_0000003")
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = _warmup_pp2(corpus, save, tmp_path / "tb_resumed", tmp_path)
    for tag in ("lm loss", "indexer kl", "indexer kl/layer1", "indexer kl/layer4"):
        assert [i for i, _ in resumed[tag]] == [3], tag
        assert resumed[tag][0][1] == pytest.approx(full[tag][2][1], rel=1e-6), tag
