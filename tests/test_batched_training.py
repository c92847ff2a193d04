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


def _reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor) -> torch.nn.Module:
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for start in range(0, len(order), BATCH):
        idx = order[start:start + BATCH]
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
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
        expected = _reference(model, x, y, orders[i]).state_dict()
        got = stack.module(i).state_dict()
        for name, tensor in expected.items():
            if tensor.is_floating_point():
                torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=f"model {i} {name}")
            else:
                assert torch.equal(got[name], tensor), f"model {i} {name}"


def test_unknown_mode_is_refused() -> None:
    stack = common.Stack.of([MNIST1DCNN(), MNIST1DCNN()])
    with pytest.raises(ValueError, match="vmap.*loop"):
        common.train(stack, torch.randn(4, 1, 40), torch.zeros(4, dtype=torch.long), "classification",
                     common.Phase(0, 1, 2, lambda e: torch.full((2,), LR)), "threads")
