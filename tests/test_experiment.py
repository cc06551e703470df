"""The verification study: recipe configs and the CPU smoke pipeline of experiments/verify_dsa.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dsa.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"


def test_report_recipes_match_the_report_exactly():
    w = load_config(RECIPES / "report_warmup.yaml")
    assert (w.phase, w.model["size"], w.train["iters"]) == ("warmup", "small", 1000)
    assert w.train["global_batch_size"] == 16 and w.data["seq_length"] == 131072
    assert w.train["lr"] == 1e-3 and w.train["lr_decay_style"] == "constant"
    assert w.model["overrides"]["dsa_indexer_topk"] == 2048
    s = load_config(RECIPES / "report_sparse.yaml")
    assert (s.phase, s.model["size"], s.train["iters"]) == ("sparse", "small", 15000)
    assert s.train["global_batch_size"] == 480 and s.data["seq_length"] == 131072
    assert s.train["lr"] == 7.3e-6 and s.model["overrides"]["dsa_indexer_topk"] == 2048


def test_h200_recipes_same_structure_scaled_down():
    cfgs = {n: load_config(RECIPES / f"h200_{n}.yaml") for n in ("pretrain", "warmup", "sparse", "dense_control")}
    assert [c.phase for c in cfgs.values()] == ["pretrain", "warmup", "sparse", "pretrain"]
    for c in cfgs.values():
        seq = c.data["seq_length"]
        assert seq >= 16384 and c.model["size"] == "small"
        assert c.data["corpus"] == "tasks"  # every phase trains on the task mixture
        assert c.model["overrides"]["dsa_indexer_topk"] * 32 == seq  # k = S/32
    w, sp, b = cfgs["warmup"], cfgs["sparse"], cfgs["dense_control"]
    assert w.train["lr"] == 1e-3
    # arm B: the same tokens, lr, seed (so data order) as arm A's sparse phase
    for key in ("iters", "global_batch_size", "micro_batch_size", "lr", "min_lr", "lr_decay_style", "seed"):
        assert b.train[key] == sp.train[key], key
    assert b.megatron.get("finetune") is True


def test_128k_batch1_recipes_resume_in_pieces():
    """The report's recipe at batch 1 for one GPU: warm-up 1000 x 1 x 128K (lr 1e-3, indexers
    only), then sparse (lr 7.3e-6, k 2048); each saves and exits after about 20 minutes and
    continues from its own checkpoint when run again."""
    from megatron_dsa.train.flags import megatron_argv

    w = load_config(RECIPES / "report_warmup_b1.yaml")
    assert (w.phase, w.model["size"], w.train["iters"], w.data["seq_length"]) == ("warmup", "small", 1000, 131072)
    assert (w.train["global_batch_size"], w.train["micro_batch_size"]) == (1, 1)
    assert w.train["lr"] == w.train["min_lr"] == 1e-3 and w.model["overrides"]["dsa_indexer_topk"] == 2048
    s = load_config(RECIPES / "report_sparse_b1.yaml")
    assert (s.phase, s.data["seq_length"], s.train["global_batch_size"]) == ("sparse", 131072, 1)
    assert s.train["lr"] == s.train["min_lr"] == 7.3e-6 and s.model["overrides"]["dsa_indexer_topk"] == 2048
    assert s.checkpoint["load_from"] == w.checkpoint["save"]
    for c in (w, s):
        assert c.data["corpus"] == "text" and c.checkpoint["interval"] <= 100
        argv = megatron_argv(c, {"transformer_impl": "local", "data_dir": c.data["dir"]})
        # Megatron resumes from --load = --save, and stops (saving) after the piece's minutes
        assert argv[argv.index("--load") + 1] == argv[argv.index("--save") + 1] == c.checkpoint["save"]
        assert 0 < float(argv[argv.index("--exit-duration-in-mins") + 1]) <= 20


def test_glm52_pattern_is_the_releases_schedule_cut_to_the_models_layers():
    from experiments.verify.settings import glm52_indexer_types

    full = [i + 1 for i, t in enumerate(glm52_indexer_types(78)) if t == "full"]
    assert full == [1, 2, 3, *range(7, 76, 4)] and len(full) == 21  # GLM-5.2's 78 layers
    assert glm52_indexer_types(6) == ["full"] * 3 + ["shared"] * 3  # the small MoE
    assert glm52_indexer_types(3) == ["full", "shared", "shared"]  # the tiny model keeps a shared layer


@pytest.mark.parametrize("scale", ["smoke", "h200"])
def test_every_arm_gives_a_valid_model_config(scale, tmp_path):
    """The overrides each arm's warm-up and sparse phases add (stages.stage_warmup / stage_sparse)
    load as a run config and build a valid model config at the scale's model size."""
    from argparse import Namespace

    from experiments.verify.settings import ARMS
    from experiments.verify.stages import _overrides, phase_overrides
    from experiments.verify.study import Study
    from megatron_dsa.model import model_config

    e = Study(Namespace(scale=scale, out=str(tmp_path), report_dir=None, force=False))
    assert e.num_layers == {"smoke": 3, "h200": 6}[scale]
    for arm, (_, _, warmup_only, _) in ARMS.items():
        for recipe, kind, extra in (("h200_warmup.yaml", "warmup", warmup_only), ("h200_sparse.yaml", "sparse", {})):
            cfg = load_config(RECIPES / recipe, phase_overrides(e, f"{kind}_{arm}", kind,
                                                                _overrides({**e.layout(arm), **extra})))
            config = model_config(cfg.model["size"], **cfg.model["overrides"])
            selects = [config.dsa.selects(i + 1) for i in range(config.num_layers)]
            if arm == "pattern":
                # some layers reuse an earlier selection; the first one selects
                assert selects[0] and not all(selects)
                assert config.mdsa_indexer_types == e.layout(arm)["mdsa_indexer_types"]
            elif arm in ("per_layer", "shared") or arm.startswith("obj_"):
                assert all(selects)


