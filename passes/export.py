"""Export a model to ONNX and prove that onnxruntime computes what torch computes.

The last pass of the pipeline. A student is only useful once it runs outside Python, and an ONNX
file is only trustworthy once it has been checked, so this pass does four things in order:

1. export with the exporter current PyTorch recommends (``torch.onnx.export(..., dynamo=True)``,
   built on ``torch.export`` and onnxscript), falling back to the TorchScript exporter with a
   warning when the first one fails;
2. validate the file (``onnx.checker.check_model(full_check=True)`` and shape inference);
3. run it with onnxruntime (CPUExecutionProvider) on the example inputs *and* on a second batch
   size, and compare against torch eager — ``torch.onnx.export(verify=True)`` only logs, so the
   parity check that can fail is ours;
4. move the file into place atomically, so that no half-written ``.onnx`` is ever left behind.

The batch dimension stays dynamic by default. A graph that writes a literal batch size into a
``view``/``reshape`` silently pins it (``torch.export`` refines the dynamic dimension to a
constant); that is detected from the exported input shapes and reported as a
:class:`~graphmerge.errors.GraphMergeError` naming the fix, rather than shipped.

This module drives those steps and owns the files (the target's checks, the private temporary
directory, the final moves); running the exporters is ``onnx_exporters.py``'s job, the checks of
the written file ``onnx_checks.py``'s, whose public names are exported here too.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.onnx_checks import (
    BatchParity,
    batch_like,
    check_batch_is_dynamic,
    check_parity,
    flatten_outputs,
    opset_of,
    parity_error,
    validate,
)
from graphmerge.passes.onnx_exporters import export_with_fallback
from graphmerge.passes.util import eval_mode, one_line, replace_atomic
from torch import nn

__all__ = [
    "BatchParity",
    "ExportResult",
    "batch_like",
    "export_onnx",
    "export_onnx_report",
    "flatten_outputs",
    "normalize_inputs",
    "parity_error",
]

#: Weights above this size cannot live inside one protobuf; they go to a ``<name>.data`` side file.
_PROTOBUF_LIMIT = 2 * 1024**3


@dataclass
class ExportResult:
    """What :func:`export_onnx_report` wrote and how well it matches torch.

    ``size_bytes`` counts the ``.data`` side file when weights did not fit in one protobuf.
    ``exporter`` is ``"dynamo"`` (torch.export + onnxscript) or ``"torchscript"`` (the legacy
    fallback, used only when the first failed).
    """

    path: pathlib.Path
    exporter: str
    opset: int
    size_bytes: int
    dynamic_batch: bool
    tolerance: float
    side_file: pathlib.Path | None = None
    parity: list[BatchParity] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((p.max_abs for p in self.parity), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((p.max_rel for p in self.parity), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["side_file"] = str(self.side_file) if self.side_file else None
        return d


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, **options: Any) -> pathlib.Path:
    """Export ``model`` to one self-contained ONNX file at ``path`` and return the path.

    ``options`` are :func:`export_onnx_report`'s keywords (``dynamic_batch``, ``opset``,
    ``tolerance``, ``check``); this returns only the path.
    """
    return export_onnx_report(model, example_inputs, path, **options).path


def export_onnx_report(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    tolerance: float = 1e-4,
    check: bool = True,
) -> ExportResult:
    """Export ``model`` to ONNX at ``path``, validate it, check parity, and return a record.

    ``example_inputs`` is a tensor or a tuple of tensors (one per ``forward`` argument), batch
    first. With ``dynamic_batch`` the batch dimension of every input is exported as symbolic;
    an example batch of 1 is repeated to 2 because ``torch.export`` specializes size-1
    dimensions. ``opset`` None means the exporter's default. With ``check`` the file is run by
    onnxruntime at the example batch and at a second batch size, and a max relative error (max
    abs error over ``max(1, max|torch output|)``) above ``tolerance`` raises. Every failure
    raises :class:`GraphMergeError` and leaves nothing at ``path``.
    """
    target = _check_target(pathlib.Path(path))
    inputs = normalize_inputs(example_inputs)
    if dynamic_batch:
        inputs = _ensure_batch_at_least_two(inputs)
    with eval_mode(model):
        _check_runs_in_torch(model, inputs, dynamic_batch)
        tmpdir = _make_tmpdir(target)
        try:
            tmp_path = tmpdir / target.name
            exporter, notes = export_with_fallback(model, inputs, tmp_path, dynamic_batch, opset)
            side = _side_file(tmp_path)
            proto = validate(tmp_path)
            if dynamic_batch:
                check_batch_is_dynamic(proto, len(inputs))
            parity: list[BatchParity] = []
            if check:
                parity = check_parity(model, inputs, tmp_path, dynamic_batch, tolerance)
            size = tmp_path.stat().st_size + (side.stat().st_size if side else 0)
            final_side = _commit(tmp_path, side, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(
        path=target,
        exporter=exporter,
        opset=opset_of(proto),
        size_bytes=size,
        dynamic_batch=dynamic_batch,
        tolerance=tolerance,
        side_file=final_side,
        parity=parity,
        warnings=notes,
    )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Return ``example_inputs`` as a tuple of tensors, one per positional ``forward`` argument.

    ONNX graphs take tensors only; a non-tensor argument would be baked into the graph as a
    constant, which silently changes what the exported model computes, so it is refused.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise GraphMergeError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors (one per forward "
            f"argument), got {type(example_inputs).__name__}. Pass e.g. (torch.randn(2, 3, 32, 32),)."
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise GraphMergeError(
                f"example input {i} is a {type(x).__name__}, not a tensor. ONNX export takes "
                f"tensor inputs only; bind non-tensor arguments in a wrapper module "
                f"(e.g. functools.partial or a small nn.Module) before exporting."
            )
        if x.dim() == 0:
            raise GraphMergeError(
                f"example input {i} is a scalar tensor; inputs need a batch dimension (dim 0). "
                f"Pass a tensor of shape (batch, ...)."
            )
    return tuple(example_inputs)


# --------------------------------------------------------------------------------------------
# Steps of export_onnx_report, in order
# --------------------------------------------------------------------------------------------


def _check_target(target: pathlib.Path) -> pathlib.Path:
    """Fail early, before the slow export, when ``target`` cannot be written."""
    target = target.expanduser()
    parent = target.parent if str(target.parent) else pathlib.Path(".")
    if target.is_dir():
        raise GraphMergeError(
            f"the ONNX output path {target} is a directory. Pass a file path such as {target / 'model.onnx'}."
        )
    if not parent.exists():
        raise GraphMergeError(
            f"cannot write {target}: directory {parent} does not exist. Create it first "
            f"(mkdir -p {parent}) or choose another --out path."
        )
    if not parent.is_dir():
        raise GraphMergeError(
            f"cannot write {target}: {parent} is not a directory. Choose another output path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraphMergeError(
            f"cannot write {target}: directory {parent} is not writable. Choose a writable output path."
        )
    return target.absolute()


def _ensure_batch_at_least_two(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Repeat a batch-1 example along dim 0: torch.export specializes dimensions of size 1."""
    return tuple(x.repeat(2, *([1] * (x.dim() - 1))) if x.shape[0] == 1 else x for x in inputs)


