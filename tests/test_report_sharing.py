"""The verification report's answer to "one indexer for all layers?" on hand-made results."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_dsa.data.tasks import TASKS


def _eval(loss, held_out, training_formats):
    def table(exact):
        by_length = {"16": {"exact": exact, "token": 50.0}, "32": {"exact": 0.0, "token": 10.0}}
        return {"by_length": by_length, "by_task_length": {t: by_length for t in TASKS}}

    return {"mode": "sparse", "loss": {"16": loss}, "retrieval": table(held_out),
            "retrieval_train_formats": table(training_formats)}


def _report(held_out_dense: float):
    from experiments.verify.report import Report, _retrieval, _sharing

    arms = ["per_layer", "shared", "pattern"]
    res = {"arms": arms, "phases": {f"sparse_{a}": {"val_loss": 2.0} for a in arms},
           "eval": {"B: dense control": {**_eval(2.000, held_out_dense, 72.0), "mode": "dense"},
                    "A: DSA per-layer": _eval(2.002, held_out_dense, 72.0),
                    "shared indexer": _eval(2.003, held_out_dense, 68.0),
                    "GLM-5.2 pattern": _eval(2.120, 0.0, 0.0)},
           "warmup": {a: {} for a in arms}}
    s = {"train_length": 16, "topk": 2, "retrieval_lengths": [16, 32], "retrieval_n": 10, "retrieval_train_n": 6}
    e = SimpleNamespace(s=s, scale="unit", arms=arms, training_family=SimpleNamespace(densities=(2,), values_per_key=(2,), hops=(1,)),
                        layout=lambda arm: {"mdsa_indexer_types": ["full", "shared"]})
    report = Report(e, res, {})
    _retrieval(report)
    _sharing(report)
    return report, "\n".join(report.lines)


def test_held_out_formats_nobody_answers_leave_the_answer_to_the_training_formats():
    """Every model below 10% on the held-out formats: the retrieval verdict says it is not
    informative, and the sharing answer compares the training formats, within their sampling noise
    (-4 points over 6 x 5 items is well inside two s.d.; a lost retrieval is not)."""
    from experiments.verify.report import RETRIEVAL_UNINFORMATIVE

    report, md = _report(held_out_dense=2.0)
    assert report.verdict["retrieval"] == RETRIEVAL_UNINFORMATIVE
    items = 6 * len(TASKS) * 1  # one retrieval length up to the training length
    assert "retrieval in the training formats (on the held-out formats every model is below 10%) -4.0 points" in md
    assert f"{items} items each" in md
    assert report.verdict["shared"] is True and report.verdict["pattern"] is False


def test_held_out_formats_that_discriminate_decide_the_answer():
    report, md = _report(held_out_dense=60.0)
    assert report.verdict["retrieval"] is True  # A equals the control there
    assert "retrieval +0.0 points" in md and "training formats (on the held-out" not in md
    assert report.verdict["shared"] is True and report.verdict["pattern"] is False


def test_recall_table_gives_reusing_layers_their_borrowed_recall():
    """A row per arm whose layers reuse a selection: their own attention mass inside the borrowed
    top-k, as a share of their own oracle."""
    from experiments.verify.report import Report, _recall_after_warmup

    borrowed = {"layers": [4, 5, 6], "sources": [3, 3, 3], "mean_nontrivial": 0.2, "oracle_mean_nontrivial": 0.9}
    entry = {"mean_nontrivial": 0.5, "oracle_mean_nontrivial": 0.8}
    res = {"recall": {"per_layer": {"16": {"2": entry}}, "pattern": {"16": {"2": {**entry, "borrowed": borrowed}}}}}
    report = Report(SimpleNamespace(s={"recall_ratios": [0.125], "recall_lengths": [16]}), res, {})
    _recall_after_warmup(report)
    md = "\n".join(report.lines)
    assert "| pattern: layers 4, 5, 6 on the selection of layer 3 | 0.200 (22%) |" in md
    assert md.count("on the selection of layer") == 2  # the row and its legend; none for per_layer
