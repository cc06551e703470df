"""``python -m megatron_dsa.convert``: to-hf and from-hf.

    to-hf   --checkpoint DIR [--size NAME] [--set KEY=VALUE ...] [--tokenizer SPM_MODEL]
            --out HFDIR [--max-shard-size 2GB] [--dtype bfloat16] [--fp8 [--fp8-block 128x128]]
            [--overwrite]
    from-hf --hf HFDIR --out CKPTDIR [--size NAME] [--max-shard-size 2GB] [--drop-mtp] [--overwrite]

``--checkpoint`` is a Megatron-LM save directory (``latest_checkpointed_iteration.txt`` +
``iter_NNNNNNN/``) or a bare torch_dist checkpoint directory, written with any
tensor/expert/pipeline parallel layout (dist_checkpointing reshards on load). Without
``--size`` the size is read from the checkpoint (the spec from-hf records, or the trainer's
``mdsa_size`` argument). ``--set`` overrides a model config field (JSON value), e.g.
``--set dsa_indexer_topk=8``. ``--dtype`` casts the weights (default: the checkpoint's);
``--fp8`` writes the release's FP8 layout (e4m3 weights with ``weight_scale_inv`` block
scales, ``quantization_config`` in config.json). from-hf reads either, dequantising FP8
weights one at a time. The multi-token-prediction layers the HF config names
(``num_nextn_predict_layers``) convert both ways; ``--drop-mtp`` imports the model without them.

from-hf writes the weights of one TP=1 / PP=1 / EP=1 model (iteration 0, no optimizer state)
and prints the run-config overrides a warm-up or sparse run starts from it with
(``checkpoint.load_from``, ``model.size``, ``model.overrides``); the run chooses its parallel
layout, and dist_checkpointing reshards the weights on load.

Exit status 2 with one line on stderr for bad input; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from megatron_dsa.convert.errors import ConversionError
from megatron_dsa.convert.hf import export_to_hf, import_from_hf


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name a model in a checkpoint (the converter's and the inference CLI's)."""
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--size", default=None, help="named model size (default: the checkpoint's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a model config field (JSON value), e.g. dsa_indexer_topk=8")


def parse_set_options(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` options -> model config overrides (values read as JSON where they parse)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConversionError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_block(text: str) -> tuple[int, int]:
    """'128x128' (or '128') -> (128, 128)."""
    parts = text.lower().split("x")
    try:
        block = tuple(int(p) for p in parts) * (2 if len(parts) == 1 else 1)
    except ValueError:
        block = ()
    if len(block) != 2 or min(block) <= 0:
        raise ConversionError(f"--fp8-block expects ROWSxCOLS, e.g. 128x128, got {text!r}")
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsa.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="megatron-dsa dist checkpoint -> Hugging Face directory")
    add_checkpoint_arguments(to)
    to.add_argument("--tokenizer", default=None, help="sentencepiece model file to export with the weights")
    to.add_argument("--out", required=True)
    to.add_argument("--max-shard-size", default="2GB")
    to.add_argument("--dtype", default=None, help="weights' dtype in the export (default: the checkpoint's)")
    to.add_argument("--fp8", action="store_true",
                    help="store the weights the releases quantise as e4m3 with block scales")
    to.add_argument("--fp8-block", default="128x128", metavar="ROWSxCOLS", help="FP8 scale block (default 128x128)")
    to.add_argument("--overwrite", action="store_true")
    frm = sub.add_parser("from-hf", help="Hugging Face DeepseekV32 directory -> megatron-dsa dist checkpoint")
    frm.add_argument("--hf", required=True)
    frm.add_argument("--out", required=True)
    frm.add_argument("--size", default=None, help="named size the model must match (default: inferred)")
    frm.add_argument("--max-shard-size", default="2GB",
                     help="converted weights held in memory at a time (parked on disk beside --out)")
    frm.add_argument("--drop-mtp", action="store_true",
                     help="import without the multi-token-prediction layers (num_nextn_predict_layers)")
    frm.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # megatron-core's deprecation chatter
            out = _run(args, export_to_hf, import_from_hf)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if args.command == "from-hf":
        print(training_settings(out))
    return 0


def training_settings(out) -> str:
    """How a training run starts from an imported checkpoint: the run-config overrides that give
    the trainer this model (the trainer's preflight refuses any other)."""
    from megatron_dsa.convert.checkpoint import common_state, resolve_checkpoint_dir
    from megatron_dsa.model import SIZES

    args = common_state(resolve_checkpoint_dir(out)).get("args")
    if args.mdsa_size not in SIZES:
        return ("to train it, add a size with its vocabulary, leading dense layers and maximum length "
                "to megatron_dsa.model.SIZES (no named size has them)")
    overrides = json.loads(args.mdsa_model_overrides or "{}")
    settings = [f"checkpoint.load_from={out}", f"model.size={args.mdsa_size}",
                *(f"model.overrides.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(overrides.items()))]
    return ("train it (phase warmup or sparse; any TP/PP/EP: the weights reshard on load) with: "
            + " ".join(settings))


def _run(args, export_to_hf, import_from_hf):
    if args.command == "to-hf":
        return export_to_hf(args.checkpoint, args.out, size=args.size, tokenizer=args.tokenizer,
                            max_shard_size=args.max_shard_size, overrides=parse_set_options(args.set),
                            overwrite=args.overwrite, dtype=args.dtype,
                            fp8_block=parse_block(args.fp8_block) if args.fp8 else None)
    return import_from_hf(args.hf, args.out, size=args.size, overwrite=args.overwrite,
                          max_shard_size=args.max_shard_size, drop_mtp=args.drop_mtp)
