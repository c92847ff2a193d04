"""The state of one widen, handed to every op rule's widen hooks (``OpRule.plan_widen``, ``OpRule.widen``).

It lives only while ``graphmerge.passes.widen.widen`` builds one big student: what the hooks need to
read (the analysed layout, the teachers' positions along a widened dim) and what they leave for widen
(parameters stacked per teacher, layers that average with an explicit 1/N, which new node stands for
which analysed one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.ir import DimLayout, Layout
from graphmerge.passes.layout import teacher_maps


@dataclass
class WidenContext:
    big: torch.fx.GraphModule
    layout: Layout
    n: int
    widths: dict[int, int]
    widened: set[int]
    # new node name -> the analysed node it stands for (a rewritten node keeps its layout)
    aliases: dict[str, str] = field(default_factory=dict)
    # parameters stacked per teacher (N copies) -> the dims whose channels each copy is applied to
    stacked: dict[str, list[DimLayout]] = field(default_factory=dict)
    # layers whose output averages the teachers with an explicit 1/N (their weight is tied elsewhere)
    tied_heads: list[str] = field(default_factory=list)
    # what a rule's plan_widen decided for a node (by node name), read back by the same rule's widen
    plans: dict[str, Any] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def layout_name(self, value: Any) -> str | None:
        """The analysed node ``value`` stands for (itself, unless a hook replaced it)."""
        if not isinstance(value, torch.fx.Node):
            return None
        return self.aliases.get(value.name, value.name)

    def dims_of(self, value: Any) -> list[DimLayout | None] | None:
        """The analysed layout of a node's value, per dim (None: not a node, or not analysed)."""
        name = self.layout_name(value)
        return self.layout.nodes.get(name) if name is not None else None

    def is_widened(self, dim: DimLayout) -> bool:
        """Whether any position of ``dim`` belongs to a widened group."""
        return bool(np.isin(dim.group, list(self.widened)).any())

    def all_widened(self, dim: DimLayout) -> bool:
        return bool(np.isin(dim.group, list(self.widened)).all())

    def teacher_maps(self, dim: DimLayout) -> tuple[int, list[np.ndarray]]:
        """The big size of ``dim`` and, per teacher, the big positions of its positions."""
        return teacher_maps(dim, self.n, self.widths, self.widened)

    def teacher_blocks(self, dim: DimLayout) -> torch.Tensor:
        """``(N, width)``: row t lists teacher t's big positions along ``dim``."""
        _, maps = self.teacher_maps(dim)
        return torch.as_tensor(np.stack(maps), dtype=torch.long)

    def unique_name(self, prefix: str) -> str:
        count = self._counts.get(prefix, 0)
        self._counts[prefix] = count + 1
        return f"graphmerge_{prefix}_{count}"

    def constant(self, prefix: str, tensor: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
        """A non-persistent buffer of the big student holding ``tensor``, read right before ``before``."""
        name = self.unique_name(prefix)
        self.big.register_buffer(name, tensor, persistent=False)
        with self.big.graph.inserting_before(before):
            return self.big.graph.get_attr(name)

    def alias(self, new: torch.fx.Node, old_name: str) -> None:
        """``new`` stands for the analysed node ``old_name``: later rewrites look its layout up by that."""
        self.aliases[new.name] = self.aliases.get(old_name, old_name)

    def replace(self, node: torch.fx.Node, new: torch.fx.Node, *, erase: bool = True) -> None:
        """Every use of ``node`` reads ``new`` instead, which keeps ``node``'s layout."""
        node.replace_all_uses_with(new)
        self.alias(new, node.name)
        if erase:
            self.big.graph.erase_node(node)

    def stack(self, param: str, dim: DimLayout) -> None:
        """Build ``param`` as the N teachers' copies stacked (``(N, *shape)``); ``dim`` is a dim whose
        channels those copies are applied to (each teacher's copy to its own block)."""
        self.stacked.setdefault(param, []).append(dim)
