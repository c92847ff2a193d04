"""Channel alignment on coupling groups: Git Re-Basin's weight matching and ZipIt!-style feature
matching, for any architecture ``graphmerge.analyze`` captures.

Two independently trained networks compute similar features in different channel orders, so the
element-wise mean of their weights mixes unrelated channels. Both methods find one permutation per
*coupling group* (the channels that must move together: a residual stream, a BatchNorm's inputs,
the runs of a flatten, heads) and apply it through the group's ``index_maps`` to every parameter
and buffer dimension the group touches, so there is no per-architecture code.

- ``weight_matching`` (Ainsworth et al. 2023): coordinate descent over groups, each step a linear
  assignment maximising the inner products of the weights the group touches.
- ``feature_matching`` (Stoica et al. 2024, across models only: no within-model merges, no partial
  zipping): the graph runs on data; at each group's gate sites (the inputs of the layers reading
  it) channels are correlated across the two models and matched by maximum total correlation.
- ``rebasin_average`` / ``zipit_average``: align every model to the first, then average
  (``graphmerge.alternatives.weight_average``, BatchNorm statistics recomputed on data).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.fx
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import DataLoader, Dataset

from graphmerge.alternatives import reestimate_batchnorm, weight_average
from graphmerge.errors import CertificateError, GraphMergeError
from graphmerge.passes.ir import DimLayout, Group, GroupSet
from graphmerge.passes.util import eval_mode, one_line

__all__ = ["channel_choice", "feature_correlations", "feature_matching", "mosaic", "permutable_groups",
           "permute_channels", "permuted_copy", "rebasin_average", "weight_matching", "zipit_average"]


def _need_two(models: Sequence[nn.Module], what: str) -> None:
    if len(models) < 2:
        raise GraphMergeError(f"{what} merges two or more models, got {len(models)}: pass every teacher.")


# --- weight matching on coupling groups ---------------------------------------------------------

def permutable_groups(groups: GroupSet) -> list[Group]:
    """Groups whose channels may be permuted: the widened ones (pinned ones face the world), less
    averaged graph outputs (their channel order is the output's) and multi-channel selection units."""
    return [g for g in groups if not g.pinned and not g.averaged and g.unit == 1]


def permute_channels(state: dict[str, torch.Tensor], groups: GroupSet,
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


def permuted_copy(model: nn.Module, groups: GroupSet, perms: dict[int, np.ndarray],
                  example_inputs: torch.Tensor | tuple | None = None) -> nn.Module:
    """A copy of ``model`` with ``perms`` applied (``permute_channels``), checked to compute what
    ``model`` computes (eval mode, float32, 1e-4 of the output's scale): a permutation within coupling
    groups is a symmetry of the network, and the check says so. Without ``example_inputs`` it runs on
    inputs drawn in the shapes the analysis captured (random floats, zeros for integer inputs); where
    the model does not run on those, it warns that the copy is unchecked."""
    result = copy.deepcopy(model)
    result.load_state_dict(permute_channels(model.state_dict(), groups, perms))
    drawn = example_inputs is None
    inputs = _captured_shapes(groups, next(iter(model.parameters()), torch.empty(0)).device) if drawn else \
        example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad(), eval_mode(model), eval_mode(result):
            expected, actual = model(*inputs), result(*inputs)
    except Exception as error:  # noqa: BLE001 - drawn inputs the model rejects: say so, never guess
        if not drawn:
            raise
        warnings.warn(f"the aligned copy is unchecked: the model does not run on inputs drawn in the captured "
                      f"shapes ({type(error).__name__}: {one_line(error, 200)}); pass example_inputs to "
                      "check that the permutation is a symmetry of the model.", stacklevel=2)
        return result
    if not isinstance(expected, torch.Tensor) or not isinstance(actual, torch.Tensor):
        return result  # structured outputs: compared by the caller, if at all
    error = float((actual.double() - expected.double()).abs().max())
    scale = max(1.0, float(expected.double().abs().max()))
    if error > 1e-4 * scale:
        raise CertificateError(
            f"permuting the channels of the coupling groups {sorted(perms)[:8]} changed what the model computes "
            f"(max error {error:.3g} at output scale {scale:.3g}): the groups do not describe a symmetry of this "
            "model, so its aligned copy would be a different network. This is a gap in graphmerge's op rules; "
            "please report it with the model. Align without the group named first in the list, or average "
            "without alignment (align='none').")
    return result


def _captured_shapes(groups: GroupSet, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One input per placeholder of the analysed graph, in its captured shape and dtype, on ``device``."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for node in groups.graph_module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            shape = tuple(int(d) for d in value.shape)
            drawn = torch.randn(shape, generator=generator) if value.is_floating_point() else torch.zeros(shape)
            inputs.append(drawn.to(device, value.dtype))
    return tuple(inputs)


def _channel_rows(tensor: torch.Tensor, dim: int, index_map: np.ndarray) -> torch.Tensor:
    """(width, everything else) view of ``tensor``: row c holds all entries channel c owns."""
    moved = tensor.movedim(dim, 0)
    return moved[torch.as_tensor(index_map.reshape(-1))].reshape(index_map.shape[0], -1).double()


def weight_matching(reference: nn.Module, other: nn.Module, groups: GroupSet, *, max_iter: int = 100,
                    seed: int = 0, example_inputs: torch.Tensor | tuple | None = None
                    ) -> tuple[nn.Module, dict[int, np.ndarray]]:
    """Permute ``other``'s channels, group by group, to best match ``reference``'s weights.

    Git Re-Basin's coordinate descent: for one group at a time (random order), with the other
    groups' permutations fixed, maximise Σ <W_ref[c], W_other[perm[c]]> over every parameter the
    group touches, by ``linear_sum_assignment``; stop when a full sweep changes nothing.
    Only parameters enter the objective (BatchNorm statistics are data, not weights), but the
    permutation is applied to buffers too. Returns the aligned copy and the permutations; with
    ``example_inputs`` the copy is checked to compute what ``other`` computes (``permuted_copy``).
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
            aligned = permute_channels(other_state, groups, others)
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
    return permuted_copy(other, groups, perms, example_inputs), perms


def rebasin_average(models: Sequence[nn.Module], groups: GroupSet,
                    bn_data: Dataset | DataLoader | torch.Tensor | None = None, *, batch_size: int = 256,
                    example_inputs: torch.Tensor | tuple | None = None) -> nn.Module:
    """Align every model to ``models[0]`` by weight matching, then average (``weight_average``; with
    ``bn_data`` the BatchNorm statistics are recomputed on it). Each alignment is checked on
    ``example_inputs`` (default: ``bn_data`` when it is a tensor)."""
    _need_two(models, "rebasin_average")
    if example_inputs is None and isinstance(bn_data, torch.Tensor):
        example_inputs = bn_data[:32]
    aligned = [models[0]] + [weight_matching(models[0], m, groups, example_inputs=example_inputs)[0]
                             for m in models[1:]]
    return weight_average(aligned, bn_data, batch_size)


# --- activation (feature) matching on coupling groups ----------------------------------------------

Site = tuple[str, int, np.ndarray]  # (graph node, its channel dim, (width, run) positions per channel)


def _group_positions(dim_layout: DimLayout | None, group: Group) -> np.ndarray | None:
    """(width, run) positions of ``group``'s channels along a laid-out dim: row c lists channel c's
    positions in order (run > 1 after a flatten, or a head's run); None if the group is not all there."""
    if dim_layout is None:
        return None
    positions = np.flatnonzero(dim_layout.group == group.id)
    if not positions.size:
        return None
    channels = dim_layout.channel[positions]
    counts = np.bincount(channels, minlength=group.width)
    if len(counts) != group.width or counts.min() != counts.max():
        return None
    return positions[np.argsort(channels, kind="stable")].reshape(group.width, -1)


def _samples_unpermuted(dims: list[DimLayout | None], dim: int, permuted: set[int]) -> bool:
    """Whether every dim of a node but ``dim`` is free of permuted channels: those dims are flattened
    into samples, which must line up between the two models whatever the other groups' permutations."""
    return all(d is None or not np.isin(d.group, list(permuted)).any() for axis, d in enumerate(dims) if axis != dim)


def feature_sites(groups: GroupSet, candidates: Sequence[Group]) -> dict[int, list[Site]]:
    """Per group, the activations whose channels are matched: the gate sites (each layer input that
    reads the group, so after its nonlinearity), one per distinct (node, dim). A group without a gate
    site falls back to every activation node with a dim that holds that group alone. Parameters are
    never sites (their other dims are other groups' channels, not samples)."""
    layout = groups.layout
    nodes = {node.name: node for node in groups.graph_module.graph.nodes}
    permuted = {g.id for g in candidates}
    sites: dict[int, list[Site]] = {g.id: [] for g in candidates}

    def is_activation(node: torch.fx.Node | None) -> bool:
        return isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_module", "call_method")

    seen: set[tuple[str, int]] = set()
    for site in layout.gate_sites:
        consumer = nodes.get(site.node)
        source = consumer.args[site.arg_index] if consumer is not None and site.arg_index < len(consumer.args) else None
        if not is_activation(source) or (source.name, site.dim) in seen:
            continue
        seen.add((source.name, site.dim))
        dims = layout.nodes.get(source.name) or []
        if site.dim >= len(dims) or not _samples_unpermuted(dims, site.dim, permuted):
            continue
        for group in candidates:
            index = _group_positions(dims[site.dim], group)
            if index is not None:
                sites[group.id].append((source.name, site.dim, index))
    for group in candidates:
        if sites[group.id]:
            continue
        for name, dims in layout.nodes.items():
            if not is_activation(nodes.get(name)):
                continue
            for dim, dim_layout in enumerate(dims):
                if (dim_layout is not None and dim_layout.group.size and (dim_layout.group == group.id).all()
                        and _samples_unpermuted(dims, dim, permuted)):
                    index = _group_positions(dim_layout, group)
                    if index is not None:
                        sites[group.id].append((name, dim, index))
    return sites


class _Recorder(torch.fx.Interpreter):
    """Runs a captured graph and keeps the outputs of the named nodes."""

    def __init__(self, module: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(module)
        self.wanted = wanted
        self.recorded: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> object:
        result = super().run_node(n)
        if n.name in self.wanted:
            self.recorded[n.name] = result
        return result


def _graph_of(model: nn.Module, groups: GroupSet) -> torch.fx.GraphModule:
    """The analysed graph holding ``model``'s tensors, in eval mode (a copy: the analysed model is untouched)."""
    graph_module = copy.deepcopy(groups.graph_module)
    result = graph_module.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise GraphMergeError(
            f"the model has state {result.unexpected_keys[:3]} that the analysed graph lacks: the groups come "
            "from a different architecture. Analyse the reference model with graphmerge.analyze and pass "
            "teachers of that same architecture.")
    return graph_module.eval()


def _channel_features(activation: torch.Tensor, dim: int, index: np.ndarray) -> torch.Tensor:
    """(width, samples): channel c's values at all its positions, over the batch and every other dim."""
    flat = activation.detach().movedim(dim, 0).reshape(activation.shape[dim], -1)
    return flat[torch.as_tensor(index.reshape(-1), device=flat.device)].reshape(index.shape[0], -1).double().cpu()


class _CrossMoments:
    """Running sums for the correlation of every reference channel with every other channel."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.sum_a = torch.zeros(width, dtype=torch.float64)
        self.sum_b = torch.zeros(width, dtype=torch.float64)
        self.square_a = torch.zeros(width, dtype=torch.float64)
        self.square_b = torch.zeros(width, dtype=torch.float64)
        self.cross = torch.zeros(width, width, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.count += a.shape[1]
        self.sum_a += a.sum(1)
        self.sum_b += b.sum(1)
        self.square_a += a.pow(2).sum(1)
        self.square_b += b.pow(2).sum(1)
        self.cross += a @ b.T

    def correlation(self) -> torch.Tensor:
        """Pearson correlation (width x width); a constant channel correlates 0 with everything."""
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.square_a / n - mean_a.pow(2)).clamp_min(0).sqrt()
        std_b = (self.square_b / n - mean_b.pow(2)).clamp_min(0).sqrt()
        covariance = self.cross / n - torch.outer(mean_a, mean_b)
        # a spread below 1e-6 of the largest root mean square is rounding, not signal
        live_a = std_a > 1e-6 * float((self.square_a / n).sqrt().max())
        live_b = std_b > 1e-6 * float((self.square_b / n).sqrt().max())
        correlation = covariance / torch.outer(torch.where(live_a, std_a, 1.0), torch.where(live_b, std_b, 1.0))
        return correlation * torch.outer(live_a, live_b)


@torch.no_grad()
def feature_correlations(reference: nn.Module, other: nn.Module, groups: GroupSet, inputs: torch.Tensor, *,
                         batch_size: int = 256) -> dict[int, np.ndarray]:
    """Per permutable group, ``corr[i, j]``: how reference channel i's activations correlate with
    other's channel j's on ``inputs`` (eval mode), summed over the group's feature sites."""
    candidates = permutable_groups(groups)
    sites = feature_sites(groups, candidates)
    wanted = {name for group_sites in sites.values() for name, _, _ in group_sites}
    graphs = [_graph_of(reference, groups), _graph_of(other, groups)]
    moments = {(g.id, s): _CrossMoments(g.width) for g in candidates for s in range(len(sites[g.id]))}
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        recorders = [_Recorder(graph, wanted) for graph in graphs]
        for recorder in recorders:
            recorder.run(batch)
        ref, oth = recorders[0].recorded, recorders[1].recorded
        for (gid, s), moment in moments.items():
            name, dim, index = sites[gid][s]
            moment.add(_channel_features(ref[name], dim, index), _channel_features(oth[name], dim, index))
    correlations = {}
    for group in candidates:
        if not sites[group.id]:
            continue  # nothing to observe it by: left as it is
        total = torch.zeros(group.width, group.width, dtype=torch.float64)
        for s in range(len(sites[group.id])):
            total += moments[(group.id, s)].correlation()
        correlations[group.id] = total.numpy()
    return correlations


def feature_matching(reference: nn.Module, other: nn.Module, groups: GroupSet, inputs: torch.Tensor, *,
                     batch_size: int = 256) -> tuple[nn.Module, dict[int, np.ndarray]]:
    """Permute ``other``'s channels, group by group, so its activations best match ``reference``'s.

    Per group, ``linear_sum_assignment`` maximises the summed correlation (``feature_correlations``).
    One pass suffices: permuting one group only reorders the other groups' channels, so every
    group's correlations are the same before and after the others are matched. A channel constant
    on ``inputs`` (dead after its ReLU) correlates with nothing, so its partner is arbitrary. Returns
    the aligned copy and the permutations (aligned channel c is ``other``'s channel ``perms[g][c]``),
    the copy checked on ``inputs`` to compute what ``other`` computes (``permuted_copy``).
    """
    correlations = feature_correlations(reference, other, groups, inputs, batch_size=batch_size)
    perms = {gid: linear_sum_assignment(corr, maximize=True)[1] for gid, corr in correlations.items()}
    return permuted_copy(other, groups, perms, inputs[:32]), perms


def zipit_average(models: Sequence[nn.Module], groups: GroupSet, inputs: torch.Tensor, *,
                  batch_size: int = 256) -> nn.Module:
    """Align every model to ``models[0]`` by feature matching on ``inputs``, average, then recompute
    the BatchNorm statistics on ``inputs``."""
    _need_two(models, "zipit_average")
    aligned = [models[0]] + [feature_matching(models[0], m, groups, inputs, batch_size=batch_size)[0]
                             for m in models[1:]]
    return weight_average(aligned, inputs, batch_size=batch_size)


# --- a mosaic of aligned models ----------------------------------------------------------------------

def channel_choice(models: Sequence[nn.Module], groups: GroupSet) -> dict[int, np.ndarray]:
    """Per permutable group, per channel: the model whose version of the channel its consumers weigh
    most (the largest norm of the input weights reading it, summed over every layer that reads it).

    ``models`` must be aligned (``feature_matching`` / ``weight_matching``), so that channel ``c`` is
    one feature in all of them. A group no layer reads is scored by the weights that write it."""
    states = [m.state_dict() for m in models]
    layout = groups.layout
    choice = {}
    for group in permutable_groups(groups):
        scores = np.zeros((len(models), group.width))
        for use in ("in", "out"):
            for (name, dim), index_map in group.index_maps.items():
                reads = dim in (layout.in_dims.get(name) or ())
                writes = layout.out_dims.get(name) == dim
                if name not in states[0] or not (reads if use == "in" else writes):
                    continue
                for t, state in enumerate(states):
                    scores[t] += _channel_rows(state[name], dim, index_map).pow(2).sum(1).numpy()
            if scores.any():
                break
        choice[group.id] = scores.argmax(0)
    return choice


def _owner_dim(maps: dict[int, list[tuple[int, np.ndarray]]], out_dim: int | None) -> int | None:
    if out_dim in maps:
        return out_dim
    return min(maps) if maps else None


def mosaic(models: Sequence[nn.Module], groups: GroupSet, choice: dict[int, np.ndarray] | None = None, *,
           bn_data: Dataset | DataLoader | torch.Tensor | None = None, batch_size: int = 256) -> nn.Module:
    """One model of the same architecture built from aligned ``models`` channel by channel.

    ``choice[g][c]`` names the model that supplies channel ``c`` of group ``g`` (default:
    ``channel_choice``). Every parameter entry comes from the model chosen for its channel along the
    parameter's output dimension (the rows of a linear or conv weight, a norm's vector), or along its
    first chosen dimension where the output is not chosen (a classifier's columns): a kept unit keeps
    all of its own input weights, read in the aligned channel order, so unlike a selection from the
    concatenated models (block-diagonal across teachers) every unit reads every feature. Entries no
    chosen group owns (a classifier's bias, an input layer's taps) are averaged. With ``bn_data`` the
    BatchNorm statistics are recomputed on it.
    """
    _need_two(models, "mosaic")
    if choice is None:
        choice = channel_choice(models, groups)
    states = [m.state_dict() for m in models]
    owners: dict[str, dict[int, list[tuple[int, np.ndarray]]]] = {}
    for group in groups:
        if group.id not in choice:
            continue
        for (name, dim), index_map in group.index_maps.items():
            owners.setdefault(name, {}).setdefault(dim, []).append((group.id, index_map))
    merged = {}
    for name, tensor in states[0].items():
        if not tensor.is_floating_point():
            merged[name] = tensor.clone()
            continue
        stacked = torch.stack([s[name] for s in states])
        value = stacked.mean(0)
        dim = _owner_dim(owners.get(name, {}), groups.layout.out_dims.get(name))
        if dim is not None:
            source = np.full(tensor.shape[dim], -1)
            for gid, index_map in owners[name][dim]:
                source[index_map.reshape(len(choice[gid]), -1)] = np.asarray(choice[gid])[:, None]
            for t in range(len(models)):
                positions = torch.as_tensor(np.flatnonzero(source == t))
                value.index_copy_(dim, positions, stacked[t].index_select(dim, positions))
        merged[name] = value
    result = copy.deepcopy(models[0])
    result.load_state_dict(merged)
    if bn_data is not None:
        reestimate_batchnorm(result, bn_data, batch_size)
    return result.eval()
