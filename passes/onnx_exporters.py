"""Running torch's ONNX exporters: the torch.export-based one first, the TorchScript one as fallback.

``export_with_fallback`` writes the file with ``torch.onnx.export(dynamo=True)`` and, when that
fails, retries with the legacy exporter and says so (a warning and a note in the report); when both
fail, one error names the op that has no ONNX translation, found in either exporter's message.
The exporters' own progress output is silenced (``quiet``) so that a CLI run prints only ours.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import pathlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.onnx_checks import flatten_outputs
from graphmerge.passes.util import one_line
from torch import nn

#: Loggers the exporters write progress to; silenced during export to keep output tidy.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental", "onnxscript")


def export_with_fallback(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    tmp_path: pathlib.Path,
    dynamic_batch: bool,
    opset: int | None,
) -> tuple[str, list[str]]:
    """Export with dynamo; on failure retry with TorchScript and say so. Returns (exporter, notes)."""
    try:
        _export_dynamo(model, inputs, tmp_path, dynamic_batch, opset)
        return "dynamo", []
    except Exception as dynamo_exc:  # any exporter failure triggers the fallback
        dynamo_error = dynamo_exc
    _remove_partial(tmp_path)
    try:
        _export_torchscript(model, inputs, tmp_path, dynamic_batch, opset)
    except Exception as ts_exc:
        _remove_partial(tmp_path)
        raise _export_failure(dynamo_error, ts_exc) from dynamo_error
    note = (
        f"the torch.export-based ONNX exporter (dynamo=True) failed ({summarize(dynamo_error)}); "
        f"exported with the legacy TorchScript exporter (dynamo=False) instead."
    )
    warnings.warn(f"graphmerge.export_onnx: {note}", stacklevel=3)
    return "torchscript", [note]


def _export_dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], tmp_path: pathlib.Path, dynamic_batch: bool,
                   opset: int | None) -> None:
    """torch.onnx.export(dynamo=True), weights inside the file unless they exceed 2 GB."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
        if _takes_var_positional(model):
            dynamic_shapes = (dynamic_shapes,)  # one entry for the ``*args`` tuple as a whole
    with quiet():
        program = torch.onnx.export(
            model,
            inputs,
            None,
            dynamo=True,
            verbose=False,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=_input_names(len(inputs)),
            optimize=True,
        )
        # external_data=False still switches to a side file past the protobuf limit.
        program.save(str(tmp_path), external_data=False)


def _takes_var_positional(model: nn.Module) -> bool:
    """Whether ``forward`` reads its inputs as ``*args``, as wrappers such as GatedStudent do:
    torch.export then matches ``dynamic_shapes`` against that one tuple."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL


def _export_torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], tmp_path: pathlib.Path, dynamic_batch: bool,
                        opset: int | None) -> None:
    """The legacy exporter; the batch axis is made dynamic with ``dynamic_axes``."""
    with torch.no_grad():
        n_out = len(flatten_outputs(model(*inputs)))
    input_names = _input_names(len(inputs))
    output_names = [f"output_{i}" for i in range(n_out)]
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with quiet():
        torch.onnx.export(
            model,
            inputs,
            str(tmp_path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            **kwargs,
        )


def _input_names(n: int) -> list[str]:
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _export_failure(dynamo_exc: BaseException, ts_exc: BaseException) -> GraphMergeError:
    """One paragraph naming the op that failed, when either exporter's message names one."""
    op = _failed_op(dynamo_exc) or _failed_op(ts_exc)
    what = f"operator {op} has no ONNX translation" if op else "the model could not be exported"
    return GraphMergeError(
        f"ONNX export failed: {what}. torch.export-based exporter: {summarize(dynamo_exc)}; "
        f"TorchScript exporter: {summarize(ts_exc)}. Replace the op with supported ones, pass another "
        f"opset, or register a custom translation (torch.onnx.export custom_translation_table)."
    )


_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),
    re.compile(r"operator '([\w:.]+)' to ONNX"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"\b(aten::\w+)"),
)


def _failed_op(exc: BaseException) -> str | None:
    text = _full_text(exc)
    for pattern in _OP_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def _full_text(exc: BaseException) -> str:
    parts, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__``: torch.onnx wraps the real error in a generic "step 1/3" one."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def summarize(exc: BaseException) -> str:
    op = _failed_op(exc)
    root = _root_cause(exc)
    base = one_line(root, 300)
    return f"{base} (op {op})" if op and op not in base else base


def _remove_partial(tmp_path: pathlib.Path) -> None:
    for p in (tmp_path, tmp_path.with_name(tmp_path.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' prints, log records and deprecation warnings for one export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
