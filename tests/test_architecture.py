"""The layering of ``passes/`` (docs/design.md): read from the source with ``ast``, nothing imported.

- the module-level imports among the passes form no cycle (``typing.TYPE_CHECKING`` imports count:
  a cycle that only type hints close is still two modules that need each other);
- no function imports another pass (an import inside a function is how a cycle hides);
- the passes never import the driver modules in ``graphmerge/*.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PASSES = Path(__file__).resolve().parents[1] / "passes"
PACKAGE = "graphmerge.passes"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PASSES).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


MODULES = {_module_name(path): path for path in sorted(PASSES.rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement reads: modules, and ``from X import name`` as X.name."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join([*parts, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _passes_imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str]:
    """The pass modules an import statement loads (``from graphmerge.passes import rules`` loads rules)."""
    return {name for name in _imported(node, module, is_package) if name in MODULES and name != module}


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed (or, under ``if TYPE_CHECKING``, read by type checkers) when the module loads."""
    found = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        statement = pending.pop()
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            found.append(statement)
        elif isinstance(statement, (ast.If, ast.Try)):
            pending.extend(statement.body)
            pending.extend(statement.orelse)
            pending.extend(getattr(statement, "finalbody", []))
            for handler in getattr(statement, "handlers", []):
                pending.extend(handler.body)
    return found


def _parsed() -> dict[str, tuple[ast.Module, bool]]:
    return {name: (ast.parse(path.read_text(), str(path)), path.name == "__init__.py")
            for name, path in MODULES.items()}


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for module, (tree, is_package) in _parsed().items():
        graph.add_node(module)
        for statement in _module_level_imports(tree):
            for target in _passes_imported(statement, module, is_package):
                graph.add_edge(module, target, line=statement.lineno)
    return graph


def imports_inside_functions() -> list[str]:
    found = []
    for module, (tree, is_package) in _parsed().items():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for statement in ast.walk(function):
                if isinstance(statement, (ast.Import, ast.ImportFrom)):
                    targets = _passes_imported(statement, module, is_package)
                    if targets:
                        found.append(f"{MODULES[module].name}:{statement.lineno} in {function.name}() imports "
                                     + ", ".join(sorted(targets)))
    return sorted(set(found))


def test_the_parser_sees_the_passes_and_their_imports() -> None:
    graph = import_graph()
    assert {f"{PACKAGE}.couple", f"{PACKAGE}.ir", f"{PACKAGE}.widen"} <= set(graph.nodes)
    assert graph.has_edge(f"{PACKAGE}.couple", f"{PACKAGE}.ir")
    assert graph.has_edge(f"{PACKAGE}.widen", f"{PACKAGE}.ir")
    assert not list(nx.simple_cycles(nx.DiGraph([("a", "b")])))
    assert list(nx.simple_cycles(nx.DiGraph([("a", "b"), ("b", "a")])))


def test_the_module_level_imports_of_the_passes_form_no_cycle() -> None:
    graph = import_graph()
    cycles = sorted(" -> ".join(m.removeprefix(PACKAGE + ".") for m in (*cycle, cycle[0]))
                    for cycle in nx.simple_cycles(graph))
    assert cycles == [], "import cycles among the passes: " + "; ".join(cycles)


def test_no_function_imports_another_pass() -> None:
    assert imports_inside_functions() == []


def test_the_ir_is_a_leaf() -> None:
    """Every pass may read the typed records; they read no pass but the error types."""
    graph = import_graph()
    assert set(graph.successors(f"{PACKAGE}.ir")) <= {f"{PACKAGE}.errors"}


def test_the_passes_never_import_the_driver() -> None:
    driver = []
    for module, (tree, is_package) in _parsed().items():
        for statement in ast.walk(tree):
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                for name in _imported(statement, module, is_package):
                    if (name == "graphmerge" or name.startswith("graphmerge.")) and not name.startswith(PACKAGE):
                        driver.append(f"{MODULES[module].name}:{statement.lineno} imports {name}")
    assert driver == []
