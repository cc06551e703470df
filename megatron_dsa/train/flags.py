"""Megatron-LM's flags for a validated run config (the argv the trainer hands to ``pretrain``),
and back: the model config a run's parsed flags describe (``phase_model_config``).

Preflight parses them with Megatron's own parser before any compute (a bad ``megatron:`` flag
fails there, in one line); the trainer passes them to Megatron. Our own flags are all
``--mdsa-*`` (names that are no TransformerConfig field, so Megatron never copies them onto a
config).
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from megatron_dsa.model import model_config, resolve_size
from megatron_dsa.train.config import FP8_SETTINGS, MEGATRON_FIELDS, PHASE_MODE, RunConfig


def add_mdsa_args(parser):
    """Megatron extra_args_provider: our own flags, all ``--mdsa-*``."""
    group = parser.add_argument_group("megatron-dsa")
    group.add_argument("--mdsa-phase", choices=tuple(PHASE_MODE), required=True)
    group.add_argument("--mdsa-size", required=True, help="named model size (megatron_dsa.model.SIZES)")
    group.add_argument("--mdsa-model-overrides", default="{}",
                       help="JSON dict of DSATransformerConfig fields over the size's")
    group.add_argument("--mdsa-data-dir", required=True, help="corpus built by megatron_dsa.data")
    group.add_argument("--mdsa-progress", type=int, default=1, help="progress line with ETA (0/1)")
    group.add_argument("--mdsa-packed", type=int, default=0,
                       help="feed documents as packed sequences (megatron-core THD), 0/1")
    group.add_argument("--mdsa-answer-loss-weight", type=float, default=1.0,
                       help="loss weight of a task mixture's answer tokens (1: plain LM loss)")
    group.add_argument("--mdsa-metrics-file", default=None,
                       help="JSON lines of per-iteration metrics (rank 0)")
    return parser


def megatron_argv(cfg: RunConfig, plan: dict) -> list[str]:
    """Megatron-LM flags for a validated run config (``plan`` from ``preflight``)."""
    size = resolve_size(cfg.model["size"])
    tf = {**size.transformer, **cfg.model["overrides"]}
    t, c, lg = cfg.train, cfg.checkpoint, cfg.logging
    argv = [
        # Shape, for Megatron's own checks and logs (the model itself comes from our provider).
        "--num-layers", tf["num_layers"], "--hidden-size", tf["hidden_size"],
        "--ffn-hidden-size", tf["ffn_hidden_size"], "--num-attention-heads", tf["num_attention_heads"],
        "--seq-length", cfg.data["seq_length"], "--max-position-embeddings", cfg.data["seq_length"],
        "--position-embedding-type", "none",
        # Resolved once by preflight; phase_model_config hands the same value to our config.
        "--transformer-impl", plan["transformer_impl"],
        "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", os.path.join(plan["data_dir"], "tokenizer.model"),
        # Optimisation.
        "--micro-batch-size", t["micro_batch_size"], "--global-batch-size", t["global_batch_size"],
        "--train-iters", t["iters"], "--lr", t["lr"], "--min-lr", t["min_lr"],
        "--lr-decay-style", t["lr_decay_style"], "--lr-warmup-iters", t["lr_warmup_iters"],
        "--weight-decay", t["weight_decay"], "--clip-grad", t["clip_grad"],
        "--adam-beta1", t["adam_beta1"], "--adam-beta2", t["adam_beta2"], "--seed", t["seed"],
        "--hidden-dropout", 0.0, "--attention-dropout", 0.0,
        # Evaluation.
        "--eval-interval", cfg.eval["interval"], "--eval-iters", cfg.eval["iters"],
        # Checkpoints: torch_dist; resume from save, else start from load_from's weights.
        "--save", c["save"], "--load", c["save"], "--save-interval", c["interval"],
        "--ckpt-format", "torch_dist",
        # A non-finite gradient stops the run before the optimizer step (loss_func checks the
        # loss terms); the rerun machine's default would save the poisoned iteration and exit 16.
        "--rerun-mode", "disabled",
        # Logging.
        "--log-interval", lg["interval"], "--tensorboard-log-interval", 1,
        "--log-validation-ppl-to-tensorboard", "--log-timers-to-tensorboard",
        # Our plugin.
        "--mdsa-phase", cfg.phase, "--mdsa-size", cfg.model["size"],
        "--mdsa-model-overrides", json.dumps(cfg.model["overrides"]),
        "--mdsa-data-dir", plan["data_dir"], "--mdsa-progress", int(bool(lg["progress"])),
        "--mdsa-packed", int(bool(cfg.data["packed"])),
        "--mdsa-answer-loss-weight", float(cfg.data["answer_loss_weight"]),
    ]
    if tf.get("num_moe_experts"):
        # Megatron validates expert parallelism against these (it refuses EP > 1 without
        # --num-experts) and logs the routers' balancing loss by its type.
        argv += ["--num-experts", tf["num_moe_experts"], "--moe-ffn-hidden-size", tf["moe_ffn_hidden_size"],
                 "--moe-router-topk", tf["moe_router_topk"],
                 "--moe-router-load-balancing-type", tf["moe_router_load_balancing_type"]]
    argv += fp8_argv(cfg)
    argv += mtp_argv(tf)
    if t["skip_iterations"]:
        # Megatron consumes these iterations' batches without a step (1-based, as it logs them).
        argv += ["--iterations-to-skip", *t["skip_iterations"]]
    if plan.get("pretrained"):
        argv += ["--pretrained-checkpoint", plan["pretrained"]]
    if lg["tensorboard_dir"]:
        argv += ["--tensorboard-dir", lg["tensorboard_dir"]]
    if plan.get("metrics_file"):
        argv += ["--mdsa-metrics-file", plan["metrics_file"]]
    if not torch.cuda.is_available():
        argv += ["--distributed-backend", "gloo", "--no-gradient-accumulation-fusion",
                 "--use-cpu-initialization", "--no-masked-softmax-fusion",
                 "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
                 # Data-loader workers would compete with the compute threads for the few cores.
                 "--num-workers", 0]
    elif not _apex_wgrad_fusion_installed():
        # Megatron defaults to fusing the weight-gradient accumulation, an Apex CUDA extension
        # that a plain PyTorch install lacks (its linears would fail at construction).
        argv += ["--no-gradient-accumulation-fusion"]
    for flag, value in cfg.megatron.items():
        if value is True:
            argv.append(f"--{flag}")
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [f"--{flag}", *map(str, value)]
        else:
            argv += [f"--{flag}", value]
    return [str(a) for a in argv]


def mtp_argv(transformer: dict) -> list:
    """Megatron's multi-token-prediction flags for a model with MTP layers (the size's
    ``mtp_num_layers`` or model.overrides'): the model is built from our config, but Megatron's
    loop reads its own args to scale and log the MTP loss."""
    if not transformer.get("mtp_num_layers"):
        return []
    argv = ["--mtp-num-layers", transformer["mtp_num_layers"]]
    if transformer.get("mtp_loss_scaling_factor") is not None:
        argv += ["--mtp-loss-scaling-factor", transformer["mtp_loss_scaling_factor"]]
    return argv


def fp8_argv(cfg: RunConfig) -> list:
    """Megatron's FP8 flags from the ``fp8`` section (none while fp8.format is null)."""
    if cfg.fp8["format"] is None:
        return []
    argv = []
    for key, (flag, _) in FP8_SETTINGS.items():
        value = cfg.fp8[key]
        if value is True:
            argv.append(f"--{flag}")
        elif key.startswith("num_layers_at_") and not cfg.fp8["first_last_layers_bf16"]:
            continue
        elif value is not False:
            argv += [f"--{flag}", value]
    return argv


