"""Rules for elementwise ops: activations, casts, arithmetic, comparisons, and tensors made from nothing.

Aligned dims after broadcasting hold the same channels. A parameter without channels broadcast
against a channel dim (a learned scalar) is the one elementwise fact widen needs: each teacher's block
of the big student reads its own teacher's value (``ElementwiseRule.plan_widen``/``widen``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import (
    FunctionRule,
    constant_buffer,
    describe,
    labels_of,
    node_shape,
    param_name,
    register,
    tensor_args,
    unlabelled,
)
from graphmerge.passes.rules.heads import collapse_block
from graphmerge.passes.widen_context import WidenContext

aten = torch.ops.aten


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
    constants = [arg for arg in node.args if constant_buffer(prop, arg) is not None]
    others = [labels for arg in node.args if arg not in constants
              for labels in [labels_of(prop, arg)] if isinstance(labels, TensorLabels)]
    result = broadcast(prop, node, others or inputs)
    for arg in constants if others else []:
        result = _adopt_channels(prop, node, arg, result)
    _per_teacher_operands(prop, node, result)
    return result


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
            return collapse_block(prop, node, result, heads, last) or result
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
    aligned = [align(x, shape) for x in inputs]
    # a per-head value (a norm over head_dim) meeting heads x head_dim: the heads become channels
    per_dim = {dims[0] for x in aligned for dims, ids in x.blocks
               if len(dims) == 1 and (ids >= 0).any() and x.shape[dims[0]] == shape[dims[0]]}
    for i, x in enumerate(aligned):
        for dims, _ in list(x.blocks):
            heads = _heads_axis(dims, per_dim, len(shape))
            if heads is not None:
                inner = next(d for d in dims if d != heads)
                aligned[i] = collapse_block(prop, node, aligned[i], heads, inner) or aligned[i]
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


def align(x: TensorLabels, shape: tuple[int, ...]) -> TensorLabels:
    """``x`` with leading size-1 dims added so it has ``len(shape)`` dims (broadcasting)."""
    lead = len(shape) - x.ndim
    if lead <= 0:
        return x
    blocks = [((d,), np.full(1, NOT_A_CHANNEL, np.int64)) for d in range(lead)]
    blocks += [(tuple(d + lead for d in dims), ids) for dims, ids in x.blocks]
    return TensorLabels((1,) * lead + x.shape, blocks)


# -- the rules -----------------------------------------------------------------------------------

class ElementwiseRule(FunctionRule):
    """An elementwise op's rule: ``couple`` is ``identity`` or ``elementwise``; in the big student, a
    parameter operand without channels (``prop.per_teacher_operands``) is read per teacher."""

    def plan_widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        sites = [(position, param, dim) for (name, position), (param, dim) in ctx.layout.per_teacher_operands.items()
                 if name == node.name]
        planned = []
        for position, param, dim in sites:
            dims = ctx.layout.nodes.get(node.name)
            if dims is None or dims[dim] is None or not ctx.is_widened(dims[dim]) \
                    or not _every_read_is_a_widened_site(ctx, param):
                continue
            ctx.stack(param, dims[dim])
            planned.append((position, dim, dims[dim]))
        if planned:
            ctx.plans[node.name] = planned

    def widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        """Each planned operand reads the stacked parameter through ``per_teacher_values``: teacher t's
        value at teacher t's positions of the channel dim, the teachers' mean at shared positions."""
        for position, dim, dim_layout in ctx.plans.get(node.name, []):
            size, maps = ctx.teacher_maps(dim_layout)
            owner = np.full(size, ctx.n, np.int64)
            for t in range(ctx.n):
                owner[maps[t]] = t
            for t in range(1, ctx.n):
                owner[maps[t][maps[t] == maps[0]]] = ctx.n  # shared positions: every teacher writes the same one
            owners = ctx.constant("teacher_of_position", torch.as_tensor(owner), before=node)
            with ctx.big.graph.inserting_before(node):
                values = ctx.big.graph.call_function(per_teacher_values, (node.args[position], owners, dim,
                                                                          len(node_shape(node) or ())))
            args = list(node.args)
            args[position] = values
            node.args = tuple(args)


def _every_read_is_a_widened_site(ctx: WidenContext, param: str) -> bool:
    """A parameter is stacked only when every read of it is such a site over a widened dim: any other
    read needs the teachers' one shape."""
    covered = set()
    for (name, position), (other, dim) in ctx.layout.per_teacher_operands.items():
        dims = ctx.layout.nodes.get(name)
        if other == param and dims is not None and dims[dim] is not None and ctx.is_widened(dims[dim]):
            covered.add((name, position))
    reads = [(user.name, position) for read in ctx.big.graph.nodes
             if read.op == "get_attr" and str(read.target) == param
             for user in read.users for position, arg in enumerate(user.args) if arg is read]
    return all(read in covered for read in reads)


