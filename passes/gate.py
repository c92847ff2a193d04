"""Gate: one tied hard-concrete gate vector per widened group, at the inputs of its consumers.

Gates follow Louizos et al., "Learning Sparse Neural Networks through L0 Regularization": per
channel ``u ~ U(0,1)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
``g = clamp(s (zeta - gamma) + gamma, 0, 1)``; at eval ``g = clamp(sigmoid(log_alpha)(zeta -
gamma) + gamma, 0, 1)``, deterministic. Each forward draws ONE realisation per group (per
sample) and every site of the group multiplies by it: the tying the paper does by hand for
ResNet skip connections. Sites are the inputs of the ops that mix across the group (conv and
linear inputs), which sit after BatchNorm and the non-linearity, so nothing downstream can undo
a closed gate.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import types
import warnings
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.fx
from graphmerge.passes.batch import NO_BATCH, BatchPlace, locate_batch, reference_input
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.layout import teacher_maps
from graphmerge.passes.registry import describe
from graphmerge.passes.widen import WidenInfo, widen_info
from torch import nn

GATES = "graphmerge_gates"
GATHER_INDEX = "graphmerge_gate_gather_index"
#: the gates' buffer of explicit training uniforms (None: drawn in the forward)
UNIFORM = "uniform"


class HardConcreteGates(nn.Module):
    """All gate parameters of a big student: ``log_alpha`` per widened group, N × width each."""

    def __init__(self, sizes: dict[int, int], *, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1,
                 init_mean: float = 1.0, init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        if not (gamma < 0 < 1 < zeta) or beta <= 0:
            raise GraphMergeError(f"hard-concrete constants need gamma < 0, zeta > 1 and beta > 0; got "
                                  f"beta={beta}, gamma={gamma}, zeta={zeta}.")
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.group_ids = list(sizes)
        self.log_alpha = nn.ParameterDict({
            f"g{gid}": nn.Parameter(torch.randn(size, generator=generator) * init_std + init_mean)
            for gid, size in sizes.items()
        })
        offsets = np.cumsum([0, *sizes.values()])
        self.offsets = {gid: int(o) for gid, o in zip(sizes, offsets[:-1], strict=True)}
        self.total = int(offsets[-1])
        # None: a training forward draws its uniforms with torch.rand. A (rows x total) tensor: the
        # uniforms it uses instead (a functional trainer passes one per stacked model through
        # torch.func.functional_call; see GatedStudent.gate_noise_name)
        self.register_buffer(UNIFORM, None, persistent=False)

    def all_log_alpha(self) -> torch.Tensor:
        if not self.group_ids:
            return torch.zeros(0)
        return torch.cat([self.log_alpha[f"g{gid}"] for gid in self.group_ids])

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """Gate values for every channel plus a trailing 1 (for positions no gate covers): in training
        ``hard_concrete_sample`` of one realisation per row (per sample of ``reference``), in eval
        the deterministic gate."""
        log_alpha = self.all_log_alpha()
        if self.training:
            rows = reference.shape[0] if reference.ndim else 1
            uniform = getattr(self, UNIFORM)
            if uniform is None:  # its own draw, clamped in place: one (rows x channels) allocation fewer
                uniform = torch.rand(rows, self.total, device=log_alpha.device, dtype=log_alpha.dtype)
                gates = _hard_concrete(log_alpha, uniform.clamp_(1e-6, 1 - 1e-6), self.beta, self.gamma, self.zeta)
            elif tuple(uniform.shape) != (rows, self.total):
                raise GraphMergeError(f"the gates' uniforms have shape {tuple(uniform.shape)}, but this forward "
                                      f"needs ({rows}, {self.total}): one row per sample of the batch, one column "
                                      "per gate. Pass uniforms drawn for this batch, or None to draw them here.")
            else:
                gates = hard_concrete_sample(log_alpha, uniform, beta=self.beta, gamma=self.gamma, zeta=self.zeta)
        else:
            gates = torch.sigmoid(log_alpha).unsqueeze(0).mul(self.zeta - self.gamma).add_(self.gamma).clamp(0, 1)
        return torch.cat([gates, torch.ones(gates.shape[0], 1, dtype=gates.dtype, device=gates.device)], 1)

    def prob_open(self, gid: int) -> torch.Tensor:
        """P[g > 0] per channel: sigmoid(log_alpha - beta log(-gamma / zeta))."""
        return torch.sigmoid(self.log_alpha[f"g{gid}"] - self.open_shift)

    def eval_value(self, gid: int) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha[f"g{gid}"]) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    @property
    def open_shift(self) -> float:
        """``beta log(-gamma / zeta)``: P[g > 0] = sigmoid(log_alpha - open_shift)."""
        return self.beta * math.log(-self.gamma / self.zeta)

    def segments(self) -> torch.Tensor:
        """For each entry of :meth:`all_log_alpha`, the position of its group in ``group_ids``."""
        sizes = [self.log_alpha[f"g{gid}"].numel() for gid in self.group_ids]
        return torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes, dtype=torch.long))

    @torch.no_grad()
    def set_all_log_alpha(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` (laid out as :meth:`all_log_alpha`) into the groups' parameters."""
        for gid in self.group_ids:
            param = self.log_alpha[f"g{gid}"]
            start = self.offsets[gid]
            param.copy_(flat[start:start + param.numel()])


