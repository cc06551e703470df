"""benchmarks/tune_dkv_product.py on CPU: its variants, and bad arguments stopped before any GPU work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tune_dkv_product as T  # noqa: E402


def test_the_triton_kernel_comes_first_then_the_gluon_one_then_the_ranges():
    names = [(name, n) for name, n, _ in T.variants([8, 16])]
    assert names == [("triton", 0), ("gluon", 0), ("gluon", 8), ("gluon", 16), ("triton", 8), ("triton", 16)]


@pytest.mark.parametrize("argv,message", [(["--heads", "128,x"], "comma-separated positive integers"),
                                          (["--passes", "0"], "comma-separated positive integers"),
                                          (["--seqs", ","], "at least one value")])
def test_bad_arguments_stop_before_any_gpu_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        T.main(argv)
    assert message in capsys.readouterr().err