def _check_runs_in_torch(model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> None:
    """Run the model once so that errors in the model are not blamed on the exporter."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # any failure of the user's forward is reported as such
        hint = (
            " The batch was repeated to 2 for a dynamic batch dimension; if the model hard-codes "
            "batch size 1 (e.g. x.view(1, -1)), use x.flatten(1) or pass dynamic_batch=False "
            "(--no-dynamic-batch)."
            if dynamic_batch
            else ""
        )
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise GraphMergeError(
            f"the model fails in torch on example inputs of shape {shapes}: {one_line(exc, 300)}.{hint}"
        ) from exc


def _make_tmpdir(target: pathlib.Path) -> pathlib.Path:
    """A private directory next to ``target``: same filesystem, so the final move is atomic."""
    try:
        return pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise GraphMergeError(
            f"cannot write {target}: {exc.strerror or exc}. Choose a writable output directory."
        ) from exc


def _commit(tmp_path: pathlib.Path, side: pathlib.Path | None, target: pathlib.Path) -> pathlib.Path | None:
    """Move the side file (if any) and then the model into place; the model move is atomic."""
    final_side = replace_atomic(side, target.parent / side.name) if side is not None else None
    replace_atomic(tmp_path, target)
    return final_side


def _side_file(onnx_path: pathlib.Path) -> pathlib.Path | None:
    """The ``<name>.data`` external-weights file onnxscript writes past the protobuf limit."""
    side = onnx_path.with_name(onnx_path.name + ".data")
    return side if side.exists() else None

