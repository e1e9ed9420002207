"""The shape of the code: imports flow one way (no cycles, lazy imports included) and no function
takes more than 8 positional parameters. Read from the source with ast, so a lazy import inside a
function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clipeval"
MAX_POSITIONAL = 8


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module, names: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "clipeval":
                if len(parts) > 1 and parts[1] in names:
                    found.add(parts[1])
                elif len(parts) == 1:
                    found |= {alias.name for alias in node.names if alias.name in names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "clipeval" and len(parts) > 1 and parts[1] in names:
                    found.add(parts[1])
    return found


def test_imports_form_no_cycle():
    modules = _modules()
    graph = {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    graph.pop("__init__")  # its lazy __getattr__ re-exports; nothing imports it for code
    for deps in graph.values():
        deps.discard("__init__")
    order, done, visiting = [], set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(name):], name])
        visiting.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in sorted(graph):
        visit(name)
    assert order.index("errors") < order.index("store") < order.index("runner") < order.index("cli")


def test_no_function_takes_more_than_eight_positional_parameters():
    offenders = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > MAX_POSITIONAL:
                    offenders.append(f"{name}.{node.name}({len(positional)})")
    assert offenders == []
