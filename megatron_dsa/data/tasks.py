"""Synthetic long-range tasks embedded in natural text, and a solver that reads them back.

Five tasks, each a set of facts hidden in a stretch of natural text and a query about one of
them that comes later (anywhere from a few tokens to the whole context later):

    passkey     a named pass key: ``The pass key of {key} is {value}.``
    multikey    associative recall among many keys: ``{key} maps to {value};``
    multivalue  one key collects several values over the text; the answer is all of them, in order
    varchain    variable tracking through code: ``a = 41207`` ... ``b = a`` ... ``print(b)  # prints``
    copy        an earlier span of words between tags, repeated on request

Format families share the tasks and nothing else: ``TRAIN`` (the training mixture) and
``HELDOUT`` (the evaluation items). Their template wordings, key alphabets (lowercase letters
vs upper-case letters and digits), distractor densities (facts per 4096 tokens), values per
key and chain lengths are disjoint sets, so a held-out item's format never occurs in training.
``TRAIN_WIDE`` is a second training family, TRAIN's formats and many more (100+ wordings a task
from combined phrasings, keys with digits or capitalised), as disjoint from HELDOUT;
``TRAIN_VARIED`` a third, its wordings drawn from random phrases (200 a task, none recurring).

Everything is built in token space: the filler is a token window of natural text, each task
segment is tokenized on its own and spliced in, so lengths are exact and the answer tokens are
known (``answer_mask``). The tokenizer must be lossless on concatenation (the corpus's
sentencepiece model: no dummy prefix, identity normalization), so the decoded text of the
tokens is the text ``solve`` reads.

``solve(text)`` is the independent check: plain Python that knows only the families'
wordings. Given the text of a context ending in a query, it finds the key in the query, the
facts about that key in the text and returns the answer; it never sees what the generator
recorded.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

TASKS = ("passkey", "multikey", "multivalue", "varchain", "copy")
DENSITY_TOKENS = 4096  # a family's densities are distractor facts per this many tokens


class TaskError(ValueError):
    """Bad task settings (unknown task, a length too short for the task), one clear message."""


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Wording:
    """One template set of a task. ``define`` states a fact ({key}, {value}); ``query`` is the
    prompt the answer follows ({key}); ``hop`` (varchain) copies one variable into another
    ({dst}, {src}); ``sep`` (multivalue) joins the values of the answer."""

    define: str
    query: str
    hop: str = ""
    sep: str = ""


@dataclass(frozen=True)
class Family:
    """A format family: wordings per task, the key alphabet, and the sizes it draws from."""

    name: str
    wordings: dict[str, tuple[Wording, ...]]
    key_alphabet: str
    key_first: str  # the key's first character (keys in code must not start with a digit)
    key_lengths: tuple[int, ...]  # a key's length is drawn from these
    densities: tuple[int, ...]
    values_per_key: tuple[int, ...]
    hops: tuple[int, ...]
    value_digits: int = 5
    # more (first character, alphabet) key styles, each drawn as often as (key_first, key_alphabet)
    more_key_styles: tuple[tuple[str, str], ...] = ()

    @property
    def key_styles(self) -> tuple[tuple[str, str], ...]:
        return ((self.key_first, self.key_alphabet), *self.more_key_styles)


_COPY_WORDS = ("amber", "basin", "cedar", "dune", "elm", "fjord", "grove", "heath", "inlet", "jade",
               "knoll", "larch", "marsh", "nectar", "oak", "pine", "quill", "reef", "sage", "thorn",
               "upland", "vale", "wheat", "yarrow", "zinnia", "birch", "coral", "delta", "fern", "glen")

# Six wordings per task, keys of four lengths: a small model that sees two wordings learns those
# two (at 512 tokens it answered 88% of new training-format items and none of the held-out ones),
# so the training formats vary enough that only "find the key, copy what belongs to it" pays.
TRAIN = Family(
    name="train",
    wordings={
        "passkey": (
            Wording("The pass key of {key} is {value}. Remember it.", "What is the pass key of {key}? The pass key of {key} is "),
            Wording("Remember this: {key} has the pass key {value}.", "Recall the pass key of {key}: "),
            Wording("Password for account {key}: {value}", "The password for account {key} is "),
            Wording("PIN of user {key} = {value}", "user {key} has PIN "),
            Wording("Keep {value} as the access number of {key}.", "Access number of {key}? It is "),
            Wording("{key} unlocks with {value}.", "To unlock {key}, enter "),
        ),
        "multikey": (
            Wording("{key} maps to {value};", "Lookup: {key} maps to "),
            Wording("# config {key} = {value}", "# the config value of {key} is "),
            Wording('"{key}": {value},', 'value of "{key}" -> '),
            Wording("put {key} {value}", "get {key} -> "),
            Wording("table[{key}] = {value}", "table[{key}] == "),
            Wording("{key} => {value}", "where does {key} point? To "),
        ),
        "multivalue": (
            Wording("append {value} to list {key}", "list {key} holds: ", sep=", "),
            Wording("{key} gets another number: {value}.", "All numbers {key} got, in order: ", sep=" and "),
            Wording("{key}.push({value})", "{key} == [", sep=", "),
            Wording("add {value} to bucket {key}", "bucket {key} has ", sep=" then "),
            Wording("record {key}: {value}", "records of {key}: ", sep="; "),
            Wording("{key} also scored {value}", "scores of {key}, first to last: ", sep=" / "),
        ),
        "varchain": (
            Wording("{key} = {value}", "print({key})  # prints ", hop="{dst} = {src}"),
            Wording("var {key} = {value};", "console.log({key}); // logs ", hop="var {dst} = {src};"),
            Wording("const {key} = {value};", "alert({key}); // shows ", hop="const {dst} = {src};"),
            Wording("{key} <- {value}", "cat({key})  # gives ", hop="{dst} <- {src}"),
            Wording("my ${key} = {value};", "say ${key};  # says ", hop="my ${dst} = ${src};"),
            Wording("int {key} = {value};", "printf({key}); // writes ", hop="int {dst} = {src};"),
        ),
        "copy": (
            Wording("<<{key}>> {value} <</{key}>>", "Repeat <<{key}>>: "),
            Wording("Span {key} begins: {value} (end of span {key})", "Copy span {key}: "),
            Wording("BEGIN {key} {value} END {key}", "Say {key} again: "),
            Wording("({key}) {value} (/{key})", "Write out {key}: "),
            Wording("line-{key}: {value}.", "Give line-{key} once more: "),
            Wording("{key} says: {value}", "What did {key} say? "),
        ),
    },
    key_alphabet="abcdefghijklmnopqrstuvwxyz_",
    key_first="bcdfghjklmnprstvz",
    key_lengths=(4, 5, 6, 7),
    densities=(2, 4, 8),
    values_per_key=(2, 3),
    hops=(1, 2),
)

HELDOUT = Family(
    name="heldout",
    wordings={
        "passkey": (
            Wording("Note that the secret code for {key} reads {value} exactly.", "Question: which secret code belongs to {key}? Answer: "),
        ),
        "multikey": (
            Wording('<entry name="{key}" val="{value}"/>', '<lookup name="{key}"/> yields '),
        ),
        "multivalue": (
            # The answer joins the values with a separator the text never shows, which no model
            # could infer if it were new: it is the most common training one; the wording is new.
            Wording("LOG {key} += {value}", "REPORT {key} ALL VALUES => ", sep=", "),
        ),
        "varchain": (
            Wording("let {key} := {value};", "echo {key} outputs ", hop="let {dst} := {src};"),
        ),
        "copy": (
            Wording("[[quote {key}]] {value} [[/quote]]", "Quote block {key} verbatim: "),
        ),
    },
    key_alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789",
    key_first="ABCDEFGHJKLMNPQRSTUVWXYZ",
    key_lengths=(5,),
    densities=(3, 6, 12),
    values_per_key=(4,),
    hops=(3,),
)



def _wide_wordings() -> dict[str, tuple[Wording, ...]]:
    """TRAIN's wordings and, per task, the products of a few phrasings of the fact and of the
    question (100+ a task): with six wordings a task the small model answers the training
    formats and none of the held-out ones, so the wide family varies the text around the key
    and value enough that copying the value that follows the asked key is the only pattern that
    pays. No phrase of HELDOUT's occurs (tests/test_tasks.py)."""
    nouns = ("pass key", "PIN", "access number", "unlock number", "login number", "badge number")
    facts = ("The {n} of {{key}} is {{value}}.", "{{key}} has the {n} {{value}}", "{n} for {{key}}: {{value}}",
             "Set the {n} of {{key}} to {{value}};", "{{key}} -- {n} {{value}} (remember it)")
    asks = ("What is the {n} of {{key}}? It is ", "Recall the {n} for {{key}}: ", "{{key}} uses the {n} ",
            "the {n} of {{key}} was ")
    passkey = [Wording(f.format(n=n), a.format(n=n)) for n in nouns for f in facts for a in asks]
    arrows = ("maps to", "->", "=>", "is bound to", "points at", "goes with")
    containers = ("{{key}} {a} {{value}};", "* {{key}} {a} {{value}}", "entry {{key}} {a} {{value}}",
                  "({{key}} {a} {{value}})")
    lookups = ("Lookup: {{key}} {a} ", "so {{key}} {a} ", "Find {{key}}; it {a} ", "check: {{key}} {a} ")
    multikey = [Wording(c.format(a=a), q.format(a=a)) for a in arrows for c in containers for q in lookups]
    verbs = ("append {{value}} to", "add {{value}} to", "push {{value}} onto", "store {{value}} in",
             "write {{value}} into")
    boxes = ("list", "bucket", "queue", "stack", "tray")
    reads = (("{b} {{key}} holds: ", ", "), ("everything in {b} {{key}}, in order: ", " and "),
             ("{b} {{key}} now has ", "; "), ("contents of {b} {{key}}: ", " then "))
    multivalue = [Wording(f"{v.format()} {b} {{key}}", r.format(b=b), sep=sep)
                  for v in verbs for b in boxes for r, sep in reads]
    langs = (("{key} = {value}", "{dst} = {src}"), ("var {key} = {value};", "var {dst} = {src};"),
             ("set {key} to {value}", "set {dst} to {src}"), ("local {key} = {value}", "local {dst} = {src}"),
             ("val {key} = {value}", "val {dst} = {src}"), ("auto {key} = {value};", "auto {dst} = {src};"),
             ("{key}: int = {value}", "{dst}: int = {src}"), ("{key} <- {value}", "{dst} <- {src}"))
    shows = ("print({key})  # prints ", "log({key}); // logs ", "show {key}  -- shows ", "{key} is now ",
             "dump({key})  # gives ")
    varchain = [Wording(d, q, hop=h) for d, h in langs for q in shows]
    tags = (("<<{key}>> {value} <</{key}>>", "<<{key}>>"), ("BEGIN {key} {value} END {key}", "{key}"),
            ("({key}) {value} (/{key})", "({key})"), ("--{key}-- {value} --end {key}--", "--{key}--"),
            ("@{key} {value} @end {key}", "@{key}"), ("{key} says: {value}", "what {key} said"))
    repeats = ("Repeat {t}: ", "Copy {t} once more: ", "Say {t} again: ", "Write out {t}: ")
    copy = [Wording(d, r.format(t=t)) for d, t in tags for r in repeats]
    wide = {"passkey": passkey, "multikey": multikey, "multivalue": multivalue, "varchain": varchain, "copy": copy}
    return {task: tuple(dict.fromkeys([*TRAIN.wordings[task], *wide[task]])) for task in TASKS}


