"""The driver behind the public API: checks inputs, then runs the passes in order."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from graphmerge.errors import CertificateError, GraphMergeError, ModelMismatchError, TraceError
from graphmerge.passes.batch import NO_BATCH
from graphmerge.passes.capture import _cache_kwargs, capture
from graphmerge.passes.certify import Certificate, as_captured, certify_equal, certify_mean, certify_recovery
from graphmerge.passes.compress import compress as compress_pass
from graphmerge.passes.compress import mixes_per_teacher_layers
from graphmerge.passes.couple import couple
from graphmerge.passes.gate import GATES, GatedStudent, add_gates
from graphmerge.passes.ir import GroupSet, WidenInfo, attach_widen_info, widen_info
from graphmerge.passes.layout import LayoutError
from graphmerge.passes.selection import compressed_selection
from graphmerge.passes.stream import Streamed
from graphmerge.passes.util import check_teacher_count, getattr_path
from graphmerge.passes.widen import copy_structure, locate_divergence
from graphmerge.passes.widen import widen as widen_pass


def _as_tuple(example_inputs: Any) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def analyze(model: nn.Module, example_inputs: Any, *, example_kwargs: dict[str, Any] | None = None,
            leaf_modules: Sequence[Any] = ()) -> GroupSet:
    """Capture ``model`` on its example inputs with torch.export and find its channel-coupling groups.

    ``leaf_modules`` (submodule names, module classes or class names) are kept opaque: every channel
    they touch is pinned. (With torch.fx's symbolic_trace, retired, a leaf also got a model past
    code the tracer could not follow; torch.export follows such code itself.)
    """

    start = time.perf_counter()
    gm = capture(model, _as_tuple(example_inputs), example_kwargs)
    captured = time.perf_counter()
    groups = couple(gm, leaf_modules=leaf_names(model, leaf_modules))
    groups.timings["trace_s"] = captured - start
    return groups


def leaf_names(model: nn.Module, leaf_modules: Sequence[Any]) -> tuple[str, ...]:
    """Qualified names of the leaf submodules; a class (or class name) stands for all its instances."""
    submodules = dict(model.named_modules())
    class_by_name = {type(m).__name__: type(m) for m in submodules.values()}
    types: list[type] = []
    found: set[str] = set()
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str) and spec and spec in submodules:
            found.add(spec)
        elif isinstance(spec, str) and spec in class_by_name:
            types.append(class_by_name[spec])
        else:
            candidates = [n for n in submodules if n] + sorted(class_by_name)
            close = difflib.get_close_matches(str(spec), candidates, n=5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise TraceError(
                f"leaf module {spec!r} is neither a submodule name nor a module class of model "
                f"{type(model).__name__!r}.{hint} Give a qualified submodule name as printed by "
                "`model.named_modules()` (e.g. 'layer1.0'), the name of a module class used in the model, "
                "or (in Python) the class itself.")
    if types:
        found.update(name for name, module in submodules.items() if name and isinstance(module, tuple(types)))
    return tuple(sorted(found))


def check_same_architecture(teachers: Sequence[nn.Module]) -> None:
    """All teachers must be one class with identical parameter and buffer names and shapes."""
    check_teacher_count(len(teachers), "pass two or more trained instances of the same architecture.")
    first = teachers[0]
    reference = first.state_dict()
    for index, other in enumerate(teachers[1:], start=1):
        if type(other) is not type(first):
            raise ModelMismatchError(
                f"teacher {index} is a {type(other).__name__} but teacher 0 is a {type(first).__name__}: "
                "all teachers must be instances of one class.")
        state = other.state_dict()
        for key, tensor in reference.items():
            if key not in state:
                raise ModelMismatchError(f"teacher {index} has no '{key}' (teacher 0 has it, shape "
                                         f"{tuple(tensor.shape)}): the teachers differ in architecture.")
            if state[key].shape != tensor.shape:
                raise ModelMismatchError(
                    f"parameter '{key}' has shape {tuple(tensor.shape)} in teacher 0 but "
                    f"{tuple(state[key].shape)} in teacher {index}: the teachers differ in architecture "
                    "(width, classes or kernel size).")
        extra = [k for k in state if k not in reference]
        if extra:
            raise ModelMismatchError(f"teacher {index} has '{extra[0]}', which teacher 0 lacks: the "
                                     "teachers differ in architecture.")


def widen(teachers: Sequence[nn.Module], example_inputs: Any, *, example_kwargs: dict[str, Any] | None = None,
          leaf_modules: Sequence[Any] = (), verify: bool = True, groups: GroupSet | None = None
          ) -> torch.fx.GraphModule:
    """Concatenate N teachers into one big student (an fx GraphModule) computing their mean.

    With ``verify`` (the default) the big student is run on ``example_inputs`` against the mean of
    the teachers (invariant I1, in float64 where it fits in memory); a mismatch raises
    ``CertificateError`` naming the first graph node that diverges. The certificate is stored in
    ``widen_info(big)[1].certificates["I1"]``, its time in ``groups.timings["certify_s"]``.
    Where the analysis pinned groups inside the network, I1 cannot hold and widen has already
    warned; the certificate then records the error without raising.
    """

    teachers = list(teachers)
    check_same_architecture(teachers)
    if groups is None:  # ``groups``: the analysis of teachers[0] on the same inputs, done already
        groups = analyze(teachers[0], example_inputs, example_kwargs=example_kwargs, leaf_modules=leaf_modules)
    start = time.perf_counter()
    with torch.no_grad():
        try:
            big = widen_pass(groups, teachers)
        except LayoutError as error:
            raise GraphMergeError(
                f"cannot lay out the big student of {type(teachers[0]).__name__}: {error}. The channels reach "
                "this op in an order the teacher-major layout cannot express (for example a residual add "
                "across a channel shuffle). Mark the submodule containing it a leaf (leaf_modules=[...]) so "
                "its channels are pinned, or file an issue with the model.") from None
    groups.timings["widen_s"] = time.perf_counter() - start
    _, info = widen_info(big)
    info.example_inputs = _as_tuple(example_inputs)
    info.example_kwargs = dict(example_kwargs or {})

    info.class_kwargs = _cache_kwargs(teachers[0], info.example_inputs, info.example_kwargs)
    if verify:
        pinned = groups.internal_pinned
        try:
            certificate = certify_mean(big, teachers, info.example_inputs, info.example_kwargs,
                                       class_kwargs=info.class_kwargs, locate=locate_divergence(groups, len(teachers)))
        except CertificateError:
            if not pinned:
                raise
            certificate = None
        if pinned:
            certificate = certificate or Certificate("I1", float("nan"), 1.0, float("nan"), "n/a", 0.0)
            certificate.skipped = (f"{len(pinned)} group(s) pinned inside the network (first: {pinned[0].reason}); "
                                   "I1 cannot hold")
        info.certificates["I1"] = certificate
        info.certificates["I2"] = _certify_recovery(big, teachers, pinned)
        groups.timings["certify_i1_s"] = certificate.seconds
        groups.timings["certify_i2_s"] = info.certificates["I2"].seconds
        groups.timings["certify_s"] = certificate.seconds + info.certificates["I2"].seconds
        groups.timings["certify_peak_mb"] = certificate.peak_bytes / 2**20
    big.train(teachers[0].training)
    return big


def _certify_recovery(big: torch.fx.GraphModule, teachers: list[nn.Module], pinned: list) -> Certificate:
    """I2 (see ``certify_recovery``): a ``CertificateError`` where it fails on a model without inside
    pins; where pins make it impossible, a warning that says what the student of ``teacher:t`` is."""

    certificate, differing = certify_recovery(big, teachers)
    if not differing:
        return certificate
    listed = ", ".join(differing[:4]) + (f" and {len(differing) - 4} more" if len(differing) > 4 else "")
    if not pinned:
        raise CertificateError(
            f"widen built a big student from which selecting a teacher's channels does not give that teacher back "
            f"(invariant I2): compress(big, 'teacher:t') differs from teacher t in {listed} (by up to "
            f"{certificate.max_error:.3g}). The teacher maps of the layout are wrong for those tensors even where the "
            "big student's outputs are right (I1). This is a gap in graphmerge's op rules: please report it with the "
            "model; pass verify=False to skip this check.")
    certificate.skipped = (f"{len(pinned)} group(s) pinned inside the network; the student of teacher:t is not "
                           f"teacher t in {listed}")
    warnings.warn(
        f"I2 does not hold: compress(big, 'teacher:t') differs from teacher t in {listed}: {len(pinned)} group(s) are "
        f"pinned inside the network (first: {pinned[0].reason}), so widen averaged the teachers' tensors there and "
        "a student selected from one teacher holds those averages, not that teacher's values.", stacklevel=3)
    return certificate


def compress(big: nn.Module, keep: Any = "gates", *, scales: dict[int, Any] | None = None,
             ratio: float | None = None, verify: bool = True) -> nn.Module:
    """Slice a (gated) big student back to the teachers' width; with ``verify``, certify I3.

    The certificate runs the student against the gated big student with every dropped channel's
    gate closed and every kept one at the value compress folded in (1 without scales), on the
    example inputs widen recorded. It is skipped, with the reason recorded in
    ``student_certificate(student)``, where I3 does not hold by construction: a normalisation
    spans a widened group and the kept channels mix teachers, or custom ``scales`` were given.
    """

    start = time.perf_counter()
    student = compress_pass(big, keep, scales=scales, ratio=ratio)
    graph_module, info = widen_info(big)
    info.groups.timings["compress_s"] = time.perf_counter() - start
    if not verify:
        return student
    if not info.example_inputs and not info.example_kwargs:
        return student
    reference, skipped = _closed_gates_reference(big, info, keep, scales, ratio)
    if skipped:
        certificate = Certificate("I3", float("nan"), 1.0, float("nan"), "n/a", 0.0, skipped=skipped)
    else:
        # a student of the teachers' class runs as the captured graph holding its tensors
        actual = Streamed(student) if isinstance(student, torch.fx.GraphModule) else as_captured(info.groups, student)
        certificate = certify_equal(actual, reference, info.example_inputs, info.example_kwargs, invariant="I3",
                                    what="compress returned a student that does not compute what the gated big "
                                         "student computes with the dropped channels closed")
    info.groups.timings["certify_i3_s"] = certificate.seconds
    info.groups.timings["certify_i3_peak_mb"] = certificate.peak_bytes / 2**20
    _STUDENT_CERTIFICATES[student] = certificate
    return student


# compress's I3 certificate of each student it returned, for as long as the student lives
_STUDENT_CERTIFICATES: weakref.WeakKeyDictionary[nn.Module, Certificate] = weakref.WeakKeyDictionary()


def student_certificate(student: nn.Module) -> Certificate | None:
    """The I3 certificate compress recorded for ``student`` (None when verify=False)."""
    return _STUDENT_CERTIFICATES.get(student)


def kept_channels(big: nn.Module, keep: Any = "gates") -> dict[int, np.ndarray]:
    """Per widened group, the big student's channels ``compress(big, keep)`` keeps (teacher-major:
    channel ``c`` of teacher ``t`` is ``t * width + c``), sorted; ``keep`` as compress takes it."""
    if isinstance(keep, str) and keep == "gates" and not isinstance(big, GatedStudent):
        raise GraphMergeError("kept_channels(big, 'gates') needs a gated big student: call "
                              "graphmerge.add_gates(big) and train its gates first, or pass keep='teacher:0' "
                              "or per-group scores.")
    return {gid: np.sort(np.asarray(k)) for gid, k in compressed_selection(big, keep).items()}


def closed_gates_reference(gated: nn.Module, keep: Any = "gates") -> nn.Module:
    """What ``compress(gated, keep)`` must compute (invariant I3): a copy of the gated big student
    whose gates are closed on every channel compress drops and, on those it keeps, at the value
    compress folds into the student (the gates' own eval value, or exactly 1 for other ``keep``).

    Raises GraphMergeError where I3 cannot hold by construction (the reason compress's certificate
    records as skipped: a normalisation over a mix of teachers, tied output heads, ...)."""
    if not isinstance(gated, GatedStudent):
        raise GraphMergeError("closed_gates_reference takes a gated big student (graphmerge.add_gates(big)).")
    _, info = widen_info(gated)
    reference, skipped = _closed_gates_reference(gated, info, keep, None, None)
    if skipped:
        raise GraphMergeError(f"compress cannot compute exactly what the gated big student computes here: {skipped}.")
    closed = copy.deepcopy(gated)
    closed.gates.load_state_dict(reference.module(GATES).state_dict())
    return closed


def _closed_gates_reference(big: nn.Module, info: WidenInfo, keep: Any, scales: Any,
                            ratio: float | None) -> tuple[Any, str | None]:
    """The gated big student with eval gates 0 where compress drops a channel and, where it keeps
    one, the scale compress folded in (the gates' own eval value, or exactly 1), as a
    ``stream.Streamed`` graph that reads the big student's own tensors (no copy of them)."""

    gated = isinstance(big, GatedStudent)
    from_gates = isinstance(keep, str) and keep == "gates"
    if scales is not None and not from_gates:
        return None, "custom scales"
    if info.tied_heads:
        return None, (f"the output layer {info.tied_heads[0]} shares its weight with another layer (tied "
                      "embeddings): the big student averages with an explicit 1/N there, which the teachers' "
                      "class has no place for, so the student's outputs are N times the gated big student's")
    averaged = [g for g in info.groups if g.averaged]
    if averaged:
        return None, (f"group {averaged[0].id} is a graph output after a non-linear op ({averaged[0].reason}); "
                      "the student's last layer averages the teachers before that op, the big student after it")
    kept = compressed_selection(big, keep, ratio=ratio)
    mixed = [gid for gid, k in kept.items()
             if len(set((np.asarray(k) // info.widths[gid]).tolist())) > 1]
    normalised = [gid for gid in mixed if gid in info.groups.layout.across_norm]
    for span in info.groups.layout.norm_spans:  # one norm over several groups, each kept from another teacher
        teachers = {int(k[0]) // info.widths[gid] for gid in span if len(k := np.asarray(kept.get(gid, [])))}
        if len(teachers) > 1:
            normalised.append(span[0])
    if normalised:
        return None, (f"group {normalised[0]} is normalised across its channels "
                      f"({info.groups.layout.across_norm[normalised[0]]}) and the kept channels mix teachers")
    stacked = mixes_per_teacher_layers(info, kept)
    if stacked:
        return None, (f"{stacked[0]} is applied per teacher in the big student (a token-mixing layer's weight, or "
                      "a parameter without channels such as a learned scalar); the kept channels mix teachers "
                      "and the student has one such tensor for all of them")
    reference = big if gated else _gated_skeleton(big, info)
    gates = copy.deepcopy(reference.gates)
    with torch.no_grad():
        for gid, k in kept.items():
            param = gates.log_alpha[f"g{gid}"]
            open_ = torch.zeros(param.numel(), dtype=torch.bool)
            open_[torch.as_tensor(np.asarray(k), dtype=torch.long)] = True
            keep_value = param if (gated and from_gates) else torch.full_like(param, 30.0)
            param.copy_(torch.where(open_, keep_value, torch.full_like(param, -30.0)))
    graph_module = reference.graph_module
    dtype = next((t.dtype for t in big.state_dict().values() if t.is_floating_point()), None)
    if gated:
        return Streamed(graph_module, modules={GATES: gates}, source_dtype=dtype), None
    state = big.state_dict(keep_vars=True)  # the skeleton's parameters are placeholders: read the big student's

    def fetch(name: str) -> Any:
        return state[name] if name in state else getattr_path(graph_module, name)

    return Streamed(graph_module, fetch, modules={GATES: gates}, source_dtype=dtype), None


def _gated_skeleton(big: torch.fx.GraphModule, info: WidenInfo) -> GatedStudent:
    """``add_gates(big)`` on a copy of its structure whose parameters are meta placeholders, so no
    tensor is copied. Its gates are only read in eval mode, one value for every sample, so the
    batch places a train-mode gate step needs are not located (no probe run)."""

    skeleton = copy_structure(big)
    places = {node.name: NO_BATCH for node in big.graph.nodes} | dict(info.batch_places)
    attach_widen_info(skeleton, dataclasses.replace(info, batch_places=places))
    return add_gates(skeleton)
