"""Attention heads as channels: shared by the rules of every family that meets heads x head_dim.

A channel dim reshaped into (heads, head_dim) is one joint block of labels; where an op works per
head (attention, a norm over head_dim, a per-head table) each head becomes one channel whose run is
head_dim, so heads are kept or dropped whole, q, k and v together.
"""

from __future__ import annotations

import numpy as np
import torch.fx
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules.base import describe


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


def collapse_block(prop: Propagation, node: torch.fx.Node, x: TensorLabels, head_dim: int,
                    inner_dim: int) -> TensorLabels | None:
    """``x`` with its (head_dim, inner_dim) joint block made head channels on head_dim only."""
    reps = head_reps(prop, node, x, head_dim, inner_dim)
    if reps is None:
        return None
    blocks = [(dims, ids) for dims, ids in x.blocks if set(dims) != {head_dim, inner_dim}]
    blocks += [((head_dim,), reps), ((inner_dim,), np.full(x.shape[inner_dim], NOT_A_CHANNEL, np.int64))]
    return TensorLabels(x.shape, blocks)


def collapse_heads(prop: Propagation, node: torch.fx.Node, x: TensorLabels) -> TensorLabels | None:
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


def hinted(prop: Propagation, ids: np.ndarray) -> bool:
    return bool(prop.hinted) and any(int(i) in prop.hinted for i in ids.ravel() if i >= 0)


