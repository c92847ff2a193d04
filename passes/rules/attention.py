"""Rules for attention: scaled_dot_product_attention and einsum.

Heads are channels with a run of head_dim (``graphmerge.passes.rules.heads``): q, k and v's head h
is one unit, kept or dropped whole, and the big student runs N x heads with the teacher's scale.
Attention written out as matmuls is ``matmul``'s rule (``graphmerge.passes.rules.layers``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import (
    constant_buffer,
    describe,
    labels_of,
    node_shape,
    op_args,
    pin_all,
    pin_mixing,
    register,
)
from graphmerge.passes.rules.heads import collapse_block, head_reps


def _with_block(shape: tuple[int, ...], blocks: list[tuple[tuple[int, ...], np.ndarray]]) -> TensorLabels:
    covered = {d for dims, _ in blocks for d in dims}
    rest = [((d,), np.full(s, NOT_A_CHANNEL, np.int64)) for d, s in enumerate(shape) if d not in covered]
    return TensorLabels(tuple(shape), [*blocks, *rest])


@register("scaled_dot_product_attention")
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
        if constant_buffer(prop, args.get("attn_mask")) is not None:  # a bias table built at init (ALiBi)
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


@register("einsum")
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
                x = collapse_block(prop, node, x, min(dims), max(dims)) or x
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
