"""``python -m megatron_dsa.inference generate``: greedy generation from a checkpoint.

    generate --checkpoint DIR [--size NAME] [--set KEY=VALUE ...] --tokenizer SPM_MODEL
             --prompt TEXT --max-new-tokens N [--mode sparse|dense] [--show-ids]
             [--kernel reference|auto|triton] [--indexer-keys fp8|bf16|fp32] [--cuda-graphs]

Loads a megatron-dsa dist checkpoint (any parallel layout; see megatron_dsa.convert) into a
TP=1 model on this process (CUDA if available, else CPU), prefills the prompt and decodes
one token per step over the paged cache (FP8 indexer keys by default; CUDA graphs on a GPU with
--cuda-graphs). Prints the continuation.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from megatron_dsa.convert.cli import add_checkpoint_arguments, parse_set_options
from megatron_dsa.convert.checkpoint import load_model
from megatron_dsa.convert.errors import ConversionError
from megatron_dsa.data import DataError, SentencePieceTokenizer
from megatron_dsa.inference.engine import DSAInference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsa.inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="greedy generation")
    add_checkpoint_arguments(g)
    g.add_argument("--tokenizer", required=True, help="sentencepiece model file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--mode", choices=("sparse", "dense"), default="sparse")
    g.add_argument("--show-ids", action="store_true")
    g.add_argument("--kernel", choices=("reference", "auto", "triton"), default="auto")
    g.add_argument("--indexer-keys", choices=("fp8", "bf16", "fp32"), default=None,
                   help="how the cache stores indexer keys (default: FP8 when the model scores in FP8, "
                        "mdsa_fp8_indexer; else the weights' dtype)")
    g.add_argument("--cuda-graphs", action="store_true", help="replay the decode step as CUDA graphs (GPU only)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    try:
        tokenizer = SentencePieceTokenizer(args.tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's and megatron-core's chatter: bad input is one line
            model, _ = load_model(args.checkpoint, size=args.size, overrides=parse_set_options(args.set))
    except (ConversionError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    ids = tokenizer.tokenize(args.prompt)
    if not ids:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    vocab = model.embedding.word_embeddings.weight.shape[0]
    if max(ids) >= vocab:
        print(f"error: the tokenizer produces ids >= the model's vocabulary ({vocab})", file=sys.stderr)
        return 2
    try:
        engine = DSAInference(model, mode=args.mode, kernel=args.kernel, indexer_keys=args.indexer_keys,
                              cuda_graphs=args.cuda_graphs)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    new = engine.generate(torch.tensor([ids], device=device), args.max_new_tokens, eos_id=tokenizer.eos)
    dt = time.perf_counter() - t0
    new_ids = new[0].tolist()
    print(tokenizer.detokenize(new_ids))
    if args.show_ids:
        print(f"prompt ids: {ids}\nnew ids: {new_ids}", file=sys.stderr)
    print(f"[{len(ids)} prompt + {len(new_ids)} new tokens, {args.mode}, {dt:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
