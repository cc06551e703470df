"""CLI: ``python -m megatron_dsa.data build --source DIR --out DIR --vocab-size N``;
``python -m megatron_dsa.data build-tasks --base DIR --out DIR --seq-length N`` (the task mixture)."""

from __future__ import annotations

import argparse
import sys
import time

from megatron_dsa.data.corpus import (
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_BYTES,
    DEFAULT_VALID_FRACTION,
    DataError,
    build_corpus,
)
from megatron_dsa.data.mixture import QUERY_TOKENS, build_task_corpus
from megatron_dsa.data.tasks import TASKS, TRAINING_FAMILIES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsa.data")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="train a tokenizer and write train/valid Megatron indexed datasets"
    )
    build.add_argument(
        "--source", help="directory of text/source files (default: this Python's stdlib)"
    )
    build.add_argument(
        "--out", required=True, help="output directory (must not exist unless --overwrite)"
    )
    build.add_argument("--vocab-size", type=int, required=True)
    build.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                       help="total bytes of source text to read (default: %(default)s)")
    build.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION,
                       help="fraction of files held out for validation (default: %(default)s)")
    build.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS),
                       help="comma-separated file extensions (default: %(default)s)")
    build.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    tasks = commands.add_parser(
        "build-tasks", help="embed synthetic long-range tasks in a built corpus (megatron_dsa.data.mixture)"
    )
    tasks.add_argument("--base", required=True, help="a corpus built by `build`")
    tasks.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    tasks.add_argument("--seq-length", type=int, required=True, help="the training length: one document each")
    tasks.add_argument("--ratio", type=float, default=0.5, help="share of documents with a task (default: %(default)s)")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (default: %(default)s)")
    tasks.add_argument("--query-tokens", type=int, default=QUERY_TOKENS,
                       help="one query per this many tokens of a task document (default: %(default)s)")
    tasks.add_argument("--family", default="train", choices=TRAINING_FAMILIES,
                       help="the training format family (default: %(default)s; train_wide: many more wordings; "
                            "train_varied: wordings drawn from random phrases)")
    tasks.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _run(build, report) -> int:
    """``build()`` -> manifest, then ``report(manifest, seconds)``; a DataError is one line on
    stderr and exit status 2."""
    start = time.perf_counter()
    try:
        manifest = build()
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report(manifest, time.perf_counter() - start)
    return 0


def _report_tasks(args, manifest, seconds) -> None:
    print(f"task corpus {args.out} from {args.base} in {seconds:.1f}s: "
          f"seq_length {manifest['seq_length']}, ratio {manifest['ratio']}, seed {manifest['seed']}, "
          f"{manifest['queries_per_document']} queries per task document, {manifest['family']} formats")
    for name, split in manifest["splits"].items():
        print(f"  {name}: {split['documents']} documents ({split['task_documents']} with tasks), "
              f"{split['answer_tokens']} answer tokens")


def _report_corpus(args, manifest, seconds) -> None:
    print(f"corpus {args.out} from {manifest['source']} in {seconds:.1f}s")
    print(f"  tokenizer {manifest['tokenizer']}: vocab {manifest['vocab_size']}, "
          f"eod {manifest['eod']}, dtype {manifest['dtype']}")
    for name, split in manifest["splits"].items():
        print(f"  {name}: {split['documents']} documents, {split['bytes']} bytes, "
              f"{split['tokens']} tokens -> {split['prefix']}.bin/.idx")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build-tasks":
        return _run(lambda: build_task_corpus(args.out, args.base, args.seq_length, ratio=args.ratio, seed=args.seed,
                                              tasks=args.tasks.split(","), query_tokens=args.query_tokens,
                                              family=args.family, overwrite=args.overwrite),
                    lambda manifest, seconds: _report_tasks(args, manifest, seconds))
    return _run(lambda: build_corpus(args.out, args.source, args.vocab_size, extensions=args.extensions.split(","),
                                     max_bytes=args.max_bytes, valid_fraction=args.valid_fraction,
                                     model_type=args.model_type, overwrite=args.overwrite),
                lambda manifest, seconds: _report_corpus(args, manifest, seconds))


if __name__ == "__main__":
    sys.exit(main())
