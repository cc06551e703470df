"""The study's measurements: evaluation of trained models, speed and the report's 128K step.

    eval       held-out loss at several lengths (natural text) and the held-out retrieval items
               (suites.heldout: the training mixture's tasks in formats it never shows), per model;
               beside them, fewer items of the same tasks in the training formats
    formats    the pretrained model on the formats between the training family and the held-out
               one (each held-out difference alone, and all but one): which it does not carry over
    recall     after warm-up: top-k recall of the dense attention mass at several lengths and
               k/S, every arm (and the untrained indexer), with the oracle
    speed      training-step cost of every arm side by side (benchmarks/bench_model_step.py;
               GPU only)
    bench128k  one measured 131072-token micro-batch of the report's warm-up (GPU only)
    step128k   real trainer steps of the report's warm-up recipe (16 x 131072 tokens; GPU only)

Each writes its result as JSON under the run directory; the report reads them from there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import torch

from experiments.verify.settings import ARMS, BENCH128K_ARGS, RECIPES, REPO
from experiments.verify.stages import need, phase_cmd, run_phase
from experiments.verify.study import Study, echo, portable_command
from experiments.verify.suites import (
    build_heldout_suite,
    build_task_suite,
    factor_families,
    indexer_recall_at_lengths,
    model_predictor,
    read_valid_tokens,
    score_items,
    validation_loss_at_lengths,
)
from megatron_dsa.convert.checkpoint import load_model
from megatron_dsa.data import load_manifest, load_tokenizer, read_split_tokens
from megatron_dsa.train import runner


def eval_arms(e: Study) -> dict[str, tuple[str, str]]:
    """Models evaluated: label -> (phase directory, attention mode)."""
    arms = {"pretrain (dense)": ("pretrain", "dense"), "B: dense control": ("dense_control", "dense")}
    for arm in e.arms:
        arms[ARMS[arm][0]] = (f"sparse_{arm}", "sparse")
    return arms


def _load_for_eval(e: Study, phase: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(e.phase_dir(phase) / "ckpt")
    model = model.to(device).eval()
    if device == "cuda" and model.config.bf16:
        model = model.to(torch.bfloat16)
    return model


def _retrieval_text(e: Study):
    """The tokenizer and the held-out split as the retrieval items' natural text (document ends
    written as newlines, as in the mixture)."""
    tokenizer = load_tokenizer(e.text_data)
    eod, newline = load_manifest(e.text_data)["eod"], tokenizer.tokenize("\n")
    filler = [t for tok in read_split_tokens(e.text_data, "valid").tolist() for t in (newline if tok == eod else [tok])]
    return tokenizer, filler


def _eval_suite(e: Study):
    """The held-out natural text (for the loss), the held-out-format retrieval items and the
    training-format ones, whose text is cut from the same held-out split."""
    s = e.s
    tokenizer, filler = _retrieval_text(e)
    valid = read_valid_tokens(e.text_data)
    items = build_heldout_suite(tokenizer, filler, s["retrieval_lengths"], s["retrieval_n"], s["train_length"],
                                seed=s["tasks"]["seed"])
    train_items = build_task_suite(tokenizer, filler, s["retrieval_lengths"], s["retrieval_train_n"],
                                   s["train_length"], e.training_family,
                                   seed=s["tasks"]["seed"])
    return valid, items, train_items


def _exact_by_length(retr: dict) -> str:
    return " ".join(f"{k}:{v['exact']:.0f}%" for k, v in retr["by_length"].items())


def eval_phase(task: str) -> str:
    """The phase directory a task of the eval stage evaluates."""
    return task if task in ("pretrain", "dense_control") else f"sparse_{task}"


def stage_eval(e: Study, task: str) -> None:
    """Validation loss at several lengths and the retrieval suite of one trained model."""
    phase = eval_phase(task)
    mode = "dense" if task in ("pretrain", "dense_control") else "sparse"
    label = {v[0]: k for k, v in eval_arms(e).items()}.get(phase, phase)
    if not e.pending(f"eval/{phase}.json", f"[eval] {label}:"):
        return
    need(e, phase)
    s = e.s
    t0 = time.perf_counter()
    valid, items, train_items = _eval_suite(e)
    model = _load_for_eval(e, phase)
    loss = validation_loss_at_lengths(model, valid, s["loss_lengths"], mode, max_total=s["loss_max_total"])
    predict = model_predictor(model, mode)
    retr = score_items(items, predict)
    # the training formats: does the model retrieve at all, whatever it makes of new formats
    in_dist = score_items(train_items, predict)
    keep = ("by_task_length", "by_length")
    result = {"arm": label, "phase": phase, "mode": mode, "loss": loss,
              "retrieval": {k: retr[k] for k in keep},
              "retrieval_train_formats": {k: in_dist[k] for k in keep},
              "seconds": time.perf_counter() - t0}
    e.save_json(f"eval/{phase}.json", result)
    print(f"[eval] {label} ({mode}): loss {' '.join(f'{k}:{v:.4f}' for k, v in loss.items())} | retrieval exact, "
          f"held-out formats {_exact_by_length(retr)} | answer NLL "
          f"{' '.join(f'{k}:{v['nll']:.3f}' for k, v in retr['by_length'].items() if v['nll'] is not None)} | "
          f"training formats {_exact_by_length(in_dist)} ({result['seconds']:.0f} s)",
          flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_formats(e: Study) -> None:
    """Which of the held-out formats' differences the pretrained model does not carry over: its
    retrieval at the lengths it trained on, in the formats between the training family and the
    held-out one (suites.factor_families: one difference at a time, and all but one)."""
    if not e.pending("eval/formats_pretrain.json", "[formats]"):
        return
    need(e, "pretrain")
    s = e.s
    t0 = time.perf_counter()
    lengths = [n for n in s["retrieval_lengths"] if n <= s["train_length"]]
    tokenizer, filler = _retrieval_text(e)
    predict = model_predictor(_load_for_eval(e, "pretrain"), "dense")
    keep = ("by_task_length", "by_length")
    families = {}
    for label, family in factor_families(e.training_family).items():
        items = build_task_suite(tokenizer, filler, lengths, s["retrieval_n"], s["train_length"], family,
                                 seed=s["tasks"]["seed"])
        families[label] = {k: v for k, v in score_items(items, predict).items() if k in keep}
    result = {"phase": "pretrain", "training_family": e.training_family.name, "lengths": lengths,
              "items_per_task_and_length": s["retrieval_n"], "families": families,
              "seconds": time.perf_counter() - t0}
    e.save_json("eval/formats_pretrain.json", result)
    print("[formats] exact match %, training formats -> held-out formats: " + " | ".join(
        f"{label}: {sum(r['by_length'][n]['exact'] for n in lengths) / len(lengths):.0f}"
        for label, r in families.items()) + f" ({result['seconds']:.0f} s)", flush=True)


def stage_recall(e: Study, task: str) -> None:
    """Top-k recall of the dense attention mass after warm-up (``pretrain``: the untrained
    indexer) at several context lengths and k/S ratios, on the held-out split."""
    phase = "pretrain" if task == "pretrain" else f"warmup_{task}"
    if not e.pending(f"eval/recall_{task}.json", f"[recall] {task}:"):
        return
    need(e, phase)
    s = e.s
    t0 = time.perf_counter()
    model = _load_for_eval(e, phase)
    res = indexer_recall_at_lengths(model, read_valid_tokens(e.text_data), s["recall_lengths"],
                                    topk_ratios=s["recall_ratios"], max_total=s["recall_max_total"])
    keep = ("k_over_L", "mean", "mean_nontrivial", "per_layer",
            "oracle_mean", "oracle_mean_nontrivial", "oracle_per_layer")  # oracle: the best any top-k can do
    table = {str(L): {str(k): {name: v.get(name) for name in keep} for k, v in by_k.items()}
             for L, by_k in res.items()}
    e.save_json(f"eval/recall_{task}.json",
                {"task": task, "phase": phase, "recall": table, "seconds": time.perf_counter() - t0})
    print(f"[recall] {task}: " + " | ".join(
        f"L={L} " + " ".join(f"k/L={v['k_over_L']:.3f}:{v['mean_nontrivial'] if v['mean_nontrivial'] is not None else v['mean']:.3f}"
                             for v in by_k.values()) for L, by_k in res.items()), flush=True)


def stage_speed(e: Study) -> None:
    """Every arm's training-step cost, solo and side by side in one process (GPU only)."""
    if not e.pending("speed.json", "[speed]"):
        return
    if e.s["speed_args"] is None or not torch.cuda.is_available():
        print("[speed] needs a GPU and --scale h200, skipped")
        return
    layout = {"per_layer": "", "shared": "_shared", "freq2": "_freq2", "freq4": "_freq4"}
    arms = ["pretrain"]
    for arm in e.arms:
        if arm not in layout and not arm.startswith("obj_"):
            print(f"[speed] benchmarks/bench_model_step.py has no arm {arm!r}: not measured")
            continue
        suffix = layout.get(arm, "_" + arm[len("obj_"):] if arm.startswith("obj_") else "")
        arms += [f"warmup{suffix}"] + ([f"sparse{suffix}"] if arm in layout else [])
    if e.speed_arms:
        arms = e.speed_arms
    d = e.out / "speed"
    d.mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_model_step.py"), *e.s["speed_args"],
           "--arms", ",".join(arms), "--out", str(d)]
    print(f"\n=== speed: {echo(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    (d / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"[speed] failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
        return
    rows = json.loads(next(d.glob("model_step_*.json")).read_text())
    rows["command"] = portable_command(echo(cmd).replace(str(e.out), "$RUN"))
    e.save_json("speed.json", rows)
    print(proc.stdout[-2500:], flush=True)


def bench128k_from(rows: dict, command: str) -> dict:
    """The report's warm-up step (16 sequences of 131072 tokens, micro-batch 1: 16 micro-batches
    accumulated, so peak memory is one micro-batch's) from one measured micro-batch."""
    by_arm = {r["arm"]: r for r in rows["rows"] if "ms" in r}
    out = {"command": command, "micro_batch": {k: {"ms": v["ms"], "peak_gb": v["peak_gb"]} for k, v in by_arm.items()}}
    if "warmup" in by_arm:
        step_s = 16 * by_arm["warmup"]["ms"] / 1e3
        out.update(step_seconds=step_s, tokens_per_s=16 * 131072 / step_s,
                   extrapolated_1000_steps_hours=1000 * step_s / 3600, peak_gb=by_arm["warmup"]["peak_gb"])
    return out


def stage_bench128k(e: Study) -> None:
    """The report's warm-up batch (16 x 131072 tokens) on the small MoE: one micro-batch of
    131072 tokens measured (warm-up and sparse step), the 16-sequence step and 1000 steps
    extrapolated. (The whole step through the trainer is ~20 minutes on one H200.)"""
    if not e.s["bench"] or not torch.cuda.is_available():
        print("[bench128k] needs a GPU and --scale h200, skipped")
        return
    if not e.pending("bench128k.json", "[bench128k]"):
        return
    d = e.out / "bench128k"
    d.mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_model_step.py"), *BENCH128K_ARGS, "--out", str(d)]
    print(f"\n=== bench128k: {echo(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    (d / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        e.save_json("bench128k.json", {"error": proc.stderr[-2000:]})
        return
    result = bench128k_from(json.loads(next(d.glob("model_step_*.json")).read_text()),
                            portable_command(echo(cmd).replace(str(e.out), "$RUN")))
    e.save_json("bench128k.json", result)
    print(f"[bench128k] {result}")


def step128k_from_log(log: str) -> dict:
    """Megatron's own numbers for the step from a trainer log: its iteration time (from the
    step's start to its end, optimizer included) and the peak memory it reports after it."""
    it = re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", log)
    mem = re.findall(r"max allocated: ([\d.]+)", log)
    out = {}
    if it:
        step_s = float(it[-1]) / 1e3
        out.update(step_seconds=step_s, tokens_per_s=16 * 131072 / step_s,
                   extrapolated_1000_steps_hours=1000 * step_s / 3600)
    if mem:
        out["peak_gb"] = float(mem[0]) / 1024
    return out


def stage_step128k(e: Study) -> None:
    """A step of the report's warm-up recipe, exactly (16 sequences of 131072 tokens, micro-batch
    1, lr 1e-3, indexers only), through the trainer, from this run's pretrain checkpoint (or, when
    the run has none, from a one-step pretrain: ``--stage corpus,step128k`` runs on its own)."""
    if not e.s["bench"] or not torch.cuda.is_available():
        print("[step128k] needs a GPU and --scale h200, skipped")
        return
    if not e.pending("step128k.json", "[step128k]"):
        return
    name = "step128k"
    try:
        start = "pretrain"
        if not (e.phase_dir("pretrain") / "DONE").is_file():
            # The step's cost does not depend on the weights: without this run's pretraining, a
            # one-step pretrain gives the warm-up the checkpoint it must start from.
            start = "step128k_pretrain"
            run_phase(e, start, phase_cmd(e, start, "h200_pretrain.yaml", "pretrain",
                                            ["train.iters=1", "train.lr_warmup_iters=0", "eval.iters=0",
                                             "checkpoint.interval=1"]))
        # Two steps, logged one by one: the second is the measurement (the first compiles Triton).
        extra = [f"checkpoint.load_from={e.phase_dir(start) / 'ckpt'}", "train.iters=2", "eval.iters=0",
                 "checkpoint.interval=2", "logging.interval=1"]
        cmd = runner.phase_command(RECIPES / "report_warmup.yaml", [
            f"data.dir={e.text_data}", f"checkpoint.save={e.phase_dir(name) / 'ckpt'}",
            f"logging.tensorboard_dir={e.phase_dir(name) / 'tb'}", *extra])
        run_phase(e, name, cmd)
    except SystemExit as err:
        e.save_json("step128k.json", {"error": str(err)[-2000:]})
        return
    log = (e.phase_dir(name) / "train.log").read_text()
    result = {"command": portable_command(echo(cmd)), **step128k_from_log(log)}
    e.save_json("step128k.json", result)
    print(f"[step128k] {result}")

