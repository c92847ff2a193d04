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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx
from graphmerge.passes.groups import BOUNDARY_REASONS, Group, GroupSet
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class ParamUse:
    """How one parameter or buffer's dims are labelled, and which dim writes its op's output."""

    dims: list[np.ndarray | None]
    out_dim: int | None
    in_dims: tuple[int, ...] = ()
    op_dims: list[np.ndarray | None] | None = None  # the ids its op gave it, position by position


class GateSite(NamedTuple):
    """Where a gate multiplies: argument ``arg_index`` of node ``node``, along activation dim ``dim``;
    ``param`` is the consumer's weight, whose input dim says which channels sit there."""

    node: str
    arg_index: int
    dim: int
    param: str


@dataclass
class DimLayout:
    """A labelled dimension in group coordinates: per position, its group and channel index.

    ``group[p] == -1`` marks positions that are not channels of any group (kernel taps, ...).
    """

    group: np.ndarray
    channel: np.ndarray
    start: np.ndarray | None = None  # where a run the graph cuts at begins (a split piece)


@dataclass
class Layout:
    """What widen, gate and compress need beyond the groups themselves."""

    params: dict[str, list[DimLayout | None]] = field(default_factory=dict)
    out_dims: dict[str, int | None] = field(default_factory=dict)
    in_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    nodes: dict[str, list[DimLayout | None]] = field(default_factory=dict)
    gate_sites: list[GateSite] = field(default_factory=list)
    across_norm: dict[int, str] = field(default_factory=dict)
    # the groups each normalisation spans together (one tuple per norm): a selection that keeps one
    # teacher's block must keep the same teacher in all of them, or the student's norm mixes blocks
    norm_spans: list[tuple[int, ...]] = field(default_factory=list)
    literal_nodes: set[str] = field(default_factory=set)
    # reductions and softmax over a channel dim (node name -> dim): widen runs them per teacher block
    blockwise: dict[str, int] = field(default_factory=dict)
    # nodes holding a joint block of widened channels that no per-dim layout describes (a shuffle)
    permuted_nodes: set[str] = field(default_factory=set)
    # linear layers over a non-channel axis (token-mixing): node name -> (the input's dims that
    # may carry channels, weight, bias). Where one of those dims is widened and the weight is not,
    # widen gives the layer one weight per teacher and applies each to its teacher's block.
    per_teacher: dict[str, tuple[tuple[int, ...], str, str | None]] = field(default_factory=dict)
    # parameters with no channel dim broadcast against channels in an elementwise op (StarReLU's
    # scale, a learnable affine scalar): (node name, argument position) -> (parameter, output dim
    # of the channels). Where that dim is widened, widen stacks the teachers' values and gives
    # each position its own teacher's.
    per_teacher_operands: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)


