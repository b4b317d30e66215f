"""The layers of `merge/` as its imports draw them: no cycle, and `merge.io` below the math.

Every module is parsed with `ast`; every import counts, at module level or inside a function
(a function-local import hides a cycle from Python's loader, not from a reader), and under
`if TYPE_CHECKING:` too (a type is a dependency). `from pkg import name` points at the module
`pkg.name` when that is a module, else at `pkg`. A package's `__init__` importing its own
submodules is the package, not a cycle, so a module's implicit import of its parent package
is not an edge.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import merge

ROOT = Path(merge.__file__).parent

# What `merge.io` (files) must not reach: it knows formats, never adapters, math or plans.
IO_MUST_NOT_IMPORT = ("merge.lora", "merge.methods", "merge.plan", "merge.execute")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
PACKAGES = {module_name(p) for p in ROOT.rglob("__init__.py")}


def imported(module: str) -> Iterator[tuple[str, int]]:
    """(merge module imported, line) for every import statement in `module`."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if module in PACKAGES else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full if full in MODULES else target), node.lineno


def owner(name: str) -> str | None:
    """The module of ours that `name` (a module or something inside one) belongs to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {merge module it imports: first line}}."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        edges = graph.setdefault(module, {})
        for name, line in imported(module):
            target = owner(name) if name == "merge" or name.startswith("merge.") else None
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    members = set(component)
    edges = [
        f"    {a} -> {b} (line {line})"
        for a in component
        for b, line in sorted(graph[a].items())
        if b in members
    ]
    return "  " + ", ".join(component) + ":\n" + "\n".join(edges)


def test_every_module_is_seen() -> None:
    assert {"merge", "merge.io", "merge.plan", "merge.execute", "merge.lora"} <= set(MODULES)
    graph = import_graph()
    assert "merge.io.sources" in graph["merge.io.safetensors"]  # an edge the parser must find


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in merge/:\n" + "\n".join(describe(c, graph) for c in found)


def test_io_imports_no_adapters_math_or_plans() -> None:
    graph = import_graph()
    bad = [
        f"{module} -> {target} (line {line})"
        for module, edges in graph.items()
        if module == "merge.io" or module.startswith("merge.io.")
        for target, line in edges.items()
        if any(target == p or target.startswith(p + ".") for p in IO_MUST_NOT_IMPORT)
    ]
    assert not bad, "merge.io must know files only:\n  " + "\n  ".join(bad)


# Adapter kinds, besides the registered method names, that the planner and engine must not name.
ADAPTER_KINDS = ("lora", "dora", "loha", "lokr", "lycoris", "peft", "kohya")


def test_plan_and_engine_name_no_method_or_adapter_kind() -> None:
    """Methods describe themselves through their registration and sources through the
    TensorSource contract, so the planner and the engine never name one (in code or prose)."""
    from merge.methods import list_methods

    names = {spec.name for spec in list_methods()} | set(ADAPTER_KINDS)
    word = re.compile(r"[a-z][a-z0-9_]*")
    for module in ("merge.plan", "merge.execute"):
        text = MODULES[module].read_text().lower()
        hits = sorted(
            {w for w in word.findall(text) if w in names or any(k in w for k in ADAPTER_KINDS)}
        )
        assert not hits, f"{module} names {hits}"
