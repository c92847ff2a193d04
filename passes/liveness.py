"""Which teachers' channels of each widened group still reach the graph output under a selection.

The big student is block-diagonal: teacher ``t``'s channels are computed from teacher ``t``'s
channels only, and the teachers meet at the graph output, where they are averaged. A selection
that keeps none of teacher ``t``'s channels along a dimension of a tensor removes teacher ``t``'s
part of that tensor from the student. Channels of teacher ``t`` kept in a group are *dead* when
every path from a graph input to them, or every path from them to the output, runs through such a
removed part: the student computes them from its biases alone, or computes them and then drops
everything they feed. The common case is a pre-norm transformer whose residual stream keeps one
teacher's whole block: every attention head and MLP unit kept from the other teacher reads and
writes only channels that are gone.

The analysis runs on the teacher graph the coupling analysis labelled (``Layout.nodes``: per node,
per dimension, each position's group and channel), once per teacher, backwards from the output.
It is conservative: a node it cannot read (no layout, a node no other reads, such as a buffer update)
counts as kept and as reaching the output, and every placeholder (an input, or a parameter where
the graph holds them as inputs) as informed, so a channel is only called dead when no path can
carry information through it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from graphmerge.passes.ir import GroupSet, WidenInfo

#: the choices for channels a selection keeps that cannot reach the output
DEAD_CHANNEL_POLICIES = ("replace", "keep")

# one dimension of a node: per gated group on it, the channels it holds (None: the whole group);
# ``open`` when a position is no gated channel (a pinned or averaged group, a kernel tap), so the
# dimension is never emptied by a selection
_Part = tuple[int, np.ndarray | None]


@dataclass(frozen=True)
class _Dim:
    parts: tuple[_Part, ...]
    open: bool


@dataclass(frozen=True)
class _Structure:
    dims: list[tuple[_Dim, ...]]  # per node, in topological order
    users: list[list[int]]
    inputs: list[list[int]]
    is_output: np.ndarray
    is_input: np.ndarray
    carriers: dict[int, list[int]]  # group -> the nodes with a dimension holding its channels
    closable: list[_Dim]  # the distinct dimensions a selection can empty (no open position)


_STRUCTURES: weakref.WeakKeyDictionary[GroupSet, _Structure] = weakref.WeakKeyDictionary()


def _structure(info: WidenInfo) -> _Structure:
    cached = _STRUCTURES.get(info.groups)
    if cached is not None:
        return cached
    gated = {g.id: g.width for g in info.groups.gated}
    layout = info.groups.layout
    nodes = list(info.groups.graph_module.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    dims: list[tuple[_Dim, ...]] = []
    carriers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        node_dims = []
        for dim in (layout.nodes.get(node.name) or []) if layout is not None else []:
            if dim is None or len(dim.group) == 0:
                continue
            groups, channels = np.asarray(dim.group), np.asarray(dim.channel)
            open_positions = ~np.isin(groups, list(gated))
            parts = []
            for gid in np.unique(groups[~open_positions]).tolist():
                held = channels[groups == gid]
                whole = len(held) == gated[gid] and np.array_equal(np.sort(held), np.arange(gated[gid]))
                parts.append((gid, None if whole else held))
                carriers.setdefault(gid, []).append(i)
            node_dims.append(_Dim(tuple(parts), bool(open_positions.any())))
        dims.append(tuple(node_dims))
    users = [[index[u] for u in node.users if u in index] for node in nodes]
    inputs = [[index[a] for a in node.all_input_nodes if a in index] for node in nodes]
    is_output = np.array([node.op == "output" for node in nodes])
    is_input = np.array([node.op == "placeholder" for node in nodes])
    closable = {tuple((gid, None if held is None else tuple(held.tolist())) for gid, held in dim.parts): dim
                for node_dims in dims for dim in node_dims if not dim.open}
    structure = _Structure(dims, users, inputs, is_output, is_input,
                           {g: sorted(set(c)) for g, c in carriers.items()}, list(closable.values()))
    _STRUCTURES[info.groups] = structure
    return structure


def _masks(info: WidenInfo, kept: dict[int, np.ndarray], teacher: int) -> dict[int, np.ndarray]:
    widths = info.widths
    masks = {}
    for gid, channels in kept.items():
        channels = np.asarray(channels)
        own = channels[channels // widths[gid] == teacher] - teacher * widths[gid]
        mask = np.zeros(widths[gid], dtype=bool)
        mask[own] = True
        masks[gid] = mask
    return masks


def _emptied(dim: _Dim, masks: dict[int, np.ndarray]) -> bool:
    if dim.open:
        return False
    for gid, held in dim.parts:
        mask = masks.get(gid)
        if mask is None or (mask.any() if held is None else mask[held].any()):
            return False
    return True


def _live_nodes(structure: _Structure, masks: dict[int, np.ndarray]) -> np.ndarray:
    """Per node: the teacher's part of it is kept, depends on a graph input and reaches the output."""
    count = len(structure.dims)
    kept = np.array([not any(_emptied(dim, masks) for dim in dims) for dims in structure.dims], dtype=bool)
    informed = np.zeros(count, dtype=bool)
    for i in range(count):
        informed[i] = kept[i] and (structure.is_input[i] or any(informed[a] for a in structure.inputs[i]))
    reaches = np.zeros(count, dtype=bool)
    for i in range(count - 1, -1, -1):
        reaches[i] = kept[i] and (structure.is_output[i] or not structure.users[i]
                                  or any(reaches[u] for u in structure.users[i]))
    return informed & reaches


def _reaches(structure: _Structure, masks: dict[int, np.ndarray], gid: int) -> bool:
    live = _live_nodes(structure, masks)
    return any(live[i] for i in structure.carriers.get(gid, ()))


def dead_teachers(info: WidenInfo, kept: dict[int, np.ndarray],
                  only: set[int] | None = None) -> dict[int, set[int]]:
    """Per gated group (of ``only``, default all), the teachers some of whose channels ``kept`` keeps
    there but none of which can carry information to the graph output (groups with none are left
    out), the groups that first appear latest in the graph first."""
    structure = _structure(info)
    widths = info.widths
    dead: dict[int, set[int]] = {}
    for teacher in range(info.n_teachers):
        masks = _masks(info, kept, teacher)
        if not any(_emptied(dim, masks) for dim in structure.closable):
            continue  # the selection removes no part of this teacher anywhere: every kept channel is live
        live = _live_nodes(structure, masks)
        for gid, channels in kept.items():
            if only is not None and gid not in only:
                continue
            if gid not in structure.carriers or not np.any(np.asarray(channels) // widths[gid] == teacher):
                continue
            if not any(live[i] for i in structure.carriers[gid]):
                dead.setdefault(gid, set()).add(teacher)
    return dict(sorted(dead.items(), key=lambda item: -structure.carriers[item[0]][0]))


def reachable_teachers(info: WidenInfo, kept: dict[int, np.ndarray], gid: int,
                       teachers: set[int] | None = None) -> set[int]:
    """Of ``teachers`` (default: all), those whose channels in group ``gid`` would reach the output
    were all of them kept there (the other groups as ``kept`` has them)."""
    structure = _structure(info)
    reachable = set()
    for teacher in sorted(range(info.n_teachers) if teachers is None else teachers):
        masks = _masks(info, kept, teacher)
        masks[gid] = np.ones(info.widths[gid], dtype=bool)
        if _reaches(structure, masks, gid):
            reachable.add(teacher)
    return reachable
