"""Channel selection: which big channels each widened group keeps when compressed.

``select_channels`` turns ``"teacher:K"`` or per-group scores (gate log-alphas, or any other
ranking) into the kept big-channel indices, in whole units where a group is selected in units
in whole teacher blocks where a normalisation spans a group (so the student normalises over
the same channels the big student did, invariant I3), and never channels that cannot reach the
output under the rest of the selection (``passes.liveness``) while a teacher's channels that can
are left over.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import torch
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.ir import WidenInfo, widen_info
from graphmerge.passes.liveness import DEAD_CHANNEL_POLICIES, dead_teachers, reachable_teachers

Keep = str | dict[int, Any]
#: how groups a normalisation spans are selected: one teacher's whole block, or the top channels of any
NORMALISED_SELECTIONS = ("block", "mixed")


def select_channels(info: WidenInfo, keep: Keep, *, counts: dict[int, int] | None = None,
                    replace_dead: bool | None = None) -> dict[int, np.ndarray]:
    """Which big channels each widened group keeps, in ascending order.

    ``keep`` is ``"teacher:K"`` or ``{group_id: scores}`` (N × width scores; the top ``width``
    are kept, ties broken by lower index). Groups selected in units (conv groups) keep whole
    units, ranked by the sum of their channels' scores. A group a normalisation spans (a pre-norm
    transformer's residual stream) keeps one teacher's whole block, the one with the highest
    score sum, where ``info.normalised_selection`` is ``"block"`` (the default) and the group
    keeps its width: the big student normalises each teacher's block over that block, so the
    student's normalisation over the kept channels is the same one (I3 holds), and every layer
    reading the stream reads one network's features, not a mix of two.

    ``replace_dead`` (default: ``info.dead_channels == "replace"``) swaps kept channels that cannot
    carry information to the output for the best-scored ones of teachers whose can. ``compress``
    passes False for a gated big student's own gates: the student must compute what the gated big
    student computes (I3), and the gate phase's decision step has already steered the gates to the
    replaced selection.
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
    if info.dead_channels not in DEAD_CHANNEL_POLICIES:
        raise GraphMergeError(f"dead_channels must be one of {', '.join(DEAD_CHANNEL_POLICIES)}, got "
                              f"{info.dead_channels!r}.")
    whole_blocks = set(info.groups.layout.across_norm) if info.normalised_selection == "block" else set()
    blocks = _teacher_blocks(info, keep, whole_blocks, counts)
    all_scores: dict[int, np.ndarray] = {}
    for group in info.groups.gated:
        if group.id not in keep:
            raise GraphMergeError(f"no scores for widened group {group.id} (width {group.width}): give a "
                                  f"score for each of its {n * group.width} big channels.")
        scores = np.asarray(torch.as_tensor(keep[group.id]).detach().cpu().double().numpy()).ravel()
        if scores.size != n * group.width:
            raise GraphMergeError(f"group {group.id} has {n * group.width} big channels but {scores.size} "
                                  "scores were given.")
        all_scores[group.id] = scores
        count = (counts or {}).get(group.id, group.width)
        if group.id in blocks:
            kept[group.id] = blocks[group.id] * group.width + np.arange(group.width)
        else:
            kept[group.id] = _top(scores, count, group.unit)
    if info.dead_channels == "replace" if replace_dead is None else replace_dead:
        _replace_dead(info, kept, all_scores, set(blocks))
    return kept


def ratio_counts(info: WidenInfo, ratio: float) -> dict[int, int]:
    """Per gated group, how many big channels a width ``ratio`` of the big student keeps (whole units)."""
    return {g.id: max(1, round(ratio * info.n_teachers * g.width / g.unit)) * g.unit for g in info.groups.gated}


def compressed_selection(big: Any, keep: Keep, *, ratio: float | None = None) -> dict[int, np.ndarray]:
    """The big channels ``compress(big, keep, ratio=ratio)`` keeps. ``keep="gates"`` reads a gated big
    student's own gate scores and swaps no dead channel (the student must compute what the gated big
    student computes, I3); other ``keep`` follow ``WidenInfo.dead_channels``."""
    _, info = widen_info(big)
    from_gates = isinstance(keep, str) and keep == "gates"
    if from_gates:
        if not hasattr(big, "gate_scores"):
            raise GraphMergeError("keep='gates' needs a gated big student (graphmerge.add_gates(big)); for a "
                                  "plain big student pass keep='teacher:K' or per-group scores.")
        keep = big.gate_scores()
    counts = None if ratio is None else ratio_counts(info, ratio)
    return select_channels(info, keep, counts=counts, replace_dead=False if from_gates else None)


def _replace_dead(info: WidenInfo, kept: dict[int, np.ndarray], scores: dict[int, np.ndarray],
                  fixed: set[int]) -> None:
    """Swap kept channels that cannot reach the output (``liveness.dead_teachers``) for the best-scored
    channels of teachers that can, in place, until no group changes. Later groups are mended first,
    so a layer follows the teachers its inputs kept (a filter reading only dropped maps is replaced,
    not the maps it reads). Dropping a dead channel never makes a live one dead; adding a teacher's
    channels to a group can revive that teacher elsewhere, so a group whose dead teachers gained
    channels earlier in the round is checked again before it changes."""
    n = info.n_teachers
    for _ in range(n * len(kept) + 1):
        changed, grown = False, set()
        for gid, dead in dead_teachers(info, kept).items():
            if gid in fixed:
                continue
            if dead & grown:
                dead = dead_teachers(info, kept, only={gid}).get(gid, set())
                if not dead:
                    continue
            group = info.groups[gid]
            owner = np.arange(n * group.width) // group.width
            present = set(np.unique(owner[kept[gid]]).tolist())
            usable = (present - dead) | reachable_teachers(info, kept, gid, set(range(n)) - present)
            if not usable:
                continue
            shift = float(np.ptp(scores[gid])) + 1.0
            adjusted = np.where(np.isin(owner, sorted(usable)), scores[gid], scores[gid] - shift)
            new = _top(adjusted, len(kept[gid]), group.unit)
            if not np.array_equal(new, kept[gid]):
                before = np.bincount(owner[kept[gid]], minlength=n)
                kept[gid], changed = new, True
                grown |= set(np.flatnonzero(np.bincount(owner[new], minlength=n) > before).tolist())
        if not changed:
            return


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
