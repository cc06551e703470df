"""The study's report: ``<report-dir>/verification.md`` with its plots and the results JSON.

``verification_summary.json`` holds the headline numbers: per arm, the held-out loss at the
training length and the retrieval exact match (%) per context length on the held-out items, and
beside them the exact match on the same tasks in the training formats.

``write_report`` gathers the run's results (``collect``), draws the plots (``plots``) and writes
the markdown one section after another; each section reads the results and adds its lines and,
where the study sets a target, its verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from experiments.verify.collect import collect, summary, to_json
from experiments.verify.measurements import eval_arms
from experiments.verify.plots import plots
from experiments.verify.settings import (ANSWER_LOSS_WEIGHT, ARMS, OBJECTIVE_ARMS, RECIPES, SHARING_ARMS, TARGETS,
                                        WARMUP_LENGTH_ARMS)
from experiments.verify.study import Study
from megatron_dsa.data.tasks import HELDOUT, TASKS

NOTES = Path(__file__).resolve().parent  # notes_<scale>.md: the discussion written after a run
MET = {True: "met", False: "missed", None: "not measured"}  # a target's verdict in a table
YES = {True: "yes", False: "no", None: "not measured"}  # ... and in the conclusions
# Below this exact match % at every length for every model, dense ones included, "within 2 points of
# the dense control" on the held-out formats says nothing: it compares answers that are nearly all wrong.
RETRIEVAL_FLOOR = 10.0
RETRIEVAL_UNINFORMATIVE = f"not informative (every model below {RETRIEVAL_FLOOR:.0f}%)"


def _fmt(x, spec=".4f", none="n/a"):
    return none if x is None else format(x, spec)


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


def _by_length(r: Optional[dict], key: str) -> dict:
    """An evaluation's retrieval results per length (``key``: "retrieval" or
    "retrieval_train_formats"); empty where the model or the table is missing."""
    return r[key]["by_length"] if r and key in r else {}


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
        rel = lambda a: 100 * (loss[a] - loss["per_layer"]) / loss["per_layer"]  # noqa: E731
        parts.append("Validation loss after the sparse phase, best first: "
                     + ", ".join(f"{OBJECTIVE_ARMS[a]} {loss[a]:.4f}" + ("" if a == "per_layer" else f" ({rel(a):+.2f}% vs KL)")
                                 for a in order) + ".")
    return " ".join(parts) or "Not all objective arms finished."


@dataclass
class Report:
    """What the sections share: the run, its results, the lines so far and the verdicts."""

    e: Study
    res: dict
    files: dict[str, str]
    lines: list[str] = field(default_factory=list)
    verdict: dict = field(default_factory=dict)
    trainer_val: dict = field(default_factory=dict)  # phase -> the trainer's last validation loss

    @property
    def s(self) -> dict:
        return self.e.s

    @property
    def ev(self) -> dict:
        return self.res["eval"]

    @property
    def A(self) -> Optional[dict]:  # arm A's evaluation
        return self.ev.get("A: DSA per-layer")

    @property
    def B(self) -> Optional[dict]:  # the dense control's evaluation
        return self.ev.get("B: dense control")

    @property
    def ran_arms(self) -> list[str]:
        """The arms with a warm-up or sparse phase on disk: none for a pretraining-only stage,
        whose report then leaves the arms' sections out instead of filling them with n/a."""
        phases = set(self.res.get("phases", {})) | {f"warmup_{a}" for a in self.res.get("warmup", {})}
        return [a for a in self.res["arms"] if {f"warmup_{a}", f"sparse_{a}"} & phases]

    @property
    def speed(self) -> dict:  # arm -> the side-by-side step benchmark's row
        return {r["arm"]: r for r in (self.res.get("speed") or {}).get("rows", []) if "ms" in r}


def _header(report: Report) -> None:
    """Title, how to re-run, the training length and the data."""
    e, s, res, L = report.e, report.s, report.res, report.lines
    L.append(f"# DSA verification on the {'tiny' if e.scale == 'smoke' else 'small'} MoE, scale `{e.scale}`\n")
    if e.scale == "smoke":
        L.append("**CPU smoke run of the pipeline with the tiny model and tiny budgets: the numbers show the "
                 "pipeline works, they verify nothing about DSA.**\n")
    L.append(f"Re-run: `python experiments/verify_dsa.py --scale {e.scale}"
             f"{' --jobs 8' if e.s['bench'] else ''}` (resumes; `--stage a,b` runs some stages). "
             "The exact commands below write the run directory as `$RUN`. "
             f"Training length {s['train_length']}, top-k {s['topk']}.\n")
    chain = [st["scale"] for st in res.get("chain") or []]
    if chain:
        L.append("It continues the dense pretraining of "
                 + " -> ".join(f"`--scale {x} --stage corpus,pretrain`" for x in chain)
                 + ", run first in that order (each evaluated by `--stage eval --task pretrain`; this scale's "
                 "corpus stage builds its mixture from the first one's text).\n")
    c = res["corpus"]
    if c:
        L.append(f"Data: the running interpreter's standard library and site-packages (.py/.txt/.rst), "
                 f"{c['splits']['train']['tokens']:,} train / {c['splits']['valid']['tokens']:,} held-out tokens "
                 f"(split by file hash), BPE vocab {c.get('vocab_size')}.\n")
    t = res.get("tasks")
    if t:
        train = t["splits"]["train"]
        L.append(f"Training mixture (every phase): that text cut into documents of {t['seq_length']} tokens, "
                 f"{sum(train['task_documents'].values()):,} of {train['documents']:,} (ratio {t['ratio']}, seed "
                 f"{t['seed']}) with one of the tasks {', '.join(t['tasks'])} embedded in the training formats, "
                 f"{t['queries_per_document']} queries per document ({train['answer_tokens']:,} answer tokens, "
                 f"weighted {ANSWER_LOSS_WEIGHT:g} in the LM loss); "
                 "held-out loss and retrieval are measured on the held-out natural text.\n")