class Propagation:
    """The state of one analysis: id allocation, equalities, pins, and what each node carries."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.next_id = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.runs: list[np.ndarray] = []
        self.roles: list[tuple[str, str, np.ndarray]] = []
        self.params: dict[str, ParamUse] = {}
        self.units: list[tuple[np.ndarray, int]] = []
        self.across_norm: list[tuple[np.ndarray, str]] = []
        self.gate_sites: list[GateSite] = []
        self.discarded: list[np.ndarray] = []
        self.input_ranges: list[tuple[int, int]] = []
        self.blockwise: dict[str, int] = {}
        self.per_teacher: dict[str, tuple[tuple[int, ...], str, str | None]] = {}
        self.per_teacher_operands: dict[tuple[str, int], tuple[str, int]] = {}
        self.not_channel: list[np.ndarray] = []
        self.fresh_param_dims: dict[str, list[np.ndarray | None]] = {}
        self.literal_nodes: set[str] = set()
        self.nonlinear: list[tuple[str, np.ndarray]] = []
        self.labels: dict[torch.fx.Node, Any] = {}
        # Channels that an attention op found on head_dim alone (one head, or one key/value head
        # repeated): the analysis runs again with them in ``hinted``, and a reshape that splits
        # them off keeps the size-1 or repeated heads axis in their block, where widen adds heads.
        self.head_hints: set[int] = set()
        self.cut_nodes: set[str] = set()  # nodes a split cuts into pieces (their layouts mark runs)
        # strided slices inside joint blocks (block ids, sliced axis, the op): checked after solving
        self.strided: list[tuple[np.ndarray, int, str]] = []
        self.hinted: frozenset[int] = frozenset()

    # -- building blocks for op rules -------------------------------------------------------

    def fresh(self, n: int, *, run: bool = True) -> np.ndarray:
        """``n`` new channel ids, recorded as one run (a space made by one op) unless ``run=False``."""
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        if run:
            self.runs.append(ids)
        return ids

    def run(self, ids: np.ndarray) -> None:
        """Record that ``ids`` sit side by side in this order (a cat output, a split piece)."""
        ids = np.asarray(ids)
        if ids.size and np.all(ids >= 0):
            self.runs.append(ids)

    def unify(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        """Positions of ``a`` and ``b`` are the same channels. A channel meeting a non-channel pins."""
        a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
        if a.shape != b.shape:
            self.pin(a, f"{where}: mismatched sizes {a.size} and {b.size}")
            self.pin(b, f"{where}: mismatched sizes {a.size} and {b.size}")
            return
        both = (a >= 0) & (b >= 0)
        if both.any():
            self.edges.append((a[both], b[both]))
        lonely = (a >= 0) ^ (b >= 0)
        if lonely.any():
            self.pin(np.where(a >= 0, a, b)[lonely], f"not a channel: {where} aligns it with a spatial or batch axis")

    def pin(self, ids: np.ndarray, reason: str) -> None:
        ids = np.asarray(ids, np.int64).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.pins.append((ids, reason))

    def pin_labels(self, value: Any, reason: str) -> None:
        for labels in _tensor_labels_in(value):
            self.pin(labels.all_ids(), reason)

    def role(self, node: torch.fx.Node, role: str, ids: np.ndarray | None) -> None:
        if ids is not None and not (node.op == "get_attr" and _is_aten_node_graph(node)):
            ids = np.asarray(ids).ravel()
            ids = ids[ids >= 0]
            if ids.size:
                self.roles.append((display_name(node), role, ids))

    def use_param(self, name: str, dims: list[np.ndarray | None], *, out_dim: int | None,
                  in_dims: tuple[int, ...] = ()) -> None:
        """Label parameter ``name``; a second use (weight sharing) must agree with the first."""
        dims = [None if d is None else np.asarray(d, np.int64) for d in dims]
        seen = self.params.get(name)
        if seen is None:
            self.params[name] = ParamUse(dims, out_dim, in_dims)
            return
        if seen.op_dims is None:
            seen.op_dims = dims
        for old, new in zip(seen.dims, dims, strict=True):
            if old is not None and new is not None:
                self.unify(old, new, f"parameter {name} used twice")
            elif (old is None) != (new is None):
                self.pin(old if new is None else new, f"parameter {name} used twice with different roles")
        if seen.out_dim is None:  # first seen through get_attr; the op using it knows its roles
            seen.out_dim = out_dim
        if not seen.in_dims:
            seen.in_dims = in_dims

    def input_ids(self, n: int) -> np.ndarray:
        """Fresh ids for a graph input's dim (token positions, image channels), remembered as such."""
        ids = self.fresh(n)
        self.input_ranges.append((int(ids[0]), int(ids[-1]) + 1) if n else (0, 0))
        return ids

    def mark_not_channel(self, ids: np.ndarray, reason: str) -> None:
        """Pin ids that label an axis which is not a channel (token positions a linear mixes)."""
        ids = np.asarray(ids, np.int64).ravel()
        self.pin(ids, reason)
        self.not_channel.append(ids[ids >= 0])

    def is_not_channel(self, ids: np.ndarray) -> bool:
        """Whether every position of ``ids`` is a non-channel axis (no id, or one marked so)."""
        ids = np.asarray(ids, np.int64).ravel()
        ids = ids[ids >= 0]
        if not ids.size:
            return True
        marked = np.concatenate(self.not_channel) if self.not_channel else np.zeros(0, np.int64)
        return bool(np.isin(ids, marked).all())

    def from_input(self, ids: np.ndarray) -> bool:
        """Whether every channel id in ``ids`` is a position of a graph input's dim."""
        ids = np.asarray(ids).ravel()
        ids = ids[ids >= 0]
        if not ids.size:
            return False
        inside = np.zeros(ids.shape, dtype=bool)
        for low, high in self.input_ranges:
            inside |= (ids >= low) & (ids < high)
        return bool(inside.all())

    def discard(self, ids: np.ndarray) -> None:
        """These ids turned out not to be channels (a parameter's kernel dim): they form no group."""
        self.discarded.append(np.asarray(ids, np.int64).ravel())

    def gate_site(self, node: torch.fx.Node, arg_index: int, dim: int, param: str) -> None:
        """A consumer's input: gates of the groups it reads multiply argument ``arg_index`` there."""
        self.gate_sites.append(GateSite(node.name, arg_index, dim, param))

    def unit(self, ids: np.ndarray, size: int) -> None:
        """Channels must be selected in whole consecutive units of ``size`` (conv groups, heads)."""
        if size > 1:
            self.units.append((np.asarray(ids, np.int64), size))

    def strided_slice(self, block: np.ndarray, axis: int, what: str) -> None:
        """A slice with a step along ``axis`` of a joint block (the interleaved pairs of rotary
        embeddings, ``x[..., 1::2]`` over heads x head_dim). The big student runs the same slice, which
        is exact only where that axis keeps the teacher's positions (a head's head_dim, once the head
        is one channel); which axes the big student widens is known after solving, so it is checked
        there (``_check_strided_slices``) and pins what it would break."""
        self.strided.append((np.asarray(block, np.int64), axis, what))

    def normalised_across(self, ids: np.ndarray, what: str) -> None:
        """A normalisation spans these channels: dropping some changes the others (I3 inexact)."""
        self.across_norm.append((np.asarray(ids, np.int64).ravel(), what))

    def param_labels(self, name: str, tensor: torch.Tensor, *, runs: bool = True) -> list[np.ndarray]:
        """Fresh labels for a parameter seen through ``get_attr``: every dim of size > 1 a space.

        With ``runs=False`` the labels say nothing about channel order: the ops that read the
        parameter do (a conv's weight rows follow its output channels, whatever order they have).
        """
        dims = []
        for size in tensor.shape:
            dims.append(self.fresh(size, run=runs) if size > 1 else np.full(size, NOT_A_CHANNEL, np.int64))
        return dims


