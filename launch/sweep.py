#!/usr/bin/env python
"""A scaling sweep: a YAML grid (model size x parallel layout x length x phase), each point its
own torchrun job, one table and plot (megatron_dsa/train/sweep.py).

    python launch/sweep.py --sweep configs/sweeps/tiny_cpu.yaml [--out DIR]

Run it again after it was cut short: finished points are kept, the rest run.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--out", default=None, help="results directory (default: the file's 'out')")
    args = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    from megatron_dsa.train.sweep import SweepError, load_sweep, run_sweep

    try:
        sweep = load_sweep(args.sweep, args.out)
        rows = run_sweep(sweep)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    failed = [r["point"] for r in rows if r["status"] != "ok"]
    print(f"[sweep] table: {sweep.out / 'sweep.md'}, plot: {sweep.out / 'sweep.png'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