def _curriculum(report: Report) -> None:
    """The dense pretraining stages this run continues, each evaluated at its own length."""
    chain, L = report.res.get("chain") or [], report.lines
    if not chain:
        return
    L.append("## Pretraining curriculum\n")
    L.append("The dense pretraining continues the weights of shorter runs (`init_from`), each on its own task "
             "mixture of the same text and tokenizer; retrieval forms at short context first. Each stage "
             "evaluated after its training, exact match % (token accuracy %):\n")
    L.append("| stage | training length | lengths evaluated | training formats | held-out formats |")
    L.append("|---|---|---|---|---|")

    def cells(r, key):
        return ", ".join(f"{x}: {_fmt(v.get('exact'), '.0f')} ({_fmt(v.get('token'), '.0f')})"
                         for x, v in _by_length(r, key).items())

    for st in chain + [{"scale": report.e.scale, "train_length": report.s["train_length"],
                        "eval": report.ev.get("pretrain (dense)")}]:
        r = st["eval"]
        L.append(f"| `{st['scale']}` | {st['train_length']} | {', '.join(map(str, (r or {}).get('loss', {}))) or 'n/a'} "
                 f"| {cells(r, 'retrieval_train_formats') or 'n/a'} | {cells(r, 'retrieval') or 'n/a'} |")
    cmds = [st["command"] for st in chain if st.get("command")]
    if cmds:
        L.append("\nCommands of the earlier stages (each `$RUN` its own scale's directory):\n\n```\n"
                 + "\n".join(cmds) + "\n```\n")
    else:
        L.append("")


def _loss_at_lengths(report: Report) -> None:
    """Validation loss at several context lengths; arm A against the dense control."""
    e, s, res, ev = report.e, report.s, report.res, report.ev
    A, B, L, verdict = report.A, report.B, report.lines, report.verdict
    lengths = list(s["loss_lengths"])
    L.append("## Validation loss at several context lengths (held-out split, same target tokens at every length)\n")
    L.append("| arm | mode | " + " | ".join(str(x) for x in lengths) + " |")
    L.append("|---|---|" + "---|" * len(lengths))
    for arm, r in ev.items():
        L.append(f"| {arm} | {r['mode']} | " + " | ".join(_fmt(_get(r['loss'], x)) for x in lengths) + " |")
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


def _trainer_validation(report: Report) -> None:
    """The trainer's validation at the end of every arm (the same batches for all)."""
    if not report.ran_arms:
        return
    e, s, res = report.e, report.s, report.res
    L, verdict, trainer_val = report.lines, report.verdict, report.trainer_val
    ctrl = res["phases"].get("dense_control", {}).get("val_loss")
    L.append("## Validation loss at the end of each arm (the trainer's, training length, same validation batches)\n")
    L.append("Megatron's evaluation after the arm's last step: every arm starts from the same checkpoint with the "
             "same seed, so all of them (and the dense control) are scored on the same held-out batches "
             f"(eval.iters x global batch sequences of {s['train_length']} tokens).\n")
    L.append("| arm | phase | validation loss | vs dense control |")
    L.append("|---|---|---|---|")
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


def _retrieval_rows(report: Report, key: str) -> None:
    """One retrieval table (``key``: the evaluation's "retrieval" or "retrieval_train_formats"):
    exact match per arm, task and length, then all tasks with token accuracy and answer NLL."""
    s, ev, L = report.s, report.ev, report.lines
    rl = list(s["retrieval_lengths"])
    L.append("| arm | task | " + " | ".join(_length_label(x, s) for x in rl) + " |")
    L.append("|---|---|" + "---|" * len(rl))
    for arm, r in ev.items():
        if key not in r:
            continue  # evaluated before this table existed
        bt, bl = r[key]["by_task_length"], r[key]["by_length"]
        for task in TASKS:
            if task in bt:
                L.append(f"| {arm} | {task} | " + " | ".join(_fmt(_get(_get(bt[task], x) or {}, 'exact'), '.0f')
                                                           for x in rl) + " |")
        L.append(f"| {arm} | **all** (token acc.) | " + " | ".join(
            f"{_fmt(_get(_get(bl, x) or {}, 'exact'), '.0f')} ({_fmt(_get(_get(bl, x) or {}, 'token'), '.0f')})"
            for x in rl) + " |")
        if any((_get(bl, x) or {}).get("nll") is not None for x in rl):
            L.append(f"| {arm} | answer NLL (nats/token) | " + " | ".join(
                _fmt((_get(bl, x) or {}).get("nll"), ".3f") for x in rl) + " |")


