"""Rules for layers: convolutions, linear layers (linear, addmm, a matmul by a parameter) and embeddings.

A layer writes fresh channels (its output dim) and reads its input's channels (its weight's input
dim); a gate multiplies its input. In the big student two kinds of layer are rewritten
(``ProductLayerRule``): a token-mixing linear layer (its weight has no channel dim, but its input's
other dims are widened) applies each teacher's own weight to that teacher's block, and a layer whose
weight is tied elsewhere (GPT-2's lm_head) averages the teachers with an explicit 1/N. matmul lives
here too: ``x @ W`` by a parameter is a layer, and the product of two activations (attention's
``q @ k^T``) shares its head handling.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from graphmerge.passes.layout import LayoutError
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import (
    FunctionRule,
    SizeContext,
    channels,
    describe,
    labels_of,
    node_shape,
    op_args,
    param_name,
    param_root,
    pin_all,
    pin_mixing,
    register,
    set_arg,
    tie_param,
)
from graphmerge.passes.rules.elementwise import align
from graphmerge.passes.rules.heads import collapse_heads
from graphmerge.passes.widen_context import WidenContext

aten = torch.ops.aten


class ProductLayerRule(FunctionRule):
    """A layer computing ``x @ W`` (linear, addmm, matmul by a parameter). Coupling records a
    token-mixing layer in ``prop.token_mixing``; in the big student, where its input is widened along a
    dim its weight does not have, each teacher's copy of the weight must be applied to that teacher's
    block (``plan_widen`` stacks the weight per teacher; ``widen`` rewrites the call)."""

    def plan_widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        fact = ctx.layout.token_mixing.get(node.name)
        source = node.args[0] if fact is not None and node.args else None
        source_dims = ctx.layout.nodes.get(source.name) if isinstance(source, torch.fx.Node) else None
        if source_dims is None:
            return
        dims, weight, bias = fact
        params = [p for p in (weight, bias) if p is not None]
        if any(ctx.is_widened(d) for p in params for d in ctx.layout.params.get(p, []) if d is not None):
            return  # the weight itself is widened: an ordinary layer
        candidates = [d for d in dims if source_dims[d] is not None and ctx.is_widened(source_dims[d])]
        if not candidates:
            return
        if len(candidates) > 1 or not ctx.all_widened(source_dims[candidates[0]]):
            raise LayoutError(f"{node.name}: a token-mixing layer over an input with several widened dims, or a dim "
                              "mixing widened and shared channels; it cannot be applied per teacher")
        if any(user is not node for read in ctx.big.graph.nodes if read.op == "get_attr" and str(read.target) in params
               for user in read.users):
            raise LayoutError(f"{node.name}: its weight is also read elsewhere, so it cannot be stacked per teacher")
        for param in params:
            ctx.stack(param, source_dims[candidates[0]])
        ctx.plans[node.name] = (candidates[0], source_dims[candidates[0]])

    def widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        if node.name in ctx.plans:
            dim, dim_layout = ctx.plans[node.name]
            self.per_teacher(node, ctx, dim, dim_layout)

    def per_teacher(self, node: torch.fx.Node, ctx: WidenContext, dim: int, dim_layout: Any) -> None:
        raise LayoutError(f"{describe(node)}: a token-mixing product over a widened dim; only aten.linear is "
                          "applied per teacher. Write the layer as torch.nn.functional.linear (or nn.Linear).")


class WeightedLayerRule(ProductLayerRule):
    """A layer ``x @ W (+ b)`` whose weight is a parameter (linear, addmm): ``weight_arg`` names W,
    ``weight_out`` is W's output dim, ``bias_arg`` names b."""

    overload: Any = None
    weight_arg, weight_out, bias_arg = "weight", 0, "bias"

    def widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        if node.name in ctx.plans:
            super().widen(node, ctx)
        else:
            self.average_tied_head(node, ctx)

    def without_bias(self, node: torch.fx.Node, args: dict[str, Any]) -> None:
        """Make ``node`` compute the product alone, ``x @ W``."""
        raise NotImplementedError

    def average_tied_head(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        """A layer that writes an output from widened channels averages the teachers: widen divides its
        weight by N. A weight tied to another use (GPT-2's lm_head is the token embedding) cannot be
        divided, so the layer's product is divided instead: ``x @ W / N + b``."""
        if node.target is not self.overload:
            return
        layout = ctx.layout
        args = op_args(node)
        param = param_root(args[self.weight_arg])
        dims = layout.params.get(param or "")
        out_layout = (layout.nodes.get(node.name) or [None])[-1]
        if param is None or dims is None or layout.out_dims.get(param) == self.weight_out or out_layout is None:
            return
        in_layout = dims[1 - self.weight_out]
        if ctx.is_widened(out_layout) or in_layout is None or not ctx.is_widened(in_layout):
            return
        graph = ctx.big.graph
        with graph.inserting_after(node):
            scaled = graph.call_function(aten.mul.Tensor, (node, 1.0 / ctx.n))
        ctx.replace(node, scaled, erase=False)
        scaled.args = (node, 1.0 / ctx.n)
        bias = args.get(self.bias_arg)
        if isinstance(bias, torch.fx.Node):
            self.without_bias(node, args)
            with graph.inserting_after(scaled):
                biased = graph.call_function(aten.add.Tensor, (scaled, bias))
            scaled.replace_all_uses_with(biased)
            ctx.alias(biased, node.name)
            biased.args = (scaled, bias)
        ctx.tied_heads.append(node.name)


class LinearRule(WeightedLayerRule):
    """``linear(x, W, b)``: W stored (out, in)."""

    overload = aten.linear.default

    def per_teacher(self, node: torch.fx.Node, ctx: WidenContext, dim: int, dim_layout: Any) -> None:
        """``linear(x, W, b)`` over a non-channel axis becomes each teacher's ``linear`` on its block."""
        args = op_args(node)
        blocks = ctx.constant("teacher_blocks", ctx.teacher_blocks(dim_layout), before=node)
        with ctx.big.graph.inserting_before(node):
            call = ctx.big.graph.call_function(per_teacher_linear, (args["input"], args["weight"], args.get("bias"),
                                                                    dim, blocks))
        ctx.replace(node, call)

    def without_bias(self, node: torch.fx.Node, args: dict[str, Any]) -> None:
        node.args = (args["input"], args["weight"])
        node.kwargs = {}


class AddmmRule(WeightedLayerRule):
    """``addmm(b, x, W)``: W stored (in, out), GPT-2's Conv1D."""

    overload = aten.addmm.default
    weight_arg, weight_out, bias_arg = "mat2", 1, "self"

    def without_bias(self, node: torch.fx.Node, args: dict[str, Any]) -> None:
        node.target = aten.mm.default
        node.args = (args["mat1"], args["mat2"])
        node.kwargs = {}


def per_teacher_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim: int,
                       blocks: torch.Tensor) -> torch.Tensor:
    """Teacher t's ``linear(·, weight[t], bias[t])`` on teacher t's positions ``blocks[t]`` of ``dim``."""
    dim = dim % x.ndim
    n, width = blocks.shape
    grouped = x.index_select(dim, blocks.reshape(-1)).unflatten(dim, (n, width))
    out = torch.stack([F.linear(grouped.select(dim, t), weight[t], None if bias is None else bias[t])
                       for t in range(n)], dim).flatten(dim, dim + 1)
    return torch.empty_like(out).index_copy_(dim, blocks.reshape(-1), out)


