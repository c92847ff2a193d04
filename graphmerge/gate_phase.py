"""The gate phase's schedule as an object any training loop can drive.

The recipe's gate phase is three schedules over the fraction of the phase done: the open-fraction
budget falling from 1 to 1/N over the first ``ramp`` of the phase (``budget_target``), the
decision that drives the gates to the channels compress will keep over the first half of the rest
(``decision_strength``), and, for the paper's penalty budget instead, λ growing per epoch. A
:class:`GatePhase` holds them for one gated big student; the recipe drives it by fraction
(:meth:`advance_to`), your own loop by optimizer steps::

    phase = graphmerge.GatePhase(gated, total_steps=len(loader) * epochs)
    for x, y in loader:
        loss = task_loss(gated(x), y) + phase.penalty()   # zero under the projected budget
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        phase.step()                                      # projection / decision after the update
    assert phase.done
    student = graphmerge.compress(gated.eval(), "gates")

``state_dict()`` / ``load_state_dict()`` carry the step count through a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from graphmerge.errors import GraphMergeError
from graphmerge.passes.gate import GatedStudent
from graphmerge.passes.gate_budget import budget_target, decision_strength

BUDGETS = ("projected", "penalty")
#: how far from 1/N a group's mean P[g > 0] may end for :attr:`GatePhase.done`
DONE_TOLERANCE = 1e-3


class GatePhase:
    """The budget ramp, projection, decision (or λ penalty) of one gate phase, driven by steps."""

    def __init__(self, gated: GatedStudent, total_steps: int, *, budget: str = "projected", ramp: float = 0.5,
                 direction: str = "gradient", decide: bool = True, epochs: int = 1,
                 lambda_at: Callable[[int], float] | None = None):
        if not isinstance(gated, GatedStudent):
            raise GraphMergeError(f"GatePhase drives a gated big student (graphmerge.add_gates(big)), got "
                                  f"{type(gated).__name__}.")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise GraphMergeError(f"total_steps must be a positive whole number of optimizer steps, got "
                                  f"{total_steps!r}.")
        if budget not in BUDGETS:
            raise GraphMergeError(f"unknown budget {budget!r}: use 'projected' or 'penalty'.")
        if not 0 < ramp <= 1:
            raise GraphMergeError(f"ramp is the fraction of the phase spent reaching the budget; it must lie in "
                                  f"(0, 1], got {ramp}.")
        if budget == "penalty" and lambda_at is None:
            from graphmerge.training import lambda_schedule

            lambda_at = lambda_schedule("quadratic")
        self.gated, self.total_steps, self.budget, self.ramp = gated, total_steps, budget, ramp
        self.direction, self.decide, self.epochs, self.lambda_at = direction, decide, epochs, lambda_at
        self.steps_done = 0
        self.progress = 0.0

    # -- driving it

    def step(self) -> None:
        """One optimizer step is done: move the gates to the schedule at the new step count."""
        self.steps_done += 1
        self.advance_to(min(1.0, self.steps_done / self.total_steps))

    def advance_to(self, progress: float) -> None:
        """Project (and, past the ramp, decide) the gates to the schedule ``progress`` (0..1) of the way
        through the phase. Under the penalty budget the gates are left to the penalty."""
        self.progress = float(progress)
        if self.budget != "projected":
            return
        target = budget_target(progress, self.gated.n_teachers, self.ramp)
        if self.decide and progress >= self.ramp:
            self.gated.decide(target, decision_strength(progress, self.ramp), self.direction)
        else:
            self.gated.project_to_budget(target, self.direction)

    def penalty(self, epoch: int | None = None) -> torch.Tensor:
        """The term to add to the task loss: λ(epoch)·Σ_groups (1/N − mean P[g>0])² under the penalty
        budget (``epoch`` defaults to the one the step count is in), zero under the projected one."""
        if self.budget != "penalty":
            return torch.zeros((), device=self.gated.gates.all_log_alpha().device)
        if epoch is None:
            epoch = min(self.epochs - 1, int(self.progress * self.epochs))
        return self.lambda_at(epoch) * self.gated.gate_loss()

    # -- reading it

    def fields(self, progress: float | None = None) -> dict[str, Any]:
        """What a log record says of the schedule at ``progress`` (default: now)."""
        progress = self.progress if progress is None else progress
        if self.budget != "projected":
            return {"lambda": self.lambda_at(min(self.epochs - 1, int(progress * self.epochs)))}
        decision = {"decision": decision_strength(progress, self.ramp)} if self.decide else {}
        return {"budget": budget_target(progress, self.gated.n_teachers, self.ramp), **decision}

    @property
    def done(self) -> bool:
        """The phase has run its steps and, under the projected budget, every group is at 1/N open."""
        if self.progress < 1.0:
            return False
        if self.budget != "projected":
            return True
        target = 1.0 / self.gated.n_teachers
        return all(abs(v - target) <= DONE_TOLERANCE for v in self.gated.open_fraction().values())

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done, self.progress = int(state["steps_done"]), float(state["progress"])


class PhaseTrace:
    """Measurements at ``points`` evenly spaced fractions of a phase (1/points, 2/points, ..., 1).

    Call it after every step with the fraction of the phase done; each time the fraction passes a
    point, ``measure()`` runs and its dict is kept with the point as ``progress``. ``take()`` hands
    over (and forgets) the entries since the last call, which is how the recipe puts each epoch's
    share into that epoch's log record. ``resume_at(progress)`` skips the points a checkpoint passed.
    Measurements run under a forked RNG, so a traced run draws what an untraced one draws.
    """

    def __init__(self, points: int, measure: Callable[[], dict[str, Any]]):
        if not isinstance(points, int) or points < 0:
            raise GraphMergeError(f"a phase trace needs a whole number of points >= 0, got {points!r}.")
        self.measure = measure
        self.pending = [k / points for k in range(1, points + 1)] if points else []
        self.entries: list[dict[str, Any]] = []

    def resume_at(self, progress: float) -> None:
        self.pending = [p for p in self.pending if p > progress + 1e-9]

    def __call__(self, progress: float) -> None:
        while self.pending and progress >= self.pending[0] - 1e-9:
            point = self.pending.pop(0)
            with torch.random.fork_rng():  # a measurement must not move the phase's random draws
                measured = self.measure()
            self.entries.append({"progress": round(point, 6), **measured})

    def take(self) -> list[dict[str, Any]]:
        entries, self.entries = self.entries, []
        return entries