def _tensor_labels_in(value: Any):
    if isinstance(value, TensorLabels):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensor_labels_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensor_labels_in(item)


def couple(gm: torch.fx.GraphModule, *, leaf_modules: tuple[str, ...] = ()) -> GroupSet:
    """Find the coupling groups of a traced model whose nodes carry ``meta['tensor_meta']``.

    ``gm`` is not modified.
    """
    from graphmerge.passes.registry import pin_all, propagate_node

    start = time.perf_counter()
    hinted: frozenset[int] = frozenset()
    for _ in range(4):  # hints found in one run can expose more (attn @ v after q @ k^T)
        prop = Propagation(gm)
        prop.hinted = hinted
        for node in gm.graph.nodes:
            leaf = _inside_leaf(node, leaf_modules)
            if leaf is not None and node.op in ("call_function", "call_module"):
                prop.labels[node] = pin_all(prop, node, f"inside leaf module '{leaf}' (kept opaque on request)")
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
    pinned_reason = _pinned_components(prop, component)
    chains = _chains(prop, component)

    discarded = set(component[np.concatenate(prop.discarded)].tolist()) if prop.discarded else set()
    param_components = set()
    for use in prop.params.values():
        for ids in use.dims:
            if ids is not None:
                param_components.update(component[ids[ids >= 0]].tolist())

    group_of = np.full(len(pinned_reason) + 1, -1, np.int64)
    channel_of = np.full(len(pinned_reason) + 1, -1, np.int64)
    groups: list[Group] = []
    for chain in chains:
        if not any(c in param_components for c in chain) or all(c in discarded for c in chain):
            continue
        gid = len(groups)
        reasons = [pinned_reason[c] for c in chain if pinned_reason[c] is not None]
        groups.append(Group(id=gid, width=len(chain), pinned=bool(reasons),
                            reason=_first_reason(reasons)))
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
    layout.blockwise = dict(prop.blockwise)
    layout.per_teacher = dict(prop.per_teacher)
    layout.per_teacher_operands = dict(prop.per_teacher_operands)
    _flag_nonlinear_heads(prop, groups, component, group_of)
    for group in groups:
        if group.width % group.unit:
            group.pinned = True
            group.reason = group.reason or f"selection unit {group.unit} does not divide width {group.width}"
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