@pytest.mark.parametrize("scale", ["smoke", "pilot", "h200", "h200_2k", "h200_from_2k", "h200_512", "h200_512_w16",
                                   "h200_2k_dense", "h200_2k_from_512"])
def test_every_scale_pretrains_at_its_training_length(scale, tmp_path):
    """A scale's pretraining overrides load as a run config at the scale's training length and
    top-k, on a model that holds that length."""
    from argparse import Namespace

    from experiments.verify.settings import SCALES
    from experiments.verify.stages import phase_overrides
    from experiments.verify.study import Study
    from megatron_dsa.model import model_config, resolve_size

    e = Study(Namespace(scale=scale, out=str(tmp_path), report_dir=None, force=False))
    cfg = load_config(RECIPES / "h200_pretrain.yaml", phase_overrides(e, "pretrain", "pretrain", []))
    s = SCALES[scale]
    assert cfg.data["seq_length"] == s["train_length"] <= resolve_size(cfg.model["size"]).max_seq_len
    assert cfg.model["overrides"]["dsa_indexer_topk"] == s["topk"]
    assert cfg.data["answer_loss_weight"] == (16.0 if scale.endswith("_w16") else 4.0)
    model_config(cfg.model["size"], **cfg.model["overrides"])


def test_a_scale_continues_another_scales_pretraining(tmp_path, monkeypatch):
    """The curriculum h200_512 -> h200_2k_from_512 -> h200_from_2k: each scale reads the run
    beside it that it continues, its finished pretraining copied (not linked) into its own
    pretrain phase and loaded as weights only (--finetune), and the natural text of the chain's
    first run (one tokenizer for every mixture). A source that has not finished, or text not
    built yet, stops with one error."""
    from argparse import Namespace

    from experiments.verify import stages
    from experiments.verify.study import Study

    e = Study(Namespace(scale="h200_from_2k", out=str(tmp_path / "h200_from_2k"), report_dir=None, force=False))
    mid = Study(Namespace(scale="h200_2k_from_512", out=str(tmp_path / "h200_2k_from_512"), report_dir=None,
                          force=False))
    src = tmp_path / "h200_2k_from_512"
    assert e.text_data == mid.text_data == tmp_path / "h200_512" / "data_text"
    assert e.init_dir == src and mid.init_dir == tmp_path / "h200_512"
    assert e.data == tmp_path / "h200_from_2k" / "data"
    with pytest.raises(SystemExit, match="reads the text of --scale h200_512: run its corpus stage first"):
        stages.stage_corpus(e)
    with pytest.raises(SystemExit, match="has not finished"):
        stages.stage_pretrain(e)
    shard = src / "pretrain" / "ckpt" / "iter_0000400" / "shard.distcp"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"weights")
    (src / "pretrain" / "ckpt" / "latest_checkpointed_iteration.txt").write_text("400")
    (src / "pretrain" / "DONE").write_text("{}")
    seen = {}

    def launched(cmd, log, name):
        copied = e.phase_dir("pretrain") / "ckpt" / "iter_0000400" / "shard.distcp"
        seen.update(cmd=cmd, copied=copied.read_bytes(), linked=copied.stat().st_ino == shard.stat().st_ino)
        return 1.0

    monkeypatch.setattr(stages.runner, "run_phase", launched)
    stages.stage_pretrain(e)
    assert seen["copied"] == b"weights" and not seen["linked"]
    assert "megatron.finetune=true" in seen["cmd"] and "train.iters=200" in seen["cmd"]
    assert f"data.dir={e.data}" in seen["cmd"]


