"""One training phase from a YAML config: ``launch/train.py`` (under torchrun) calls ``main``.

    torchrun --nproc-per-node N launch/train.py --config configs/tiny/pretrain.yaml train.iters=50

Bad input stops with one ``error: ...`` line (from rank 0) and exit status 2, before any
compute and before anything is written. ``--check`` validates and exits. A run that stops on
non-finite values or an unreadable checkpoint prints one ``error: ...`` line and exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import os
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train one DSA phase (pretrain | warmup | sparse) on Megatron-LM's loop.",
    )
    parser.add_argument("--config", required=True, help="YAML run config (configs/<size>/<phase>.yaml)")
    parser.add_argument("--check", action="store_true", help="validate config, data and checkpoints, then exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, nested keys with dots")
    return parser


@contextlib.contextmanager
def _held_stderr():
    """Hold everything written to stderr (file descriptor 2: Python warnings, torch's C++ and
    logging chatter at import time) while validating; yields a function that replays it.
    On bad input the held text is dropped, so the error is the only line."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = tempfile.TemporaryFile(mode="w+b")
    os.dup2(held.fileno(), 2)
    try:
        yield held
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    error = None
    with _held_stderr() as held, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron_dsa.config import DSAConfigError
        from megatron_dsa.data import DataError
        from megatron_dsa.train.config import TrainConfigError, load_config
        from megatron_dsa.train.preflight import preflight

        try:
            cfg = load_config(args.config, args.overrides)
            plan = preflight(cfg)
        except (TrainConfigError, DataError, DSAConfigError) as bad:
            error = bad
    if error is not None:
        held.close()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    held.seek(0)
    sys.stderr.write(held.read().decode(errors="replace"))
    held.close()
    if args.check:
        start = "resume from " + plan["save"] if plan["resume"] else (
            "weights of " + plan["pretrained"] if plan["pretrained"] else "scratch")
        fp8 = f", FP8 {cfg.fp8['format']} ({cfg.fp8['recipe']})" if cfg.fp8["format"] else ""
        print(f"ok: {cfg.phase} run of model {cfg.model['size']!r} ({plan['transformer_impl']} modules{fp8}), "
              f"starting from {start}")
        return 0
    from megatron_dsa.distributed import prefer_expandable_segments

    prefer_expandable_segments()  # before the run's first CUDA allocation
    from megatron_dsa.train.trainer import TrainRunError, run

    try:
        run(cfg, plan)
    except TrainRunError as stopped:
        # Printed by the rank that stopped (a non-finite value may show on any one of them).
        print(f"error: {stopped}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
