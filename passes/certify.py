"""Certify: check what widen and compress built, on the example inputs, instead of trusting it.

The analysis is conservative, but a rule can still misread an op it has a rule for; the result
would be a big student that is not the teachers' mean, or a student that is not the gated big
student, and nobody would notice until training went wrong. So both passes run their result:

- after widen, invariant I1: ``big(x) == mean_t teacher_t(x)`` on every output leaf, and I2:
  selecting teacher t's channels gives back teacher t's tensors (a comparison, no forward);
- after compress, invariant I3: the student computes what the gated big student computes with
  the dropped channels' gates closed and the kept ones at their eval value.

Both run in float64 copies when the models fit in memory (float32 rounding alone reaches 3e-2
relative on ViT-B, so a float32 tolerance loose enough for deep networks would also hide real
errors); the tolerance is then ``1e-6 * max(1, max |expected|)``. Models too large for float64
copies are checked in float32 at ``1e-3``, which the certificate records. When I1 fails, the
teachers' and the big student's graphs are run node by node and the error names the first node
whose value is not what the teachers' values say it must be, with its source line.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.compress import compress as compress_pass
from graphmerge.passes.errors import CertificateError
from graphmerge.passes.util import eval_mode, one_line
from graphmerge.passes.widen import tied_names, widen_info
from torch import nn
from torch.utils import _pytree as pytree

FLOAT64_TOLERANCE = 1e-6
FLOAT32_TOLERANCE = 1e-3
# Share of physical memory the float64 copies (N teachers and the big student) may take.
FLOAT64_MEMORY_SHARE = 0.25


@dataclass
class Certificate:
    """What a check found: the worst output error against its scale, and how it was measured."""

    invariant: str
    max_error: float
    scale: float
    tolerance: float
    dtype: str
    seconds: float
    skipped: str | None = None

    @property
    def relative_error(self) -> float:
        return self.max_error / self.scale

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative_error": self.relative_error}


def check_dtype(models: Sequence[nn.Module]) -> torch.dtype:
    """float64 when copies of all ``models`` in float64 fit in a quarter of physical memory."""
    elements = sum(t.numel() for m in models for t in m.state_dict().values() if t.is_floating_point())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return torch.float64 if elements * 8 <= FLOAT64_MEMORY_SHARE * memory else torch.float32


def tolerance_for(dtype: torch.dtype) -> float:
    return FLOAT64_TOLERANCE if dtype == torch.float64 else FLOAT32_TOLERANCE


def certify_mean(big: torch.fx.GraphModule, teachers: Sequence[nn.Module], example_inputs: tuple,
                 example_kwargs: dict[str, Any] | None = None, *, class_kwargs: dict[str, Any] | None = None,
                 locate: Callable[..., str] | None = None) -> Certificate:
    """I1 on the example inputs; raise ``CertificateError`` naming the first diverging node."""
    dtype = check_dtype([*teachers, big])
    info = getattr(big, "meta", {}).get("graphmerge")
    captured = info.groups.graph_module if info is not None else big  # the teacher-sized captured graph
    if dtype == torch.float64 and not _runs_in(captured, dtype, example_inputs, example_kwargs, None):
        dtype = torch.float32  # the model casts to float32 itself (pos.to(torch.float32)): check it as it runs
    return _certify_mean(big, teachers, example_inputs, example_kwargs, class_kwargs, locate, dtype)


def _runs_in(model: nn.Module, dtype: torch.dtype, inputs: tuple, kwargs: dict[str, Any] | None,
             class_kwargs: dict[str, Any] | None) -> bool:
    """Whether a copy of ``model`` in ``dtype`` runs on the example inputs (some models hard-code dtypes)."""
    copy_ = in_dtype(model, dtype)
    args, kw = cast_floats((tuple(inputs), dict(kwargs or {})), dtype)
    try:
        with torch.no_grad(), eval_mode(copy_), contextlib.redirect_stderr(io.StringIO()):
            copy_(*args, **kw, **(class_kwargs or {}))
    except RuntimeError:
        return False
    return True


def _certify_mean(big: torch.fx.GraphModule, teachers: Sequence[nn.Module], example_inputs: tuple,
                  example_kwargs: dict[str, Any] | None, class_kwargs: dict[str, Any] | None,
                  locate: Callable[..., str] | None, dtype: torch.dtype) -> Certificate:
    start = time.perf_counter()
    tolerance = tolerance_for(dtype)
    kwargs = dict(example_kwargs or {})
    big_copy = in_dtype(big, dtype)
    teacher_copies = [in_dtype(t, dtype) for t in teachers]
    inputs, kwargs = cast_floats((tuple(example_inputs), kwargs), dtype)
    with torch.no_grad(), contextlib.ExitStack() as modes:
        for module in (*teacher_copies, big_copy):
            modes.enter_context(eval_mode(module))
        teacher_leaves = [_leaves(t(*inputs, **kwargs, **(class_kwargs or {}))) for t in teacher_copies]
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints the failing line itself
                big_leaves = _leaves(big_copy(*inputs, **kwargs))
        except Exception as error:  # noqa: BLE001 - a big student that cannot run is a widen bug
            raise CertificateError(
                f"widen built a big student that fails to run on the example inputs: "
                f"{failing_node(big_copy, inputs, kwargs)}{one_line(error, first=True)}. This is a gap "
                "in graphmerge's op rules, not something in your model to fix: please report it with the model. "
                "Meanwhile mark the submodule around that line a leaf (leaf_modules=[...], --leaf NAME) so its "
                "channels are pinned.") from None
    expected = [_mean_leaf([leaves[i] for leaves in teacher_leaves]) for i in range(len(teacher_leaves[0]))]
    error, scale, where = compare_leaves(big_leaves, expected)
    certificate = Certificate("I1", error, scale, tolerance, str(dtype).replace("torch.", ""),
                              time.perf_counter() - start)
    if where is not None or error > tolerance * scale:
        detail = where or f"output differs by {error:.3g} (max |mean| {scale:.3g}, tolerance {tolerance:g} relative)"
        located = locate(big_copy, teacher_copies, inputs, kwargs, tolerance) if locate else ""
        raise CertificateError(
            f"widen built a big student that does not compute the mean of the teachers (invariant I1) on the "
            f"example inputs, in {certificate.dtype}: {detail}. {located}This is a gap in graphmerge's op rules, "
            "not something in your model to fix: please report it with the model. To proceed anyway, mark "
            "the submodule around that line a leaf (leaf_modules=[...], --leaf NAME) so its channels are "
            "pinned, or pass verify=False to skip this check (the big student will then not start as the "
            "teachers' mean).")
    return certificate


def certify_equal(actual: nn.Module, reference: nn.Module, example_inputs: tuple,
                  example_kwargs: dict[str, Any] | None = None, *, invariant: str, what: str,
                  actual_kwargs: dict[str, Any] | None = None) -> Certificate:
    """``actual(x) == reference(x)`` on the example inputs (both in eval mode, float64 copies)."""
    start = time.perf_counter()
    dtype = check_dtype([actual, reference])
    tolerance = tolerance_for(dtype)
    actual_copy = in_dtype(actual, dtype)
    reference_copy = in_dtype(reference, dtype)
    inputs, kwargs = cast_floats((tuple(example_inputs), dict(example_kwargs or {})), dtype)
    with torch.no_grad(), eval_mode(actual_copy), eval_mode(reference_copy):
        got = _leaves(actual_copy(*inputs, **kwargs, **(actual_kwargs or {})))
        want = _leaves(reference_copy(*inputs, **kwargs))
    error, scale, where = compare_leaves(got, want)
    certificate = Certificate(invariant, error, scale, tolerance, str(dtype).replace("torch.", ""),
                              time.perf_counter() - start)
    if where is not None or error > tolerance * scale:
        detail = where or (f"outputs differ by {error:.3g} (max |expected| {scale:.3g}, "
                           f"tolerance {tolerance:g} relative)")
        raise CertificateError(
            f"{what} (invariant {invariant}) on the example inputs, in {certificate.dtype}: {detail}. This is a "
            "gap in graphmerge's op rules: please report it with the model. Pass verify=False to skip this "
            "check.")
    return certificate


# -- locating the first diverging node ---------------------------------------------------------


def first_divergence(big: torch.fx.GraphModule, teachers: Sequence[torch.fx.GraphModule],
                     inputs: tuple, kwargs: dict[str, Any], tolerance: float,
                     expected_of: Callable[[str, torch.Tensor, list[torch.Tensor]], list[tuple[Any, torch.Tensor]]],
                     describe: Callable[[torch.fx.Node], str]) -> str:
    """Run the big student and the teachers' graphs side by side; name the first node that differs.

    ``expected_of(name, big_value, teacher_values)`` says how a node of the big student relates to
    the same node of the teachers: a list of (index into the big value, expected tensor) pairs,
    empty when the node cannot be compared (new nodes, joint channel blocks).
    """
    teacher_values = [_record(t, inputs, kwargs) for t in teachers]
    big_values = _record(big, inputs, kwargs)
    with torch.no_grad():
        return _first_differing(big, big_values, teacher_values, tolerance, expected_of, describe)


def _first_differing(big: torch.fx.GraphModule, big_values: dict[str, Any], teacher_values: list[dict[str, Any]],
                     tolerance: float, expected_of: Callable, describe: Callable[[torch.fx.Node], str]) -> str:
    for node in big.graph.nodes:
        value = big_values.get(node.name)
        if node.op not in ("call_function", "call_module", "call_method") or not _is_float_tensor(value):
            continue  # parameters are laid out by widen (the averaging head holds weight / N), not computed
        own = [values.get(node.name) for values in teacher_values]
        if not all(_is_float_tensor(v) for v in own):
            continue
        for index, expected in expected_of(node.name, value, own):
            try:
                got = value[index] if index is not None else value
            except IndexError:
                return (f"The first node whose value differs is {describe(node)}: its shape {tuple(value.shape)} "
                        "does not fit the teachers' channels laid side by side. ")
            if got.shape != expected.shape:
                return (f"The first node whose value differs is {describe(node)}: shape {tuple(got.shape)} where "
                        f"the teachers' values give {tuple(expected.shape)}. ")
            scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
            error = float((got - expected).abs().max()) if expected.numel() else 0.0
            if error > tolerance * scale:
                return (f"The first node whose value differs is {describe(node)}: off by {error:.3g} (scale "
                        f"{scale:.3g}). ")
    return "No single node of the big student differs from the teachers' values; the outputs are assembled wrongly. "


def failing_node(gm: torch.fx.GraphModule, inputs: tuple, kwargs: dict[str, Any]) -> str:
    """'at NODE (source line): ' for the node whose op raises when ``gm`` runs, or ''."""
    from graphmerge.passes.registry import describe

    failed: list[torch.fx.Node] = []

    class Finder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            try:
                return super().run_node(n)
            except Exception:
                failed.append(n)
                raise

    flat = [*inputs, *kwargs.values()]
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            Finder(_eval(gm)).run(*flat)
        except Exception:  # noqa: BLE001 - only the failing node is wanted
            pass
    return f"at {describe(failed[0])}: " if failed else ""


def _record(gm: torch.fx.GraphModule, inputs: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            values[n.name] = result
            return result

    flat = [*inputs, *kwargs.values()]
    with torch.no_grad():
        _eval(gm)
        try:
            Recorder(gm).run(*flat)
        except Exception:  # noqa: BLE001 - recording is best effort; the certificate already failed
            pass
    return values


# -- helpers -----------------------------------------------------------------------------------


def in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` itself when its floating tensors already have ``dtype``, else a copy in ``dtype``.

    The check runs the module in eval mode; callers' own modules are put back in their mode by
    ``_restoring_modes``, never changed otherwise.
    """
    floats = [t for t in module.state_dict().values() if t.is_floating_point()]
    if all(t.dtype == dtype for t in floats):
        return module
    duplicate = detached_copy(module).to(dtype)
    for graph_module in (duplicate, getattr(duplicate, "graph_module", None)):
        if isinstance(graph_module, torch.fx.GraphModule) and floats:
            retarget_dtype_literals(graph_module, floats[0].dtype, dtype)
    return duplicate


