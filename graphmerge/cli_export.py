"""The ``graphmerge export`` and ``graphmerge bench`` commands.

Thin wrappers: parse and check the command line, load models and weights, call
:func:`graphmerge.passes.export.export_onnx_report` or :func:`graphmerge.bench.benchmark`, print the result.
Every bad input raises :class:`~graphmerge.errors.GraphMergeError`; the CLI entry point prints it
as one paragraph and exits 2. Registered by ``graphmerge/cli.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from torch import nn

from graphmerge.checkpoint import load_weights
from graphmerge.errors import GraphMergeError

__all__ = ["bench_command", "check_positional_inputs", "export_command", "parse_ints", "parse_model_arg"]


def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help=("Model spec: path/model.py, path/model.py:NAME, torchvision:NAME, timm:NAME, hf:PATH "
                  "or examples:NAME."),
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .onnx file (written atomically).")],
    weights: Annotated[
        Path | None,
        typer.Option("--weights", "-w", help="State dict: .safetensors, or .pt/.pth/.bin/.ckpt (weights_only)."),
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option("--input-shape", help="Example input shape, batch first, e.g. 1,3,32,32."),
    ] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: exporter's).")] = None,
    no_dynamic_batch: Annotated[
        bool, typer.Option("--no-dynamic-batch", help="Fix the batch size to the example's.")
    ] = False,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Max relative error vs torch, over max(1, max|out|).")
    ] = 1e-4,
) -> None:
    """Export a model to one self-contained ONNX file, checked against torch with onnxruntime."""
    from rich.console import Console

    from graphmerge.passes.export import export_onnx_report

    if tolerance <= 0:
        raise GraphMergeError(f"--tolerance must be positive, got {tolerance}.")
    loaded = _load(model, weights, input_shape)
    console = Console()
    console.print(f"exporting [bold]{loaded.name}[/] to {out} ...")
    if loaded.source.startswith("hf:") and loaded.example_kwargs:  # inputs named as the model's, sequence dynamic
        from graphmerge.hf import export_hf_onnx

        report = export_hf_onnx(loaded, out, opset=opset, tolerance=tolerance, dynamic=not no_dynamic_batch)
        console.print(f"inputs {', '.join(report.input_names)}; dynamic axes "
                      f"{', '.join(sorted({a for axes in report.dynamic_axes.values() for a in axes})) or 'none'}; "
                      f"parity checked at shapes {', '.join(str(s) for s in report.checked_shapes)}")
    else:
        check_positional_inputs(loaded, "export", "graphmerge.export_onnx takes positional example inputs only")
        report = export_onnx_report(
            loaded.model,
            loaded.example_inputs,
            out,
            dynamic_batch=not no_dynamic_batch,
            opset=opset,
            tolerance=tolerance,
        )
    side = f" + side file {report.side_file.name}" if report.side_file else ""
    console.print(
        f"wrote {report.path} ({report.size_bytes / 1e6:.2f} MB{side}), exporter {report.exporter}, "
        f"opset {report.opset}, batch {'dynamic' if report.dynamic_batch else 'fixed'}"
    )
    for p in report.parity:
        console.print(
            f"  parity vs torch at batch {p.batch}: max abs {p.max_abs:.2e}, max rel {p.max_rel:.2e} "
            f"(tolerance {report.tolerance:g})"
        )
    for note in report.warnings:
        console.print(f"[yellow]warning:[/] {note}")


def bench_command(
    models: Annotated[
        list[str],
        typer.Argument(
            help=(
                "One or more MODEL[=WEIGHTS]: a model spec (path/model.py[:NAME], torchvision:NAME, "
                "timm:NAME, hf:PATH, examples:NAME), optionally followed by '=' and a .safetensors/.pt "
                "state dict, e.g. examples:resnet20=teacher.safetensors. The first model is the "
                "reference for the ratio column."
            ),
            show_default=False,
        ),
    ],
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")] = "1,8,32",
    providers: Annotated[
        str, typer.Option("--providers", help="Comma-separated: cpu, cuda, auto (all available).")
    ] = "cpu",
    threads: Annotated[
        int | None, typer.Option("--threads", help="Intra-op threads for torch and onnxruntime alike.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write rows and machine info as JSON.")
    ] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Write the table as markdown.")] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="Example input shape for every model, e.g. 1,3,32,32.")
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls per cell.")] = 3,
    min_time: Annotated[float, typer.Option("--min-time", help="Seconds of timed calls per cell.")] = 0.5,
    min_iters: Annotated[int, typer.Option("--min-iters", help="Timed calls per cell, at least.")] = 20,
    compile: Annotated[
        bool, typer.Option("--compile", help="Also time torch.compile (slow to compile on small CPUs).")
    ] = False,
) -> None:
    """Benchmark models side by side (onnxruntime vs torch), interleaved so noise hits all alike."""
    from graphmerge.bench import (
        benchmark,
        machine_info,
        print_table,
        resolve_providers,
        write_json,
        write_markdown,
    )

    batches = parse_ints(batch, "--batch")
    devices = resolve_providers(providers.split(","))
    if warmup < 0 or min_iters < 1 or min_time < 0:
        raise GraphMergeError("--warmup must be >= 0, --min-iters >= 1 and --min-time >= 0.")
    for target in (json_out, markdown):
        if target is not None and not target.expanduser().absolute().parent.is_dir():
            raise GraphMergeError(f"cannot write {target}: its directory does not exist. Create it first.")
    loaded: dict[str, tuple[nn.Module, Any]] = {}
    for arg in models:
        spec, weights = parse_model_arg(arg)
        item = _load(spec, weights, input_shape)
        if item.source.startswith("hf:") and item.example_kwargs:  # input_ids, attention_mask as positional inputs
            from graphmerge.hf import positional_model

            module, inputs, _ = positional_model(item)
        else:
            check_positional_inputs(item, "bench", "graphmerge.bench.benchmark runs each model on positional "
                                                   "example inputs only")
            module, inputs = item.model, item.example_inputs
        label = item.name + (f"={weights.name}" if weights else "")
        loaded[_unique(label, loaded)] = (module, inputs)
    rows = benchmark(
        loaded,
        batches=batches,
        providers=devices,
        threads=threads,
        warmup=warmup,
        min_time=min_time,
        min_iters=min_iters,
        compile=compile,
    )
    machine = machine_info(threads, devices)
    print_table(rows, machine)
    if json_out is not None:
        write_json(json_out, rows, machine)
    if markdown is not None:
        write_markdown(markdown, rows, machine)


# --------------------------------------------------------------------------------------------
# Argument parsing and loading
# --------------------------------------------------------------------------------------------


def parse_model_arg(arg: str) -> tuple[str, Path | None]:
    """Split ``SPEC[=WEIGHTS]`` at the first '=' (specs never contain one; weight paths may)."""
    spec, sep, weights = arg.partition("=")
    spec = spec.strip()
    if not spec:
        raise GraphMergeError(f"empty model spec in {arg!r}; write MODEL or MODEL=WEIGHTS.")
    if sep and not weights.strip():
        raise GraphMergeError(
            f"{arg!r} ends with '=' but names no weights file; write MODEL=path.safetensors."
        )
    return spec, (Path(weights.strip()) if sep else None)


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """Parse "1,8,32" (or "1x3x32x32") into positive ints, naming the option on error."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise GraphMergeError(
            f"{option} must be comma-separated positive integers (e.g. 1,8,32), got {text!r}."
        )
    return values


