#!/usr/bin/env python
"""torchrun entry point: one DSA training phase on Megatron-LM's loop.

    torchrun --nproc-per-node 2 launch/train.py --config configs/tiny/pretrain.yaml train.iters=50
    python launch/train.py --config configs/tiny/warmup.yaml --check
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron_dsa.train.cli import main

    sys.exit(main())