def _max_exact(ev: dict, key: str) -> float | None:
    scores = [x["exact"] for r in ev.values() if key in r for x in r[key]["by_length"].values()]
    return max(scores) if scores else None


def _retrieval(report: Report) -> None:
    """The retrieval suite per arm, task and length; arm A against the dense control; then the
    same tasks in the training formats."""
    s, ev, A, B, L, verdict = report.s, report.ev, report.A, report.B, report.lines, report.verdict
    rl = list(s["retrieval_lengths"])
    train = report.e.training_family
    L.append("## Retrieval on held-out formats (exact match of the greedy answer, %)\n")
    L.append(f"The training mixture's tasks ({', '.join(TASKS)}) in formats it never shows: other wordings, keys of "
             f"another alphabet, distractor densities {'/'.join(map(str, HELDOUT.densities))} per 4096 tokens "
             f"(training: {'/'.join(map(str, train.densities))}), {HELDOUT.values_per_key[0]} values per key and "
             f"{HELDOUT.hops[0]}-hop chains (training: {'/'.join(map(str, train.values_per_key))} and "
             f"{'/'.join(map(str, train.hops))}). {s['retrieval_n']} items per task and length in held-out text, the "
             "asked fact at depths spread over 10-90%. Columns marked *extrap.* are longer than the training length "
             f"({s['train_length']}): extrapolation (plain RoPE) for every arm.\n")
    _retrieval_rows(report, "retrieval")
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
        for arm, r in ev.items():
            if r["mode"] != "sparse" or r is A:
                continue
            d = {x: _get(r["retrieval"]["by_length"], x)["exact"] - _get(B["retrieval"]["by_length"], x)["exact"]
                 for x in rl}
            L.append(f"- {arm} minus dense control (points): {', '.join(f'{x}: {v:+.1f}' for x, v in d.items())}")
        L.append("")
    held, in_dist = _max_exact(ev, "retrieval"), _max_exact(ev, "retrieval_train_formats")
    if held is not None and held < RETRIEVAL_FLOOR:
        verdict["retrieval"] = RETRIEVAL_UNINFORMATIVE
        L.append(f"Every evaluated model, dense ones included, scores below {RETRIEVAL_FLOOR:.0f}% at every length here "
                 f"(at most {held:.0f}%): at this training budget the suite does "
                 "not separate the arms by exact match (a 'within 2 points' verdict on it means nothing; the answer "
                 "NLL, where measured, still compares them)"
                 + ("; the training formats below say whether the models retrieve at all" if in_dist is not None
                    else "") + ".\n")
    if in_dist is not None:
        L.append("### The same tasks in the training formats (in-distribution formats, exact match %)\n")
        L.append(f"New instances of the tasks in the training mixture's own formats (wordings, key alphabet, "
                 f"densities, values per key, chain lengths), {s['retrieval_train_n']} per task and length, in the "
                 "same held-out text and at the same lengths. Not the target (the held-out formats above are); it "
                 "tells a model that retrieves but does not carry it to new formats from one that never learned to "
                 "retrieve.\n")
        _retrieval_rows(report, "retrieval_train_formats")
        if A and B and "retrieval_train_formats" in A and "retrieval_train_formats" in B and in_dist > 0:
            d = {x: _get(A["retrieval_train_formats"]["by_length"], x)["exact"]
                 - _get(B["retrieval_train_formats"]["by_length"], x)["exact"] for x in rl if x <= s["train_length"]}
            verdict["retrieval_train_formats"] = all(abs(v) <= TARGETS["retrieval_points"] for v in d.values())
            L.append(f"\nIn the training formats, A minus dense control (points, up to the training length): "
                     f"{', '.join(f'{x}: {v:+.1f}' for x, v in d.items())} -> within 2 points at every length: "
                     f"**{'yes' if verdict['retrieval_train_formats'] else 'no'}** (not the target; "
                     f"{s['retrieval_train_n']} items per task and length).")
        if in_dist == 0:
            L.append("\nEvery model scores 0% on the training formats too: none learned the tasks at this budget.\n")
        elif held < RETRIEVAL_FLOOR:
            L.append("\nThe models retrieve in the training formats but not in the held-out ones: they learned the "
                     "tasks' formats, not a retrieval that carries over.\n")
        else:
            L.append("")


