"""Merge baselines the paper's method is compared against, written once for any architecture.

- ``average`` + ``reestimate_bn``: plain weight averaging of N teachers, then BatchNorm running
  statistics recomputed on training data (averaged running statistics describe no network).
- ``weight_matching``: Git Re-Basin's weight matching (Ainsworth et al. 2023), coordinate descent
  over one permutation per *coupling group* found by ``graphmerge.analyze``. A group's permutation
  is applied through the group's ``index_maps`` to every parameter dimension it touches (rows,
  columns, runs of a flatten, BatchNorm vectors and statistics), so no per-architecture code.
- ``magnitude_scores`` / ``random_scores``: channel scores for ``graphmerge.compress(big, scores)``
  that replace the learned gates: is *learning* the selection what helps?
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from graphmerge.passes.groups import GroupSet
from graphmerge.passes.layout import teacher_maps
from graphmerge.passes.util import training_mode
from graphmerge.passes.widen import widen_info
from scipy.optimize import linear_sum_assignment
from torch import nn


def average(models: Sequence[nn.Module]) -> nn.Module:
    """A copy of ``models[0]`` holding the element-wise mean of every floating tensor."""
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    mean = {}
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            mean[name] = torch.stack([s[name] for s in states]).mean(0)
        else:
            mean[name] = tensor.clone()
    merged.load_state_dict(mean)
    return merged


@torch.no_grad()
def reestimate_bn(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``inputs`` (in place; returns ``model``).

    Statistics are reset and accumulated with ``momentum=None`` (a cumulative average over the
    batches), so with one batch they are exactly that batch's mean and unbiased variance.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with training_mode(model, True):
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size])
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    return model


# --- weight matching on coupling groups ---------------------------------------------------------

def permutable_groups(groups: GroupSet) -> list:
    """Groups whose channels may be permuted: the widened ones (pinned ones face the world)."""
    return [g for g in groups if not g.pinned and g.unit == 1]


def apply_permutations(state: dict[str, torch.Tensor], groups: GroupSet,
                       perms: dict[int, np.ndarray]) -> dict[str, torch.Tensor]:
    """``state`` with channel ``c`` of every group ``g`` taken from channel ``perms[g][c]``.

    Each group's ``index_maps[(name, dim)]`` row ``c`` lists the indices channel ``c`` owns along
    that dimension, so one gather per (tensor, dim) moves every row, column, run and BN entry.
    """
    gathers: dict[tuple[str, int], np.ndarray] = {}
    for g in groups:
        perm = perms.get(g.id)
        if perm is None:
            continue
        for (name, dim), index_map in g.index_maps.items():
            if name not in state:
                continue
            index = gathers.setdefault((name, dim), np.arange(state[name].shape[dim]))
            index[index_map.reshape(len(perm), -1)] = index_map[perm].reshape(len(perm), -1)
    out = dict(state)
    for (name, dim), index in gathers.items():
        out[name] = out[name].index_select(dim, torch.as_tensor(index))
    return out


def _channel_rows(tensor: torch.Tensor, dim: int, index_map: np.ndarray) -> torch.Tensor:
    """(width, everything else) view of ``tensor``: row c holds all entries channel c owns."""
    moved = tensor.movedim(dim, 0)
    return moved[torch.as_tensor(index_map.reshape(-1))].reshape(index_map.shape[0], -1).double()


def weight_matching(reference: nn.Module, other: nn.Module, groups: GroupSet, *, max_iter: int = 100,
                    seed: int = 0) -> tuple[nn.Module, dict[int, np.ndarray]]:
    """Permute ``other``'s channels, group by group, to best match ``reference``'s weights.

    Git Re-Basin's coordinate descent: for one group at a time (random order), with the other
    groups' permutations fixed, maximise Σ <W_ref[c], W_other[perm[c]]> over every parameter the
    group touches, by ``linear_sum_assignment``; stop when a full sweep changes nothing.
    Only parameters enter the objective (BatchNorm statistics are data, not weights), but the
    permutation is applied to buffers too. Returns the aligned copy and the permutations.
    """
    params = {name for name, _ in reference.named_parameters()}
    ref_state = reference.state_dict()
    other_state = other.state_dict()
    candidates = permutable_groups(groups)
    perms = {g.id: np.arange(g.width) for g in candidates}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for g in rng.permutation(len(candidates)):
            group = candidates[g]
            others = {k: v for k, v in perms.items() if k != group.id}
            aligned = apply_permutations(other_state, groups, others)
            cost = np.zeros((group.width, group.width))
            for (name, dim), index_map in group.index_maps.items():
                if name in params:
                    a = _channel_rows(ref_state[name], dim, index_map)
                    b = _channel_rows(aligned[name], dim, index_map)
                    cost += (a @ b.T).numpy()
            _, columns = linear_sum_assignment(cost, maximize=True)
            if not np.array_equal(columns, perms[group.id]):
                gain = cost[np.arange(group.width), columns].sum() - cost[np.arange(group.width),
                                                                           perms[group.id]].sum()
                if gain > 1e-12:
                    perms[group.id] = columns
                    changed = True
        if not changed:
            break
    result = copy.deepcopy(other)
    result.load_state_dict(apply_permutations(other_state, groups, perms))
    return result, perms


def rebasin_average(models: Sequence[nn.Module], groups: GroupSet) -> nn.Module:
    """Align every model to ``models[0]`` by weight matching, then average."""
    aligned = [models[0]] + [weight_matching(models[0], m, groups)[0] for m in models[1:]]
    return average(aligned)


# --- selection scores for compress ----------------------------------------------------------------

def magnitude_scores(big: nn.Module) -> dict[int, torch.Tensor]:
    """Per widened group, per big channel: the L2 norm of its consumers' input weights.

    A channel's consumers are the layers reading it (conv/linear inputs, where the gates sit);
    the norm runs over every input-weight entry the channel owns in every consumer (all of its
    run after a flatten). Channels numbered as ``compress`` expects: teacher-major, ``t·width + c``.
    """
    graph_module, info = widen_info(big)
    layout = info.groups.layout
    n, widths, widened = info.n_teachers, info.widths, info.widened
    state = graph_module.state_dict()
    squares = {gid: torch.zeros(n * widths[gid], dtype=torch.float64) for gid in widened}
    for name, positions in layout.in_dims.items():
        dims = layout.params.get(name) or []
        for axis in positions:
            in_dim = dims[axis] if axis < len(dims) else None
            if in_dim is None or name not in state:
                continue
            _, maps = teacher_maps(in_dim, n, widths, widened)
            per_position = state[name].double().movedim(axis, 0).pow(2).reshape(state[name].shape[axis], -1).sum(1)
            for t in range(n):
                for p, (g, c) in enumerate(zip(in_dim.group.tolist(), in_dim.channel.tolist(), strict=True)):
                    if g in widened:
                        squares[g][t * widths[g] + c] += per_position[int(maps[t][p])]
    return {gid: s.sqrt() for gid, s in squares.items()}


def random_scores(big: nn.Module, seed: int) -> dict[int, torch.Tensor]:
    """Per widened group, uniformly random scores: a random choice of channels."""
    _, info = widen_info(big)
    generator = torch.Generator().manual_seed(seed)
    return {g.id: torch.rand(info.n_teachers * g.width, generator=generator) for g in info.groups.widened}
