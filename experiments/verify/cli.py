"""The study's command line: which stages run, and each per-arm stage's tasks up to --jobs at once."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from experiments.verify import measurements, stages
from experiments.verify.report import write_formats, write_report
from experiments.verify.settings import ARM_STAGES, ARMS, EXPLICIT_STAGES, REPO, SCALES, STAGES
from experiments.verify.study import Study

ENTRY = REPO / "experiments" / "verify_dsa.py"


def stage_tasks(e: Study, stage: str) -> list[str]:
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


def run_task(e: Study, stage: str, task: str) -> None:
    {"warmup": stages.stage_warmup, "sparse": stages.stage_sparse, "recall": measurements.stage_recall,
     "eval": measurements.stage_eval}[stage](e, task)


def run_arm_stage(e: Study, args, stage: str) -> list[str]:
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
        cmd = [sys.executable, str(ENTRY), "--scale", e.scale, "--out", str(e.out),
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
    p = argparse.ArgumentParser(prog="python experiments/verify_dsa.py",
                                description="Verify DSA on the small MoE (experiments/verify).")
    p.add_argument("--scale", choices=tuple(SCALES), default="h200")
    p.add_argument("--stage", default="all", help=f"'all' or comma-separated stages of: {','.join(STAGES)} "
                                                  f"(and, only when named: {','.join(EXPLICIT_STAGES)})")
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
    chosen = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    bad = [st for st in chosen if st not in STAGES + EXPLICIT_STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; stages: {','.join(STAGES + EXPLICIT_STAGES)}")
    e = Study(args)
    if args.task is not None:
        if len(chosen) != 1 or args.stage not in ARM_STAGES or args.task not in stage_tasks(e, args.stage):
            p.error(f"--task {args.task!r} is not a task of stage {args.stage!r}")
        e.out.mkdir(parents=True, exist_ok=True)
        run_task(e, args.stage, args.task)
        return 0
    e.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed = {}
    for st in chosen:
        print(f"\n##### stage {st} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if st == "corpus":
            stages.stage_corpus(e)
        elif st == "speed":
            measurements.stage_speed(e)
        elif st == "pretrain":
            stages.stage_pretrain(e)
        elif st in ARM_STAGES:
            bad = run_arm_stage(e, args, st)
            if bad:
                failed[st] = bad
        elif st == "report":
            write_report(e)
        elif st == "bench128k":
            measurements.stage_bench128k(e)
        elif st == "step128k":
            measurements.stage_step128k(e)
        elif st == "formats":
            measurements.stage_formats(e)
            write_formats(e)
        elif st == "recipe128k":
            stages.stage_recipe128k(e)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if failed:
        print(f"error: failed tasks: {failed}")
        return 1
    return 0