def retarget_dtype_literals(gm: torch.fx.GraphModule, old: torch.dtype, new: torch.dtype) -> None:
    """Replace the dtype ``old`` with ``new`` in the literal arguments of ``gm``'s nodes.

    torch.export records a dtype the model computed at trace time as a constant: EdgeNeXt's
    ``pos.to(self.token_projection.weight.dtype)`` becomes ``aten.to(pos, torch.float32)``, so a
    float64 copy of the captured graph would mix dtypes and fail. The model meant "the weights'
    dtype", so a copy in another dtype follows it.
    """
    changed = False

    def swap(value: Any) -> Any:
        nonlocal changed
        if value is old:
            changed = True
            return new
        return value

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map(swap, node.args)
            node.kwargs = pytree.tree_map(swap, node.kwargs)
    if changed:
        gm.recompile()


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy without the ``meta`` a GraphModule carries (graphmerge's analysis, big and shared)."""
    meta = getattr(module, "meta", None)
    inner = getattr(module, "graph_module", None)
    saved = [(m, dict(m.meta)) for m in (module, inner) if isinstance(getattr(m, "meta", None), dict)]
    for m, _ in saved:
        m.meta.clear()
    try:
        duplicate = copy.deepcopy(module)
    finally:
        for m, values in saved:
            m.meta.update(values)
    del meta
    return duplicate


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                           value)


