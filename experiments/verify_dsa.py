"""Issues 7 and 10: verify DSA on the small MoE. One command runs (or resumes) the experiment:

    python experiments/verify_dsa.py --scale h200 --jobs 4   # one H200, ~25 GPU-minutes
    python experiments/verify_dsa.py --scale smoke           # CPU, tiny model, a few minutes

Stages (``--stage NAME`` runs one; ``all``, the default, runs every stage not yet done; a
stage whose outputs exist is skipped, ``--force`` reruns it):

    corpus     this interpreter's standard library + site-packages -> tokenizer -> indexed
               train / held-out valid splits
    speed      training-step cost of every arm, side by side in one process on one GPU
               (benchmarks/bench_model_step.py; h200 only)
    pretrain   the MoE dense at long context (configs/recipes/h200_pretrain.yaml)
    warmup     every arm's indexer warm-up (indexers only, dense attention, from pretrain)
    sparse     every arm's sparse training (from its warm-up), and arm B: the same tokens of
               continued dense training (same lr, seed, data order)
    eval       every trained model: validation loss at several lengths, the retrieval suite
               (arm B and arm A first, at most --eval-jobs at once)
    recall     after warm-up: top-k recall of the dense attention mass at several context
               lengths and k/S ratios, every arm (and the untrained indexer)
    report     <report-dir>/verification.md + PNGs + verification.json
    bench128k  one measured micro-batch (1 x 128K) of the report's warm-up on the small MoE,
               warm-up and sparse (h200 only; extrapolates the 16 x 128K step and 1000 steps)
    step128k   real trainer steps of the report's warm-up recipe (configs/recipes/
               report_warmup.yaml: 16 x 131072 tokens) from the pretrain checkpoint; the second
               of two steps is the measurement (h200 only)

Arms (``ARMS``; ``--arms a,b`` restricts): per_layer (arm A, the report), shared (one indexer
for all layers), freq2 / freq4 (one selection every 2 / 4 layers, reused between), and the
warm-up objectives of issue 10, obj_reverse_kl / obj_mse / obj_listwise (per-layer indexers;
only the warm-up loss differs, the sparse phase is arm A's). ``--jobs N`` runs up to N arms of
a stage at once (independent processes on the same GPU; speed comes from the speed stage).

Every training phase is ``python -m megatron_dsa.train.cli --config <recipe> key=value ...``
(printed before it runs, recorded in the report). All arms start from the same pretrain
checkpoint with the same seed, so they read the same data in the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPES = REPO / "configs" / "recipes"

# Arms after the common dense pretraining: name -> (label, indexer layout overrides (every
# phase of the arm), warm-up-only overrides). Layout overrides change which parameters exist;
# the objective changes only the warm-up loss.
ARMS = {
    "per_layer": ("A: DSA per-layer", {}, {}),
    "shared": ("shared indexer", {"mdsa_indexer_sharing": "shared"}, {}),
    "freq2": ("selection every 2 layers", {"dsa_indexer_topk_freq": 2}, {}),
    "freq4": ("selection every 4 layers", {"dsa_indexer_topk_freq": 4}, {}),
    "obj_reverse_kl": ("warm-up objective: reverse KL", {}, {"mdsa_indexer_objective": "reverse_kl"}),
    "obj_mse": ("warm-up objective: MSE", {}, {"mdsa_indexer_objective": "mse"}),
    "obj_listwise": ("warm-up objective: listwise top-k", {}, {"mdsa_indexer_objective": "listwise"}),
}
SHARING_ARMS = ("per_layer", "shared", "freq2", "freq4")
OBJECTIVE_ARMS = {"per_layer": "kl", "obj_reverse_kl": "reverse_kl", "obj_mse": "mse", "obj_listwise": "listwise"}
# eval before recall: if a sitting's GPU time runs out, the comparison with the control is what matters most
STAGES = ("corpus", "speed", "pretrain", "warmup", "sparse", "eval", "recall", "bench128k", "step128k", "report")
ARM_STAGES = ("warmup", "sparse", "recall", "eval")  # run per arm, up to --jobs at once

SCALES = {
    "h200": dict(
        vocab_size=8192, max_bytes=48 * 1024 * 1024, valid_fraction=0.05, overrides={},
        loss_lengths=(4096, 8192, 16384, 32768), loss_max_total=65536,
        retrieval_lengths=(4096, 8192, 16384, 32768), retrieval_n=6, num_keys=4,
        recall_lengths=(4096, 16384), recall_ratios=(1 / 64, 1 / 32, 1 / 16), recall_max_total=32768,
        train_length=16384, topk=512, bench=True, speed_args=["--seq", "16384", "--topk", "512"],
    ),
    "smoke": dict(
        vocab_size=512, max_bytes=800_000, valid_fraction=0.05,
        overrides={
            "all": ["model.size=tiny", "data.seq_length=128", "model.overrides.dsa_indexer_topk=16",
                    "megatron.bf16=false", "train.micro_batch_size=4", "train.global_batch_size=4",
                    "eval.iters=1", "logging.interval=2"],
            "pretrain": ["train.iters=16", "train.lr_warmup_iters=2", "train.lr=3e-3", "train.min_lr=3e-4",
                         "eval.interval=16", "checkpoint.interval=16"],
            "warmup": ["train.iters=4", "eval.interval=4", "checkpoint.interval=4"],
            "sparse": ["train.iters=4", "eval.interval=4", "checkpoint.interval=4",
                       "train.lr=3e-4", "train.min_lr=3e-4"],
            "dense_control": ["train.iters=4", "eval.interval=4", "checkpoint.interval=4",
                              "train.lr=3e-4", "train.min_lr=3e-4"],
        },
        loss_lengths=(64, 128, 256), loss_max_total=1024,
        retrieval_lengths=(128, 256), retrieval_n=2, num_keys=2,
        recall_lengths=(64, 128), recall_ratios=(1 / 8, 1 / 4), recall_max_total=256,
        train_length=128, topk=16, bench=False, speed_args=None,
    ),
}
TARGETS = {"loss_rel": 0.01, "retrieval_points": 2.0, "kl_drop": 5.0, "recall": 0.90}


# --------------------------------------------------------------------------------------------
# Paths and small helpers


class Exp:
    def __init__(self, args):
        self.scale = args.scale
        self.s = SCALES[args.scale]
        self.out = Path(args.out or REPO / "runs" / "verify" / args.scale).absolute()
        self.report_dir = Path(args.report_dir or REPO / "reports").absolute()
        self.force = args.force
        self.python = sys.executable
        self.data = self.out / "data"
        self.arms = list(args.arms.split(",")) if getattr(args, "arms", None) else list(ARMS)
        self.speed_arms = args.speed_arms.split(",") if getattr(args, "speed_arms", None) else None
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise SystemExit(f"error: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")

    def commands(self) -> dict[str, str]:
        """Every phase's exact command (one file per phase: arms may run concurrently), written
        the way a user re-runs it: ``python``, recipes relative to the repository, the run
        directory as ``$RUN`` (the machine's own paths stay out of the report)."""
        out = {}
        for f in sorted(self.out.glob("*/command.json")):
            out[f.parent.name] = portable_command(json.loads(f.read_text()))
        return out

    def _load_json(self, name, default):
        p = self.out / name
        return json.loads(p.read_text()) if p.is_file() else default

    def save_json(self, name, obj):
        """Write <out>/<name> (may hold a sub-directory) atomically: temp file + rename."""
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def pending(self, name: str, tag: str) -> bool:
        """Whether the result <out>/<name> is still to be made (says so when it is skipped)."""
        if (self.out / name).is_file() and not self.force:
            print(f"{tag} done, skipped")
            return False
        return True

    def phase_dir(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> bool:
        return (self.phase_dir(name) / "DONE").is_file() and not self.force


def portable_command(cmd: str) -> str:
    """An echoed command without the paths of the machine it ran on (see Exp.commands)."""
    run = re.search(r"data\.dir=(\S+)/data(?:\s|$)", cmd)
    if run:
        cmd = cmd.replace(run.group(1) + "/", "$RUN/")
    cmd = re.sub(r"^\S*python\S*(?=\s)", "python", cmd)
    return re.sub(r"\S*/(configs|benchmarks|experiments)/", r"\1/", cmd)


def _echo(cmd: list[str]) -> str:
    return " ".join(str(c) if re.fullmatch(r"[\w./=:,+@-]+", str(c)) else repr(str(c)) for c in cmd)


def _link_copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint directory: files under iter_* are hard-linked (never rewritten), the
    small top-level files (tracker, run record) are real copies (Megatron rewrites the tracker)."""
    def copy(s, d):
        if "/iter_" in s:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=copy)


# --------------------------------------------------------------------------------------------
# Stages


def stage_corpus(e: Exp) -> None:
    from megatron_dsa.data import DataError, build_corpus, load_manifest

    try:
        if not e.force:
            load_manifest(e.data)
            print(f"corpus: reusing {e.data}")
            return
    except DataError:
        pass
    src = e.out / "corpus_source"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    budget = e.s["max_bytes"]
    print(f"corpus: gathering up to {budget:,} bytes of .py/.txt/.rst from {stdlib} and {site}", flush=True)
    shutil.rmtree(src, ignore_errors=True)
    n_bytes = 0
    # Half the budget from each (stdlib first), linked into one source tree.
    for tag, root, cap in (("stdlib", stdlib, budget // 2), ("site_packages", site, budget - budget // 2)):
        got = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in {"site-packages", "dist-packages", "__pycache__"}
                                 and not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith((".py", ".txt", ".rst")):
                    continue
                p = Path(dirpath, name)
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                if size == 0 or size > 1_000_000 or got + size > cap:
                    continue
                dst = src / tag / p.relative_to(root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(p, dst)
                except OSError:
                    shutil.copyfile(p, dst)
                got += size
        n_bytes += got
        print(f"corpus:   {tag}: {got:,} bytes", flush=True)
    t0 = time.perf_counter()
    manifest = build_corpus(e.data, src, e.s["vocab_size"], max_bytes=n_bytes + 1,
                            valid_fraction=e.s["valid_fraction"], overwrite=True)
    shutil.rmtree(src, ignore_errors=True)
    print(f"corpus: {manifest['splits']['train']['tokens']:,} train / {manifest['splits']['valid']['tokens']:,} "
          f"held-out tokens, vocab {manifest['vocab_size']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    e.save_json("corpus_info.json", {"stdlib": str(stdlib), "site_packages": str(site), **manifest})


def _phase_cmd(e: Exp, name: str, recipe: str, kind: str, extra: list[str]) -> list[str]:
    d = e.phase_dir(name)
    overrides = [f"data.dir={e.data}", f"checkpoint.save={d / 'ckpt'}", f"logging.tensorboard_dir={d / 'tb'}"]
    overrides += e.s["overrides"].get("all", []) + e.s["overrides"].get(kind, []) + extra
    return [e.python, "-m", "megatron_dsa.train.cli", "--config", str(RECIPES / recipe), *overrides]


def _run_phase(e: Exp, name: str, cmd: list[str], prepare=None) -> None:
    d = e.phase_dir(name)
    if e.done(name):
        print(f"[{name}] done, skipped ({d})")
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if prepare is not None:
        prepare()
    (d / "command.json").write_text(json.dumps(_echo(cmd)) + "\n")
    print(f"\n=== {name}: {_echo(cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = d / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        for line in proc.stdout:
            log.write(line)
            if "validation loss at" in line or line.startswith("error:") or "] [" in line[:40]:
                print(line.rstrip()[:200], flush=True)
        code = proc.wait()
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"error: phase {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
    (d / "DONE").write_text(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
    print(f"[{name}] finished in {time.perf_counter() - start:.0f} s", flush=True)


def _overrides(fields: dict) -> list[str]:
    return [f"model.overrides.{k}={v}" for k, v in fields.items()]


def _layout(arm: str) -> dict:
    return ARMS[arm][1]


def _layout_name(arm: str) -> str:
    """Arms with the same indexer layout share the relabelled pretrain checkpoint."""
    return next(a for a in SHARING_ARMS if ARMS[a][1] == _layout(arm))


def stage_pretrain(e: Exp) -> None:
    _run_phase(e, "pretrain", _phase_cmd(e, "pretrain", "h200_pretrain.yaml", "pretrain", []))


def _relabelled_pretrain(e: Exp, arm: str) -> Path:
    """The pretrain checkpoint, labelled for a model with another indexer layout.

    Pretraining runs dense: the indexers get no gradient and keep their initialisation, so the
    non-indexer weights are all the arms share. Loading the per-layer checkpoint into a shared /
    every-N-layers model reads a subset of its tensors (dist checkpointing ignores the unused
    indexer tensors); only the run record (phase + shape, checked by the trainer's preflight)
    must name the new layout."""
    base = e.phase_dir("pretrain") / "ckpt"
    variant = _layout_name(arm)
    if variant == "per_layer":
        return base
    dst = e.phase_dir(f"pretrain_{variant}") / "ckpt"
    marker = dst.parent / "DONE"
    if marker.is_file() and not e.force:
        return dst
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight, write_run_file

    shutil.rmtree(dst.parent, ignore_errors=True)
    cmd = _phase_cmd(e, f"pretrain_{variant}", "h200_pretrain.yaml", "pretrain", _overrides(_layout(arm)))
    cfg = load_config(cmd[4], cmd[5:])
    plan = preflight(cfg, check_flags=False)  # dst does not exist yet
    _link_copy(base, dst)
    write_run_file(plan)
    marker.write_text("relabelled copy of pretrain/ckpt\n")
    print(f"[pretrain_{variant}] pretrain checkpoint relabelled for {_layout(arm)} -> {dst}")
    return dst


def _need(e: Exp, phase: str) -> None:
    if not (e.phase_dir(phase) / "DONE").is_file():
        raise SystemExit(f"error: {phase} has not finished (run its stage first): {e.phase_dir(phase)}")


def stage_warmup(e: Exp, arm: str) -> None:
    _need(e, "pretrain")
    src = _relabelled_pretrain(e, arm)
    warm = f"warmup_{arm}"
    extra = _overrides({**_layout(arm), **ARMS[arm][2]}) + [f"checkpoint.load_from={src}"]
    _run_phase(e, warm, _phase_cmd(e, warm, "h200_warmup.yaml", "warmup", extra))


def stage_sparse(e: Exp, arm: str) -> None:
    if arm == "dense_control":  # arm B
        _need(e, "pretrain")
        name = "dense_control"
        cmd = _phase_cmd(e, name, "h200_dense_control.yaml", "dense_control", [])
        _run_phase(e, name, cmd,
                   prepare=lambda: _link_copy(e.phase_dir("pretrain") / "ckpt", e.phase_dir(name) / "ckpt"))
        return
    warm = f"warmup_{arm}"
    _need(e, warm)
    sparse = f"sparse_{arm}"
    extra = _overrides(_layout(arm)) + [f"checkpoint.load_from={e.phase_dir(warm) / 'ckpt'}"]
    _run_phase(e, sparse, _phase_cmd(e, sparse, "h200_sparse.yaml", "sparse", extra))


def eval_arms(e: Exp) -> dict[str, tuple[str, str]]:
    """Models evaluated: label -> (phase directory, attention mode)."""
    arms = {"pretrain (dense)": ("pretrain", "dense"), "B: dense control": ("dense_control", "dense")}
    for arm in e.arms:
        arms[ARMS[arm][0]] = (f"sparse_{arm}", "sparse")
    return arms


def _load_for_eval(e: Exp, phase: str):
    import torch

    from megatron_dsa.convert.checkpoint import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(e.phase_dir(phase) / "ckpt")
    model = model.to(device).eval()
    if device == "cuda" and model.config.bf16:
        model = model.to(torch.bfloat16)
    return model


def _eval_suite(e: Exp):
    from megatron_dsa.data import load_manifest, load_tokenizer
    from megatron_dsa.eval import build_suite
    from megatron_dsa.eval.loss import read_valid_tokens

    s = e.s
    tokenizer = load_tokenizer(e.data)
    valid = read_valid_tokens(e.data)
    # Haystacks from the held-out documents (EOD-separated stream, decoded back to text).
    eod = load_manifest(e.data)["eod"]
    docs, cur = [], []
    for t in valid[: 4 * max(s["retrieval_lengths"]) + 1].tolist():
        if t == eod:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    texts = [tokenizer.detokenize(d) for d in docs if d] or None
    items = build_suite(tokenizer, s["retrieval_lengths"], s["retrieval_n"], texts=texts, num_keys=s["num_keys"])
    return valid, items


def eval_phase(task: str) -> str:
    """The phase directory a task of the eval stage evaluates."""
    return task if task in ("pretrain", "dense_control") else f"sparse_{task}"


def stage_eval(e: Exp, task: str) -> None:
    """Validation loss at several lengths and the retrieval suite of one trained model."""
    import torch

    from megatron_dsa.eval import model_predictor, score_items, validation_loss_at_lengths

    phase = eval_phase(task)
    mode = "dense" if task in ("pretrain", "dense_control") else "sparse"
    label = {v[0]: k for k, v in eval_arms(e).items()}.get(phase, phase)
    if not e.pending(f"eval/{phase}.json", f"[eval] {label}:"):
        return
    _need(e, phase)
    s = e.s
    t0 = time.perf_counter()
    valid, items = _eval_suite(e)
    model = _load_for_eval(e, phase)
    loss = validation_loss_at_lengths(model, valid, s["loss_lengths"], mode, max_total=s["loss_max_total"])
    retr = score_items(items, model_predictor(model, mode))
    result = {"arm": label, "phase": phase, "mode": mode, "loss": loss,
              "retrieval": {k: retr[k] for k in ("by_task_length", "by_length")},
              "seconds": time.perf_counter() - t0}
    e.save_json(f"eval/{phase}.json", result)
    print(f"[eval] {label} ({mode}): loss {' '.join(f'{k}:{v:.4f}' for k, v in loss.items())} | retrieval exact "
          f"{' '.join(f'{k}:{v['exact']:.0f}%' for k, v in retr['by_length'].items())} | answer NLL "
          f"{' '.join(f'{k}:{v['nll']:.3f}' for k, v in retr['by_length'].items() if v['nll'] is not None)} "
          f"({result['seconds']:.0f} s)",
          flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_recall(e: Exp, task: str) -> None:
    """Top-k recall of the dense attention mass after warm-up (``pretrain``: the untrained
    indexer) at several context lengths and k/S ratios, on the held-out split."""
    from megatron_dsa.eval import indexer_recall_at_lengths
    from megatron_dsa.eval.loss import read_valid_tokens

    phase = "pretrain" if task == "pretrain" else f"warmup_{task}"
    if not e.pending(f"eval/recall_{task}.json", f"[recall] {task}:"):
        return
    _need(e, phase)
    s = e.s
    t0 = time.perf_counter()
    model = _load_for_eval(e, phase)
    res = indexer_recall_at_lengths(model, read_valid_tokens(e.data), s["recall_lengths"],
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


def stage_speed(e: Exp) -> None:
    """Every arm's training-step cost, solo and side by side in one process (GPU only)."""
    import torch

    if not e.pending("speed.json", "[speed]"):
        return
    if e.s["speed_args"] is None or not torch.cuda.is_available():
        print("[speed] needs a GPU and --scale h200, skipped")
        return
    layout = {"per_layer": "", "shared": "_shared", "freq2": "_freq2", "freq4": "_freq4"}
    arms = ["pretrain"]
    for arm in e.arms:
        suffix = layout.get(arm, "_" + arm[len("obj_"):] if arm.startswith("obj_") else "")
        arms += [f"warmup{suffix}"] + ([f"sparse{suffix}"] if arm in layout else [])
    if e.speed_arms:
        arms = e.speed_arms
    d = e.out / "speed"
    d.mkdir(exist_ok=True)
    cmd = [e.python, str(REPO / "benchmarks" / "bench_model_step.py"), *e.s["speed_args"],
           "--arms", ",".join(arms), "--out", str(d)]
    print(f"\n=== speed: {_echo(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    (d / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"[speed] failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
        return
    rows = json.loads(next(d.glob("model_step_*.json")).read_text())
    rows["command"] = portable_command(_echo(cmd).replace(str(e.out), "$RUN"))
    e.save_json("speed.json", rows)
    print(proc.stdout[-2500:], flush=True)


BENCH128K_ARGS = ["--seq", "131072", "--topk", "2048", "--arms", "warmup,sparse", "--iters", "1", "--warmup-iters", "1"]
RESULTS = REPO / "benchmarks" / "results"


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


def stage_bench128k(e: Exp) -> None:
    """The report's warm-up batch (16 x 131072 tokens) on the small MoE: one micro-batch of
    131072 tokens measured (warm-up and sparse step), the 16-sequence step and 1000 steps
    extrapolated. (The whole step through the trainer is ~20 minutes on one H200.)"""
    import torch

    if not e.s["bench"] or not torch.cuda.is_available():
        print("[bench128k] needs a GPU and --scale h200, skipped")
        return
    if not e.pending("bench128k.json", "[bench128k]"):
        return
    d = e.out / "bench128k"
    d.mkdir(exist_ok=True)
    cmd = [e.python, str(REPO / "benchmarks" / "bench_model_step.py"), *BENCH128K_ARGS, "--out", str(d)]
    print(f"\n=== bench128k: {_echo(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    (d / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        e.save_json("bench128k.json", {"error": proc.stderr[-2000:]})
        return
    result = bench128k_from(json.loads(next(d.glob("model_step_*.json")).read_text()),
                            portable_command(_echo(cmd).replace(str(e.out), "$RUN")))
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


def stage_step128k(e: Exp) -> None:
    """A step of the report's warm-up recipe, exactly (16 sequences of 131072 tokens, micro-batch
    1, lr 1e-3, indexers only), through the trainer, from this run's pretrain checkpoint (or, when
    the run has none, from a one-step pretrain: ``--stage corpus,step128k`` is a sitting of its own)."""
    import torch

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
            _run_phase(e, start, _phase_cmd(e, start, "h200_pretrain.yaml", "pretrain",
                                            ["train.iters=1", "train.lr_warmup_iters=0", "eval.iters=0",
                                             "checkpoint.interval=1"]))
        # Two steps, logged one by one: the second is the measurement (the first compiles Triton).
        extra = [f"checkpoint.load_from={e.phase_dir(start) / 'ckpt'}", "train.iters=2", "eval.iters=0",
                 "checkpoint.interval=2", "logging.interval=1"]
        cmd = [e.python, "-m", "megatron_dsa.train.cli", "--config", str(RECIPES / "report_warmup.yaml"),
               f"data.dir={e.data}", f"checkpoint.save={e.phase_dir(name) / 'ckpt'}",
               f"logging.tensorboard_dir={e.phase_dir(name) / 'tb'}", *extra]
        _run_phase(e, name, cmd)
    except SystemExit as err:
        e.save_json("step128k.json", {"error": str(err)[-2000:]})
        return
    log = (e.phase_dir(name) / "train.log").read_text()
    result = {"command": portable_command(_echo(cmd)), **step128k_from_log(log)}
    e.save_json("step128k.json", result)
    print(f"[step128k] {result}")


# --------------------------------------------------------------------------------------------
# Report


def _scalars(tb: Path) -> dict:
    from megatron_dsa.train.main import read_scalars

    return read_scalars(tb) if tb.is_dir() else {}


def _first_last(series, n: int = 3):
    vals = [v for _, v in series]
    if not vals:
        return None, None
    k = max(1, min(n, len(vals) // 4 or 1))
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _fmt(x, spec=".4f", none="n/a"):
    return none if x is None else format(x, spec)


def _portable_corpus(info: dict) -> dict:
    """The corpus record without machine paths: which library trees, not where they were."""
    info = {k: v for k, v in info.items() if k not in ("source", "stdlib", "site_packages")}
    return {"source": "the interpreter's standard library and site-packages (.py/.txt/.rst)", **info}


def collect(e: Exp) -> dict:
    res = {"scale": e.scale, "targets": TARGETS, "commands": e.commands(), "arms": e.arms,
           "corpus": _portable_corpus(e._load_json("corpus_info.json", {})),
           "eval": {}, "phases": {}, "warmup": {}, "recall": {}}
    for arm, (phase, _) in eval_arms(e).items():
        p = e.out / "eval" / f"{phase}.json"
        if p.is_file():
            res["eval"][arm] = json.loads(p.read_text())
    for task in ("pretrain", *e.arms):
        p = e.out / "eval" / f"recall_{task}.json"
        if p.is_file():
            res["recall"][task] = json.loads(p.read_text())["recall"]
    res["speed"] = e._load_json("speed.json", None)
    for d in sorted(e.out.iterdir()) if e.out.is_dir() else []:
        if not (d / "tb").is_dir():
            continue
        scal = _scalars(d / "tb")
        tps = [v for _, v in scal.get("tokens-per-sec", [])]
        val = scal.get("lm loss validation", [])
        done = json.loads((d / "DONE").read_text()) if (d / "DONE").is_file() else {}
        res["phases"][d.name] = {
            "tokens_per_s": _median(tps[1:] or tps), "wall_s": done.get("seconds"),
            "lm_loss": scal.get("lm loss", []), "val_loss": val[-1][1] if val else None,
        }
        if d.name.startswith("warmup_"):
            kl, rec = scal.get("indexer kl", []), scal.get("indexer topk-recall", [])
            kl0, kl1 = _first_last(kl)
            r0, r1 = _first_last(rec)
            first = lambda level: next((i for i, v in rec if v >= level), None)  # noqa: E731
            res["warmup"][d.name[len("warmup_"):]] = {
                "kl": kl, "recall": rec, "kl_start": kl0, "kl_end": kl1,
                "kl_drop": (kl0 / kl1) if kl0 and kl1 else None, "recall_start": r0, "recall_end": r1,
                # how fast: first iteration at 90% of the arm's own final recall / at the target
                "iter_to_90pct_of_final": first(0.9 * r1) if r1 else None,
                "iter_to_target": first(TARGETS["recall"])}
    res["bench128k"] = e._load_json("bench128k.json", None)
    res["step128k"] = e._load_json("step128k.json", None)
    # At h200 scale, measurements committed under benchmarks/results stand in for stages this
    # run skipped (the same commands, run on the same kind of GPU in an earlier sitting).
    if e.scale == "h200":
        committed = "python benchmarks/bench_model_step.py " + " ".join(BENCH128K_ARGS)
        if res["bench128k"] is None and (RESULTS / "model_step_small_131072.json").is_file():
            res["bench128k"] = bench128k_from(json.loads((RESULTS / "model_step_small_131072.json").read_text()),
                                              committed + " (benchmarks/results/model_step_small_131072.json)")
        if (RESULTS / "model_step_small_16384.json").is_file():
            committed = json.loads((RESULTS / "model_step_small_16384.json").read_text())
            cmd = "python benchmarks/bench_model_step.py " + " ".join(e.s["speed_args"])
            if res["speed"] is None:
                res["speed"] = {**committed, "command": cmd + " (benchmarks/results/model_step_small_16384.json)"}
            else:  # this run re-measured some arms: theirs replace the committed ones
                mine = {r["arm"]: r for r in res["speed"]["rows"]}
                rows = [mine.pop(r["arm"], r) for r in committed["rows"]] + list(mine.values())
                res["speed"] = {**res["speed"], "rows": rows,
                                "command": f"{cmd} (arms {', '.join(r['arm'] for r in res['speed']['rows'])} "
                                           "re-measured in this run, the others from benchmarks/results)"}
    return res


def _plots(res: dict, rdir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}

    def save(name: str, fig) -> None:
        files[name] = f"verification_{name}.png"
        fig.tight_layout()
        fig.savefig(rdir / files[name], dpi=100)
        plt.close(fig)

    # 1. loss curves
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    pre = res["phases"].get("pretrain", {}).get("lm_loss", [])
    if pre:
        ax[0].plot([i for i, _ in pre], [v for _, v in pre], label="pretrain (dense)")
    off = max((i for i, _ in pre), default=0)
    for name, label in (("dense_control", "B: dense control"),
                        *((f"sparse_{a}", ARMS[a][0]) for a in res["arms"])):
        s = res["phases"].get(name, {}).get("lm_loss", [])
        if s:
            ax[1].plot([i for i, _ in s], [v for _, v in s], label=label)
            ax[0].plot([off + i for i, _ in s], [v for _, v in s], label=label, alpha=0.7)
    ax[0].set(title="training LM loss (pretrain, then each arm)", xlabel="iteration", ylabel="loss")
    ax[1].set(title="arms after pretraining (same data order)", xlabel="iteration in arm", ylabel="loss")
    for a in ax:
        a.legend(fontsize=7)
    save("loss", fig)
    # 2. retrieval vs length + loss vs length
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm, r in res["eval"].items():
        bl = r["retrieval"]["by_length"]
        xs = sorted(int(k) for k in bl)
        ax[0].plot(xs, [bl[str(x)]["exact"] if str(x) in bl else bl[x]["exact"] for x in xs], "o-", label=arm)
        ls = sorted(int(k) for k in r["loss"])
        ax[1].plot(ls, [r["loss"][str(x)] if str(x) in r["loss"] else r["loss"][x] for x in ls], "o-", label=arm)
    ax[0].set(title="retrieval exact match (all tasks)", xlabel="context length (tokens)", ylabel="%", xscale="log")
    ax[1].set(title="validation loss vs context length", xlabel="context length (tokens)", ylabel="loss", xscale="log")
    for a in ax:
        a.legend(fontsize=7)
    save("retrieval", fig)
    # 3. warm-up KL and recall
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for v, w in res["warmup"].items():
        if w["kl"]:
            ax[0].plot([i for i, _ in w["kl"]], [x for _, x in w["kl"]], label=v)
        if w["recall"]:
            ax[1].plot([i for i, _ in w["recall"]], [x for _, x in w["recall"]], label=v)
    ax[0].set(title="indexer loss during warm-up (each arm's own objective)", xlabel="iteration", yscale="log")
    ax[1].set(title="top-k recall of the dense attention mass (warm-up)", xlabel="iteration")
    ax[1].axhline(TARGETS["recall"], color="grey", ls=":")
    for a in ax:
        a.legend(fontsize=7)
    save("warmup", fig)
    # 4. speed: the side-by-side step benchmark when it ran, else the trainer's throughput
    fig, ax = plt.subplots(figsize=(9, 4))
    rows = [r for r in (res.get("speed") or {}).get("rows", []) if "ms" in r]
    if rows:
        ax.barh([r["arm"] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set(title="training step (fwd+bwd), one process, side by side: tokens/s", xlabel="tokens/s")
    else:
        names = [n for n, p in res["phases"].items() if p["tokens_per_s"]]
        ax.barh(names, [res["phases"][n]["tokens_per_s"] for n in names])
        ax.set(title="training throughput (median tokens/s)", xlabel="tokens/s")
    save("speed", fig)
    # 5. recall after warm-up vs k/L at each length
    if res["recall"]:
        lengths = sorted({int(L) for r in res["recall"].values() for L in r})
        fig, ax = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
        for j, L in enumerate(lengths):
            for task, r in res["recall"].items():
                by_k = r.get(str(L), {})
                ks = sorted(by_k, key=int)
                vals = [by_k[k]["mean_nontrivial"] if by_k[k]["mean_nontrivial"] is not None else by_k[k]["mean"]
                        for k in ks]
                label = "untrained indexer" if task == "pretrain" else task
                ax[0][j].plot([by_k[k]["k_over_L"] for k in ks], vals, "o-", label=label)
                if task == "pretrain" and all(by_k[k].get("oracle_mean_nontrivial") is not None for k in ks):
                    ax[0][j].plot([by_k[k]["k_over_L"] for k in ks], [by_k[k]["oracle_mean_nontrivial"] for k in ks],
                                  "k--", label="oracle (attention's own top-k)")
            ax[0][j].set(title=f"top-k recall after warm-up, L = {L}", xlabel="k / L", xscale="log", ylim=(0, 1.02))
            ax[0][j].axhline(TARGETS["recall"], color="grey", ls=":")
        ax[0][0].legend(fontsize=7)
        save("recall", fig)
    return files


def _recall_at(recall: dict, task: str, length: int, k: int, key: str):
    """One value of the recall stage's table (None where it was not measured)."""
    return recall.get(task, {}).get(str(length), {}).get(str(k), {}).get(key)


def _oracle_row(recall: dict, cols) -> list | None:
    """The oracle recall (rows with more than k causal keys) per (length, k/L) column, from the
    first task that recorded it (the same main model for every task)."""
    for task in recall:
        vals = [_recall_at(recall, task, L_, max(1, round(ratio * L_)), "oracle_mean_nontrivial") for L_, ratio in cols]
        if any(v is not None for v in vals):
            return vals
    return None


def _get(d, k):
    return d.get(str(k), d.get(k)) if isinstance(d, dict) else None


def _objective_answer(res: dict, objs: list[str], s: dict, trainer_val: dict | None = None) -> str:
    """A data-driven sentence comparing the warm-up objectives (recall, then sparse loss)."""
    rec = {a: res["warmup"].get(a, {}).get("recall_end") for a in objs}
    ev = res["eval"]
    if trainer_val is not None:
        loss = {a: trainer_val.get(f"sparse_{a}") for a in objs}
    else:
        loss = {a: _get(ev[ARMS[a][0]]["loss"], s["train_length"]) if ARMS[a][0] in ev else None for a in objs}
    parts = []
    if all(v is not None for v in rec.values()):
        order = sorted(rec, key=rec.get, reverse=True)
        parts.append("Top-k recall at the end of the warm-up, best first: "
                     + ", ".join(f"{OBJECTIVE_ARMS[a]} {rec[a]:.3f}" for a in order) + ".")
    if all(v is not None for v in loss.values()):
        order = sorted(loss, key=loss.get)
        best = order[0]
        rel = lambda a: 100 * (loss[a] - loss["per_layer"]) / loss["per_layer"]  # noqa: E731
        parts.append(f"Validation loss after the sparse phase, best first: "
                     + ", ".join(f"{OBJECTIVE_ARMS[a]} {loss[a]:.4f}" + ("" if a == "per_layer" else f" ({rel(a):+.2f}% vs KL)")
                                 for a in order) + ".")
    return " ".join(parts) or "Not all objective arms finished."


def write_report(e: Exp) -> Path:
    res = collect(e)
    rdir = e.report_dir
    rdir.mkdir(parents=True, exist_ok=True)
    files = _plots(res, rdir)
    s, ev = e.s, res["eval"]
    A, B = ev.get("A: DSA per-layer"), ev.get("B: dense control")
    L = []
    L.append(f"# DSA verification on the {'tiny' if e.scale == 'smoke' else 'small'} MoE (issue 7), scale `{e.scale}`\n")
    if e.scale == "smoke":
        L.append("**CPU smoke run of the pipeline with the tiny model and tiny budgets: the numbers show the "
                 "pipeline works, they verify nothing about DSA.**\n")
    L.append(f"Re-run: `python experiments/verify_dsa.py --scale {e.scale}"
             f"{' --jobs 8' if e.scale == 'h200' else ''}` (resumes; `--stage a,b` runs some stages). "
             "The exact commands below write the run directory as `$RUN`. "
             f"Training length {s['train_length']}, top-k {s['topk']}.\n")
    c = res["corpus"]
    if c:
        L.append(f"Data: the running interpreter's standard library and site-packages (.py/.txt/.rst), "
                 f"{c['splits']['train']['tokens']:,} train / {c['splits']['valid']['tokens']:,} held-out tokens "
                 f"(split by file hash), BPE vocab {c.get('vocab_size')}.\n")
    # -- main table
    lengths = list(s["loss_lengths"])
    L.append("## Validation loss at several context lengths (held-out split, same target tokens at every length)\n")
    L.append("| arm | mode | " + " | ".join(str(x) for x in lengths) + " |")
    L.append("|---|---|" + "---|" * len(lengths))
    for arm, r in ev.items():
        L.append(f"| {arm} | {r['mode']} | " + " | ".join(_fmt(_get(r['loss'], x)) for x in lengths) + " |")
    verdict = {}
    if A and B:
        rel = {x: (_get(A["loss"], x) - _get(B["loss"], x)) / _get(B["loss"], x) for x in lengths}
        L.append("| A vs B (relative) | | " + " | ".join(f"{100 * rel[x]:+.2f}%" for x in lengths) + " |")
        at = s["train_length"] if s["train_length"] in rel else lengths[-1]
        verdict["loss"] = abs(rel[at]) <= TARGETS["loss_rel"]
        L.append(f"\nTarget: arm A within 1% of arm B at the training length ({at}): "
                 f"{100 * rel[at]:+.2f}% -> **{'met' if verdict['loss'] else 'missed'}**.\n")
    missing = [label for label, (phase, _) in eval_arms(e).items() if label not in ev and phase in res["phases"]]
    if missing:
        L.append(f"Not evaluated (the run ended first): {', '.join(missing)}.\n")
    # -- the trainer's own validation at the end of every arm: same validation batches for all
    ctrl = res["phases"].get("dense_control", {}).get("val_loss")
    L.append("## Validation loss at the end of each arm (the trainer's, training length, same validation batches)\n")
    L.append("Megatron's evaluation after the arm's last step: every arm starts from the same checkpoint with the "
             "same seed, so all of them (and the dense control) are scored on the same held-out batches "
             f"(eval.iters x global batch sequences of {s['train_length']} tokens).\n")
    L.append("| arm | phase | validation loss | vs dense control |")
    L.append("|---|---|---|---|")
    trainer_val = {}
    for label, (phase, _) in eval_arms(e).items():
        v = res["phases"].get(phase, {}).get("val_loss")
        if v is None or phase == "pretrain":  # its last evaluation read later validation batches
            continue
        trainer_val[phase] = v
        rel_c = f"{100 * (v - ctrl) / ctrl:+.2f}%" if ctrl and phase != "dense_control" else ""
        L.append(f"| {label} | {phase} | {v:.4f} | {rel_c} |")
    if "loss" not in verdict and ctrl and "sparse_per_layer" in trainer_val:
        r_ab = (trainer_val["sparse_per_layer"] - ctrl) / ctrl
        verdict["loss"] = abs(r_ab) <= TARGETS["loss_rel"]
        L.append(f"\nTarget: arm A within 1% of arm B (trainer validation, training length): {100 * r_ab:+.2f}% -> "
                 f"**{'met' if verdict['loss'] else 'missed'}**.\n")
    res["trainer_val"] = trainer_val
    # -- retrieval
    rl = list(s["retrieval_lengths"])
    L.append("## Retrieval suite (exact match of the greedy answer, %; single / multi-key / key-value recall)\n")
    L.append(f"{s['retrieval_n']} items per task and length, needle depths spread over 10-90%; "
             "lengths above the training length are extrapolation (plain RoPE) for every arm.\n")
    L.append("| arm | task | " + " | ".join(str(x) for x in rl) + " |")
    L.append("|---|---|" + "---|" * len(rl))
    for arm, r in ev.items():
        bt = r["retrieval"]["by_task_length"]
        for task in ("single", "multikey", "kvrecall"):
            if task in bt:
                L.append(f"| {arm} | {task} | " + " | ".join(_fmt(_get(_get(bt[task], x) or {}, 'exact'), '.0f')
                                                           for x in rl) + " |")
        bl = r["retrieval"]["by_length"]
        L.append(f"| {arm} | **all** (token acc.) | " + " | ".join(
            f"{_fmt(_get(_get(bl, x) or {}, 'exact'), '.0f')} ({_fmt(_get(_get(bl, x) or {}, 'token'), '.0f')})"
            for x in rl) + " |")
        if any((_get(bl, x) or {}).get("nll") is not None for x in rl):
            L.append(f"| {arm} | answer NLL (nats/token) | " + " | ".join(
                _fmt((_get(bl, x) or {}).get("nll"), ".3f") for x in rl) + " |")
    if A and B:
        diffs = {x: _get(A["retrieval"]["by_length"], x)["exact"] - _get(B["retrieval"]["by_length"], x)["exact"]
                 for x in rl}
        nll = {x: ((_get(A["retrieval"]["by_length"], x) or {}).get("nll"),
                   (_get(B["retrieval"]["by_length"], x) or {}).get("nll")) for x in rl}
        if all(a is not None and b is not None for a, b in nll.values()):
            L.append("\nAnswer NLL, A minus dense control (nats per answer token; lower is better): "
                     + ", ".join(f"{x}: {a - b:+.3f}" for x, (a, b) in nll.items())
                     + ". The log-likelihood of the right answer ranks models even where none answers exactly.")
        verdict["retrieval"] = all(abs(d) <= TARGETS["retrieval_points"] for d in diffs.values())
        L.append(f"\nA minus dense control (points): {', '.join(f'{x}: {d:+.1f}' for x, d in diffs.items())} -> "
                 f"target (within 2 points at every length) **{'met' if verdict['retrieval'] else 'missed'}**.\n")
    scores = [x["exact"] for r in ev.values() for x in r["retrieval"]["by_length"].values()]
    if scores and max(scores) == 0:
        verdict["retrieval"] = "not informative (every model at 0%)"
        L.append("Every evaluated model, dense ones included, scores 0% here: at this training budget the suite does "
                 "not separate the arms by exact match (a 'within 2 points' verdict on it means nothing; the answer "
                 "NLL, where measured, still compares them).\n")
    # -- warm-up
    L.append("## Warm-up: indexer KL and top-k recall of the dense attention mass\n")
    L.append("| indexer layout | KL start | KL end | drop | recall start | recall end | targets (drop >= 5x, recall >= 90%) |")
    L.append("|---|---|---|---|---|---|---|")
    for v, w in res["warmup"].items():
        if v not in SHARING_ARMS:
            continue  # the objective arms' loss is not the KL: their own section below
        ok = (w["kl_drop"] or 0) >= TARGETS["kl_drop"] and (w["recall_end"] or 0) >= TARGETS["recall"]
        if v == "per_layer":
            verdict["warmup"] = ok
        L.append(f"| {v} | {_fmt(w['kl_start'], '.4g')} | {_fmt(w['kl_end'], '.4g')} | {_fmt(w['kl_drop'], '.1f')}x | "
                 f"{_fmt(w['recall_start'], '.3f')} | {_fmt(w['recall_end'], '.3f')} | {'met' if ok else 'missed'} |")
    ceiling = _recall_at(res["recall"], "pretrain", s["train_length"], s["topk"], "oracle_mean_nontrivial")
    reached = _recall_at(res["recall"], "per_layer", s["train_length"], s["topk"], "mean_nontrivial")
    if ceiling is not None:
        verdict["recall_oracle"] = ceiling
        L.append(f"\nThe ceiling: on held-out text at the training length with the same k, the dense attention's own "
                 f"top-k holds {ceiling:.3f} of its mass (the oracle recall, section below): no indexer can recall more. "
                 + (f"The per-layer indexer recalls {reached:.3f} there, {reached / ceiling:.0%} of the ceiling. "
                    if reached is not None else "")
                 + (f"A {TARGETS['recall']:.0%} recall target is above the ceiling on this model and cannot be met "
                    "by any indexer; the attention is that spread out." if ceiling < TARGETS["recall"] else ""))
    L.append("\nRecall is measured on each training batch with the arm's own top-k (k/S = "
             f"{s['topk'] / s['train_length']:.4g}); rows with fewer than k causal keys count as fully recalled, "
             "as in training. The recall section below excludes them.\n")
    speed = {r["arm"]: r for r in (res.get("speed") or {}).get("rows", []) if "ms" in r}
    # -- recall at several lengths and k/S
    if res["recall"]:
        ratios = s["recall_ratios"]
        L.append("## Top-k recall after warm-up at several context lengths and k/S (held-out split)\n")
        L.append("Share of the head-summed dense attention mass inside the indexer's top-k, rows with more than k "
                 "causal keys only, mean over layers; `untrained` = the pretrain checkpoint's untouched indexer.\n")
        cols = [(L_, r) for L_ in s["recall_lengths"] for r in ratios]
        L.append("| arm | " + " | ".join(f"L={L_} k/L={r:.3g}" for L_, r in cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for task, r in res["recall"].items():
            vals = []
            for L_, ratio in cols:
                by_k = r.get(str(L_), {})
                k = str(max(1, round(ratio * L_)))
                v = by_k.get(k, {})
                got, best = v.get("mean_nontrivial", v.get("mean")), v.get("oracle_mean_nontrivial")
                vals.append(_fmt(got, ".3f") + (f" ({got / best:.0%})" if got is not None and best and task != "pretrain" else ""))
            L.append(f"| {'untrained' if task == 'pretrain' else task} | " + " | ".join(vals) + " |")
        oracle = _oracle_row(res["recall"], cols)
        if oracle:
            L.append("| **oracle** (the attention's own top-k) | " + " | ".join(_fmt(v, ".3f") for v in oracle) + " |")
            L.append("\n`oracle`: the share of the attention mass held by the k keys where it is largest, the most any "
                     "indexer's top-k can recall (the main model is the pretrained one in every arm after warm-up, so "
                     "one row serves all). In brackets: each arm's recall as a share of its own oracle (the arms that reuse "
                     "a selection every 2 / 4 layers are measured on their selecting layers only, whose oracle is "
                     "lower). A recall target above the oracle cannot be met by any indexer.")
        L.append("")
    # -- sharing
    L.append("\n## One indexer for all layers?\n")
    L.append("| arm | val. loss at training length | vs dense control | retrieval exact (mean over lengths) | "
             "warm-up KL end | recall end | warm-up step ms | sparse step ms |")
    L.append("|---|---|---|---|---|---|---|---|")
    rows = {}
    suffix = {"per_layer": "", "shared": "_shared", "freq2": "_freq2", "freq4": "_freq4"}
    # Validation loss: the evaluation stage's at the training length where every arm of the table
    # has it, else the trainer's end-of-arm validation (same batches for all arms).
    loss_src = {} if all(ARMS[v][0] in ev for v in SHARING_ARMS if v in res["arms"]) else {"shared": "trainer"}
    for v in (a for a in SHARING_ARMS if a in res["arms"]):
        arm = ARMS[v][0]
        r, w = ev.get(arm), res["warmup"].get(v, {})
        loss = _get(r["loss"], s["train_length"]) if r else None
        if loss is None or "shared" in loss_src:  # one source for the whole table
            loss_src["shared"] = "trainer"
            loss = trainer_val.get(f"sparse_{v}")
        ret = (sum(x["exact"] for x in r["retrieval"]["by_length"].values()) / len(r["retrieval"]["by_length"])) if r else None
        rows[v] = (loss, ret)
        ref = trainer_val.get("dense_control") if loss_src.get("shared") else (_get(B["loss"], s["train_length"]) if B else None)
        vs = f"{100 * (loss - ref) / ref:+.2f}%" if loss is not None and ref else "n/a"
        L.append(f"| {arm} | {_fmt(loss)} | {vs} | {_fmt(ret, '.1f')} | {_fmt(w.get('kl_end'), '.4g')} | "
                 f"{_fmt(w.get('recall_end'), '.3f')} | {_fmt(speed.get('warmup' + suffix[v], {}).get('ms'), '.0f')} | "
                 f"{_fmt(speed.get('sparse' + suffix[v], {}).get('ms'), '.0f')} |")
    if loss_src.get("shared"):
        L.append("\nValidation loss here: the trainer's end-of-arm validation (the evaluation stage did not cover "
                 "every arm).\n")
    if rows.get("per_layer", (None,))[0] and rows.get("shared", (None,))[0]:
        (lp, rp), (ls, rs) = rows["per_layer"], rows["shared"]
        drel = (ls - lp) / lp
        ret_ok = rp is None or rs is None or abs(rs - rp) <= TARGETS["retrieval_points"]
        same = abs(drel) <= TARGETS["loss_rel"] and ret_ok
        verdict["shared"] = same
        ret_txt = f"retrieval {rs - rp:+.1f} points" if rp is not None and rs is not None else "retrieval not measured"
        L.append(f"\n**Answer:** one shared indexer vs one per layer: validation loss {100 * drel:+.2f}%, {ret_txt} -> "
                 f"{'as good, within the 1% / 2-point margins' if same else 'not as good'} "
                 f"at this scale and budget" + (" (smoke run: no conclusion)." if e.scale == "smoke" else ".") + "\n")
    # -- objectives (issue 10)
    objs = [a for a in OBJECTIVE_ARMS if a in res["arms"]]
    if len(objs) > 1:
        L.append("## Why KL? Warm-up objectives (issue 10)\n")
        L.append("Same pretrain checkpoint, warm-up budget, data order and sparse phase (the sparse phase trains the "
                 "indexer with the sparse KL in every arm); only the warm-up loss differs. `iters to 90%`: first "
                 "warm-up iteration whose batch recall reached 90% of that arm's final recall; `to target`: first "
                 "iteration at >= 0.90 recall.\n")
        obj_trainer = not all(ARMS[a][0] in ev for a in objs)
        if obj_trainer:
            L.append("Validation loss: the trainer's end-of-arm validation (the evaluation stage did not cover every "
                     "arm).\n")
        L.append("| warm-up objective | recall start | recall end | iters to 90% | to target | val. loss after sparse | "
                 "retrieval exact (mean) | warm-up step ms |")
        L.append("|---|---|---|---|---|---|---|---|")
        for a in objs:
            w, r = res["warmup"].get(a, {}), ev.get(ARMS[a][0])
            loss = _get(r["loss"], s["train_length"]) if r and not obj_trainer else trainer_val.get(f"sparse_{a}")
            ret = (sum(x["exact"] for x in r["retrieval"]["by_length"].values()) / len(r["retrieval"]["by_length"])) if r else None
            bench = "warmup" if a == "per_layer" else "warmup_" + OBJECTIVE_ARMS[a]
            L.append(f"| {OBJECTIVE_ARMS[a]} | {_fmt(w.get('recall_start'), '.3f')} | {_fmt(w.get('recall_end'), '.3f')} | "
                     f"{_fmt(w.get('iter_to_90pct_of_final'), 'd')} | {_fmt(w.get('iter_to_target'), 'd')} | "
                     f"{_fmt(loss)} | {_fmt(ret, '.1f')} | {_fmt(speed.get(bench, {}).get('ms'), '.0f')} |")
        L.append("\n" + _objective_answer(res, objs, s, trainer_val if obj_trainer else None) + "\n")
    # -- speed
    L.append("## Speed\n")
    if speed:
        sp = res["speed"]
        L.append(f"Training step (forward + backward, no optimizer) of each arm, one process, side by side: "
                 f"`{sp.get('command', '')}` ({sp['meta']['device']}, {sp['meta']['batch']} x {sp['meta']['seq']} tokens, "
                 f"top-k {sp['meta']['topk']}).\n")
        L.append("| arm | ms / step | tokens/s | peak GB |")
        L.append("|---|---|---|---|")
        for r in speed.values():
            L.append(f"| {r['arm']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gb']:.1f} |")
        L.append("")
    L.append("Trainer throughput of each phase (median tokens/s; phases of one stage may have run concurrently on "
             "the same GPU, so compare arms with the table above) and wall time incl. start-up and checkpointing:\n")
    L.append("| phase | tokens/s | wall s |")
    L.append("|---|---|---|")
    for n, p in res["phases"].items():
        L.append(f"| {n} | {_fmt(p['tokens_per_s'], ',.0f')} | {_fmt(p['wall_s'], '.0f')} |")
    b = res["bench128k"]
    L.append("\n## The report's warm-up batch (16 x 131072 tokens) on one H200\n")
    if b is None:
        L.append("not run at this scale (`--stage bench128k`, h200 only).\n")
    elif b.get("error"):
        L.append(f"failed: `{b['error'][-300:]}`\n")
    else:
        mb = b["micro_batch"]
        L.append(f"`{b['command']}`: one micro-batch of 131072 tokens (the trainer accumulates 16 of them per step, "
                 f"so this is the step's peak memory): warm-up {_fmt(mb.get('warmup', {}).get('ms'), ',.0f')} ms, "
                 f"peak {_fmt(mb.get('warmup', {}).get('peak_gb'), '.1f')} GB (no S^2 memory); sparse "
                 f"{_fmt(mb.get('sparse', {}).get('ms'), ',.0f')} ms, peak {_fmt(mb.get('sparse', {}).get('peak_gb'), '.1f')} GB. "
                 f"One 16 x 128K warm-up step: {_fmt(b.get('step_seconds'), ',.0f')} s "
                 f"({_fmt(b.get('tokens_per_s'), ',.0f')} tokens/s); the report's 1000 steps extrapolate to "
                 f"{_fmt(b.get('extrapolated_1000_steps_hours'), ',.0f')} h on one H200 (where the warm-up step's time goes: "
                 "benchmarks/NOTES.md).\n")
    st = res.get("step128k")
    if st and st.get("error"):
        L.append(f"The whole step through the trainer failed: `{st['error'][-300:]}`\n")
    elif st:
        L.append(f"**The whole step, measured** through the trainer (`{st['command']}`): Megatron's iteration time "
                 f"{_fmt(st.get('step_seconds'), ',.1f')} s for 16 x 131072 tokens ({_fmt(st.get('tokens_per_s'), ',.0f')} "
                 f"tokens/s), peak memory {_fmt(st.get('peak_gb'), '.1f')} GB; the report's 1000 steps: "
                 f"{_fmt(st.get('extrapolated_1000_steps_hours'), ',.1f')} h on one H200. (The second of two steps: "
                 "the first includes the one-time Triton compilation.)\n")
    # -- plots, commands, configs
    L.append("## Plots\n")
    for k, f in files.items():
        L.append(f"![{k}]({f})")
    L.append("\n## Exact commands\n")
    L.append("```")
    L += [f"# {k}\n{v}" for k, v in res["commands"].items()]
    L.append("```\n")
    L.append("## Configs\n")
    for name in ("h200_pretrain", "h200_warmup", "h200_sparse", "h200_dense_control", "report_warmup", "report_sparse"):
        L.append(f"<details><summary>configs/recipes/{name}.yaml</summary>\n\n```yaml\n"
                 f"{(RECIPES / (name + '.yaml')).read_text()}```\n</details>\n")
    if e.scale == "smoke":
        L.append("Smoke overrides applied to every phase: `" + " ".join(s["overrides"]["all"]) + "`\n")
    notes = REPO / "experiments" / f"verify_notes_{e.scale}.md"
    if notes.is_file():
        L.append("## Discussion (written after the run)\n")
        L.append(notes.read_text().strip() + "\n")
    L.append("## Conclusions\n")
    names = {"loss": "validation loss A vs B within 1%", "retrieval": "retrieval within 2 points of dense",
             "warmup": "warm-up KL drop >= 5x and recall >= 90% (per-layer)", "shared": "shared indexer as good as per-layer"}
    for k, text in names.items():
        line = f"- {text}: **{ {True: 'yes', False: 'no', None: 'not measured'}.get(verdict.get(k), verdict.get(k)) }**"
        if k == "warmup" and verdict.get("recall_oracle") is not None and verdict["recall_oracle"] < TARGETS["recall"]:
            line += (f" (the recall target is above the oracle recall {verdict['recall_oracle']:.3f}: "
                     "unreachable on this model)")
        L.append(line)
    L.append("\nThe token budgets here are a small fraction of the report's (see the configs); conclusions hold for "
             "this scale only. Retrieval at lengths beyond the training length measures extrapolation.\n")
    res["verdict"] = verdict
    (rdir / "verification.md").write_text("\n".join(L) + "\n")
    (rdir / "verification.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    e.save_json("results.json", res)
    print(f"report: {rdir / 'verification.md'}")
    return rdir / "verification.md"


# --------------------------------------------------------------------------------------------


def stage_tasks(e: Exp, stage: str) -> list[str]:
    """The independent tasks of a per-arm stage."""
    if stage == "warmup":
        return list(e.arms)
    if stage == "sparse":
        return ["dense_control", *e.arms]
    if stage == "recall":
        return ["pretrain", *e.arms]
    # eval, most important first (tasks start in this order): arm B and arm A, then the rest
    first = [a for a in ("per_layer",) if a in e.arms]
    return ["dense_control", *first, *(a for a in e.arms if a not in first), "pretrain"]


def run_task(e: Exp, stage: str, task: str) -> None:
    {"warmup": stage_warmup, "sparse": stage_sparse, "recall": stage_recall, "eval": stage_eval}[stage](e, task)


def run_arm_stage(e: Exp, args, stage: str) -> list[str]:
    """Run every task of a per-arm stage, up to ``--jobs`` at once (each in its own process
    when jobs > 1). A failed task is reported and the others go on; returns the failures."""
    tasks = stage_tasks(e, stage)
    if args.jobs <= 1:
        failed = []
        for task in tasks:
            try:
                run_task(e, stage, task)
            except SystemExit as err:
                print(f"[{stage}:{task}] FAILED: {err}", flush=True)
                failed.append(task)
        return failed

    def child(task: str) -> str | None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scale", e.scale, "--out", str(e.out),
               "--report-dir", str(e.report_dir), "--stage", stage, "--task", task, "--arms", ",".join(e.arms)]
        if e.force:
            cmd.append("--force")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for line in proc.stdout:
            print(f"[{task}] {line.rstrip()}"[:240], flush=True)
        return None if proc.wait() == 0 else task

    # Evaluation is forward-only and GPU-bound: a few at a time finish the first (most important)
    # models early instead of all of them late.
    jobs = min(args.jobs, args.eval_jobs) if stage == "eval" else args.jobs
    with ThreadPoolExecutor(jobs) as pool:
        failed = [t for t in pool.map(child, tasks) if t]
    for t in failed:
        print(f"[{stage}:{t}] FAILED (see its log above)", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/verify_dsa.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="h200")
    p.add_argument("--stage", default="all", help=f"'all' or comma-separated stages of: {','.join(STAGES)}")
    p.add_argument("--arms", default=None, help=f"comma-separated arms (default all: {','.join(ARMS)})")
    p.add_argument("--task", default=None, help="one task of a per-arm stage (an arm, 'pretrain' or 'dense_control')")
    p.add_argument("--speed-arms", default=None,
                   help="arms of the speed stage (benchmarks/bench_model_step.py names; default: every arm's phases)")
    p.add_argument("--jobs", type=int, default=1, help="tasks of a per-arm stage run at once (processes)")
    p.add_argument("--eval-jobs", type=int, default=3, help="at most this many evaluations at once (of --jobs)")
    p.add_argument("--out", default=None, help="run directory (default runs/verify/<scale>)")
    p.add_argument("--report-dir", default=None, help="where verification.md goes (default reports/)")
    p.add_argument("--force", action="store_true", help="rerun the stage(s) even if done")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    bad = [st for st in stages if st not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; stages: {','.join(STAGES)}")
    e = Exp(args)
    if args.task is not None:
        if len(stages) != 1 or args.stage not in ARM_STAGES or args.task not in stage_tasks(e, args.stage):
            p.error(f"--task {args.task!r} is not a task of stage {args.stage!r}")
        e.out.mkdir(parents=True, exist_ok=True)
        run_task(e, args.stage, args.task)
        return 0
    e.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed = {}
    for st in stages:
        print(f"\n##### stage {st} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if st == "corpus":
            stage_corpus(e)
        elif st == "speed":
            stage_speed(e)
        elif st == "pretrain":
            stage_pretrain(e)
        elif st in ARM_STAGES:
            bad = run_arm_stage(e, args, st)
            if bad:
                failed[st] = bad
        elif st == "report":
            write_report(e)
        elif st == "bench128k":
            stage_bench128k(e)
        elif st == "step128k":
            stage_step128k(e)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if failed:
        print(f"error: failed tasks: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
