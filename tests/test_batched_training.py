"""The benchmarks' batched trainer (``benchmarks/common.py``) against ordinary training.

Many runs are trained at once there, with ``vmap`` or a loop over functional calls; both must do
exactly what ``torch.optim.SGD`` does to each model on its own, batch for batch: same data order,
momentum, weight decay, and BatchNorm running statistics.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402

from graphmerge.examples.mnist1d_cnn import MNIST1DCNN  # noqa: E402

LR, MOMENTUM, DECAY, BATCH, SEED = 0.05, 0.9, 5e-4, 32, 3


def _orders(generator: torch.Generator, models: int, samples: int) -> torch.Tensor:
    """train's shuffle, written out: per epoch one torch.randperm per model, in model order."""
    return torch.stack([torch.randperm(samples, generator=generator) for _ in range(models)])


def _reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, orders: list[torch.Tensor],
               lrs: list[float], loss=F.cross_entropy) -> torch.nn.Module:
    """``torch.optim.SGD`` on one model, one epoch per order, the learning rate set per epoch."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=MOMENTUM, weight_decay=DECAY)
    for order, lr in zip(orders, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            optimizer.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_batched_sgd_equals_torch_optim_sgd_per_model(mode: str) -> None:
    torch.manual_seed(0)
    models = [MNIST1DCNN() for _ in range(3)]
    x, y = torch.randn(80, 1, 40), torch.randint(0, 10, (80,))  # 80: the last batch is short
    stack = common.Stack.of(models)
    phase = common.Phase(0, 1, BATCH, lambda e: torch.full((3,), LR), momentum=MOMENTUM, weight_decay=DECAY,
                         seed=SEED)
    common.train(stack, x, y, "classification", phase, mode)
    orders = _orders(torch.Generator().manual_seed(SEED), 3, len(x))
    for i, model in enumerate(models):
        expected = _reference(model, x, y, [orders[i]], [LR]).state_dict()
        got = stack.module(i).state_dict()
        for name, tensor in expected.items():
            if tensor.is_floating_point():
                torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=f"model {i} {name}")
            else:
                assert torch.equal(got[name], tensor), f"model {i} {name}"


def test_unknown_mode_is_refused() -> None:
    stack = common.Stack.of([MNIST1DCNN(), MNIST1DCNN()])
    with pytest.raises(ValueError, match="vmap.*loop.*compile"):
        common.train(stack, torch.randn(4, 1, 40), torch.zeros(4, dtype=torch.long), "classification",
                     common.Phase(0, 1, 2, lambda e: torch.full((2,), LR)), "threads")


def test_compiled_sgd_equals_torch_optim_sgd_per_model() -> None:
    """mode "compile" (gradient and update in one Inductor graph, stack size and batch length dynamic):
    per model and per epoch its own learning rate, the short last batch, a stack that then loses
    a model and trains on without a new graph, all as torch.optim.SGD does it model by model."""
    from graphmerge.examples.mlp import SineMLP

    torch.manual_seed(0)
    models = [SineMLP() for _ in range(3)]
    x = torch.rand(80, 1)
    y = torch.sin(10 * x) + 0.1 * torch.randn(80, 1)
    lrs = torch.tensor([[0.01, 0.02, 0.005], [0.001, 0.02, 0.0005], [0.001, 0.002, 0.0005]])
    stack = common.Stack.of(models)
    common.train(stack, x, y, "regression", common.Phase(0, 2, BATCH, lambda e: lrs[e], momentum=MOMENTUM,
                                                         weight_decay=DECAY, seed=SEED), "compile")
    stack = stack.select([0, 2])
    common.train(stack, x, y, "regression", common.Phase(2, 3, BATCH, lambda e: lrs[e, [0, 2]], momentum=MOMENTUM,
                                                         weight_decay=DECAY, seed=SEED + 1), "compile")
    generator = torch.Generator().manual_seed(SEED)  # train's shuffles: one draw per epoch, every model's own
    epochs = [_orders(generator, 3, len(x)) for _ in range(2)]
    last = _orders(torch.Generator().manual_seed(SEED + 1), 2, len(x))
    for k, i in enumerate([0, 2]):
        orders = [epochs[0][i], epochs[1][i], last[k]]
        expected = _reference(models[i], x, y, orders, lrs[:, i].tolist(), F.mse_loss).state_dict()
        got = stack.module(k).state_dict()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=f"model {i} {name}")


def _gated_sine_students(runs: int) -> list[torch.nn.Module]:
    import graphmerge
    from graphmerge.examples.mlp import SineMLP

    torch.manual_seed(0)
    return [common.WithGateLoss(graphmerge.add_gates(graphmerge.widen([SineMLP().eval() for _ in range(2)],
                                                                       (torch.rand(16, 1),)), seed=i))
            for i in range(runs)]


def _gate_schedule(students: list[torch.nn.Module], steps: int):
    """The library's default gate-phase schedule (budget ramp, projection, decision) as ``Phase.after_update``."""
    import graphmerge

    gated = students[0].gated
    schedule = graphmerge.GatePhase(gated, steps)
    return common.gate_schedule(schedule, [f"gated.{name}" for name in gated.gate_parameter_names()])


