"""The core is one-way: no import cycle inside ``kbitprep``, counting every import (module level, in
functions, and under ``TYPE_CHECKING``), and the core never imports the application layer
(``kbitprep.app``: CLI, demo, config planning front end, text reports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kbitprep"
APP = "app"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, type_checking: bool = True) -> set[str]:
    """kbitprep modules ``path`` imports: at module level, in functions and (unless ``type_checking`` is
    false) under ``if TYPE_CHECKING:``."""
    here = _module_name(path)
    package = here.rsplit(".", 1)[0] if "." in here and path.name != "__init__.py" else here
    if path.name != "__init__.py" and "." not in here:
        package = ""
    if path.name == "__init__.py" and here == "__init__":
        package = ""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package and package != "__init__" else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if node.module:
                    found.add(target)
                else:
                    found.update(".".join([*base, a.name]) for a in node.names)
            elif node.module and (node.module == "kbitprep" or node.module.startswith("kbitprep.")):
                found.add(node.module.removeprefix("kbitprep").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kbitprep."):
                    found.add(a.name.removeprefix("kbitprep."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(here)
    return found


def import_graph(*, type_checking: bool = True) -> dict[str, set[str]]:
    """Module -> the kbitprep modules it imports (names relative to the package), type-only imports included
    unless ``type_checking`` is false."""
    graph = {_module_name(p): _imports(p, type_checking=type_checking) for p in sorted(PACKAGE.rglob("*.py"))}
    modules = set(graph)
    # ``from . import errors`` inside __init__ names the module; keep only edges to real modules
    return {m: {d for d in deps if d in modules} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                dfs(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return cycles


def test_kbitprep_has_no_import_cycle() -> None:
    graph = {m: deps for m, deps in import_graph().items() if m not in ("__init__", "__main__")}
    cycles = _cycles(graph)
    assert not cycles, "import cycles in kbitprep: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_never_imports_the_application_layer() -> None:
    graph = import_graph()
    core = [m for m in graph if m != APP and not m.startswith(APP + ".") and m not in ("__init__", "__main__")]
    bad = {m: sorted(d for d in graph[m] if d == APP or d.startswith(APP + ".")) for m in core}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"core modules importing the application layer: {bad}"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._planning import Plan\n"
        "def f():\n    from ._render import table\n"
    )
    global PACKAGE
    saved = PACKAGE
    PACKAGE = tmp_path
    try:
        assert _imports(src) == {"_render", "_planning"}
        assert _imports(src, type_checking=False) == {"_render"}
    finally:
        PACKAGE = saved


def test_the_plan_types_sit_below_the_planner_the_mutation_site_and_their_readers() -> None:
    """Renderers, the FSDP check and the memory modes read plans without importing the planner or the
    mutation site; the types module imports neither them nor the renderers' readers."""
    graph = import_graph()

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    for reader in ("_render", "_html", "_fsdp", "_memory", "_memory.forward", "_memory.planning"):
        assert not reaches(reader) & {"_planning", "_mutation", "_api"}, reader
    assert not reaches("_plan_types") & {"_planning", "_mutation", "_memory", "_fsdp", "_api"}


def print_graph() -> str:
    """The import graph as text (for the closing note): ``module -> deps``."""
    return "\n".join(f"{m} -> {', '.join(sorted(d)) or '-'}" for m, d in sorted(import_graph().items()))


if __name__ == "__main__":  # pragma: no cover
    print(print_graph())
    pytest.main([__file__])
