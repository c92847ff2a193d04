"""Gate: one tied hard-concrete gate vector per widened group, at the inputs of its consumers.

Each forward draws ONE realisation per group (per sample) and every site of the group multiplies
by it: the tying the paper does by hand for ResNet skip connections. Sites are the inputs of the
ops that mix across the group (conv and linear inputs), which sit after BatchNorm and the
non-linearity, so nothing downstream can undo a closed gate.

``add_gates`` builds a ``GatedStudent`` from a big student. The gate parameters and their draw
live in ``hard_concrete.py``, the budget and decision projections a gate phase applies in
``gate_budget.py``, the ops the gated graph calls in ``gate_ops.py`` and the choice of kept
channels in ``selection.py``; this module is the public home of all of their names (``__all__``).
"""

from __future__ import annotations

import copy
import inspect
import operator
import types
import warnings
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.batch import NO_BATCH, BatchPlace, locate_batch, reference_input
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.gate_budget import (
    DECISION_LEVEL,
    budget_projection,
    budget_target,
    decided_projection,
    decision_strength,
)
from graphmerge.passes.gate_ops import apply_gate, gather_gate_values
from graphmerge.passes.hard_concrete import UNIFORM, HardConcreteGates, hard_concrete_sample
from graphmerge.passes.ir import WidenInfo, widen_info
from graphmerge.passes.layout import teacher_maps
from graphmerge.passes.registry import describe
from graphmerge.passes.selection import NORMALISED_SELECTIONS, Keep, select_channels
from torch import nn

__all__ = [
    "DECISION_LEVEL", "GATES", "NORMALISED_SELECTIONS", "GatedStudent", "HardConcreteGates", "Keep", "add_gates",
    "apply_gate", "budget_projection", "budget_target", "decided_projection", "decision_strength",
    "gather_gate_values", "hard_concrete_sample", "select_channels",
]

GATES = "graphmerge_gates"
GATHER_INDEX = "graphmerge_gate_gather_index"


def _run_length(index: np.ndarray) -> int:
    """The largest ``L`` for which ``index`` is ``L`` copies of each entry of ``index[::L]`` in a row
    (a flattened input's positions sharing their channel's gate), 1 if none."""
    size = len(index)
    for length in range(size, 1, -1):
        if size % length == 0 and bool((index.reshape(-1, length) == index[::length, None]).all()):
            return length
    return 1


def _forward_named_like(graph_module: torch.fx.GraphModule) -> Any:
    def forward(self: GatedStudent, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    named = inspect.signature(graph_module.forward)
    forward.__signature__ = named.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *named.parameters.values()])
    return forward


