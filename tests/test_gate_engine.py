"""One gate-phase engine: the benchmarks' batched gate phase (``benchmarks/common.py``, many runs
stacked under ``torch.func``) is the library's gate phase, run for run.

The reference is the library used as its README shows: one gated student, ``torch.optim.SGD`` on
its weights and gates, ``graphmerge.GatePhase.advance_to`` after every step at the fraction of the
phase ``graphmerge.training.fit`` counts, the gates drawing their own uniforms after
``torch.manual_seed``. Given the same initial gated student, data order and noise seed, the
batched engine must end every run at the reference's log-alphas and weights, whether the run
trains alone or stacked with another (each run equal to its own library run).

Tolerance: the two sides do the same float32 arithmetic except for the order of sums inside
batched kernels (``vmap``'s batched convolutions and matrix products, the projection's per-group
means over a stacked tensor), a few ulp per step; over the 12 steps here the largest difference
measured is below 2e-6. The bound 1e-4 is 50x that and far below what one wrong step moves a
gate (gate lr 0.1 times a gradient of order 1e-2 or more, or a decision step of order 1). The
decision itself is discrete and must agree exactly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
from torch import nn  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.errors import GraphMergeError  # noqa: E402

torch.set_num_threads(1)

GATE_EPOCHS, BATCH, SAMPLES, LR, DECAY = 4, 32, 80, 0.05, 5e-4  # 80: every epoch ends on a short batch
TOLERANCE = 1e-4


class SmoothMLP(nn.Module):
    """1 -> 16 (BatchNorm, tanh) -> 16 (tanh) -> 1: two gated groups and BatchNorm statistics, and
    smooth, so a difference of an ulp in the weights changes the next gradient by about an ulp (a
    ReLU or max-pool kink that one side's rounding crosses and the other's does not would change it
    by a whole term: the comparison would test the kink, not the engine)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b, self.c = nn.Linear(1, 16), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.norm(self.a(x))))))


def _bench(runs: int) -> common.Benchmark:
    generator = torch.Generator().manual_seed(11)
    x = torch.rand(SAMPLES, 1, generator=generator)
    y = torch.sin(10 * x) + 0.1 * torch.randn(SAMPLES, 1, generator=generator)
    data = {"train": (x, y), "val": (x[:16], y[:16]), "test": (x[:64], y[:64])}
    budget = common.Budget(unit=GATE_EPOCHS, lr=LR, batch_size=BATCH, weight_decay=DECAY)
    return common.Benchmark(name="engine", task="regression", build=SmoothMLP,
                            example_inputs=lambda: (torch.rand(4, 1),), data=data, budget=budget, runs=runs,
                            out=Path("/nonexistent"), mode="vmap", log=lambda _: None)


def _teachers(runs: int) -> list[list[SmoothMLP]]:
    torch.manual_seed(5)
    return [[SmoothMLP().eval() for _ in range(2)] for _ in range(runs)]


def _library_gate_phase(bench: common.Benchmark, teachers: list[SmoothMLP], run: int, orders: list[torch.Tensor],
                        noise_seed: int, hash_seed: int | None = None) -> torch.nn.Module:
    """The library's gate phase for one run, at the library's default schedule (MergeSettings). The
    gates draw their own uniforms after ``torch.manual_seed(noise_seed)``, or, given ``hash_seed``,
    are handed the engine's hashed ones (key: seed, step and run in bits 40, 16 and 0) through
    ``gate_noise_name``."""
    settings = graphmerge.recipe.MergeSettings()
    gated = graphmerge.add_gates(graphmerge.widen(teachers, bench.example_inputs()), seed=bench.seed * 7919 + run)
    gated.train()
    optimizers = [torch.optim.SGD(gated.weight_parameters(), lr=LR, momentum=0.9, weight_decay=DECAY),
                  torch.optim.SGD(gated.gate_parameters(), lr=settings.gate_lr, momentum=settings.gate_momentum)]
    per_epoch = math.ceil(SAMPLES / BATCH)
    phase = graphmerge.GatePhase(gated, GATE_EPOCHS * per_epoch, budget=settings.gate_budget,
                                 ramp=settings.budget_ramp, direction=settings.budget_direction,
                                 decide=settings.decide_gates)
    x, y = bench.data["train"]
    torch.manual_seed(noise_seed)  # the gates' own torch.rand draws, one (batch x gates) per step
    total, step = gated.flat_log_alpha().numel(), 0
    for epoch, order in enumerate(orders):
        for index, start in enumerate(range(0, SAMPLES, BATCH)):
            idx = order[start:start + BATCH]
            if hash_seed is None:
                out = gated(x[idx])
            else:
                key = torch.tensor((hash_seed << 40) + (step << 16) + run)
                uniform = common.hashed_uniform(key, (len(idx), total))
                out = torch.func.functional_call(gated, {gated.gate_noise_name: uniform}, (x[idx],))
            step += 1
            loss = F.mse_loss(out, y[idx])
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            done = epoch + (index + 1) / per_epoch  # graphmerge.training.fit's fraction of the phase
            phase.advance_to(min(done, epoch + 1) / GATE_EPOCHS)
    assert phase.done
    return gated


def _orders(seed: int, models: int) -> list[torch.Tensor]:
    """The engine's shuffles, written out: per epoch one torch.randperm per model, in model order,
    from one generator seeded with the phase's seed; per model, its epochs' orders."""
    generator = torch.Generator().manual_seed(seed)
    epochs = [torch.stack([torch.randperm(SAMPLES, generator=generator) for _ in range(models)])
              for _ in range(GATE_EPOCHS)]
    return [[epoch[i] for epoch in epochs] for i in range(models)]


