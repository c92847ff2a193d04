"""Rules for reductions, scans and softmax.

Over space a reduction is free; over a channel dim it mixes channels and pins, except a reduction
that keeps the dim (RMSNorm's ``mean(x**2, -1, keepdim=True)``) and softmax: those the big student
runs once per teacher's block (``BlockwiseRule``), which is exact, so the rule records the node in
``prop.reduce_per_block`` and reads it back in its widen hook.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from graphmerge.passes.layout import LayoutError
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import (
    FunctionRule,
    describe,
    node_shapes,
    on_input,
    op_args,
    pin_mixing,
    register,
)
from graphmerge.passes.rules.heads import collapse_block
from graphmerge.passes.widen_context import WidenContext

aten = torch.ops.aten


class BlockwiseRule(FunctionRule):
    """A reduction or softmax; where coupling recorded it in ``prop.reduce_per_block`` (over a channel dim),
    the big student runs it once per teacher's block (exact I1)."""

    def widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        dim = ctx.layout.reduce_per_block.get(node.name)
        if dim is None or node.op != "call_function":
            return
        source = node.args[0]
        dims = ctx.dims_of(source)
        layout_dim = dims[dim] if dims is not None else None
        if layout_dim is None or not ctx.is_widened(layout_dim):
            return
        if not ctx.all_widened(layout_dim):
            raise LayoutError(f"{node.name}: a reduction over a dim that mixes widened and shared channels")
        blocks = ctx.constant("blocks", ctx.teacher_blocks(layout_dim), before=node)
        args = op_args(node)
        args.pop("self", None)
        args.pop("input", None)
        with ctx.big.graph.inserting_before(node):
            call = ctx.big.graph.call_function(run_per_teacher_block, (source, node.target, dim, blocks), args)
        ctx.replace(node, call)


def run_per_teacher_block(x: torch.Tensor, op: Any, dim: int, blocks: torch.Tensor, /, **args: Any) -> torch.Tensor:
    """Apply a reduction (keepdim) or softmax over ``dim`` separately to each teacher's block.

    ``blocks[t]`` lists teacher t's positions along ``dim``. A reduction's result is broadcast back
    over its block, so the output has ``x``'s shape and feeds the elementwise ops that follow.
    """
    dim = dim % x.ndim
    n, width = blocks.shape
    grouped = x.index_select(dim, blocks.reshape(-1)).unflatten(dim, (n, width))
    if "keepdim" in args:
        reduced = args.pop("dim")
        reduced = [reduced] if isinstance(reduced, int) else list(reduced)
        reduced = [d % x.ndim for d in reduced]
        args["dim"] = [d + 1 if d >= dim else d for d in reduced]
        args["keepdim"] = True
        out = op(grouped, **args).expand(grouped.shape)
    else:
        args["dim"] = dim + 1
        out = op(grouped, **args)
    out = out.flatten(dim, dim + 1)
    return torch.empty_like(out).index_copy_(dim, blocks.reshape(-1), out)


PER_BLOCK_REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp,
                        aten.linalg_vector_norm, aten.norm)


@register("mean", "sum", linear=True, rule_type=BlockwiseRule)
@register("amax", "amin", "max", "min", "var", "std", "logsumexp", "prod", "var_mean", "std_mean", "norm", "any", "all",
          "argmax", "argmin", "linalg_vector_norm", rule_type=BlockwiseRule)
@on_input
def reduction(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
              args: dict[str, Any]) -> Any:
    """mean/sum/amax/var/...: over space it is free; over a channel dim it mixes channels (pins)."""
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
            x = collapse_block(prop, node, x, others[0], d) or x
    channel_dims = [d for d in dims if (x.block_of(d)[1] >= 0).any()]
    packet = node.target.overloadpacket
    if len(channel_dims) == 1 and keepdim and x.dim(channel_dims[0]) is not None and packet in PER_BLOCK_REDUCTIONS \
            and not node_shapes(node):
        # RMSNorm's mean(x^2, -1, keepdim): in the big student each teacher's block reduces on its own
        prop.reduce_per_block[node.name] = channel_dims[0]
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


@register("cumsum", linear=True)
@register("cumprod", "cummax", "cummin", "logcumsumexp")
@on_input(needs_shape=False)
def scan(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
         args: dict[str, Any]) -> Any:
    """cumsum/cumprod keep the shape; along a channel dim they mix channels (pinned)."""
    dim = args["dim"] % x.ndim
    prop.pin(x.block_of(dim)[1], f"{describe(node)}: a running sum along a channel dim")
    return x


@register("softmax", "_softmax", "log_softmax", "_log_softmax", rule_type=BlockwiseRule)
@on_input(needs_shape=False)
def softmax(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
            args: dict[str, Any]) -> Any:
    """Softmax over a channel dim normalises across it: the big student runs it per teacher block."""
    dim = args["dim"] % x.ndim
    ids = x.block_of(dim)[1]
    if (ids >= 0).any():
        if x.dim(dim) is None:
            prop.pin(ids, f"{describe(node)}: softmax across a reshaped channel block")
        else:
            prop.reduce_per_block[node.name] = dim
            prop.normalised_across(ids, describe(node))
    return x