# The wide training family: many wordings, three key styles (lowercase with '_', lowercase with
# digits, capitalised), and chains of 1, 2 and 4 hops, which put HELDOUT's 3 between training
# ones. Densities and values per key stay TRAIN's: 16 distractors per 4096 tokens, or five values
# a key, beside a query per 128-256 tokens leave too little natural text at 512.
TRAIN_WIDE = Family(
    name="train_wide",
    wordings=_wide_wordings(),
    key_alphabet=TRAIN.key_alphabet,
    key_first=TRAIN.key_first,
    more_key_styles=(("bcdfghjklmnprstvz", "abcdefghijklmnopqrstuvwxyz0123456789"),
                     ("BCDFGHJKLMNPRSTVZ", "abcdefghijklmnopqrstuvwxyz")),
    key_lengths=(4, 5, 6, 7),
    densities=(2, 4, 8),
    values_per_key=(2, 3),
    hops=(1, 2, 4),
)


def _varied_wordings(per_task: int = 200, seed: int = 0) -> dict[str, tuple[Wording, ...]]:
    """``per_task`` wordings a task drawn from a grammar of random phrases around the key and the
    value: the wide family's 126 fixed phrasings a task taught a retrieval tied to them (the
    held-out wording alone took the model from 78% to 0%), so here no phrase recurs often enough to
    be the cue and only "the line that names the key, then what follows it" is. Multi-value answers
    are joined with ", ", the separator the held-out items use. No word of HELDOUT's phrases occurs."""
    rng = random.Random(f"varied:{seed}")
    fillers = ("item", "number", "record", "field", "slot", "tag", "unit", "card", "label", "mark", "figure",
               "amount", "count", "level", "score", "rank", "ticket", "serial", "handle", "symbol", "stored",
               "saved", "kept", "given", "assigned", "linked", "paired", "held", "current", "final", "known",
               "listed", "noted", "logged", "main", "new", "old", "first", "last", "this", "our", "its", "with",
               "under", "from", "at", "as", "now", "then", "here", "also", "again", "please", "so", "hint",
               "memo", "remark", "fact", "info", "data", "mind", "keep", "see", "check", "look", "find", "tell",
               "give", "show", "recall", "state", "say")

    def phrase(lo: int, hi: int) -> str:
        return " ".join(rng.choice(fillers) for _ in range(rng.randint(lo, hi)))

    links = (":", " =", " ->", " is", " -", ",", " has", " gets", " ~", " holds", " at")
    ends = ("", ".", ";", " ok", " (kept)", " !")
    asks = ("?", ":", " =", " ->", " is", "", " now", " was")

    def fact() -> str:
        if rng.random() < 0.25:  # the value first, as in some natural phrasings
            return f"{phrase(1, 3)} {{value}} {phrase(1, 2)} {{key}}{rng.choice(ends)}"
        return f"{phrase(0, 3)} {{key}}{rng.choice(links)} {{value}}{rng.choice(ends)}".lstrip()

    def ask() -> str:
        return f"{phrase(1, 3)} {{key}}{rng.choice(asks)} "

    keywords = ("", "var ", "my ", "new ", "int ", "num ", "val ", "const ")
    ops = ("=", "<-", "is", "gets", "=:", "becomes")
    tags = (("<", ">", "</", ">"), ("[", "]", "[/", "]"), ("#", "#", "#end ", "#"), ("(", ")", "(/", ")"),
            ("*", "*", "*/", "*"), ("|", "|", "|/", "|"), ("@", "", "@end ", ""), ("%", "%", "%/", "%"))

    def make(task: str) -> Wording:
        if task == "varchain":
            kw, op, end = rng.choice(keywords), rng.choice(ops), rng.choice(("", ";", "."))
            return Wording(f"{kw}{{key}} {op} {{value}}{end}", ask(), hop=f"{kw}{{dst}} {op} {{src}}{end}")
        if task == "copy":
            o, c, o2, c2 = rng.choice(tags)
            return Wording(f"{o}{{key}}{c} {{value}} {o2}{{key}}{c2}", ask())
        return Wording(fact(), ask(), sep=", " if task == "multivalue" else "")

    # a query belongs to one wording of one task, so the text tells which fact it asks for
    queries = {w.query for f in (TRAIN, TRAIN_WIDE) for ws in f.wordings.values() for w in ws}
    out: dict[str, list[Wording]] = {task: [] for task in TASKS}
    for task in TASKS:
        while len(out[task]) < per_task:
            w = make(task)
            if w.query not in queries:
                queries.add(w.query)
                out[task].append(w)
    return {task: tuple(ws) for task, ws in out.items()}


