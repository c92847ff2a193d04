"""graphmerge.GatePhase: the recipe's gate-phase schedule in your own training loop.

The schedule is checked against its formulas written out here: the budget 1 -> 1/N linearly over
the first ``ramp`` of the phase, then the decision; at the end every group is exactly 1/N open
with its kept gates at 1 (P[g>0] from the log-alphas with the hard-concrete formula) and the
student compresses exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graphmerge
from graphmerge.api import student_certificate

torch.set_num_threads(1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(1, 12), nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _gated() -> graphmerge.passes.gate.GatedStudent:
    torch.manual_seed(0)
    teachers = [MLP().eval() for _ in range(2)]
    return graphmerge.add_gates(graphmerge.widen(teachers, torch.randn(4, 1)), seed=0)


def _open(gated, gid: int) -> float:
    """Mean P[g > 0] = sigmoid(log_alpha - beta log(-gamma / zeta)), written out."""
    log_alpha = gated.gates.log_alpha[f"g{gid}"].detach().double()
    return float(torch.sigmoid(log_alpha - (2 / 3) * math.log(0.1 / 1.1)).mean())


def test_your_own_loop_ends_at_the_budget_decided_and_compresses_exactly() -> None:
    gated = _gated()
    steps = 40
    phase = graphmerge.GatePhase(gated, total_steps=steps)
    optimizer = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.rand(16, 1, generator=generator) * 6 - 3
        loss = (gated.train()(x) - torch.sin(x)).pow(2).mean() + phase.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        phase.step()
        if step + 1 == steps // 4:  # a quarter through: budget 1 - (1 - 1/2) * 0.25 / 0.5 = 0.75
            assert not phase.done
            assert phase.fields()["budget"] == pytest.approx(0.75)
            assert all(_open(gated, gid) <= 0.75 + 1e-9 for gid in gated.gates.group_ids)
    assert phase.done and phase.steps_done == steps
    for gid in gated.gates.group_ids:
        assert _open(gated, gid) == pytest.approx(0.5, abs=1e-3)
        values = gated.eval_gate_values()[gid]
        assert int((values >= 0.99).sum()) == 12 and int((values <= 0.01).sum()) == 12
    student = graphmerge.compress(gated.eval(), "gates")
    assert student_certificate(student).relative_error <= 1e-6


def test_the_penalty_budget_adds_lambda_times_the_papers_term() -> None:
    gated = _gated()
    phase = graphmerge.GatePhase(gated, total_steps=10, budget="penalty", epochs=2, lambda_at=lambda e: 0.5 * (e + 1))
    expected = sum((0.5 - _open(gated, gid)) ** 2 for gid in gated.gates.group_ids)
    assert float(phase.penalty()) == pytest.approx(0.5 * expected, rel=1e-5)  # epoch 0
    for _ in range(5):
        phase.step()
    assert float(phase.penalty()) == pytest.approx(1.0 * expected, rel=1e-5)  # epoch 1
    projected = graphmerge.GatePhase(gated, total_steps=10)
    assert float(projected.penalty()) == 0.0


def test_state_round_trip_and_bad_settings() -> None:
    gated = _gated()
    phase = graphmerge.GatePhase(gated, total_steps=8)
    for _ in range(3):
        phase.step()
    again = graphmerge.GatePhase(gated, total_steps=8)
    again.load_state_dict(phase.state_dict())
    assert again.steps_done == 3 and again.progress == pytest.approx(3 / 8)
    with pytest.raises(graphmerge.GraphMergeError, match="total_steps"):
        graphmerge.GatePhase(gated, total_steps=0)
    with pytest.raises(graphmerge.GraphMergeError, match="unknown budget"):
        graphmerge.GatePhase(gated, total_steps=4, budget="soft")
    with pytest.raises(graphmerge.GraphMergeError, match="gated big student"):
        graphmerge.GatePhase(MLP(), total_steps=4)
