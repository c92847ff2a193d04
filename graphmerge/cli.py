"""The ``graphmerge`` command line.

Every command is wrapped so that a ``GraphMergeError`` (a bad input, explained) prints as one
paragraph ``error: ...`` on stderr with exit code 2, while any other exception (a bug) keeps its
traceback. Heavy imports (torch) happen inside the commands so ``--help`` and ``--version`` stay
fast. The commands of ``cli_export`` and ``cli_merge`` are registered at the bottom.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import typer

from graphmerge import __version__
from graphmerge.cli_average import average_command
from graphmerge.cli_export import bench_command, export_command
from graphmerge.cli_merge import merge_command, train_command
from graphmerge.errors import GraphMergeError
from graphmerge.passes.util import one_line, write_atomic

app = typer.Typer(
    name="graphmerge",
    help="Merge N trained networks of one architecture into one network of the same size.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold tensors and whole models
)

SPEC_HELP = ("The model: path/to/model.py, path/to/model.py:NAME, torchvision:NAME, timm:NAME, "
             "hf:PATH (a directory written by save_pretrained) or examples:NAME (a model bundled "
             "in graphmerge/examples).")
INPUT_SHAPE_HELP = ("Shape of one example batch, e.g. 1,3,224,224 (for hf: text models, "
                    "batch,sequence of input_ids); overrides the file's example_inputs() and the "
                    "torchvision, timm and hf defaults.")
LEAF_HELP = ("Keep this submodule as it is: every channel inside it is pinned, none widened "
             "(qualified name like layer1.0, or a class name); repeatable.")
VERIFY_HELP = ("Also widen the model with a perturbed copy of itself, compress it back, and print the "
               "certificates I1, I2 and I3 with their errors, seconds and peak memory.")
MAX_LISTED = 3
PASS_ORDER = ["trace", "couple"]
# torch.export logs its guesses at WARNING ("Unable to find user code corresponding to {u0}") on
# stderr, where they would precede the one-paragraph error; the CLI shows only errors from them.
NOISY_TORCH_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a GraphMergeError raised by ``command`` into ``error: ...`` on stderr and exit 2."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        for name in NOISY_TORCH_LOGGERS:  # after torch's import, which resets their levels
            logging.getLogger(name).setLevel(logging.ERROR)
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
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
) -> None:
    """Capture a model with torch.export and print its channel-coupling groups."""
    if svg is not None and shutil.which("dot") is None:  # fail before the slow part
        raise GraphMergeError(
            f"--svg {svg} needs Graphviz's `dot` program, which is not on PATH. Install Graphviz "
            f"(e.g. apt-get install graphviz or brew install graphviz), or write --dot FILE and "
            f"render it elsewhere.")
    for path in (dot, svg):
        if path is not None:
            check_writable(path)
    loaded_model: list[Any] = []
    groupset, loaded_name, elapsed = analyze_spec(spec, input_shape, leaf, loaded_model)
    certificates = verify_merge(loaded_model[0], groupset) if verify else None
    if dot is not None or svg is not None:
        dot_text = graph_to_dot(groupset, loaded_name)
        if dot is not None:
            write_atomic(dot, dot_text)
        if svg is not None:
            render_svg(dot_text, svg)
    if as_json:
        report = groupset.to_dict()
        if certificates is not None:
            report["certificates"] = {k: c.to_dict() for k, c in certificates.items()}
        print(json.dumps(report, indent=2, default=str))
        return
    print_groups(groupset, loaded_name, elapsed)
    if certificates is not None:
        print_certificates(certificates, groupset.timings)
    for path in (dot, svg):
        if path is not None:
            print(f"wrote {path}")


def analyze_spec(spec: str, input_shape: str | None, leaf: Sequence[str], loaded_out: list[Any] | None = None):
    """Load ``spec`` and run the coupling analysis -> (GroupSet, model name, seconds taken);
    ``loaded_out`` receives the loaded model (``loading.LoadedModel``) when given.

    What the analysis writes to stderr, and its warnings (one line each), print after it and only
    if it succeeds: where capture fails, torch.export prints the partial graph and graphmerge warns
    that it retries with a static batch, and the one-paragraph error says it all. Where the
    capture fails because the model cannot run on its example input at all, the error says so
    and names the input's shape.
    """
    import graphmerge
    from graphmerge.loading import load_model, parse_input_shape

    shape = parse_input_shape(input_shape) if input_shape is not None else None
    loaded = load_model(spec, input_shape=shape)
    if loaded_out is not None:
        loaded_out.append(loaded)
    start = time.perf_counter()
    with deferred_stderr():
        try:
            groupset = graphmerge.analyze(loaded.model, loaded.example_inputs,
                                          example_kwargs=loaded.example_kwargs, leaf_modules=tuple(leaf))
        except GraphMergeError:
            check_model_runs(loaded, given_shape=input_shape is not None)
            raise
    return groupset, loaded.name, time.perf_counter() - start


@contextlib.contextmanager
def deferred_stderr() -> Iterator[None]:
    """Hold what is written to ``sys.stderr`` and the warnings raised inside; print them (each
    warning as one ``warning: ...`` line) only if no exception left the block."""
    held = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(held):
        warnings.simplefilter("default")
        yield
    sys.stderr.write(held.getvalue())
    for warning in caught:
        print(f"warning: {' '.join(str(warning.message).split())}", file=sys.stderr)


def check_model_runs(loaded: Any, given_shape: bool) -> None:
    """Raise a GraphMergeError naming the example input if the model cannot run on it eagerly."""
    import torch

    from graphmerge.passes.util import eval_mode

    try:
        with eval_mode(loaded.model), torch.no_grad():
            loaded.model(*loaded.example_inputs, **loaded.example_kwargs)
    except Exception as exc:
        tensors = [*loaded.example_inputs, *loaded.example_kwargs.values()]
        shapes = ", ".join(str(tuple(x.shape)) for x in tensors if isinstance(x, torch.Tensor)) or "none"
        source = "the --input-shape given" if given_shape else "its default example input"
        raise GraphMergeError(
            f"the model {loaded.name} cannot run on {source}, of shape {shapes}: {one_line(exc)}. Give the "
            f"shape of one batch it takes with --input-shape (e.g. --input-shape 1,3,224,224).") from exc


def verify_merge(loaded: Any, groupset: Any) -> dict[str, Any]:
    """``trace --verify``: widen the model with a copy of itself whose every floating tensor is
    scaled by its own seeded factor exp(0.05 N(0, 1)) (signs and zeros kept, so statistics such as
    BatchNorm's running variance stay valid), run the certificates I1 and I2 (widen) and I3
    (compress with seeded random channel scores), and return them."""
    import copy

    import torch

    import graphmerge
    from graphmerge.api import student_certificate
    from graphmerge.passes.ir import widen_info
    from graphmerge.pipeline import perturb

    other = perturb(copy.deepcopy(loaded.model), seed=0)
    generator = torch.Generator().manual_seed(0)
    with deferred_stderr():
        big = graphmerge.widen([loaded.model, other], loaded.example_inputs, example_kwargs=loaded.example_kwargs,
                               groups=groupset)
        _, info = widen_info(big)
        scores = {g.id: torch.rand(info.n_teachers * g.width, generator=generator) for g in info.groups.gated}
        student = graphmerge.compress(big, scores)
    return {**info.certificates, "I3": student_certificate(student)}


def print_certificates(certificates: dict[str, Any], timings: dict[str, float]) -> None:
    """One line per certificate: what it found, its dtype, seconds and peak memory."""
    print("certificates (the model and a perturbed copy of it; graphs streamed node by node):")
    for name, certificate in certificates.items():
        if certificate.skipped:
            print(f"  {name}: skipped: {certificate.skipped}")
            continue
        peak = f", peak {certificate.peak_bytes / 2**20:.1f} MB" if name != "I2" else ""
        print(f"  {name}: max error {certificate.max_error:.3g} (relative {certificate.relative_error:.3g}, "
              f"tolerance {certificate.tolerance:g}) in {certificate.dtype}, {certificate.seconds:.3f}s{peak}")
    stages = [f"{key.removesuffix('_s')} {timings[key]:.3f}s" for key in ("widen_s", "compress_s") if key in timings]
    print(f"  time: {', '.join(stages)}")


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
    timings = {key.removesuffix("_s"): s for key, s in groupset.timings.items()
               if key in ("trace_s", "couple_s")} or {"analyze": elapsed}
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
_register(average_command, "average")


if __name__ == "__main__":
    app(prog_name="graphmerge")
