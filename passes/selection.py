"""Channel selection: which big channels each widened group keeps when compressed.

``select_channels`` turns ``"teacher:K"`` or per-group scores (gate log-alphas, or any other
ranking) into the kept big-channel indices, in whole units where a group is selected in units
and in whole teacher blocks where a normalisation spans a group (so the student normalises over
the same channels the big student did, invariant I3).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import torch
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.ir import WidenInfo

Keep = str | dict[int, Any]
#: how groups a normalisation spans are selected: one teacher's whole block, or the top channels of any
NORMALISED_SELECTIONS = ("block", "mixed")


def select_channels(info: WidenInfo, keep: Keep, *, counts: dict[int, int] | None = None) -> dict[int, np.ndarray]:
    """Which big channels each widened group keeps, in ascending order.

    ``keep`` is ``"teacher:K"`` or ``{group_id: scores}`` (N × width scores; the top ``width``
    are kept, ties broken by lower index). Groups selected in units (conv groups) keep whole
    units, ranked by the sum of their channels' scores. A group a normalisation spans (a pre-norm
    transformer's residual stream) keeps one teacher's whole block, the one with the highest
    score sum, where ``info.normalised_selection`` is ``"block"`` (the default) and the group
    keeps its width: the big student normalises each teacher's block over that block, so the
    student's normalisation over the kept channels is the same one (I3 holds), and every layer
    reading the stream reads one network's features, not a mix of two.
    """
    n = info.n_teachers
    kept: dict[int, np.ndarray] = {}
    if isinstance(keep, str) and keep.startswith("teacher:"):
        try:
            teacher = int(keep.split(":", 1)[1])
        except ValueError:
            raise GraphMergeError(f"keep='{keep}' is not of the form 'teacher:K' with an integer K.") from None
        if not 0 <= teacher < n:
            raise GraphMergeError(f"keep='{keep}' names teacher {teacher}, but the big student has {n} "
                                  f"teachers (0..{n - 1}).")
        for group in info.groups.gated:
            kept[group.id] = teacher * group.width + np.arange(group.width)
        return kept
    if not isinstance(keep, dict):
        raise GraphMergeError(f"keep must be 'gates', 'teacher:K' or a dict of per-group scores; got {keep!r}.")
    if info.normalised_selection not in NORMALISED_SELECTIONS:
        raise GraphMergeError(f"normalised_selection must be one of {', '.join(NORMALISED_SELECTIONS)}, got "
                              f"{info.normalised_selection!r}.")
    whole_blocks = set(info.groups.layout.across_norm) if info.normalised_selection == "block" else set()
    blocks = _teacher_blocks(info, keep, whole_blocks, counts)
    for group in info.groups.gated:
        if group.id not in keep:
            raise GraphMergeError(f"no scores for widened group {group.id} (width {group.width}): give a "
                                  f"score for each of its {n * group.width} big channels.")
        scores = np.asarray(torch.as_tensor(keep[group.id]).detach().cpu().double().numpy()).ravel()
        if scores.size != n * group.width:
            raise GraphMergeError(f"group {group.id} has {n * group.width} big channels but {scores.size} "
                                  "scores were given.")
        count = (counts or {}).get(group.id, group.width)
        if group.id in blocks:
            kept[group.id] = blocks[group.id] * group.width + np.arange(group.width)
        else:
            kept[group.id] = _top(scores, count, group.unit)
    return kept


def _teacher_blocks(info: WidenInfo, keep: dict[int, Any], whole: set[int],
                    counts: dict[int, int] | None) -> dict[int, int]:
    """The teacher whose whole block each group in ``whole`` keeps: groups one normalisation spans
    together (``Layout.norm_spans``) keep the same teacher, the one with the highest score sum over
    all of them (ties: the lower teacher)."""
    n = info.n_teachers
    groups = {g.id: g for g in info.groups.gated if g.id in whole and g.id in keep
              and (counts or {}).get(g.id, g.width) == g.width}
    linked = nx.Graph()
    linked.add_nodes_from(groups)
    for span in info.groups.layout.norm_spans:
        members = [gid for gid in span if gid in groups]
        linked.add_edges_from(zip(members, members[1:], strict=False))
    chosen: dict[int, int] = {}
    for component in nx.connected_components(linked):
        sums = sum(np.asarray(torch.as_tensor(keep[gid]).detach().cpu().double().numpy()).reshape(
            n, groups[gid].width).sum(1) for gid in component)
        best = int(np.argmax(sums))
        chosen.update(dict.fromkeys(component, best))
    return chosen


def _top(scores: np.ndarray, count: int, unit: int) -> np.ndarray:
    if unit > 1:
        per_unit = scores.reshape(-1, unit).sum(1)
        units = np.sort(np.argsort(-per_unit, kind="stable")[: count // unit])
        return (units[:, None] * unit + np.arange(unit)).ravel()
    return np.sort(np.argsort(-scores, kind="stable")[:count])
