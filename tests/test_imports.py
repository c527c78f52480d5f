"""The import graph of ``namm_mlx/`` and ``cli/``, read from the source (nothing is executed).

Every ``import`` counts, also those inside functions (a lazy import still
makes a cycle, only a later one). Importing ``a.b.c`` also runs the packages
``a`` and ``a.b``, so those are edges too, except the packages the importing
module itself lives in (they are already running when it runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("namm_mlx", "cli")


def _modules() -> dict[str, Path]:
    modules = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (directly or by running their packages)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)  # submodules by name
    own = set(_ancestors(name))
    edges = set()
    for target in targets:
        for candidate in [*_ancestors(target), target]:
            if candidate in modules and candidate not in own and candidate != name:
                edges.add(candidate)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "namm_mlx.policies.base" in graph["namm_mlx.cache"]
    assert "namm_mlx.eval.plan" in graph["namm_mlx.eval.runner"]
    assert "namm_mlx.policies" in graph["namm_mlx.cache"]  # importing policies.base runs the package


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_cli():
    upward = {(m, t) for m, targets in import_graph().items() if m.startswith("namm_mlx") for t in targets
              if t.startswith("cli")}
    assert not upward


def test_the_cache_imports_only_below_it():
    below = {"namm_mlx.attention", "namm_mlx.errors", "namm_mlx.hook", "namm_mlx.quantized", "namm_mlx.selection",
             "namm_mlx.policies.base", "namm_mlx.policies"}
    assert import_graph()["namm_mlx.cache"] <= below
    assert "namm_mlx.cache" not in {t for m, ts in import_graph().items() if m.startswith("namm_mlx.policies") for t in ts}


def test_commands_do_not_import_the_app():
    graph = import_graph()
    back = sorted(m for m, targets in graph.items() if m.startswith("cli.commands") and "cli.main" in targets)
    assert not back, f"commands importing cli.main: {back}"
