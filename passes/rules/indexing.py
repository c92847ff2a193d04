"""Rules for indexing: slice, select, narrow and tensor indices.

A contiguous range of a channel dim is a run of its own (its bounds are rewritten for the widened
widths); an integer or tensor index into a channel dim, or a strided slice of one, would take
channels from every teacher's block at the wrong offsets and pins.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels, factor_block
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import (
    INT_MAX,
    SizeContext,
    describe,
    on_input,
    op_args,
    param_name,
    pin_all,
    pin_mixing,
    register,
    set_arg,
)
from graphmerge.passes.rules.heads import hinted

aten = torch.ops.aten


def drop_dim(prop: Propagation, node: torch.fx.Node, x: TensorLabels, dim: int, piece: np.ndarray,
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
            blocks.extend(factor_block(renumber, kept, keep=hinted(prop, kept)))
    return TensorLabels(shape, blocks)


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


@register("slice", rewrite=rewrite_slice, linear=True)
@on_input
def slice_(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
           args: dict[str, Any]) -> Any:
    """aten.slice: a contiguous range of one dim (inside a joint block too: rotate-half)."""
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


@register("select", linear=True)
@on_input
def select(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
           args: dict[str, Any]) -> Any:
    dim = args["dim"] % x.ndim
    index = args["index"]
    if not isinstance(index, int):
        return pin_all(prop, node, f"{describe(node)}: index computed at run time")
    dims, block = x.block_of(dim)
    take = [slice(None)] * len(dims)
    take[dims.index(dim)] = slice(index, index + 1) if index != -1 else slice(-1, None)
    return drop_dim(prop, node, x, dim, block[tuple(take)], shape)


def rewrite_narrow(node: torch.fx.Node, sizes: SizeContext) -> None:
    if sizes.input_dims is None:
        return
    args = op_args(node)
    layout_dim = sizes.input_dims[args["dim"]]
    if layout_dim is not None and sizes.widened(layout_dim):
        start = sizes.prefix(layout_dim, args["start"])
        set_arg(node, "start", start)
        set_arg(node, "length", sizes.prefix(layout_dim, args["start"] + args["length"]) - start)


@register("narrow", rewrite=rewrite_narrow, linear=True)
@on_input
def narrow(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
           args: dict[str, Any]) -> Any:
    dim, start, length = args["dim"] % x.ndim, args["start"], args["length"]
    ids = x.dim(dim)
    if ids is None or not isinstance(start, int) or not isinstance(length, int):
        return pin_all(prop, node, f"{describe(node)}: narrow of a reshaped block or at a computed offset")
    piece = ids[start:start + length]
    prop.run(piece)
    return x.with_dim(dim, piece)


@register("index", linear=True)
@on_input
def index_tensor(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
                 args: dict[str, Any]) -> Any:
    """``x[..., idx, ...]`` with tensor indices on adjacent dims. Reading a parameter's table this
    way (a relative-position bias ``table[:, idx]``) makes the indexed axis a non-channel axis and
    keeps the others (the heads); on an activation's channel dim it gathers channels in a computed
    order, which is pinned."""
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
    blocks.extend(factor_block(dims, taken, keep=hinted(prop, taken)))
    return TensorLabels(tuple(shape), blocks)