# The varied training family: TRAIN_WIDE's keys, densities, values per key and chain lengths, with
# wordings drawn from random phrases instead of fixed ones.
TRAIN_VARIED = replace(TRAIN_WIDE, name="train_varied", wordings=_varied_wordings())

FAMILIES = {f.name: f for f in (TRAIN, HELDOUT, TRAIN_WIDE, TRAIN_VARIED)}
TRAINING_FAMILIES = ("train", "train_wide", "train_varied")


# --------------------------------------------------------------------------------------------
# Building


@dataclass
class Query:
    """One answered query of a document: the answer is ``tokens[start:end]``."""

    task: str
    key: str
    answer: str
    start: int
    end: int
    needle: tuple[int, int]  # [start, end) tokens of the (first) fact the answer comes from


@dataclass
class TaskText:
    """Natural text with task segments spliced in."""

    task: str
    family: str
    density: int
    tokens: list[int]
    answer_mask: list[int]
    queries: list[Query] = field(default_factory=list)
    distractor_answers: list[str] = field(default_factory=list)


@dataclass
class _Segment:
    tokens: list[int]
    answer: list[int] | None = None  # a query's answer (follows its prompt)
    answer_text: str = ""
    key: str = ""
    first_fact: "_Segment | None" = None


def _key(rng: random.Random, family: Family, used: set[str]) -> str:
    while True:
        first, alphabet = rng.choice(family.key_styles)
        key = rng.choice(first) + "".join(rng.choice(alphabet) for _ in range(rng.choice(family.key_lengths) - 1))
        if key not in used:
            used.add(key)
            return key


