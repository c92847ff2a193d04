"""Rules for shape and view ops: reshape, permute, expand, repeat_interleave, cat, stack, split, and
the spatial ops that resize trailing dims (pooling, upsampling, padding).

They move channels without mixing them. Merging dims gives runs (a channel owns a run of features
after flatten); splitting a channel dim (heads x head_dim, a channel shuffle) gives a joint block;
cat and split make and cut runs. Their literal sizes (view shapes, split sizes) are rewritten for the
widened widths; a fixed channel permutation (a shuffle) becomes a gather in widen.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.ir import DimLayout
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels, factor_block
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import (
    ShapeOnly,
    SizeContext,
    constant_buffer,
    describe,
    labels_of,
    node_shape,
    node_shapes,
    on_input,
    op_args,
    pin_all,
    raise_layout,
    register,
    set_arg,
    unlabelled,
)
from graphmerge.passes.rules.elementwise import align, broadcast
from graphmerge.passes.rules.heads import hinted
from graphmerge.passes.rules.indexing import drop_dim

aten = torch.ops.aten


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


@register("view", "_unsafe_view", rewrite=functools.partial(rewrite_size_list, name="size"), linear=True)
@register("reshape", rewrite=functools.partial(rewrite_size_list, name="shape"), linear=True)
@register("unflatten", rewrite=functools.partial(rewrite_size_list, name="sizes"), linear=True)
@register("flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", linear=True)
@on_input
def reshape(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
            args: dict[str, Any]) -> Any:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: regroup dims with equal products.

    Merging dims gives runs (a channel owns a run of features after flatten); splitting a channel
    dim (heads x head_dim, a channel shuffle) gives a joint block over the new dims; both are exact
    per position.
    """
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
        is_hinted = hinted(prop, joint)
        if is_hinted and len(in_dims) == 1 and len(out_dims) > 2 and joint.shape[0] > 1:
            _cut_leading_axis(prop, node, joint)
        if out_dims:
            blocks.extend(factor_block(tuple(out_dims), joint, keep=is_hinted))
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
        if len(in_dims) == 1 and not out_dims and hinted(prop, x.block_of(in_dims[0])[1]):
            pending_in += in_dims
            continue
        joint = x.joint(in_dims) if in_dims else None
        if pending_out and joint is not None and hinted(prop, joint):
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


@register("permute", "transpose", "t", "movedim", "swapaxes", "swapdims", "numpy_T", linear=True)
@on_input(needs_shape=False)
def permute(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
            args: dict[str, Any]) -> Any:
    packet = getattr(node.target, "overloadpacket", node.target)
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


@register("expand", "broadcast_to", rewrite=functools.partial(rewrite_size_list, name="size"), linear=True)
@on_input
def expand(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
           args: dict[str, Any]) -> Any:
    x = align(x, shape)
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


@register("expand_as", linear=True)
def expand_as(prop: Propagation, node: torch.fx.Node) -> Any:
    """``a.expand_as(b)``: like ``expand``, but a size-1 dim without channels that grows takes
    ``b``'s labels there, since the result has ``b``'s shape in the big student too (F.normalize's
    ``norm.expand_as(x)`` after a per-teacher-block norm over x's channels)."""
    result = expand(prop, node)
    a, b = labels_of(prop, node.args[0]), labels_of(prop, node.args[1])
    if not isinstance(result, TensorLabels) or not isinstance(a, TensorLabels) or not isinstance(b, TensorLabels) \
            or b.shape != result.shape:
        return result
    a = align(a, result.shape)
    for d in range(result.ndim):
        grown = a.shape[d] == 1 and result.shape[d] > 1
        if grown and a.dim(d) is not None and not (a.dim(d) >= 0).any() and b.dim(d) is not None \
                and result.dim(d) is not None:
            result = result.with_dim(d, b.dim(d))
    return result


def rewrite_repeat_interleave(node: torch.fx.Node, sizes: SizeContext) -> None:
    """``output_size`` is only a hint of the result's size; the big student's is larger."""
    if op_args(node).get("output_size") is not None:
        set_arg(node, "output_size", None)


@register("repeat_interleave", rewrite=rewrite_repeat_interleave, linear=True)
@on_input
def repeat_interleave(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
                      args: dict[str, Any]) -> Any:
    """``x.repeat_interleave(r, dim)``: position ``i`` of ``dim`` reads position ``i // r``.

    Repeating every position in place commutes with laying teachers side by side (teacher-major
    blocks stay blocks), so the big student runs the same call: k/v heads repeated for their query
    heads (grouped-query attention) need no rewrite. Without ``dim`` (the flattened input) or with
    a tensor of counts per position it pins.
    """
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


@register("cat", "concat", linear=True)
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
    rest = broadcast(prop, ShapeOnly(node, shape[:dim] + (1,) + shape[dim + 1:]), others)
    return rest.with_dim(dim, joined)


def _constant_piece(prop: Propagation, value: Any, labels: TensorLabels, dim: int) -> TensorLabels:
    """A constant buffer concatenated beside channels (a zero key bias between the query and value
    biases of a fused qkv projection) has no channels of its own, yet its positions meet channels
    after the cat. They get ids of their own, recorded as the buffer's labels: the ids take the
    channels they meet, and widen lays the buffer out like them (one copy per teacher); compress
    leaves it to the student's class, which builds its own."""
    name = constant_buffer(prop, value)
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


@register("stack", linear=True)
def stack(prop: Propagation, node: torch.fx.Node) -> Any:
    args = op_args(node)
    tensors = [labels_of(prop, t) for t in args["tensors"]]
    shape = node_shape(node)
    if shape is None or not all(isinstance(t, TensorLabels) for t in tensors):
        return pin_all(prop, node, f"{describe(node)}: stack of values without channel labels")
    dim = args["dim"] % len(shape)
    inner = broadcast(prop, ShapeOnly(node, shape[:dim] + shape[dim + 1:]), tensors)
    blocks = [(tuple(d + (d >= dim) for d in dims), ids) for dims, ids in inner.blocks]
    blocks.append(((dim,), np.full(shape[dim], NOT_A_CHANNEL, np.int64)))
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


@register("split", "split_with_sizes", "chunk", "unbind", "unsafe_split", "unsafe_chunk", rewrite=rewrite_split,
          linear=True)
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
            pieces.append(drop_dim(prop, node, x, dim, piece, s))
        else:
            pieces.append(TensorLabels(s, [(d, piece if d == dims else a) for d, a in x.blocks]))
    return tuple(pieces)


@register("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
          "_adaptive_avg_pool2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
          "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "constant_pad_nd", "pad",
          "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d", "roll", "pixel_shuffle",
          "pixel_unshuffle", linear=True)
@register("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
          "max_pool2d_with_indices")
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
