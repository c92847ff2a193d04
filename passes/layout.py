"""Where each teacher's channels sit in the big student, dimension by dimension.

A labelled dimension is a sequence of *pieces*: a whole group (each channel repeated ``run``
times after a flatten), or a position shared by all teachers (a pinned channel, a kernel tap).
In the big student a widened piece becomes ``N`` copies side by side, teacher-major; a shared
position stays one. Because ``cat`` concatenates pieces and ``split``/slicing cut at piece
boundaries, this layout is exactly what the unchanged graph ops compute in the big student.

A dimension whose positions are a fixed permutation of whole groups (after a channel shuffle)
cannot be cut into pieces; it is laid out teacher-major as a whole: ``[all of teacher 0, ...]``.

The same description serves widen (scatter) and compress (gather), so slicing inverts scattering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from graphmerge.passes.ir import DimLayout


@dataclass
class Piece:
    start: int
    length: int
    group: int
    run: int
    shared: bool


class LayoutError(ValueError):
    """A dimension mixes shared and widened channels in an order no piece layout describes."""


def pieces(dim: DimLayout, widths: dict[int, int], widened: set[int]) -> list[Piece] | None:
    """Cut a dimension into pieces, or None when it is a permutation of whole groups."""
    group, channel = dim.group, dim.channel
    n = len(group)
    starts = dim.start if dim.start is not None else np.zeros(n, bool)
    out: list[Piece] = []
    p = 0
    while p < n:
        g = int(group[p])
        if g < 0 or g not in widened:
            q = p + 1
            while q < n and (group[q] < 0 or int(group[q]) not in widened):
                q += 1
            out.append(Piece(p, q - p, -1, 1, True))
            p = q
            continue
        if channel[p] != 0:
            return None
        run = 1
        while p + run < n and group[p + run] == g and channel[p + run] == 0 and not starts[p + run]:
            run += 1
        length = widths[g] * run
        expected = np.repeat(np.arange(widths[g]), run)
        if p + length > n or not np.array_equal(channel[p:p + length], expected) \
                or not np.all(group[p:p + length] == g):
            return None
        out.append(Piece(p, length, g, run, False))
        p += length
    return out


def teacher_maps(dim: DimLayout, n_teachers: int, widths: dict[int, int],
                 widened: set[int]) -> tuple[int, list[np.ndarray]]:
    """Big size of the dimension and, per teacher, where each of its positions goes."""
    n = len(dim.group)
    parts = pieces(dim, widths, widened)
    if parts is None:
        if not np.all(np.isin(dim.group, list(widened))):
            raise LayoutError("a dimension permutes widened channels together with shared ones")
        return n * n_teachers, [np.arange(n) + t * n for t in range(n_teachers)]
    maps = [np.empty(n, np.int64) for _ in range(n_teachers)]
    offset = 0
    for piece in parts:
        span = np.arange(piece.length)
        for t in range(n_teachers):
            shift = 0 if piece.shared else t * piece.length
            maps[t][piece.start:piece.start + piece.length] = offset + shift + span
        offset += piece.length * (1 if piece.shared else n_teachers)
    return offset, maps


def shared_mask(dim: DimLayout, widened: set[int]) -> np.ndarray:
    """True at positions all teachers share (they are written N times, or average at a head)."""
    return ~np.isin(dim.group, list(widened))


def student_map(dim: DimLayout, n_teachers: int, widths: dict[int, int], widened: set[int],
                kept: dict[int, np.ndarray]) -> np.ndarray:
    """For each position of the student's dimension, the big-student position it is taken from.

    The student keeps ``len(kept[g])`` channels of group ``g`` (its teacher width, or fewer or
    more under a width ratio); a permuted dimension supports only the teacher width.

    ``kept[g]`` lists, in order, the big channels of group ``g`` the student keeps: big channel
    ``k`` is channel ``k % width`` of teacher ``k // width``.
    """
    n = len(dim.group)
    parts = pieces(dim, widths, widened)
    if parts is None:
        out = np.empty(n, np.int64)
        first = _first_position(dim)
        for p in range(n):
            g, c = int(dim.group[p]), int(dim.channel[p])
            k = int(kept[g][c])
            teacher, source_channel = divmod(k, widths[g])
            occurrence = int(np.sum((dim.group[:p] == g) & (dim.channel[:p] == c)))
            out[p] = teacher * n + first[(g, source_channel)][occurrence]
        return out
    chunks = []
    offset = 0
    for piece in parts:
        if piece.shared:
            chunks.append(offset + np.arange(piece.length))
            offset += piece.length
            continue
        width = widths[piece.group]
        teacher, channel = np.divmod(np.asarray(kept[piece.group]), width)
        source = teacher * width * piece.run + channel * piece.run
        chunks.append(offset + (source[:, None] + np.arange(piece.run)).ravel())
        offset += piece.length * n_teachers
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


def _first_position(dim: DimLayout) -> dict[tuple[int, int], list[int]]:
    where: dict[tuple[int, int], list[int]] = {}
    for p, (g, c) in enumerate(zip(dim.group.tolist(), dim.channel.tolist(), strict=True)):
        where.setdefault((g, c), []).append(p)
    return where
