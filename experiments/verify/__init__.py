"""The DSA verification study on the small MoE: does sparse training keep the dense model's
quality, what do sharing the indexer and other warm-up objectives cost, and how fast is it.

    python experiments/verify_dsa.py --scale h200 --jobs 4   # one H200, every arm
    # the core comparison (dense control, per-layer, GLM-5.2 pattern, shared), ~17 GPU-minutes:
    python experiments/verify_dsa.py --scale h200 --arms per_layer,pattern,shared --jobs 4 --stage corpus,pretrain,warmup,sparse,eval,report
    python experiments/verify_dsa.py --scale smoke           # CPU, tiny model, a few minutes

Stages (``--stage NAME`` runs one; ``all``, the default, runs every stage not yet done; a
stage whose outputs exist is skipped, ``--force`` reruns it):

    corpus     this interpreter's standard library + site-packages -> tokenizer -> indexed
               train / held-out valid splits
    speed      training-step cost of every arm, side by side in one process on one GPU
               (benchmarks/bench_model_step.py; h200 only)
    pretrain   the MoE dense at long context (configs/recipes/h200_pretrain.yaml)
    warmup     every arm's indexer warm-up (indexers only, dense attention, from pretrain)
    sparse     every arm's sparse training (from its warm-up), and arm B: the same tokens of
               continued dense training (same lr, seed, data order)
    eval       every trained model: validation loss at several lengths, the retrieval items in
               held-out formats and, beside them, in the training formats (arm B and arm A
               first, at most --eval-jobs at once)
    recall     after warm-up: top-k recall of the dense attention mass at several context
               lengths and k/S ratios, every arm (and the untrained indexer)
    report     <report-dir>/verification.md + PNGs + verification.json
    bench128k  one measured micro-batch (1 x 128K) of the report's warm-up on the small MoE,
               warm-up and sparse (h200 only; extrapolates the 16 x 128K step and 1000 steps)
    step128k   real trainer steps of the report's warm-up recipe (configs/recipes/
               report_warmup.yaml: 16 x 131072 tokens) from the pretrain checkpoint; the second
               of two steps is the measurement (h200 only)
    recipe128k (only when named) one ~20-minute piece of the report's recipe at 1 x 128K
               (configs/recipes/report_{warmup,sparse}_b1.yaml: 1000 warm-up steps, then 1000
               sparse) from this run's pretraining, on its natural text; each call continues
               from the phase's own checkpoint. The report plots its KL and recall at 128K.

Modules: ``settings`` (arms, scales, targets), ``study`` (the run directory), ``stages``
(training), ``measurements`` (evaluation and speed, on ``suites``), ``collect`` / ``plots`` /
``report`` (the report), ``cli`` (stage scheduling, ``--jobs`` arms at once).
"""