def test_a_cycle_of_init_from_is_one_error(monkeypatch):
    from experiments.verify import study
    from experiments.verify.settings import SCALES

    monkeypatch.setitem(SCALES, "loop_a", dict(SCALES["h200"], init_from="loop_b"))
    monkeypatch.setitem(SCALES, "loop_b", dict(SCALES["h200"], init_from="loop_a"))
    with pytest.raises(SystemExit, match="cycle: loop_a -> loop_b -> loop_a"):
        study.chain_start("loop_a")
    assert study.chain_start("h200_from_2k") == "h200_512" and study.chain_start("h200") == "h200"
    # the wide- and varied-format curricula: the same chain, every stage on its training family
    for suffix, family in (("_wide", "train_wide"), ("_varied", "train_varied")):
        assert study.chain_start("h200_from_2k" + suffix) == "h200_512" + suffix
        for narrow in ("h200_512", "h200_2k_from_512", "h200_from_2k"):
            other = SCALES[narrow + suffix]
            assert other["tasks"] == {**SCALES[narrow]["tasks"], "family": family}
            assert {k: v for k, v in other.items() if k not in ("tasks", "init_from")} == \
                {k: v for k, v in SCALES[narrow].items() if k not in ("tasks", "init_from")}


@pytest.mark.parametrize("scale,steps", [("h200", 16), ("h200_from_2k", 64), ("h200_from_2k_wide", 64), ("smoke", 4)])
def test_a_longer_warmup_arm_multiplies_the_scales_steps(monkeypatch, tmp_path, scale, steps):
    from argparse import Namespace

    from experiments.verify import stages
    from experiments.verify.study import Study

    e = Study(Namespace(scale=scale, out=str(tmp_path), report_dir=None, force=False))
    assert e.warmup_iters == steps
    monkeypatch.setattr(stages, "need", lambda e, phase: None)
    monkeypatch.setattr(stages, "_relabelled_pretrain", lambda e, arm: tmp_path / "pretrain" / "ckpt")
    seen = {}
    monkeypatch.setattr(stages, "run_phase", lambda e, name, cmd, **kw: seen.update({name: cmd}))
    for arm in ("per_layer", "warmup_x4", "warmup_x16"):
        stages.stage_warmup(e, arm)
    iters = {name: [x for x in cmd if x.startswith("train.iters=")] for name, cmd in seen.items()}
    # the last override wins: the arm's after the scale's
    assert iters["warmup_warmup_x4"][-1] == f"train.iters={4 * steps}"
    assert iters["warmup_warmup_x16"][-1] == f"train.iters={16 * steps}"
    assert f"checkpoint.interval={16 * steps}" in seen["warmup_warmup_x16"]
    assert iters["warmup_per_layer"] in ([], [f"train.iters={steps}"])
    # the scale's own steps appear in its command, so the recorded command says what ran
    assert iters["warmup_per_layer"] == ([] if steps == 16 else [f"train.iters={steps}"])


