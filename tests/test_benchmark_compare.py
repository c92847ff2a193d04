"""The benchmarks' cost accounting, paired statistics and gate budget (``benchmarks/common.py``,
``benchmarks/compare.py``), checked against hand counts and closed forms."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import compare  # noqa: E402

from graphmerge.examples.mlp import SineMLP  # noqa: E402


def linear_stack_flops(widths: list[int], backward: bool = True) -> int:
    """Per sample, a chain of Linear layers ``widths[0] -> widths[1] -> ...``: forward 2·in·out each;
    backward 2·in·out for the weight gradient, and 2·in·out for the input gradient except for the
    first layer, whose input (the data) needs none. Biases and activations are not counted."""
    pairs = list(zip(widths[:-1], widths[1:], strict=True))
    forward = sum(2 * i * o for i, o in pairs)
    if not backward:
        return forward
    return forward + sum(2 * i * o for i, o in pairs) + sum(2 * i * o for i, o in pairs[1:])


def sine_bench(unit: int, n_train: int = 96, runs: int = 2) -> common.Benchmark:
    torch.manual_seed(0)
    x = torch.rand(n_train, 1)
    data = {"train": (x, torch.sin(10 * x)), "val": (x[:16], torch.sin(10 * x[:16])),
            "test": (x[:64], torch.sin(10 * x[:64]))}
    budget = common.Budget(unit=unit, lr=0.01, batch_size=32)
    return common.Benchmark(name="sine", task="regression", build=SineMLP, example_inputs=lambda: (torch.rand(16, 1),),
                            data=data, budget=budget, runs=runs, out=Path("/nonexistent"), log=lambda _: None)


def test_sine_flops_and_equal_compute_epochs_match_a_hand_count() -> None:
    bench = sine_bench(unit=5)
    costs = common.measure_costs(bench)
    small = linear_stack_flops([1, 100, 1])  # 1 000: the benchmark's sine MLP
    assert small == 1000
    assert costs.small == small
    assert costs.gated2 == linear_stack_flops([1, 200, 1])  # the big student: 200 hidden units, gates free
    assert costs.gated3 == linear_stack_flops([1, 300, 1])
    assert costs.forward == linear_stack_flops([1, 100, 1], backward=False)
    assert costs.n_bn == 0  # no BatchNorm, nothing re-estimated
    u, n = 5, 96
    # two teachers of 2u epochs, the gate phase (u epochs of the big student), fine-tuning (u epochs)
    student = n * (2 * 2 * u * small + u * 2 * small + u * small)
    assert common.student_flops(bench.budget, costs) == student
    eq = common.equal_compute(bench.budget, costs)
    assert eq.one == 7 * u  # 7u small-model epochs cost what the student pipeline costs
    assert eq.bo3 == round(7 * u / 3)
    flops = common.strategy_flops(bench.budget, costs, eq)
    assert flops["one model (equal FLOPs)"] == flops["student"] == flops["magnitude after gate phase"]
    assert flops["one model"] == n * 6 * u * small
    assert flops["bo3 model"] == 3 * n * 2 * u * small + 3 * 16 * 400  # + bo3's pick on 16 validation samples
    assert set(flops) == set(common.STRATEGIES)


def test_gate_phase_projected_budget_keeps_every_group_at_or_under_its_budget() -> None:
    bench = sine_bench(unit=4)
    teachers = [[SineMLP(), SineMLP()] for _ in range(bench.runs)]
    for ts in teachers:
        for t in ts:
            common.train(common.Stack.of([t]), *bench.data["train"], "regression",
                         common.Phase(0, 1, 32, lambda e: torch.full((1,), 0.0)))
    trained, history, _, times = common.gate_phase(bench, teachers, tag="N=2")
    # the budget falls linearly from 1 to 1/2 over the first half of 4 epochs: 0.75, 0.5, 0.5, 0.5
    assert history["budget"] == pytest.approx([0.75, 0.5, 0.5, 0.5])
    assert "lambda" not in history
    for gated in trained:
        for gid, fraction in gated.open_fraction().items():  # the library's own P[g > 0]
            assert fraction <= 0.5 + 1e-6, gid
            assert fraction == pytest.approx(0.5, abs=1e-3)  # gates start above 1/2 open: held at the budget
        before = {k: v.clone() for k, v in gated.state_dict().items() if "log_alpha" in k}
        gated.project_to_budget(0.5)  # the library's per-model projection finds nothing to move
        for k, v in before.items():
            torch.testing.assert_close(gated.state_dict()[k], v, rtol=0, atol=1e-6)
    assert len(times["compile_s"]) == bench.runs and times["train_per_model_s"] > 0


def test_gate_phase_penalty_records_the_papers_lambda_schedule() -> None:
    bench = sine_bench(unit=3)
    bench.budget.gate_budget = "penalty"
    teachers = [[SineMLP(), SineMLP()] for _ in range(bench.runs)]
    _, history, _, _ = common.gate_phase(bench, teachers, tag="N=2")
    lam, expected = bench.budget.lambda0, []
    for _ in range(3):  # λ ← λ + 0.05·√λ once per epoch, before the epoch (the reference code), from λ0
        lam += bench.budget.lambda_growth * math.sqrt(lam)
        expected.append(lam)
    assert history["lambda"] == pytest.approx(expected)
    assert "budget" not in history


@pytest.mark.parametrize(("low", "high", "higher", "expected"), [
    (0.01, 0.03, True, "win"), (0.01, 0.03, False, "loss"), (-0.03, -0.01, True, "loss"),
    (-0.03, -0.01, False, "win"), (-0.01, 0.02, True, "no difference"), (-0.01, 0.02, False, "no difference"),
    (0.0, 0.02, True, "no difference"),
])
def test_verdict_follows_the_interval_and_the_metric_direction(low, high, higher, expected) -> None:
    assert compare.verdict(low, high, higher) == expected


def test_bootstrap_interval_contains_the_mean_and_matches_the_normal_interval() -> None:
    d = np.random.default_rng(1).normal(0.3, 1.0, 400)
    low, high = compare.bootstrap_ci(d)
    assert low < d.mean() < high
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))  # the normal-theory interval, for a large sample
    assert low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert compare.bootstrap_ci([0.2] * 7) == pytest.approx((0.2, 0.2))


def test_wilcoxon_p_matches_the_exact_distribution() -> None:
    # n distinct differences all of one sign: W = 0 is the most extreme of 2^n sign patterns, p = 2 / 2^n
    assert compare.wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 2 ** 5)
    assert compare.wilcoxon_p([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]) == pytest.approx(2 / 2 ** 6)
    assert compare.wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert compare.wilcoxon_p([0.1]) is None


def test_paired_comparison_of_two_strategies() -> None:
    a = [0.95, 0.97, 0.96, 0.98, 0.94, 0.97]
    b = [0.90, 0.93, 0.91, 0.92, 0.90, 0.94]
    result = compare.paired(a, b, higher_is_better=True)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    assert result["differences"] == pytest.approx(diffs)
    assert result["mean"] == pytest.approx(sum(diffs) / len(diffs))
    low, high = result["ci95"]
    assert min(diffs) <= low <= result["mean"] <= high <= max(diffs)
    assert result["verdict"] == "win"  # every run better: the interval lies above 0
    assert compare.paired(b, a, higher_is_better=True)["verdict"] == "loss"
    assert compare.paired(a, b, higher_is_better=False)["verdict"] == "loss"  # as MSEs a is worse