class GatedStudent(nn.Module):
    """A big student with gates at every consumer of every widened group."""

    def __init__(self, graph_module: torch.fx.GraphModule, n_teachers: int):
        super().__init__()
        self.graph_module = graph_module
        self.n_teachers = n_teachers
        # forward takes the captured graph's inputs by name (input_ids, attention_mask, ...): trainers that
        # read a model's signature (transformers.Trainer) pass exactly those
        self.forward = types.MethodType(_forward_named_like(graph_module), self)

    @property
    def gates(self) -> HardConcreteGates:
        return getattr(self.graph_module, GATES)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def gate_parameters(self):
        return self.gates.parameters()

    def gate_parameter_names(self) -> list[str]:
        """The names, under this module, of the gates' log-alphas (one parameter per group), in the
        order :meth:`flat_log_alpha` concatenates them."""
        return [f"graph_module.{GATES}.log_alpha.g{gid}" for gid in self.gates.group_ids]

    def weight_parameters(self):
        gate_ids = {id(p) for p in self.gates.parameters()}
        return (p for p in self.parameters() if id(p) not in gate_ids)

    @property
    def gate_noise_name(self) -> str:
        """The name, under this module, of the gates' buffer of explicit training uniforms: give it a
        ``(batch, number of gates)`` tensor (``torch.func.functional_call(student, {name: u, ...}, x)``)
        and the training forward uses those uniforms instead of drawing its own."""
        return f"graph_module.{GATES}.{UNIFORM}"

    def flat_log_alpha(self) -> torch.Tensor:
        """Every gate's log-alpha in one vector, group after group (detached): the layout the functional
        schedule (:meth:`projected_log_alpha`, :meth:`decided_log_alpha`) works on."""
        return self.gates.all_log_alpha().detach()

    def gate_loss(self) -> torch.Tensor:
        """Σ over groups of (1/N − mean P[g > 0])², the paper's L_half for N teachers."""
        target = 1.0 / self.n_teachers
        losses = [(target - self.gates.prob_open(gid).mean()) ** 2 for gid in self.gates.group_ids]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def project_to_budget(self, target: float, direction: str = "gradient") -> None:
        """Bring every group's mean P[g > 0] down to ``target`` at most (see ``budget_projection``)."""
        self.gates.set_all_log_alpha(self.projected_log_alpha(self.flat_log_alpha(), target, direction))

    def decide(self, target: float, strength: float, direction: str = "gradient") -> None:
        """Drive the gates ``strength`` (0..1) of the way to the channels compress keeps now (the
        top 1/N of each group by gate score, in whole units where a group is kept in units), every
        group's mean P[g > 0] held at exactly ``target`` (see ``decided_projection``)."""
        self.gates.set_all_log_alpha(self.decided_log_alpha(self.flat_log_alpha(), target, strength, direction))

    # -- the same steps on log-alphas held elsewhere (``(..., gates)``: e.g. one row per stacked model)

    def projected_log_alpha(self, log_alpha: torch.Tensor, target: float | torch.Tensor,
                            direction: str = "gradient") -> torch.Tensor:
        """``log_alpha`` (laid out as :meth:`flat_log_alpha`, any leading dims) after :meth:`project_to_budget`."""
        if not self.gates.group_ids:
            return log_alpha
        return budget_projection(log_alpha.detach(), self.gates.segments().to(log_alpha.device), target,
                                 self.gates.open_shift, direction=direction, groups=len(self.gates.group_ids))

    def decision_mask(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """True for each gate whose channel compress would keep were ``log_alpha`` the gate scores
        (``select_channels``), per leading row."""
        gates = self.gates
        if not gates.group_ids:
            return torch.zeros(log_alpha.shape, dtype=torch.bool, device=log_alpha.device)
        _, info = widen_info(self)
        rows = log_alpha.detach().reshape(-1, gates.total)
        mask = torch.zeros(rows.shape, dtype=torch.bool)
        for scores, row in zip(rows, mask, strict=True):
            kept = select_channels(info, {gid: scores[start:start + gates.log_alpha[f"g{gid}"].numel()]
                                          for gid, start in gates.offsets.items()})
            for gid in gates.group_ids:
                row[gates.offsets[gid] + torch.as_tensor(kept[gid], dtype=torch.long)] = True
        return mask.view(log_alpha.shape).to(log_alpha.device)

    def decided_log_alpha(self, log_alpha: torch.Tensor, target: float, strength: float,
                          direction: str = "gradient") -> torch.Tensor:
        """``log_alpha`` (laid out as :meth:`flat_log_alpha`, any leading dims) after :meth:`decide`."""
        if not self.gates.group_ids:
            return log_alpha
        level = (2 * strength - 1) * DECISION_LEVEL
        return decided_projection(log_alpha.detach(), self.gates.segments().to(log_alpha.device),
                                  self.decision_mask(log_alpha), level, target, self.gates.open_shift, direction)

    def open_fraction(self) -> dict[int, float]:
        return {gid: float(self.gates.prob_open(gid).detach().mean()) for gid in self.gates.group_ids}

    def expected_open(self) -> dict[int, float]:
        return {gid: float(self.gates.prob_open(gid).detach().sum()) for gid in self.gates.group_ids}

    def gate_scores(self) -> dict[int, torch.Tensor]:
        return {gid: self.gates.log_alpha[f"g{gid}"].detach().clone() for gid in self.gates.group_ids}

    def eval_gate_values(self) -> dict[int, torch.Tensor]:
        return {gid: self.gates.eval_value(gid).detach().clone() for gid in self.gates.group_ids}

    def teacher_share(self) -> dict[int, list[int]]:
        """How many of each group's top-``width`` channels (by gate score) come from each teacher."""
        _, info = widen_info(self)
        kept = select_channels(info, self.gate_scores(), replace_dead=False)
        return {gid: np.bincount(k // info.widths[gid], minlength=self.n_teachers).tolist()
                for gid, k in kept.items()}

    @torch.no_grad()
    def set_gates(self, masks: dict[int, Any], *, high: float = 20.0) -> None:
        """Make the eval gate exactly 1 where ``masks[g]`` is True and exactly 0 where False."""
        _, info = widen_info(self)
        for gid, mask in masks.items():
            mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
            param = self.gates.log_alpha[f"g{gid}"]
            if mask.numel() != param.numel():
                raise GraphMergeError(f"group {gid} has {param.numel()} gates but the mask has {mask.numel()}.")
            unit = info.groups[gid].unit
            if unit > 1 and not bool((mask.view(-1, unit) == mask.view(-1, unit)[:, :1]).all()):
                raise GraphMergeError(f"group {gid} is selected in whole units of {unit} channels (conv groups); "
                                      "the mask must open or close each unit as a whole.")
            param.copy_(torch.where(mask, torch.full_like(param, high), torch.full_like(param, -high)))


def add_gates(big: torch.fx.GraphModule, *, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1,
              init_mean: float = 1.0, init_std: float = 0.01, seed: int | None = None) -> GatedStudent:
    """A copy of ``big`` with one tied gate vector per widened group (``big`` is not modified)."""
    big, info = widen_info(big)
    groups = info.groups
    n = info.n_teachers
    widths, widened = info.widths, info.widened
    sizes = {g.id: n * g.width for g in groups.gated}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    gates = HardConcreteGates(sizes, beta=beta, gamma=gamma, zeta=zeta, init_mean=init_mean,
                              init_std=init_std, generator=generator)
    gated = copy.deepcopy(big)  # its WidenInfo is a copy sharing the analysis (WidenInfo.__deepcopy__)
    gated.add_submodule(GATES, gates)
    graph = gated.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        gate_node = graph.call_module(GATES, (reference_input(gated),))
    nodes = {node.name: node for node in graph.nodes}
    sites = []  # (consumer node, argument position, activation dim, buffer, gathered index)
    for site, (node_name, arg_index, act_dim, param) in enumerate(groups.layout.gate_sites):
        node = nodes.get(node_name)
        dims = groups.layout.params.get(param, [])
        position = (groups.layout.in_dims.get(param) or (1,))[0]
        in_dim = dims[position] if position < len(dims) else None
        if node is None or in_dim is None or not np.isin(in_dim.group, list(widened)).any():
            continue
        _check_activation(node, arg_index)
        index = _site_index(in_dim, n, widths, widened, gates)
        buffer = f"graphmerge_gate_index_{site}"
        gated.register_buffer(buffer, torch.as_tensor(index, dtype=torch.long), persistent=False)
        # a flattened C x L input gathers its C channels' values only; apply_gate broadcasts them
        sites.append((node, arg_index, act_dim, buffer, index[::_run_length(index)]))
    places = _batch_places(big, info, [node.args[arg_index] for node, arg_index, *_ in sites])
    # One gather per forward for all sites; sites reading the same gate entries in the same order
    # (the consumers of one residual stream) share one run of it.
    runs: dict[bytes, int] = {}
    distinct: list[np.ndarray] = []
    for *_, index in sites:
        if index.tobytes() not in runs:
            runs[index.tobytes()] = len(distinct)
            distinct.append(index)
    if sites:
        # runs that are consecutive gates and, in order of their first gate, tile 0..K-1: views of
        # the gates (narrow and split), no gather
        order = sorted(range(len(distinct)), key=lambda r: int(distinct[r][0]))
        tiled = np.concatenate([distinct[r] for r in order])
        if bool((tiled == np.arange(len(tiled))).all()):
            runs = {key: order.index(r) for key, r in runs.items()}
            distinct = [distinct[r] for r in order]
            gather_index = None
        else:
            gated.register_buffer(GATHER_INDEX, torch.as_tensor(np.concatenate(distinct), dtype=torch.long),
                                  persistent=False)
            with graph.inserting_after(gate_node):
                gather_index = graph.get_attr(GATHER_INDEX)
        with graph.inserting_after(gate_node if gather_index is None else gather_index):
            gathered = graph.call_function(gather_gate_values, (gate_node, gather_index, [len(i) for i in distinct]))
        values = []
        with graph.inserting_after(gathered):
            for run in range(len(distinct)):
                values.append(graph.call_function(operator.getitem, (gathered, run)))
    # one product per gated activation: consumers of one activation gated by one run (a residual
    # stream read by a block's first conv and by its projection shortcut) share it
    products: dict[tuple, torch.fx.Node] = {}
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node, arg_index, act_dim, buffer, index in sorted(sites, key=lambda site: position[site[0]]):
        source, run = node.args[arg_index], runs[index.tobytes()]
        key = (source, run, act_dim)
        if key not in products:
            with graph.inserting_before(node):
                index_node = graph.get_attr(buffer)
                place = places[source.name]
                batch = place.as_arg() if isinstance(place, BatchPlace) else None
                products[key] = graph.call_function(apply_gate, (source, gate_node, index_node, act_dim,
                                                                 values[run], batch))
        args = list(node.args)
        args[arg_index] = products[key]
        node.args = tuple(args)
    gated.recompile()
    return GatedStudent(gated, n)


def _check_activation(node: torch.fx.Node, arg_index: int) -> None:
    """A gate multiplies an activation: a parameter operand has no samples to draw for (an op rule
    that names one has the wrong argument position)."""
    source = node.args[arg_index] if arg_index < len(node.args) else None
    if not isinstance(source, torch.fx.Node) or source.op == "get_attr":
        what = source.target if isinstance(source, torch.fx.Node) else repr(source)
        raise GraphMergeError(
            f"the op rule of {describe(node)} places a gate on its argument {arg_index} ({what}), which is a "
            "parameter or constant, not an activation: gates draw one realisation per sample and belong on the "
            "layer's input activation. This is a bug in that op's rule (its gate_site argument position); please "
            "report it with the model.")


def _batch_places(big: torch.fx.GraphModule, info: WidenInfo, sources: list[torch.fx.Node]
                  ) -> dict[str, BatchPlace | str]:
    """Where the batch sits in each gated activation; a warning per site where it cannot be located."""
    names = [source.name for source in sources]
    if not set(names) <= set(info.batch_places):  # located once per big student: gated copies share it
        info.batch_places.update(locate_batch(big, names, info.example_inputs, info.example_kwargs))
    places = info.batch_places
    lost = [(source, places[source.name]) for source in dict.fromkeys(sources)
            if not isinstance(places[source.name], BatchPlace) and places[source.name] != NO_BATCH]
    if lost:
        listed = "; ".join(f"{describe(source)}: {reason}" for source, reason in lost[:3])
        more = f" (and {len(lost) - 3} more)" if len(lost) > 3 else ""
        warnings.warn(
            f"add_gates cannot locate the batch dimension at {len(lost)} gate site(s): {listed}{more}. Each such "
            "site multiplies every sample by one shared gate realisation (row 0) instead of one per sample; that "
            "changes the gate estimator's variance there, not what the gates learn to keep. Capture with a "
            "dynamic batch (example inputs of 2 or more distinct samples) to draw per sample everywhere.",
            stacklevel=3)
    return places


def _site_index(in_dim, n: int, widths: dict[int, int], widened: set[int], gates: HardConcreteGates) -> np.ndarray:
    """For each big position of a consumer's input: its gate's index (``gates.total`` = no gate)."""
    size, maps = teacher_maps(in_dim, n, widths, widened)
    index = np.full(size, gates.total, np.int64)
    for t in range(n):
        for p, (g, c) in enumerate(zip(in_dim.group.tolist(), in_dim.channel.tolist(), strict=True)):
            if g in gates.offsets:  # widened and gated (an averaged output has no gates)
                index[maps[t][p]] = gates.offsets[g] + t * widths[g] + c
    return index