def formats_table(formats: dict) -> list[str]:
    """The pretrained model's retrieval in the formats between the training family and the
    held-out one (measurements.stage_formats): exact match % per task, all tasks with token
    accuracy and answer NLL, each the mean over the lengths evaluated."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    lengths = [str(n) for n in formats["lengths"]]
    rows = ["| formats | " + " | ".join(TASKS) + " | all (token acc.) | answer NLL |",
            "|---|" + "---|" * (len(TASKS) + 2)]
    for label, r in formats["families"].items():
        bt, bl = r["by_task_length"], r["by_length"]
        cells = [_fmt(mean([(_get(bt.get(t, {}), n) or {}).get("exact") for n in lengths]), ".0f") for t in TASKS]
        exact = mean([(_get(bl, n) or {}).get("exact") for n in lengths])
        token = mean([(_get(bl, n) or {}).get("token") for n in lengths])
        nll = mean([(_get(bl, n) or {}).get("nll") for n in lengths])
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(exact, '.0f')} ({_fmt(token, '.0f')}) "
                    f"| {_fmt(nll, '.3f')} |")
    return rows


def formats_effects(formats: dict) -> dict[str, dict[str, float]]:
    """Points of exact match (all tasks, mean over lengths) each held-out difference costs alone
    (``only``: against the training formats) and gives back when it alone is put back to the
    training family's (``put_back``: against the held-out formats)."""
    def exact(label):
        bl = formats["families"][label]["by_length"]
        return sum(_get(bl, n)["exact"] for n in formats["lengths"]) / len(formats["lengths"])

    train, held = exact("training formats"), exact("held-out formats")
    factors = [k[len("only "):] for k in formats["families"] if k.startswith("only ")]
    return {"only": {f: exact(f"only {f}") - train for f in factors},
            "put_back": {f: exact(f"all but {f}") - held for f in factors}}


FORMATS_INTRO = ("The pretrained dense model on items between its training formats and the held-out ones: its "
                 "training family with one of the held-out differences (`only ...`), and the held-out formats with "
                 "one difference put back to the training family's (`all but ...`). Exact match %, each the mean "
                 "over the retrieval lengths up to the training length (`python experiments/verify_dsa.py --scale "
                 "SCALE --stage formats`).\n")


def formats_lines(scale: str, formats: dict) -> list[str]:
    """One pretrained stage's formats table and what each difference costs and gives back."""
    eff = formats_effects(formats)
    return [f"`{scale}` (training family `{formats['training_family']}`; lengths "
            f"{', '.join(map(str, formats['lengths']))}; {formats['items_per_task_and_length']} items per task and "
            "length):\n",
            *formats_table(formats),
            "\nAlone, each difference costs (points against the training formats): "
            + ", ".join(f"{k} {v:+.0f}" for k, v in eff["only"].items())
            + ". Put back alone into the held-out formats, each gives back: "
            + ", ".join(f"{k} {v:+.0f}" for k, v in eff["put_back"].items()) + ".\n"]


def _formats(report: Report) -> None:
    """Why the held-out formats fail: each pretrained stage's retrieval with HELDOUT's differences
    from its training family one at a time."""
    stages = [(st["scale"], st["formats"]) for st in report.res.get("chain") or [] if st.get("formats")]
    if report.res.get("formats"):
        stages.append((report.e.scale, report.res["formats"]))
    if not stages:
        return
    report.lines += ["### Which difference of the held-out formats the model does not carry over\n", FORMATS_INTRO]
    for scale, formats in stages:
        report.lines += formats_lines(scale, formats)


def write_formats(e: Study) -> Path | None:
    """The formats stage's result on its own: formats_<scale>.md and .json in the report directory."""
    formats = e.load_json("eval/formats_pretrain.json", None)
    if formats is None:
        return None
    rdir = e.report_dir
    rdir.mkdir(parents=True, exist_ok=True)
    md = rdir / f"formats_{e.scale}.md"
    lines = [f"# Held-out formats, one difference at a time: `{e.scale}`\n", FORMATS_INTRO,
             *formats_lines(e.scale, formats)]
    (rdir / f"formats_{e.scale}.json").write_text(to_json(formats) + "\n")
    md.write_text("\n".join(lines) + "\n")
    print(f"report: {md}")
    return md


def _length_label(length: int, s: dict) -> str:
    return f"{length} *extrap.*" if length > s["train_length"] else str(length)


def retrieval_summary(report: "Report") -> dict:
    """The headline numbers: per arm, held-out loss at the training length and retrieval exact
    match (%) per context length on the held-out items (lengths beyond training listed)."""
    s, res = report.s, report.res
    arms = {}
    for label, r in report.ev.items():
        arms[label] = {
            "phase": r["phase"], "mode": r["mode"],
            "heldout_loss_at_train_length": _get(r["loss"], s["train_length"]),
            "retrieval_exact_pct": {str(x): (_get(r["retrieval"]["by_length"], x) or {}).get("exact")
                                    for x in s["retrieval_lengths"]},
        }
        if "retrieval_train_formats" in r:  # beside the headline: the training formats
            arms[label]["retrieval_train_formats_exact_pct"] = {
                str(x): (_get(r["retrieval_train_formats"]["by_length"], x) or {}).get("exact")
                for x in s["retrieval_lengths"]}
    return {"scale": res["scale"], "train_length": s["train_length"],
            "retrieval_lengths": list(s["retrieval_lengths"]),
            "extrapolation_lengths": [x for x in s["retrieval_lengths"] if x > s["train_length"]],
            "retrieval_items": f"{s['retrieval_n']} per task and length, tasks {', '.join(TASKS)}, held-out formats",
            "retrieval_train_formats_items": f"{s['retrieval_train_n']} per task and length, the same tasks in the "
                                             "training formats (in-distribution; not the target)",
            "arms": arms, "verdict": report.verdict}


