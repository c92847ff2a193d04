"""Channel-coupling analysis: which channels of a traced model must be kept or dropped together.

Think of it as type inference with dimension variables, done per position: every channel
position of every activation and parameter gets an integer id; op rules (``graphmerge.passes.registry``)
say which positions are the same channel (a residual add, a BatchNorm's parameters, a conv's
input against its weight). Solving the equalities (connected components) gives channel
*units*; units that always travel together in the same order form a *group*.

Group boundaries come from how channels are made and cut: a conv's output is one run of
fresh ids, ``cat`` puts runs side by side, ``split``/``chunk``/slicing cut them. Two units are
in one group only if every such run that holds one holds the other right after it.

Anything a rule does not understand pins the ids it touches, with the op and the reason: a
pinned group keeps its width. Pinning is always safe; guessing is not.

The rules record what they find in a ``Propagation`` (``graphmerge.passes.propagation``); this
module runs them over the graph and solves what they recorded into groups (``Group``) and a ``Layout``
(``graphmerge.passes.ir``).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.fx
from graphmerge.passes.ir import DimLayout, Group, GroupSet, Layout, Pin, PinReason, display_name
from graphmerge.passes.labels import TensorLabels
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.registry import pin_all, propagate_node
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def couple(gm: torch.fx.GraphModule, *, leaf_modules: tuple[str, ...] = ()) -> GroupSet:
    """Find the coupling groups of a traced model whose nodes carry ``meta['tensor_meta']``.

    ``gm`` is not modified.
    """
    start = time.perf_counter()
    hinted: frozenset[int] = frozenset()
    for _ in range(4):  # hints found in one run can expose more (attn @ v after q @ k^T)
        prop = Propagation(gm)
        prop.hinted = hinted
        for node in gm.graph.nodes:
            leaf = _inside_leaf(node, leaf_modules)
            if leaf is not None and node.op in ("call_function", "call_module"):
                prop.labels[node] = pin_all(prop, node, f"inside leaf module '{leaf}' (kept opaque on request)",
                                            reason=PinReason.LEAF_MODULE)
            else:
                prop.labels[node] = propagate_node(prop, node)
        if prop.head_hints <= hinted:
            break
        hinted = hinted | frozenset(prop.head_hints)  # ids are allocated alike on every run
    groups, layout = _solve(prop)
    elapsed = time.perf_counter() - start
    return GroupSet(groups, gm, layout, timings={"couple_s": elapsed})


def _solve(prop: Propagation) -> tuple[list[Group], Layout]:
    component = _components(prop)
    component_pins = _pinned_components(prop, component)
    chains = _chains(prop, component)

    discarded = set(component[np.concatenate(prop.discarded)].tolist()) if prop.discarded else set()
    param_components = set()
    for use in prop.params.values():
        for ids in use.dims:
            if ids is not None:
                param_components.update(component[ids[ids >= 0]].tolist())

    group_of = np.full(len(component_pins) + 1, -1, np.int64)
    channel_of = np.full(len(component_pins) + 1, -1, np.int64)
    groups: list[Group] = []
    for chain in chains:
        if not any(c in param_components for c in chain) or all(c in discarded for c in chain):
            continue
        gid = len(groups)
        pins = [component_pins[c] for c in chain if component_pins[c] is not None]
        first = _first_pin(pins)
        groups.append(Group(id=gid, width=len(chain), pinned=first is not None,
                            reason=None if first is None else first.message,
                            pin_reason=None if first is None else first.reason))
        group_of[chain] = gid
        channel_of[chain] = np.arange(len(chain))

    # A width-1 group repeated over the pieces a split cuts (q, k and v of a fused projection with
    # one key/value head) is one piece per split piece: mark where each run the graph made begins.
    run_start = np.zeros(prop.next_id + 1, bool)
    for run in prop.runs:
        if len(run):
            run_start[run[0]] = True

    def starts(ids: np.ndarray) -> np.ndarray:
        return (ids >= 0) & run_start[np.maximum(ids, 0)]

    def to_layout(ids: np.ndarray, linked: np.ndarray | None = None) -> DimLayout:
        comp = np.where(ids >= 0, component[np.maximum(ids, 0)], -1)
        gid = np.where(comp >= 0, group_of[comp], -1)
        same = linked is not None and linked.shape == ids.shape
        start = starts(linked) if same else None
        return DimLayout(gid, np.where(gid >= 0, channel_of[comp], -1), start)

    layout = Layout()
    for name, use in prop.params.items():
        # only the dim that writes the op's output: its ids are fresh, so their runs are the split's
        linked = [other if d == use.out_dim else None for d, other in enumerate(use.op_dims or [None] * len(use.dims))]
        dims = [None if ids is None else to_layout(ids, other) for ids, other in zip(use.dims, linked, strict=True)]
        layout.params[name] = dims
        layout.out_dims[name] = use.out_dim
        layout.in_dims[name] = use.in_dims
        for dim, dim_layout in enumerate(dims):
            if dim_layout is not None:
                _add_index_map(groups, name, dim, dim_layout)

    for node, value in prop.labels.items():
        if isinstance(value, TensorLabels):
            layout.nodes[node.name] = _node_layout(value, component, group_of, channel_of,
                                                   run_start if node.name in prop.cut_nodes else None)

    for node_name, role, ids in prop.roles:
        for gid in _groups_of(ids, component, group_of):
            target = {"producer": groups[gid].producers, "consumer": groups[gid].consumers,
                      "member": groups[gid].members}[role]
            if node_name not in target:
                target.append(node_name)
    for ids, size in prop.units:
        for gid in _groups_of(ids, component, group_of):
            groups[gid].unit = math.lcm(groups[gid].unit, size)
        _check_unit_alignment(groups, ids, size, component, group_of, channel_of)
    for ids, what in prop.across_norm:
        spanned = tuple(sorted(set(_groups_of(ids, component, group_of))))
        for gid in spanned:
            layout.across_norm.setdefault(gid, what)
        if len(spanned) > 1 and spanned not in layout.norm_spans:
            layout.norm_spans.append(spanned)
    layout.literal_nodes = set(prop.literal_nodes)
    layout.reduce_per_block = dict(prop.reduce_per_block)
    layout.token_mixing = dict(prop.token_mixing)
    layout.per_teacher_operands = dict(prop.per_teacher_operands)
    _flag_nonlinear_heads(prop, groups, component, group_of)
    for group in groups:
        if group.width % group.unit:
            group.pin(PinReason.UNIT_ORDER, f"selection unit {group.unit} does not divide width {group.width}")
    _check_strided_slices(prop, groups, component, group_of, channel_of)
    live = np.array([not g.pinned for g in groups] + [False], dtype=bool)
    for node, value in prop.labels.items():
        if isinstance(value, TensorLabels) and any(d is None for d in layout.nodes.get(node.name, [])):
            ids = value.all_ids()
            gids = group_of[component[ids[ids >= 0]]] if ids.size else np.zeros(0, np.int64)
            if gids.size and live[gids].any():
                layout.permuted_nodes.add(node.name)
    display_names = {n.name: display_name(n) for n in prop.gm.graph.nodes}
    for site in prop.gate_sites:
        layout.gate_sites.append(site)
        node_name, _, _, param = site
        in_dim = (layout.in_dims.get(param) or (1,))[0]
        for dim_layout in layout.params.get(param, [])[in_dim:in_dim + 1]:
            if dim_layout is None:
                continue
            for gid in np.unique(dim_layout.group[dim_layout.group >= 0]).tolist():
                shown = display_names.get(node_name, node_name)
                if not groups[gid].pinned and shown not in groups[gid].gate_sites:
                    groups[gid].gate_sites.append(shown)
    return groups, layout


def _inside_leaf(node: torch.fx.Node, leaf_modules: tuple[str, ...]) -> str | None:
    if not leaf_modules:
        return None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        for leaf in leaf_modules:
            name = str(path)
            for prefix in ("L['self'].", "L__self__."):
                name = name.removeprefix(prefix)
            if name == leaf or name.startswith(leaf + "."):
                return leaf
    return None


def _node_layout(value: TensorLabels, component: np.ndarray, group_of: np.ndarray,
                 channel_of: np.ndarray, run_start: np.ndarray | None) -> list[DimLayout | None]:
    """Per dim, the group and channel of every position; a joint block (heads x head_dim) whose
    positions are one channel along an axis (a head's run) splits into per-dim layouts."""
    def to_layout(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        comp = np.where(ids >= 0, component[np.maximum(ids, 0)], -1)
        gid = np.where(comp >= 0, group_of[np.maximum(comp, 0)], -1)
        return gid, np.where(gid >= 0, channel_of[np.maximum(comp, 0)], -1)

    out: list[DimLayout | None] = [None] * value.ndim
    for dims, ids in value.blocks:
        gid, channel = to_layout(ids)
        if len(dims) == 1:
            flat = ids.ravel()
            start = None if run_start is None else (flat >= 0) & run_start[np.maximum(flat, 0)]
            out[dims[0]] = DimLayout(gid.ravel(), channel.ravel(), start)
            continue
        key = np.where(gid >= 0, gid * (1 << 32) + channel, -1)
        varying = [axis for axis in range(key.ndim)
                   if key.shape[axis] > 1 and not np.all(key == np.take(key, [0], axis=axis))]
        if len(varying) > 1:
            continue  # a true permutation (channel shuffle): widen gathers it as a whole
        if not varying and (gid >= 0).any():
            # one head (or one repeated): its channel lives on the heads axis, the first of size 1
            # ((1, head_dim); (3, 1, head_dim) of a fused qkv), else the first ((rep, head_dim))
            varying = [next((axis for axis, size in enumerate(key.shape) if size == 1), 0)]
        for axis, d in enumerate(dims):
            if axis in varying:
                index = tuple(slice(None) if a == axis else 0 for a in range(key.ndim))
                out[d] = DimLayout(gid[index].copy(), channel[index].copy())
            else:
                out[d] = DimLayout(np.full(key.shape[axis], -1, np.int64), np.full(key.shape[axis], -1, np.int64))
    return out


def _flag_nonlinear_heads(prop: Propagation, groups: list[Group], component: np.ndarray,
                          group_of: np.ndarray) -> None:
    """An output group that passes a non-linear op would be averaged too early by its last layer.

    The big student averages the teachers in the layer that writes a pinned output group; a ReLU
    or max-pool after that layer (SqueezeNet's classifier) would see the average, not each teacher.
    Where no layer reads the group (only parameter-free ops lie between it and the output), it is
    laid out N-wide instead and averaged at the output (``Group.averaged``), so I1 holds; else it
    stays pinned with the reason.
    """
    for node_name, ids in prop.nonlinear:
        for gid in _groups_of(ids, component, group_of):
            group = groups[gid]
            if not (group.pinned and group.pin_reason is PinReason.GRAPH_OUTPUT):
                continue
            if not group.consumers:
                group.pinned, group.averaged = False, True
                group.reason = (f"graph output after the non-linear op {node_name}: the big student keeps each "
                                "teacher's block and averages them at the output")
            else:
                group.pin_reason = PinReason.NONLINEAR_OUTPUT
                group.reason = (f"non-linear op {node_name} after the layer that averages the teachers into "
                                "this graph output: the big student cannot compute the teachers' mean (I1)")


def _check_unit_alignment(groups: list[Group], ids: np.ndarray, size: int, component: np.ndarray,
                          group_of: np.ndarray, channel_of: np.ndarray) -> None:
    """Compress keeps whole units of a group's channels: ``[k*size, (k+1)*size)`` in group order.

    The op that asked for units (a grouped conv, a GroupNorm, attention heads) sees its units in its
    own channel order; after a channel permutation (a shuffle) that order is not the group's, and
    whole units in one order are not whole units in the other. Pin instead of keeping the wrong sets.
    """
    ids = np.asarray(ids, np.int64).ravel()
    if size <= 1 or ids.size % size or (ids < 0).any():
        return
    gids = group_of[component[ids]].reshape(-1, size)
    chans = channel_of[component[ids]].reshape(-1, size)
    for block_groups, block_channels in zip(gids, chans, strict=True):
        if (block_groups < 0).any():
            continue
        gid = int(block_groups[0])
        first = int(block_channels.min())
        aligned = (block_groups == gid).all() and first % size == 0 \
            and np.array_equal(np.sort(block_channels), np.arange(first, first + size))
        if not aligned:
            for g in np.unique(block_groups).tolist():
                groups[g].pin(PinReason.UNIT_ORDER, (
                    f"units of {size} channels (a grouped conv, GroupNorm or attention heads) are not whole "
                    "units of the group's channel order: a channel permutation (shuffle) lies between them"))
            return


def _check_strided_slices(prop: Propagation, groups: list[Group], component: np.ndarray, group_of: np.ndarray,
                          channel_of: np.ndarray) -> None:
    """Pin the groups a strided slice inside a joint block would cut wrongly in the big student.

    The big student runs the teacher's slice unchanged. Along an axis that holds no channel of a
    widened group (head_dim, when every position of a head is the head's one channel) it has the
    teacher's positions, so the slice takes what the teacher's takes, in every teacher's block. Along
    an axis that carries widened channels (the heads axis, or head_dim while its positions are
    channels of their own) the teachers' copies sit side by side and a step would cross from one
    teacher's block into the next; a block that is a channel permutation (varying along several
    axes) has no per-axis layout at all. Both pin, with the op and the reason.
    """
    for block, axis, what in prop.strided:
        ids = block.ravel()
        gids = group_of[component[ids[ids >= 0]]]
        live = sorted({int(g) for g in gids[gids >= 0] if not groups[g].pinned})
        if not live:
            continue
        labels = TensorLabels(block.shape, [(tuple(range(block.ndim)), block)])
        along = _node_layout(labels, component, group_of, channel_of, None)[axis]
        if along is None:
            why = ("its channels vary along several axes (a channel shuffle, or positions no head joins), so the big "
                   "student has no per-axis layout to slice")
        elif np.isin(along.group, live).any():
            why = "the sliced axis carries widened channels, so a step would cross the teachers' blocks"
        else:
            continue
        for gid in live:
            groups[gid].pin(PinReason.STRIDED_SLICE, f"{what}: strided slice of a reshaped channel block: {why}")


def _first_pin(pins: list[Pin]) -> Pin | None:
    """Prefer a pin from inside the graph over the graph boundary: it is the one to fix."""
    if not pins:
        return None
    inner = [pin for pin in pins if not pin.reason.boundary]
    return (inner or pins)[0]


def _groups_of(ids: np.ndarray, component: np.ndarray, group_of: np.ndarray) -> list[int]:
    ids = np.asarray(ids).ravel()
    gids = group_of[component[ids[ids >= 0]]]
    return np.unique(gids[gids >= 0]).tolist()


def _components(prop: Propagation) -> np.ndarray:
    n = prop.next_id
    if prop.edges:
        a = np.concatenate([e[0] for e in prop.edges])
        b = np.concatenate([e[1] for e in prop.edges])
    else:
        a = b = np.zeros(0, np.int64)
    matrix = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(matrix, directed=False)
    return component.astype(np.int64)


def _pinned_components(prop: Propagation, component: np.ndarray) -> list[Pin | None]:
    count = int(component.max()) + 1 if component.size else 0
    reasons: list[Pin | None] = [None] * count
    for ids, pin in prop.pins:
        for comp in np.unique(component[ids]).tolist():
            current = reasons[comp]
            if current is None or (current.reason.boundary and not pin.reason.boundary):
                reasons[comp] = pin
    return reasons


def _chains(prop: Propagation, component: np.ndarray) -> list[list[int]]:
    """Order channel units into groups: maximal chains every recorded run agrees on."""
    succ: dict[int, int | None] = {}
    pred: dict[int, int | None] = {}
    seen: dict[int, None] = {}
    for ids in prop.runs:
        comps = component[ids]
        if comps.size > 1:
            keep = np.concatenate(([True], comps[1:] != comps[:-1]))
            comps = comps[keep]
        seq = comps.tolist()
        for c in seq:
            seen.setdefault(c)
        _mark_end(succ, seq[-1])
        _mark_end(pred, seq[0])
        for u, v in zip(seq[:-1], seq[1:], strict=True):
            _link(succ, u, v)
            _link(pred, v, u)

    chains: list[list[int]] = []
    placed: set[int] = set()

    def linked(u: int) -> int | None:
        v = succ.get(u)
        return v if v is not None and v >= 0 and pred.get(v) == u else None

    has_incoming = {v for u in seen if (v := linked(u)) is not None}
    heads = [u for u in seen if u not in has_incoming]
    for start in heads + list(seen):
        chain = []
        node: int | None = start
        while node is not None and node not in placed:
            chain.append(node)
            placed.add(node)
            node = linked(node)
        if chain:
            chains.append(chain)
    return chains


_END = -1


def _mark_end(table: dict[int, int | None], u: int) -> None:
    table[u] = _END


def _link(table: dict[int, int | None], u: int, v: int) -> None:
    current = table.get(u, None)
    if u not in table:
        table[u] = v
    elif current != v:
        table[u] = _END


def _add_index_map(groups: list[Group], name: str, dim: int, dim_layout: DimLayout) -> None:
    gids = dim_layout.group
    for gid in np.unique(gids[gids >= 0]).tolist():
        positions = np.nonzero(gids == gid)[0]
        channels = dim_layout.channel[positions]
        order = np.argsort(channels, kind="stable")
        width = groups[gid].width
        if positions.size % width:
            groups[gid].pin(PinReason.UNEVEN_RUNS, f"{name} dim {dim}: uneven runs of channels")
            continue
        run = positions.size // width
        counts = np.bincount(channels, minlength=width)
        if not np.all(counts == run):
            groups[gid].pin(PinReason.UNEVEN_RUNS, f"{name} dim {dim}: channels used unevenly")
            continue
        groups[gid].index_maps[(name, dim)] = positions[order].reshape(width, run)