def hard_concrete_sample(log_alpha: torch.Tensor, uniform: torch.Tensor, *, beta: float = 2 / 3,
                         gamma: float = -0.1, zeta: float = 1.1) -> torch.Tensor:
    """Hard-concrete gate values ``clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (zeta -
    gamma) + gamma, 0, 1)``, ``u`` = ``uniform`` clamped to [1e-6, 1 - 1e-6]: one realisation per
    row of ``uniform`` (rows x channels; not modified) for ``log_alpha`` (channels), differentiable
    in ``log_alpha``. ``HardConcreteGates.forward`` draws with it (its own uniforms clamped in
    place); so can a functional trainer (``torch.func.vmap`` over stacked models) with noise it
    draws itself."""
    return _hard_concrete(log_alpha, uniform.clamp(1e-6, 1 - 1e-6), beta, gamma, zeta)


def _hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """``hard_concrete_sample`` on clamped uniforms ``u``, which it overwrites."""
    # log u - log1p(-u) in place on the temporaries, where no gradient flows (each one is a rows x
    # channels allocation per step). Not noise.add_(log_alpha): under vmap log_alpha may be batched
    # where the noise is not. (One hand-written autograd Function for the whole draw measured
    # slower, not faster: 1.21 vs 1.16 x the widened step on mnist1d_cnn, 150 interleaved rounds.)
    noise = torch.log(u)
    noise.sub_(u.neg_().log1p_())
    s = torch.sigmoid(torch.add(noise, log_alpha).div_(beta))
    return s.mul(zeta - gamma).add_(gamma).clamp(0, 1)


def budget_target(progress: float | torch.Tensor, n_teachers: int, ramp: float = 0.5) -> float | torch.Tensor:
    """The open-fraction budget ``progress`` (0..1) of the way through the gate phase: from 1 down
    to 1/N linearly over the first ``ramp`` of the phase, then 1/N (the weights train the rest of
    the phase with the student's budget)."""
    if not 0 < ramp <= 1:
        raise GraphMergeError(f"budget_ramp must lie in (0, 1], got {ramp}.")
    final = 1.0 / n_teachers
    rest = 1.0 - progress / ramp
    rest = rest.clamp_min(0.0) if isinstance(rest, torch.Tensor) else max(0.0, rest)  # a tensor: traceable
    return final + (1.0 - final) * rest


