"""The layering rules of docs/architecture.md, checked on the import graph of components/.

Every `import` / `from ... import` anywhere in a file counts (inside functions and
`if TYPE_CHECKING:` blocks too): a deferred import still ties the modules together.
A package's `__init__.py` is the package's module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

COMPONENTS = Path(__file__).resolve().parents[1] / "components"

# data, nn and serving sit below tracking and steps: they never import them.
LOWER = ("components.data", "components.nn", "components.serving")
UPPER = ("components.tracking", "components.steps")
COMMAND_LINE_PARSERS = ("click", "argparse")


def modules(root: Path = COMPONENTS) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything module `name` imports, relative imports made
    absolute; `from X import y` names `X.y` when that is a module in `known`, else `X`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield node.lineno, submodule if submodule in known else source


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module under components/ that importing `name` means: the longest known prefix."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path = COMPONENTS) -> dict[str, dict[str, int]]:
    """module -> {imported module under `root`: first line of the import}."""
    known = modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges = graph.setdefault(name, {})
        for line, imported in imported_names(name, path, known):
            target = resolve(imported, known)
            if target is not None and target != name:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def shortest_loop(graph: dict[str, dict[str, int]], start: str) -> list[str]:
    """The shortest import chain from `start` back to itself (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, {})):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return []


def describe(graph: dict[str, dict[str, int]], group: list[str]) -> str:
    members = set(group)
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in group for b in sorted(graph[a])
             if b in members]
    return (f"cycle among {', '.join(group)}, e.g. {' -> '.join(shortest_loop(graph, group[0]))}"
            + "; its edges:\n    " + "\n    ".join(edges))


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# --------------------------------------------------------------------------- the graph itself


def test_the_graph_sees_every_kind_of_import(tmp_path: Path):
    # A miniature components/ with a cycle made of each import form, read by the same code.
    root = tmp_path / "components"
    (root / "low").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "low" / "__init__.py").write_text("from .a import thing\n")
    (root / "low" / "a.py").write_text("def f():\n    from ..high import b\n    thing = 1\n")
    (root / "high.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import components.top\n")
    (root / "top.py").write_text("from components import low\nimport components.low.a as aa\n")
    graph = import_graph(root)
    assert graph == {
        "components": {},
        "components.low": {"components.low.a": 1},
        "components.low.a": {"components.high": 2},
        "components.high": {"components.top": 3},
        "components.top": {"components.low": 1, "components.low.a": 2},
    }
    assert cycles(graph) == [["components.high", "components.low", "components.low.a",
                               "components.top"]]
    assert shortest_loop(graph, "components.high") == [
        "components.high", "components.top", "components.low.a", "components.high"]
    del graph["components.high"]["components.top"]  # the TYPE_CHECKING import closed the loop
    assert cycles(graph) == []


def test_the_real_graph_is_not_empty():
    graph = import_graph()
    assert {"components.data", "components.nn.models", "components.steps.train"} <= set(graph)
    assert "components.nn.models" in graph["components.steps.train"]


# --------------------------------------------------------------------------- the rules


def test_no_import_cycles_in_components():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (break each by moving code down a layer):\n" + "\n".join(
        describe(graph, group) for group in found)


def test_data_nn_and_serving_never_import_tracking_or_steps():
    graph = import_graph()
    offending = [f"{src} -> {dst} (line {line})" for src, edges in sorted(graph.items())
                 if _under(src, LOWER) for dst, line in sorted(edges.items())
                 if _under(dst, UPPER)]
    assert not offending, ("data, nn and serving must not import tracking or steps:\n    "
                           + "\n    ".join(offending))


def test_components_never_parse_command_lines():
    known = modules()
    offending = [f"{name} imports {imported} (line {line})" for name, path in known.items()
                 for line, imported in imported_names(name, path, known)
                 if imported.split(".")[0] in COMMAND_LINE_PARSERS]
    assert not offending, ("components/ never parses command lines (pipelines/ does):\n    "
                           + "\n    ".join(sorted(set(offending))))


def _exits(path: Path) -> Iterator[tuple[int, str]]:
    """Calls of sys.exit / os._exit / exit / quit and `raise SystemExit` in a file."""
    exit_names = {"exit", "quit"}  # the builtins, or `from sys import exit`
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (
                    (func.value.id, func.attr) in {("sys", "exit"), ("os", "_exit")}):
                yield node.lineno, f"{func.value.id}.{func.attr}()"
            elif isinstance(func, ast.Name) and func.id in exit_names:
                yield node.lineno, f"{func.id}()"
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                yield node.lineno, "raise SystemExit"


def test_components_never_exit_the_process():
    offending = [f"{name}: {what} (line {line})" for name, path in modules().items()
                 for line, what in _exits(path)]
    assert not offending, ("components/ raises errors, pipelines/ turns them into exit codes:"
                           "\n    " + "\n    ".join(offending))


def test_the_exit_check_sees_each_form(tmp_path: Path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os, sys\nfrom sys import exit\n\ndef f():\n    sys.exit(1)\n"
                      "    os._exit(2)\n    exit(3)\n    raise SystemExit(4)\n"
                      "    raise SystemExit\n    self.exit()\n")
    assert sorted(line for line, _ in _exits(sample)) == [5, 6, 7, 8, 9]
