"""Validation LM loss at several context lengths on the corpus's held-out split.

For a budget of ``total`` target tokens (a multiple of every length), the first ``total + 1``
tokens of the validation stream (documents EOD-separated, as the trainer reads them) are cut
into windows of ``L`` tokens for each length ``L``; the loss at ``L`` is the mean next-token
cross-entropy over all ``total`` targets. Every length scores the SAME target tokens, only the
context they see differs, so the numbers are comparable across lengths and across arms.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy
import torch

from megatron_dsa.config import set_mode
from megatron_dsa.data import load_manifest, validate_indexed_dataset


def read_valid_tokens(data_dir: str | Path, split: str = "valid") -> numpy.ndarray:
    """The token stream of one split of a corpus built by ``megatron_dsa.data`` (int64)."""
    manifest = load_manifest(data_dir)
    info = validate_indexed_dataset(Path(data_dir) / manifest["splits"][split]["prefix"])
    return numpy.fromfile(info.prefix + ".bin", dtype=info.dtype).astype(numpy.int64)


def plan_total(num_tokens: int, lengths: Sequence[int], max_total: int | None = None) -> int:
    """The largest multiple of lcm(lengths) that fits ``num_tokens - 1`` (and ``max_total``)."""
    step = math.lcm(*lengths)
    cap = num_tokens - 1 if max_total is None else min(num_tokens - 1, max_total)
    total = (cap // step) * step
    if total <= 0:
        raise ValueError(f"{num_tokens} tokens are too few for context length {max(lengths)}")
    return total


def validation_loss_at_lengths(model, tokens, lengths: Sequence[int], mode: str, max_total: int | None = None,
                               max_batch_tokens: int = 65536, device=None) -> dict[int, float]:
    """{length: mean next-token loss} of ``model`` in ``mode`` ('dense' | 'sparse') over the
    same ``plan_total`` target tokens for every length."""
    device = device or next(model.parameters()).device
    stream = torch.as_tensor(numpy.asarray(tokens), dtype=torch.long)
    total = plan_total(len(stream), lengths, max_total)
    out = {}
    old = model.config.mdsa_mode
    set_mode(model.config, mode)
    try:
        with torch.no_grad():
            for length in sorted(lengths):
                x = stream[:total].view(-1, length)
                y = stream[1:total + 1].view(-1, length)
                bs = max(1, max_batch_tokens // length)
                loss_sum = 0.0
                for b in range(0, x.shape[0], bs):
                    xb, yb = x[b:b + bs].to(device), y[b:b + bs].to(device)
                    pos = torch.arange(length, device=device)[None].expand(xb.shape[0], -1)
                    per_token = model(xb, pos, None, labels=yb)  # [B, L] cross-entropy
                    loss_sum += float(per_token.float().sum())
                out[int(length)] = loss_sum / total
    finally:
        set_mode(model.config, old)
    return out
