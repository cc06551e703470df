#!/usr/bin/env python
"""Entry point of the DSA verification study (the code: ``experiments/verify``).

    python experiments/verify_dsa.py --scale h200 --jobs 4   # one H200, every arm
    python experiments/verify_dsa.py --scale smoke           # CPU, tiny model, a few minutes
"""

import sys
from pathlib import Path

# Runnable from a checkout: the repository holds both the library and the experiments.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from experiments.verify.cli import main

    sys.exit(main())
