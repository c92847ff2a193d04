"""The op registry: everything the passes know about an ATen op, one entry per op.

The front end (``graphmerge.passes.capture``) hands every pass a graph of ATen ops: one spelling per
op, where torch.fx's module, function and method levels had three. Each op has one ``OpRule``:

- ``couple(prop, node)`` — how channels flow through it: read the inputs' channel labels, add
  equalities, pins, roles and gate sites, return the output's labels (``graphmerge.passes.couple``);
- ``rewrite(node, sizes)`` — the literal sizes and arguments widen (and compress to a width ratio)
  rewrite for the new channel widths (view shapes, split sizes, slice bounds, group counts);
- ``linear`` — whether the op commutes with averaging the teachers (the layer that writes a graph
  output averages them; a non-linear op after it breaks invariant I1, and the analysis says so).

An op without a rule pins every channel it touches, naming the op and its source line. A rule
that raises is a bug in the rule and propagates (tests run every rule on the model zoo).

Users teach graphmerge an op of their own with ``register_rule(op, rule)``: ``op`` is an ATen
``OpOverload`` or ``OpOverloadPacket`` (``torch.ops.mylib.myop``), ``rule`` an ``OpRule``. Rules for
a packet cover all its overloads; a rule for one overload wins over its packet's.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.couple import DimLayout, Propagation
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels, factor_block
from graphmerge.passes.util import getattr_path
from torch import nn

aten = torch.ops.aten
INT_MAX = 2**63 - 1


# -- reading nodes -------------------------------------------------------------------------------

def node_shape(node: Any) -> tuple[int, ...] | None:
    from graphmerge.passes.capture import node_shape as shape_of

    if isinstance(node, _ShapeOnly):
        return node.shape
    return shape_of(node)


def node_shapes(node: torch.fx.Node) -> list[tuple[int, ...] | None]:
    """Shapes of a node that returns several values (split, max with indices); [] for one tensor."""
    from graphmerge.passes.capture import node_shapes as shapes_of

    return list(shapes_of(node)) if isinstance(node.meta.get("val"), (list, tuple)) else []


def target_op(prop: Propagation | None, node: torch.fx.Node, gm: nn.Module | None = None) -> Any:
    """The ATen op a node runs: its target, or the ``aten_op`` of a capture-made mode module."""
    if node.op == "call_module":
        root = gm if gm is not None else prop.gm
        module = root.get_submodule(str(node.target))
        return getattr(module, "aten_op", None)
    return node.target


def op_args(node: torch.fx.Node, op: Any = None) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (``input``, ``weight``, ``dim``...)."""
    op = op if op is not None else node.target
    schema = getattr(op, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    for i, argument in enumerate(schema.arguments):
        if i < len(node.args):
            out[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            out[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            out[argument.name] = argument.default_value
        else:
            out[argument.name] = None
    for key, value in node.kwargs.items():
        out.setdefault(key, value)
    return out


def set_arg(node: torch.fx.Node, name: str, value: Any, op: Any = None) -> None:
    """Replace argument ``name`` of ``node`` (positional or keyword)."""
    op = op if op is not None else node.target
    names = [a.name for a in op._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def describe(node: torch.fx.Node) -> str:
    from graphmerge.passes.capture import source_line

    target = node.target
    if node.op == "call_module":
        what = f"module '{target}'"
    elif isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        what = str(target)
    elif callable(target):
        what = f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}".lstrip(".")
    else:
        what = str(target)
    where = source_line(node) if node.meta.get("stack_trace") else None
    return f"{what} (node {node.name})" + (f" at {where}" if where else "")


def labels_of(prop: Propagation, value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return prop.labels.get(value)
    if isinstance(value, (list, tuple)):
        return type(value)(labels_of(prop, v) for v in value)
    if isinstance(value, dict):
        return {k: labels_of(prop, v) for k, v in value.items()}
    return None


def flatten(value: Any):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from flatten(item)
    else:
        yield value


def tensor_args(prop: Propagation, node: torch.fx.Node) -> list[TensorLabels]:
    found = []
    for value in (*node.args, *node.kwargs.values()):
        found.extend(x for x in flatten(labels_of(prop, value)) if isinstance(x, TensorLabels))
    return found


def unlabelled(node: torch.fx.Node) -> Any:
    shape = node_shape(node)
    if shape is not None:
        return TensorLabels.unlabelled(shape)
    shapes = node_shapes(node)
    if shapes:
        return tuple(None if s is None else TensorLabels.unlabelled(s) for s in shapes)
    return None


def channels(prop: Propagation, ids: np.ndarray | None, size: int, reason: str) -> np.ndarray:
    """Ids that must be channels (a conv's input); non-channel positions become pinned ids."""
    if ids is None:
        ids = np.full(size, NOT_A_CHANNEL, np.int64)
    missing = ids < 0
    if missing.any():
        ids = ids.copy()
        fresh = prop.fresh(int(missing.sum()))
        prop.mark_not_channel(fresh, reason)
        ids[missing] = fresh
    return ids


def param_name(value: Any) -> str | None:
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return str(value.target)
    return None


def pin_mixing(prop: Propagation, ids: np.ndarray, reason: str) -> None:
    """Pin ids an op sums or indexes over. Positions of a graph input (token positions that a
    positional table or the input itself labels) are shared by every teacher: not an inner pin."""
    prop.pin(ids, f"graph input positions: {reason}" if prop.from_input(ids) else reason)


def pin_all(prop: Propagation, node: torch.fx.Node, reason: str) -> Any:
    """Pin everything the op touches (its tensor inputs, parameters among them); unlabelled output."""
    for labels in tensor_args(prop, node):
        prop.pin(labels.all_ids(), reason)
    return unlabelled(node)


class _ShapeOnly:
    """A stand-in node carrying only an output shape, for rules applied to part of an op."""

    def __init__(self, node: torch.fx.Node, shape: tuple[int, ...]):
        self.name = node.name
        self.op = node.op
        self.target = node.target
        self.shape = tuple(shape)
        self.meta = {"stack_trace": node.meta.get("stack_trace")}


# -- the rule type -------------------------------------------------------------------------------

@dataclass
class SizeContext:
    """What a rewrite needs: the layouts of the node and its input, and the new-size functions.

    ``size(dim_layout)`` is the new size of a labelled dim; ``prefix(dim_layout, stop)`` the new
    size of its first ``stop`` positions (for slice bounds and split sizes).
    """

    node_dims: list[DimLayout | None] | None
    input_dims: list[DimLayout | None] | None
    size: Callable[[DimLayout], int]
    widened: Callable[[DimLayout], bool]

    def prefix(self, dim: DimLayout, stop: int) -> int:
        if not stop:
            return 0
        start = None if dim.start is None else dim.start[:stop]
        return self.size(DimLayout(dim.group[:stop], dim.channel[:stop], start))


class OpRule:
    """All the passes know about one op. Subclass and override; the defaults pin and rewrite nothing."""

    linear: bool = False

    def couple(self, prop: Propagation, node: torch.fx.Node) -> Any:
        return pin_all(prop, node, f"{describe(node)}: its rule does not say how channels flow")

    def rewrite(self, node: torch.fx.Node, sizes: SizeContext) -> None:
        """Rewrite literal arguments for the new channel widths (widen, compress to a ratio)."""

    def is_linear(self, prop: Propagation, node: torch.fx.Node) -> bool:
        """Whether this call commutes with averaging the teachers (``linear``, by default)."""
        return self.linear


class ProductRule(OpRule):
    """mul/div and friends: elementwise; linear when only one operand carries values of the network
    (``x / 2``, ``x * scale``), non-linear when two do (``x * gate(x)``)."""

    def couple(self, prop: Propagation, node: torch.fx.Node) -> Any:
        return elementwise(prop, node)

    def is_linear(self, prop: Propagation, node: torch.fx.Node) -> bool:
        return sum(1 for x in tensor_args(prop, node) if (x.all_ids() >= 0).any()) < 2


class FunctionRule(OpRule):
    """A rule from plain functions: ``couple(prop, node)`` and optionally ``rewrite(node, sizes)``."""

    def __init__(self, couple: Callable[[Propagation, torch.fx.Node], Any],
                 rewrite: Callable[[torch.fx.Node, SizeContext], None] | None = None, *, linear: bool = False):
        self._couple = couple
        self._rewrite = rewrite
        self.linear = linear

    def couple(self, prop: Propagation, node: torch.fx.Node) -> Any:
        return self._couple(prop, node)

    def rewrite(self, node: torch.fx.Node, sizes: SizeContext) -> None:
        if self._rewrite is not None:
            self._rewrite(node, sizes)

    def __repr__(self) -> str:
        return f"FunctionRule({getattr(self._couple, '__name__', self._couple)})"


class RegistrationError(GraphMergeError):
    """A mistake in the built-in rule table (an op that is not ATen, or one registered twice)."""


RULES: dict[Any, OpRule] = {}


def register_rule(op: Any, rule: OpRule | Callable[[Propagation, torch.fx.Node], Any], *,
                  linear: bool = False) -> None:
    """Teach graphmerge an op: ``rule`` is an ``OpRule``, or a ``couple`` function (wrapped)."""
    if not isinstance(rule, OpRule):
        rule = FunctionRule(rule, linear=linear)
    RULES[op] = rule


def rule_for(op: Any) -> OpRule | None:
    if op is None:
        return None
    rule = RULES.get(op)
    if rule is None and isinstance(op, torch._ops.OpOverload):
        rule = RULES.get(op.overloadpacket)
    return rule


# -- graph boundary and state ---------------------------------------------------------------------

def placeholder(prop: Propagation, node: torch.fx.Node) -> Any:
    shape = node_shape(node) if "val" in node.meta else None
    if shape is None:
        return None
    dims = [np.full(shape[0], NOT_A_CHANNEL, np.int64)] if shape else []
    for d, size in enumerate(shape[1:], start=1):
        ids = prop.input_ids(size)
        prop.pin(ids, f"graph input '{node.name}' dim {d}")
        dims.append(ids)
    return TensorLabels.from_dims(shape, dims)


def output(prop: Propagation, node: torch.fx.Node) -> Any:
    for labels in flatten(labels_of(prop, node.args[0])):
        if isinstance(labels, TensorLabels):
            prop.pin(labels.all_ids(), "graph output")
    return None


def get_attr(prop: Propagation, node: torch.fx.Node) -> Any:
    value = getattr_path(prop.gm, str(node.target))
    if not isinstance(value, torch.Tensor):
        return None
    name = str(node.target)
    if _is_constant(prop, name, value):
        return TensorLabels.unlabelled(tuple(value.shape))
    if name in prop.params:  # the same tensor read again: the same labels
        return TensorLabels.from_dims(tuple(value.shape), [d if d is not None else np.full(s, -1, np.int64)
                                                           for d, s in zip(prop.params[name].dims, value.shape,
                                                                           strict=True)])
    dims = prop.param_labels(name, value, runs=False)
    prop.use_param(name, dims, out_dim=None)
    prop.fresh_param_dims[name] = list(prop.params[name].dims)
    prop.role(node, "member", np.concatenate(dims) if dims else None)
    return TensorLabels.from_dims(tuple(value.shape), dims)


def _is_constant(prop: Propagation, name: str, value: torch.Tensor) -> bool:
    """Tensors that are the same in every teacher carry no channels: integer tables (relative
    position indices), non-persistent buffers (rotary frequencies, masks) and tensors the model
    creates in forward. Parameters and persistent float buffers (BatchNorm statistics) do."""
    if not value.is_floating_point() and not value.is_complex():
        return True
    if name.startswith("lifted_tensor"):
        return True
    return _non_persistent_buffer(prop, name) is not None


def _non_persistent_buffer(prop: Propagation, name: str) -> torch.Tensor | None:
    """The non-persistent buffer called ``name`` (built by the model's class, not loaded), else None."""
    owner, _, attr = name.rpartition(".")
    try:
        module = prop.gm.get_submodule(owner) if owner else prop.gm
    except AttributeError:
        return None
    if attr not in getattr(module, "_non_persistent_buffers_set", set()):
        return None
    return module._buffers.get(attr)


def tie_param(prop: Propagation, node: torch.fx.Node, value: Any, dims: list[np.ndarray | None], *,
              out_dim: int | None = None, in_dims: tuple[int, ...] = ()) -> bool:
    """The parameter read by ``value`` (a get_attr node) has these channel ids per dim.

    Returns False when ``value`` is not a parameter (a computed tensor): the caller decides.
    """
    name = param_name(value)
    if name is None:
        labels = labels_of(prop, value)
        if isinstance(labels, TensorLabels):
            for have, want in zip(labels.dims(), dims, strict=False):
                if have is not None and want is not None and len(have) == len(want):
                    prop.unify(have, want, describe(node))
        return False
    seen = prop.params.get(name)
    if seen is not None:
        # dims the op says carry no channel (kernel taps, an embedding's rows): the ids get_attr
        # gave them are not channels of anything, so they make no group
        dims = list(dims)
        for d, want in enumerate(dims):
            have = seen.dims[d] if d < len(seen.dims) else None
            fresh = prop.fresh_param_dims.get(name)
            untouched = fresh is not None and d < len(fresh) and have is fresh[d]
            if want is not None and have is not None and not (want >= 0).any() and untouched and (have >= 0).all():
                prop.discard(have)
                seen.dims[d] = np.asarray(want, np.int64)
                dims[d] = None
            elif want is not None and have is not None and have.shape == want.shape and (have < 0).all() \
                    and (want >= 0).all():
                seen.dims[d] = np.asarray(want, np.int64)  # a size-1 dim get_attr left unlabelled
                dims[d] = None
        dims = [seen.dims[d] if w is None else w for d, w in enumerate(dims)]
    prop.use_param(name, dims, out_dim=out_dim, in_dims=in_dims)
    use = prop.params[name]
    if use.out_dim is None:
        use.out_dim = out_dim
    if not use.in_dims:
        use.in_dims = in_dims
    return True


# -- shape-preserving and elementwise ops ---------------------------------------------------------

def identity(prop: Propagation, node: torch.fx.Node) -> Any:
    """Unary ops that keep the shape and never mix channels (activations, casts, dropout).

    A tensor operand beside the input (``clamp(x, min=t)``, ``pow(x, t)``) is read per position,
    so such a call follows the elementwise rule.
    """
    inputs = tensor_args(prop, node)
    if len(inputs) > 1:
        return elementwise(prop, node)
    first = labels_of(prop, node.args[0]) if node.args else None
    shape = node_shape(node)
    if isinstance(first, TensorLabels) and shape == first.shape:
        return first
    if isinstance(first, TensorLabels) and shape is not None:
        return broadcast(prop, node, [first])
    return unlabelled(node)


def elementwise(prop: Propagation, node: torch.fx.Node) -> Any:
    """add/sub/mul/div/where/...: aligned dims after broadcasting hold the same channels."""
    inputs = tensor_args(prop, node)
    if not inputs or node_shape(node) is None:
        return unlabelled(node)
    constants = [arg for arg in node.args if _constant_buffer(prop, arg) is not None]
    others = [labels for arg in node.args if arg not in constants
              for labels in [labels_of(prop, arg)] if isinstance(labels, TensorLabels)]
    result = broadcast(prop, node, others or inputs)
    for arg in constants if others else []:
        result = _adopt_channels(prop, node, arg, result)
    _per_teacher_operands(prop, node, result)
    return result


def _constant_buffer(prop: Propagation, value: Any) -> str | None:
    """The name of a non-persistent floating buffer read by ``value`` (a table the model builds at
    init, the same in every teacher: ALiBi's per-head slopes, a per-channel constant), else None."""
    name = param_name(value)
    if name is None or name in prop.params:
        return None
    tensor = _non_persistent_buffer(prop, name)
    return name if tensor is not None and tensor.is_floating_point() else None


def _adopt_channels(prop: Propagation, node: torch.fx.Node, value: torch.fx.Node,
                    result: TensorLabels) -> TensorLabels:
    """A constant buffer broadcast against channels takes their labels on the dims it spans, so
    widen lays it out like them (one copy per teacher); compress leaves it to the student's class.
    Returns the result's labels (its heads made channels where the buffer has a heads axis)."""
    labels = labels_of(prop, value)
    lead = result.ndim - labels.ndim
    if lead < 0:
        return result
    result = _heads_for_table(prop, node, labels, lead, result)
    dims = []
    for i, size in enumerate(labels.shape):
        ids = result.dim(i + lead)
        spans = ids is not None and size == result.shape[i + lead] and (ids >= 0).any()
        dims.append(ids if spans else np.full(size, NOT_A_CHANNEL, np.int64))
    if any((d >= 0).any() for d in dims):
        prop.use_param(str(value.target), dims, out_dim=None)
    return result


def _heads_for_table(prop: Propagation, node: torch.fx.Node, table: TensorLabels, lead: int,
                     result: TensorLabels) -> TensorLabels:
    """A constant table with a heads axis (rotary sin/cos per head) meeting heads x head_dim: each
    head's rows of the table must follow the head when heads are added, so each head becomes one
    channel (as a per-head value makes it in ``broadcast``) and the table can take the heads' labels.
    head_dim is the block's axis that is the tensor's last (where attention contracts it); a table
    that does not span the other axis (one row for all heads: the usual rotary table) changes nothing."""
    last = result.ndim - 1
    for dims, ids in result.blocks:
        if len(dims) != 2 or last not in dims or not (ids >= 0).any():
            continue
        heads = next(d for d in dims if d != last)
        if heads >= lead and table.shape[heads - lead] == result.shape[heads] > 1:
            return _collapse_block(prop, node, result, heads, last) or result
    return result


def _per_teacher_operands(prop: Propagation, node: torch.fx.Node, result: TensorLabels) -> None:
    """A parameter without channels broadcast against a channel dim (``scale * x`` with a learned
    scalar ``scale``): it differs between teachers but has one value for all channels. Record it,
    so that widen can give each teacher's block its own teacher's value."""
    channel_dims = [d for d in range(result.ndim) if result.dim(d) is not None and (result.dim(d) >= 0).any()]
    for position, arg in enumerate(node.args):
        name = param_name(arg)
        if name is None or name not in prop.params or len(channel_dims) != 1:
            continue
        labels = labels_of(prop, arg)
        dim = channel_dims[0]
        lead = result.ndim - labels.ndim
        if (labels.all_ids() >= 0).any() or lead < 0 or (dim >= lead and labels.shape[dim - lead] != 1):
            continue
        prop.per_teacher_operands[(node.name, position)] = (name, dim)


def broadcast(prop: Propagation, node: Any, inputs: list[TensorLabels]) -> TensorLabels:
    """Labels of an elementwise result; joint blocks (heads x head_dim) pass through when the other
    operands carry no channel over those dims (rotary tables, masks, scalars)."""
    shape = node_shape(node)
    assert shape is not None
    aligned = [_align(x, shape) for x in inputs]
    # a per-head value (a norm over head_dim) meeting heads x head_dim: the heads become channels
    per_dim = {dims[0] for x in aligned for dims, ids in x.blocks
               if len(dims) == 1 and (ids >= 0).any() and x.shape[dims[0]] == shape[dims[0]]}
    for i, x in enumerate(aligned):
        for dims, _ in list(x.blocks):
            heads = _heads_axis(dims, per_dim, len(shape))
            if heads is not None:
                inner = next(d for d in dims if d != heads)
                aligned[i] = _collapse_block(prop, node, aligned[i], heads, inner) or aligned[i]
    joint_blocks: list[tuple[tuple[int, ...], np.ndarray]] = []
    joint_dims: set[int] = set()
    for x in aligned:
        for dims, ids in x.blocks:
            if len(dims) > 1 and all(x.shape[d] == shape[d] for d in dims):
                joint_blocks.append((dims, ids))
                joint_dims.update(dims)
    if joint_blocks:
        first_dims, first_ids = joint_blocks[0]
        for dims, ids in joint_blocks[1:]:
            if dims == first_dims and ids.shape == first_ids.shape:
                prop.unify(first_ids, ids, describe(node))
            else:
                prop.pin(first_ids, f"{describe(node)}: elementwise op on differently reshaped channel blocks")
                prop.pin(ids, f"{describe(node)}: elementwise op on differently reshaped channel blocks")
        for x in aligned:
            for dims, ids in x.blocks:
                if set(dims) & joint_dims and len(dims) == 1 and (ids >= 0).any():
                    prop.pin(ids, f"{describe(node)}: a channel dim meets a reshaped channel block")
                elif set(dims) & joint_dims and len(dims) > 1 and not set(dims) <= joint_dims:
                    prop.pin(ids, f"{describe(node)}: elementwise op on a reshaped channel block")
    out_blocks: list[tuple[tuple[int, ...], np.ndarray]] = []
    if joint_blocks:
        out_blocks.append(joint_blocks[0])
    for d, size in enumerate(shape):
        if d in joint_dims:
            continue
        candidates = []
        for x in aligned:
            dims, ids = x.block_of(d)
            if len(dims) > 1:
                if x.shape[d] == 1:
                    continue
                prop.pin(ids, f"{describe(node)}: elementwise op on a reshaped channel block")
                continue
            if x.shape[d] == size:
                candidates.append(ids)
            elif x.shape[d] == 1 and size > 1:
                prop.pin(ids, f"{describe(node)}: a single channel broadcast across a dim of size {size}")
        if size == 1 and any((c >= 0).any() for c in candidates):
            # a size-1 dim without a channel (a (T, T) mask against one head's scores) broadcasts
            # over the teachers' copies of the other operand's channel
            candidates = [c for c in candidates if (c >= 0).any()]
        if not candidates:
            out_blocks.append(((d,), np.full(size, NOT_A_CHANNEL, np.int64)))
            continue
        if any((c < 0).all() for c in candidates):
            _hint_heads_axis(prop, aligned, d)
        for other in candidates[1:]:
            prop.unify(candidates[0], other, describe(node))
        stacked = np.stack(candidates)
        out_blocks.append(((d,), np.where((stacked >= 0).all(0), candidates[0], NOT_A_CHANNEL)))
    return TensorLabels(shape, out_blocks)


def _heads_axis(dims: tuple[int, ...], per_dim: set[int], ndim: int) -> int | None:
    """The heads axis of a heads x head_dim block that meets per-head values, else None.

    A value with a channel on one of the two axes (a norm over head_dim) makes that axis the heads.
    A table with channels on both (rotary frequencies learned per head: heads x frequencies) leaves
    head_dim as the tensor's last axis, where attention contracts it: the other one holds the heads,
    and the table's head_dim positions then meet no channel (they stay the teacher's in the big
    student, where heads are added and head_dim is unchanged).
    """
    if len(dims) != 2:
        return None
    meeting = sorted(set(dims) & per_dim)
    if len(meeting) == 1:
        return meeting[0]
    if len(meeting) == 2 and ndim - 1 in dims:
        return next(d for d in dims if d != ndim - 1)
    return None


def _hint_heads_axis(prop: Propagation, aligned: list[TensorLabels], d: int) -> None:
    """Channels on ``d`` meet a table over ``d`` (rotary cos/sin over head_dim): they cannot widen
    along ``d``, but a size-1 dim in front of it (one head) can hold the teachers' copies, and the
    table then broadcasts over it. Ask for another analysis run with that heads axis. Only for the
    last dim (head_dim): a sequence axis that carries channels (after token mixing) meets the same
    table without being a head's."""
    if d != len(aligned[0].shape) - 1:
        return
    for x in aligned:
        ids = x.dim(d)
        if ids is not None and (ids >= 0).any() and any(
                x.shape[h] == 1 and x.dim(h) is not None and not (x.dim(h) >= 0).any() for h in range(d)):
            prop.head_hints.update(int(i) for i in ids[ids >= 0])


def _align(x: TensorLabels, shape: tuple[int, ...]) -> TensorLabels:
    """``x`` with leading size-1 dims added so it has ``len(shape)`` dims (broadcasting)."""
    lead = len(shape) - x.ndim
    if lead <= 0:
        return x
    blocks = [((d,), np.full(1, NOT_A_CHANNEL, np.int64)) for d in range(lead)]
    blocks += [(tuple(d + lead for d in dims), ids) for dims, ids in x.blocks]
    return TensorLabels((1,) * lead + x.shape, blocks)


def _shaped_input(prop: Propagation, node: torch.fx.Node
                  ) -> tuple[TensorLabels | None, tuple[int, ...] | None, dict[str, Any]]:
    """The labels of a shape op's tensor argument (None unless labelled), the result's shape, and
    the op's arguments by name."""
    x = labels_of(prop, node.args[0])
    return (x if isinstance(x, TensorLabels) else None), node_shape(node), op_args(node)


# -- shape ops -------------------------------------------------------------------------------------

def reshape(prop: Propagation, node: torch.fx.Node) -> Any:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: regroup dims with equal products.

    Merging dims gives runs (a channel owns a run of features after flatten); splitting a channel
    dim (heads x head_dim, a channel shuffle) gives a joint block over the new dims; both are exact
    per position.
    """
    x, shape, _ = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    blocks = []
    for in_dims, out_dims in _merged_reshape_groups(x, shape, prop):
        joint = x.joint(in_dims) if in_dims else np.full((), NOT_A_CHANNEL, np.int64)
        if joint is None:
            return _reshape_whole(prop, node, x, shape)
        clash = joint == -2
        if clash.any():
            for dims, ids in x.blocks:
                if set(dims) & set(in_dims):
                    prop.pin(ids, f"{describe(node)}: reshape merges two channel dims")
            joint = np.where(clash, NOT_A_CHANNEL, joint)
        joint = joint.reshape([shape[d] for d in out_dims]) if out_dims else joint
        hinted = _hinted(prop, joint)
        if hinted and len(in_dims) == 1 and len(out_dims) > 2 and joint.shape[0] > 1:
            _cut_leading_axis(prop, node, joint)
        if out_dims:
            blocks.extend(factor_block(tuple(out_dims), joint, keep=hinted))
        elif (joint >= 0).any():
            prop.pin(joint, f"{describe(node)}: reshape drops a channel dim")
    return TensorLabels(shape, blocks)


def _cut_leading_axis(prop: Propagation, node: torch.fx.Node, joint: np.ndarray) -> None:
    """A channel dim reshaped to (pieces, heads, head_dim), a fused qkv as (3, H, D): each piece is
    a run of its own, as if split, so a one-head unit repeated over q, k and v is three pieces of
    the projection's output (teacher-major each), not one."""
    for piece in joint:
        prop.run(piece.ravel())
    if isinstance(node.args[0], torch.fx.Node):
        prop.cut_nodes.add(node.args[0].name)


def _hinted(prop: Propagation, ids: np.ndarray) -> bool:
    return bool(prop.hinted) and any(int(i) in prop.hinted for i in ids.ravel() if i >= 0)


def _heads_axes_joined(prop: Propagation, x: TensorLabels, groups: list[tuple[tuple[int, ...], tuple[int, ...]]]
                       ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Size-1 dims that stand alone join the next group when they are the heads axis of hinted
    head channels: a new one right before their split (``view(B, T, 1, head_dim)``: widen puts
    the teachers' heads there), or one of their block that a reshape merges with the next dims
    (one key/value head repeated: ``(B, 1, rep, T, D) -> (B, rep, T, D)``)."""
    if not prop.hinted:
        return groups
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    pending_out: tuple[int, ...] = ()
    pending_in: tuple[int, ...] = ()
    for in_dims, out_dims in groups:
        if not in_dims and len(out_dims) == 1:
            pending_out += out_dims
            continue
        if len(in_dims) == 1 and not out_dims and _hinted(prop, x.block_of(in_dims[0])[1]):
            pending_in += in_dims
            continue
        joint = x.joint(in_dims) if in_dims else None
        if pending_out and joint is not None and _hinted(prop, joint):
            out_dims = tuple(sorted(pending_out + out_dims))
        else:
            out.extend(((), (d,)) for d in pending_out)
        if pending_in and out_dims:
            in_dims = tuple(sorted(pending_in + in_dims))
        else:
            out.extend(((d,), ()) for d in pending_in)
        out.append((in_dims, out_dims))
        pending_out = pending_in = ()
    out.extend(((), (d,)) for d in pending_out)
    out.extend(((d,), ()) for d in pending_in)
    return out


def _merged_reshape_groups(x: TensorLabels, shape: tuple[int, ...],
                           prop: Propagation) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Reshape groups, merged where a joint block of ``x`` spans several of them.

    (B*H, T, D) -> (B, H, T, D) with a joint (B*H, D) block: the first and last groups merge,
    the T group between them stays apart (each group reshapes on its own, row-major).
    """
    groups = _heads_axes_joined(prop, x, _reshape_groups(x.shape, shape))
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {d: i for i, (ins, _) in enumerate(groups) for d in ins}
    for dims, _ in x.blocks:
        owners = [owner[d] for d in dims if d in owner]
        for other in owners[1:]:
            parent[find(other)] = find(owners[0])
    merged: dict[int, tuple[list[int], list[int]]] = {}
    for i, (ins, outs) in enumerate(groups):
        root = find(i)
        entry = merged.setdefault(root, ([], []))
        entry[0].extend(ins)
        entry[1].extend(outs)
    return [(tuple(sorted(ins)), tuple(sorted(outs))) for ins, outs in merged.values()]


def _reshape_whole(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...]) -> TensorLabels:
    joint = x.joint(tuple(range(x.ndim)))
    assert joint is not None
    joint = np.where(joint == -2, NOT_A_CHANNEL, joint).reshape(shape)
    return TensorLabels(shape, factor_block(tuple(range(len(shape))), joint))


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pair runs of source and destination dims with equal products (size-1 dims stand alone)."""
    groups = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and j < len(dst) and src[i] == dst[j] == 1:
            groups.append(((i,), (j,)))
            i, j = i + 1, j + 1
            continue
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(((i,), ()))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(((), (j,)))
            j += 1
            continue
        in_dims, out_dims = [i], [j]
        p, q = src[i], dst[j]
        i, j = i + 1, j + 1
        while p != q:
            if p < q:
                in_dims.append(i)
                p *= src[i]
                i += 1
            else:
                out_dims.append(j)
                q *= dst[j]
                j += 1
        groups.append((tuple(in_dims), tuple(out_dims)))
    return groups


def rewrite_size_list(node: torch.fx.Node, sizes: SizeContext, name: str) -> None:
    """A list of target sizes (view, reshape, expand, unflatten): widened dims get their new size.

    A size the graph computes (the batch, or batch x heads in a merged dim) becomes -1 where the
    dim is widened: the runtime works it out from the element count. At most one -1 is allowed.
    """
    args = op_args(node)
    old = args.get(name)
    dims = sizes.node_dims
    if not isinstance(old, (list, tuple)) or dims is None:
        return
    offset = len(dims) - len(old)  # unflatten's sizes cover only the dims it makes
    if node.target.overloadpacket is aten.unflatten:
        offset = _unflatten_offset(node, dims, len(old))
    new = list(old)
    inferred = False
    for i, size in enumerate(old):
        dim = dims[offset + i] if 0 <= offset + i < len(dims) else None
        if dim is None or not sizes.widened(dim):
            continue
        if isinstance(size, int) and size != -1:
            new[i] = sizes.size(dim)
        elif isinstance(size, torch.fx.Node):
            if node.target.overloadpacket is aten.expand:
                raise_layout(node, "expands a widened dim to a size computed at run time")
            new[i] = -1
            inferred = True
    if inferred and new.count(-1) > 1:
        raise_layout(node, "two sizes of a view must be inferred")
    if new != list(old):
        set_arg(node, name, type(old)(new) if isinstance(old, tuple) else new)


def _unflatten_offset(node: torch.fx.Node, dims: list[DimLayout | None], count: int) -> int:
    dim = op_args(node)["dim"]
    return dim % (len(dims) - count + 1)


def raise_layout(node: torch.fx.Node, why: str) -> None:
    from graphmerge.passes.layout import LayoutError

    raise LayoutError(f"{describe(node)}: {why}")


def permute(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unlabelled(node)
    packet = getattr(node.target, "overloadpacket", node.target)
    args = op_args(node)
    n = x.ndim
    order = list(range(n))
    if packet in (aten.transpose, aten.swapaxes, aten.swapdims):
        a, b = node.args[1], node.args[2]
        order[a % n], order[b % n] = order[b % n], order[a % n]
    elif packet in (aten.t, aten.numpy_T):
        order = list(reversed(range(n)))
    elif packet is aten.movedim:
        src, dst = args["source"], args["destination"]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        rest = [d for d in range(n) if d not in [s % n for s in src]]
        order = [None] * n
        for s, d in zip(src, dst, strict=True):
            order[d % n] = s % n
        it = iter(rest)
        order = [o if o is not None else next(it) for o in order]
    else:
        order = [int(d) % n for d in args["dims"]]
    return x.permuted(order)


def expand(prop: Propagation, node: torch.fx.Node) -> Any:
    x, shape, _ = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    x = _align(x, shape)
    blocks = []
    for dims, ids in x.blocks:
        grown = [d for d in dims if x.shape[d] != shape[d]]
        if not grown:
            blocks.append((dims, ids))
            continue
        if (ids >= 0).any():
            prop.pin(ids, f"{describe(node)}: expands a single channel across a dim")
        blocks.extend(((d,), np.full(shape[d], NOT_A_CHANNEL, np.int64)) for d in dims)
    return TensorLabels(shape, blocks)


def expand_as(prop: Propagation, node: torch.fx.Node) -> Any:
    """``a.expand_as(b)``: like ``expand``, but a size-1 dim without channels that grows takes
    ``b``'s labels there, since the result has ``b``'s shape in the big student too (F.normalize's
    ``norm.expand_as(x)`` after a per-teacher-block norm over x's channels)."""
    result = expand(prop, node)
    a, b = labels_of(prop, node.args[0]), labels_of(prop, node.args[1])
    if not isinstance(result, TensorLabels) or not isinstance(a, TensorLabels) or not isinstance(b, TensorLabels) \
            or b.shape != result.shape:
        return result
    a = _align(a, result.shape)
    for d in range(result.ndim):
        grown = a.shape[d] == 1 and result.shape[d] > 1
        if grown and a.dim(d) is not None and not (a.dim(d) >= 0).any() and b.dim(d) is not None \
                and result.dim(d) is not None:
            result = result.with_dim(d, b.dim(d))
    return result


def repeat_interleave(prop: Propagation, node: torch.fx.Node) -> Any:
    """``x.repeat_interleave(r, dim)``: position ``i`` of ``dim`` reads position ``i // r``.

    Repeating every position in place commutes with laying teachers side by side (teacher-major
    blocks stay blocks), so the big student runs the same call: k/v heads repeated for their query
    heads (grouped-query attention) need no rewrite. Without ``dim`` (the flattened input) or with
    a tensor of counts per position it pins.
    """
    x, shape, args = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    repeats, dim = args.get("repeats"), args.get("dim")
    if not isinstance(repeats, int):
        return pin_all(prop, node, f"{describe(node)}: repeats given per position (a tensor of counts)")
    if dim is None:
        return pin_all(prop, node, f"{describe(node)}: repeat_interleave without dim (of the flattened input)")
    dim %= x.ndim
    blocks = []
    for dims, ids in x.blocks:
        if dim in dims:
            ids = np.repeat(ids, repeats, axis=dims.index(dim))
        blocks.append((dims, ids))
    return TensorLabels(tuple(shape), blocks)


def rewrite_repeat_interleave(node: torch.fx.Node, sizes: SizeContext) -> None:
    """``output_size`` is only a hint of the result's size; the big student's is larger."""
    if op_args(node).get("output_size") is not None:
        set_arg(node, "output_size", None)


def cat(prop: Propagation, node: torch.fx.Node) -> Any:
    args = op_args(node)
    pairs = [(value, labels_of(prop, value)) for value in args["tensors"]]
    pairs = [(v, t) for v, t in pairs if not (isinstance(t, TensorLabels) and t.shape == (0,))]
    shape = node_shape(node)
    if shape is None or not all(isinstance(t, TensorLabels) for _, t in pairs):
        return pin_all(prop, node, f"{describe(node)}: cat of values without channel labels")
    dim = args["dim"] % len(shape)
    tensors = [_constant_piece(prop, value, t, dim) for value, t in pairs]
    if any(t.dim(dim) is None for t in tensors):
        return _cat_joint(prop, node, tensors, shape, dim)
    joined = np.concatenate([t.dim(dim) for t in tensors])
    prop.run(joined)
    others = [TensorLabels(t.shape[:dim] + (1,) + t.shape[dim + 1:],
                           [b for b in t.blocks if b[0] != (dim,)] + [((dim,), np.full(1, -1, np.int64))])
              for t in tensors]
    rest = broadcast(prop, _ShapeOnly(node, shape[:dim] + (1,) + shape[dim + 1:]), others)
    return rest.with_dim(dim, joined)


def _constant_piece(prop: Propagation, value: Any, labels: TensorLabels, dim: int) -> TensorLabels:
    """A constant buffer concatenated beside channels (a zero key bias between the query and value
    biases of a fused qkv projection) has no channels of its own, yet its positions meet channels
    after the cat. They get ids of their own, recorded as the buffer's labels: the ids take the
    channels they meet, and widen lays the buffer out like them (one copy per teacher); compress
    leaves it to the student's class, which builds its own."""
    name = _constant_buffer(prop, value)
    ids = labels.dim(dim)
    if name is None or ids is None or (ids >= 0).any() or labels.all_ids().max(initial=-1) >= 0:
        return labels
    dims = [np.full(size, NOT_A_CHANNEL, np.int64) for size in labels.shape]
    dims[dim] = prop.fresh(labels.shape[dim], run=False)
    prop.use_param(name, dims, out_dim=None)
    return labels.with_dim(dim, dims[dim])


def _cat_joint(prop: Propagation, node: torch.fx.Node, tensors: list[TensorLabels], shape: tuple[int, ...],
               dim: int) -> TensorLabels:
    """cat along a dim inside a joint block (rotate-half: ``cat([-x2, x1], -1)`` over heads x head_dim)."""
    first = tensors[0].block_of(dim)[0]
    if not all(t.block_of(dim)[0] == first for t in tensors):
        for t in tensors:
            prop.pin(t.all_ids(), f"{describe(node)}: cat along a reshaped channel block")
        return TensorLabels.unlabelled(shape)
    axis = first.index(dim)
    joined = np.concatenate([t.block_of(dim)[1] for t in tensors], axis=axis)
    rest = [b for b in tensors[0].blocks if b[0] != first]
    for t in tensors[1:]:
        for (dims_a, ids_a), (dims_b, ids_b) in zip(rest, [b for b in t.blocks if b[0] != first], strict=False):
            if dims_a == dims_b and ids_a.shape == ids_b.shape:
                prop.unify(ids_a, ids_b, describe(node))
    return TensorLabels(shape, [*rest, (first, joined)])


def stack(prop: Propagation, node: torch.fx.Node) -> Any:
    args = op_args(node)
    tensors = [labels_of(prop, t) for t in args["tensors"]]
    shape = node_shape(node)
    if shape is None or not all(isinstance(t, TensorLabels) for t in tensors):
        return pin_all(prop, node, f"{describe(node)}: stack of values without channel labels")
    dim = args["dim"] % len(shape)
    inner = broadcast(prop, _ShapeOnly(node, shape[:dim] + shape[dim + 1:]), tensors)
    blocks = [(tuple(d + (d >= dim) for d in dims), ids) for dims, ids in inner.blocks]
    blocks.append(((dim,), np.full(shape[dim], NOT_A_CHANNEL, np.int64)))
    return TensorLabels(shape, blocks)


def split(prop: Propagation, node: torch.fx.Node) -> Any:
    """split/split_with_sizes/chunk/unbind: cut a dim into pieces; each piece is a run of its own."""
    x = labels_of(prop, node.args[0])
    shapes = node_shapes(node)
    if not isinstance(x, TensorLabels) or not shapes:
        return unlabelled(node)
    packet = node.target.overloadpacket
    dim = op_args(node).get("dim", 0) % x.ndim
    squeeze = packet is aten.unbind
    dims, block = x.block_of(dim)
    if len(dims) == 1 and isinstance(node.args[0], torch.fx.Node):
        prop.cut_nodes.add(node.args[0].name)
    pieces = []
    offset = 0
    for s in shapes:
        size = 1 if squeeze else s[dim]
        index = [slice(None)] * len(dims)
        index[dims.index(dim)] = slice(offset, offset + size)
        piece = block[tuple(index)]
        offset += size
        if len(dims) == 1:
            prop.run(piece)
        if squeeze:
            pieces.append(_drop_dim(prop, node, x, dim, piece, s))
        else:
            pieces.append(TensorLabels(s, [(d, piece if d == dims else a) for d, a in x.blocks]))
    return tuple(pieces)


def _drop_dim(prop: Propagation, node: torch.fx.Node, x: TensorLabels, dim: int, piece: np.ndarray,
              shape: tuple[int, ...]) -> TensorLabels:
    """The labels left after indexing one position of ``dim`` (select, unbind)."""
    dims, _ = x.block_of(dim)
    blocks = []
    for bdims, ids in x.blocks:
        renumber = tuple(d - (d > dim) for d in bdims if d != dim)
        if bdims != dims:
            blocks.append((renumber, ids))
        elif len(bdims) == 1:
            if (piece >= 0).any():
                pin_mixing(prop, piece, f"{describe(node)}: an integer index into a channel dim")
        else:
            kept = np.take(piece, 0, axis=bdims.index(dim))
            blocks.extend(factor_block(renumber, kept, keep=_hinted(prop, kept)))
    return TensorLabels(shape, blocks)


def rewrite_split(node: torch.fx.Node, sizes: SizeContext) -> None:
    """Split sizes are teacher sizes; chunk becomes split_with_sizes (an uneven chunk of the big dim
    would not cut at the teachers' pieces)."""
    if sizes.input_dims is None:
        return
    args = op_args(node)
    dim = args.get("dim", 0)
    layout_dim = sizes.input_dims[dim] if -len(sizes.input_dims) <= dim < len(sizes.input_dims) else None
    if layout_dim is None or not sizes.widened(layout_dim) or node.target.overloadpacket is aten.unbind:
        return
    shapes = node_shapes(node)
    bounds = np.cumsum([0, *[int(s[dim]) for s in shapes]])
    new = [sizes.prefix(layout_dim, int(b)) - sizes.prefix(layout_dim, int(a))
           for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], new, dim)
    node.kwargs = {}


def slice_(prop: Propagation, node: torch.fx.Node) -> Any:
    """aten.slice: a contiguous range of one dim (inside a joint block too: rotate-half)."""
    x, shape, args = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    dim = args["dim"] % x.ndim
    start, end, step = args.get("start"), args.get("end"), args.get("step") or 1
    if not all(isinstance(v, int) or v is None for v in (start, end)):
        return pin_all(prop, node, f"{describe(node)}: slice bounds computed at run time")
    dims, block = x.block_of(dim)
    index = [slice(None)] * len(dims)
    index[dims.index(dim)] = slice(start, None if end is None or end >= INT_MAX else end, step)
    piece = block[tuple(index)]
    if piece.shape[dims.index(dim)] != shape[dim]:
        return pin_all(prop, node, f"{describe(node)}: slice of an unexpected size")
    if step != 1 and (block >= 0).any():
        _strided(prop, node, dims, block, dim)
    if len(dims) == 1 and piece.size != block.size:
        prop.run(piece)
    return TensorLabels(shape, [(d, piece if d == dims else a) for d, a in x.blocks])


def _strided(prop: Propagation, node: torch.fx.Node, dims: tuple[int, ...], block: np.ndarray, dim: int) -> None:
    """A slice with a step selects positions by index: exact in the big student only along an axis it
    leaves at the teacher's size. Inside a joint block (heads x head_dim: the interleaved pairs of
    rotary embeddings) that is decided once heads are known (``Propagation.strided_slice``). A
    channel dim of its own is widened teacher-major, and a step over it would take channels from
    every teacher's block at the wrong offsets: pinned (graph input positions are shared, not pins)."""
    if len(dims) > 1:
        prop.strided_slice(block, dims.index(dim), describe(node))
    else:
        pin_mixing(prop, block, f"{describe(node)}: strided slice of a channel dim (the teachers' channels sit "
                                "side by side in the big student, and a step would mix their blocks)")


def rewrite_slice(node: torch.fx.Node, sizes: SizeContext) -> None:
    if sizes.input_dims is None:
        return
    args = op_args(node)
    dim = args["dim"]
    layout_dim = sizes.input_dims[dim] if -len(sizes.input_dims) <= dim < len(sizes.input_dims) else None
    if layout_dim is None or not sizes.widened(layout_dim):
        return
    length = len(layout_dim.group)
    start, end = args.get("start"), args.get("end")
    if start is not None:
        set_arg(node, "start", sizes.prefix(layout_dim, int(np.clip(start % length if start < 0 else start, 0,
                                                                        length))))
    if end is not None and end < INT_MAX:
        set_arg(node, "end", sizes.prefix(layout_dim, int(np.clip(end % length if end < 0 else end, 0, length))))


def select(prop: Propagation, node: torch.fx.Node) -> Any:
    x, shape, args = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    dim = args["dim"] % x.ndim
    index = args["index"]
    if not isinstance(index, int):
        return pin_all(prop, node, f"{describe(node)}: index computed at run time")
    dims, block = x.block_of(dim)
    take = [slice(None)] * len(dims)
    take[dims.index(dim)] = slice(index, index + 1) if index != -1 else slice(-1, None)
    return _drop_dim(prop, node, x, dim, block[tuple(take)], shape)


def narrow(prop: Propagation, node: torch.fx.Node) -> Any:
    x, shape, args = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    dim, start, length = args["dim"] % x.ndim, args["start"], args["length"]
    ids = x.dim(dim)
    if ids is None or not isinstance(start, int) or not isinstance(length, int):
        return pin_all(prop, node, f"{describe(node)}: narrow of a reshaped block or at a computed offset")
    piece = ids[start:start + length]
    prop.run(piece)
    return x.with_dim(dim, piece)


def rewrite_narrow(node: torch.fx.Node, sizes: SizeContext) -> None:
    if sizes.input_dims is None:
        return
    args = op_args(node)
    layout_dim = sizes.input_dims[args["dim"]]
    if layout_dim is not None and sizes.widened(layout_dim):
        start = sizes.prefix(layout_dim, args["start"])
        set_arg(node, "start", start)
        set_arg(node, "length", sizes.prefix(layout_dim, args["start"] + args["length"]) - start)


def index_tensor(prop: Propagation, node: torch.fx.Node) -> Any:
    """``x[..., idx, ...]`` with tensor indices on adjacent dims. Reading a parameter's table this
    way (a relative-position bias ``table[:, idx]``) makes the indexed axis a non-channel axis and
    keeps the others (the heads); on an activation's channel dim it gathers channels in a computed
    order, which is pinned."""
    x, shape, args = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    indices = args["indices"]
    indexed = [d for d, i in enumerate(indices) if i is not None]
    table = param_name(node.args[0]) is not None
    if len(indexed) == 1 and not table:
        constant = _constant_index(prop, indices[indexed[0]])
        if constant is not None and constant.ndim == 1:
            taken = _take_in_block(prop, node, x, indexed[0], constant, shape)
            if taken is not None:
                return taken
    for d in indexed:
        dims, ids = x.block_of(d)
        if not (ids >= 0).any():
            continue
        if table and len(dims) == 1:
            prop.mark_not_channel(ids, f"not a channel: {describe(node)} reads a table by a tensor index")
        else:
            prop.pin(ids, f"{describe(node)}: tensor index into a channel dim")
    if not indexed or indexed != list(range(indexed[0], indexed[0] + len(indexed))):
        return pin_all(prop, node, f"{describe(node)}: tensor indices on dims that are not adjacent")
    first, count = indexed[0], len(indexed)
    index_rank = len(shape) - (x.ndim - count)
    kept = [x.dim(d) for d in range(x.ndim) if d not in indexed]
    if index_rank < 0 or any(k is None for k in kept):
        return pin_all(prop, node, f"{describe(node)}: tensor index beside a reshaped channel block")
    middle = [np.full(s, NOT_A_CHANNEL, np.int64) for s in shape[first:first + index_rank]]
    return TensorLabels.from_dims(shape, kept[:first] + middle + kept[first:])


def _constant_index(prop: Propagation, value: Any) -> np.ndarray | None:
    """The values of an index the model wrote as a literal (``x[..., [-2]]``: a lifted constant read
    through ``lift_fresh_copy``/``detach``), else None."""
    while isinstance(value, torch.fx.Node) and value.op == "call_function" and value.args \
            and getattr(value.target, "overloadpacket", None) in (aten.lift_fresh_copy, aten.detach, aten.detach_,
                                                                 aten.clone, aten.alias):
        value = value.args[0]
    if not isinstance(value, torch.fx.Node) or value.op != "get_attr":
        return None
    name = str(value.target)
    if not name.rpartition(".")[2].startswith("lifted_tensor"):
        return None
    tensor = prop.gm.get_buffer(name) if name in dict(prop.gm.named_buffers()) else None
    if tensor is None or tensor.is_floating_point() or tensor.dtype == torch.bool:
        return None
    return tensor.detach().cpu().numpy().astype(np.int64)


def _take_in_block(prop: Propagation, node: torch.fx.Node, x: TensorLabels, dim: int, index: np.ndarray,
                   shape: tuple[int, ...]) -> TensorLabels | None:
    """``x`` indexed on ``dim`` by literal positions inside a joint block (Falcon's fused qkv viewed
    as (kv groups, q heads per group + 2, head_dim), read as ``qkv[:, :, :, [-2]]``): the block keeps
    the positions taken. None (the caller pins) where ``dim`` is a channel dim of its own, whose
    positions would move in the big student; the certificate checks that the axis stays unwidened."""
    dims, ids = x.block_of(dim)
    if len(dims) == 1 or len(shape) != x.ndim or shape[dim] != index.size:
        return None
    taken = np.take(ids, index, axis=dims.index(dim))
    blocks = [(d, a) for d, a in x.blocks if d != dims]
    blocks.extend(factor_block(dims, taken, keep=_hinted(prop, taken)))
    return TensorLabels(tuple(shape), blocks)


def getitem(prop: Propagation, node: torch.fx.Node) -> Any:
    container, index = node.args
    value = labels_of(prop, container)
    if isinstance(value, (list, tuple)) and isinstance(index, int) and -len(value) <= index < len(value):
        return value[index]
    return None


# -- reductions, normalisations, spatial ops ------------------------------------------------------

def reduction(prop: Propagation, node: torch.fx.Node) -> Any:
    """mean/sum/amax/var/...: over space it is free; over a channel dim it mixes channels (pins)."""
    x, shape, args = _shaped_input(prop, node)
    if x is None or shape is None:
        return unlabelled(node)
    dims = args.get("dim")
    keepdim = bool(args.get("keepdim") or False)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        prop.pin(x.all_ids(), f"{describe(node)}: reduction over all dims")
        return TensorLabels.unlabelled(shape) if shape else None
    dims = {int(d) % x.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    for d in sorted(dims):  # a norm over head_dim (cosine attention) stays inside each head
        block_dims, _ = x.block_of(d)
        others = [o for o in block_dims if o != d]
        if len(block_dims) == 2 and others[0] not in dims:
            x = _collapse_block(prop, node, x, others[0], d) or x
    channel_dims = [d for d in dims if (x.block_of(d)[1] >= 0).any()]
    packet = node.target.overloadpacket
    if len(channel_dims) == 1 and keepdim and x.dim(channel_dims[0]) is not None and packet in BLOCKWISE \
            and not node_shapes(node):
        # RMSNorm's mean(x^2, -1, keepdim): in the big student each teacher's block reduces on its own
        prop.blockwise[node.name] = channel_dims[0]
        prop.normalised_across(x.dim(channel_dims[0]), describe(node))
        return TensorLabels.from_dims(shape, [x.dim(d) if d not in dims else np.full(1, NOT_A_CHANNEL, np.int64)
                                              for d in range(x.ndim)])
    for d in dims:
        pin_mixing(prop, x.block_of(d)[1], f"{describe(node)}: reduction over a channel dim")
    result = _reduced(x, dims, keepdim, shape)
    if result is None:
        prop.pin(x.all_ids(), f"{describe(node)}: reduction over a reshaped channel block")
        result = TensorLabels.unlabelled(shape)
    if node_shapes(node):  # max.dim / min.dim: (values, indices)
        return (result, result)
    return result


BLOCKWISE = (aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp, aten.linalg_vector_norm,
             aten.norm)


def _reduced(x: TensorLabels, dims: set[int], keepdim: bool, shape: tuple[int, ...]) -> TensorLabels | None:
    """Labels after reducing ``dims``: other blocks (joint ones too) are kept, renumbered without
    keepdim; None when a reduced dim shares a joint block with a kept one."""
    blocks = []
    for bdims, ids in x.blocks:
        if set(bdims) & dims:
            if not set(bdims) <= dims:
                return None
            if keepdim:
                blocks.extend(((d,), np.full(1, NOT_A_CHANNEL, np.int64)) for d in bdims)
            continue
        new = tuple(d if keepdim else d - sum(1 for r in dims if r < d) for d in bdims)
        blocks.append((new, ids))
    result = TensorLabels(shape, blocks)
    return result if all(result.shape[d] == s for d, s in enumerate(shape)) else None


def scan(prop: Propagation, node: torch.fx.Node) -> Any:
    """cumsum/cumprod keep the shape; along a channel dim they mix channels (pinned)."""
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unlabelled(node)
    dim = op_args(node)["dim"] % x.ndim
    prop.pin(x.block_of(dim)[1], f"{describe(node)}: a running sum along a channel dim")
    return x


def softmax(prop: Propagation, node: torch.fx.Node) -> Any:
    """Softmax over a channel dim normalises across it: the big student runs it per teacher block."""
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unlabelled(node)
    dim = op_args(node)["dim"] % x.ndim
    ids = x.block_of(dim)[1]
    if (ids >= 0).any():
        if x.dim(dim) is None:
            prop.pin(ids, f"{describe(node)}: softmax across a reshaped channel block")
        else:
            prop.blockwise[node.name] = dim
            prop.normalised_across(ids, describe(node))
    return x


def spatial(prop: Propagation, node: torch.fx.Node) -> Any:
    """Pooling, upsampling, padding of trailing dims: batch and channel dims pass through."""
    x = labels_of(prop, node.args[0])
    shapes = node_shapes(node)
    shape = node_shape(node) or (shapes[0] if shapes else None)
    if not isinstance(x, TensorLabels) or shape is None or len(shape) != x.ndim:
        return pin_all(prop, node, f"{describe(node)}: changes the rank of its input")
    dims = []
    for d, size in enumerate(shape):
        ids = x.dim(d)
        if ids is None:
            return pin_all(prop, node, f"{describe(node)}: spatial op on a reshaped channel block")
        if size != x.shape[d]:
            if (ids >= 0).any():
                prop.pin(ids, f"{describe(node)}: changes the size of a channel dim")
            ids = np.full(size, NOT_A_CHANNEL, np.int64)
        dims.append(ids)
    result = TensorLabels.from_dims(shape, dims)
    return (result, result) if shapes else result


def creation(prop: Propagation, node: torch.fx.Node) -> Any:
    """new_zeros/zeros_like/...: the tensor argument lends a dtype, device or shape, no values."""
    return unlabelled(node)


def per_channel(prop: Propagation, node: torch.fx.Node) -> Any:
    """batch_norm, instance_norm, prelu: parameters and statistics indexed by the channel dim (1)."""
    op = target_op(prop, node)
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels) or x.ndim < 2 or x.dim(1) is None:
        return pin_all(prop, node, f"{describe(node)}: per-channel op on a reshaped channel block")
    ids = x.dim(1)
    args = op_args(node, op)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = args.get(name)
        if isinstance(value, torch.fx.Node):
            labels = labels_of(prop, value)
            if isinstance(labels, TensorLabels) and labels.shape == (1,):
                continue  # prelu with one shared slope
            tie_param(prop, node, value, [ids], out_dim=0)
    counter = node.kwargs.get("num_batches_tracked")
    if param_name(counter) is not None:
        prop.use_param(param_name(counter), [], out_dim=None)
    prop.role(node, "member", ids)
    return x


def group_norm(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels) or x.dim(1) is None:
        return pin_all(prop, node, f"{describe(node)}: group_norm on a reshaped channel block")
    args = op_args(node)
    ids = x.dim(1)
    for name in ("weight", "bias"):
        if isinstance(args.get(name), torch.fx.Node):
            tie_param(prop, node, args[name], [ids], out_dim=0)
    groups = args["num_groups"]
    if groups == 1:  # like LayerNorm over (C, H, W): widen gives each teacher's block its own group
        prop.normalised_across(ids, describe(node))
    else:  # whole norm groups are kept, so each keeps normalising the same channels
        prop.unit(ids, len(ids) // groups)
    prop.role(node, "member", ids)
    return x


def rewrite_group_norm(node: torch.fx.Node, sizes: SizeContext) -> None:
    dims = sizes.input_dims
    if dims is None or dims[1] is None or not sizes.widened(dims[1]):
        return
    groups = op_args(node)["num_groups"]
    per_group = len(dims[1].group) // groups
    if groups == 1 and len(set(dims[1].group.tolist())) > 1:
        raise_layout(node, "GroupNorm with one group over channels of several groups: the teachers' "
                           "blocks are not contiguous in the big student")
    set_arg(node, "num_groups", sizes.size(dims[1]) // per_group)


def layer_norm(prop: Propagation, node: torch.fx.Node) -> Any:
    """LayerNorm over trailing dims: parameters follow those dims; it normalises across them (widen
    makes it block-wise per teacher, so I1 holds; I3 holds when the kept channels are one teacher's)."""
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unlabelled(node)
    args = op_args(node)
    k = len(args["normalized_shape"])
    dims = [x.dim(d) for d in range(x.ndim - k, x.ndim)]
    if any(d is None for d in dims):
        return pin_all(prop, node, f"{describe(node)}: LayerNorm over a reshaped channel block")
    for d in dims:
        prop.normalised_across(d, describe(node))
        if k > 1:
            prop.pin(d, f"{describe(node)}: LayerNorm over several dims")
    for name in ("weight", "bias"):
        if isinstance(args.get(name), torch.fx.Node):
            tie_param(prop, node, args[name], dims, out_dim=0 if k == 1 else None)
    for d in dims:
        prop.role(node, "member", d)
    return x


# -- parameterised ops ---------------------------------------------------------------------------

def _layer_inputs(prop: Propagation, node: torch.fx.Node) -> tuple[dict[str, Any], Any, Any, Any, Any]:
    """A layer call's arguments by name, its input's labels, its shape, its weight node and labels."""
    args = op_args(node)
    weight_node = args["weight"]
    return args, labels_of(prop, args["input"]), node_shape(node), weight_node, labels_of(prop, weight_node)


def conv(prop: Propagation, node: torch.fx.Node) -> Any:
    args, x, shape, weight_node, weight = _layer_inputs(prop, node)
    if not isinstance(x, TensorLabels) or shape is None or not isinstance(weight, TensorLabels) \
            or param_name(weight_node) is None:
        return pin_all(prop, node, f"{describe(node)}: conv whose weight is computed, not a parameter")
    transposed = bool(args.get("transposed")) or "transpose" in str(node.target)
    groups = args.get("groups") or 1
    in_ch, out_ch = x.shape[1], shape[1]
    kernel = [np.full(s, NOT_A_CHANNEL, np.int64) for s in weight.shape[2:]]
    in_ids = channels(prop, x.dim(1), in_ch, f"not a channel: {describe(node)} reads values every teacher shares")
    batch = x.dim(0) if x.dim(0) is not None else np.full(shape[0], NOT_A_CHANNEL, np.int64)
    out_spatial = [np.full(s, NOT_A_CHANNEL, np.int64) for s in shape[2:]]
    if groups == 1:
        out_ids = prop.fresh(out_ch)
        if transposed:
            dims, out_dim, in_dims = [in_ids, out_ids, *kernel], 1, (0,)
        else:
            dims, out_dim, in_dims = [out_ids, in_ids, *kernel], 0, (1,)
        tie_param(prop, node, weight_node, dims, out_dim=out_dim, in_dims=in_dims)
        prop.role(node, "producer", out_ids)
        prop.role(node, "consumer", in_ids)
        prop.gate_site(node, 0, 1, param_name(weight_node))
    elif in_ch == out_ch and not transposed:
        out_ids = in_ids
        within = np.full(weight.shape[1], NOT_A_CHANNEL, np.int64)
        tie_param(prop, node, weight_node, [out_ids, within, *kernel], out_dim=0)
        prop.role(node, "member", out_ids)
        prop.unit(out_ids, in_ch // groups)
    else:
        reason = f"{describe(node)}: grouped conv with {in_ch} in, {out_ch} out, groups={groups}"
        prop.pin(in_ids, reason)
        prop.pin(weight.all_ids(), reason)
        out_ids = prop.fresh(out_ch)
        prop.pin(out_ids, reason)
    bias_node = args.get("bias")
    if isinstance(bias_node, torch.fx.Node):
        tie_param(prop, node, bias_node, [out_ids], out_dim=0)
        prop.role(node, "member", out_ids)
    return TensorLabels.from_dims(shape, [batch, out_ids, *out_spatial])


def rewrite_conv(node: torch.fx.Node, sizes: SizeContext) -> None:
    """A grouped or depthwise conv keeps its channels per conv group: the group count scales."""
    args = op_args(node)
    groups = args.get("groups") or 1
    dims = sizes.input_dims
    if groups == 1 or dims is None or dims[1] is None or not sizes.widened(dims[1]):
        return
    per_group = len(dims[1].group) // groups
    set_arg(node, "groups", sizes.size(dims[1]) // per_group)


def linear(prop: Propagation, node: torch.fx.Node) -> Any:
    args, x, shape, weight_node, weight = _layer_inputs(prop, node)
    if not isinstance(x, TensorLabels) or shape is None or not isinstance(weight, TensorLabels):
        return pin_all(prop, node, f"{describe(node)}: linear on unlabelled values")
    return _matrix_product(prop, node, x, weight_node, args.get("bias"), weight_out=0)


def addmm(prop: Propagation, node: torch.fx.Node) -> Any:
    """bias + x @ W with W stored (in, out): GPT-2's Conv1D."""
    args = op_args(node)
    x = labels_of(prop, args["mat1"])
    if not isinstance(x, TensorLabels) or param_root(args["mat2"]) is None or node_shape(node) is None \
            or args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return matmul(prop, node) if isinstance(x, TensorLabels) else pin_all(prop, node, describe(node))
    return _matrix_product(prop, node, x, args["mat2"], args["self"], weight_out=1, input_index=1)


def _matrix_product(prop: Propagation, node: torch.fx.Node, x: TensorLabels, weight_node: Any, bias_node: Any,
                    weight_out: int, input_index: int = 0) -> TensorLabels:
    """x @ W^T (weight_out=0, linear) or x @ W (weight_out=1): W's other dim reads x's last dim,
    ``x`` being argument ``input_index`` of the node (addmm's is 1: its bias comes first)."""
    weight = labels_of(prop, weight_node)
    root = param_root(weight_node)
    last = x.dim(x.ndim - 1)
    contracts_tokens = last is None or prop.is_not_channel(last) or prop.from_input(last)
    mixing = _token_mixing_dims(prop, x) if param_name(weight_node) and contracts_tokens else ()
    in_ids = channels(prop, last, x.shape[-1], f"not a channel: {describe(node)} reads values every teacher shares")
    out_ids = prop.fresh(weight.shape[weight_out])
    if mixing:  # a token-mixing layer: its output axis is tokens again, never a channel group
        prop.mark_not_channel(out_ids, f"not a channel: {describe(node)} mixes a non-channel axis per channel")
        prop.per_teacher[node.name] = (mixing, str(root), param_name(bias_node))
    dims = [out_ids, in_ids] if weight_out == 0 else [in_ids, out_ids]
    if root is None:  # a weight computed from activations: a product of two activations
        reason = f"{describe(node)}: its weight is computed from the inputs, not a parameter"
        prop.pin(in_ids, reason)
        prop.pin(out_ids, reason)
        prop.pin(weight.all_ids(), reason)
    elif tie_param(prop, node, weight_node, dims, out_dim=weight_out, in_dims=(1 - weight_out,)):
        prop.gate_site(node, input_index, x.ndim - 1, root)
    else:  # a slice of a parameter (a packed q/k/v weight cut by chunk): the labels carried the rows
        use = prop.params[root]
        use.out_dim = weight_out if use.out_dim is None else use.out_dim
        use.in_dims = use.in_dims or (1 - weight_out,)
        if _sliced_along(weight_node) == weight_out:
            prop.gate_site(node, input_index, x.ndim - 1, root)
    if isinstance(bias_node, torch.fx.Node):
        tie_param(prop, node, bias_node, [out_ids], out_dim=0)
        prop.role(node, "member", out_ids)
    prop.role(node, "producer", out_ids)
    prop.role(node, "consumer", in_ids)
    return x.with_dim(x.ndim - 1, out_ids)


def _token_mixing_dims(prop: Propagation, x: TensorLabels) -> tuple[int, ...]:
    """The dims (besides the last) of a linear layer's input that may carry channels: when the
    contracted last axis is not a channel, each of these positions is mixed on its own, so a
    widened channel there needs each teacher's weight applied to its teacher's block."""
    found = []
    for d in range(x.ndim - 1):
        ids = x.dim(d)
        if ids is not None and (ids >= 0).any() and not prop.is_not_channel(ids) and not prop.from_input(ids):
            found.append(d)
    return tuple(found)


SLICING = ("chunk", "split", "split_with_sizes", "slice", "narrow", "select", "unbind")


def param_root(value: Any) -> str | None:
    """The parameter a value is cut from (get_attr, or getitem/chunk/slice of one), else None."""
    while isinstance(value, torch.fx.Node):
        if value.op == "get_attr":
            return str(value.target)
        if value.target is operator.getitem or getattr(getattr(value.target, "overloadpacket", None),
                                                       "__name__", "") in SLICING:
            value = value.args[0]
            continue
        return None
    return None


def _sliced_along(value: torch.fx.Node) -> int | None:
    """The dim a parameter slice is cut along (0 for chunk(3) of a packed qkv weight)."""
    while isinstance(value, torch.fx.Node) and value.op != "get_attr":
        if value.target is not operator.getitem:
            return op_args(value).get("dim", 0)
        value = value.args[0]
    return None


def embedding(prop: Propagation, node: torch.fx.Node) -> Any:
    args = op_args(node)
    indices = labels_of(prop, args["indices"])
    weight = labels_of(prop, args["weight"])
    shape = node_shape(node)
    if not isinstance(weight, TensorLabels) or shape is None:
        return pin_all(prop, node, f"{describe(node)}: embedding of a computed table")
    out_ids = prop.fresh(weight.shape[1])
    rows = np.full(weight.shape[0], NOT_A_CHANNEL, np.int64)
    tie_param(prop, node, args["weight"], [rows, out_ids], out_dim=1)
    prop.role(node, "producer", out_ids)
    lead = indices.dims() if isinstance(indices, TensorLabels) else [np.full(s, -1, np.int64) for s in shape[:-1]]
    lead = [d if d is not None else np.full(s, -1, np.int64) for d, s in zip(lead, shape[:-1], strict=True)]
    return TensorLabels.from_dims(shape, [*lead, out_ids])


# -- attention and matmul: heads are channels with a run of head_dim --------------------------------

def head_reps(prop: Propagation, node: torch.fx.Node, x: TensorLabels, head_dim: int,
              inner_dim: int) -> np.ndarray | None:
    """Make every head of ``x`` one channel and return one id per head (-1: not a channel).

    ``x``'s positions over (head_dim, inner_dim) must form one joint block (a channel dim reshaped
    into heads x head_dim), or the inner dim must carry no channel. Each head's positions are
    unified, so the head becomes one channel of its group, owning a run of head_dim positions
    in the projection weights: heads are kept or dropped whole, q, k and v together.
    """
    head_dim, inner_dim = head_dim % x.ndim, inner_dim % x.ndim
    dims, ids = x.block_of(inner_dim)
    if dims == (inner_dim,) and not (ids >= 0).any():
        reps = x.dim(head_dim)
        return reps if reps is not None else None
    heads = x.dim(head_dim)
    if dims == (inner_dim,) and heads is not None and not (heads >= 0).any():
        prop.head_hints.update(int(i) for i in ids[ids >= 0])  # run again with a heads axis
    if dims == (inner_dim,) and x.shape[head_dim] == 1 and x.dim(head_dim) is not None:
        row = ids[ids >= 0]  # one head (multi-query k/v, a single-head model): all of head_dim is it
        prop.unify(np.full(row.size, row[0]), row, f"{describe(node)}: one attention head")
        return np.array([row[0]], np.int64)
    if set(dims) != {head_dim, inner_dim}:
        return None
    arr = x.joint((head_dim, inner_dim))
    reps = np.full(arr.shape[0], NOT_A_CHANNEL, np.int64)
    for h in range(arr.shape[0]):
        row = arr[h][arr[h] >= 0]
        if row.size:
            reps[h] = row[0]
            prop.unify(np.full(row.size, row[0]), row, f"{describe(node)}: one attention head")
    return reps


def _with_block(shape: tuple[int, ...], blocks: list[tuple[tuple[int, ...], np.ndarray]]) -> TensorLabels:
    covered = {d for dims, _ in blocks for d in dims}
    rest = [((d,), np.full(s, NOT_A_CHANNEL, np.int64)) for d, s in enumerate(shape) if d not in covered]
    return TensorLabels(tuple(shape), [*blocks, *rest])


def attention(prop: Propagation, node: torch.fx.Node) -> Any:
    """scaled_dot_product_attention: q, k, v of shape (..., heads, seq, head_dim).

    q·k contracts each head's head_dim, softmax runs over key positions, the output carries v's
    heads: so head h of q, k and v is one unit (one channel whose run is head_dim), and the big
    student runs N x heads, each with the teacher's scale (head_dim is unchanged). Grouped-query
    attention (``enable_gqa``: q heads h use kv head h // (Hq / Hkv)) ties each kv head with its
    q heads.
    """
    args = op_args(node)
    q, k, v = (labels_of(prop, args[n]) for n in ("query", "key", "value"))
    shape = node_shape(node)
    if not all(isinstance(t, TensorLabels) for t in (q, k, v)) or shape is None or q.ndim < 3:
        return pin_all(prop, node, f"{describe(node)}: attention on unlabelled values")
    reps = [head_reps(prop, node, t, -3, -1) for t in (q, k, v)]
    if any(r is None for r in reps):
        return pin_all(prop, node, f"{describe(node)}: q, k or v is not laid out as heads x head_dim")
    rq, rk, rv = reps
    if len(rq) % len(rk) or len(rk) != len(rv):
        return pin_all(prop, node, f"{describe(node)}: {len(rq)} query heads for {len(rk)} key heads")
    group = len(rq) // len(rk)
    prop.unify(rk, rv, f"{describe(node)}: key and value heads")
    prop.unify(rq, np.repeat(rk, group), f"{describe(node)}: query heads and their key head")
    mask = labels_of(prop, args.get("attn_mask"))
    if isinstance(mask, TensorLabels) and mask.ndim >= 3 and mask.shape[-3] == len(rq):
        head_ids = mask.dim(mask.ndim - 3)
        if _constant_buffer(prop, args.get("attn_mask")) is not None:  # a bias table built at init (ALiBi)
            dims = [np.full(s, NOT_A_CHANNEL, np.int64) for s in mask.shape]
            dims[mask.ndim - 3] = rq
            prop.use_param(str(args["attn_mask"].target), dims, out_dim=None)
        elif head_ids is not None:
            prop.unify(head_ids, rq, f"{describe(node)}: a per-head attention bias")
    out_block = v.joint((v.ndim - 3, v.ndim - 1))
    if out_block is None or (out_block < 0).all():
        heads = np.repeat(rv, group)
        return _with_block(shape, [((len(shape) - 3,), heads)])
    out_block = np.repeat(out_block, group, axis=0)
    return _with_block(shape, [((len(shape) - 3, len(shape) - 1), out_block)])


def matmul(prop: Propagation, node: torch.fx.Node) -> Any:
    """a @ b over (..., M, K) @ (..., K, N).

    A matrix dim reshaped out of heads (q, k or v as heads x head_dim) first makes each head one
    channel (``head_reps``): q @ k^T then ties head h of q with head h of k through their batch
    dim, attention weights @ v ties them with v's heads, and channels-as-tokens attention (XCA)
    works the same way. What is left: contracting a channel dim mixes teachers and is pinned;
    batch dims broadcast as in elementwise ops; M comes from a, N from b.
    """
    a, b = labels_of(prop, node.args[0]), labels_of(prop, node.args[1])
    shape = node_shape(node)
    if not isinstance(a, TensorLabels) or not isinstance(b, TensorLabels) or shape is None \
            or a.ndim < 2 or b.ndim < 2:
        return pin_all(prop, node, f"{describe(node)}: matmul of vectors or unlabelled values")
    weight = _matrix_weight(node.args[1]) if b.ndim == 2 else None
    if weight is not None:  # x @ W (W stored in x out) or x @ W.T (stored out x in, Falcon's Linear)
        return _matrix_product(prop, node, a, weight[0], None, weight_out=weight[1])
    n = len(shape)
    a, b = _align(a, shape[:-2] + a.shape[-2:]), _align(b, shape[:-2] + b.shape[-2:])
    _hint_one_head(prop, a, b, contracted=n - 1)
    _hint_one_head(prop, b, a, contracted=n - 2)
    a, b = _collapse_heads(prop, node, a), _collapse_heads(prop, node, b)
    if a is None or b is None:
        return pin_all(prop, node, f"{describe(node)}: matmul over a reshaped channel block")
    reason = f"{describe(node)}: matmul contracts a channel dim"
    ka, kb = a.dim(n - 1), b.dim(n - 2)
    if (ka >= 0).any() or (kb >= 0).any():
        pin_mixing(prop, ka, reason)
        pin_mixing(prop, kb, reason)
    dims = []
    for d in range(n - 2):
        candidates = [x.dim(d) for x in (a, b) if x.shape[d] == shape[d]]
        for other in candidates[1:]:
            prop.unify(candidates[0], other, describe(node))
        for x in (a, b):
            if x.shape[d] == 1 and shape[d] > 1 and (x.dim(d) >= 0).any():
                prop.pin(x.dim(d), f"{describe(node)}: a single channel broadcast across a dim")
        dims.append(candidates[0] if candidates else np.full(shape[d], NOT_A_CHANNEL, np.int64))
    return TensorLabels.from_dims(shape, [*dims, a.dim(n - 2), b.dim(n - 1)])


def _hint_one_head(prop: Propagation, x: TensorLabels, other: TensorLabels, contracted: int) -> None:
    """Attention with one head, or one key/value head repeated, written out. ``x`` has no channel
    on a heads axis ``d`` (a size-1 axis, or one broadcast from it) but a head's head_dim on a
    matrix dim: run the analysis again with that heads axis kept (as ``head_reps`` does for SDPA),
    so that the head becomes one channel on it.

    * q @ k^T, one key head repeated: ``other`` (q) carries heads x head_dim jointly over ``d`` and
      its contracted dim; ``x``'s head_dim is its contracted dim.
    * attn @ v: ``other`` (attn) carries head channels on ``d`` alone; ``x``'s head_dim is its
      free matrix dim.
    * q @ k^T with one head: neither side has channels on a size-1 ``d``; both contract head_dim.
    """
    n = x.ndim
    # a @ b contracts a's last dim with b's second last: x's free matrix dim has the index of the
    # other operand's contracted one
    free = 2 * n - 3 - contracted

    def channels(ids: np.ndarray | None) -> np.ndarray:
        return np.zeros(0, np.int64) if ids is None else ids[ids >= 0]

    for d in range(n - 2):
        if x.dim(d) is None or channels(x.dim(d)).size or other.shape[d] != x.shape[d]:
            continue
        other_dims, other_ids = other.block_of(d)
        if (other_ids >= 0).any():
            head_dim = contracted if tuple(sorted(other_dims)) == (d, free) else free
        elif x.shape[d] == 1 and other.dim(free) is not None and channels(other.dim(free)).size:
            head_dim = contracted
        else:
            continue
        prop.head_hints.update(channels(x.dim(head_dim)).tolist())


def _matrix_weight(value: Any) -> tuple[torch.fx.Node, int] | None:
    """A 2-D parameter read as the right operand of a matmul, and which of its dims is the output:
    (W, 1) for ``x @ W``, (W, 0) for ``x @ W.T`` (``t``, ``transpose(0, 1)``, ``permute(1, 0)``)."""
    if not isinstance(value, torch.fx.Node):
        return None
    if param_name(value) is not None:
        return value, 1
    packet = getattr(value.target, "overloadpacket", None)
    swapped = packet in (aten.t, aten.numpy_T) \
        or (packet is aten.transpose and sorted(a % 2 for a in value.args[1:3]) == [0, 1]) \
        or (packet is aten.permute and [d % 2 for d in value.args[1]] == [1, 0])
    source = value.args[0] if value.args else None
    if swapped and param_name(source) is not None and node_shape(source) is not None \
            and len(node_shape(source)) == 2:
        return source, 0
    return None


def _collapse_block(prop: Propagation, node: torch.fx.Node, x: TensorLabels, head_dim: int,
                    inner_dim: int) -> TensorLabels | None:
    """``x`` with its (head_dim, inner_dim) joint block made head channels on head_dim only."""
    reps = head_reps(prop, node, x, head_dim, inner_dim)
    if reps is None:
        return None
    blocks = [(dims, ids) for dims, ids in x.blocks if set(dims) != {head_dim, inner_dim}]
    blocks += [((head_dim,), reps), ((inner_dim,), np.full(x.shape[inner_dim], NOT_A_CHANNEL, np.int64))]
    return TensorLabels(x.shape, blocks)


def _collapse_heads(prop: Propagation, node: torch.fx.Node, x: TensorLabels) -> TensorLabels | None:
    """``x`` with every joint (batch dim, matrix dim) block turned into head channels on the batch
    dim and nothing on the matrix dim; None when a joint block is anything else."""
    n = x.ndim
    blocks = []
    for dims, ids in x.blocks:
        if len(dims) == 1:
            blocks.append((dims, ids))
            continue
        matrix = [d for d in dims if d >= n - 2]
        batch = [d for d in dims if d < n - 2]
        if len(dims) != 2 or len(matrix) != 1 or len(batch) != 1:
            return None
        reps = head_reps(prop, node, x, batch[0], matrix[0])
        if reps is None:
            return None
        blocks.append(((batch[0],), reps))
        blocks.append(((matrix[0],), np.full(x.shape[matrix[0]], NOT_A_CHANNEL, np.int64)))
    return TensorLabels(x.shape, blocks)


def einsum(prop: Propagation, node: torch.fx.Node) -> Any:
    """einsum as a product over letters: a letter's channels are unified across the operands that
    carry it; a letter summed away must carry no channel; heads x head_dim blocks become head
    channels first (attention written as einsum, MaxViT)."""
    args = op_args(node)
    equation, operands = args["equation"], list(args["tensors"])
    shape = node_shape(node)
    labels = [labels_of(prop, t) for t in operands]
    if shape is None or "..." in equation or "->" not in equation \
            or not all(isinstance(x, TensorLabels) for x in labels):
        return pin_all(prop, node, f"{describe(node)}: an einsum this rule cannot read")
    inputs, out = equation.replace(" ", "").split("->")
    letters = inputs.split(",")
    if len(letters) != len(labels) or any(len(s) != x.ndim for s, x in zip(letters, labels, strict=False)):
        return pin_all(prop, node, f"{describe(node)}: an einsum this rule cannot read")
    flat = []
    for x in labels:
        for dims, _ in list(x.blocks):
            if len(dims) == 2:  # heads x head_dim: the earlier dim holds the heads
                x = _collapse_block(prop, node, x, min(dims), max(dims)) or x
        if any(len(dims) > 1 for dims, _ in x.blocks):
            return pin_all(prop, node, f"{describe(node)}: einsum over a reshaped channel block")
        flat.append(x)
    by_letter: dict[str, list[np.ndarray]] = {}
    for subscripts, x in zip(letters, flat, strict=True):
        for d, letter in enumerate(subscripts):
            if x.shape[d] > 1 or letter not in out:
                by_letter.setdefault(letter, []).append(x.dim(d))
    reason = f"{describe(node)}: einsum sums over a channel dim"
    for letter, arrays in by_letter.items():
        sizes = {len(a) for a in arrays}
        if len(sizes) == 1:
            for other in arrays[1:]:
                prop.unify(arrays[0], other, describe(node))
        if letter not in out:
            for a in arrays:
                pin_mixing(prop, a, reason)
    dims = []
    for d, letter in enumerate(out):
        arrays = [a for a in by_letter.get(letter, []) if len(a) == shape[d]]
        dims.append(arrays[0] if arrays else np.full(shape[d], NOT_A_CHANNEL, np.int64))
    return TensorLabels.from_dims(shape, dims)


# -- the table -------------------------------------------------------------------------------------

class MatmulRule(OpRule):
    """matmul/mm/bmm: a product of two activations (attention: non-linear in the network's values),
    or, with a parameter as its right operand, a layer (linear, like ``aten.linear``)."""

    def couple(self, prop: Propagation, node: torch.fx.Node) -> Any:
        return matmul(prop, node)

    def is_linear(self, prop: Propagation, node: torch.fx.Node) -> bool:
        return len(node.args) > 1 and _matrix_weight(node.args[1]) is not None


def _rule(couple: Callable, rewrite: Callable | None = None, linear: bool = False) -> FunctionRule:
    return FunctionRule(couple, rewrite, linear=linear)


def _aten(name: str) -> Any:
    """The ATen op packet ``name``; a name that is none is a mistake in the built-in table, not a skip
    (``tanhshrink``, ``softsign`` and ``lp_pool2d`` are not ATen ops: torch.export decomposes them)."""
    op = getattr(aten, name, None)
    if op is None:
        raise RegistrationError(f"the built-in rule table names {name!r}, which is not an ATen op in torch "
                                f"{torch.__version__}; remove it from passes/registry.py.")
    return op


def _builtin(op: Any, rule: OpRule) -> None:
    """Register a built-in rule; registering one op twice is a mistake in the table (the later rule would
    silently win)."""
    if op in RULES:
        raise RegistrationError(f"the built-in rule table registers {op} twice ({RULES[op]!r}, then {rule!r}); "
                                f"keep one in passes/registry.py.")
    RULES[op] = rule


def _register_all() -> None:
    unary_linear = ["zero_", "fill_", "clone", "contiguous", "_to_copy", "to", "alias", "detach", "neg",
                    "lift_fresh_copy", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
                    "native_dropout", "type_as", "positive", "_assert_tensor_metadata"]
    unary = ["relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
             "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu",
             "elu_", "selu", "celu", "mish", "mish_", "softplus", "hardtanh", "hardtanh_", "relu6", "exp", "log",
             "log1p", "sqrt", "rsqrt", "abs", "erf", "sin", "cos", "square", "clamp", "clamp_", "clip",
             "clamp_min", "clamp_max", "reciprocal", "sign", "floor", "ceil", "round", "logical_not", "isnan",
             "isinf", "nan_to_num", "pow", "rrelu", "log_sigmoid", "exp2", "expm1",
             "bitwise_not", "hardshrink", "softshrink", "threshold", "logit"]
    binary_linear = ["add", "add_", "sub", "sub_", "rsub"]
    products = ["mul", "div", "true_divide", "multiply", "divide"]
    binary = ["where", "maximum", "minimum", "masked_fill", "masked_fill_",
              "lerp", "addcmul", "addcdiv", "eq", "ne", "gt", "ge", "lt", "le", "logical_and", "logical_or",
              "bitwise_and", "bitwise_or", "fmod", "remainder", "floor_divide", "atan2", "copysign"]
    def with_inplace(names: list[str]) -> list[str]:
        return sorted({v for n in names for v in (n, n + "_") if hasattr(aten, v)})

    unary_linear, unary = with_inplace(unary_linear), with_inplace(unary)
    binary_linear, binary = with_inplace(binary_linear), with_inplace(binary)
    for name in unary_linear:
        _builtin(_aten(name), _rule(identity, linear=True))
    for name in unary:
        _builtin(_aten(name), _rule(identity))
    for name in binary_linear:
        _builtin(_aten(name), _rule(elementwise, linear=True))
    for name in binary:
        _builtin(_aten(name), _rule(elementwise))
    for name in with_inplace(products):
        _builtin(_aten(name), ProductRule())
    sized = {"view": "size", "reshape": "shape", "_unsafe_view": "size", "unflatten": "sizes"}
    for name, arg_name in sized.items():
        rewrite = functools.partial(rewrite_size_list, name=arg_name)
        _builtin(_aten(name), _rule(reshape, rewrite, linear=True))
    for name in ("flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"):
        _builtin(_aten(name), _rule(reshape, linear=True))
    _builtin(aten.expand, _rule(expand, functools.partial(rewrite_size_list, name="size"), linear=True))
    _builtin(aten.expand_as, _rule(expand_as, linear=True))
    _builtin(aten.broadcast_to, _rule(expand, functools.partial(rewrite_size_list, name="size"), linear=True))
    _builtin(aten.repeat_interleave, _rule(repeat_interleave, rewrite_repeat_interleave, linear=True))
    for name in ("permute", "transpose", "t", "movedim", "swapaxes", "swapdims", "numpy_T"):
        _builtin(_aten(name), _rule(permute, linear=True))
    _builtin(aten.cat, _rule(cat, linear=True))
    _builtin(aten.concat, _rule(cat, linear=True))
    _builtin(aten.stack, _rule(stack, linear=True))
    for name in ("split", "split_with_sizes", "chunk", "unbind", "unsafe_split", "unsafe_chunk"):
        _builtin(_aten(name), _rule(split, rewrite_split, linear=True))
    _builtin(aten.slice, _rule(slice_, rewrite_slice, linear=True))
    _builtin(aten.select, _rule(select, linear=True))
    _builtin(aten.narrow, _rule(narrow, rewrite_narrow, linear=True))
    _builtin(aten.index, _rule(index_tensor, linear=True))
    for name in ("mean", "sum", "amax", "amin", "max", "min", "var", "std", "logsumexp", "prod", "var_mean",
                 "std_mean", "norm", "any", "all", "argmax", "argmin", "linalg_vector_norm"):
        _builtin(_aten(name), _rule(reduction, linear=name in ("mean", "sum")))
    for name in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"):
        _builtin(_aten(name), _rule(scan, linear=name == "cumsum"))
    for name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        _builtin(_aten(name), _rule(softmax))
    for name in ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "upsample_nearest1d", "upsample_nearest2d",
                 "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
                 "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
                 "replication_pad2d", "roll", "pixel_shuffle", "pixel_unshuffle"):
        _builtin(_aten(name), _rule(spatial, linear=True))
    for name in ("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                 "adaptive_max_pool3d", "max_pool2d_with_indices"):
        _builtin(_aten(name), _rule(spatial))
    for name in ("batch_norm", "instance_norm", "prelu", "_prelu_kernel"):
        _builtin(_aten(name), _rule(per_channel))
    _builtin(aten.group_norm, _rule(group_norm, rewrite_group_norm))
    _builtin(aten.layer_norm, _rule(layer_norm))
    for name in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d"):
        _builtin(_aten(name), _rule(conv, rewrite_conv, linear=True))
    _builtin(aten.linear, _rule(linear, linear=True))
    _builtin(aten.addmm, _rule(addmm, linear=True))
    _builtin(aten.embedding, _rule(embedding, linear=True))
    _builtin(aten.scaled_dot_product_attention, _rule(attention))
    _builtin(aten.einsum, _rule(einsum))
    for name in ("matmul", "bmm", "mm"):
        _builtin(_aten(name), MatmulRule())
    for name in ("new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like", "full_like",
                 "empty_like", "rand_like", "randn_like", "randint_like", "scalar_tensor", "arange"):
        _builtin(_aten(name), _rule(creation, linear=True))
    for name in ("max", "min"):  # max(a, b) is elementwise; max(x) and max(x, dim) reduce
        _builtin(getattr(aten, name).other, _rule(elementwise))
    _builtin(operator.getitem, _rule(getitem, linear=True))


_register_all()


# -- driving the analysis --------------------------------------------------------------------------

def propagate_node(prop: Propagation, node: torch.fx.Node) -> Any:
    """Apply the rule of ``node``'s op; values without a shape (sizes, flags) carry no labels."""
    if node.op == "placeholder":
        return placeholder(prop, node)
    if node.op == "output":
        return output(prop, node)
    if node.op == "get_attr":
        return get_attr(prop, node)
    if node.target is operator.getitem:
        return getitem(prop, node)
    has_value = isinstance(node.meta.get("val"), (torch.Tensor, list, tuple))
    if not has_value:
        return None  # a size (sym_size, arithmetic on sizes) or a constant
    if not tensor_args(prop, node):
        return unlabelled(node)  # a tensor made from nothing (zeros, arange): no channels
    op = target_op(prop, node)
    rule = rule_for(op)
    if rule is None:
        return pin_all(prop, node, f"unknown op {describe(node)}: no rule in graphmerge.passes.registry "
                                   "(register one with graphmerge.register_rule)")
    result = rule.couple(prop, node)
    if isinstance(result, TensorLabels) and not rule.is_linear(prop, node):
        prop.nonlinear.append((node.name, result.all_ids()))
    return result


def rewrite_node(node: torch.fx.Node, sizes: SizeContext, gm: nn.Module) -> None:
    rule = rule_for(target_op(None, node, gm)) if node.op in ("call_function", "call_module") else None
    if rule is not None:
        rule.rewrite(node, sizes)