def test_a_continued_run_reports_its_chain_and_the_first_runs_text(tmp_path):
    """The corpus record and the earlier stages' evaluations come from the chain's directories."""
    from argparse import Namespace

    from experiments.verify.collect import collect
    from experiments.verify.study import Study

    def study(scale):
        return Study(Namespace(scale=scale, out=str(tmp_path / scale), report_dir=None, force=False))

    e = study("h200_from_2k")
    assert collect(e)["corpus"] == {} and collect(e)["chain"][0]["eval"] is None  # nothing run yet
    study("h200_512").save_json("corpus_info.json", {"stdlib": "/x", "splits": {"train": {"tokens": 7}}})
    study("h200_2k_from_512").save_json("eval/pretrain.json", {"phase": "pretrain", "loss": {"2048": 1.5}})
    res = collect(e)
    assert res["corpus"]["splits"]["train"]["tokens"] == 7 and "stdlib" not in res["corpus"]
    assert [(st["scale"], st["train_length"]) for st in res["chain"]] == [("h200_512", 512), ("h200_2k_from_512", 2048)]
    assert res["chain"][0]["eval"] is None and res["chain"][1]["eval"]["loss"] == {"2048": 1.5}
    assert collect(study("h200_512"))["chain"] == []


# The shared indexer, one reuse arm (GLM-5.2's pattern) and one objective arm: the others of each
# kind run the same code path (a selection every N layers trains in tests/test_train.py; the longer
# warm-ups: the section's own test below).
ARMS = ["per_layer", "shared", "pattern", "obj_listwise"]


