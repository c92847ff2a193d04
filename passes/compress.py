"""Compress: keep ``width`` channels of every widened group and slice the big student back.

Every parameter and buffer is gathered along every dimension a group touches, through the same
layout that widen scattered with (``graphmerge.passes.layout``), so keeping exactly teacher K's channels
gives back teacher K's tensors bitwise (invariant I2). BatchNorm statistics, biases and scales
are kept. An optional per-channel scale per group (the eval value of a gate) is folded into the
input weights of the group's consumers, so the student computes what the gated big student
computes when the dropped gates are closed (invariant I3).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.gate import GatedStudent
from graphmerge.passes.ir import DimLayout, WidenInfo, widen_info
from graphmerge.passes.layout import LayoutError, pieces, student_map, teacher_maps
from graphmerge.passes.selection import Keep, ratio_counts, select_channels
from graphmerge.passes.util import getattr_path
from graphmerge.passes.widen import copy_structure, rewrite_aten_sizes, set_tensor, tied_names
from torch import nn


def compress(big: nn.Module, keep: Keep = "gates", *, scales: dict[int, Any] | None = None,
             ratio: float | None = None) -> nn.Module:
    """Slice a (gated) big student to one network of the teachers' architecture.

    With ``keep="gates"`` (a gated big student) the gate scores choose the channels and the
    eval gate values are folded into the consumers. Returns an instance of the teachers' class.

    With ``ratio`` (a fraction of the big student's width, e.g. 0.75 keeps three quarters of each
    group's N × width channels) the result is a GraphModule of that width instead.
    """
    graph_module, info = widen_info(big)
    from_gates = isinstance(keep, str) and keep == "gates"
    if from_gates:
        if not isinstance(big, GatedStudent):
            raise GraphMergeError("keep='gates' needs a gated big student (graphmerge.add_gates(big)); for a "
                                  "plain big student pass keep='teacher:K' or per-group scores.")
        keep = big.gate_scores()
        if scales is None:
            scales = big.eval_gate_values()
    if ratio is not None:
        return _compress_to_ratio(graph_module, info, keep, scales, ratio, replace_dead=False if from_gates else None)
    state = student_state(graph_module, info, keep, scales, replace_dead=False if from_gates else None)
    student = copy_structure(info.teacher)
    state = _keep_plain_attributes(state, student)
    state = _with_metadata(state, student)
    try:
        student.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise GraphMergeError(f"the compressed weights do not load into {type(student).__name__}: {error}") from None
    _retie(student, info.teacher)
    student.train(graph_module.training)
    return student


def student_state(graph_module: torch.fx.GraphModule, info: WidenInfo, keep: Keep, scales: dict[int, Any] | None,
                  *, copy: bool = True, replace_dead: bool | None = None) -> dict[str, torch.Tensor]:
    """The student's state_dict that ``compress`` loads into the teachers' class. ``copy=False``:
    tensors kept whole or one teacher's block of them are views of the big student's (to compare
    them, as the I2 certificate does, without a copy). ``replace_dead``: see ``select_channels``."""
    kept = select_channels(info, keep, replace_dead=replace_dead)
    with torch.no_grad():
        state = _gather_state(graph_module.state_dict(), info, kept, scales, copy=copy)
    # Tensors the traced graph never reads (an aux classifier skipped in eval mode) come from the
    # kept teacher, or from teacher 0 when the channels are a mixture.
    teacher_index = int(keep.split(":")[1]) if isinstance(keep, str) else 0
    state.update(info.untraced[teacher_index] if info.untraced else {})
    if isinstance(keep, str):
        state.update(_teacher_counters(state, info, teacher_index))
    return state


def _retie(student: nn.Module, teacher: nn.Module) -> None:
    """Parameters the teachers' class shares between modules (tied embeddings) are one object
    again: ``load_state_dict(assign=True)`` assigned each name on its own."""
    first: dict[int, str] = {}
    for name, param in teacher.named_parameters(remove_duplicate=False):
        if id(param) in first:
            set_tensor(student, name, getattr_path(student, first[id(param)]))
        else:
            first[id(param)] = name


def _compress_to_ratio(graph_module: torch.fx.GraphModule, info: WidenInfo, keep: Keep,
                       scales: dict[int, Any] | None, ratio: float, *,
                       replace_dead: bool | None = None) -> torch.fx.GraphModule:
    if not 0 < ratio <= 1:
        raise GraphMergeError(f"ratio must be in (0, 1] (a fraction of the big student's width); got {ratio}.")
    if isinstance(keep, str):
        raise GraphMergeError("a width ratio needs channel scores (a gated big student or per-group scores); "
                              f"keep='{keep}' keeps exactly one teacher's width.")
    n = info.n_teachers
    counts = ratio_counts(info, ratio)
    kept = select_channels(info, keep, counts=counts, replace_dead=replace_dead)
    widths, widened = info.widths, info.widened
    student = copy_structure(info.groups.graph_module)
    if any(counts[g] != info.widths[g] for g in counts) and _has_permuted_dims(info):
        raise GraphMergeError("this model permutes channels (a channel shuffle), which a width ratio other "
                              "than the teachers' width cannot keep; compress without ratio.")
    with torch.no_grad():
        state = _gather_state(graph_module.state_dict(), info, kept, scales)
    for name, tensor in state.items():
        set_tensor(student, name, tensor)
    rewrite_aten_sizes(student, info.groups, lambda dim: len(student_map(dim, n, widths, widened, kept)), widened)
    student.recompile()
    student.train(graph_module.training)
    return student


def _teacher_counters(state: dict[str, torch.Tensor], info: WidenInfo, teacher: int) -> dict[str, torch.Tensor]:
    """Teacher ``teacher``'s own integer counters plus what the big student counted since widen.

    The big student holds one ``num_batches_tracked`` per BatchNorm for all N teachers (their
    mean); keeping exactly one teacher's channels should give back that teacher's count.
    """
    if not info.counters:
        return {}
    own = info.untraced[teacher] if info.untraced else {}
    return {name: value + (state[name] - info.counters_start[name]) for name, value in info.counters[teacher].items()
            if name not in own}


def _keep_plain_attributes(state: dict[str, torch.Tensor], student: nn.Module) -> dict[str, torch.Tensor]:
    """Only the student's own state_dict entries; tensors the tracer saw as plain attributes (not
    parameters or buffers) are set on the student directly, and tracer constants
    (``_tensor_constantN``, rebuilt by the class's forward) are dropped."""
    own = set(student.state_dict())
    for name in [k for k in state if k not in own]:
        tensor = state.pop(name)
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = student.get_submodule(owner_name) if owner_name else student
        except AttributeError:
            continue
        if isinstance(getattr(owner, attr, None), torch.Tensor):
            set_tensor(student, name, tensor)
    return state


def _with_metadata(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Carry the module versions ``state_dict()._metadata`` records; some loaders require them."""
    ordered = OrderedDict(state)
    ordered._metadata = getattr(module.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return ordered


def _has_permuted_dims(info: WidenInfo) -> bool:
    return any(dim is not None and pieces(dim, info.widths, info.widened) is None
               for dims in info.groups.layout.params.values() for dim in dims)


def _gather_state(big_state: dict[str, torch.Tensor], info: WidenInfo, kept: dict[int, np.ndarray],
                  scales: dict[int, Any] | None, *, copy: bool = True) -> dict[str, torch.Tensor]:
    layout = info.groups.layout
    widths, widened, n = info.widths, info.widened, info.n_teachers
    averaged = [g.id for g in info.groups if g.averaged]
    out: dict[str, torch.Tensor] = {}
    done: dict[str, torch.Tensor] = {}
    for name, canonical in tied_names(info.groups).items():
        if canonical in done:  # tied to a tensor already gathered: the student keeps the tie
            out[name] = done[canonical]
            continue
        if canonical not in big_state:
            continue  # a non-persistent constant (a blur filter): the student's class makes its own
        tensor = big_state[canonical]
        dims = layout.params.get(canonical)
        if dims is None or tensor.ndim == 0:
            out[name] = done[canonical] = tensor.clone() if copy else tensor
            continue
        if canonical in info.stacked_params:
            tensor = _one_of_stacked(tensor, info, info.stacked_params[canonical], kept)
        for d, dim in enumerate(dims):
            if dim is None:
                continue
            if averaged and np.isin(dim.group, averaged).any():
                tensor = _mean_of_teacher_blocks(tensor, d, dim, info, averaged)
                continue
            index = student_map(dim, n, widths, widened, kept)
            if len(index) and index[-1] - index[0] == len(index) - 1 and bool(np.all(np.diff(index) == 1)):
                if len(index) != tensor.shape[d]:  # one teacher's block: a view, copied once below
                    tensor = tensor.narrow(d, int(index[0]), len(index))
            else:
                tensor = tensor.index_select(d, torch.as_tensor(index))
            if scales is not None and d in layout.in_dims.get(canonical, ()):
                tensor = tensor * _scale_vector(dim, info, kept, scales, tensor.ndim, d).to(tensor.dtype)
        # a copy where nothing was sliced (or only narrowed): training the student must never change the big student
        shares = tensor.untyped_storage().data_ptr() == big_state[canonical].untyped_storage().data_ptr()
        if not copy:
            out[name] = done[canonical] = tensor
        else:
            out[name] = done[canonical] = tensor.clone(memory_format=torch.contiguous_format) if shares \
                else tensor.contiguous()
    return out


def _mean_of_teacher_blocks(tensor: torch.Tensor, d: int, dim: DimLayout, info: WidenInfo,
                            averaged: list[int]) -> torch.Tensor:
    """An averaged output's dim (``Group.averaged``): the mean of the teachers' blocks, which is
    what the big student computes at its output. The last layer's weight reads each teacher's own
    inputs, so its rows averaged then restricted to one teacher's inputs are that teacher's / N."""
    gated = [g.id for g in info.groups.gated]
    if np.isin(dim.group, gated).any():
        raise LayoutError(f"a dimension holds an averaged graph output beside gated channels (groups "
                          f"{sorted(set(dim.group[np.isin(dim.group, averaged)].tolist()))}); it cannot be averaged")
    _, maps = teacher_maps(dim, info.n_teachers, info.widths, info.widened)
    blocks = [tensor.index_select(d, torch.as_tensor(m)) for m in maps]
    return (torch.stack(blocks).double().mean(0)).to(tensor.dtype)


def _one_of_stacked(stacked: torch.Tensor, info: WidenInfo, group_ids: list[int],
                    kept: dict[int, np.ndarray]) -> torch.Tensor:
    """A token-mixing layer's weight from its N per-teacher copies: teacher t's copy weighted by
    the share of the kept channels (of the groups it is applied to) that come from teacher t.
    Keeping one teacher's channels gives that teacher's weight exactly (I2); a mixture of teachers
    cannot be exact, since the student has one weight for all its channels."""
    counts = np.zeros(info.n_teachers)
    for gid in group_ids:
        counts += np.bincount(np.asarray(kept[gid]) // info.widths[gid], minlength=info.n_teachers)
    if counts.max() == counts.sum():
        return stacked[int(counts.argmax())].clone()
    share = torch.as_tensor(counts / counts.sum(), dtype=torch.float64)
    return torch.einsum("t,t...->...", share, stacked.double()).to(stacked.dtype)


def mixes_per_teacher_layers(info: WidenInfo, kept: dict[int, np.ndarray]) -> list[str]:
    """The stacked per-teacher parameters whose groups keep channels of more than one teacher."""
    mixed = []
    for name, group_ids in info.stacked_params.items():
        owners = {int(c) // info.widths[g] for g in group_ids for c in np.asarray(kept[g])}
        if len(owners) > 1:
            mixed.append(name)
    return mixed


def _scale_vector(dim: DimLayout, info: WidenInfo, kept: dict[int, np.ndarray], scales: dict[int, Any],
                  ndim: int, axis: int) -> torch.Tensor:
    """Per student position along a consumer's input dim: the scale of the channel kept there."""
    slots = student_slots(dim, info, kept)
    values = np.ones(len(slots[0]))
    for p, (g, k) in enumerate(zip(*slots, strict=True)):
        if g >= 0 and g in scales:
            values[p] = float(torch.as_tensor(scales[g]).reshape(-1)[k])
    shape = [1] * ndim
    shape[axis] = -1
    return torch.as_tensor(values).view(shape)


def student_slots(dim: DimLayout, info: WidenInfo, kept: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For each student position: its group (-1 if shared) and the big channel kept there."""
    parts = pieces(dim, info.widths, info.widened)
    if parts is None:
        group = dim.group.copy()
        channel = np.array([kept[g][c] for g, c in zip(dim.group, dim.channel, strict=True)])
        return group, channel
    groups, channels = [], []
    for piece in parts:
        if piece.shared:
            groups.append(np.full(piece.length, -1))
            channels.append(np.full(piece.length, -1))
        else:
            k = np.asarray(kept[piece.group])
            groups.append(np.full(len(k) * piece.run, piece.group))
            channels.append(np.repeat(k, piece.run))
    return np.concatenate(groups), np.concatenate(channels)