@pytest.mark.parametrize("noise", ["aten", "hash"])
def test_compiled_gate_phase_step_equals_vmap(noise: str) -> None:
    """A gated stack (λ·gate loss, gates' own lr, the library's schedule after every update) trained
    with mode "compile" ends where mode "vmap" ends, for either noise: uniforms drawn per model
    outside the step ("aten") or hashed inside it (the same integer ops eager under vmap and
    compiled), every model's uniforms through the gated student's own forward."""
    x = torch.rand(80, 1)
    y = torch.sin(10 * x)
    stacks = {}
    for mode in ("vmap", "compile"):
        students = _gated_sine_students(3)
        stacks[mode] = common.Stack.of(students)
        common.train(stacks[mode], x, y, "regression",
                     common.Phase(0, 2, BATCH, lambda e: torch.full((3,), 0.01), gate_lr=0.1,
                                  aux=lambda e: 0.01 * (e + 1), seed=SEED, after_update=_gate_schedule(students, 6),
                                  noise=noise), mode)
    for name, tensor in stacks["vmap"].params.items():
        torch.testing.assert_close(stacks["compile"].params[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    student = _gated_sine_students(1)[0].gated
    gates = [f"gated.{name}" for name in student.gate_parameter_names()]
    open_mean = torch.sigmoid(stacks["compile"].params[gates[0]] - student.gates.open_shift)
    assert bool(((open_mean.mean(-1) - 0.5).abs() <= 1e-6).all())  # decided, on the final budget 1/2


def test_hashed_uniforms_are_uniform_independent_and_reproducible() -> None:
    """The compiled trainer's counter-based uniforms: in (0, 1) on 2^23 levels; mean, variance,
    the Kolmogorov-Smirnov distance and lag-1 correlation of a uniform over 2^20 draws; another key
    gives an uncorrelated stream; the same key the same values, eager, under vmap and compiled."""
    from scipy import stats

    u = common.hashed_uniform(torch.tensor(12345), (1024, 1024)).double()
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert bool(((u * 2**24) % 2 == 1).all())  # odd multiples of 2^-24
    flat = u.flatten().numpy()
    assert abs(flat.mean() - 0.5) < 3e-3 and abs(flat.var() - 1 / 12) < 1e-3
    assert stats.kstest(flat, "uniform").pvalue > 1e-3
    assert abs(float(torch.corrcoef(u.flatten().unfold(0, 2, 1).T)[0, 1])) < 5e-3
    other = common.hashed_uniform(torch.tensor(12346), (1024, 1024)).double()
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1])) < 5e-3
    assert not bool((u == other).all())
    keys = torch.tensor([7, 8, 2**40 + 7])
    eager = torch.stack([common.hashed_uniform(k, (3, 5)) for k in keys])
    batched = torch.vmap(lambda k: common.hashed_uniform(k, (3, 5)))(keys)
    compiled = torch.compile(lambda k: torch.vmap(lambda kk: common.hashed_uniform(kk, (3, 5)))(k))(keys)
    assert torch.equal(batched, eager) and torch.equal(compiled, eager)
    assert not torch.equal(eager[0], eager[2])  # the key's high bits count too
