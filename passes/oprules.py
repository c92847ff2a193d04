"""The op-rule table: how channels flow through every op the analysis understands.

One table for every pass. A rule receives the analysis state and the node, reads its inputs'
channel labels, adds equalities, pins and roles, and returns the node's output labels. Ops
missing from the table go to ``unknown_op``, which pins every channel it touches and says so.
To teach graphmerge a new op, add a rule here: nothing else knows about particular ops.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from graphmerge.passes.couple import Propagation
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels, factor_block
from torch import nn

Rule = Callable[[Propagation, torch.fx.Node], Any]


# -- helpers -----------------------------------------------------------------------------------

def meta_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def meta_shapes(node: torch.fx.Node) -> list[tuple[int, ...] | None]:
    """Shapes of a node that returns several values (split, chunk, attention's (out, weights))."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape"):
        return [tuple(int(s) for s in m.shape) if hasattr(m, "shape") else None for m in meta]
    return []


def labels_of(prop: Propagation, value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return prop.labels.get(value)
    if isinstance(value, (list, tuple)):
        return type(value)(labels_of(prop, v) for v in value)
    if isinstance(value, dict):
        return {k: labels_of(prop, v) for k, v in value.items()}
    return None


def tensor_args(prop: Propagation, node: torch.fx.Node) -> list[TensorLabels]:
    found = []
    for value in (*node.args, *node.kwargs.values()):
        labels = labels_of(prop, value)
        found.extend(x for x in _flatten(labels) if isinstance(x, TensorLabels))
    return found


def _flatten(value: Any):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


def describe(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_module":
        what = f"module '{target}'"
    elif callable(target):
        what = f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}".lstrip(".")
    else:
        what = f".{target}()"
    trace = node.meta.get("stack_trace")
    where = ""
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines()]
        frames = [i for i, ln in enumerate(lines) if ln.startswith("File")]
        if frames:
            last = frames[-1]
            code = lines[last + 1] if last + 1 < len(lines) and not lines[last + 1].startswith("File") else ""
            where = f" at {lines[last]}" + (f": `{code}`" if code else "")
    return f"{what} (node {node.name}){where}"


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def channels(prop: Propagation, ids: np.ndarray | None, size: int, reason: str) -> np.ndarray:
    """Ids that must be channels (a conv's input); non-channel positions become pinned ids."""
    if ids is None:
        ids = np.full(size, NOT_A_CHANNEL, np.int64)
    missing = ids < 0
    if missing.any():
        ids = ids.copy()
        fresh = prop.fresh(int(missing.sum()))
        prop.pin(fresh, reason)
        ids[missing] = fresh
    return ids


def unlabelled(node: torch.fx.Node) -> Any:
    shape = meta_shape(node)
    if shape is not None:
        return TensorLabels.unlabelled(shape)
    shapes = meta_shapes(node)
    if shapes:
        return tuple(None if s is None else TensorLabels.unlabelled(s) for s in shapes)
    return None


def module_param(prop: Propagation, node: torch.fx.Node, attr: str) -> tuple[str, torch.Tensor] | None:
    module = prop.modules[node.target]
    tensor = getattr(module, attr, None)
    if not isinstance(tensor, torch.Tensor):
        return None
    return f"{node.target}.{attr}", tensor


def get_attr_name(value: Any) -> str | None:
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return str(value.target)
    return None


# -- generic rules -----------------------------------------------------------------------------

def unknown_op(prop: Propagation, node: torch.fx.Node, reason: str | None = None) -> Any:
    """Pin everything the op touches: its inputs, its parameters, and (by -1 labels) its outputs."""
    reason = reason or f"unknown op {describe(node)}: no rule in passes/oprules.py"
    for labels in tensor_args(prop, node):
        prop.pin(labels.all_ids(), reason)
    if node.op == "call_module":
        for pname, tensor in prop.modules[node.target].named_parameters(recurse=True):
            _pin_param(prop, f"{node.target}.{pname}", tensor, reason)
        for bname, tensor in prop.modules[node.target].named_buffers(recurse=True):
            _pin_param(prop, f"{node.target}.{bname}", tensor, reason)
    return unlabelled(node)


def _pin_param(prop: Propagation, name: str, tensor: torch.Tensor, reason: str) -> None:
    dims = prop.param_labels(name, tensor)
    for ids in dims:
        prop.pin(ids, reason)
    prop.use_param(name, dims, out_dim=None)


# Methods whose tensor arguments other than ``self`` lend only a dtype or device, never values.
DTYPE_SOURCE_METHODS = {"type_as", "to"}


def identity(prop: Propagation, node: torch.fx.Node) -> Any:
    """Unary ops that keep the shape and never mix channels (activations, dropout, casts).

    A tensor operand beside the input (``clamp(x, min=t)``, ``x.pow(t)``) is read per position,
    so such a call follows the elementwise rule: its channels are unified with the input's.
    """
    if node.target not in DTYPE_SOURCE_METHODS and len(tensor_args(prop, node)) > 1:
        return elementwise(prop, node)
    first = labels_of(prop, node.args[0]) if node.args else None
    shape = meta_shape(node)
    if isinstance(first, TensorLabels) and shape == first.shape:
        return first
    if isinstance(first, TensorLabels):
        return broadcast(prop, node, [first])
    return unlabelled(node)


def elementwise(prop: Propagation, node: torch.fx.Node) -> Any:
    """add/sub/mul/div/where/...: aligned dims after broadcasting hold the same channels."""
    inputs = tensor_args(prop, node)
    if not inputs or meta_shape(node) is None:
        return unlabelled(node)
    return broadcast(prop, node, inputs)


def broadcast(prop: Propagation, node: torch.fx.Node, inputs: list[TensorLabels]) -> TensorLabels:
    shape = meta_shape(node)
    assert shape is not None
    joint = [x for x in inputs if any(len(dims) > 1 for dims, _ in x.blocks)]
    if joint:
        if len(inputs) == 1 and inputs[0].shape == shape:
            return inputs[0]
        for x in inputs:
            prop.pin(x.all_ids(), f"{describe(node)}: elementwise op on a reshaped channel block")
        return TensorLabels.unlabelled(shape)
    out_dims = []
    for d, size in enumerate(shape):
        candidates = []
        for x in inputs:
            k = d - (len(shape) - x.ndim)
            if k >= 0 and x.shape[k] == size:
                candidates.append(x.dim(k))
            elif k >= 0 and x.shape[k] == 1 and size > 1:
                prop.pin(x.dim(k), f"{describe(node)}: a single channel broadcast across a dim of size {size}")
        if not candidates:
            out_dims.append(np.full(size, NOT_A_CHANNEL, np.int64))
            continue
        for other in candidates[1:]:
            prop.unify(candidates[0], other, describe(node))
        stacked = np.stack(candidates)
        out_dims.append(np.where((stacked >= 0).all(0), candidates[0], NOT_A_CHANNEL))
    return TensorLabels.from_dims(shape, out_dims)


def reshape(prop: Propagation, node: torch.fx.Node) -> Any:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: regroup dims with equal products.

    Merging dims gives runs (a channel owns a run of features after flatten); splitting a channel
    dim (channel shuffle) gives a joint block over the new dims; both are exact per position.
    """
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    if not isinstance(x, TensorLabels) or shape is None:
        return unlabelled(node)
    blocks = []
    for in_dims, out_dims in _reshape_groups(x.shape, shape):
        joint = x.joint(in_dims) if in_dims else np.full((), NOT_A_CHANNEL, np.int64)
        if joint is None:
            return _reshape_whole(prop, node, x, shape)
        clash = joint == -2
        if clash.any():
            prop.pin(x.all_ids(), f"{describe(node)}: reshape merges two channel dims")
            joint = np.where(clash, NOT_A_CHANNEL, joint)
        joint = joint.reshape([shape[d] for d in out_dims]) if out_dims else joint
        if out_dims:
            blocks.extend(factor_block(tuple(out_dims), joint))
        elif (joint >= 0).any():
            prop.pin(joint, f"{describe(node)}: reshape drops a channel dim")
    prop.literal_nodes.add(node.name)
    return TensorLabels(shape, blocks)


def _reshape_whole(prop: Propagation, node: torch.fx.Node, x: TensorLabels,
                   shape: tuple[int, ...]) -> TensorLabels:
    joint = x.joint(tuple(range(x.ndim)))
    assert joint is not None
    joint = np.where(joint == -2, NOT_A_CHANNEL, joint).reshape(shape)
    prop.literal_nodes.add(node.name)
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


def permute(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unlabelled(node)
    if node.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        order = list(range(x.ndim))
        order[a % x.ndim], order[b % x.ndim] = order[b % x.ndim], order[a % x.ndim]
    elif node.target in ("t",):
        order = list(reversed(range(x.ndim)))
    elif node.target in ("movedim", torch.movedim):
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        order = [d for d in range(x.ndim) if d != src % x.ndim]
        order.insert(dst % x.ndim, src % x.ndim)
    else:
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) \
            else node.args[1]
        order = [int(d) % x.ndim for d in dims]
    return x.permuted(order)


def cat(prop: Propagation, node: torch.fx.Node) -> Any:
    tensors = [labels_of(prop, t) for t in arg(node, 0, "tensors")]
    shape = meta_shape(node)
    dim = arg(node, 1, "dim", 0) % len(shape)
    if not all(isinstance(t, TensorLabels) for t in tensors):
        return unknown_op(prop, node)
    if any(t.dim(dim) is None for t in tensors):
        for t in tensors:
            prop.pin(t.all_ids(), f"{describe(node)}: cat along a reshaped channel block")
        return TensorLabels.unlabelled(shape)
    joined = np.concatenate([t.dim(dim) for t in tensors])
    prop.run(joined)
    others = [TensorLabels(t.shape[:dim] + (1,) + t.shape[dim + 1:],
                           [b for b in t.blocks if b[0] != (dim,)] + [((dim,), np.full(1, -1, np.int64))])
              for t in tensors]
    rest = broadcast(prop, _with_shape(node, shape[:dim] + (1,) + shape[dim + 1:]), others)
    return rest.with_dim(dim, joined)


def stack(prop: Propagation, node: torch.fx.Node) -> Any:
    tensors = [labels_of(prop, t) for t in arg(node, 0, "tensors")]
    shape = meta_shape(node)
    dim = arg(node, 1, "dim", 0) % len(shape)
    if not all(isinstance(t, TensorLabels) for t in tensors):
        return unknown_op(prop, node)
    inner = broadcast(prop, _with_shape(node, shape[:dim] + shape[dim + 1:]), tensors)
    blocks = [(tuple(d + (d >= dim) for d in dims), ids) for dims, ids in inner.blocks]
    blocks.append(((dim,), np.full(shape[dim], NOT_A_CHANNEL, np.int64)))
    return TensorLabels(shape, blocks)


class _ShapeOnly:
    """A stand-in node carrying only an output shape, for rules applied to part of an op."""

    def __init__(self, node: torch.fx.Node, shape: tuple[int, ...]):
        self.name = node.name
        self.op = node.op
        self.target = node.target
        self.meta = {"tensor_meta": type("M", (), {"shape": shape})(), "stack_trace": node.meta.get("stack_trace")}


def _with_shape(node: torch.fx.Node, shape: tuple[int, ...]) -> Any:
    return _ShapeOnly(node, shape)


def split(prop: Propagation, node: torch.fx.Node) -> Any:
    """split/chunk/tensor_split/unbind: cut a dim into pieces; each piece is a run of its own."""
    x = labels_of(prop, node.args[0])
    shapes = meta_shapes(node)
    if not isinstance(x, TensorLabels) or not shapes:
        return unlabelled(node)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    default_dim = 0
    dim = arg(node, 2, "dim", default_dim) if name != "unbind" else arg(node, 1, "dim", 0)
    dim %= x.ndim
    ids = x.dim(dim)
    if ids is None:
        prop.pin(x.all_ids(), f"{describe(node)}: split of a reshaped channel block")
        return tuple(TensorLabels.unlabelled(s) for s in shapes)
    pieces = []
    offset = 0
    squeeze = name == "unbind"
    for s in shapes:
        size = 1 if squeeze else s[dim]
        piece = ids[offset:offset + size]
        offset += size
        prop.run(piece)
        if squeeze:
            prop.pin(piece, f"{describe(node)}: unbind along a channel dim")
            blocks = [(tuple(d - (d > dim) for d in dims), a) for dims, a in x.blocks if dims != (dim,)]
            pieces.append(TensorLabels(s, blocks))
        else:
            pieces.append(x.with_dim(dim, piece))
    prop.literal_nodes.add(node.name)
    return tuple(pieces)


def narrow(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    if not isinstance(x, TensorLabels) or shape is None:
        return unlabelled(node)
    dim, start, length = arg(node, 1, "dim") % x.ndim, arg(node, 2, "start"), arg(node, 3, "length")
    ids = x.dim(dim)
    if ids is None or not isinstance(start, int) or not isinstance(length, int):
        return unknown_op(prop, node)
    piece = ids[start:start + length]
    prop.run(piece)
    prop.literal_nodes.add(node.name)
    return x.with_dim(dim, piece)


def getitem(prop: Propagation, node: torch.fx.Node) -> Any:
    """Index a tuple result, or slice a tensor with ints, slices, None and Ellipsis."""
    container, index = node.args
    value = labels_of(prop, container)
    if isinstance(value, (list, tuple)):
        return value[index] if isinstance(index, int) and -len(value) <= index < len(value) else None
    if not isinstance(value, TensorLabels):
        return None
    shape = meta_shape(node)
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.fx.Node, list)) for i in index) or shape is None:
        return unknown_op(prop, node)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (value.ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (value.ndim - sum(1 for i in expanded if i is not None)))
    out_dims: list[np.ndarray] = []
    d = 0
    for i in expanded:
        if i is None:
            out_dims.append(np.full(1, NOT_A_CHANNEL, np.int64))
            continue
        ids = value.dim(d)
        if ids is None:
            return unknown_op(prop, node)
        if isinstance(i, int):
            prop.pin(ids[i:i + 1] if i != -1 else ids[-1:], f"{describe(node)}: integer index into a channel dim")
        elif isinstance(i, slice):
            piece = ids[i]
            if len(piece) != len(ids):
                prop.run(piece)
            if (i.start is not None or i.stop is not None) and (ids >= 0).any():
                # bounds are teacher sizes even when they span the whole dim (x[:, :C] after a cat)
                prop.literal_nodes.add(node.name)
            out_dims.append(piece)
        else:
            return unknown_op(prop, node)
        d += 1
    if tuple(len(a) for a in out_dims) != shape:
        return unknown_op(prop, node)
    return TensorLabels.from_dims(shape, out_dims)


def reduction(prop: Propagation, node: torch.fx.Node) -> Any:
    """mean/sum/amax/... : reducing over a channel dim mixes channels (pins); over space is free."""
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unlabelled(node)
    dims = arg(node, 1, "dim", None)
    if isinstance(dims, torch.fx.Node):  # torch.max(a, b): elementwise, not a reduction
        return elementwise(prop, node)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    keepdim_position = 3 if name in ("std", "var") else 2
    keepdim = arg(node, keepdim_position, "keepdim", False)
    keepdim = bool(keepdim) if isinstance(keepdim, bool) else False
    if dims is None:
        prop.pin(x.all_ids(), f"{describe(node)}: reduction over all dims")
        return unlabelled(node)
    dims = {int(d) % x.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    for d in dims:
        dims_of_block, ids = x.block_of(d)
        prop.pin(ids, f"{describe(node)}: reduction over a channel dim")
    kept = [d for d in range(x.ndim) if d not in dims]
    labels = [x.dim(d) if d in kept else np.full(1, NOT_A_CHANNEL, np.int64)
              for d in range(x.ndim) if keepdim or d in kept]
    shape = tuple(len(a) if a is not None else 0 for a in labels)
    if any(a is None for a in labels):
        prop.pin(x.all_ids(), f"{describe(node)}: reduction over a reshaped channel block")
        result = unlabelled(node)
    else:
        result = TensorLabels.from_dims(shape, labels)
    if node.target in ("max", "min", torch.max, torch.min):
        return (result, result)
    return result


def spatial(prop: Propagation, node: torch.fx.Node) -> Any:
    """Pooling, upsampling, padding of trailing dims: batch and channel dims pass through."""
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    if not isinstance(x, TensorLabels) or shape is None or len(shape) != x.ndim:
        return unknown_op(prop, node)
    dims = []
    for d, size in enumerate(shape):
        ids = x.dim(d)
        if ids is None:
            return unknown_op(prop, node)
        if size != x.shape[d]:
            if (ids >= 0).any():
                prop.pin(ids, f"{describe(node)}: changes the size of a channel dim")
            ids = np.full(size, NOT_A_CHANNEL, np.int64)
        dims.append(ids)
    return TensorLabels.from_dims(shape, dims)


def softmax(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unlabelled(node)
    if node.op == "call_module":
        dim = prop.modules[node.target].dim
    else:
        dim = arg(node, 1, "dim")
    if dim is None:
        return unknown_op(prop, node)
    _, ids = x.block_of(dim % x.ndim)
    prop.pin(ids, f"{describe(node)}: softmax across a channel dim")
    return x


def expand(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    if not isinstance(x, TensorLabels) or shape is None:
        return unlabelled(node)
    lead = len(shape) - x.ndim
    dims = [np.full(s, NOT_A_CHANNEL, np.int64) for s in shape[:lead]]
    for d in range(x.ndim):
        ids = x.dim(d)
        if ids is None:
            return unknown_op(prop, node)
        dims.append(ids if x.shape[d] == shape[lead + d] else np.full(shape[lead + d], NOT_A_CHANNEL, np.int64))
    return TensorLabels.from_dims(shape, dims)


def matmul(prop: Propagation, node: torch.fx.Node) -> Any:
    """a @ b contracts a's last dim with b's second-to-last: teacher blocks would mix there."""
    a, b = labels_of(prop, node.args[0]), labels_of(prop, node.args[1])
    shape = meta_shape(node)
    if not isinstance(a, TensorLabels) or not isinstance(b, TensorLabels) or shape is None:
        return unknown_op(prop, node)
    reason = f"{describe(node)}: matmul contracts a channel dim"
    prop.pin(a.block_of(a.ndim - 1)[1], reason)
    prop.pin(b.block_of(max(b.ndim - 2, 0))[1], reason)
    for x in (a, b):
        for dims, ids in x.blocks:
            if len(dims) > 1:
                prop.pin(ids, reason)
    rows = a.dim(a.ndim - 2) if a.ndim >= 2 else None
    cols = b.dim(b.ndim - 1) if b.ndim >= 2 else None
    labels = [np.full(s, NOT_A_CHANNEL, np.int64) for s in shape]
    if a.ndim >= 2 and b.ndim >= 2 and len(shape) >= 2:
        labels[-2] = rows if rows is not None else labels[-2]
        labels[-1] = cols if cols is not None else labels[-1]
        batch = broadcast(prop, _with_shape(node, shape[:-2]),
                          [TensorLabels.from_dims(x.shape[:-2], [x.dim(d) if x.dim(d) is not None
                                                                 else np.full(x.shape[d], -1, np.int64)
                                                                 for d in range(x.ndim - 2)])
                           for x in (a, b)]) if len(shape) > 2 else None
        if batch is not None:
            labels[:-2] = batch.dims()
    return TensorLabels.from_dims(shape, labels)


# -- parameterised ops ---------------------------------------------------------------------------

def conv(prop: Propagation, node: torch.fx.Node) -> Any:
    module = prop.modules[node.target]
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    if not isinstance(x, TensorLabels) or shape is None:
        return unknown_op(prop, node)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    weight_name = f"{node.target}.weight"
    bias_name = f"{node.target}.bias" if module.bias is not None else None
    return _conv_like(prop, node, x, shape, module.weight, weight_name, bias_name,
                      module.groups, transposed)


def conv_function(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    weight_name = get_attr_name(arg(node, 1, "weight"))
    bias_node = arg(node, 2, "bias")
    bias_name = get_attr_name(bias_node)
    if not isinstance(x, TensorLabels) or shape is None or weight_name is None or \
            (bias_node is not None and bias_name is None):
        return unknown_op(prop, node)
    transposed = node.target in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    groups = arg(node, 6, "groups", 1)
    weight = prop.gm.get_parameter(weight_name) if weight_name in dict(prop.gm.named_parameters()) \
        else getattr(prop.gm, weight_name)
    return _conv_like(prop, node, x, shape, weight, weight_name, bias_name, groups, transposed)


def _conv_like(prop: Propagation, node: torch.fx.Node, x: TensorLabels, shape: tuple[int, ...],
               weight: torch.Tensor, weight_name: str, bias_name: str | None, groups: int,
               transposed: bool) -> TensorLabels:
    in_ch = x.shape[1]
    out_ch = shape[1]
    spatial_dims = [np.full(s, NOT_A_CHANNEL, np.int64) for s in weight.shape[2:]]
    reason = f"{describe(node)}: input is not a channel space"
    in_ids = channels(prop, x.dim(1), in_ch, reason)
    out_spatial = [np.full(s, NOT_A_CHANNEL, np.int64) for s in shape[2:]]
    batch = x.dim(0) if x.dim(0) is not None else np.full(shape[0], -1, np.int64)
    if groups == 1:
        out_ids = prop.fresh(out_ch)
        if transposed:
            dims, out_dim, in_dims = [in_ids, out_ids, *spatial_dims], 1, (0,)
        else:
            dims, out_dim, in_dims = [out_ids, in_ids, *spatial_dims], 0, (1,)
        prop.use_param(weight_name, dims, out_dim=out_dim, in_dims=in_dims)
        prop.role(node, "producer", out_ids)
        prop.role(node, "consumer", in_ids)
        prop.gate_sites.append((node.name, 0, 1, weight_name))
    elif in_ch == out_ch and not transposed:
        out_ids = in_ids
        within = np.full(weight.shape[1], NOT_A_CHANNEL, np.int64)
        prop.use_param(weight_name, [out_ids, within, *spatial_dims], out_dim=0)
        prop.role(node, "member", out_ids)
        prop.unit(out_ids, in_ch // groups)
    else:
        reason = f"{describe(node)}: grouped conv with {in_ch} in, {out_ch} out, groups={groups}"
        prop.pin(in_ids, reason)
        out_ids = prop.fresh(out_ch)
        prop.pin(out_ids, reason)
        dims = [prop.fresh(s) if s > 1 else np.full(s, -1, np.int64) for s in weight.shape]
        for ids in dims:
            prop.pin(ids, reason)
        prop.use_param(weight_name, dims, out_dim=None)
    if bias_name is not None:
        prop.use_param(bias_name, [out_ids], out_dim=0)
        prop.role(node, "member", out_ids)
    return TensorLabels.from_dims(shape, [batch, out_ids, *out_spatial])


def linear(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    if node.op == "call_module":
        module = prop.modules[node.target]
        weight_name = f"{node.target}.weight"
        bias_name = f"{node.target}.bias" if module.bias is not None else None
        weight = module.weight
    else:
        weight_name = get_attr_name(arg(node, 1, "weight"))
        bias_node = arg(node, 2, "bias")
        bias_name = get_attr_name(bias_node)
        if weight_name is None or (bias_node is not None and bias_name is None):
            return unknown_op(prop, node)
        weight = getattr_path(prop.gm, weight_name)
    if not isinstance(x, TensorLabels) or shape is None:
        return unknown_op(prop, node)
    in_ids = channels(prop, x.dim(x.ndim - 1), x.shape[-1], f"{describe(node)}: input is not a channel space")
    out_ids = prop.fresh(weight.shape[0])
    prop.use_param(weight_name, [out_ids, in_ids], out_dim=0, in_dims=(1,))
    if bias_name is not None:
        prop.use_param(bias_name, [out_ids], out_dim=0)
        prop.role(node, "member", out_ids)
    prop.role(node, "producer", out_ids)
    prop.role(node, "consumer", in_ids)
    prop.gate_sites.append((node.name, 0, x.ndim - 1, weight_name))
    return x.with_dim(x.ndim - 1, out_ids)


def getattr_path(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def per_channel_module(prop: Propagation, node: torch.fx.Node) -> Any:
    """BatchNorm, InstanceNorm, GroupNorm, PReLU: parameters indexed by the channel dim (dim 1)."""
    module = prop.modules[node.target]
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels) or x.ndim < 2 or x.dim(1) is None:
        return unknown_op(prop, node)
    ids = x.dim(1)
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        prop.use_param(f"{node.target}.weight", [np.full(1, -1, np.int64)], out_dim=None)
        return x
    for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
        qualified = f"{node.target}.{name}"
        if tensor.ndim == 0:
            prop.use_param(qualified, [], out_dim=None)
        elif tensor.shape[0] == len(ids):
            prop.use_param(qualified, [ids], out_dim=0)
        else:
            _pin_param(prop, qualified, tensor, f"{describe(node)}: parameter {name} not per channel")
    prop.role(node, "member", ids)
    if isinstance(module, nn.GroupNorm):
        prop.unit(ids, module.num_channels // module.num_groups)
    return x


def batch_norm_function(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels) or x.dim(1) is None:
        return unknown_op(prop, node)
    ids = x.dim(1)
    for index, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        param = get_attr_name(arg(node, index, name))
        if param is not None:
            labels = prop.labels.get(arg(node, index, name))
            if isinstance(labels, TensorLabels):
                prop.unify(labels.dim(0), ids, describe(node))
            prop.params[param].out_dim = 0
    prop.role(node, "member", ids)
    return x


def layer_norm(prop: Propagation, node: torch.fx.Node) -> Any:
    """LayerNorm over trailing dims: its parameters follow those dims; it normalises across them."""
    x = labels_of(prop, node.args[0])
    if not isinstance(x, TensorLabels):
        return unknown_op(prop, node)
    if node.op == "call_module":
        module = prop.modules[node.target]
        normalized = tuple(module.normalized_shape)
        params = [(f"{node.target}.{n}", None) for n in ("weight", "bias")
                  if getattr(module, n, None) is not None]
    else:
        normalized = tuple(arg(node, 1, "normalized_shape"))
        params = [(get_attr_name(arg(node, i, n)), arg(node, i, n)) for i, n in ((2, "weight"), (3, "bias"))
                  if arg(node, i, n) is not None]
        if any(name is None for name, _ in params):
            return unknown_op(prop, node)
    k = len(normalized)
    dims = [x.dim(d) for d in range(x.ndim - k, x.ndim)]
    if any(d is None for d in dims):
        return unknown_op(prop, node)
    for d in dims:
        prop.normalised_across(d, describe(node))
    if k > 1:
        for d in dims:
            prop.pin(d, f"{describe(node)}: LayerNorm over several dims")
    for name, source in params:
        if source is None:
            prop.use_param(name, dims, out_dim=0 if k == 1 else None)
        else:
            labels = prop.labels.get(source)
            for have, want in zip(labels.dims(), dims, strict=True):
                prop.unify(have, want, describe(node))
            prop.params[name].out_dim = 0 if k == 1 else None
    for d in dims:
        prop.role(node, "member", d)
    return x


def embedding(prop: Propagation, node: torch.fx.Node) -> Any:
    x = labels_of(prop, node.args[0])
    shape = meta_shape(node)
    module = prop.modules[node.target]
    if not isinstance(x, TensorLabels) or shape is None:
        return unknown_op(prop, node)
    out_ids = prop.fresh(module.embedding_dim)
    prop.use_param(f"{node.target}.weight", [np.full(module.num_embeddings, -1, np.int64), out_ids], out_dim=1)
    prop.role(node, "producer", out_ids)
    return TensorLabels.from_dims(shape, [*x.dims(), out_ids])


def multihead_attention(prop: Propagation, node: torch.fx.Node) -> Any:
    """nn.MultiheadAttention: q, k and v share one space, selected in whole heads.

    q·k contracts each head's channels of q with the same channels of k, and out_proj reads
    v's: so channel i of q, k and v is one unit, and a head is kept or dropped as a whole. The
    in-projection rows are [q; k; v], each a full copy of that space, which widens to
    [q of every teacher; k ...; v ...]: the big module is the same module with N× heads.
    """
    module = prop.modules[node.target]
    query = labels_of(prop, arg(node, 0, "query"))
    key = labels_of(prop, arg(node, 1, "key"))
    value = labels_of(prop, arg(node, 2, "value"))
    shapes = meta_shapes(node)
    if not all(isinstance(x, TensorLabels) for x in (query, key, value)) or not shapes or shapes[0] is None \
            or not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return unknown_op(prop, node)
    reason = f"{describe(node)}: attention input is not a channel space"
    embed = module.embed_dim
    ids = [channels(prop, x.dim(x.ndim - 1), embed, reason) for x in (query, key, value)]
    prop.unify(ids[0], ids[1], f"{describe(node)}: query and key inputs share in_proj_weight")
    prop.unify(ids[0], ids[2], f"{describe(node)}: query and value inputs share in_proj_weight")
    heads = prop.fresh(embed)
    out = prop.fresh(embed)
    qkv = np.concatenate([heads, heads, heads])
    prop.use_param(f"{node.target}.in_proj_weight", [qkv, ids[0]], out_dim=0, in_dims=(1,))
    if module.in_proj_bias is not None:
        prop.use_param(f"{node.target}.in_proj_bias", [qkv], out_dim=0)
    prop.use_param(f"{node.target}.out_proj.weight", [out, heads], out_dim=0, in_dims=(1,))
    if module.out_proj.bias is not None:
        prop.use_param(f"{node.target}.out_proj.bias", [out], out_dim=0)
    prop.unit(heads, module.head_dim)
    prop.role(node, "producer", heads)
    prop.role(node, "producer", out)
    prop.role(node, "consumer", ids[0])
    prop.role(node, "consumer", heads)
    prop.gate_sites.append((node.name, -1, -1, f"{node.target}.out_proj.weight"))
    result = query.with_dim(query.ndim - 1, out)
    weights = None if len(shapes) < 2 or shapes[1] is None else TensorLabels.unlabelled(shapes[1])
    return (result, weights)


# -- graph boundary and attributes ---------------------------------------------------------------

def placeholder(prop: Propagation, node: torch.fx.Node) -> Any:
    shape = meta_shape(node)
    if shape is None:
        return None
    dims = [np.full(shape[0], NOT_A_CHANNEL, np.int64)] if shape else []
    for d, size in enumerate(shape[1:], start=1):
        ids = prop.fresh(size)
        prop.pin(ids, f"graph input '{node.name}' dim {d}")
        dims.append(ids)
    return TensorLabels.from_dims(shape, dims)


def output(prop: Propagation, node: torch.fx.Node) -> Any:
    for labels in _flatten(labels_of(prop, node.args[0])):
        if isinstance(labels, TensorLabels):
            prop.pin(labels.all_ids(), "graph output")
    return None


def get_attr(prop: Propagation, node: torch.fx.Node) -> Any:
    value = getattr_path(prop.gm, str(node.target))
    if not isinstance(value, torch.Tensor):
        return None
    dims = prop.param_labels(str(node.target), value)
    prop.use_param(str(node.target), dims, out_dim=None)
    prop.role(node, "member", np.concatenate(dims) if dims else None)
    return TensorLabels.from_dims(tuple(value.shape), dims)


# -- the table -----------------------------------------------------------------------------------

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Tanhshrink, nn.Softsign, nn.LogSigmoid,
)
SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)

MODULE_RULES: list[tuple[type, Rule]] = [
    (nn.modules.conv._ConvNd, conv),
    (nn.Linear, linear),
    (nn.modules.batchnorm._NormBase, per_channel_module),
    (nn.GroupNorm, per_channel_module),
    (nn.PReLU, per_channel_module),
    (nn.LayerNorm, layer_norm),
    (nn.MultiheadAttention, multihead_attention),
    (nn.Embedding, embedding),
    (nn.Flatten, reshape),
    (nn.Unflatten, reshape),
    (nn.Softmax, softmax),
    (nn.LogSoftmax, softmax),
    (SPATIAL_MODULES, spatial),
    (UNARY_MODULES, identity),
]

UNARY_FUNCTIONS = [
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu,
    F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.sigmoid, F.tanh,
    F.logsigmoid, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.clamp, torch.clip, torch.square, torch.sin, torch.cos, torch.erf,
    operator.neg, operator.pos, torch.nn.functional.hardtanh_, torch.nan_to_num,
]
BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where, torch.pow,
    torch.true_divide, torch.multiply, torch.subtract, torch.lerp, torch.addcmul, torch.addcdiv,
]
REDUCTIONS = ["mean", "sum", "amax", "amin", "std", "var", "max", "min", "logsumexp", "prod"]
UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "clamp", "clamp_", "clip", "square", "contiguous", "clone", "detach", "float", "double", "half",
    "bfloat16", "to", "type", "type_as", "cpu", "cuda", "requires_grad_", "sin", "cos", "erf", "pow",
    "softplus", "nan_to_num", "hardtanh", "hardtanh_",
]
BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "masked_fill", "masked_fill_",
    "maximum", "minimum", "where", "lerp", "addcmul", "addcdiv", "__add__", "__mul__", "__sub__",
    "__truediv__", "__radd__", "__rmul__",
]


FUNCTION_RULES: dict[Any, Rule] = {
    **{f: identity for f in UNARY_FUNCTIONS},
    **{f: elementwise for f in BINARY_FUNCTIONS},
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.flatten: reshape, torch.reshape: reshape, torch.squeeze: reshape, torch.unsqueeze: reshape,
    torch.unflatten: reshape,
    torch.permute: permute, torch.transpose: permute, torch.swapaxes: permute, torch.movedim: permute,
    torch.split: split, torch.chunk: split, torch.tensor_split: split, torch.unbind: split,
    torch.narrow: narrow, operator.getitem: getitem,
    torch.mean: reduction, torch.sum: reduction, torch.amax: reduction, torch.amin: reduction,
    torch.max: reduction, torch.min: reduction, torch.std: reduction, torch.var: reduction,
    torch.logsumexp: reduction,
    F.softmax: softmax, F.log_softmax: softmax, torch.softmax: softmax, torch.log_softmax: softmax,
    F.linear: linear, F.layer_norm: layer_norm, F.batch_norm: batch_norm_function,
    F.conv1d: conv_function, F.conv2d: conv_function, F.conv3d: conv_function,
    F.conv_transpose1d: conv_function, F.conv_transpose2d: conv_function, F.conv_transpose3d: conv_function,
    F.adaptive_avg_pool1d: spatial, F.adaptive_avg_pool2d: spatial, F.adaptive_avg_pool3d: spatial,
    F.adaptive_max_pool1d: spatial, F.adaptive_max_pool2d: spatial, F.avg_pool1d: spatial,
    F.avg_pool2d: spatial, F.avg_pool3d: spatial, F.max_pool1d: spatial, F.max_pool2d: spatial,
    F.max_pool3d: spatial, F.interpolate: spatial, F.pad: spatial, F.upsample: spatial,
    torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul, torch.mm: matmul,
}
METHOD_RULES: dict[str, Rule] = {
    **{m: identity for m in UNARY_METHODS},
    **{m: elementwise for m in BINARY_METHODS},
    **{m: reduction for m in REDUCTIONS},
    "view": reshape, "reshape": reshape, "flatten": reshape, "unflatten": reshape, "squeeze": reshape,
    "unsqueeze": reshape, "view_as": reshape, "reshape_as": reshape,
    "permute": permute, "transpose": permute, "t": permute, "swapaxes": permute, "movedim": permute,
    "split": split, "chunk": split, "tensor_split": split, "unbind": split, "narrow": narrow,
    "softmax": softmax, "log_softmax": softmax, "expand": expand, "expand_as": expand,
    "matmul": matmul, "bmm": matmul,
}
# Functions from optional libraries, keyed by qualified name so that passes/ never imports them.
NAMED_FUNCTION_RULES: dict[str, Rule] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": identity,
}
NON_TENSOR_FUNCTIONS = {builtins.getattr, operator.floordiv, operator.mul, operator.add}
NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist", "__len__"}


def find_rule(prop: Propagation, node: torch.fx.Node) -> Rule | None:
    if node.op == "call_module":
        module = prop.modules[node.target]
        for kinds, rule in MODULE_RULES:
            if isinstance(module, kinds):
                return rule
        return None
    if node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
        if rule is None and callable(node.target):
            qualified = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
            rule = NAMED_FUNCTION_RULES.get(qualified)
        return rule
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None


def propagate_node(prop: Propagation, node: torch.fx.Node) -> Any:
    """Apply the rule for ``node``; non-tensor values (sizes, shapes) carry no labels."""
    if node.op == "placeholder":
        return placeholder(prop, node)
    if node.op == "output":
        return output(prop, node)
    if node.op == "get_attr":
        return get_attr(prop, node)
    if not tensor_args(prop, node) and node.op != "call_module":
        return None if meta_shape(node) is None and not meta_shapes(node) else unlabelled(node)
    if meta_shape(node) is None and not meta_shapes(node):
        if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
            return None
        if node.op == "call_function" and node.target in NON_TENSOR_FUNCTIONS:
            return None
        if node.op == "call_function" and node.target is operator.getitem:
            return getitem(prop, node)
        return unknown_op(prop, node)
    rule = find_rule(prop, node)
    if rule is None:
        return unknown_op(prop, node)
    try:
        result = rule(prop, node)
    except Exception as error:  # a rule that cannot read this call: pin, never guess
        result = unknown_op(prop, node, f"{describe(node)}: its rule cannot read this call ({error}); pinned")
    if _is_nonlinear(prop, node, rule) and isinstance(result, TensorLabels):
        prop.nonlinear.append((node.name, result.all_ids()))
    return result


LINEAR_UNARY = {
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu",
    "cuda", "requires_grad_", F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, operator.neg, operator.pos,
    torch.neg,
}
PRODUCTS = {
    operator.mul, operator.truediv, operator.pow, operator.imul, operator.itruediv, torch.mul, torch.div,
    torch.maximum, torch.minimum, torch.where, torch.pow, torch.multiply, torch.true_divide, "mul", "mul_",
    "div", "div_", "maximum", "minimum", "where", "__mul__", "__truediv__", "__rmul__",
}
LINEAR_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
NONLINEAR_SPATIAL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                     nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d)


def _is_nonlinear(prop: Propagation, node: torch.fx.Node, rule: Rule) -> bool:
    """Whether an elementwise or pooling op is non-linear (it does not commute with averaging)."""
    if node.op == "call_module":
        module = prop.modules[node.target]
        if rule is identity:
            return not isinstance(module, LINEAR_MODULES)
        return rule is spatial and isinstance(module, NONLINEAR_SPATIAL)
    if rule is identity:
        return node.target not in LINEAR_UNARY
    if rule is elementwise and node.target in PRODUCTS:
        return sum(1 for x in tensor_args(prop, node) if (x.all_ids() >= 0).any()) >= 2
    return rule is spatial and node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d,
                                                 F.adaptive_max_pool1d, F.adaptive_max_pool2d)
