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
per dimension, each position's group and channel), for all teachers at once (a bit each), forwards
from the inputs and backwards from the output. Edges into a shape read (``sym_size`` and kin) carry
no values, so a tensor whose size a reshape uses is not thereby informed or reaching; a tensor an
in-place op writes (``buf[:] = a``), and the views it is written through, count as informed, since
their readers see the written values. It is otherwise conservative: a node it cannot read (no
layout, a node no other reads, such as a buffer update) counts as kept and as reaching the output,
and every placeholder (an input, or a parameter where the graph holds them as inputs) as informed,
so a channel is only called dead when no path can carry information through it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
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
    users: list[list[int]]  # per node, in topological order
    inputs: list[list[int]]
    is_output: np.ndarray
    is_input: np.ndarray
    shared: np.ndarray  # a pinned group's channels and no widened group's: one tensor all teachers share
    carriers: dict[int, list[int]]  # group -> the nodes with a dimension holding its channels
    first_computed: dict[int, int]  # group -> the first op (not a parameter) that holds its channels
    closable: list[_Dim]  # the distinct dimensions a selection can empty (no open position)
    node_closable: list[tuple[int, ...]]  # per node, its dimensions' indices in ``closable``


_STRUCTURES: weakref.WeakKeyDictionary[GroupSet, _Structure] = weakref.WeakKeyDictionary()


