"""A built-in long-context retrieval suite on code-like haystacks.

Three tasks, each at any length (tokens, prompt + answer exactly) and needle depth:

    single     one needle line ``SECRET_<word>_<n> = '<value>'`` hidden in the haystack;
               query ``assert SECRET_<word>_<n> == '`` -> answer ``<value>``.
    multikey   ``num_keys`` such lines with different names and values at different depths;
               the query asks the one at the requested depth (the others are distractors).
    kvrecall   a long dict literal ``REGISTRY_<n> = {'key_0': 'val_0', ...}`` (one pair a line,
               as in real code) at the requested depth; query ``assert REGISTRY_<n>['key_j'] == '``.

The haystack is real held-out code (the corpus's validation documents) or, without them,
synthetic Python. Items are built in token space (pieces tokenized separately and
concatenated), so lengths and needle positions are exact and the value's tokens in the needle
are the very answer tokens.

Scoring: exact match of the greedy-decoded value. With teacher forcing, greedy decoding
reproduces the answer iff the argmax at every answer position (given the correct prefix)
is the answer token, so ONE forward pass of prompt + answer decides it exactly, in the
model's own forward (the training kernels, dense or sparse) with no KV cache. This is
cheaper than ranking the value against distractors (one forward per candidate) and stricter
(chance is vocab^-len, i.e. 0; the per-token accuracy, chance 1/vocab, is reported too, and
the answer's mean negative log-likelihood, which still ranks models that never answer exactly).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from megatron_dsa.config import set_mode

TASKS = ("single", "multikey", "kvrecall")
_WORDS = ("alpha", "bravo", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo",
          "juniper", "kepler", "lumen", "marble", "nimbus", "onyx", "pepper", "quartz", "raven",
          "sierra", "tundra", "umber", "violet", "willow", "xenon", "yonder", "zephyr")
_VALUE_CHARS = string.ascii_lowercase + string.digits
LOGPROB_CHUNK = 4096  # positions per fp32 log-softmax in model_predictor (bounds its memory)


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]: ...


@dataclass
class RetrievalItem:
    """One retrieval prompt. ``prompt + answer`` has exactly ``length`` tokens."""

    task: str
    length: int
    depth: float
    prompt: list[int]
    answer: list[int]
    key: str
    value: str
    # [start, end) token spans of the needles in ``prompt``; the asked one first.
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)
    extrapolation: bool = False  # longer than the training length

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.answer


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _value(rng: random.Random, n: int = 6) -> str:
    return "".join(rng.choice(_VALUE_CHARS) for _ in range(n))


# --------------------------------------------------------------------------------------------
# Haystack


def synthetic_python(rng: random.Random, n_lines: int) -> str:
    """Plausible Python: small functions, loops, constants, docstrings."""
    lines: list[str] = []
    while len(lines) < n_lines:
        name = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}"
        args = ", ".join(rng.sample(["x", "y", "data", "items", "count", "path", "limit"], rng.randint(1, 3)))
        lines.append(f"def {name}({args}):")
        lines.append(f'    """Return the {rng.choice(_WORDS)} of {args.split(",")[0]}."""')
        for _ in range(rng.randint(2, 6)):
            kind = rng.randint(0, 3)
            var = rng.choice(["total", "result", "acc", "value", "n", "out"])
            if kind == 0:
                lines.append(f"    {var} = {rng.randint(0, 999)} * {rng.choice(['x', 'count', 'limit', '2'])}")
            elif kind == 1:
                lines.append(f"    for i in range({rng.randint(2, 64)}):")
                lines.append(f"        {var} += i % {rng.randint(2, 9)}")
            elif kind == 2:
                lines.append(f"    if {var} > {rng.randint(0, 100)}:")
                lines.append(f"        return {var}")
            else:
                lines.append(f"    {var} = [{', '.join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 5)))}]")
        lines.append(f"    return {rng.choice(['total', 'result', 'None', 'x'])}")
        lines.append("")
    return "\n".join(lines) + "\n"


class FillerPool:
    """A token stream of haystack text; ``window(n, rng)`` is a random contiguous slice."""

    def __init__(self, tokenizer: Tokenizer, texts: Iterable[str] | None, min_tokens: int, seed: int = 0):
        self.tokens: list[int] = []
        if texts is not None:
            for text in texts:
                self.tokens += tokenizer.tokenize(text)
                if len(self.tokens) >= 2 * min_tokens:
                    break
        rng = _rng("filler", seed)
        while len(self.tokens) < min_tokens + 1:
            self.tokens += tokenizer.tokenize(synthetic_python(rng, 200))

    def window(self, n: int, rng: random.Random) -> list[int]:
        if n <= 0:
            return []
        start = rng.randrange(0, len(self.tokens) - n + 1)
        return self.tokens[start:start + n]


# --------------------------------------------------------------------------------------------
# Items


def _pieces(tokenizer: Tokenizer, *parts: str) -> list[int]:
    out: list[int] = []
    for part in parts:
        out += tokenizer.tokenize(part)
    return out


def _assemble(filler: list[int], needles: list[tuple[float, list[int]]], tail: list[int]):
    """Insert needles (depth, tokens) into ``filler`` so that each starts at token
    round(depth * len(prompt)) of the prompt (as near as the order allows); returns
    (prompt, spans in input order)."""
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    total = len(filler) + sum(len(t) for _, t in needles) + len(tail)
    prompt: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    cursor = 0
    for i in order:
        depth, toks = needles[i]
        inserted = len(prompt) - cursor
        at = min(len(filler), max(cursor, round(depth * total) - inserted))
        prompt += filler[cursor:at]
        cursor = at
        spans[i] = (len(prompt), len(prompt) + len(toks))
        prompt += toks
    prompt += filler[cursor:] + tail
    return prompt, [spans[i] for i in range(len(needles))]


def build_items(task: str, length: int, n: int, tokenizer: Tokenizer, pool: FillerPool,
                seed: int = 0, depths: Sequence[float] | None = None, num_keys: int = 4,
                num_pairs: int | None = None) -> list[RetrievalItem]:
    """``n`` items of one task at one length (depths evenly spread over [0.1, 0.9] unless given)."""
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; known: {TASKS}")
    if depths is None:
        depths = [0.5] if n == 1 else [0.1 + 0.8 * i / (n - 1) for i in range(n)]
    if len(depths) != n:
        raise ValueError(f"need {n} depths, got {len(depths)}")
    items = []
    for i, depth in enumerate(depths):
        rng = _rng(task, length, seed, i)
        uid = rng.randrange(10, 10_000)
        if task == "single":
            key = f"SECRET_{rng.choice(_WORDS).upper()}_{uid}"
            value = _value(rng)
            needle = _pieces(tokenizer, f"\n{key} = '", value, "'\n")
            needles = [(depth, needle)]
            query = _pieces(tokenizer, f"\nassert {key} == '")
            distractors: list[str] = []
        elif task == "multikey":
            names = rng.sample(_WORDS, num_keys)
            keys = [f"CONFIG_{w.upper()}_{uid}" for w in names]
            values = [_value(rng) for _ in keys]
            other_depths = [rng.uniform(0.05, 0.95) for _ in keys[1:]]
            needles = [(d, _pieces(tokenizer, f"\n{k} = '", v, "'\n"))
                       for d, k, v in zip([depth, *other_depths], keys, values)]
            key, value, distractors = keys[0], values[0], values[1:]
            query = _pieces(tokenizer, f"\nassert {key} == '")
        else:  # kvrecall
            pairs = num_pairs or max(4, min(256, length // 64))
            while True:
                names = [f"{rng.choice(_WORDS)}_{j}" for j in range(pairs)]
                values = [_value(rng) for _ in names]
                # the asked pair's place in the block follows the depth, so the block fits
                ask = min(pairs - 1, max(0, round(depth * (pairs - 1)) + rng.randint(-1, 1)))
                reg = f"REGISTRY_{uid}"
                head = _pieces(tokenizer, f"\n{reg} = {{\n")
                lines = [_pieces(tokenizer, f"    '{k}': '", v, "',\n") for k, v in zip(names, values)]
                block = head + [t for line in lines for t in line] + _pieces(tokenizer, "}\n")
                if len(block) <= 0.5 * length or pairs <= 2:
                    break
                pairs = max(2, pairs // 2)
            # The asked pair's line is the needle: put the block so that line sits at the depth.
            before = len(head) + sum(len(line) for line in lines[:ask])
            needles = [(depth, block)]
            key, value = names[ask], values[ask]
            distractors = values[:ask] + values[ask + 1:]
            query = _pieces(tokenizer, f"\nassert {reg}['{key}'] == '")
        answer = tokenizer.tokenize(value)
        fixed = sum(len(t) for _, t in needles) + len(query) + len(answer)
        n_filler = length - fixed
        if n_filler < 1:
            raise ValueError(f"length {length} is too short for task {task!r} (needs > {fixed} tokens)")
        filler = pool.window(n_filler, rng)
        if task == "kvrecall":
            # shift the block so the asked line (not the block start) lands at the depth
            frac = max(0.0, min(1.0, depth - before / (length - len(answer))))
            needles = [(frac, needles[0][1])]
        prompt, spans = _assemble(filler, needles, query)
        if task == "kvrecall":
            s0 = spans[0][0] + before
            spans = [(s0, s0 + len(lines[ask]))]
        item = RetrievalItem(task, length, float(depth), prompt, answer, key, value, spans, distractors)
        assert len(item.tokens) == length, (len(item.tokens), length)
        items.append(item)
    return items


def build_suite(tokenizer: Tokenizer, lengths: Sequence[int], n_per: int, texts: Iterable[str] | None = None,
                tasks: Sequence[str] = TASKS, seed: int = 0, num_keys: int = 4) -> list[RetrievalItem]:
    """Every task at every length, ``n_per`` items each (same haystack pool for all)."""
    pool = FillerPool(tokenizer, texts, min_tokens=2 * max(lengths), seed=seed)
    items = []
    for length in lengths:
        for task in tasks:
            items += build_items(task, length, n_per, tokenizer, pool, seed=seed, num_keys=num_keys)
    return items


# --------------------------------------------------------------------------------------------
# Scoring


Predictor = Callable[[list[list[int]]], Any]
"""Given equal-length token sequences, the argmax next-token id at every position; or a pair
(argmax ids, log-probabilities of the sequence's own next token at every position but the
last), which adds the answer's log-likelihood to the scores."""