def test_smoke_pipeline_end_to_end(tmp_path):
    out, rep = tmp_path / "run", tmp_path / "reports"
    cmd = [sys.executable, str(REPO / "experiments" / "verify_dsa.py"), "--scale", "smoke",
           "--out", str(out), "--report-dir", str(rep), "--arms", ",".join(ARMS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the exact commands are printed
    assert "-m megatron_dsa.train.cli --config" in proc.stdout
    md = (rep / "verification.md").read_text()
    for png in ("verification_loss.png", "verification_retrieval.png", "verification_warmup.png",
                "verification_speed.png", "verification_recall.png"):
        assert (rep / png).stat().st_size > 1000 and f"]({png})" in md
    # every table filled (the speed benchmark needs a GPU: its columns may say n/a)
    body = md.split("## One indexer for all layers?")[0]
    assert "n/a" not in body and "not measured" not in md.split("## Conclusions")[1]
    assert "## Why KL? Warm-up objectives" in md
    # the report speaks of the project, not of the machine it ran on
    report_json = (rep / "verification.json").read_text()
    for machine_path in (str(tmp_path), sys.executable, str(REPO)):
        assert machine_path not in md and machine_path not in report_json, machine_path
    assert "data.dir=$RUN/data" in md
    res = json.loads((rep / "verification.json").read_text())
    assert len(res["eval"]) == 2 + len(ARMS)
    assert set(res["warmup"]) == set(ARMS)
    assert set(res["recall"]) == {"pretrain", *ARMS}
    for task, table in res["recall"].items():
        assert set(map(int, table)) == {128, 256}
        for by_k in table.values():
            assert all(0 < v["mean"] <= 1 for v in by_k.values())
            # the oracle (the attention's own top-k) bounds every indexer's recall
            assert all(v["mean"] <= v["oracle_mean"] + 1e-6 <= 1 + 1e-6 for v in by_k.values())
    assert "**oracle** (the attention's own top-k)" in md
    for arm, r in res["eval"].items():
        assert set(map(int, r["loss"])) == {64, 128, 256}
        assert set(r["retrieval"]["by_task_length"]) == {"passkey", "multikey", "multivalue", "varchain", "copy"}
        assert [v["extrapolation"] for v in r["retrieval"]["by_length"].values()] == [False, True]
        assert all(v["nll"] > 0 for v in r["retrieval"]["by_length"].values())  # the answer's NLL, nats
        # beside them, the same tasks in the training formats, at the same lengths
        assert set(r["retrieval_train_formats"]["by_task_length"]) == set(r["retrieval"]["by_task_length"])
        assert set(r["retrieval_train_formats"]["by_length"]) == set(r["retrieval"]["by_length"])
    assert "answer NLL (nats/token)" in md and "Answer NLL, A minus dense control" in md
    assert set(res["verdict"]) == {"loss", "retrieval", "warmup", "shared", "pattern", "recall_oracle"}
    # the warm-up target's recall as a share of each arm's own oracle, measured for every layout
    assert "held-out recall / oracle" in md and "| not measured |" not in md.split("## Top-k recall")[0]
    assert "in-distribution formats" in md and "GLM-5.2 pattern: per layer 1 full, 2 shared, 3 shared" in md
    # the headline numbers: per arm, held-out loss at the training length, exact match per length
    head = json.loads((rep / "verification_summary.json").read_text())
    assert head["train_length"] == 256 and head["extrapolation_lengths"] == [512]
    assert set(head["arms"]) == set(res["eval"])
    for arm in head["arms"].values():
        assert arm["heldout_loss_at_train_length"] > 0
        assert set(arm["retrieval_exact_pct"]) == {"256", "512"}
        assert all(0 <= v <= 100 for v in arm["retrieval_exact_pct"].values())
        assert set(arm["retrieval_train_formats_exact_pct"]) == {"256", "512"}
    assert "512 *extrap.*" in md and "held-out formats" in md
    assert "Training mixture (every phase)" in md
    for phase in ("pretrain", "dense_control", *(f"sparse_{a}" for a in ARMS)):
        assert res["phases"][phase]["tokens_per_s"] > 0
    # reused selections do not dilute the logged recall: the pattern selects in layer 1 of 3 and
    # reuses it in 2 and 3, with recall of the same order as per-layer (1/3 of it if averaged with 0s)
    r_pl, r_pattern = res["warmup"]["per_layer"]["recall_start"], res["warmup"]["pattern"]["recall_start"]
    assert r_pattern > 0.85 * r_pl
    # the committed summary holds results, not per-step series (those are in the run's results.json)
    assert "lm_loss" not in res["phases"]["pretrain"] and "kl" not in res["warmup"]["per_layer"]
    full = json.loads((out / "results.json").read_text())
    # the control and arm A saw the same data: same first-step LM loss of two copies of one model
    a, b = full["phases"]["sparse_per_layer"]["lm_loss"], full["phases"]["dense_control"]["lm_loss"]
    assert a and b and a[0][1] == pytest.approx(b[0][1], rel=0.05)
    # resumable: a second call skips finished phases (this one with --jobs 2: each task in a
    # process of its own, where the first call, at the default --jobs 1, ran them in its own; on
    # two cores one process is the faster: 190 s against 230, half the CPU time)
    # the held-out formats diagnostic (run only when named) beside it: every family of formats scored
    again = subprocess.run([*cmd, "--jobs", "2", "--stage", "sparse,formats"], capture_output=True, text=True,
                           timeout=240, cwd=REPO)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 1 + len(ARMS)
    formats = json.loads((rep / "formats_smoke.json").read_text())
    assert len(formats["families"]) == 12 and formats["lengths"] == [256]
    assert "| only wording |" in (rep / "formats_smoke.md").read_text()


def test_step128k_reads_megatrons_step_time_and_peak_memory():
    from experiments.verify.measurements import step128k_from_log

    log = (" [2026-11-29] iteration        1/       1 | consumed samples:           16 | "
           "elapsed time per iteration (ms): 80000.0 | learning rate: 1.000000E-03 |\n"
           "[Rank 0] (after 1 iterations) memory (MB) | allocated: 900.5 | max allocated: 11264.0 | reserved: 12000.0\n")
    out = step128k_from_log(log)
    assert out["step_seconds"] == pytest.approx(80.0)
    assert out["tokens_per_s"] == pytest.approx(16 * 131072 / 80.0)
    assert out["extrapolated_1000_steps_hours"] == pytest.approx(80000 / 3600)
    assert out["peak_gb"] == pytest.approx(11.0)
    assert step128k_from_log("no iteration finished") == {}


def test_step128k_overrides_are_valid_config():
    # the overrides stage_step128k adds to the report's recipe and to the one-step pretrain
    cfg = load_config(REPO / "configs" / "recipes" / "report_warmup.yaml",
                      ["train.iters=2", "eval.iters=0", "checkpoint.interval=2", "logging.interval=1"])
    assert (cfg.train["iters"], cfg.train["global_batch_size"], cfg.data["seq_length"]) == (2, 16, 131072)
    cfg = load_config(REPO / "configs" / "recipes" / "h200_pretrain.yaml",
                      ["train.iters=1", "train.lr_warmup_iters=0", "eval.iters=0", "checkpoint.interval=1"])
    assert cfg.train["iters"] == 1


def test_warmup_targets_take_recall_as_a_share_of_the_arms_own_oracle():
    """KL drop >= 5x and recall >= 90% of the oracle: 0.73 of an oracle of 0.80 meets it (91%),
    0.70 does not (87.5%); a drop under 5x misses whatever the recall; no recall stage: unknown."""
    from types import SimpleNamespace

    from experiments.verify.report import Report, warmup_targets

    def cell(got, oracle):
        return {"16": {"2": {"mean_nontrivial": got, "oracle_mean_nontrivial": oracle}}}

    res = {"warmup": {"a": {"kl_drop": 6.0}, "b": {"kl_drop": 6.0}, "c": {"kl_drop": 4.9}, "d": {"kl_drop": 9.0}},
           "recall": {"a": cell(0.73, 0.80), "b": cell(0.70, 0.80), "c": cell(0.80, 0.80)}}
    report = Report(SimpleNamespace(s={"train_length": 16, "topk": 2}), res, {})
    got = {arm: warmup_targets(report, arm) for arm in "abcd"}
    assert got["a"]["recall_share_of_oracle"] == pytest.approx(0.9125) and got["a"]["ok"] is True
    assert got["b"]["ok"] is False and got["c"]["ok"] is False
    assert got["d"]["ok"] is None and got["d"]["recall_share_of_oracle"] is None


def test_recipe128k_runs_in_pieces_and_reports_its_curves(monkeypatch, tmp_path):
    """Each call trains one piece of the report's 1 x 128K recipe from the phase's own checkpoint:
    the warm-up from this run's pretraining until it saves its 1000 steps, then the sparse phase
    from the warm-up. A piece that saves nothing is an error. The report tabulates and plots the
    KL and recall logged so far."""
    from argparse import Namespace

    from torch.utils.tensorboard import SummaryWriter

    from experiments.verify import stages
    from experiments.verify.collect import collect
    from experiments.verify.study import Study

    e = Study(Namespace(scale="h200", out=str(tmp_path / "run"), report_dir=str(tmp_path / "rep"), force=False))
    (e.phase_dir("pretrain")).mkdir(parents=True)
    (e.phase_dir("pretrain") / "DONE").write_text("{}\n")
    saves = iter([400, 1000, 600, 600])
    calls = []

    def piece(cmd, log, name):  # the trainer: logs every step it runs, saves where it stops
        ckpt = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("checkpoint.save=")))
        start = stages.checkpoint_iteration(ckpt)
        stop = next(saves)
        calls.append((name, start, next(a.split("=", 1)[1] for a in cmd if a.startswith("checkpoint.load_from="))))
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "latest_checkpointed_iteration.txt").write_text(f"{stop}\n")
        tb = SummaryWriter(next(a.split("=", 1)[1] for a in cmd if a.startswith("logging.tensorboard_dir=")))
        for i in range(start + 1, stop + 1):
            tb.add_scalar("indexer kl", 4.0 / (1 + i / 100), i)
            if name.endswith("warmup"):
                tb.add_scalar("indexer topk-recall", 0.9 - 0.6 / (1 + i / 100), i)
        tb.close()
        return 1.0

    monkeypatch.setattr(stages.runner, "run_phase", piece)
    stages.stage_recipe128k(e)
    assert not e.done("recipe128k_warmup")
    stages.stage_recipe128k(e)
    assert e.done("recipe128k_warmup") and not e.phase_dir("recipe128k_sparse").exists()
    stages.stage_recipe128k(e)
    assert [(n, s) for n, s, _ in calls] == [("recipe128k_warmup", 0), ("recipe128k_warmup", 400),
                                             ("recipe128k_sparse", 0)]
    assert calls[0][2] == str(e.phase_dir("pretrain") / "ckpt")
    assert calls[2][2] == str(e.phase_dir("recipe128k_warmup") / "ckpt")
    with pytest.raises(SystemExit, match="saved no step past 600"):
        stages.stage_recipe128k(e)
    cmd = json.loads((e.phase_dir("recipe128k_sparse") / "command.json").read_text())
    assert "report_sparse_b1.yaml" in cmd and f"data.dir={e.text_data}" in cmd

    r = collect(e)["recipe128k"]
    w, s = r["recipe128k_warmup"], r["recipe128k_sparse"]
    assert (w["saved_step"], w["steps"], s["saved_step"]) == (1000, 1000, 600)
    assert [i for i, _ in w["kl"]] == list(range(1, 1001))  # both pieces' steps, once each
    assert w["kl_drop"] > 5 and w["recall_end"] > w["recall_start"] and s["recall"] == []


