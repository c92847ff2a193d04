"""Rules for normalisations: per-channel (BatchNorm, InstanceNorm, PReLU), GroupNorm and LayerNorm.

A per-channel op's parameters and statistics are indexed by the channel dim. A norm across channels
(LayerNorm over a widened last dim, GroupNorm with one group) normalises each teacher's block on its
own in the big student: LayerNorm becomes a ``BlockNorm`` there (``LayerNormRule.widen``), GroupNorm
gets one group per teacher (its ``rewrite``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from graphmerge.passes.labels import TensorLabels
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import (
    FunctionRule,
    SizeContext,
    describe,
    labels_of,
    on_input,
    op_args,
    param_name,
    pin_all,
    raise_layout,
    register,
    set_arg,
    target_op,
    tie_param,
)
from graphmerge.passes.widen_context import WidenContext
from torch import nn


class LayerNormRule(FunctionRule):
    """LayerNorm; over a widened last dim the big student normalises each teacher's block on its own."""

    def widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        if node.target is not torch.ops.aten.layer_norm.default:
            return
        source = node.args[0]
        dims = ctx.dims_of(source)
        last = dims[-1] if dims else None
        if last is None or not ctx.is_widened(last):
            return
        _, maps = ctx.teacher_maps(last)
        order = torch.as_tensor(np.concatenate(maps), dtype=torch.long)
        args = op_args(node)
        name = ctx.unique_name("block_norm")
        ctx.big.add_submodule(name, BlockNorm(order, ctx.n, args["eps"]))
        with ctx.big.graph.inserting_after(node):
            replacement = ctx.big.graph.call_module(name, (source, args["weight"], args["bias"]))
        ctx.replace(node, replacement)


def block_layer_norm(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, blocks: int, eps: float,
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` taken as ``blocks`` blocks (``order`` gathers each teacher's
    positions together, ``inverse`` puts them back), then the elementwise affine."""
    grouped = x.index_select(-1, order)
    shape = grouped.shape
    grouped = grouped.reshape(*shape[:-1], blocks, shape[-1] // blocks)
    normed = F.layer_norm(grouped, (shape[-1] // blocks,), eps=eps).reshape(shape)
    out = normed.index_select(-1, inverse)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class BlockNorm(nn.Module):
    """The block-wise ``F.layer_norm`` of a big student: one LayerNorm per teacher's block."""

    def __init__(self, order: torch.Tensor, blocks: int, eps: float):
        super().__init__()
        self.blocks = blocks
        self.eps = eps
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)

    def forward(self, x: torch.Tensor, weight: Any = None, bias: Any = None) -> torch.Tensor:
        return block_layer_norm(x, self.order, self.inverse, self.blocks, self.eps, weight, bias)


@register("batch_norm", "instance_norm", "prelu", "_prelu_kernel")
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


@register("group_norm", rewrite=rewrite_group_norm)
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


@register("layer_norm", rule_type=LayerNormRule)
@on_input(needs_shape=False)
def layer_norm(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
               args: dict[str, Any]) -> Any:
    """LayerNorm over trailing dims: parameters follow those dims; it normalises across them (widen
    makes it block-wise per teacher, so I1 holds; I3 holds when the kept channels are one teacher's)."""
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
