"""The state of one coupling analysis, and what op rules may say to it.

The op rules (``graphmerge.passes.registry``) read each node's input labels and call the methods
of ``Propagation``: new ids (``fresh``), equalities (``unify``), pins with their ``PinReason``,
runs, selection units, roles, gate sites, normalisations; ``graphmerge.passes.couple`` runs the
rules over the graph and solves what they recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.ir import GateSite, Pin, PinReason, display_name
from graphmerge.passes.labels import NOT_A_CHANNEL


@dataclass
class ParamUse:
    """How one parameter or buffer's dims are labelled, and which dim writes its op's output."""

    dims: list[np.ndarray | None]
    out_dim: int | None
    in_dims: tuple[int, ...] = ()
    op_dims: list[np.ndarray | None] | None = None  # the ids its op gave it, position by position


class Propagation:
    """The state of one analysis: id allocation, equalities, pins, and what each node carries."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.next_id = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.pins: list[tuple[np.ndarray, Pin]] = []
        self.runs: list[np.ndarray] = []
        self.roles: list[tuple[str, str, np.ndarray]] = []
        self.params: dict[str, ParamUse] = {}
        self.units: list[tuple[np.ndarray, int]] = []
        self.across_norm: list[tuple[np.ndarray, str]] = []
        self.gate_sites: list[GateSite] = []
        self.discarded: list[np.ndarray] = []
        self.input_ranges: list[tuple[int, int]] = []
        self.reduce_per_block: dict[str, int] = {}  # Layout.reduce_per_block
        self.token_mixing: dict[str, tuple[tuple[int, ...], str, str | None]] = {}  # Layout.token_mixing
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
            self.pin(a, f"{where}: mismatched sizes {a.size} and {b.size}", reason=PinReason.SIZE_MISMATCH)
            self.pin(b, f"{where}: mismatched sizes {a.size} and {b.size}", reason=PinReason.SIZE_MISMATCH)
            return
        both = (a >= 0) & (b >= 0)
        if both.any():
            self.edges.append((a[both], b[both]))
        lonely = (a >= 0) ^ (b >= 0)
        if lonely.any():
            self.pin(np.where(a >= 0, a, b)[lonely], f"not a channel: {where} aligns it with a spatial or batch axis",
                     reason=PinReason.NOT_A_CHANNEL)

    def pin(self, ids: np.ndarray, message: str, *, reason: PinReason = PinReason.OP_RULE) -> None:
        """These channels keep their width: ``reason`` says which kind of pin, ``message`` names the op,
        its node and source line for the report."""
        ids = np.asarray(ids, np.int64).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.pins.append((ids, Pin(reason, message)))

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
                self.pin(old if new is None else new, f"parameter {name} used twice with different roles",
                         reason=PinReason.PARAMETER_ROLES)
        if seen.out_dim is None:  # first seen through get_attr; the op using it knows its roles
            seen.out_dim = out_dim
        if not seen.in_dims:
            seen.in_dims = in_dims

    def input_ids(self, n: int) -> np.ndarray:
        """Fresh ids for a graph input's dim (token positions, image channels), remembered as such."""
        ids = self.fresh(n)
        self.input_ranges.append((int(ids[0]), int(ids[-1]) + 1) if n else (0, 0))
        return ids

    def mark_not_channel(self, ids: np.ndarray, message: str, *,
                         reason: PinReason = PinReason.NOT_A_CHANNEL) -> None:
        """Pin ids that label an axis which is not a channel (token positions a linear mixes)."""
        ids = np.asarray(ids, np.int64).ravel()
        self.pin(ids, message, reason=reason)
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


def _is_aten_node_graph(node: torch.fx.Node) -> bool:
    return "val" in node.meta