def score_items(items: Sequence[RetrievalItem], predict: Predictor, max_batch_tokens: int = 65536) -> dict:
    """Exact match (greedy, teacher-forced: see the module docstring) and per-token accuracy.

    Returns {"items": [per-item dicts], "by_task_length": {task: {length: {"exact": %, "token": %,
    "n": count}}}, "by_length": {length: {...}}} with percentages in [0, 100]."""
    per_item: list[dict] = [None] * len(items)  # type: ignore[list-item]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_len[item.length].append(i)
    for length, idx in sorted(by_len.items()):
        bs = max(1, max_batch_tokens // length)
        for b in range(0, len(idx), bs):
            chunk = idx[b:b + bs]
            out = predict([items[i].tokens for i in chunk])
            preds, logps = out if isinstance(out, tuple) else (out, None)
            for j, (i, pred) in enumerate(zip(chunk, preds)):
                item = items[i]
                p, n = len(item.prompt), len(item.answer)
                got = [int(t) for t in pred[p - 1:p - 1 + n]]
                hits = [g == a for g, a in zip(got, item.answer)]
                per_item[i] = {"task": item.task, "length": item.length, "depth": item.depth,
                               "exact": all(hits), "token_acc": sum(hits) / len(hits),
                               "extrapolation": item.extrapolation}
                if logps is not None:  # position t scores token t + 1: the answer is p .. p + n - 1
                    per_item[i]["answer_nll"] = -sum(float(x) for x in logps[j][p - 1:p - 1 + n]) / n
    table: dict = defaultdict(dict)
    groups: dict = defaultdict(list)
    for r in per_item:
        groups[(r["task"], r["length"])].append(r)
    for (task, length), rs in sorted(groups.items()):
        table[task][length] = _agg(rs)
    by_length = {length: _agg([r for r in per_item if r["length"] == length]) for length in sorted(by_len)}
    return {"items": per_item, "by_task_length": dict(table), "by_length": by_length}


def _agg(rs: list[dict]) -> dict:
    nll = [r["answer_nll"] for r in rs if "answer_nll" in r]
    return {"exact": 100.0 * sum(r["exact"] for r in rs) / len(rs),
            "extrapolation": any(r.get("extrapolation", False) for r in rs),
            "token": 100.0 * sum(r["token_acc"] for r in rs) / len(rs), "n": len(rs),
            # mean negative log-likelihood of the answer tokens (nats): it still ranks models
            # that never get an answer exactly right
            "nll": sum(nll) / len(nll) if nll and len(nll) == len(rs) else None}


def model_predictor(model, mode: str, device=None) -> Predictor:
    """Argmax next tokens and the log-probability of each actual next token, from the model's
    own full forward in ``mode`` ('dense' | 'sparse')."""
    device = device or next(model.parameters()).device

    @torch.no_grad()
    def predict(seqs: list[list[int]]):
        tokens = torch.tensor(seqs, dtype=torch.long, device=device)
        old = model.config.mdsa_mode
        set_mode(model.config, mode)
        try:
            positions = torch.arange(tokens.shape[1], device=device)[None].expand(tokens.shape[0], -1)
            logits = model(tokens, positions, None)
            logp = []
            for t0 in range(0, tokens.shape[1] - 1, LOGPROB_CHUNK):  # fp32 log-softmax a slice at a time
                t1 = min(tokens.shape[1] - 1, t0 + LOGPROB_CHUNK)
                chunk = logits[:, t0:t1].float()
                nxt = tokens[:, t0 + 1:t1 + 1, None]
                logp.append(chunk.gather(-1, nxt).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
            logp = torch.cat(logp, dim=1) if logp else logits.new_zeros(tokens.shape[0], 0)
            return logits.argmax(-1).tolist(), logp.tolist()
        finally:
            set_mode(model.config, old)

    return predict