def test_warmup_length_section_gives_each_warmup_its_verdicts():
    """Per-layer indexers after warm-ups of 16 / 64 steps against the dense control: the loss
    (within 1%), the warm-up targets and the training-format points for each, and the shortest
    warm-up that meets the loss and warm-up targets; the steps are the ones the warm-up logged."""
    from types import SimpleNamespace

    from experiments.verify.report import Report, _conclusions, _warmup_length

    def ev(loss, exact):
        by_len = {"16": {"exact": exact, "token": 90.0}}
        return {"mode": "sparse", "loss": {"16": loss}, "retrieval": {"by_length": by_len},
                "retrieval_train_formats": {"by_length": by_len}}

    def recall(got):
        return {"16": {"2": {"mean_nontrivial": got, "oracle_mean_nontrivial": 0.8}}}

    res = {"arms": ["per_layer", "warmup_x4"],
           "eval": {"B: dense control": ev(2.0, 80.0), "A: DSA per-layer": ev(2.1, 20.0),
                    "A with a 4x warm-up": ev(2.01, 90.0)},
           "warmup": {"per_layer": {"steps": 16, "kl_drop": 2.5}, "warmup_x4": {"steps": 64, "kl_drop": 9.0}},
           "recall": {"per_layer": recall(0.7), "warmup_x4": recall(0.77)}}
    e = SimpleNamespace(s={"train_length": 16, "topk": 2, "retrieval_lengths": [16]}, warmup_iters=1, scale="unit")
    report = Report(e, res, {})
    _warmup_length(report)
    _conclusions(report)
    wl = report.verdict["warmup_length"]
    assert (wl["per_layer"]["warmup_steps"], wl["warmup_x4"]["warmup_steps"]) == (16, 64)
    assert (wl["per_layer"]["loss"], wl["per_layer"]["warmup"]) == (False, False)
    assert (wl["warmup_x4"]["loss"], wl["warmup_x4"]["warmup"]) == (True, True)
    assert wl["per_layer"]["retrieval_train_formats_points"] == {"16": -60.0}
    md = "\n".join(report.lines)
    assert "The shortest warm-up here that meets the loss and warm-up targets: 64 steps" in md
    assert "A with a 4x warm-up (64 warm-up steps): loss within 1% **yes**, warm-up targets **yes**" in md