@torch.fx.wrap
def per_teacher_values(stacked: torch.Tensor, owner: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """From ``stacked`` (N teachers' copies of a parameter without channels), a tensor that
    broadcasts like the parameter but holds, along output dim ``dim``, the value of the teacher
    that owns each position (``owner``; ``N`` is a shared position, which gets the mean)."""
    rows = torch.cat([stacked, stacked.mean(0, keepdim=True)])
    shape = (1,) * (ndim - (stacked.ndim - 1)) + tuple(stacked.shape[1:])
    values = rows.reshape(rows.shape[0], *shape).index_select(0, owner)
    return values.movedim(0, dim + 1).flatten(dim, dim + 1)


class ProductRule(ElementwiseRule):
    """mul/div and friends: elementwise; linear when only one operand carries values of the network
    (``x / 2``, ``x * scale``), non-linear when two do (``x * gate(x)``)."""

    def __init__(self) -> None:
        super().__init__(elementwise)

    def is_linear(self, prop: Propagation, node: torch.fx.Node) -> bool:
        return sum(1 for x in tensor_args(prop, node) if (x.all_ids() >= 0).any()) < 2


def register_unary(*names: str, linear: bool = False) -> None:
    """Ops on one tensor that keep its shape and never mix channels (``identity``), with their
    in-place variants."""
    register(*names, inplace=True)(ElementwiseRule(identity, linear=linear))


def register_broadcasting(*names: Any, linear: bool = False,
                          couple: Callable[[Propagation, torch.fx.Node], Any] = elementwise) -> None:
    """Ops whose operands broadcast together (``elementwise``), with their in-place variants."""
    register(*names, inplace=True)(ElementwiseRule(couple, linear=linear))


register_unary("zero_", "fill_", "clone", "contiguous", "_to_copy", "to", "alias", "detach", "neg", "lift_fresh_copy",
               "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout", "type_as",
               "positive", "_assert_tensor_metadata", linear=True)
register_unary("relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu",
               "celu", "mish", "softplus", "hardtanh", "relu6", "exp", "log", "log1p", "sqrt", "rsqrt", "abs", "erf",
               "sin", "cos", "square", "clamp", "clip", "clamp_min", "clamp_max", "reciprocal", "sign", "floor",
               "ceil", "round", "logical_not", "isnan", "isinf", "nan_to_num", "pow", "rrelu", "log_sigmoid", "exp2",
               "expm1", "bitwise_not", "hardshrink", "softshrink", "threshold", "logit")
register_broadcasting("add", "sub", "rsub", linear=True)
register_broadcasting("where", "maximum", "minimum", "masked_fill", "lerp", "addcmul", "addcdiv", "eq", "ne", "gt",
                      "ge", "lt", "le", "logical_and", "logical_or", "bitwise_and", "bitwise_or", "fmod", "remainder",
                      "floor_divide", "atan2", "copysign")
register_broadcasting(aten.max.other, aten.min.other)  # max(a, b) is elementwise; max(x) and max(x, dim) reduce
register("mul", "div", "true_divide", "multiply", "divide", inplace=True)(ProductRule)


@register("new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like", "full_like", "empty_like",
          "rand_like", "randn_like", "randint_like", "scalar_tensor", "arange", linear=True)
def creation(prop: Propagation, node: torch.fx.Node) -> Any:
    """new_zeros/zeros_like/...: the tensor argument lends a dtype, device or shape, no values."""
    return unlabelled(node)