def _warmup_steps(report: Report, arm: str) -> int:
    """The steps the arm's warm-up ran (its logged KL), else what the scale's recipe gives it."""
    return report.res["warmup"].get(arm, {}).get("steps") or report.e.warmup_iters * ARMS[arm][3]


def warmup_targets(report: Report, arm: str) -> dict:
    """The warm-up targets of one arm: the KL falls >= 5x, and the indexer's top-k recalls >= 90%
    of what the attention's own top-k holds (the oracle: no indexer can recall more), both on
    held-out text at the training length with the arm's k. ``ok`` is None where the recall stage
    did not measure the arm."""
    s, res = report.s, report.res
    w = res["warmup"].get(arm, {})
    reached = _recall_at(res["recall"], arm, s["train_length"], s["topk"], "mean_nontrivial")
    ceiling = _recall_at(res["recall"], arm, s["train_length"], s["topk"], "oracle_mean_nontrivial")
    share = reached / ceiling if reached is not None and ceiling else None
    kl_ok = (w.get("kl_drop") or 0) >= TARGETS["kl_drop"]
    ok = None if share is None else (kl_ok and share >= TARGETS["recall"])
    return {"kl_drop": w.get("kl_drop"), "recall": reached, "oracle": ceiling, "recall_share_of_oracle": share,
            "ok": ok}


def _warmup(report: Report) -> None:
    """The warm-up's KL and recall per indexer layout and warm-up length, against the oracle."""
    if not report.ran_arms:
        return
    s, res, L, verdict = report.s, report.res, report.lines, report.verdict
    L.append("## Warm-up: indexer KL and top-k recall of the dense attention mass\n")
    L.append("| indexer layout | warm-up steps | KL start | KL end | drop | recall start | recall end | "
             "held-out recall / oracle | targets (drop >= 5x, recall >= 90% of the oracle) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    # the objective arms' loss is not the KL: their own section below
    for v in dict.fromkeys(a for a in (*SHARING_ARMS, *WARMUP_LENGTH_ARMS) if a in res["warmup"]):
        w, t = res["warmup"][v], warmup_targets(report, v)
        if v == "per_layer":
            verdict["warmup"] = t["ok"]
        share = (f"{t['recall']:.3f} / {t['oracle']:.3f} = {t['recall_share_of_oracle']:.0%}"
                 if t["recall_share_of_oracle"] is not None else "not measured")
        L.append(f"| {v} | {_warmup_steps(report, v)} | {_fmt(w['kl_start'], '.4g')} | "
                 f"{_fmt(w['kl_end'], '.4g')} | {_fmt(w['kl_drop'], '.1f')}x | {_fmt(w['recall_start'], '.3f')} | "
                 f"{_fmt(w['recall_end'], '.3f')} | {share} | "
                 f"{MET[t['ok']]} |")
    ceiling = _recall_at(res["recall"], "pretrain", s["train_length"], s["topk"], "oracle_mean_nontrivial")
    if ceiling is not None:
        verdict["recall_oracle"] = ceiling
        L.append(f"\nThe ceiling: on held-out text at the training length with the same k, the dense attention's own "
                 f"top-k holds {ceiling:.3f} of its mass (the oracle recall, section below): no indexer can recall "
                 "more, so the recall target is a share of it.")
    L.append("\n`recall start` / `recall end`: measured on each training batch with the arm's own top-k (k/S = "
             f"{s['topk'] / s['train_length']:.4g}); rows with fewer than k causal keys count as fully recalled, "
             "as in training. `held-out recall / oracle`: the recall stage's, rows with more than k causal keys "
             "only.\n")


def _recall_after_warmup(report: Report) -> None:
    """Top-k recall after warm-up at several lengths and k/S, with the oracle."""
    s, res, L = report.s, report.res, report.lines
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
        borrowed_rows = []
        for task in res["recall"]:
            entries = [_recall_at(res["recall"], task, L_, max(1, round(ratio * L_)), "borrowed") for L_, ratio in cols]
            if task == "pretrain" or not any(entries):
                continue
            first = next(b for b in entries if b)
            reusing, sources = first["layers"], sorted(set(first["sources"]))
            vals = []
            for b in entries:
                got, best = (b or {}).get("mean_nontrivial"), (b or {}).get("oracle_mean_nontrivial")
                vals.append(_fmt(got, ".3f") + (f" ({got / best:.0%})" if got is not None and best else ""))
            borrowed_rows.append(f"| {task}: layers {', '.join(map(str, reusing))} on the selection of layer "
                                 f"{', '.join(map(str, sources))} | " + " | ".join(vals) + " |")
        L += borrowed_rows
        oracle = _oracle_row(res["recall"], cols)
        if oracle:
            L.append("| **oracle** (the attention's own top-k) | " + " | ".join(_fmt(v, ".3f") for v in oracle) + " |")
            L.append("\n`oracle`: the share of the attention mass held by the k keys where it is largest, the most any "
                     "indexer's top-k can recall (the main model is the pretrained one in every arm after warm-up, so "
                     "one row serves all). In brackets: each arm's recall as a share of its own oracle (the arms that reuse "
                     "a selection every 2 / 4 layers are measured on their selecting layers only, whose oracle is "
                     "lower). A recall target above the oracle cannot be met by any indexer.")
        if borrowed_rows:
            L.append("\n`layers ... on the selection of layer ...`: the layers that reuse an earlier layer's top-k, "
                     "the share of their OWN attention mass inside the selection they borrow; in brackets, as a "
                     "share of their own oracle.")
        L.append("")


def _mean_exact(r: Optional[dict], key: str, max_length: Optional[int] = None) -> Optional[float]:
    """Mean exact match % of one evaluation's retrieval table over its lengths (up to
    ``max_length``); None where the evaluation or the table is missing."""
    xs = [v["exact"] for length, v in _by_length(r, key).items() if max_length is None or int(length) <= max_length]
    return sum(xs) / len(xs) if xs else None


def _difference_sd(a: float, b: float, items: int) -> float:
    """Sampling s.d., in points, of the difference of two exact-match rates ``a`` and ``b`` (%),
    each measured on ``items`` items."""
    pa, pb = a / 100, b / 100
    return 100 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / max(items, 1))