def _value(rng: random.Random, family: Family, task: str, used: set[str]) -> str:
    while True:
        if task == "copy":
            value = " ".join(rng.choice(_COPY_WORDS) for _ in range(rng.randint(4, 7)))
        else:
            value = str(rng.randint(10 ** (family.value_digits - 1), 10 ** family.value_digits - 1))
        if value not in used:
            used.add(value)
            return value


def _instance(task: str, family: Family, rng: random.Random, tok: Tokenizer, keys: set[str],
              values: set[str], with_query: bool) -> tuple[list[_Segment], str]:
    """The segments of one fact group (in the order they must appear, the query last) and the
    answer to its query."""
    wording = rng.choice(family.wordings[task])
    key = _key(rng, family, keys)
    line = lambda text: tok.tokenize("\n" + text + "\n")  # noqa: E731  (segments are whole lines)
    if task == "multivalue":
        vals = [_value(rng, family, task, values) for _ in range(rng.choice(family.values_per_key))]
        segments = [_Segment(line(wording.define.format(key=key, value=v))) for v in vals]
        answer = wording.sep.join(vals)
    elif task == "varchain":
        value = _value(rng, family, task, values)
        names = [key] + [_key(rng, family, keys) for _ in range(rng.choice(family.hops))]
        segments = [_Segment(line(wording.define.format(key=names[0], value=value)))]
        segments += [_Segment(line(wording.hop.format(dst=dst, src=src))) for src, dst in zip(names, names[1:])]
        key, answer = names[-1], value  # the query asks the end of the chain
    else:
        answer = _value(rng, family, task, values)
        segments = [_Segment(line(wording.define.format(key=key, value=answer)))]
    if with_query:
        prompt = tok.tokenize("\n" + wording.query.format(key=key))
        segments.append(_Segment(prompt, tok.tokenize(answer), answer, key, segments[0]))
    return segments, answer