def _layer_inputs(prop: Propagation, node: torch.fx.Node) -> tuple[dict[str, Any], Any, Any, Any, Any]:
    """A layer call's arguments by name, its input's labels, its shape, its weight node and labels."""
    args = op_args(node)
    weight_node = args["weight"]
    return args, labels_of(prop, args["input"]), node_shape(node), weight_node, labels_of(prop, weight_node)


def rewrite_conv(node: torch.fx.Node, sizes: SizeContext) -> None:
    """A grouped or depthwise conv keeps its channels per conv group: the group count scales."""
    args = op_args(node)
    groups = args.get("groups") or 1
    dims = sizes.input_dims
    if groups == 1 or dims is None or dims[1] is None or not sizes.widened(dims[1]):
        return
    per_group = len(dims[1].group) // groups
    set_arg(node, "groups", sizes.size(dims[1]) // per_group)


@register("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
          rewrite=rewrite_conv, linear=True)
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


@register("linear", linear=True, rule_type=LinearRule)
def linear(prop: Propagation, node: torch.fx.Node) -> Any:
    args, x, shape, weight_node, weight = _layer_inputs(prop, node)
    if not isinstance(x, TensorLabels) or shape is None or not isinstance(weight, TensorLabels):
        return pin_all(prop, node, f"{describe(node)}: linear on unlabelled values")
    return matrix_product(prop, node, x, weight_node, args.get("bias"), weight_out=0)


@register("addmm", linear=True, rule_type=AddmmRule)
def addmm(prop: Propagation, node: torch.fx.Node) -> Any:
    """bias + x @ W with W stored (in, out): GPT-2's Conv1D."""
    args = op_args(node)
    x = labels_of(prop, args["mat1"])
    if not isinstance(x, TensorLabels) or param_root(args["mat2"]) is None or node_shape(node) is None \
            or args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return matmul(prop, node) if isinstance(x, TensorLabels) else pin_all(prop, node, describe(node))
    return matrix_product(prop, node, x, args["mat2"], args["self"], weight_out=1, input_index=1)


def matrix_product(prop: Propagation, node: torch.fx.Node, x: TensorLabels, weight_node: Any, bias_node: Any,
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
        prop.token_mixing[node.name] = (mixing, str(root), param_name(bias_node))
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


def _sliced_along(value: torch.fx.Node) -> int | None:
    """The dim a parameter slice is cut along (0 for chunk(3) of a packed qkv weight)."""
    while isinstance(value, torch.fx.Node) and value.op != "get_attr":
        if value.target is not operator.getitem:
            return op_args(value).get("dim", 0)
        value = value.args[0]
    return None


@register("embedding", linear=True)
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
        return matrix_product(prop, node, a, weight[0], None, weight_out=weight[1])
    n = len(shape)
    a, b = align(a, shape[:-2] + a.shape[-2:]), align(b, shape[:-2] + b.shape[-2:])
    _hint_one_head(prop, a, b, contracted=n - 1)
    _hint_one_head(prop, b, a, contracted=n - 2)
    a, b = collapse_heads(prop, node, a), collapse_heads(prop, node, b)
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


class MatmulRule(ProductLayerRule):
    """matmul/mm/bmm: a product of two activations (attention: non-linear in the network's values),
    or, with a parameter as its right operand, a layer (linear, like ``aten.linear``)."""

    def __init__(self) -> None:
        super().__init__(matmul)

    def is_linear(self, prop: Propagation, node: torch.fx.Node) -> bool:
        return len(node.args) > 1 and _matrix_weight(node.args[1]) is not None


register("matmul", "bmm", "mm")(MatmulRule)