def test_formats_diagnostic_names_the_difference_that_breaks_retrieval():
    """Hand-made results: the training formats at 80%, the held-out ones at 0%; the wording alone
    costs everything and putting it back alone restores 60 points."""
    from experiments.verify.report import formats_effects, formats_lines
    from experiments.verify.suites import HELDOUT_FACTORS
    from megatron_dsa.data.tasks import TASKS

    def scored(exact):
        return {"by_task_length": {t: {"512": {"exact": exact}} for t in TASKS},
                "by_length": {"512": {"exact": exact, "token": 50.0, "nll": 1.0}}}

    only = {"wording": 0.0, "keys": 84.0, "density": 78.0, "values per key": 70.0, "hops": 80.0}
    put_back = {"wording": 60.0, "keys": 2.0, "density": 0.0, "values per key": 0.0, "hops": 0.0}
    families = {"training formats": scored(80.0), **{f"only {k}": scored(v) for k, v in only.items()},
                **{f"all but {k}": scored(v) for k, v in put_back.items()}, "held-out formats": scored(0.0)}
    assert set(only) == set(HELDOUT_FACTORS)
    formats = {"training_family": "train_wide", "lengths": [512], "items_per_task_and_length": 10,
               "families": families}
    effects = formats_effects(formats)
    assert effects["only"] == {"wording": -80.0, "keys": 4.0, "density": -2.0, "values per key": -10.0, "hops": 0.0}
    assert effects["put_back"] == put_back
    md = "\n".join(formats_lines("unit", formats))
    assert "| only wording | 0 | 0 | 0 | 0 | 0 | 0 (50) | 1.000 |" in md
    assert "costs (points against the training formats): wording -80, keys +4" in md
    assert "each gives back: wording +60, keys +2" in md


def test_a_pretraining_only_report_leaves_the_arms_sections_out():
    """A pretraining stage of a chain has no arms: their sections are left out rather than filled
    with n/a; once one arm has a warm-up, they are written."""
    from types import SimpleNamespace

    from experiments.verify.report import Report, _objectives, _sharing, _trainer_validation, _warmup, _warmup_length
    from experiments.verify.settings import ARMS as ALL_ARMS

    e = SimpleNamespace(s={"train_length": 16, "topk": 2, "retrieval_lengths": [16]}, scale="unit", arms=list(ALL_ARMS))
    res = {"arms": list(ALL_ARMS), "phases": {"pretrain": {"val_loss": 2.0}}, "warmup": {}, "eval": {}, "recall": {}}
    report = Report(e, res, {})
    assert report.ran_arms == []
    for section in (_trainer_validation, _warmup, _sharing, _warmup_length, _objectives):
        section(report)
    assert report.lines == []
    res["phases"]["sparse_shared"] = {"val_loss": 2.1}
    assert Report(e, res, {}).ran_arms == ["shared"]
