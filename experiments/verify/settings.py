"""What the verification study runs: its arms, stages, scales and targets, and where things are.

Arms after the common dense pretraining (``ARMS``): per_layer (arm A, the report), shared (one
indexer for all layers), freq2 / freq4 (one selection every 2 / 4 layers, reused between), and
the warm-up objective arms obj_reverse_kl / obj_mse / obj_listwise (per-layer indexers; only
the warm-up loss differs, the sparse phase is arm A's). Arm B, the dense control, trains the
same tokens dense. All arms start from one pretrain checkpoint with one seed, so they read the
same data in the same order.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "configs" / "recipes"
RESULTS = REPO / "benchmarks" / "results"

# Arms after the common dense pretraining: name -> (label, indexer layout overrides (every
# phase of the arm), warm-up-only overrides). Layout overrides change which parameters exist;
# the objective changes only the warm-up loss.
ARMS = {
    "per_layer": ("A: DSA per-layer", {}, {}),
    "shared": ("shared indexer", {"mdsa_indexer_sharing": "shared"}, {}),
    "freq2": ("selection every 2 layers", {"dsa_indexer_topk_freq": 2}, {}),
    "freq4": ("selection every 4 layers", {"dsa_indexer_topk_freq": 4}, {}),
    "obj_reverse_kl": ("warm-up objective: reverse KL", {}, {"mdsa_indexer_objective": "reverse_kl"}),
    "obj_mse": ("warm-up objective: MSE", {}, {"mdsa_indexer_objective": "mse"}),
    "obj_listwise": ("warm-up objective: listwise top-k", {}, {"mdsa_indexer_objective": "listwise"}),
}
SHARING_ARMS = ("per_layer", "shared", "freq2", "freq4")
OBJECTIVE_ARMS = {"per_layer": "kl", "obj_reverse_kl": "reverse_kl", "obj_mse": "mse", "obj_listwise": "listwise"}
# eval before recall: if the GPU time runs out, the comparison with the control is what matters most
STAGES = ("corpus", "speed", "pretrain", "warmup", "sparse", "eval", "recall", "bench128k", "step128k", "report")
ARM_STAGES = ("warmup", "sparse", "recall", "eval")  # run per arm, up to --jobs at once

# The mixture's answer tokens weigh this much in the LM loss: a few thousand answer tokens among
# millions of text tokens would otherwise barely steer a 20-minute pretraining toward retrieval.
ANSWER_LOSS_WEIGHT = 4.0

SCALES = {
    "h200": dict(
        vocab_size=8192, max_bytes=48 * 1024 * 1024, valid_fraction=0.05,
        overrides={"all": [f"data.answer_loss_weight={ANSWER_LOSS_WEIGHT}"]},
        loss_lengths=(4096, 8192, 16384, 32768), loss_max_total=65536,
        retrieval_lengths=(4096, 8192, 16384, 32768), retrieval_n=6, tasks=dict(ratio=0.5, seed=0),
        recall_lengths=(4096, 16384), recall_ratios=(1 / 64, 1 / 32, 1 / 16), recall_max_total=32768,
        train_length=16384, topk=512, bench=True, speed_args=["--seq", "16384", "--topk", "512"],
    ),
    "smoke": dict(
        vocab_size=512, max_bytes=800_000, valid_fraction=0.05,
        overrides={
            "all": ["model.size=tiny", "data.seq_length=256", "model.overrides.dsa_indexer_topk=16",
                    f"data.answer_loss_weight={ANSWER_LOSS_WEIGHT}",
                    "megatron.bf16=false", "train.micro_batch_size=2", "train.global_batch_size=2",
                    "eval.iters=1", "logging.interval=2"],
            "pretrain": ["train.iters=16", "train.lr_warmup_iters=2", "train.lr=3e-3", "train.min_lr=3e-4",
                         "eval.interval=16", "checkpoint.interval=16"],
            "warmup": ["train.iters=4", "eval.interval=4", "checkpoint.interval=4"],
            "sparse": ["train.iters=4", "eval.interval=4", "checkpoint.interval=4",
                       "train.lr=3e-4", "train.min_lr=3e-4"],
            "dense_control": ["train.iters=4", "eval.interval=4", "checkpoint.interval=4",
                              "train.lr=3e-4", "train.min_lr=3e-4"],
        },
        loss_lengths=(64, 128, 256), loss_max_total=1024,
        retrieval_lengths=(256, 512), retrieval_n=2, tasks=dict(ratio=0.5, seed=0),
        recall_lengths=(128, 256), recall_ratios=(1 / 16, 1 / 8), recall_max_total=512,
        train_length=256, topk=16, bench=False, speed_args=None,
    ),
}
# The training mixture (megatron_dsa.data.mixture) is built for train_length: ``tasks`` gives the
# share of its documents that carry a task and the generator's seed; the held-out retrieval items
# (suites.heldout) are scored at retrieval_lengths, those above train_length as extrapolation.
TARGETS = {"loss_rel": 0.01, "retrieval_points": 2.0, "kl_drop": 5.0, "recall": 0.90}

# The report's warm-up step measured as one 131072-token micro-batch (bench_model_step.py).
BENCH128K_ARGS = ["--seq", "131072", "--topk", "2048", "--arms", "warmup,sparse", "--iters", "1", "--warmup-iters", "1"]
