"""The typed data the passes hand each other.

``couple`` returns a ``GroupSet``: the coupling groups (``Group``: channel sets kept or dropped together,
each pinned one with a ``PinReason`` and a message) and a ``Layout`` (per dimension of every
parameter and node output, which group and channel each position carries, plus the gate sites
and what widen must run per teacher block). ``widen`` attaches one ``WidenInfo`` to the big
student (``attach_widen_info``); gate, compress and certify read it through ``widen_info``.

Nothing here runs a pass, and this module imports no other pass but ``errors``.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx
from graphmerge.passes.errors import GraphMergeError
from torch import nn

# --- pins ----------------------------------------------------------------------------------


class PinReason(enum.Enum):
    """Why channels keep their width; the message beside it names the op, node and source line."""

    GRAPH_INPUT = "graph input"  # image channels, token ids: where the network meets the world
    INPUT_POSITIONS = "graph input positions"  # an op sums or indexes over positions a graph input labels
    GRAPH_OUTPUT = "graph output"  # logits
    NOT_A_CHANNEL = "not a channel"  # a labelled axis that turns out to be spatial, a sequence or a batch
    OP_RULE = "op rule"  # an op rule cannot say how the channels flow through this use of its op
    MIXING = "mixing"  # an op sums or indexes over channels (a reduction, an integer index)
    UNKNOWN_OP = "unknown op"  # no rule in the registry
    LEAF_MODULE = "leaf module"  # inside a module kept opaque on request (leaf_modules=)
    SIZE_MISMATCH = "size mismatch"  # two labelled dims an op equates have different sizes
    PARAMETER_ROLES = "parameter roles"  # a parameter used twice with different roles
    UNIT_ORDER = "unit order"  # whole selection units do not fit the group's channels
    UNEVEN_RUNS = "uneven runs"  # a parameter dim holds the group's channels unevenly
    STRIDED_SLICE = "strided slice"  # a step inside a reshaped channel block would cross teachers
    NONLINEAR_OUTPUT = "non-linear output"  # a non-linear op after the layer averaging into an output

    @property
    def boundary(self) -> bool:
        """Pins where the network meets the world, or on an axis that is no channel at all: they do
        not break invariant I1. Every other pin is *inside* the network."""
        return self in _BOUNDARY


_BOUNDARY = frozenset({PinReason.GRAPH_INPUT, PinReason.INPUT_POSITIONS, PinReason.GRAPH_OUTPUT,
                       PinReason.NOT_A_CHANNEL})


class Pin(NamedTuple):
    """One pin as an op rule records it: the kind of reason, and the message reports show."""

    reason: PinReason
    message: str


# --- groups --------------------------------------------------------------------------------


@dataclass
class Group:
    """One coupling group, described in the coordinates of ONE teacher.

    ``index_maps[(qualified_param_name, dim)]`` is an int array of shape ``(width, run)``: row
    ``c`` lists the indices along that parameter dimension owned by channel ``c`` of the group
    (``run > 1`` after a flatten, where one channel owns a run of features; offsets from ``cat``
    are already applied). ``producers`` / ``consumers`` / ``members`` / ``gate_sites`` hold the
    nodes by ``display_name``.
    """

    id: int
    width: int
    pinned: bool = False
    reason: str | None = None  # the pin's message (or, for an averaged output, why it is averaged)
    unit: int = 1
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    gate_sites: list[str] = field(default_factory=list)
    index_maps: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    # a graph output that passes a non-linear op after its last layer (SqueezeNet's ReLU after the
    # classifier): laid out N-wide like a widened group, never gated, averaged at the graph output
    # by the big student and over the teachers' blocks by compress
    averaged: bool = False
    pin_reason: PinReason | None = None  # the kind of ``reason``

    @property
    def widened(self) -> bool:
        return not self.pinned

    def pin(self, reason: PinReason, message: str) -> None:
        """Pin the group; a reason it already has (the first one found) is kept."""
        self.pinned = True
        if self.reason is None:
            self.reason, self.pin_reason = message, reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "width": self.width,
            "pinned": self.pinned,
            "reason": self.reason,
            "pin_reason": None if self.pin_reason is None else self.pin_reason.value,
            "unit": self.unit,
            "producers": list(self.producers),
            "consumers": list(self.consumers),
            "members": list(self.members),
            "gate_sites": list(self.gate_sites),
            "averaged": self.averaged,
            "params": sorted(f"{name}:{dim}" for name, dim in self.index_maps),
        }


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


# --- layout --------------------------------------------------------------------------------


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
    reduce_per_block: dict[str, int] = field(default_factory=dict)
    # nodes holding a joint block of widened channels that no per-dim layout describes (a shuffle)
    permuted_nodes: set[str] = field(default_factory=set)
    # linear layers over a non-channel axis (token-mixing): node name -> (the input's dims that
    # may carry channels, weight, bias). Where one of those dims is widened and the weight is not,
    # widen gives the layer one weight per teacher and applies each to its teacher's block.
    token_mixing: dict[str, tuple[tuple[int, ...], str, str | None]] = field(default_factory=dict)
    # parameters with no channel dim broadcast against channels in an elementwise op (StarReLU's
    # scale, a learnable affine scalar): (node name, argument position) -> (parameter, output dim
    # of the channels). Where that dim is widened, widen stacks the teachers' values and gives
    # each position its own teacher's.
    per_teacher_operands: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)


# --- the analysis' result ------------------------------------------------------------------


class GroupSet:
    """The result of the coupling analysis: an ordered, iterable collection of groups.

    Besides the groups it keeps what the later passes need to rebuild tensors: the traced graph
    and its ``Layout``, and the analysis' timings.
    """

    def __init__(self, groups: list[Group], graph_module: Any, layout: Layout | None = None,
                 timings: dict[str, float] | None = None):
        self.groups = groups
        self.graph_module = graph_module
        self.layout = layout
        self.timings = dict(timings or {})

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, group_id: int) -> Group:
        return self.groups[group_id]

    @property
    def widened(self) -> list[Group]:
        return [g for g in self.groups if not g.pinned]

    @property
    def gated(self) -> list[Group]:
        """The widened groups that gates choose channels of (all but averaged outputs)."""
        return [g for g in self.groups if not g.pinned and not g.averaged]

    @property
    def pinned(self) -> list[Group]:
        return [g for g in self.groups if g.pinned]

    @property
    def internal_pinned(self) -> list[Group]:
        """Pinned groups that do not touch a graph input or output: I1 cannot hold with them."""
        return [g for g in self.groups if g.pinned and not (g.pin_reason is not None and g.pin_reason.boundary)]

    @property
    def node_count(self) -> int:
        return len(self.graph_module.graph.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.node_count,
            "groups": [g.to_dict() for g in self.groups],
            "totals": {
                "groups": len(self.groups),
                "widened": len(self.widened),
                "pinned": len(self.pinned),
                "internal_pinned": len(self.internal_pinned),
            },
            "timings": dict(self.timings),
        }

    def to_networkx(self) -> Any:
        """The traced graph as a networkx DiGraph, each node tagged with the groups it touches."""
        import networkx as nx

        graph = nx.DiGraph()
        touched: dict[str, set[int]] = {}
        for g in self.groups:
            for name in (*g.producers, *g.consumers, *g.members):
                touched.setdefault(name, set()).add(g.id)
        for node in self.graph_module.graph.nodes:
            shown = display_name(node)
            graph.add_node(node.name, op=node.op, target=str(node.target), label=shown,
                           groups=sorted(touched.get(shown, touched.get(node.name, ()))))
            for user in node.users:
                graph.add_edge(node.name, user.name)
        return graph


# --- the big student's record --------------------------------------------------------------


@dataclass
class WidenInfo:
    """What compress and gate need to know about a big student (``attach_widen_info``, ``widen_info``)."""

    groups: GroupSet
    n_teachers: int
    teacher: nn.Module
    untraced: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # Integer scalars (BatchNorm's num_batches_tracked): one value per teacher, and the value the
    # big student started with, so compress can hand each teacher its own count back (I2) plus
    # whatever the big student counted since.
    counters: list[dict[str, torch.Tensor]] = field(default_factory=list)
    counters_start: dict[str, torch.Tensor] = field(default_factory=dict)
    # The inputs the analysis ran on; compress certifies its result (I3) on them.
    example_inputs: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    # what the teachers' own class needs beside them (use_cache=False where capture dropped a cache)
    class_kwargs: dict[str, Any] = field(default_factory=dict)
    # layers that average the teachers with an explicit 1/N (their weight is tied; see
    # rules.layers.WeightedLayerRule.average_tied_head)
    tied_heads: list[str] = field(default_factory=list)
    certificates: dict[str, Any] = field(default_factory=dict)
    # parameters stacked per teacher (token-mixing layers, per-teacher operands): name -> the
    # widened groups whose channels each teacher's copy is applied to
    stacked_params: dict[str, list[int]] = field(default_factory=dict)
    # where the batch sits in each gated activation (graphmerge.passes.batch), located by add_gates
    batch_places: dict[str, Any] = field(default_factory=dict)
    # how a group a normalisation spans is selected (see selection.select_channels): "block", one
    # teacher's whole block (the student normalises over what the big student normalised over, so
    # I3 holds), or "mixed", the top channels of any teachers
    normalised_selection: str = "block"
    # what a selection does with kept channels that cannot reach the output (see passes.liveness):
    # "replace" them by the best-scored channels that can, or "keep" them
    dead_channels: str = "replace"

    @property
    def widths(self) -> dict[int, int]:
        return {g.id: g.width for g in self.groups}

    @property
    def widened(self) -> set[int]:
        return {g.id for g in self.groups.widened}

    def __deepcopy__(self, memo: dict[int, Any]) -> WidenInfo:
        """A copy of a module (the gated big student, a float64 copy) describes the same big
        student: it gets its own record whose fields are this one's (the analysis, the teacher's
        skeleton, the certificates and the located batch places are shared, not copied)."""
        return copy.copy(self)


_RECORD = "graphmerge"


def attach_widen_info(graph_module: torch.fx.GraphModule, info: WidenInfo) -> None:
    """Make ``info`` the record of the big student ``graph_module`` (one record per module)."""
    graph_module.meta[_RECORD] = info


def widen_info(big: nn.Module) -> tuple[torch.fx.GraphModule, WidenInfo]:
    """The big GraphModule and its WidenInfo, from a big student or a gated big student."""
    graph_module = getattr(big, "graph_module", big)
    info = getattr(graph_module, "meta", {}).get(_RECORD)
    if not isinstance(info, WidenInfo):
        raise GraphMergeError(
            f"compress needs a big student made by graphmerge.widen (or gated by graphmerge.add_gates); "
            f"got a {type(big).__name__} without graphmerge metadata. Build it with graphmerge.widen(teachers, "
            "example_inputs) first.")
    return graph_module, info
