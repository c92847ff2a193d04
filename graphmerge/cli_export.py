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

import torch
import typer
from torch import nn

from graphmerge.errors import GraphMergeError

__all__ = ["bench_command", "export_command", "load_weights", "parse_ints", "parse_model_arg"]

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Model spec: path/model.py, path/model.py:NAME, torchvision:NAME or examples:NAME.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .onnx file (written atomically).")],
    weights: Annotated[
        Path | None,
        typer.Option("--weights", "-w", help="State dict to load: .safetensors, or .pt/.pth (weights_only)."),
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
                "examples:NAME), optionally followed by '=' and a .safetensors/.pt state dict, e.g. "
                "examples:resnet20=teacher.safetensors. The first model is the reference for the "
                "ratio column."
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
        label = item.name + (f"={weights.name}" if weights else "")
        loaded[_unique(label, loaded)] = (item.model, item.example_inputs)
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


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict into ``model`` with strict key and shape checking.

    ``.safetensors`` goes through safetensors; legacy ``.pt``/``.pth`` through ``torch.load``
    with ``weights_only=True`` only — a full unpickle runs arbitrary code from the file.
    """
    path = path.expanduser()
    if not path.is_file():
        raise GraphMergeError(f"weights file {path} does not exist. Check the path.")
    state = _read_state_dict(path)
    _check_state_dict(model, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GraphMergeError(f"cannot load {path} into the model: {str(exc).splitlines()[0]}") from exc


def _load(spec: str, weights: Path | None, input_shape: str | None) -> Any:
    """Load a model spec via graphmerge.loading, then its weights if given."""
    try:
        from graphmerge.loading import load_model, parse_input_shape
    except ImportError as exc:
        raise GraphMergeError(
            "graphmerge.loading is not available in this installation; reinstall graphmerge."
        ) from exc
    shape = parse_input_shape(input_shape) if input_shape else None
    loaded = load_model(spec, input_shape=shape)
    if weights is not None:
        load_weights(loaded.model, weights)
    return loaded


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise GraphMergeError(
            f"unknown weights format {path.name!r}: use .safetensors (preferred) or a .pt/.pth state dict."
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise GraphMergeError(f"cannot read {path} as safetensors: {exc}. Is the file complete?") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for non-tensor pickles, RuntimeError for corrupt files
        raise GraphMergeError(
            f"cannot read {path} with torch.load(weights_only=True): {str(exc).splitlines()[0]}. "
            f"graphmerge only reads plain state dicts (tensors in dicts); re-save with "
            f"torch.save(model.state_dict(), ...) or safetensors.torch.save_file."
        ) from exc
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": sd}`` / ``{"model": sd}`` checkpoints and DataParallel's prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if _is_tensor_mapping(inner):
                obj = inner
                break
    if not _is_tensor_mapping(obj):
        raise GraphMergeError(
            f"{path} does not hold a state dict (a mapping of names to tensors). Save one with "
            f"torch.save(model.state_dict(), path) or safetensors.torch.save_file."
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Name the first missing, unexpected or mis-shaped key (load_state_dict lists them all)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatch(es), first {k!r}: checkpoint {tuple(state[k].shape)} vs "
            f"model {tuple(expected[k].shape)}"
        )
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint, first {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint, first {unexpected[0]!r}")
    raise GraphMergeError(
        f"weights {path} do not match the model: {'; '.join(parts)}. Check that the checkpoint belongs "
        f"to this architecture and width (a merged student has the teachers' width, a big student "
        f"N times it)."
    )


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unique(label: str, taken: Mapping[str, Any]) -> str:
    if label not in taken:
        return label
    i = 2
    while f"{label}#{i}" in taken:
        i += 1
    return f"{label}#{i}"