def _apex_wgrad_fusion_installed() -> bool:
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def phase_model_config(args=None):
    """Our DSATransformerConfig for this run: the size's shape + overrides + the phase's mode,
    with parallelism and precision (transformer_impl and FP8 included) taken from Megatron's
    flags."""
    if args is None:
        from megatron.training import get_args

        args = get_args()
    overrides = dict(json.loads(args.mdsa_model_overrides))
    overrides.pop("mdsa_mode", None)
    overrides["mdsa_mode"] = PHASE_MODE[args.mdsa_phase]
    # Megatron's values win: config validation keeps these fields out of model.overrides.
    for field in MEGATRON_FIELDS:
        if hasattr(args, field):
            overrides[field] = getattr(args, field)
    # One source each (config validation keeps them out of model.overrides): the backend and
    # FP8 recipe the model is built with are exactly Megatron's.
    overrides["transformer_impl"] = args.transformer_impl
    for _, field in FP8_SETTINGS.values():
        # Megatron's args call fp8_param fp8_param_gather (its own config builder maps it so).
        overrides[field] = getattr(args, "fp8_param_gather" if field == "fp8_param" else field)
    if args.bf16:
        overrides.setdefault("params_dtype", torch.bfloat16)
    else:
        overrides["params_dtype"] = torch.float32 if not args.fp16 else torch.float16
    if not torch.cuda.is_available():
        overrides.setdefault("use_cpu_initialization", True)
    if args.pipeline_model_parallel_size > 1:
        # The dtype of the activations sent between stages (Megatron's own config builder sets it so).
        overrides["pipeline_dtype"] = overrides["params_dtype"]
    return model_config(args.mdsa_size, **overrides)
