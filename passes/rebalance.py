"""The layers where the teachers meet average the teachers a selection kept, not all N.

The big student averages N teachers where they meet: a layer that writes an output all teachers
share (a classifier, an untied LM head) holds each teacher's weight / N on that teacher's inputs
and the teachers' mean bias. ``compress`` keeps that layer as it is, which is what the big student
computes once the dropped channels are closed (I3). Where the selection keeps channels of only
some teachers S at such a layer's input, the student then computes ``|S|/N`` of their mean plus
the other teachers' biases: with one teacher's channels, that teacher's logits at 1/N of their
scale (a language model at temperature N). Fine-tuning has to learn the scale back first.

``average_kept_teachers`` rewrites each such layer of a compressed student into the mean over S:
its widened inputs' weights times ``N / |S|`` and its bias the mean of S's own biases, taken from
the teachers. A selection of one teacher's channels throughout then gives that teacher exactly
(up to the rounding of ``N · (w / N)``). An averaged output (``Group.averaged``: a non-linear op
after the last layer, averaged over the teachers' blocks by compress) is left as compress made it.
The student no longer computes what the gated big student computes (I3 is certified on compress's
result, before this step), so it is a separate step the merge recipe takes where no gate phase
trained the big student (``MergeSettings.average_kept``): a gate phase trains the weights at the
1/N scale as the other teacher's channels close.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.fx
from graphmerge.passes.compress import student_slots
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.ir import WidenInfo, widen_info
from graphmerge.passes.selection import Keep, compressed_selection
from graphmerge.passes.util import getattr_path
from graphmerge.passes.widen import tied_names
from torch import nn


def averaging_heads(info: WidenInfo, *, include_averaged: bool = False) -> set[str]:
    """The parameters (canonical names) whose output dim lies in a pinned group at the graph's
    output: the layers where the big student averages its teachers (with ``include_averaged``,
    also those writing an averaged output group, ``Group.averaged``)."""
    layout, groups = info.groups.layout, info.groups
    internal = {g.id for g in groups.internal_pinned}
    boundary = ({g.id for g in groups.pinned} - internal) | ({g.id for g in groups if g.averaged}
                                                              if include_averaged else set())
    heads = set()
    for name, dims in layout.params.items():
        out = layout.out_dims.get(name)
        dim = dims[out] if out is not None and out < len(dims) else None
        if dim is None:
            continue
        ids = set(dim.group[dim.group >= 0].tolist())
        if ids and ids <= boundary:
            heads.add(name)
    return heads


def _kept_teachers_by_layer(info: WidenInfo, kept: dict[int, np.ndarray]) -> dict[str, set[int]]:
    """Per averaging layer (its module path): the teachers whose kept channels it reads."""
    layout, widths, widened = info.groups.layout, info.widths, info.widened
    readers: dict[str, set[int]] = {}
    for name in averaging_heads(info):
        dims, out = layout.params[name], layout.out_dims.get(name)
        teachers: set[int] = set()
        for d, dim in enumerate(dims):
            if d == out or dim is None:
                continue
            for gid in set(dim.group[np.isin(dim.group, list(widened))].tolist()):
                teachers |= set((np.asarray(kept[gid]) // widths[gid]).tolist()) if gid in kept else set()
        if teachers:
            readers.setdefault(name.rpartition(".")[0], set()).update(teachers)
    return readers


@torch.no_grad()
def average_kept_teachers(student: nn.Module, big: nn.Module, teachers: Sequence[nn.Module],
                          keep: Keep) -> dict[str, int]:
    """Rewrite, in place, each layer of ``student`` (``compress(big, keep)``) where the teachers
    meet into the mean of the teachers whose channels it reads. Returns, per rewritten layer, how
    many teachers it now averages (layers reading every teacher are left as they are)."""
    _, info = widen_info(big)
    n = info.n_teachers
    if isinstance(student, torch.fx.GraphModule) or not isinstance(student, type(info.teacher)):
        raise GraphMergeError(f"average_kept_teachers takes a student of the teachers' class "
                              f"({type(info.teacher).__name__}) that compress(big, keep) returned, got a "
                              f"{type(student).__name__}; a student compressed with a width ratio has other shapes: "
                              "rewrite its classifier by hand or compress without ratio.")
    if len(teachers) != n:
        raise GraphMergeError(f"average_kept_teachers needs the {n} teachers the big student was widened from, in "
                              f"the same order (their biases are averaged); got {len(teachers)}.")
    kept = compressed_selection(big, keep)
    readers = _kept_teachers_by_layer(info, kept)
    tied = tied_names(info.groups)
    skipped = set(info.tied_heads) | {alias.rpartition(".")[0] for alias, c in tied.items() if alias != c}
    layout, widened = info.groups.layout, info.widened
    rewritten: dict[str, int] = {}
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []  # applied once all are computed: none or all
    for name in sorted(averaging_heads(info)):
        layer = name.rpartition(".")[0]
        present = readers.get(layer, set())
        if not present or len(present) == n or layer in skipped:
            continue
        tensor = getattr_path(student, name)
        dims, out = layout.params[name], layout.out_dims.get(name)
        widened_dims = [d for d, dim in enumerate(dims) if d != out and dim is not None
                        and np.isin(dim.group, list(widened)).any()]
        value = tensor.detach()
        if widened_dims:
            for d in widened_dims:
                groups, _ = student_slots(dims[d], info, kept)
                factor = torch.where(torch.as_tensor(groups >= 0), n / len(present), 1.0)
                shape = [1] * tensor.ndim
                shape[d] = -1
                value = value * factor.to(tensor.device, tensor.dtype).view(shape)
        else:
            own = [getattr_path(teachers[t], name).detach().double().cpu() for t in sorted(present)]
            value = torch.stack(own).mean(0).to(tensor.device, tensor.dtype)
        updates.append((tensor, value))
        rewritten[layer] = len(present)
    for tensor, value in updates:
        tensor.copy_(value)
    return rewritten
