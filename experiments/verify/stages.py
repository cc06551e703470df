"""The study's training stages: corpus, dense pretraining, each arm's warm-up and sparse phase.

The corpus stage builds the natural-text corpus (``data_text``) and from it the training
mixture every phase reads (``data``: the text with the long-range tasks of
``megatron_dsa.data.tasks`` embedded, built for the training length; the recipes select it
with ``data.corpus: tasks``).

Every training phase is ``python -m megatron_dsa.train.cli --config <recipe> key=value ...``
run by the library's phase runner (``megatron_dsa.train.runner``), printed before it runs and
recorded beside its output so the report can show it.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import time
from pathlib import Path

from experiments.verify.settings import ARMS, RECIPES, SHARING_ARMS
from experiments.verify.study import Study, chain_start, echo, link_copy
from megatron_dsa.data import DataError, build_corpus, build_task_corpus, check_corpus_for_run, load_manifest
from megatron_dsa.train import runner
from megatron_dsa.train.config import load_config
from megatron_dsa.train.preflight import TRACKER_FILE, preflight, write_run_file


def stage_corpus(e: Study) -> None:
    _text_corpus(e)
    try:
        if not e.force:
            manifest = check_corpus_for_run(e.data, "tasks", e.s["train_length"])
            if all(manifest.get(k) == v for k, v in e.s["tasks"].items()):  # older manifests lack some keys
                print(f"corpus: reusing the task mixture {e.data}")
                return
    except DataError:
        pass
    t0 = time.perf_counter()
    manifest = build_task_corpus(e.data, e.text_data, e.s["train_length"], overwrite=True, **e.s["tasks"])
    train = manifest["splits"]["train"]
    print(f"corpus: task mixture of {train['documents']:,} training documents of {e.s['train_length']} tokens, "
          f"{sum(train['task_documents'].values()):,} with tasks ({train['answer_tokens']:,} answer tokens) "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    e.save_json("tasks_info.json", {k: v for k, v in manifest.items() if k != "base"})


def _text_corpus(e: Study) -> None:
    if e.init_dir is not None:  # the text (and tokenizer) of the run this one continues
        try:
            load_manifest(e.text_data)
        except DataError as error:
            raise SystemExit(f"error: --scale {e.scale} reads the text of --scale {chain_start(e.scale)}: run its "
                             f"corpus stage first ({error})") from None
        print(f"corpus: the text and tokenizer of {e.text_data}")
        return
    try:
        if not e.force:
            load_manifest(e.text_data)
            print(f"corpus: reusing {e.text_data}")
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
    # Up to half the budget from the standard library, the rest from site-packages, linked into
    # one source tree: a machine whose standard library is small still gets the whole budget.
    for tag, root in (("stdlib", stdlib), ("site_packages", site)):
        cap = budget // 2 if tag == "stdlib" else budget - n_bytes
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
    manifest = build_corpus(e.text_data, src, e.s["vocab_size"], max_bytes=n_bytes + 1,
                            valid_fraction=e.s["valid_fraction"], overwrite=True)
    shutil.rmtree(src, ignore_errors=True)
    print(f"corpus: {manifest['splits']['train']['tokens']:,} train / {manifest['splits']['valid']['tokens']:,} "
          f"held-out tokens, vocab {manifest['vocab_size']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    e.save_json("corpus_info.json", {"stdlib": str(stdlib), "site_packages": str(site), **manifest})


def phase_overrides(e: Study, name: str, kind: str, extra: list[str]) -> list[str]:
    """A phase's overrides: where it reads and writes, the scale's settings, then ``extra``."""
    d = e.phase_dir(name)
    overrides = [f"data.dir={e.data}", f"checkpoint.save={d / 'ckpt'}", f"logging.tensorboard_dir={d / 'tb'}"]
    return overrides + e.s["overrides"].get("all", []) + e.s["overrides"].get(kind, []) + extra


def phase_cmd(e: Study, name: str, recipe: str, kind: str, extra: list[str]) -> list[str]:
    return runner.phase_command(RECIPES / recipe, phase_overrides(e, name, kind, extra))


def run_phase(e: Study, name: str, cmd: list[str], prepare=None) -> None:
    """Run one phase into its directory (``prepare`` first), unless it is done already."""
    d = e.phase_dir(name)
    if e.done(name):
        print(f"[{name}] done, skipped ({d})")
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    if prepare is not None:
        prepare()
    (d / "command.json").write_text(json.dumps(echo(cmd)) + "\n")
    print(f"\n=== {name}: {echo(cmd)}", flush=True)
    seconds = runner.run_phase(cmd, d / "train.log", name)
    (d / "DONE").write_text(json.dumps({"seconds": seconds}) + "\n")
    print(f"[{name}] finished in {seconds:.0f} s", flush=True)


def need(e: Study, phase: str) -> None:
    if not (e.phase_dir(phase) / "DONE").is_file():
        raise SystemExit(f"error: {phase} has not finished (run its stage first): {e.phase_dir(phase)}")


def _overrides(fields: dict) -> list[str]:
    """``model.overrides.<field>=<value>``; a list in YAML's flow form without quotes or spaces
    (``[full,shared]``), so the echoed command stays one plain word per override."""
    def value(v):
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else v
    return [f"model.overrides.{k}={value(v)}" for k, v in fields.items()]


def _layout_name(e: Study, arm: str) -> str:
    """Arms with the same indexer layout share the relabelled pretrain checkpoint."""
    return next(a for a in SHARING_ARMS if e.layout(a) == e.layout(arm))


def stage_pretrain(e: Study) -> None:
    extra, prepare = [], None
    if e.init_dir is not None:
        # Continue another scale's dense pretraining: its checkpoint copied into this phase's (a
        # real copy: this run may save an iteration of the same number), loaded by Megatron's
        # --finetune as weights only (iteration 0, fresh optimizer), as the dense control starts.
        src = e.init_dir / "pretrain"
        if not (src / "DONE").is_file():
            raise SystemExit(f"error: --scale {e.scale} continues the pretraining of --scale {e.s['init_from']}, "
                             f"which has not finished: {src}")
        extra = ["megatron.finetune=true"]
        prepare = lambda: shutil.copytree(src / "ckpt", e.phase_dir("pretrain") / "ckpt")  # noqa: E731
    run_phase(e, "pretrain", phase_cmd(e, "pretrain", "h200_pretrain.yaml", "pretrain", extra), prepare=prepare)


def _relabelled_pretrain(e: Study, arm: str) -> Path:
    """The pretrain checkpoint, labelled for a model with another indexer layout.

    Pretraining runs dense: the indexers get no gradient and keep their initialisation, so the
    non-indexer weights are all the arms share. Loading the per-layer checkpoint into a shared /
    every-N-layers model reads a subset of its tensors (dist checkpointing ignores the unused
    indexer tensors); only the run record (phase + shape, checked by the trainer's preflight)
    must name the new layout."""
    base = e.phase_dir("pretrain") / "ckpt"
    variant = _layout_name(e, arm)
    if variant == "per_layer":
        return base
    dst = e.phase_dir(f"pretrain_{variant}") / "ckpt"
    marker = dst.parent / "DONE"
    if marker.is_file() and not e.force:
        return dst
    shutil.rmtree(dst.parent, ignore_errors=True)
    overrides = phase_overrides(e, f"pretrain_{variant}", "pretrain", _overrides(e.layout(arm)))
    cfg = load_config(RECIPES / "h200_pretrain.yaml", overrides)
    plan = preflight(cfg, check_flags=False)  # dst does not exist yet
    link_copy(base, dst)
    write_run_file(plan)
    marker.write_text("relabelled copy of pretrain/ckpt\n")
    print(f"[pretrain_{variant}] pretrain checkpoint relabelled for {e.layout(arm)} -> {dst}")
    return dst


def stage_warmup(e: Study, arm: str) -> None:
    need(e, "pretrain")
    src = _relabelled_pretrain(e, arm)
    warm = f"warmup_{arm}"
    extra = _overrides({**e.layout(arm), **ARMS[arm][2]}) + [f"checkpoint.load_from={src}"]
    if ARMS[arm][3] != 1:  # a longer warm-up: the scale's steps times the arm's factor
        iters = e.warmup_iters * ARMS[arm][3]
        extra += [f"train.iters={iters}", f"eval.interval={iters}", f"checkpoint.interval={iters}"]
    run_phase(e, warm, phase_cmd(e, warm, "h200_warmup.yaml", "warmup", extra))


def stage_sparse(e: Study, arm: str) -> None:
    if arm == "dense_control":  # arm B
        need(e, "pretrain")
        name = "dense_control"
        cmd = phase_cmd(e, name, "h200_dense_control.yaml", "dense_control", [])
        run_phase(e, name, cmd,
                  prepare=lambda: link_copy(e.phase_dir("pretrain") / "ckpt", e.phase_dir(name) / "ckpt"))
        return
    warm = f"warmup_{arm}"
    need(e, warm)
    sparse = f"sparse_{arm}"
    extra = _overrides(e.layout(arm)) + [f"checkpoint.load_from={e.phase_dir(warm) / 'ckpt'}"]
    run_phase(e, sparse, phase_cmd(e, sparse, "h200_sparse.yaml", "sparse", extra))


# The report's recipe at batch 1 on one GPU, each phase resumable in pieces: (phase directory,
# recipe, the directory whose checkpoint it starts from).
RECIPE_128K = (("recipe128k_warmup", "report_warmup_b1.yaml", "pretrain"),
               ("recipe128k_sparse", "report_sparse_b1.yaml", "recipe128k_warmup"))


def checkpoint_iteration(ckpt: Path) -> int:
    """The last iteration saved under a phase's checkpoint directory (0 before its first save)."""
    tracker = ckpt / TRACKER_FILE
    return int(tracker.read_text().strip()) if tracker.is_file() else 0


def stage_recipe128k(e: Study) -> None:
    """One piece of the report's recipe at 1 x 128K from this run's dense pretraining: the
    warm-up (1000 steps, lr 1e-3, indexers only), then the sparse phase (1000 steps, lr 7.3e-6,
    k 2048), on the natural text. Megatron saves and exits after about 20 minutes (the recipes'
    exit-duration-in-mins); the next call continues the unfinished phase from its own checkpoint.
    A phase is done when its checkpoint reaches the recipe's steps."""
    need(e, "pretrain")
    for name, recipe, source in RECIPE_128K:
        if e.done(name):
            continue
        if source != "pretrain":
            need(e, source)
        d = e.phase_dir(name)
        steps = int(load_config(RECIPES / recipe).train["iters"])
        overrides = [f"data.dir={e.text_data}", f"checkpoint.save={d / 'ckpt'}",
                     f"logging.tensorboard_dir={d / 'tb'}", f"checkpoint.load_from={e.phase_dir(source) / 'ckpt'}"]
        cmd = runner.phase_command(RECIPES / recipe, overrides)
        d.mkdir(parents=True, exist_ok=True)
        (d / "command.json").write_text(json.dumps(echo(cmd)) + "\n")
        before = checkpoint_iteration(d / "ckpt")
        print(f"\n=== {name} (from step {before} of {steps}): {echo(cmd)}", flush=True)
        seconds = runner.run_phase(cmd, d / f"train_from_{before}.log", name)
        after = checkpoint_iteration(d / "ckpt")
        if after <= before:
            raise SystemExit(f"error: {name} saved no step past {before} in {seconds:.0f} s: {d / 'ckpt'}")
        if after >= steps:
            (d / "DONE").write_text(json.dumps({"steps": after}) + "\n")
        print(f"[{name}] steps {before} -> {after} of {steps} in {seconds:.0f} s"
              + ("; done" if after >= steps else "; run the stage again to continue"), flush=True)
        return
    print("[recipe128k] both phases done")
