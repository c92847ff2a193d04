"""Benchmarks and examples use graphmerge's public API only.

They are what users copy, and the benchmarks' numbers are claims about the library's own recipe:
an import of a private name, of a pass's internals or of a side channel would let them measure
something a user cannot run. Public means: a name of ``graphmerge`` itself, or a name a module
lists in its ``__all__`` (a module without ``__all__`` exports its names without a leading
underscore, unless it is one of the internal modules below), and no ``.meta[...]`` records.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import graphmerge

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")])
# the driver's plumbing and the passes' shared data: reached through graphmerge's own functions
INTERNAL = {"graphmerge.api", "graphmerge.cli", "graphmerge.merge_run", "graphmerge.run_store",
            "graphmerge.passes.ir", "graphmerge.passes.couple", "graphmerge.passes.layout",
            "graphmerge.passes.propagation", "graphmerge.passes.registry", "graphmerge.passes.widen",
            "graphmerge.passes.labels", "graphmerge.passes.util", "graphmerge.passes.stream"}


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None for a module import, line) for every graphmerge import."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "graphmerge":
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names
                      if alias.name.split(".")[0] == "graphmerge"]
    return found


def _public(module_name: str, name: str | None) -> str | None:
    """Why ``name`` of ``module_name`` is not public, or None if it is."""
    if name is not None and name.startswith("_"):
        return f"{name} is private"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return f"{module_name} does not exist"
    if name is not None and isinstance(getattr(module, name, None), type(graphmerge)):
        module_name, name, module = f"{module_name}.{name}", None, getattr(module, name)
    if any(module_name == m or module_name.startswith(m + ".") for m in INTERNAL):
        return f"{module_name} is internal"
    if name is None or module_name == "graphmerge":
        return None if name is None or name in graphmerge.__all__ or hasattr(module, name) else f"no {name}"
    exported = getattr(module, "__all__", None)
    if exported is not None and name not in exported:
        return f"{module_name}.__all__ does not list {name}"
    return None


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_import_only_public_names(path: Path) -> None:
    problems = [f"line {line}: from {module} import {name}: {why}" for module, name, line in _imports(path)
                if (why := _public(module, name)) is not None]
    assert not problems, f"{path.relative_to(ROOT)} uses graphmerge's internals:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_read_no_side_channels(path: Path) -> None:
    source = path.read_text()
    assert ".meta[" not in source and "__dict__[" not in source, (
        f"{path.relative_to(ROOT)} reads a graph's meta record or a module's __dict__: use the public accessor")


def test_the_checker_catches_internals(tmp_path: Path) -> None:
    """The checks above would fail on what the benchmarks used to do."""
    assert _public("graphmerge.api", "_closed_gates_reference") == "_closed_gates_reference is private"
    assert _public("graphmerge.passes.layout", "teacher_maps") == "graphmerge.passes.layout is internal"
    assert _public("graphmerge.passes.ir", "DimLayout") == "graphmerge.passes.ir is internal"
    assert _public("graphmerge.align", "rebasin_average") is None
    script = tmp_path / "bad.py"
    script.write_text("from graphmerge.passes.widen import widen_info\nimport graphmerge.api\n")
    assert [_public(m, n) for m, n, _ in _imports(script)] == ["graphmerge.passes.widen is internal",
                                                               "graphmerge.api is internal"]
