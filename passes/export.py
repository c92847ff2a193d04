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
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import pathlib
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.util import eval_mode, one_line, replace_atomic
from torch import nn
from torch.utils import _pytree as pytree

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

#: Loggers the exporters write progress to; silenced during export to keep output tidy.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental", "onnxscript")


@dataclass
class BatchParity:
    """Agreement between torch eager and onnxruntime at one batch size."""

    batch: int
    max_abs: float
    max_rel: float


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
            exporter, notes = _export_with_fallback(model, inputs, tmp_path, dynamic_batch, opset)
            side = _side_file(tmp_path)
            proto = _validate(tmp_path)
            if dynamic_batch:
                _check_batch_is_dynamic(proto, len(inputs))
            parity: list[BatchParity] = []
            if check:
                parity = _check_parity(model, inputs, tmp_path, dynamic_batch, tolerance)
            size = tmp_path.stat().st_size + (side.stat().st_size if side else 0)
            final_side = _commit(tmp_path, side, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(
        path=target,
        exporter=exporter,
        opset=_opset_of(proto),
        size_bytes=size,
        dynamic_batch=dynamic_batch,
        tolerance=tolerance,
        side_file=final_side,
        parity=parity,
        warnings=notes,
    )


# --------------------------------------------------------------------------------------------
# Inputs and outputs
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


def batch_like(inputs: Sequence[torch.Tensor], batch: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Make inputs shaped like ``inputs`` but with batch size ``batch``.

    Floating inputs are fresh samples with the examples' mean and std (a new batch, not a copy,
    so parity is tested on data the export never saw); integer inputs such as token ids or
    class indices are the examples' rows cycled, which keeps every value in range.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if x.is_floating_point():
            std = float(x.float().std()) if x.numel() > 1 else 1.0
            mean = float(x.float().mean())
            fresh = torch.randn((batch, *x.shape[1:]), generator=gen) * (std or 1.0) + mean
            out.append(fresh.to(dtype=x.dtype, device=x.device))
        else:
            rows = torch.arange(batch) % x.shape[0]
            out.append(x[rows.to(x.device)].clone())
    return tuple(out)


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """Flatten a model's (possibly nested) outputs into the order the ONNX graph lists them."""
    leaves, _ = pytree.tree_flatten(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def parity_error(reference: Sequence[torch.Tensor], candidate: Sequence[np.ndarray]) -> tuple[float, float]:
    """Return ``(max abs error, max relative error)`` of ``candidate`` against ``reference``.

    Relative error is the max abs error over ``max(1, max|reference|)``: a plain elementwise
    relative error explodes on outputs near zero (logits, residuals) and would flag agreement.
    """
    if len(reference) != len(candidate):
        raise GraphMergeError(
            f"the ONNX model returns {len(candidate)} outputs but torch returns {len(reference)}; "
            f"the export dropped or added outputs. Return a tensor or a flat tuple of tensors from forward."
        )
    max_abs, scale = 0.0, 1.0
    for ref, cand in zip(reference, candidate, strict=True):
        ref_np = ref.detach().cpu().double().numpy()
        cand_np = np.asarray(cand, dtype=np.float64)
        if ref_np.shape != cand_np.shape:
            raise GraphMergeError(
                f"an ONNX output has shape {tuple(cand_np.shape)} but torch gives {tuple(ref_np.shape)}; "
                f"the exported graph does not compute the same function."
            )
        if ref_np.size:
            max_abs = max(max_abs, float(np.max(np.abs(ref_np - cand_np))))
            scale = max(scale, float(np.max(np.abs(ref_np))))
    return max_abs, max_abs / scale


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


def _export_with_fallback(
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
        f"the torch.export-based ONNX exporter (dynamo=True) failed ({_summarize(dynamo_error)}); "
        f"exported with the legacy TorchScript exporter (dynamo=False) instead."
    )
    warnings.warn(f"graphmerge.export_onnx: {note}", stacklevel=3)
    return "torchscript", [note]


def _export_dynamo(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    tmp_path: pathlib.Path,
    dynamic_batch: bool,
    opset: int | None,
) -> None:
    """torch.onnx.export(dynamo=True), weights inside the file unless they exceed 2 GB."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
        if _takes_var_positional(model):
            dynamic_shapes = (dynamic_shapes,)  # one entry for the ``*args`` tuple as a whole
    with _quiet():
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


def _export_torchscript(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    tmp_path: pathlib.Path,
    dynamic_batch: bool,
    opset: int | None,
) -> None:
    """The legacy exporter; the batch axis is made dynamic with ``dynamic_axes``."""
    with torch.no_grad():
        n_out = len(flatten_outputs(model(*inputs)))
    input_names = _input_names(len(inputs))
    output_names = [f"output_{i}" for i in range(n_out)]
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with _quiet():
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


def _validate(tmp_path: pathlib.Path) -> Any:
    """Run the ONNX checker (full, with strict shape inference) and return the inferred proto."""
    import onnx

    try:
        onnx.checker.check_model(str(tmp_path), full_check=True)
        proto = onnx.load(str(tmp_path), load_external_data=False)
        return onnx.shape_inference.infer_shapes(proto, check_type=True)
    except Exception as exc:  # checker errors have many types
        raise GraphMergeError(
            f"the exported ONNX model is invalid: {one_line(exc, 300)}. This is an exporter bug or an "
            f"op the exporter translated wrongly; try another opset (--opset) or report it."
        ) from exc


def _check_batch_is_dynamic(proto: Any, n_inputs: int) -> None:
    """Detect a batch dimension the exporter pinned to a constant (a literal batch in a reshape)."""
    for value in list(proto.graph.input)[:n_inputs]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise GraphMergeError(
                f"the batch dimension of ONNX input {value.name!r} was fixed to {dims[0].dim_value}: "
                f"the model writes a literal batch size into a view/reshape (e.g. "
                f"x.view({dims[0].dim_value}, -1)), so the exported graph would only accept that batch "
                f"size. Use x.flatten(1) or x.view(x.size(0), -1) in the model, or export with "
                f"dynamic_batch=False (--no-dynamic-batch)."
            )


def _check_parity(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    tmp_path: pathlib.Path,
    dynamic_batch: bool,
    tolerance: float,
) -> list[BatchParity]:
    """Compare onnxruntime with torch eager at the example batch and (dynamic) at batch + 1."""
    session = _ort_session(tmp_path)
    batches = [(inputs[0].shape[0], inputs)]
    if dynamic_batch:
        second = inputs[0].shape[0] + 1
        batches.append((second, batch_like(inputs, second, seed=1)))
    results = []
    for batch, feed in batches:
        with torch.no_grad():
            reference = flatten_outputs(model(*feed))
        got = _run_ort(session, feed, batch)
        max_abs, max_rel = parity_error(reference, got)
        results.append(BatchParity(batch=int(batch), max_abs=max_abs, max_rel=max_rel))
    worst = max(results, key=lambda p: p.max_rel)
    if not worst.max_rel <= tolerance:  # also catches NaN
        numbers = "; ".join(
            f"batch {p.batch}: max abs {p.max_abs:.3g}, max rel {p.max_rel:.3g}" for p in results
        )
        raise GraphMergeError(
            f"onnxruntime disagrees with torch beyond tolerance {tolerance:g} ({numbers}; relative to "
            f"max(1, max|torch output|)). The ONNX file was not written. Causes: an op exported wrongly, "
            f"a forward that differs between tracing and eager (data-dependent control flow, randomness, "
            f"dropout in train mode), or float16 weights; try another opset or a looser --tolerance."
        )
    return results


def _commit(tmp_path: pathlib.Path, side: pathlib.Path | None, target: pathlib.Path) -> pathlib.Path | None:
    """Move the side file (if any) and then the model into place; the model move is atomic."""
    final_side = replace_atomic(side, target.parent / side.name) if side is not None else None
    replace_atomic(tmp_path, target)
    return final_side


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _input_names(n: int) -> list[str]:
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _side_file(onnx_path: pathlib.Path) -> pathlib.Path | None:
    """The ``<name>.data`` external-weights file onnxscript writes past the protobuf limit."""
    side = onnx_path.with_name(onnx_path.name + ".data")
    return side if side.exists() else None


def _opset_of(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def import_onnxruntime() -> Any:
    """The onnxruntime module, or a clear error saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise GraphMergeError(
            "onnxruntime is not installed, and the parity check and the benchmark run the ONNX file with it. "
            "Install one of the two mutually exclusive extras: pip install 'graphmerge[cpu]' (onnxruntime) or "
            "'graphmerge[gpu]' (onnxruntime-gpu, CUDA machines); or call export_onnx(..., check=False) to skip "
            "the check."
        ) from None
    return onnxruntime


def _ort_session(path: pathlib.Path) -> Any:
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise GraphMergeError(
            f"onnxruntime cannot load the exported model: {one_line(exc, 300)}. The file was not written; "
            f"try another opset (--opset)."
        ) from exc


def _run_ort(session: Any, feed: tuple[torch.Tensor, ...], batch: int) -> list[np.ndarray]:
    """Run one batch; an ORT shape error at a new batch size means the batch axis is baked in."""
    names = [i.name for i in session.get_inputs()]
    feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, feed, strict=False)}
    try:
        return session.run(None, feeds)
    except Exception as exc:  # ORT raises pybind exception types
        raise GraphMergeError(
            f"onnxruntime fails at batch size {batch}: {one_line(exc, 300)}. The model most likely writes "
            f"a literal batch size into a view/reshape; use x.flatten(1) or x.view(x.size(0), -1), or "
            f"export with dynamic_batch=False (--no-dynamic-batch). The ONNX file was not written."
        ) from exc


def _export_failure(dynamo_exc: BaseException, ts_exc: BaseException) -> GraphMergeError:
    """One paragraph naming the op that failed, when either exporter's message names one."""
    op = _failed_op(dynamo_exc) or _failed_op(ts_exc)
    what = f"operator {op} has no ONNX translation" if op else "the model could not be exported"
    return GraphMergeError(
        f"ONNX export failed: {what}. torch.export-based exporter: {_summarize(dynamo_exc)}; "
        f"TorchScript exporter: {_summarize(ts_exc)}. Replace the op with supported ones, pass another "
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


def _summarize(exc: BaseException) -> str:
    op = _failed_op(exc)
    root = _root_cause(exc)
    base = one_line(root, 300)
    return f"{base} (op {op})" if op and op not in base else base


def _remove_partial(tmp_path: pathlib.Path) -> None:
    for p in (tmp_path, tmp_path.with_name(tmp_path.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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