def _eval(module: nn.Module) -> nn.Module:
    return module.eval()


def _leaves(output: Any) -> list[Any]:
    return pytree.tree_leaves(output)


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _mean_leaf(values: list[Any]) -> Any:
    if all(_is_float_tensor(v) for v in values) and len({tuple(v.shape) for v in values}) == 1:
        return torch.stack(values).mean(0)
    return values[0]


def compare_leaves(got: list[Any], expected: list[Any]) -> tuple[float, float, str | None]:
    """Worst absolute error, the scale it is measured against, and a structural mismatch if any."""
    if len(got) != len(expected):
        return float("inf"), 1.0, f"{len(got)} output tensors where the teachers give {len(expected)}"
    worst, scale = 0.0, 1.0
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                return float("inf"), 1.0, f"output {i} has shape {shape} where the teachers' mean has {tuple(b.shape)}"
            if not b.is_floating_point():
                if not torch.equal(a, b):
                    return float("inf"), 1.0, f"integer output {i} differs"
                continue
            if b.numel():
                leaf_scale = max(1.0, float(b.abs().max()))
                error = float((a - b).abs().max())
                if error / leaf_scale > worst / scale:
                    worst, scale = error, leaf_scale
        elif a != b and not (isinstance(a, float) and np.isnan(a) and np.isnan(b)):
            return float("inf"), 1.0, f"output {i} is {a!r} where the teachers give {b!r}"
    return worst, scale, None


