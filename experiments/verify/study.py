"""One run of the verification study: its scale, arms, run directory and what it holds.

Every stage reads and writes under the run directory (``--out``, default runs/verify/<scale>):
one directory per training phase (its checkpoint, TensorBoard scalars, log, exact command and
a ``DONE`` marker), the natural-text corpus under ``data_text`` and the training mixture built
from it (its text with the long-range tasks embedded) under ``data``, measurements as JSON. A stage whose result is
there is skipped unless ``--force``, so a run resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

from experiments.verify.settings import ARMS, RECIPES, REPO, SCALES, arm_layout
from megatron_dsa.data.tasks import FAMILIES, Family


def chain_start(scale: str) -> str:
    """The first scale of the pretraining chain ``scale`` continues (``init_from``), or itself."""
    seen = [scale]
    while SCALES[scale].get("init_from"):
        scale = SCALES[scale]["init_from"]
        if scale in seen:
            raise SystemExit(f"error: the scales' init_from form a cycle: {' -> '.join(seen + [scale])}")
        seen.append(scale)
    return scale


class Study:
    """The run's settings (from the command line) and its directory."""

    def __init__(self, args):
        self.scale = args.scale
        self.s = SCALES[args.scale]
        self.out = Path(args.out or REPO / "runs" / "verify" / args.scale).absolute()
        self.report_dir = Path(args.report_dir or REPO / "reports").absolute()
        self.force = args.force
        self.data = self.out / "data"  # the task mixture every phase trains on
        # A scale that continues another's dense pretraining (``init_from``) reads that run's
        # directory beside this one: its pretrain checkpoint. Every scale of such a chain reads
        # the natural text of the chain's first run (one tokenizer for all their mixtures).
        self.init_dir = self.out.parent / self.s["init_from"] if self.s.get("init_from") else None
        # natural text: held-out loss, recall, retrieval haystacks
        first = chain_start(self.scale)
        self.text_data = (self.out if first == self.scale else self.out.parent / first) / "data_text"
        self.arms = list(args.arms.split(",")) if getattr(args, "arms", None) else list(ARMS)
        self.speed_arms = args.speed_arms.split(",") if getattr(args, "speed_arms", None) else None
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise SystemExit(f"error: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")

    @functools.cached_property
    def num_layers(self) -> int:
        """Decoder layers of the study's model: the pretrain recipe's size with this scale's
        overrides (every phase trains the same shape)."""
        from megatron_dsa.model import resolve_size

        model = self._recipe("pretrain").model
        return int(model["overrides"].get("num_layers") or resolve_size(model["size"]).transformer["num_layers"])

    @property
    def training_family(self) -> Family:
        """The format family of the scale's task mixture (``tasks.TRAIN`` unless it names another)."""
        return FAMILIES[self.s["tasks"].get("family", "train")]

    @functools.cached_property
    def warmup_iters(self) -> int:
        """The scale's warm-up steps (the recipe's, with this scale's overrides)."""
        return int(self._recipe("warmup", self.s["overrides"].get("warmup", [])).train["iters"])

    def _recipe(self, phase: str, extra: list[str] = ()):
        """The h200 recipe of ``phase`` with this scale's overrides for every phase, then ``extra``."""
        from megatron_dsa.train.config import load_config

        return load_config(RECIPES / f"h200_{phase}.yaml", [*self.s["overrides"].get("all", []), *extra])

    def layout(self, arm: str) -> dict:
        """The model overrides that give ``arm`` its indexer layout in this study."""
        return arm_layout(arm, self.num_layers)

    def commands(self) -> dict[str, str]:
        """Every phase's exact command (one file per phase: arms may run concurrently), written
        the way a user re-runs it: ``python``, recipes relative to the repository, the run
        directory as ``$RUN`` (the machine's own paths stay out of the report)."""
        out = {}
        for f in sorted(self.out.glob("*/command.json")):
            out[f.parent.name] = portable_command(json.loads(f.read_text()))
        return out

    def corpus_info(self) -> dict:
        """The natural text's record, written by the chain's first run (the text is its)."""
        p = self.text_data.parent / "corpus_info.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def load_json(self, name, default):
        p = self.out / name
        return json.loads(p.read_text()) if p.is_file() else default

    def save_json(self, name, obj):
        """Write <out>/<name> (may hold a sub-directory) atomically: temp file + rename."""
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def pending(self, name: str, tag: str) -> bool:
        """Whether the result <out>/<name> is still to be made (says so when it is skipped)."""
        if (self.out / name).is_file() and not self.force:
            print(f"{tag} done, skipped")
            return False
        return True

    def phase_dir(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> bool:
        return (self.phase_dir(name) / "DONE").is_file() and not self.force


def portable_command(cmd: str) -> str:
    """An echoed command without the paths of the machine it ran on (see Study.commands)."""
    run = re.search(r"data\.dir=(\S+)/data(?:_text)?(?:\s|$)", cmd)
    if run:
        cmd = cmd.replace(run.group(1) + "/", "$RUN/")
    cmd = re.sub(r"^\S*python\S*(?=\s)", "python", cmd)
    return re.sub(r"\S*/(configs|benchmarks|experiments)/", r"\1/", cmd)


def echo(cmd: list[str]) -> str:
    """A command as one shell-readable line."""
    return " ".join(str(c) if re.fullmatch(r"[\w./=:,+@-]+", str(c)) else repr(str(c)) for c in cmd)


def link_copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint directory: files under iter_* are hard-linked (never rewritten), the
    small top-level files (tracker, run record) are real copies (Megatron rewrites the tracker)."""
    def copy(s, d):
        if "/iter_" in s:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=copy)