@torch.no_grad()
def budget_projection(log_alpha: torch.Tensor, segments: torch.Tensor, target: float | torch.Tensor,
                      open_shift: float, iterations: int = 24, direction: str = "uniform", floor: float = 0.05,
                      groups: int | None = None) -> torch.Tensor:
    """``log_alpha + c[segment] * w`` with the smallest ``c <= 0`` in size per segment (and per
    leading batch row) for which the segment's mean ``sigmoid(log_alpha - open_shift)`` is at most
    ``target``.

    ``direction="uniform"``: ``w = 1`` (every gate of a group moves by the same amount; the order
    is kept). ``direction="gradient"``: ``w = max(4 P (1 - P), floor)`` with ``P`` the gates'
    current P[g > 0], the direction in which the mean falls fastest, as the paper's penalty pushes:
    undecided gates close first and gates the task holds open stay open, so the gates separate
    into open and closed instead of all sitting half open. The mean is smooth and increasing in
    ``c``, so every segment's ``c`` is found at once by Newton's method kept inside a shrinking
    bracket (``_bracketed_newton``), in float64. ``log_alpha`` is ``(..., channels)``;
    ``segments`` names each channel's segment, 0..G-1; ``groups`` (G, if given) and a tensor
    ``target`` let ``torch.compile`` trace it whole, without a host sync.
    """
    if direction not in ("uniform", "gradient"):
        raise GraphMergeError(f"budget direction must be 'uniform' or 'gradient', got {direction!r}.")
    x = log_alpha.double() - open_shift
    groups = int(segments.max()) + 1 if groups is None else groups
    spread, total = _segment_ops(segments, groups, x.dtype)
    count = total(torch.ones_like(segments, dtype=x.dtype))
    if direction == "gradient":
        p = torch.sigmoid(x)
        weight = (4 * p * (1 - p)).clamp_min(floor)
    else:
        weight = torch.ones_like(x)

    def per_segment(values: torch.Tensor) -> torch.Tensor:
        return total(values) / count

    def mean_and_slope(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(x + spread(c) * weight)
        both = per_segment(torch.stack([p, p * (1 - p) * weight], -2))  # one reduction: p computed once
        return both.select(-2, 0), both.select(-2, 1)

    lead = x.shape[:-1]
    high = torch.zeros(*lead, groups, dtype=x.dtype)
    over = per_segment(torch.sigmoid(x)) > target
    if not torch.compiler.is_compiling() and not bool(over.any()):
        return log_alpha  # (compiled: no host sync; the shift below is 0 where nothing is over)
    top = torch.full((*lead, groups), -torch.inf, dtype=x.dtype).scatter_reduce(-1, segments.expand_as(x), x, "amax")
    low = -(top.clamp_min(0) + 40.0) / weight.min()  # every sigmoid below e^-40: below any positive target
    shift = _bracketed_newton(mean_and_slope, low, high, target, iterations)
    shift = torch.where(over, shift, torch.zeros_like(shift))
    return (log_alpha.double() + spread(shift) * weight).to(log_alpha.dtype)


def _segment_ops(segments: torch.Tensor, groups: int, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(spread, total)``: a per-segment value copied to each of its channels, and the sum of the
    channels' values per segment, along the last dim. Products with a 0/1 matrix where it is small
    (one BLAS call each, where an index op per call costs tens of microseconds), index ops where it
    would be large; ``spread`` is exact either way (each entry is one value times 1 plus zeros)."""
    if segments.numel() * groups <= 1 << 16:
        member = (segments.unsqueeze(-1) == torch.arange(groups, device=segments.device)).to(dtype)
        return (lambda c: c @ member.T), (lambda v: v @ member)
    lead_zeros = lambda v: torch.zeros(*v.shape[:-1], groups, dtype=v.dtype)  # noqa: E731
    return (lambda c: c.index_select(-1, segments)), (lambda v: lead_zeros(v).index_add_(-1, segments, v))


def _bracketed_newton(mean_and_slope: Any, low: torch.Tensor, high: torch.Tensor, target: float | torch.Tensor,
                      iterations: int) -> torch.Tensor:
    """Per entry, a ``c`` in ``[low, high]`` with ``mean(c) <= target`` as close to the root of
    ``mean(c) = target`` as float64 allows, for an increasing ``mean`` with ``mean(low) <= target``.

    Newton's step while it stays inside the bracket, the bracket's midpoint where it would leave
    it; every evaluation shrinks the bracket. Quadratic near the root, so a few steps do what 60
    bisection steps did (the projection runs after every gate step). The root is aimed just below
    ``target`` and an entry whose last step still ends above ``target`` falls back to its bracket's
    low end, so the result never exceeds the budget.
    """
    aim = target - 1e-12
    c = high
    for _ in range(iterations):
        value, slope = mean_and_slope(c)
        above = value > aim
        high = torch.where(above, c, high)
        low = torch.where(above, low, c)
        step = c - (value - aim) / slope.clamp_min(1e-300)
        inside = (step >= low) & (step <= high)  # equal to an end: converged there
        c, previous = torch.where(inside, step, (low + high) / 2), c
        if not torch.compiler.is_compiling() and bool(((c - previous).abs() <= 1e-13 * (1 + c.abs())).all()):
            break  # every entry at its fixed point, to rounding (compiled: a fixed count, no host sync)
    value, _ = mean_and_slope(c)
    return torch.where(value <= target, c, low)


#: |log_alpha| the decided gates end at or beyond: eval gate exactly 1 (0) from log(11) ~ 2.4 (below
#: -2.4) with the default hard-concrete constants; at 6 a kept gate is open in all but ~0.05 % of
#: training draws (P[g > 0] = sigmoid(6 + 1.6)).
DECISION_LEVEL = 6.0


def decision_strength(progress: float, ramp: float = 0.5) -> float:
    """How far (0..1) the gates are driven to the decision ``progress`` of the way through the gate
    phase: 0 while the budget still falls (``progress <= ramp``), then rising linearly to 1 over the
    first half of the rest of the phase, 1 for its second half (the weights train with the hard
    decision compress will make) and always 1 at the end of the phase."""
    if progress >= 1:
        return 1.0
    rest = (1.0 - ramp) / 2
    return 0.0 if rest <= 0 else min(1.0, max(0.0, (progress - ramp) / rest))


@torch.no_grad()
def decided_projection(log_alpha: torch.Tensor, segments: torch.Tensor, kept: torch.Tensor, level: float,
                       target: float, open_shift: float, direction: str = "gradient", iterations: int = 60,
                       floor: float = 0.05) -> torch.Tensor:
    """The gates moved towards the decision ``kept`` (True per channel compress keeps) with every
    segment's mean ``sigmoid(log_alpha - open_shift)`` exactly ``target``, from either side.

    Why: ``budget_projection`` only bounds the mean, and on short gate phases it meets it by
    leaving every gate half open (kept eval gates ~0.1): compress then folds those small values
    into the weights, and the weights never trained with the network compress makes. Here the
    kept gates are raised to at least ``level`` and the others lowered to at most ``-level``
    (``level`` ramps from ``-DECISION_LEVEL``, a no-op, to ``+DECISION_LEVEL``: see
    ``decision_strength``); then only the dropped gates move, by ``c[segment] * w`` with ``c`` of
    either sign (``w`` as in ``budget_projection``'s ``direction``), so the mean is exactly
    ``target``. The kept gates stay where they are, so the decision is never undone by the budget;
    the dropped ones take whatever open probability the budget leaves (with the kept ones
    at P ~1 and ``target`` = their share 1/N, almost none). The mean is reachable whenever the kept
    gates' own share is below ``target`` and the dropped ones could fill the rest (always for
    ``target`` = 1/N of the channels kept); otherwise the bisection ends at the nearer end.
    Bisection on every segment (and leading batch row) at once, in float64; ``log_alpha`` and
    ``kept`` are ``(..., channels)``, each leading row moved as it would be alone.
    """
    if direction not in ("uniform", "gradient"):
        raise GraphMergeError(f"budget direction must be 'uniform' or 'gradient', got {direction!r}.")
    value = log_alpha.double()
    value = torch.where(kept, value.clamp_min(level), value.clamp_max(-level))
    x = value - open_shift
    count = torch.bincount(segments).double()
    groups = count.numel()
    p = torch.sigmoid(x)
    weight = (4 * p * (1 - p)).clamp_min(floor) if direction == "gradient" else torch.ones_like(x)
    weight = torch.where(kept, torch.zeros_like(weight), weight)

    def mean_open(c: torch.Tensor) -> torch.Tensor:
        q = torch.sigmoid(x + c.index_select(-1, segments) * weight)
        return torch.zeros(*x.shape[:-1], groups, dtype=x.dtype, device=x.device).index_add_(-1, segments, q) / count

    free = torch.where(kept, torch.full_like(weight, torch.inf), weight).amin(-1, keepdim=True)  # inf: none free
    reach = torch.where(free.isfinite(), (x.abs().amax(-1, keepdim=True) + 40.0) / free, torch.zeros_like(free))
    low, high = (-reach).expand(*x.shape[:-1], groups), reach.expand(*x.shape[:-1], groups)
    for _ in range(iterations):
        mid = (low + high) / 2
        above = mean_open(mid) > target
        high = torch.where(above, mid, high)
        low = torch.where(above, low, mid)
    return (value + ((low + high) / 2).index_select(-1, segments) * weight).to(log_alpha.dtype)


@torch.fx.wrap
def apply_gate(x: torch.Tensor, gates: torch.Tensor, index: torch.Tensor, dim: int,
               values: torch.Tensor | None = None, batch: tuple[int, int, int] | None = (0, 1, 1)) -> torch.Tensor:
    """Multiply ``x`` along ``dim`` by the gate values ``gates[:, index]``, sample by sample.

    ``values`` (rows x channels), when given, is that gather done already (``add_gates`` gathers
    every site's values in one :func:`gather_gate_values` per forward); ``gates`` and ``index`` then
    only name the site. Row ``b`` is sample ``b``'s realisation (one row: every sample's). ``batch``
    is where the samples sit in ``x`` (``graphmerge.passes.batch.BatchPlace``): dim ``batch[0]``
    holds ``outer * B * inner`` positions, viewed as ``(outer, B, inner)``; None: the site's batch
    could not be located and every sample takes row 0's realisation. ``values`` may also hold one
    value per run of ``x.shape[dim] / values.shape[1]`` consecutive positions (a flattened
    ``C x L`` input whose ``L`` positions share their channel's gate).
    """
    if values is None:
        values = gates.index_select(1, index)
    if batch is None:
        values = values[:1]
    rows, channels = values.shape
    d = dim % x.ndim
    view, sample = x, None
    if rows > 1:
        sample, outer, inner = batch
        sample %= x.ndim
        if outer != 1 or inner != 1:
            view = view.unflatten(sample, (outer, -1, inner))
            d += 2 if d > sample else 0
            sample += 1
    if channels != view.shape[d]:
        view = view.unflatten(d, (channels, -1))
        if sample is not None and sample > d:
            sample += 1
    shape = [1] * view.ndim
    shape[d] = channels
    if sample is not None:
        shape[sample] = rows
        values = values if sample < d else values.t()
    # in x's dtype: under bf16 autocast a float32 product would be cast back by the consumer
    out = view * values.reshape(shape).to(x.dtype)
    return out if view is x else out.reshape(x.shape)


@torch.fx.wrap
def gather_gate_values(gates: torch.Tensor, index: torch.Tensor | None, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """``gates[:, index]`` split into runs of ``sizes``: every gate site's values in one gather.

    One ``index_select`` instead of one per site: its backward scatters into one zero-filled
    (rows x all gates) gradient instead of one per site, which autograd would then add up.
    ``index=None``: the runs are the gates in order (``index`` would be ``0, 1, ..., sum(sizes) - 1``),
    taken as views (``narrow`` and ``split``), whose backward is one concatenation.
    """
    if index is None:
        values = gates.narrow(1, 0, sum(sizes))
    else:
        values = gates.index_select(1, index)
    return (values,) if len(sizes) == 1 else values.split(sizes, 1)


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
        kept = select_channels(info, self.gate_scores())
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
    big.meta.pop("graphmerge")
    try:
        gated = copy.deepcopy(big)
    finally:
        big.meta["graphmerge"] = info
    gated.meta["graphmerge"] = info
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