def _sharing(report: Report) -> None:
    """One indexer for all layers (and one selection every N layers) against one per layer."""
    if not report.ran_arms:
        return
    e, s, res, ev = report.e, report.s, report.res, report.ev
    B, L, verdict, trainer_val, speed = report.B, report.lines, report.verdict, report.trainer_val, report.speed
    L.append("\n## One indexer for all layers?\n")
    L.append("| arm | val. loss at training length | vs dense control | retrieval exact (mean over lengths) | "
             "training formats exact (mean up to the training length) | warm-up KL end | recall end | "
             "warm-up step ms | sparse step ms |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    # benchmarks/bench_model_step.py's arm of each layout (it has none for the GLM-5.2 pattern)
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
        ret = _mean_exact(r, "retrieval")
        ret_train = _mean_exact(r, "retrieval_train_formats", s["train_length"])
        rows[v] = (loss, ret, ret_train)
        ref = trainer_val.get("dense_control") if loss_src.get("shared") else (_get(B["loss"], s["train_length"]) if B else None)
        vs = f"{100 * (loss - ref) / ref:+.2f}%" if loss is not None and ref else "n/a"
        L.append(f"| {arm} | {_fmt(loss)} | {vs} | {_fmt(ret, '.1f')} | {_fmt(ret_train, '.1f')} | "
                 f"{_fmt(w.get('kl_end'), '.4g')} | "
                 f"{_fmt(w.get('recall_end'), '.3f')} | {_fmt(_bench_ms(speed, 'warmup', suffix.get(v)), '.0f')} | "
                 f"{_fmt(_bench_ms(speed, 'sparse', suffix.get(v)), '.0f')} |")
    if loss_src.get("shared"):
        L.append("\nValidation loss here: the trainer's end-of-arm validation (the evaluation stage did not cover "
                 "every arm).\n")
    if "pattern" in rows:
        types = e.layout("pattern")["mdsa_indexer_types"]
        L.append("\nGLM-5.2 pattern: per layer " + ", ".join(f"{i + 1} {t}" for i, t in enumerate(types))
                 + " (`mdsa_indexer_types`; a shared layer has no indexer and attends to the last full layer's "
                 "top-k).")
    held_out_uninformative = verdict.get("retrieval") == RETRIEVAL_UNINFORMATIVE
    for v, what in (("shared", "one shared indexer"), ("pattern", "the GLM-5.2 pattern")):
        if not (rows.get("per_layer", (None,))[0] and rows.get(v, (None,))[0]):
            continue
        (lp, rp, tp), (ls, rs, ts) = rows["per_layer"], rows[v]
        drel = (ls - lp) / lp
        what_ret, items = "retrieval", s["retrieval_n"] * len(TASKS) * len(s["retrieval_lengths"])
        if held_out_uninformative and tp is not None and ts is not None:
            # no model answers the held-out formats: the training formats are what tells the arms apart
            rp, rs, what_ret = tp, ts, (f"retrieval in the training formats (on the held-out formats every model "
                                        f"is below {RETRIEVAL_FLOOR:.0f}%)")
            items = s["retrieval_train_n"] * len(TASKS) * sum(x <= s["train_length"] for x in s["retrieval_lengths"])
        ret_ok, ret_txt = True, "retrieval not measured"
        if rp is not None and rs is not None:
            # a few hundred items at most: a 2-point margin is below their sampling noise
            sd = _difference_sd(rp, rs, items)
            ret_ok = abs(rs - rp) <= max(TARGETS["retrieval_points"], 2 * sd)
            ret_txt = f"{what_ret} {rs - rp:+.1f} points (sampling s.d. of the difference {sd:.1f}, {items} items each)"
        same = abs(drel) <= TARGETS["loss_rel"] and ret_ok
        verdict[v] = same
        L.append(f"\n**Answer:** {what} vs one indexer per layer: validation loss {100 * drel:+.2f}%, {ret_txt} -> "
                 f"{'as good: loss within 1%, retrieval within 2 points or two s.d.' if same else 'not as good'} "
                 f"at this scale and budget" + (" (smoke run: no conclusion)." if e.scale == "smoke" else ".") + "\n")


def _warmup_length(report: Report) -> None:
    """Per-layer indexers after warm-ups of several lengths: how much of what the dense model
    retrieves the selection keeps as the indexers match the attention for longer."""
    if not report.ran_arms:
        return
    e, s, res, ev, B, L, verdict = report.e, report.s, report.res, report.ev, report.B, report.lines, report.verdict
    arms = [a for a in WARMUP_LENGTH_ARMS if a in res["arms"]]
    if len(arms) < 2:
        return
    rl = [x for x in s["retrieval_lengths"] if x <= s["train_length"]]
    ref = _get(B["loss"], s["train_length"]) if B else None
    L.append("\n## How long a warm-up?\n")
    L.append("Per-layer indexers, the same sparse phase after warm-ups of several lengths. Retrieval: exact match % "
             "on the training formats (held-out formats: token accuracy %), up to the training length.\n")
    L.append("| arm | warm-up steps | KL end | recall end | held-out loss vs dense control | training formats "
             + " / ".join(map(str, rl)) + " | held-out formats " + " / ".join(map(str, rl)) + " | warm-up targets |")
    L.append("|---|---|---|---|---|---|---|---|")

    def at(r, key, field):
        return " / ".join(_fmt((_get(_by_length(r, key), x) or {}).get(field), ".0f") for x in rl)

    if B:
        L.append(f"| B: dense control | | | | | {at(B, 'retrieval_train_formats', 'exact')} | "
                 f"{at(B, 'retrieval', 'token')} | |")
    by_arm = {}
    for a in arms:
        r, w, steps, t = ev.get(ARMS[a][0]), res["warmup"].get(a, {}), _warmup_steps(report, a), warmup_targets(report, a)
        loss = _get(r["loss"], s["train_length"]) if r else None
        rel = (loss - ref) / ref if loss is not None and ref else None
        points = None
        if r and B and "retrieval_train_formats" in r and "retrieval_train_formats" in B:
            points = {str(x): _get(r["retrieval_train_formats"]["by_length"], x)["exact"]
                      - _get(B["retrieval_train_formats"]["by_length"], x)["exact"] for x in rl}
        by_arm[a] = {"warmup_steps": steps, "loss_rel": rel,
                     "loss": None if rel is None else abs(rel) <= TARGETS["loss_rel"],
                     "warmup": t["ok"], "recall_share_of_oracle": t["recall_share_of_oracle"], "kl_drop": t["kl_drop"],
                     "retrieval_train_formats_points": points}
        L.append(f"| {ARMS[a][0]} | {steps} | {_fmt(w.get('kl_end'), '.4g')} | {_fmt(w.get('recall_end'), '.3f')} | "
                 f"{'' if rel is None else f'{100 * rel:+.2f}%'} | {at(r, 'retrieval_train_formats', 'exact')} | "
                 f"{at(r, 'retrieval', 'token')} | {MET[t['ok']]} |")
    verdict["warmup_length"] = by_arm
    L.append("")
    for a, v in by_arm.items():
        pts = v["retrieval_train_formats_points"]
        L.append(f"- {ARMS[a][0]} ({v['warmup_steps']} steps): held-out loss "
                 + ("n/a" if v["loss_rel"] is None else f"{100 * v['loss_rel']:+.2f}% ({'within' if v['loss'] else 'not within'} 1%)")
                 + "; training-format retrieval minus dense control "
                 + ("n/a" if pts is None else ", ".join(f"{x}: {p:+.0f}" for x, p in pts.items()) + " points")
                 + f"; warm-up targets {MET[v['warmup']]}.")
    enough = [a for a, v in by_arm.items() if v["loss"] and v["warmup"]]
    if enough:
        L.append(f"\nThe shortest warm-up here that meets the loss and warm-up targets: "
                 f"{by_arm[enough[0]]['warmup_steps']} steps ({ARMS[enough[0]][0]}).")
    L.append("")


def _bench_ms(speed: dict, phase: str, suffix: str | None):
    return None if suffix is None else speed.get(phase + suffix, {}).get("ms")


def _objectives(report: Report) -> None:
    """The warm-up objectives compared after the same sparse phase."""
    if not report.ran_arms:
        return
    s, res, ev = report.s, report.res, report.ev
    L, trainer_val, speed = report.lines, report.trainer_val, report.speed
    objs = [a for a in OBJECTIVE_ARMS if a in res["arms"]]
    if len(objs) > 1:
        L.append("## Why KL? Warm-up objectives\n")
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


def _speed(report: Report) -> None:
    """Step cost of each arm side by side, and the trainer's throughput per phase."""
    res, L, speed = report.res, report.lines, report.speed
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


def _report_step(report: Report) -> None:
    """The report's 16 x 128K warm-up step: one measured micro-batch and the whole step."""
    res, L = report.res, report.lines
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


def _recipe128k(report: Report) -> None:
    """The report's recipe at 1 x 128K (warm-up, then sparse), as far as its pieces ran."""
    e, L, runs = report.e, report.lines, report.res.get("recipe128k") or {}
    L.append("## The report's recipe at 1 x 128K\n")
    L.append("The report's warm-up (1000 steps, lr 1e-3, indexers only) and sparse phase (1000 steps, lr 7.3e-6, "
             "k 2048) at batch 1 on one GPU, from this run's dense pretraining on its natural text "
             "(`configs/recipes/report_{warmup,sparse}_b1.yaml`). Each call of "
             f"`python experiments/verify_dsa.py --scale {e.scale} --stage recipe128k` trains one piece of about "
             "20 minutes and the next continues from the phase's checkpoint.\n")
    if not runs:
        L.append("Not run yet at this scale.\n")
        return
    L.append("| phase | steps saved / recipe | KL start | KL end | drop | recall start | recall end | tokens/s |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        L.append(f"| {name.split('_', 1)[1]} | {r['saved_step']} / {r['steps']} | {_fmt(r['kl_start'], '.4g')} | "
                 f"{_fmt(r['kl_end'], '.4g')} | {_fmt(r['kl_drop'], '.1f')}x | {_fmt(r['recall_start'], '.3f')} | "
                 f"{_fmt(r['recall_end'], '.3f')} | {_fmt(r['tokens_per_s'], ',.0f')} |")
    L.append("\nStart / end: means of the first and last ten logged steps. The sparse phase's KL is over the "
             "selected keys; recall is logged in the warm-up only (it needs the dense attention).\n")
    if "128k" in report.files:
        L.append(f"Curves: `{report.files['128k']}` (under Plots).\n")


def _appendix(report: Report) -> None:
    """Plots, the exact commands, the configs and the discussion written after the run."""
    e, s, res, L, files = report.e, report.s, report.res, report.lines, report.files
    L.append("## Plots\n")
    for k, f in files.items():
        L.append(f"![{k}]({f})")
    L.append("\n## Exact commands\n")
    L.append("```")
    L += [f"# {k}\n{v}" for k, v in res["commands"].items()]
    L.append("```\n")
    L.append("## Configs\n")
    for name in ("h200_pretrain", "h200_warmup", "h200_sparse", "h200_dense_control", "report_warmup", "report_sparse",
                 "report_warmup_b1", "report_sparse_b1"):
        L.append(f"<details><summary>configs/recipes/{name}.yaml</summary>\n\n```yaml\n"
                 f"{(RECIPES / (name + '.yaml')).read_text()}```\n</details>\n")
    if s["overrides"].get("all"):
        L.append("Overrides applied to every phase: `" + " ".join(s["overrides"]["all"]) + "`\n")
    notes = NOTES / f"notes_{e.scale}.md"
    if notes.is_file():
        L.append("## Discussion (written after the run)\n")
        L.append(notes.read_text().strip() + "\n")


def _conclusions(report: Report) -> None:
    """One line per target."""
    L, verdict = report.lines, report.verdict
    L.append("## Conclusions\n")
    names = {"loss": "validation loss A vs B within 1%", "retrieval": "retrieval within 2 points of dense",
             "warmup": "warm-up KL drop >= 5x and recall >= 90% of the oracle (per-layer)", "shared": "shared indexer as good as per-layer",
             "pattern": "GLM-5.2 pattern as good as per-layer"}
    if "retrieval_train_formats" in verdict:
        names = {**names, "retrieval_train_formats": "retrieval in the training formats within 2 points of dense "
                                                     "(not the target)"}
    steps_a = verdict.get("warmup_length", {}).get("per_layer", {}).get("warmup_steps")
    if steps_a:  # beside the longer warm-ups below, say which warm-up arm A had
        for k in ("loss", "warmup"):
            names[k] += f" (arm A: {steps_a} warm-up steps)"
    for k, text in names.items():
        L.append(f"- {text}: **{YES.get(verdict.get(k), verdict.get(k))}**")
    for a, v in verdict.get("warmup_length", {}).items():
        if a != "per_layer":
            L.append(f"- {ARMS[a][0]} ({v['warmup_steps']} warm-up steps): loss within 1% **"
                     f"{YES[v['loss']]}**, warm-up targets **"
                     f"{YES[v['warmup']]}**")
    L.append("\nThe token budgets here are a small fraction of the report's (see the configs); conclusions hold for "
             "this scale only. Retrieval at lengths beyond the training length measures extrapolation.\n")


SECTIONS = (_header, _curriculum, _loss_at_lengths, _trainer_validation, _retrieval, _formats, _warmup,
            _recall_after_warmup, _sharing, _warmup_length, _objectives, _speed, _report_step, _recipe128k, _appendix,
            _conclusions)


def write_report(e: Study) -> Path:
    """verification.md + PNGs + verification.json (the summary) + verification_summary.json (the
    headline numbers) in the report directory; the
    whole results (per-step series too) as results.json in the run directory."""
    res = collect(e)
    rdir = e.report_dir
    rdir.mkdir(parents=True, exist_ok=True)
    report = Report(e, res, plots(res, rdir))
    for section in SECTIONS:
        section(report)
    res["trainer_val"] = report.trainer_val
    res["verdict"] = report.verdict
    (rdir / "verification.md").write_text("\n".join(report.lines) + "\n")
    (rdir / "verification.json").write_text(to_json(summary(res)) + "\n")
    (rdir / "verification_summary.json").write_text(to_json(retrieval_summary(report)) + "\n")
    e.save_json("results.json", res)
    print(f"report: {rdir / 'verification.md'}")
    return rdir / "verification.md"