def _check(task: str, family: Family) -> None:
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if not isinstance(family, Family) or not family.wordings.get(task):
        raise TaskError(f"format family {getattr(family, 'name', family)!r} has no wordings for task {task!r}")


def distractor_count(density: int, length: int) -> int:
    return round(density * length / DENSITY_TOKENS)


def task_text(task: str, family: Family, length: int, filler: Sequence[int], tok: Tokenizer,
              rng: random.Random, *, queries: int = 1, density: int | None = None,
              depth: float | None = None) -> TaskText:
    """``length`` tokens: natural text (``filler``, at least ``length`` tokens) with ``queries``
    fact groups, each followed later by its query and answer, and ``density`` (default: drawn
    from the family) distractor groups per 4096 tokens that are never asked.

    ``depth`` (a fraction) makes an evaluation item: one query, its answer the last tokens of
    the text, its first fact starting about ``depth`` into the context. Without it, every
    segment's place is uniform over the text (queries after their facts), answers followed by
    a newline."""
    _check(task, family)
    if depth is not None and queries != 1:
        raise TaskError("an evaluation item (depth given) has exactly one query")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise TaskError(f"depth must be in [0, 1], got {depth}")
    density = rng.choice(family.densities) if density is None else density
    keys: set[str] = set()
    values: set[str] = set()
    asked = [_instance(task, family, rng, tok, keys, values, True)[0] for _ in range(queries)]
    decoys, decoy_answers = [], []
    for _ in range(distractor_count(density, length)):
        group, answer = _instance(task, family, rng, tok, keys, values, False)
        decoys.append(group)
        decoy_answers.append(answer)
    newline = [] if depth is not None else tok.tokenize("\n")
    fixed = sum(len(s.tokens) + len(s.answer or []) + (len(newline) if s.answer else 0)
                for group in asked + decoys for s in group)
    n_filler = length - fixed
    if n_filler < max(1, fixed // 4):  # the text must stay mostly natural text
        raise TaskError(f"length {length} is too short for task {task!r} ({family.name}: {queries} "
                        f"queries, density {density}: {fixed} task tokens)")
    if len(filler) < n_filler:
        raise TaskError(f"filler has {len(filler)} tokens, {n_filler} needed")

    placed: list[tuple[float, int, _Segment]] = []
    order = 0
    for group in decoys + ([] if depth is not None else asked):
        for pos, seg in zip(sorted(rng.uniform(0, n_filler) for _ in group), group):
            placed.append((pos, order, seg))
            order += 1
    if depth is not None:
        group = asked[0]
        first = depth * n_filler
        middle = sorted(rng.uniform(first, n_filler) for _ in group[1:-1])
        for pos, seg in zip([first, *middle, float(n_filler)], group):
            placed.append((pos, order + (1 << 30 if seg.answer is not None else 0), seg))
            order += 1
    placed.sort(key=lambda p: (round(p[0]), p[1]))

    out = TaskText(task, family.name, density, [], [])
    spans: dict[int, tuple[int, int]] = {}
    cursor = 0
    for pos, _, seg in placed:
        at = round(pos)
        out.tokens += filler[cursor:at]
        cursor = at
        spans[id(seg)] = (len(out.tokens), len(out.tokens) + len(seg.tokens))
        out.tokens += seg.tokens
        if seg.answer is not None:
            start = len(out.tokens)
            out.tokens += seg.answer
            out.queries.append(Query(task, seg.key, seg.answer_text, start, len(out.tokens), spans[id(seg.first_fact)]))
            out.tokens += newline
    out.tokens += filler[cursor:n_filler]
    out.answer_mask = [0] * len(out.tokens)
    for q in out.queries:
        out.answer_mask[q.start:q.end] = [1] * (q.end - q.start)
    out.distractor_answers = decoy_answers
    assert len(out.tokens) == length, (len(out.tokens), length)
    return out


# --------------------------------------------------------------------------------------------
# Solving from the text alone


def _pattern(template: str, **groups: str) -> str:
    """A regex of a template: its literal text escaped, each ``{name}`` the given group."""
    parts = re.split(r"\{(\w+)\}", template)
    out, seen = "", set()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out += re.escape(part)
        elif part in seen and groups[part].startswith("(?P<"):
            out += f"(?P={part})"  # a named group the second time: the same text again
        else:
            out += groups[part]
            seen.add(part)
    return out


def _key_re(family: Family) -> str:
    shortest, longest = min(family.key_lengths), max(family.key_lengths)
    return "(?:" + "|".join(f"[{re.escape(first)}][{re.escape(alphabet)}]{{{shortest - 1},{longest - 1}}}"
                            for first, alphabet in family.key_styles) + ")"


def _value_re(task: str) -> str:
    return r"[a-z]+(?: [a-z]+)*" if task == "copy" else r"\d+"


def solve(text: str) -> tuple[str, str] | None:
    """(task, answer) for a context ending in a query of any family's wording with any family's
    keys, found from the text alone; None when the text ends in no known query or the text does
    not hold the facts."""
    newline = text.rfind("\n")
    if newline < 0:
        return None
    tail, context = text[newline:], text[:newline]  # a query is the text's last line
    # any family's wording with any family's keys: the formats between two families mix them
    key_re = "(?:" + "|".join(_key_re(family) for family in FAMILIES.values()) + ")"
    for family in FAMILIES.values():
        for task, wordings in family.wordings.items():
            for w in wordings:
                m = _query_regex(w.query, key_re).fullmatch(tail)
                if not m:
                    continue
                answer = _answer(task, w, m.group("key"), context)
                if answer is not None:
                    return task, answer
    return None


@functools.lru_cache(maxsize=None)
def _query_regex(query: str, key_re: str) -> re.Pattern:
    # compiled once: the families hold more query templates than the re module caches
    return re.compile(_pattern("\n" + query, key=f"(?P<key>{key_re})"))


def _facts(w: Wording, task: str, key: str, text: str) -> list[str]:
    line = _pattern(w.define, key=re.escape(key), value=f"(?P<value>{_value_re(task)})")
    return [m.group("value") for m in re.finditer(r"(?m)^" + line + "$", text)]


def _answer(task: str, w: Wording, key: str, text: str) -> str | None:
    if task == "multivalue":
        values = _facts(w, task, key, text)
        return w.sep.join(values) if values else None
    if task == "varchain":
        for _ in range(64):  # follow the copies back to the literal
            define = _pattern(w.define, key=re.escape(key), value=r"(?P<value>\d+)")
            hop = _pattern(w.hop, dst=re.escape(key), src=r"(?P<src>\w+)")
            last = None
            for m in re.finditer(r"(?m)^(?:" + define + "|" + hop + ")$", text):
                last = m
            if last is None:
                return None
            if last.group("value") is not None:
                return last.group("value")
            key, text = last.group("src"), text[:last.start()]
        return None
    values = _facts(w, task, key, text)
    return values[-1] if values else None
