"""The whole DSA recipe on one CPU machine in about ten minutes:

    corpus (this interpreter's stdlib, capped) -> sentencepiece tokenizer -> indexed datasets
    -> pretrain the tiny MoE dense -> warm up the indexers -> train sparse -> evaluate
    -> a table (validation loss per phase, indexer KL and top-k recall over the warm-up)
       and a PNG of the curves under --out (default runs/main/).

    python -m megatron_dsa.train.main [--out runs/main] [--pretrain-iters 600] ...

Each phase runs ``megatron_dsa.train.cli`` (Megatron-LM's ``pretrain`` loop) in its own process
with ``configs/tiny/<phase>.yaml`` plus overrides; its full log is ``<out>/<phase>/train.log``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from megatron_dsa.data import DataError, build_corpus, load_manifest  # noqa: E402
from megatron_dsa.train.config import PHASES  # noqa: E402
from megatron_dsa.train.runner import REPO, first_last, phase_command, read_scalars, run_phase  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_dsa.train.main", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/main", help="output directory (default: %(default)s)")
    p.add_argument("--configs", default=str(REPO / "configs" / "tiny"), help="directory of the phase configs")
    p.add_argument("--max-bytes", type=int, default=3_000_000, help="corpus size cap in bytes")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--pretrain-iters", type=int, default=400)
    p.add_argument("--warmup-iters", type=int, default=120)
    p.add_argument("--sparse-iters", type=int, default=150)
    p.add_argument("--sparse-lr", type=float, default=3e-4,
                   help="the report uses 7.3e-6 over 15000 steps; a few hundred CPU steps need more "
                        "(default: %(default)s)")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--nproc", type=int, default=1, help="processes per phase (torchrun, data parallel)")
    return p


def _phase_cmd(args, phase: str, out: Path, data: Path) -> list[str]:
    iters = {"pretrain": args.pretrain_iters, "warmup": args.warmup_iters, "sparse": args.sparse_iters}[phase]
    overrides = [
        f"data.dir={data}", f"data.seq_length={args.seq_length}",
        f"checkpoint.save={out / phase / 'ckpt'}", f"logging.tensorboard_dir={out / phase / 'tb'}",
        f"train.iters={iters}", f"eval.interval={max(1, iters // 4)}", f"checkpoint.interval={iters}",
        f"logging.interval={max(1, iters // 10)}",
    ]
    if phase == "pretrain":
        overrides.append(f"train.lr_warmup_iters={min(20, iters // 10)}")
    if phase != "pretrain":
        prev = PHASES[PHASES.index(phase) - 1]
        overrides.append(f"checkpoint.load_from={out / prev / 'ckpt'}")
    if phase == "sparse":
        overrides += [f"train.lr={args.sparse_lr}", f"train.min_lr={args.sparse_lr}"]
    return phase_command(Path(args.configs) / f"{phase}.yaml", overrides, nproc=args.nproc)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 18 + "+"
    body = [line] + [f"| {k:<{width}} | {v:>16} |" for k, v in rows] + [line]
    return "\n".join(body)


def _plot(scalars: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    offset = 0
    for phase in PHASES:
        s = scalars[phase]
        lm = s.get("lm loss", [])
        if lm:
            axes[0].plot([offset + i for i, _ in lm], [v for _, v in lm], label=f"{phase} (train)")
        val = s.get("lm loss validation", [])
        if val:
            axes[0].plot([offset + i for i, _ in val], [v for _, v in val], "o--", label=f"{phase} (valid)")
        offset += max((i for i, _ in lm), default=0)
    axes[0].set(title="LM loss (iterations across phases)", xlabel="iteration", ylabel="loss")
    axes[0].legend(fontsize=7)
    for phase, style in (("warmup", "-"), ("sparse", "--")):
        for tag, value in sorted(scalars[phase].items()):
            if tag.startswith("indexer kl/layer") and " vs " not in tag and "validation" not in tag:
                axes[1].plot([i for i, _ in value], [v for _, v in value], style, label=f"{phase} {tag[8:]}")
    axes[1].set(title="indexer KL per layer", xlabel="iteration in phase", yscale="log")
    axes[1].legend(fontsize=7)
    for tag, value in sorted(scalars["warmup"].items()):
        if tag.startswith("indexer topk-recall") and " vs " not in tag and "validation" not in tag:
            axes[2].plot([i for i, _ in value], [v for _, v in value], label=tag[8:])
    axes[2].set(title="top-k recall of the dense attention mass (warm-up)", xlabel="iteration in phase")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    try:
        load_manifest(data)
        print(f"corpus: reusing {data}")
    except DataError:
        print(f"corpus: building {data} from this interpreter's stdlib (cap {args.max_bytes:,} bytes)", flush=True)
        manifest = build_corpus(data, None, args.vocab_size, max_bytes=args.max_bytes, overwrite=True)
        print(f"corpus: {manifest['splits']['train']['tokens']:,} train / "
              f"{manifest['splits']['valid']['tokens']:,} valid tokens, vocab {manifest['vocab_size']}", flush=True)

    # Each phase of this job starts fresh (its own output from an earlier run is replaced).
    cmds = {phase: _phase_cmd(args, phase, out, data) for phase in PHASES}
    for phase in PHASES:
        shutil.rmtree(out / phase, ignore_errors=True)
    seconds = {}
    for phase in PHASES:
        (out / phase).mkdir(parents=True)
        print(f"\n=== {phase}: {' '.join(cmds[phase][1:])}", flush=True)
        seconds[phase] = run_phase(cmds[phase], out / phase / "train.log", phase)

    scalars = {phase: read_scalars(out / phase / "tb") for phase in PHASES}
    rows = []
    for phase in PHASES:
        val = scalars[phase].get("lm loss validation", [])
        rows.append((f"validation LM loss after {phase}", f"{val[-1][1]:.4f}" if val else "n/a"))
    start_lm, _ = first_last(scalars["pretrain"]["lm loss"], 5)
    rows.insert(0, ("train LM loss at start of pretrain", f"{start_lm:.4f}"))
    w = scalars["warmup"]
    kl0, kl1 = first_last(w["indexer kl"], 5)
    r0, r1 = first_last(w["indexer topk-recall"], 5)
    rows += [
        ("indexer KL, start of warm-up", f"{kl0:.4e}"),
        ("indexer KL, end of warm-up", f"{kl1:.4e}"),
        ("top-k recall, start of warm-up", f"{r0:.4f}"),
        ("top-k recall, end of warm-up", f"{r1:.4f}"),
    ]
    s_kl0, s_kl1 = first_last(scalars["sparse"]["indexer kl"], 5)
    rows += [("sparse KL (selected set), start", f"{s_kl0:.4e}"), ("sparse KL (selected set), end", f"{s_kl1:.4e}")]
    for phase in PHASES:
        tps = [v for _, v in scalars[phase].get("tokens-per-sec", [])]
        if tps:
            rows.append((f"{phase}: median tokens/s", f"{sorted(tps)[len(tps) // 2]:,.0f}"))
    for phase in PHASES:
        rows.append((f"{phase}: wall time", f"{seconds[phase]:.1f} s"))
    plot = out / "curves.png"
    _plot(scalars, plot)
    table = _table(rows)
    (out / "summary.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"plot: {plot}\nlogs: {out}/<phase>/train.log, TensorBoard: {out}/<phase>/tb")
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
