"""Writing benchmark results: each file whole or not at all, stamped with the run that made it.

A run that is killed (a lent machine taken back, a timeout) must leave the previous table or the
new one, never half a json that the next ``--update`` cannot read. And a number in a table must
lead back to what measured it: ``run_record`` gives the command, the code (git commit where the
checkout has one, and a digest of the sources that is the same for the same code on any machine,
with or without git) and the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
# What the timings depend on: our package, the benchmarks themselves and megatron-core's patches.
SOURCE_DIRS = ("megatron_dsa", "benchmarks", "patches")


def _into_place(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` to a temporary beside ``path``, then renamed onto it; a write that fails
    leaves ``path`` as it was and no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def device_tag(device_name: str) -> str:
    """A short name for result files measured on a GPU: "NVIDIA H200" -> "h200", "NVIDIA H100
    80GB HBM3" -> "h100", so tables of two devices never share a file."""
    words = re.findall(r"[A-Za-z0-9]+", device_name)
    named = [w for w in words if re.search(r"[A-Za-z]", w) and re.search(r"\d", w)]
    numbered = [w for w in words if re.search(r"\d", w)]
    return (named or numbered or words or ["gpu"])[0].lower()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` whole."""
    _into_place(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> None:
    write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """A matplotlib figure as ``path`` (its suffix names the format)."""
    _into_place(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs))


def _digest(files) -> str:
    """12 hex digits of sha256 over (path relative to the root, contents) pairs, each top
    directory's files in path order."""
    h = hashlib.sha256()
    for top in SOURCE_DIRS:
        for rel, read in sorted(((PurePosixPath(r), f) for r, f in files if r.split("/", 1)[0] == top),
                                key=lambda x: x[0]):
            h.update(rel.as_posix().encode() + b"\0")
            h.update(read() + b"\0")
    return h.hexdigest()[:12]


def source_digest(root: Path = REPO) -> str:
    """12 hex digits of sha256 over the .py files under SOURCE_DIRS (paths and contents), so a
    table measured from a copy without git still names its code."""
    return _digest([(p.relative_to(root).as_posix(), p.read_bytes) for top in SOURCE_DIRS
                    for p in (root / top).rglob("*.py")])


def commit_of_sources(digest: str, root: Path = REPO, depth: int = 1000) -> str | None:
    """The newest of HEAD's last ``depth`` commits whose SOURCE_DIRS hold the sources ``digest``
    names (short hash), or None. A machine that runs a copy of the working tree may carry an older
    git checkout beside it, and so records a stale commit "(modified)"; the digest is exact."""
    def git(*args, **kw):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True, timeout=60, **kw).stdout

    try:
        commits = git("rev-list", f"--max-count={depth}", "HEAD").decode().split()
        blobs: dict[str, bytes] = {}
        for commit in commits:
            listing = git("ls-tree", "-r", commit, "--", *SOURCE_DIRS).decode().splitlines()
            files = []
            for line in listing:
                meta, path = line.split("\t", 1)
                kind, sha = meta.split()[1:3]
                if kind == "blob" and path.endswith(".py"):
                    if sha not in blobs:
                        blobs[sha] = git("cat-file", "blob", sha)
                    files.append((path, lambda sha=sha: blobs[sha]))
            if _digest(files) == digest:
                return git("rev-parse", "--short", commit).decode().strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return None


def restamp(path: str | os.PathLike, root: Path = REPO) -> list[str]:
    """Rewrite the run records of results file ``path`` (json; its .md beside it, if any) whose
    commit is missing or "(modified)" with the commit whose sources match their digest, where one
    does. Returns the "old -> new" changes."""
    path = Path(path)
    obj = json.loads(path.read_text())
    changes: dict[tuple, str] = {}

    def walk(o):
        if isinstance(o, dict):
            commit, digest = o.get("commit"), o.get("source")
            if isinstance(digest, str) and "command" in o and (commit is None or str(commit).endswith("(modified)")):
                key = (commit, digest)
                if key not in changes:
                    changes[key] = commit_of_sources(digest, root)
                if changes[key]:
                    o["commit"] = changes[key]
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(obj)
    done = {k: v for k, v in changes.items() if v}
    if done:
        write_json(path, obj)
        md = path.with_suffix(".md")
        if md.exists():
            text = md.read_text()
            for (old, digest), new in done.items():
                text = text.replace(f"commit {old or 'not recorded'}, sources {digest}", f"commit {new}, sources {digest}")
            write_atomic(md, text)
    return [f"{old} -> {new} (sources {digest})" for (old, digest), new in done.items()]


def git_commit(root: Path = REPO) -> str | None:
    """The checkout's short commit, with " (modified)" when tracked files differ from it; None
    without git (a copied working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def package_version(dist: str) -> str | None:
    """An installed distribution's version; None when it is not installed."""
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def invocation(script: str, argv: list[str] | None) -> list[str] | None:
    """The command line of a benchmark's ``main(argv)``: the process's own when argv is None, else
    the script followed by argv (main called from another program or a test)."""
    return None if argv is None else [script, *argv]


def command_line(argv: list[str] | None = None) -> str:
    """The command as one would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.suffix == ".py" and script.resolve().is_relative_to(REPO):
        argv[0] = script.resolve().relative_to(REPO).as_posix()
        return "python " + shlex.join(argv)
    return shlex.join(argv)


_RECORDS: dict = {}


def run_record(argv: list[str] | None = None) -> dict:
    """Command, code, machine and start time of this run, for a results file's meta (made once
    per process: a sweep that writes its table after every point stamps one record)."""
    key = None if argv is None else tuple(argv)
    if key not in _RECORDS:
        _RECORDS[key] = _make_record(argv)
    return dict(_RECORDS[key])


def _make_record(argv: list[str] | None) -> dict:
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (sm {cap[0]}.{cap[1]}, CUDA {torch.version.cuda})"
    return {"command": command_line(argv), "commit": git_commit(), "source": source_digest(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
            "torch": torch.__version__, "triton": package_version("triton"), "megatron_core": package_version("megatron-core"),
            "python": platform.python_version()}


def stamp_rows(rows: list[dict], runs: list[dict], record: dict | None = None) -> list[dict]:
    """``runs`` (those of the rows a table keeps) with this run's record appended; each of
    ``rows`` (this run's) names it by index as ``row["run"]``. Tables measured in pieces keep one
    record per piece."""
    runs = [*runs, record or run_record()]
    for row in rows:
        row["run"] = len(runs) - 1
    return runs


def measured_by(runs: list[dict], rows: list[dict]) -> list[str]:
    """A markdown line per run that measured some of ``rows``: its command and code."""
    used = sorted({r["run"] for r in rows if isinstance(r.get("run"), int) and 0 <= r["run"] < len(runs)})
    return [f"Measured by `{runs[i]['command']}` ({runs[i]['date']}; commit {runs[i]['commit'] or 'not recorded'}, "
            f"sources {runs[i]['source']})." for i in used]


if __name__ == "__main__":
    # python benchmarks/results_io.py restamp FILE.json ...: name the commits of results measured
    # on a machine whose git checkout was older than the code it ran
    if len(sys.argv) < 3 or sys.argv[1] != "restamp":
        sys.exit("usage: python benchmarks/results_io.py restamp FILE.json [FILE.json ...]")
    for name in sys.argv[2:]:
        for change in restamp(name) or ["nothing to restamp"]:
            print(f"{name}: {change}")
