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
    orders = torch.argsort(torch.rand(3, len(x), generator=torch.Generator().manual_seed(SEED)), dim=1)
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
    epochs = [torch.argsort(torch.rand(3, len(x), generator=generator), dim=1) for _ in range(2)]
    last = torch.argsort(torch.rand(2, len(x), generator=torch.Generator().manual_seed(SEED + 1)), dim=1)
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


def test_out_of_place_gate_noise_draws_the_same_values() -> None:
    """The compiled trainer's gate forward (noise clamped out of place, which vmap batches) gives
    exactly HardConcreteGates.forward's values for the same random state, in training and eval."""
    gates = _gated_sine_students(1)[0].gated.gates
    reference = torch.zeros(32, 1)
    for training in (True, False):
        gates.train(training)
        torch.manual_seed(5)
        expected = gates(reference)
        torch.manual_seed(5)
        assert torch.equal(common._gate_values(gates, reference), expected)


def test_compiled_gate_phase_step_equals_vmap() -> None:
    """A gated stack (λ·gate loss, gates' own lr) trained with mode "compile" ends where mode "vmap"
    ends: Inductor falls back to aten's generator, so every run draws the same gate noise."""
    x = torch.rand(80, 1)
    y = torch.sin(10 * x)
    stacks = {}
    for mode in ("vmap", "compile"):
        stacks[mode] = common.Stack.of(_gated_sine_students(3))
        common.train(stacks[mode], x, y, "regression",
                     common.Phase(0, 2, BATCH, lambda e: torch.full((3,), 0.01), gate_lr=0.1,
                                  aux=lambda e: 0.01 * (e + 1), seed=SEED), mode)
    for name, tensor in stacks["vmap"].params.items():
        torch.testing.assert_close(stacks["compile"].params[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_budget_projection_equals_eager() -> None:
    """The gate phase's compiled projection (the target a tensor, so one graph serves every step)
    moves every run's log-alphas where graphmerge's budget_projection moves them."""
    torch.manual_seed(1)
    segments = torch.arange(2).repeat_interleave(torch.tensor([5, 7]))
    start = [torch.randn(4, 5) + 2, torch.randn(4, 7) + 1]
    for target in (0.9, 0.5, 0.99999):
        eager, compiled = [t.clone() for t in start], [t.clone() for t in start]
        common._project_gates(eager, segments, target, -1.6, "gradient")
        common._compiled_projection()(compiled, segments, torch.tensor(target, dtype=torch.float64), -1.6, "gradient")
        for a, b in zip(compiled, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
