"""Channel labels: which channel of which space every position of a tensor dimension carries.

The coupling analysis gives every *channel position* a integer id (``-1`` for positions that are
not channels: batch, spatial, kernel). Tensors carry their ids in ``TensorLabels``: one id array
per dimension, or, after a reshape that splits a channel dimension into several (channel
shuffle), one joint array over those dimensions. Keeping ids per position, not per space,
makes cat offsets, slices and flatten runs fall out of ordinary numpy indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOT_A_CHANNEL = -1


@dataclass
class TensorLabels:
    """Ids for one tensor: ``blocks`` partitions its dims; each block holds a joint id array."""

    shape: tuple[int, ...]
    blocks: list[tuple[tuple[int, ...], np.ndarray]]

    @staticmethod
    def unlabelled(shape: tuple[int, ...]) -> TensorLabels:
        return TensorLabels(tuple(shape), [((d,), np.full(s, NOT_A_CHANNEL, np.int64))
                                           for d, s in enumerate(shape)])

    @staticmethod
    def from_dims(shape: tuple[int, ...], dims: list[np.ndarray]) -> TensorLabels:
        return TensorLabels(tuple(shape), [((d,), np.asarray(a, np.int64)) for d, a in enumerate(dims)])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def block_of(self, dim: int) -> tuple[tuple[int, ...], np.ndarray]:
        for dims, ids in self.blocks:
            if dim in dims:
                return dims, ids
        raise KeyError(dim)

    def dim(self, dim: int) -> np.ndarray | None:
        """The 1-D id array of ``dim``, or None when the dim shares a joint block with others."""
        dims, ids = self.block_of(dim % self.ndim)
        return ids if len(dims) == 1 else None

    def dims(self) -> list[np.ndarray | None]:
        return [self.dim(d) for d in range(self.ndim)]

    def all_ids(self) -> np.ndarray:
        if not self.blocks:
            return np.zeros(0, np.int64)
        return np.concatenate([ids.ravel() for _, ids in self.blocks])

    def with_dim(self, dim: int, ids: np.ndarray) -> TensorLabels:
        """A copy where ``dim`` (which must be its own block) carries ``ids``."""
        dim %= self.ndim
        shape = list(self.shape)
        shape[dim] = len(ids)
        blocks = [((dim,), np.asarray(ids, np.int64)) if dims == (dim,) else (dims, a)
                  for dims, a in self.blocks]
        return TensorLabels(tuple(shape), blocks)

    def permuted(self, order: list[int]) -> TensorLabels:
        """Labels after ``permute(order)``: blocks keep their arrays, dims are renumbered."""
        where = {old: new for new, old in enumerate(order)}
        blocks = [(tuple(where[d] for d in dims), a) for dims, a in self.blocks]
        return TensorLabels(tuple(self.shape[o] for o in order), blocks)

    def joint(self, dims: tuple[int, ...]) -> np.ndarray | None:
        """One id array over ``dims`` (in order), if every block touching them lies inside them.

        Positions that several channel blocks claim at once get ``-2``: the caller pins them.
        """
        joint = np.full([self.shape[d] for d in dims], NOT_A_CHANNEL, np.int64)
        for bdims, ids in self.blocks:
            inside = [d in dims for d in bdims]
            if not any(inside):
                continue
            if not all(inside):
                return None
            axes = [dims.index(d) for d in bdims]
            view_shape = [1] * len(dims)
            for axis, d in zip(axes, bdims, strict=True):
                view_shape[axis] = self.shape[d]
            order = np.argsort(axes)
            arr = np.transpose(ids, order).reshape(view_shape)
            arr = np.broadcast_to(arr, joint.shape)
            clash = (joint >= 0) & (arr >= 0)
            joint = np.where(arr >= 0, arr, joint)
            joint[clash] = -2
        return joint


def factor_block(dims: tuple[int, ...], joint: np.ndarray, *,
                 keep: bool = False) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Split a joint id array into the smallest independent blocks.

    An axis along which the ids never change carries no channel: it becomes its own unlabelled
    block. What is left over stays joint (the split halves of a channel shuffle). ``keep`` leaves
    the block whole: a heads axis of one head, or of one repeated head, is such an axis.
    """
    if keep and len(dims) > 1:
        return [(dims, np.ascontiguousarray(joint))]
    varying = [axis for axis in range(joint.ndim)
               if joint.shape[axis] > 1 and not _constant_along(joint, axis)]
    if len(dims) == 1:
        return [(dims, joint.reshape(-1).copy())]
    if not varying:
        return _factor_constant(dims, joint)
    blocks: list[tuple[tuple[int, ...], np.ndarray]] = [
        ((d,), np.full(joint.shape[axis], NOT_A_CHANNEL, np.int64))
        for axis, d in enumerate(dims) if axis not in varying
    ]
    index = tuple(slice(None) if axis in varying else 0 for axis in range(joint.ndim))
    blocks.append((tuple(dims[axis] for axis in varying), np.ascontiguousarray(joint[index])))
    return blocks


def _factor_constant(dims: tuple[int, ...], joint: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """A joint array holding one id everywhere: a single channel (width-1 group) and broadcast axes.

    The channel goes to the first size-1 axis (the squeezed channel dim), the rest is unlabelled.
    """
    value = int(joint.reshape(-1)[0]) if joint.size else NOT_A_CHANNEL
    sizes = joint.shape
    owner = next((axis for axis, s in enumerate(sizes) if s == 1), 0)
    return [((d,), np.full(sizes[axis], value if axis == owner else NOT_A_CHANNEL, np.int64))
            for axis, d in enumerate(dims)]


def _constant_along(arr: np.ndarray, axis: int) -> bool:
    first = np.take(arr, [0], axis=axis)
    return bool(np.all(arr == first))
