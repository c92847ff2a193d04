"""The ``graphmerge`` command line.

Every command is wrapped so that a ``GraphMergeError`` (a bad input, explained) prints as one
paragraph ``error: ...`` on stderr with exit code 2, while any other exception (a bug) keeps its
traceback. Heavy imports (torch) happen inside the commands so ``--help`` and ``--version`` stay
fast. The commands of ``cli_export`` and ``cli_merge`` are registered at the bottom.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from graphmerge import __version__
from graphmerge.cli_export import bench_command, export_command
from graphmerge.cli_merge import merge_command, train_command
from graphmerge.errors import GraphMergeError
from graphmerge.passes.util import write_atomic

app = typer.Typer(
    name="graphmerge",
    help="Merge N trained networks of one architecture into one network of the same size.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold tensors and whole models
)

SPEC_HELP = ("The model: path/to/model.py, path/to/model.py:NAME, torchvision:NAME or "
             "examples:NAME (a model bundled in graphmerge/examples).")
INPUT_SHAPE_HELP = ("Shape of one example batch, e.g. 1,3,224,224; overrides the file's "
                    "example_inputs() and the torchvision default.")
LEAF_HELP = ("Do not trace into this submodule (qualified name like layer1.0, or a class name); "
             "repeatable.")
MAX_LISTED = 3
PASS_ORDER = ["trace", "couple"]


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a GraphMergeError raised by ``command`` into ``error: ...`` on stderr and exit 2."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GraphMergeError as exc:
            message = " ".join(str(exc).split())
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return run


def _print_version(value: bool) -> None:
    if value:
        print(f"graphmerge {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Merge N trained networks of one architecture into one network of the same size."""


# --- trace ---------------------------------------------------------------------------------

