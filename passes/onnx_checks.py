"""Checking an exported ONNX file: the ONNX checker, a dynamic batch, and parity with torch in onnxruntime.

``torch.onnx.export(verify=True)`` only logs, so the checks that can fail are these: ``validate``
(``onnx.checker`` with full checking and strict shape inference), ``check_batch_is_dynamic`` (a
literal batch size in a reshape pins the batch axis) and ``check_parity`` (onnxruntime against torch
eager at the example batch and at a second batch size, relative to ``max(1, max|torch output|)``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.util import one_line
from torch import nn
from torch.utils import _pytree as pytree


@dataclass
class BatchParity:
    """Agreement between torch eager and onnxruntime at one batch size."""

    batch: int
    max_abs: float
    max_rel: float


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


def validate(tmp_path: pathlib.Path) -> Any:
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


def check_batch_is_dynamic(proto: Any, n_inputs: int) -> None:
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


def check_parity(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    tmp_path: pathlib.Path,
    dynamic_batch: bool,
    tolerance: float,
) -> list[BatchParity]:
    """Compare onnxruntime with torch eager at the example batch and (dynamic) at batch + 1."""
    session = ort_session(tmp_path)
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


def opset_of(proto: Any) -> int:
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


def ort_session(path: pathlib.Path) -> Any:
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
