"""The import graph of distributedtask's own modules: no cycle, and the demo stays clear of the
test harness. Read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import distributedtask

PACKAGE = "distributedtask"
ROOT = Path(distributedtask.__file__).parent


def _module_names() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_names()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> tuple[set[str], set[str]]:
    """The modules of the package that ``module`` imports: (at import time, inside functions).

    Imports under ``if TYPE_CHECKING:`` never run and are left out. ``from a import b`` counts
    as an import of ``a.b`` when that is a module, else of ``a``.
    """
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    eager: set[str] = set()
    lazy: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        else:
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = {
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            }
        return {name for name in names if name in MODULES and name != module}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else eager).update(targets(child))
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or nested)

    visit(ast.parse(path.read_text(), str(path)), False)
    return eager, lazy


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target in on_stack:
                return [*stack[stack.index(target) :], target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            found = visit(node)
            if found:
                return found
    return None


GRAPH = {module: _imports(module) for module in MODULES}
# Imports inside functions count too: `dtask demo` imports the demo lazily, and a demo that
# imported the CLI back, even lazily, would be the cli <-> demo cycle all the same.
EDGES = {module: eager | lazy for module, (eager, lazy) in GRAPH.items()}


def test_the_graph_is_read() -> None:
    eager, lazy = GRAPH[f"{PACKAGE}.cli"]
    assert f"{PACKAGE}.manager" in eager
    assert f"{PACKAGE}.demo" in lazy
    assert f"{PACKAGE}.embedded" in GRAPH[f"{PACKAGE}.testing.etcd"][0]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules() -> None:
    cycle = _cycle(EDGES)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_demo_does_not_import_the_test_harness() -> None:
    seen, todo = set(), [f"{PACKAGE}.demo"]
    while todo:  # whatever the demo imports, directly or not
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(EDGES[module])
    harness = sorted(m for m in seen if m.startswith(f"{PACKAGE}.testing"))
    assert harness == [], f"the demo imports the test harness: {harness}"


def test_only_dtask_ui_and_the_demo_import_the_console_and_only_when_run() -> None:
    # Its extra (starlette, uvicorn) is optional: nothing outside it imports it at import time.
    console = f"{PACKAGE}.console"
    outside = [module for module in MODULES if not module.startswith(console)]
    eager = sorted(m for m in outside if any(t.startswith(console) for t in GRAPH[m][0]))
    lazy = sorted(m for m in outside if any(t.startswith(console) for t in GRAPH[m][1]))
    assert eager == []
    assert lazy == [f"{PACKAGE}.cli"]  # the demo is handed the server class by `dtask demo`
