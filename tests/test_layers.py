"""The package's layers import one way: no module reaches, through imports, back to itself.

Function-level imports count too (they are cycles that only wait for a call). Importing a submodule
imports its package's ``__init__`` first; that implicit edge is not a cycle of the code and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_sentinel

PACKAGE = Path(lightning_sentinel.__file__).parent


def _import_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("lightning_sentinel", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != "lightning_sentinel")
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in path:
                found.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(name)

    for name in sorted(graph):
        if name not in done and name != "lightning_sentinel":
            visit(name, [name])
    return found


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert (
        "lightning_sentinel.catalog" in graph and graph["lightning_sentinel.checks.curves"]
    )  # it reads the code
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
