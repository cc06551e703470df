"""``python -m megatron_dsa.convert``: the converter's command line (``megatron_dsa.convert.cli``)."""

import sys

from megatron_dsa.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