def display_name(node: torch.fx.Node) -> str:
    """How reports name an op: the module that owns its parameters (``layer1.0.conv1``), else the
    innermost module whose forward made it, else the graph node's name."""
    if node.op != "call_function" and not (node.op == "call_module" and "_graphmerge_modes" in str(node.target)):
        return node.name
    for value in (*node.args, *node.kwargs.values()):
        if isinstance(value, torch.fx.Node) and value.op == "get_attr" and "." in str(value.target):
            return str(value.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = str(list(stack.values())[-1][0])
        for prefix in ("L['self'].", "L__self__."):
            path = path.removeprefix(prefix)
        if path and path != "L['self']":
            return path
    return node.name


def _is_aten_node_graph(node: torch.fx.Node) -> bool:
    return "val" in node.meta


def _is_aten_graph(gm: torch.fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


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
            if not (group.pinned and group.reason == "graph output"):
                continue
            if not group.consumers:
                group.pinned, group.averaged = False, True
                group.reason = (f"graph output after the non-linear op {node_name}: the big student keeps each "
                                "teacher's block and averages them at the output")
            else:
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
                groups[g].pinned = True
                groups[g].reason = groups[g].reason or (
                    f"units of {size} channels (a grouped conv, GroupNorm or attention heads) are not whole "
                    "units of the group's channel order: a channel permutation (shuffle) lies between them")
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
            groups[gid].pinned = True
            groups[gid].reason = groups[gid].reason or f"{what}: strided slice of a reshaped channel block: {why}"


def _first_reason(reasons: list[str]) -> str | None:
    """Prefer a reason from inside the graph over the graph boundary: it is the one to fix."""
    if not reasons:
        return None
    inner = [r for r in reasons if not r.startswith(BOUNDARY_REASONS)]
    return (inner or reasons)[0]


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


def _pinned_components(prop: Propagation, component: np.ndarray) -> list[str | None]:
    count = int(component.max()) + 1 if component.size else 0
    reasons: list[str | None] = [None] * count
    for ids, reason in prop.pins:
        for comp in np.unique(component[ids]).tolist():
            current = reasons[comp]
            if current is None or (current.startswith(BOUNDARY_REASONS)
                                   and not reason.startswith(BOUNDARY_REASONS)):
                reasons[comp] = reason
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
            groups[gid].pinned = True
            groups[gid].reason = groups[gid].reason or f"{name} dim {dim}: uneven runs of channels"
            continue
        run = positions.size // width
        counts = np.bincount(channels, minlength=width)
        if not np.all(counts == run):
            groups[gid].pinned = True
            groups[gid].reason = groups[gid].reason or f"{name} dim {dim}: channels used unevenly"
            continue
        groups[gid].index_maps[(name, dim)] = positions[order].reshape(width, run)
