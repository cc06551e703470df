"""benchmarks/tune_dsa.py's command line on CPU: the variant names it is asked for, checked
before any GPU work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tune_dsa import chosen_variants, main, variants  # noqa: E402


def test_variant_names_keep_the_commas_of_their_tiles():
    only = chosen_variants("stored_ds dq(64, 8, 3), stored_scores p1 dkv(64, 4, 3)", ["bwd"], [128])
    assert only == ["stored_ds dq(64, 8, 3)", "stored_scores p1 dkv(64, 4, 3)"]
    names = [name for name, _ in variants("bwd", 128)]
    assert [sum(o in n for n in names) for o in only] == [1, 1]  # each names exactly one variant
    assert chosen_variants("", ["fwd"], [16]) == []


def test_a_variant_that_names_nothing_fails_before_any_gpu_work():
    with pytest.raises(SystemExit, match=r"--variants \['stored_ds'\] name no variant of stages \['fwd'\]"):
        chosen_variants("stored_ds", ["fwd"], [128])
    with pytest.raises(SystemExit, match="unknown --stages"):
        main(["--stages", "bwd,fwdd"])
    # A name split at its tile's commas would have matched nearly everything (" 8").
    with pytest.raises(SystemExit, match="name no variant"):
        main(["--stages", "bwd", "--heads", "128", "--variants", "stored_ds dq(64, 8, 3),split dq(16, 8, 1)"])
