"""The data model shared by every pass: coupling groups and the set of them.

A *group* is a set of channel positions that must be kept or dropped together: the output
channels of a conv, the BatchNorm after it, every residual add they flow into, the input
channels of every conv that reads them, a flatten's runs of features, and so on. The coupling
pass (``graphmerge.passes.couple``) finds them; widen, gate and compress only read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Group:
    """One coupling group, described in the coordinates of ONE teacher.

    ``index_maps[(qualified_param_name, dim)]`` is an int array of shape ``(width, run)``: row
    ``c`` lists the indices along that parameter dimension owned by channel ``c`` of the group
    (``run > 1`` after a flatten, where one channel owns a run of features; offsets from ``cat``
    are already applied).
    """

    id: int
    width: int
    pinned: bool = False
    reason: str | None = None
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

    @property
    def widened(self) -> bool:
        return not self.pinned

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "width": self.width,
            "pinned": self.pinned,
            "reason": self.reason,
            "unit": self.unit,
            "producers": list(self.producers),
            "consumers": list(self.consumers),
            "members": list(self.members),
            "gate_sites": list(self.gate_sites),
            "averaged": self.averaged,
            "params": sorted(f"{name}:{dim}" for name, dim in self.index_maps),
        }


class GroupSet:
    """The result of the coupling analysis: an ordered, iterable collection of groups.

    Besides the groups it keeps what the later passes need to rebuild tensors: the traced
    graph, and for every labelled dimension the channel *units* it carries (see
    ``graphmerge.passes.couple``), which widen uses to lay out the big student.
    """

    def __init__(self, groups: list[Group], graph_module: Any, layout: Any = None,
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
        return [g for g in self.groups if g.pinned and not _is_boundary_reason(g.reason)]

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

    def to_networkx(self):
        """The traced graph as a networkx DiGraph, each node tagged with the groups it touches."""
        import networkx as nx

        graph = nx.DiGraph()
        touched: dict[str, set[int]] = {}
        for g in self.groups:
            for name in (*g.producers, *g.consumers, *g.members):
                touched.setdefault(name, set()).add(g.id)
        from graphmerge.passes.couple import display_name

        for node in self.graph_module.graph.nodes:
            shown = display_name(node)
            graph.add_node(node.name, op=node.op, target=str(node.target), label=shown,
                           groups=sorted(touched.get(shown, touched.get(node.name, ()))))
            for user in node.users:
                graph.add_edge(node.name, user.name)
        return graph


# Pins that say where the network meets the world, or that a labelled axis is not a channel at
# all (a parameter's sequence axis added to a token axis): they do not break invariant I1.
BOUNDARY_REASONS = ("graph input", "graph output", "not a channel")


def _is_boundary_reason(reason: str | None) -> bool:
    return reason is not None and reason.startswith(BOUNDARY_REASONS)