# -- I2: selecting teacher t gives back teacher t ---------------------------------------------


def certify_recovery(big: torch.fx.GraphModule, teachers: Sequence[nn.Module]) -> tuple[Certificate, list[str]]:
    """I2: ``compress(big, "teacher:t")`` holds teacher t's tensors bitwise, for every t.

    A comparison of tensors through the layout maps, no forward. I3 cannot see a wrong teacher
    map (the student and the gated big student share it) and I1 cannot either where the wrong map
    is a consistent relabelling, so this is the only check of the maps themselves. The layers that
    write a graph output shared by all teachers (the averaging head) hold teacher t's weight / N
    and the teachers' mean bias by construction; those values are expected there. Returns the
    certificate (``max_error``: the largest difference from what I2 expects) and, per teacher,
    the tensors that differ (names with their teacher), empty when I2 holds.
    """
    start = time.perf_counter()
    graph_module, info = widen_info(big)
    n = len(teachers)
    states = [t.state_dict() for t in teachers]
    heads = _averaging_head_tensors(info)
    error, differing = 0.0, []
    for t in range(n):
        student = compress_pass(big, f"teacher:{t}").state_dict()
        for name, value in student.items():
            own = states[t].get(name)
            if own is None or not isinstance(value, torch.Tensor) or torch.equal(value, own):
                continue
            if name in heads and _is_head_value(value, own, [s[name] for s in states]):
                continue
            gap = float((value.double() - own.double()).abs().max()) if value.shape == own.shape else float("inf")
            error = max(error, gap)
            differing.append(f"{name} (teacher {t})")
    dtype = next((v.dtype for v in states[0].values() if v.is_floating_point()), torch.float32)
    certificate = Certificate("I2", error, 1.0, 0.0, str(dtype).replace("torch.", ""), time.perf_counter() - start)
    return certificate, differing


def _averaging_head_tensors(info: Any) -> set[str]:
    """Tensors whose output dim lies in a pinned group at the graph's output (the averaging head)."""
    layout, groups = info.groups.layout, info.groups
    internal = {g.id for g in groups.internal_pinned}
    boundary = ({g.id for g in groups.pinned} - internal) | {g.id for g in groups if g.averaged}
    heads = set()
    for name, dims in layout.params.items():
        out = layout.out_dims.get(name)
        dim = dims[out] if out is not None and out < len(dims) else None
        if dim is None:
            continue
        ids = set(dim.group[dim.group >= 0].tolist())
        if ids and ids <= boundary:
            heads.add(name)
    tied = tied_names(info.groups)
    return heads | {alias for alias, canonical in tied.items() if canonical in heads}


def _is_head_value(value: torch.Tensor, own: torch.Tensor, all_teachers: list[torch.Tensor]) -> bool:
    """Teacher t's tensor / N (a head's weight) or the teachers' mean (its bias), to rounding."""
    n = len(all_teachers)
    mean = torch.stack([x.double() for x in all_teachers]).mean(0)
    for expected in (own.double() / n, mean):
        if value.shape == expected.shape and bool(torch.allclose(value.double(), expected, rtol=1e-6, atol=1e-7)):
            return True
    return False