def check_positional_inputs(loaded: Any, command: str, limitation: str) -> None:
    """Refuse, in one paragraph, a model that runs only with keyword inputs (``hf:`` models get
    ``attention_mask`` and ``use_cache=False``) where ``command`` can feed it positional ones only."""
    if not loaded.example_kwargs:
        return
    keys = ", ".join(f"{key}={_describe(value)}" for key, value in loaded.example_kwargs.items())
    raise GraphMergeError(
        f"graphmerge {command} cannot run {loaded.name} ({loaded.source}): it is called with keyword "
        f"inputs ({keys}), and {limitation}. Write a model file instead: path/to/model.py whose "
        f"build_model() returns an nn.Module whose forward takes the tensors positionally and calls "
        f"the model with the other keywords fixed, and whose example_inputs() returns those tensors; "
        f"then pass path/to/model.py (`graphmerge trace` takes the {loaded.source} spec as it is).")


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"tensor {tuple(shape)}" if shape is not None else repr(value)


def _load(spec: str, weights: Path | None, input_shape: str | None) -> Any:
    """Load a model spec via graphmerge.loading, then its weights if given."""
    from graphmerge.loading import load_model, parse_input_shape

    shape = parse_input_shape(input_shape) if input_shape else None
    loaded = load_model(spec, input_shape=shape)
    if weights is not None:
        load_weights(loaded.model, weights)  # the one weights reader, shared with merge --teacher
    return loaded


def _unique(label: str, taken: Mapping[str, Any]) -> str:
    if label not in taken:
        return label
    i = 2
    while f"{label}#{i}" in taken:
        i += 1
    return f"{label}#{i}"

