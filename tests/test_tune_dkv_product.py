"""benchmarks/tune_dkv_product.py on CPU: its variants, and bad arguments stopped before any GPU work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tune_dkv_product as T  # noqa: E402
from megatron_dsa.kernels import sparse_attn_ws as W  # noqa: E402


def test_the_triton_kernel_comes_first_then_each_pipeline_once_then_the_ranges():
    names = [(name, n) for name, n, _ in T.variants([8, 16])]
    default = T.pipeline_name(W.DKV_Q_SLOTS, W.DKV_BUFFERS, W.DKV_VIA_SMEM, W.DKV_PAIRS)
    assert names[0] == ("triton", 0) and names[1] == (default, 0)
    pipelines = [name for name, n in names if name.startswith("gluon") and n == 0]
    assert len(pipelines) == len(set(pipelines)) == len(set(T.GLUON_PIPELINES) | {T.DEFAULT_PIPELINE})
    assert names[-4:] == [(default, 8), (default, 16), ("triton", 8), ("triton", 16)]


@pytest.mark.parametrize("argv,message", [(["--heads", "128,x"], "comma-separated positive integers"),
                                          (["--passes", "0"], "comma-separated positive integers"),
                                          (["--seqs", ","], "at least one value")])
def test_bad_arguments_stop_before_any_gpu_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        T.main(argv)
    assert message in capsys.readouterr().err
