"""The gates' budget and decision: projections of the log-alphas that a gate phase applies after each step.

``budget_projection`` bounds every group's mean open probability P[g > 0] by the budget
``budget_target`` lowers from 1 to 1/N over the phase; ``decided_projection`` then drives the
gates towards the channels compress will keep (``decision_strength``), the mean held exactly at
the budget, so that the weights train with the network compress makes. Both work on flat
log-alpha vectors with a segment (group) index per entry and any leading batch dims, so a
functional trainer can apply them to stacked models.
"""

from __future__ import annotations

from typing import Any

import torch
from graphmerge.passes.errors import GraphMergeError


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