@app.command("trace")
@guarded
def trace_command(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    input_shape: str | None = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    leaf: list[str] = typer.Option([], "--leaf", help=LEAF_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the groups as JSON, nothing else."),
    dot: Path | None = typer.Option(None, "--dot", help="Write the graph as Graphviz DOT."),
    svg: Path | None = typer.Option(None, "--svg", help="Render the graph to SVG (needs `dot`)."),
) -> None:
    """Trace a model and print its channel-coupling groups."""
    if svg is not None and shutil.which("dot") is None:  # fail before the slow part
        raise GraphMergeError(
            f"--svg {svg} needs Graphviz's `dot` program, which is not on PATH. Install Graphviz "
            f"(e.g. apt-get install graphviz or brew install graphviz), or write --dot FILE and "
            f"render it elsewhere.")
    for path in (dot, svg):
        if path is not None:
            check_writable(path)
    groupset, loaded_name, elapsed = analyze_spec(spec, input_shape, leaf)
    if dot is not None or svg is not None:
        dot_text = graph_to_dot(groupset, loaded_name)
        if dot is not None:
            write_atomic(dot, dot_text)
        if svg is not None:
            render_svg(dot_text, svg)
    if as_json:
        print(json.dumps(groupset.to_dict(), indent=2, default=str))
        return
    print_groups(groupset, loaded_name, elapsed)
    for path in (dot, svg):
        if path is not None:
            print(f"wrote {path}")


def analyze_spec(spec: str, input_shape: str | None, leaf: Sequence[str]):
    """Load ``spec`` and run the coupling analysis -> (GroupSet, model name, seconds taken)."""
    import graphmerge
    from graphmerge.loading import load_model, parse_input_shape

    shape = parse_input_shape(input_shape) if input_shape is not None else None
    loaded = load_model(spec, input_shape=shape)
    start = time.perf_counter()
    groupset = graphmerge.analyze(loaded.model, loaded.example_inputs, leaf_modules=tuple(leaf))
    return groupset, loaded.name, time.perf_counter() - start


def print_groups(groupset: Any, name: str, elapsed: float) -> None:
    """A table of the groups, then the totals and the time each pass took."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"coupling groups of {name}")
    for column in ("id", "width", "status", "producers", "consumers", "gate sites"):
        table.add_column(column, justify="right" if column in ("id", "width") else "left")
    for group in groupset:
        status = f"pinned: {group.reason}" if group.pinned else "widened"
        table.add_row(str(group.id), str(group.width), status, _shorten(group.producers),
                      _shorten(group.consumers), _shorten(group.gate_sites))
    console = Console()
    console.print(table)
    timings = {key.removesuffix("_s"): s for key, s in groupset.timings.items()} or {"analyze": elapsed}
    in_pipeline_order = sorted(timings, key=lambda k: PASS_ORDER.index(k) if k in PASS_ORDER else 99)
    times = ", ".join(f"{key} {timings[key]:.3f}s" for key in in_pipeline_order)
    console.print(f"{groupset.node_count} nodes, {len(groupset)} groups: "
                  f"{len(groupset.widened)} widened, {len(groupset.pinned)} pinned. Time: {times}.")


def _shorten(names: Sequence[str]) -> str:
    if len(names) <= MAX_LISTED:
        return ", ".join(names) or "-"
    return ", ".join(names[:MAX_LISTED]) + f", ... (+{len(names) - MAX_LISTED} more)"


# --- graph output --------------------------------------------------------------------------

PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69",
           "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#b2df8a", "#fdbf6f")
PINNED_COLOUR = "#d9d9d9"


def graph_to_dot(groupset: Any, name: str) -> str:
    """Graphviz DOT text of the traced graph; each node filled with the colour of its group.

    A node touching several groups takes the colour of the first widened one and lists them all
    in its label; nodes touching only pinned groups are grey, nodes touching none are white.
    """
    graph = groupset.to_networkx()
    pinned = {g.id for g in groupset.pinned}
    lines = [f"digraph {_quote(name)} {{", "  node [shape=box, style=filled, fontname=Helvetica];"]
    for node, data in graph.nodes(data=True):
        groups = data.get("groups", [])
        widened = [g for g in groups if g not in pinned]
        colour = PALETTE[widened[0] % len(PALETTE)] if widened else PINNED_COLOUR if groups else "white"
        label = f"{node}\n{data.get('op', '')} {data.get('target', '')}"
        if groups:
            label += "\ngroups " + ",".join(str(g) for g in groups)
        lines.append(f"  {_quote(node)} [label={_quote(label)}, fillcolor={_quote(colour)}];")
    lines.extend(f"  {_quote(a)} -> {_quote(b)};" for a, b in graph.edges())
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def check_writable(path: Path) -> None:
    """Fail before any work if ``path`` cannot be written: its folder must exist."""
    if path.is_dir():
        raise GraphMergeError(f"cannot write {path}: it is a folder. Give a file name.")
    if not path.parent.is_dir():
        raise GraphMergeError(f"cannot write {path}: folder {path.parent} does not exist. Create "
                              f"it first or choose another path.")


def render_svg(dot_text: str, path: Path) -> None:
    """Render DOT text to ``path`` with Graphviz, atomically."""
    svg = subprocess.run([shutil.which("dot") or "dot", "-Tsvg"], input=dot_text,
                         capture_output=True, text=True)
    if svg.returncode != 0:
        raise GraphMergeError(f"Graphviz `dot` failed to render {path}: "
                              f"{' '.join(svg.stderr.split()) or 'no message'}. Write --dot FILE "
                              f"instead and inspect it.")
    write_atomic(path, svg.stdout)


# --- demo ----------------------------------------------------------------------------------

@app.command("demo")
@guarded
def demo() -> None:
    """Merge two MNIST-1D CNN teachers into one student of the same size; print the groups and the results."""
    from graphmerge.cli_merge import demo_command

    groupset, name, elapsed = analyze_spec("examples:mnist1d_cnn", None, ())
    print_groups(groupset, name, elapsed)
    demo_command()


# --- commands from other modules -----------------------------------------------------------

def _register(command: Callable[..., Any], name: str) -> None:
    app.command(name)(guarded(command))


_register(export_command, "export")
_register(bench_command, "bench")
_register(merge_command, "merge")
_register(train_command, "train")


if __name__ == "__main__":
    app(prog_name="graphmerge")
