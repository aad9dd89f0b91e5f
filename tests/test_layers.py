"""The packages form layers, each importing only those below it (function-level imports counted too), and no
module imports itself in a circle:

    slidecache (shared library: errors, command-line rules, cohorts, heads)  <  store  <  extract  <  train
    <  evaluate (it runs trained reporters to score them)  <  demo (the end-to-end run)

`configs` is data; `slidecache.__main__` (the console script) dispatches to every stage's command, above all."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["slidecache", "store", "extract", "train", "evaluate", "demo"]
TOP = {"slidecache.__main__"}  # the console script: runs `python -m COMMAND`, imports no stage module


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            found = edges.setdefault(_module(path), set())
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                found.update(n for n in names if n.split(".")[0] in LAYERS)
    return edges


def test_no_package_imports_a_layer_above_it():
    upward = [f"{module} imports {target}" for module, targets in _imports().items() if module not in TOP
              for target in targets
              if LAYERS.index(target.split(".")[0]) > LAYERS.index(module.split(".")[0])]
    assert not upward, "imports running up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_circles_between_modules():
    edges = _imports()
    modules = set(edges)

    def resolve(target: str) -> str | None:  # `from pkg import name` may name a module or a package
        return target if target in modules else None

    graph = {m: {t for t in map(resolve, targets) if t and t != m} for m, targets in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)