def _structure(info: WidenInfo) -> _Structure:
    cached = _STRUCTURES.get(info.groups)
    if cached is not None:
        return cached
    gated = {g.id: g.width for g in info.groups.gated}
    widened = {g.id for g in info.groups.widened}
    layout = info.groups.layout
    nodes = list(info.groups.graph_module.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    dims: list[tuple[_Dim, ...]] = []
    carriers: dict[int, list[int]] = {}
    pinned = {g.id for g in info.groups.pinned}
    shared = np.zeros(len(nodes), dtype=bool)
    for i, node in enumerate(nodes):
        node_dims, widened_here, pinned_here = [], False, False
        for dim in (layout.nodes.get(node.name) or []) if layout is not None else []:
            if dim is None or len(dim.group) == 0:
                continue
            groups, channels = np.asarray(dim.group), np.asarray(dim.channel)
            widened_here |= bool(np.isin(groups, list(widened)).any())
            pinned_here |= bool(np.isin(groups, list(pinned)).any())
            open_positions = ~np.isin(groups, list(gated))
            parts = []
            for gid in np.unique(groups[~open_positions]).tolist():
                held = channels[groups == gid]
                whole = len(held) == gated[gid] and np.array_equal(np.sort(held), np.arange(gated[gid]))
                parts.append((gid, None if whole else held))
                carriers.setdefault(gid, []).append(i)
            node_dims.append(_Dim(tuple(parts), bool(open_positions.any())))
        dims.append(tuple(node_dims))
        shared[i] = pinned_here and not widened_here
    shape_reads = {node for node in nodes if _reads_only_a_shape(node)}
    users = [[index[u] for u in node.users if u in index and u not in shape_reads] for node in nodes]
    inputs = [[] if node in shape_reads else [index[a] for a in node.all_input_nodes if a in index]
              for node in nodes]
    is_output = np.array([node.op == "output" for node in nodes])
    written = {base for node in nodes for value in _written_arguments(node) for base in _view_chain(value)}
    is_input = np.array([node.op == "placeholder" or node in written for node in nodes])
    closable = {_dim_key(dim): dim for node_dims in dims for dim in node_dims if not dim.open}
    position = {k: j for j, k in enumerate(closable)}
    node_closable = [tuple(sorted({position[_dim_key(dim)] for dim in node_dims if not dim.open}))
                     for node_dims in dims]
    carriers = {g: sorted(set(c)) for g, c in carriers.items()}
    computed = {g: next((i for i in c if nodes[i].op not in ("placeholder", "get_attr")), c[0])
                for g, c in carriers.items()}
    structure = _Structure(users, inputs, is_output, is_input, shared, carriers, computed,
                           list(closable.values()), node_closable)
    _STRUCTURES[info.groups] = structure
    return structure


def _dim_key(dim: _Dim) -> tuple:
    return tuple((gid, None if held is None else tuple(held.tolist())) for gid, held in dim.parts)


def _reads_only_a_shape(node: torch.fx.Node) -> bool:
    """A computed value that is no tensor (``sym_size`` of a tensor, arithmetic on sizes): the analysis
    gives it no labels either (``registry.propagate_node``). Without a recorded value it counts as data."""
    value = node.meta.get("val", node)
    return node.op in ("call_function", "call_method") and value is not node \
        and not isinstance(value, (torch.Tensor, list, tuple))


def _written_arguments(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors an in-place op writes (``copy_``, ``index_put_``, a method ending in ``_``)."""
    schema = getattr(node.target, "_schema", None)
    if node.op == "call_function" and schema is not None:
        return [value for argument, value in zip(schema.arguments, node.args, strict=False)
                if argument.alias_info is not None and argument.alias_info.is_write
                and isinstance(value, torch.fx.Node)]
    if node.op == "call_method" and str(node.target).endswith("_") and node.args \
            and isinstance(node.args[0], torch.fx.Node):
        return [node.args[0]]
    return []


def _view_chain(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node`` and every tensor it is a view of, back to the base (``slice`` of ``zeros``: both)."""
    chain = [node]
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        schema = getattr(node.target, "_schema", None)
        first = schema.arguments[0] if schema is not None and schema.arguments else None
        if first is None or first.alias_info is None or first.alias_info.is_write:
            break
        node = node.args[0]
        chain.append(node)
    return chain


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


def _live_nodes(structure: _Structure, masks: list[dict[int, np.ndarray]]) -> list[int]:
    """Per node, a bit per teacher: the teacher's part of the node is kept, depends on a graph input
    and reaches the output. A node that holds a pinned group's channels and no widened group's (a
    pinned group inside the network: widen averages the teachers into it) is one tensor every
    teacher reads and writes, so it is informed, and reaches the output, for all teachers as soon as
    it does for one. A node without labels is followed per teacher."""
    everyone = (1 << len(masks)) - 1
    dim_bits = [sum(1 << t for t, m in enumerate(masks) if not _emptied(dim, m)) for dim in structure.closable]
    kept = []
    for dims in structure.node_closable:
        bits = everyone
        for j in dims:
            bits &= dim_bits[j]
        kept.append(bits)
    count = len(kept)
    informed = [0] * count
    for i in range(count):
        if structure.is_input[i]:
            bits = kept[i]
        else:
            bits = 0
            for a in structure.inputs[i]:
                bits |= informed[a]
            bits &= kept[i]
        informed[i] = everyone if bits and structure.shared[i] else bits
    reaches = [0] * count
    for i in range(count - 1, -1, -1):
        users = structure.users[i]
        if structure.is_output[i] or not users:
            bits = kept[i]
        else:
            bits = 0
            for u in users:
                bits |= reaches[u]
            bits &= kept[i]
        reaches[i] = everyone if bits and structure.shared[i] else bits
    return [f & r for f, r in zip(informed, reaches, strict=True)]


def _all_masks(info: WidenInfo, kept: dict[int, np.ndarray],
               forced: tuple[int, int] | None = None) -> list[dict[int, np.ndarray]]:
    masks = [_masks(info, kept, t) for t in range(info.n_teachers)]
    if forced is not None:
        gid, teacher = forced
        masks[teacher][gid] = np.ones(info.widths[gid], dtype=bool)
    return masks


def dead_teachers(info: WidenInfo, kept: dict[int, np.ndarray],
                  only: set[int] | None = None) -> dict[int, set[int]]:
    """Per gated group (of ``only``, default all), the teachers some of whose channels ``kept`` keeps
    there but none of which can carry information to the graph output (groups with none are left
    out), the groups whose first computing op comes latest in the graph first."""
    structure = _structure(info)
    widths = info.widths
    masks = _all_masks(info, kept)
    if not any(_emptied(dim, m) for m in masks for dim in structure.closable):
        return {}  # the selection removes no teacher's part of any tensor: every kept channel is live
    live = _live_nodes(structure, masks)
    dead: dict[int, set[int]] = {}
    for gid, channels in kept.items():
        if gid not in structure.carriers or (only is not None and gid not in only):
            continue
        carried = 0
        for i in structure.carriers[gid]:
            carried |= live[i]
        for teacher in sorted(set((np.asarray(channels) // widths[gid]).tolist())):
            if not carried >> teacher & 1:
                dead.setdefault(gid, set()).add(teacher)
    return dict(sorted(dead.items(), key=lambda item: -structure.first_computed[item[0]]))


def reachable_teachers(info: WidenInfo, kept: dict[int, np.ndarray], gid: int,
                       teachers: set[int] | None = None) -> set[int]:
    """Of ``teachers`` (default: all), those whose channels in group ``gid`` would reach the output
    were all of them kept there (the other groups as ``kept`` has them)."""
    structure = _structure(info)
    reachable = set()
    for teacher in sorted(range(info.n_teachers) if teachers is None else teachers):
        live = _live_nodes(structure, _all_masks(info, kept, forced=(gid, teacher)))
        if any(live[i] >> teacher & 1 for i in structure.carriers.get(gid, [])):
            reachable.add(teacher)
    return reachable