@pytest.mark.parametrize(("runs", "mode", "noise"), [(1, "vmap", "aten"), (2, "vmap", "aten"), (2, "loop", "aten"),
                                                    (2, "vmap", "hash")])
def test_batched_gate_phase_is_the_library_gate_phase_run_for_run(runs: int, mode: str, noise: str) -> None:
    bench = _bench(runs)
    bench.mode, bench.noise = mode, noise
    teachers = _teachers(runs)
    trained, history, _, _ = common.gate_phase(bench, teachers, tag="N=2")
    phase_seed = bench.seed + 3  # gate_phase's Phase seed: the data order and the noise seeds
    orders = _orders(phase_seed, runs)
    assert history["budget"] == pytest.approx([0.75, 0.5, 0.5, 0.5])  # 1 -> 1/2 over the first half of 4 epochs
    for run in range(runs):
        expected = _library_gate_phase(bench, teachers[run], run, orders[run], common.gate_noise_seed(phase_seed, run),
                                       phase_seed if noise == "hash" else None)
        got = trained[run]
        for gid, scores in expected.gate_scores().items():
            torch.testing.assert_close(got.gate_scores()[gid], scores, rtol=0, atol=TOLERANCE,
                                       msg=f"run {run} group {gid} log-alpha")
        assert torch.equal(got.decision_mask(got.flat_log_alpha()), expected.decision_mask(expected.flat_log_alpha()))
        for gid, fraction in got.open_fraction().items():  # the decided default ends every group at 1/N
            assert fraction == pytest.approx(0.5, abs=1e-6), gid
        for name, tensor in expected.state_dict().items():
            if tensor.is_floating_point():
                torch.testing.assert_close(got.state_dict()[name], tensor, rtol=TOLERANCE, atol=TOLERANCE,
                                           msg=f"run {run} {name}")


def _gated(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    big = graphmerge.widen([SmoothMLP().eval() for _ in range(2)], (torch.rand(4, 1),))
    return graphmerge.add_gates(big, seed=seed, init_std=1.0)


def test_gate_parameter_names_and_flat_layout() -> None:
    """The names the gated student gives resolve to its gate parameters, in the order of the flat
    vector the functional schedule works on, and cover every gate parameter."""
    gated = _gated()
    named = dict(gated.named_parameters())
    params = [named[name] for name in gated.gate_parameter_names()]
    assert {id(p) for p in params} == {id(p) for p in gated.gate_parameters()}
    assert len(gated.gate_parameter_names()) == 2  # a's and b's outputs: the order matters
    assert torch.equal(gated.flat_log_alpha(), torch.cat([p.detach() for p in params]))


def test_explicit_uniforms_give_the_forward_its_own_draw() -> None:
    """Uniforms passed through ``gate_noise_name`` (torch.func.functional_call) reproduce the
    forward's own draw from the same seed, value for value and in the gradient; one
    ``hard_concrete_sample`` gives the values; a wrong shape is refused."""
    gated = _gated().train()
    x = torch.rand(6, 1)
    total = gated.flat_log_alpha().numel()
    torch.manual_seed(4)
    own = gated(x)
    own.sum().backward()
    own_grad = [p.grad.clone() for p in gated.parameters()]
    gated.zero_grad()
    uniform = torch.rand(6, total, generator=torch.Generator().manual_seed(4))
    given = torch.func.functional_call(gated, {gated.gate_noise_name: uniform}, (x,))
    assert torch.equal(given, own)
    given.sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(gated.parameters(), own_grad, strict=True))
    assert gated.gates.uniform is None  # functional_call restored the buffer

    log_alpha = gated.flat_log_alpha().double()
    u = uniform.double().clamp(1e-6, 1 - 1e-6)
    written = (torch.sigmoid((u.log() - torch.log1p(-u) + log_alpha) / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(graphmerge.hard_concrete_sample(log_alpha, uniform.double()), written)
    with pytest.raises(GraphMergeError, match=r"\(6, \d+\)"):
        torch.func.functional_call(gated, {gated.gate_noise_name: uniform[:5]}, (x,))


def test_functional_schedule_moves_each_stacked_row_as_the_in_place_step() -> None:
    """``projected_log_alpha`` / ``decided_log_alpha`` on a stack of three students' log-alphas
    move each row exactly where ``project_to_budget`` / ``decide`` move that student's gates."""
    students = [_gated(seed) for seed in range(3)]
    stacked = torch.stack([s.flat_log_alpha() for s in students])
    template = students[0]
    for target, strength in [(0.8, None), (0.5, 0.0), (0.5, 0.4), (0.5, 1.0)]:
        if strength is None:
            moved = template.projected_log_alpha(stacked, target)
        else:
            moved = template.decided_log_alpha(stacked, target, strength)
        masks = template.decision_mask(stacked)
        for row, student in enumerate(students):
            assert torch.equal(masks[row], student.decision_mask(student.flat_log_alpha()))
            if strength is None:
                student.project_to_budget(target)
                torch.testing.assert_close(moved[row], student.flat_log_alpha(), rtol=0, atol=1e-6)
            else:
                student.decide(target, strength)
                assert torch.equal(moved[row], student.flat_log_alpha())  # the same ops row by row
        stacked = moved
