"""What a user holding N trained models would otherwise do with the compute a merge spends.

A merge spends training FLOPs the teachers did not: the gate phase runs the (gated) big student,
fine-tuning the student. A user with the same teachers and the same extra FLOPs could instead
fine-tune the best teacher, or average the teachers' weights and fine-tune the average. This
module prices those FLOPs (``torch.utils.flop_counter``: the forward, the loss and the backward of
one training step, per sample) and spends them on each alternative, so that a merge's student is
compared with what the same budget buys otherwise (``graphmerge demo`` prints that comparison;
``benchmarks/posthoc.py`` sweeps it with more strategies). ``magnitude_scores`` and ``random_scores``
replace the learned gates in ``graphmerge.compress(big, scores)``: is *learning* the selection what helps?

A budget that buys ``S`` samples at a strategy's per-sample cost trains ``ceil(S / n)`` epochs over
a seeded random subset of ``S / epochs`` of the ``n`` training samples, so every strategy spends
the budget to within one sample's cost.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from graphmerge.errors import GraphMergeError
from graphmerge.passes.ir import widen_info
from graphmerge.passes.layout import teacher_maps
from graphmerge.training import _to_device, logits_of, resolve_loss

__all__ = ["Plan", "budget_subset", "forward_flops_per_sample", "magnitude_scores", "plan_budget", "random_scores",
           "reestimate_batchnorm", "spend", "train_flops_per_sample", "weight_average"]


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _first_batch(data: Dataset | DataLoader, batch_size: int, device: torch.device) -> Any:
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    return _to_device(next(iter(loader)), device)


def train_flops_per_sample(model: nn.Module, data: Dataset | DataLoader, loss: Any = "cross_entropy",
                           batch_size: int = 32) -> float:
    """FLOPs per sample of one training step of ``model`` (train mode; forward, loss, backward) on the
    first batch of ``data``, as ``FlopCounterMode`` counts them (matmuls and convolutions). A copy of
    the model runs, so its gradients and statistics are untouched, and the global RNG is restored."""
    batch = _first_batch(data, batch_size, _device(model))
    loss_fn, _ = resolve_loss(loss)
    model = copy.deepcopy(model).train()
    with torch.random.fork_rng(), FlopCounterMode(display=False) as counter:
        loss_fn(logits_of(batch.run(model)), batch.target).backward()
    return counter.get_total_flops() / len(batch)


def forward_flops_per_sample(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 32) -> float:
    """FLOPs per sample of one eval-mode forward of ``model`` on the first batch of ``data``."""
    batch = _first_batch(data, batch_size, _device(model))
    model = copy.deepcopy(model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        batch.run(model)
    return counter.get_total_flops() / len(batch)


@dataclass(frozen=True)
class Plan:
    """How a strategy spends its FLOPs: ``epochs`` over a random subset of ``samples`` training samples."""

    epochs: int
    samples: int
    flops: float


def plan_budget(flops: float, per_sample: float, n_train: int) -> Plan | None:
    """The epochs and subset size that spend ``flops`` at ``per_sample`` FLOPs per sample on ``n_train``
    samples; None when the budget buys not one sample."""
    if per_sample <= 0 or n_train < 1:
        raise GraphMergeError(f"plan_budget needs a positive cost per sample and training set size, got "
                              f"{per_sample} and {n_train}.")
    total = int(flops // per_sample)
    if total < 1:
        return None
    epochs = math.ceil(total / n_train)
    samples = total // epochs
    return Plan(epochs=epochs, samples=samples, flops=epochs * samples * per_sample)


def budget_subset(data: Dataset, samples: int, seed: int) -> Dataset:
    """``samples`` of ``data``, drawn without replacement from ``seed`` (all of it when it has no more)."""
    if samples >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples]
    return Subset(data, order.tolist())


def spend(model: nn.Module, train_data: Dataset, plan: Plan | None, *, seed: int = 0,
          **train_options: Any) -> nn.Module:
    """A copy of ``model`` trained by ``graphmerge.train`` on the budget ``plan`` (unchanged when None)."""
    from graphmerge.recipe import train

    model = copy.deepcopy(model)
    if plan is None:
        return model.eval()
    train(model, budget_subset(train_data, plan.samples, seed), epochs=plan.epochs, seed=seed, **train_options)
    return model.eval()


def weight_average(models: Sequence[nn.Module], bn_data: Dataset | DataLoader | torch.Tensor | None = None,
                   batch_size: int = 256) -> nn.Module:
    """A copy of ``models[0]`` holding the element-wise mean of every floating tensor; with ``bn_data``,
    every BatchNorm's running statistics recomputed on it (averaged statistics describe no network)."""
    if len(models) < 2:
        raise GraphMergeError(f"weight_average needs at least 2 models, got {len(models)}.")
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    mismatched = [k for k in states[0] if any(k not in s or s[k].shape != states[0][k].shape for s in states[1:])]
    if mismatched or any(len(s) != len(states[0]) for s in states[1:]):
        raise GraphMergeError(f"weight_average needs models of one architecture; the state dicts differ at "
                              f"{(mismatched or ['their key sets'])[0]}.")
    merged.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone()
                            for k, v in states[0].items()})
    if bn_data is not None:
        reestimate_batchnorm(merged, bn_data, batch_size)
    return merged.eval()


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, data: Dataset | DataLoader | torch.Tensor,
                         batch_size: int = 256) -> nn.Module:
    """Reset and recompute every BatchNorm's running statistics over ``data`` (a cumulative average; with
    one batch, that batch's mean and unbiased variance). ``data`` may be a bare tensor of inputs."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    if isinstance(data, torch.Tensor):
        data = TensorDataset(data, torch.zeros(len(data)))
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    try:
        for raw in loader:
            _to_device(raw, _device(model)).run(model)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return model


# --- channel scores that replace the learned gates in compress ------------------------------------

def magnitude_scores(big: nn.Module) -> dict[int, torch.Tensor]:
    """Per widened group, per big channel: the L2 norm of its consumers' input weights.

    A channel's consumers are the layers reading it (conv/linear inputs, where the gates sit);
    the norm runs over every input-weight entry the channel owns in every consumer (all of its
    run after a flatten). Channels numbered as ``compress`` expects: teacher-major, ``t·width + c``.
    """
    graph_module, info = widen_info(big)
    layout = info.groups.layout
    n, widths, widened = info.n_teachers, info.widths, info.widened
    state = graph_module.state_dict()
    squares = {gid: torch.zeros(n * widths[gid], dtype=torch.float64) for gid in widened}
    for name, positions in layout.in_dims.items():
        dims = layout.params.get(name) or []
        for axis in positions:
            in_dim = dims[axis] if axis < len(dims) else None
            if in_dim is None or name not in state:
                continue
            _, maps = teacher_maps(in_dim, n, widths, widened)
            per_position = state[name].double().movedim(axis, 0).pow(2).reshape(state[name].shape[axis], -1).sum(1)
            for t in range(n):
                for p, (g, c) in enumerate(zip(in_dim.group.tolist(), in_dim.channel.tolist(), strict=True)):
                    if g in widened:
                        squares[g][t * widths[g] + c] += per_position[int(maps[t][p])]
    return {gid: s.sqrt() for gid, s in squares.items()}


def random_scores(big: nn.Module, seed: int) -> dict[int, torch.Tensor]:
    """Per widened group, uniformly random scores: a random choice of channels."""
    _, info = widen_info(big)
    generator = torch.Generator().manual_seed(seed)
    return {g.id: torch.rand(info.n_teachers * g.width, generator=generator) for g in info.groups.widened}
