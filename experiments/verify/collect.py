"""Everything a run measured, gathered from its directory into one results dict.

``collect`` reads each phase's TensorBoard scalars and wall time, the evaluation, recall and
speed JSON, and (at h200 scale) stands committed benchmark results in for stages the run
skipped. ``summary`` drops the per-step series (the plots hold them) for the committed
``reports/verification.json``.
"""

from __future__ import annotations

import json

from experiments.verify.measurements import bench128k_from, eval_arms
from experiments.verify.settings import BENCH128K_ARGS, RECIPES, RESULTS, SCALES, TARGETS
from experiments.verify.stages import RECIPE_128K, checkpoint_iteration
from experiments.verify.study import Study, portable_command
from megatron_dsa.train.config import load_config
from megatron_dsa.train.runner import first_last, read_scalars


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _portable_corpus(info: dict) -> dict:
    """The corpus record without machine paths: which library trees, not where they were."""
    if not info:
        return {}
    info = {k: v for k, v in info.items() if k not in ("source", "stdlib", "site_packages")}
    return {"source": "the interpreter's standard library and site-packages (.py/.txt/.rst)", **info}


def collect(e: Study) -> dict:
    res = {"scale": e.scale, "targets": TARGETS, "commands": e.commands(), "arms": e.arms,
           "corpus": _portable_corpus(e.corpus_info()),
           "tasks": e.load_json("tasks_info.json", {}),
           "eval": {}, "phases": {}, "warmup": {}, "recall": {}}
    for arm, (phase, _) in eval_arms(e).items():
        p = e.out / "eval" / f"{phase}.json"
        if p.is_file():
            res["eval"][arm] = json.loads(p.read_text())
    for task in ("pretrain", *e.arms):
        p = e.out / "eval" / f"recall_{task}.json"
        if p.is_file():
            res["recall"][task] = json.loads(p.read_text())["recall"]
    res["speed"] = e.load_json("speed.json", None)
    res["formats"] = e.load_json("eval/formats_pretrain.json", None)
    res["chain"] = _chain(e)
    for d in sorted(e.out.iterdir()) if e.out.is_dir() else []:
        if not (d / "tb").is_dir():
            continue
        scal = read_scalars(d / "tb")
        tps = [v for _, v in scal.get("tokens-per-sec", [])]
        val = scal.get("lm loss validation", [])
        done = json.loads((d / "DONE").read_text()) if (d / "DONE").is_file() else {}
        res["phases"][d.name] = {
            "tokens_per_s": _median(tps[1:] or tps), "wall_s": done.get("seconds"),
            "lm_loss": scal.get("lm loss", []), "val_loss": val[-1][1] if val else None,
        }
        if d.name.startswith("warmup_"):
            kl, rec = scal.get("indexer kl", []), scal.get("indexer topk-recall", [])
            kl0, kl1 = first_last(kl, 3)
            r0, r1 = first_last(rec, 3)
            first = lambda level: next((i for i, v in rec if v >= level), None)  # noqa: E731
            res["warmup"][d.name[len("warmup_"):]] = {
                "steps": kl[-1][0] if kl else None,  # what ran (the recipe's steps may have changed since)
                "kl": kl, "recall": rec, "kl_start": kl0, "kl_end": kl1,
                "kl_drop": (kl0 / kl1) if kl0 and kl1 else None, "recall_start": r0, "recall_end": r1,
                # how fast: first iteration at 90% of the arm's own final recall / at the target
                "iter_to_90pct_of_final": first(0.9 * r1) if r1 else None,
                "iter_to_target": first(TARGETS["recall"])}
    res["recipe128k"] = _recipe128k(e)
    res["bench128k"] = e.load_json("bench128k.json", None)
    res["step128k"] = e.load_json("step128k.json", None)
    # At the H200 scales, measurements committed under benchmarks/results stand in for stages this
    # run skipped (the same commands, run earlier on the same kind of GPU).
    if e.s["bench"]:
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


def _chain(e: Study) -> list[dict]:
    """The dense pretraining stages this run continues (``init_from``), first to last: each
    one's scale, training length, command and evaluation, read from its directory beside this one."""
    stages, scale = [], e.s.get("init_from")
    while scale:
        d = e.out.parent / scale
        p = d / "eval" / "pretrain.json"
        cmd = d / "pretrain" / "command.json"
        formats = d / "eval" / "formats_pretrain.json"
        stages.insert(0, {"scale": scale, "train_length": SCALES[scale]["train_length"],
                          "eval": json.loads(p.read_text()) if p.is_file() else None,
                          "formats": json.loads(formats.read_text()) if formats.is_file() else None,
                          "command": portable_command(json.loads(cmd.read_text())) if cmd.is_file() else None})
        scale = SCALES[scale].get("init_from")
    return stages


def _recipe128k(e: Study) -> dict:
    """The report's recipe at 1 x 128K, as far as it ran: per phase the steps saved of the
    recipe's, the indexer KL and top-k recall of every logged step and their start and end."""
    out = {}
    for name, recipe, _ in RECIPE_128K:
        d = e.phase_dir(name)
        if not (d / "tb").is_dir():
            continue
        scal = read_scalars(d / "tb")
        kl, rec = scal.get("indexer kl", []), scal.get("indexer topk-recall", [])
        (kl0, kl1), (r0, r1) = first_last(kl, 10), first_last(rec, 10)
        tps = [v for _, v in scal.get("tokens-per-sec", [])]
        out[name] = {"recipe": recipe, "steps": int(load_config(RECIPES / recipe).train["iters"]),
                     "saved_step": checkpoint_iteration(d / "ckpt"), "kl": kl, "recall": rec,
                     "kl_start": kl0, "kl_end": kl1, "kl_drop": (kl0 / kl1) if kl0 and kl1 else None,
                     "recall_start": r0, "recall_end": r1, "tokens_per_s": _median(tps[1:] or tps)}
    return out


# Per-step series: plotted, not tabulated.
SERIES = {"phases": ("lm_loss",), "warmup": ("kl", "recall"), "recipe128k": ("kl", "recall")}


def summary(res: dict) -> dict:
    """The results without their per-step series: what ``reports/verification.json`` holds."""
    out = dict(res)
    for section, keys in SERIES.items():
        out[section] = {name: {k: v for k, v in entry.items() if k not in keys}
                        for name, entry in res.get(section, {}).items()}
    return out


def to_json(obj, indent: int = 2, _depth: int = 0) -> str:
    """JSON with mappings one key a line and lists of numbers or strings on one line: a results
    file a person reads."""
    pad, inner = " " * (indent * _depth), " " * (indent * (_depth + 1))
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, indent, _depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        items = [f"{inner}{to_json(v, indent, _depth + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, default=str)
