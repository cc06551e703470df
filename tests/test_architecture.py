"""The import structure: no circle among the project's modules, and nothing imports upward.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a project module, at module level or inside a function, is an edge
from the importing module to the imported one (``from pkg import name`` to ``pkg.name`` when
that is a module). The layers below are the picture of docs/architecture.md, lowest first: a
module may import its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ("megatron_dsa", "patches", "experiments", "benchmarks", "launch", "scripts")

# Lowest first; a module belongs to the first entry that is it or a package holding it.
LAYERS = [
    ("megatron_dsa.reference", "megatron_dsa.kernel_options", "megatron_dsa.flops", "megatron_dsa.data", "patches"),
    ("megatron_dsa.config",),
    ("megatron_dsa.kernels", "megatron_dsa.backends", "megatron_dsa.distributed", "megatron_dsa.safe_load",
     "megatron_dsa.offload"),
    ("megatron_dsa.ops",),
    ("megatron_dsa.parallel",),
    ("megatron_dsa.core",),
    ("megatron_dsa.layer",),
    ("megatron_dsa.spec",),
    ("megatron_dsa.model",),
    ("megatron_dsa.convert", "megatron_dsa.inference", "megatron_dsa.train"),
    ("experiments", "benchmarks", "launch", "scripts"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for top in TOP:
        for path in sorted((REPO / top).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (the module itself excluded)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the module pkg.sub where there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a module a.b: edge to a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_project(graph):
    assert "megatron_dsa.core" in graph["megatron_dsa.layer"]
    assert "megatron_dsa.kernels._common" in graph["megatron_dsa.kernels.indexer"]  # a relative import
    assert len(graph) > 60


def test_no_import_circle(graph):
    """Depth-first search for a back edge; the failure names one circle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt)
                if circle:
                    return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            assert circle is None, "import circle: " + " -> ".join(circle)


def layer_of(module: str) -> int:
    for floor, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return floor
    raise AssertionError(f"{module} is in no layer of LAYERS: place it in the picture")


def test_nothing_imports_upward(graph):
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in sorted(graph.items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_reference_and_kernels_know_nothing_of_megatron_core():
    """Plain tensors in, tensors out: the algorithm and its kernels import no megatron-core."""
    for path in [REPO / "megatron_dsa" / "reference.py", *sorted((REPO / "megatron_dsa" / "kernels").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("megatron.") or n == "megatron" for n in names), (path, names)
