"""Time opening a torch_dist checkpoint with and without ``megatron_dsa.safe_load``.

    python scripts/bench_safe_load.py --checkpoint DIR [--repeats 5]

DIR is a Megatron-LM save directory (tracker + iter_N/) or a bare torch_dist checkpoint. Each
mode runs in its own process (``install()`` patches the process for good): ``before`` reads
with torch's and megatron-core's own readers, ``after`` with the allow-list, plus the
``verify()`` that the converters and preflight now run first. Prints the median seconds of
each step: unpickling .metadata, loading the common state (Megatron's args and the other
stored objects), and loading every tensor of the checkpoint into a state dict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(checkpoint: str, mode: str, repeats: int) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    import torch
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_dsa import safe_load
    from megatron_dsa.convert.checkpoint import ensure_world, resolve_checkpoint_dir

    ensure_world()
    if mode == "after":
        safe_load.install()
        ckpt = resolve_checkpoint_dir(checkpoint)  # verifies
    else:
        p = Path(checkpoint)
        tracker = p / "latest_checkpointed_iteration.txt"
        ckpt = p / f"iter_{int(tracker.read_text()):07d}" if tracker.is_file() else p
    out = {}
    if mode == "after":
        out["verify"] = _median_seconds(lambda: safe_load.verify(ckpt), repeats)
    out["read .metadata"] = _median_seconds(lambda: FileSystemReader(str(ckpt)).read_metadata(), repeats)
    out["common state"] = _median_seconds(lambda: dist_checkpointing.load_common_state_dict(str(ckpt)), repeats)

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    metadata = FileSystemReader(str(ckpt)).read_metadata()
    request = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            request[key] = ShardedTensor.from_rank_offsets(
                key, torch.empty(tuple(meta.size), dtype=meta.properties.dtype))
    out["all tensors"] = _median_seconds(
        lambda: dist_checkpointing.load(request, str(ckpt), validate_access_integrity=False), repeats)
    out["tensors"] = len(request)
    out["bytes"] = sum(t.data.numel() * t.data.element_size() for t in request.values())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", choices=("before", "after"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.checkpoint, args.mode, args.repeats)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results = {}
    for mode in ("before", "after", "before", "after"):  # interleaved: drift hits both alike
        line = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--repeats",
                               str(args.repeats), "--mode", mode], env=env, capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]
        for key, value in json.loads(line).items():
            results.setdefault(mode, {}).setdefault(key, []).append(value)
    info = results["before"]
    print(f"{args.checkpoint}: {info['tensors'][0]} tensors, {info['bytes'][0] / 1e6:.1f} MB; "
          f"median of {args.repeats} per process, best of 2 processes")
    print(f"{'step':<16} {'before (s)':>11} {'after (s)':>11}")
    for key in ("verify", "read .metadata", "common state", "all tensors"):
        before = min(results["before"][key]) if key in results["before"] else None
        after = min(results["after"][key])
        shown = "-" if before is None else f"{before:.4f}"
        print(f"{key:<16} {shown:>11} {after:11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
