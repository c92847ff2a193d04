"""The weights' optimiser of a training phase: SGD or AdamW, a learning-rate schedule, clipping.

:class:`Optimizer` describes what one weight phase (teacher training, the big student's weights
during the gate phase, fine-tuning) trains with; ``MergeSettings.teacher_optimizer`` /
``.weight_optimizer`` / ``.finetune_optimizer`` and ``train(optimizer=...)`` take one. Left None, a
phase trains exactly as the paper's reference code (:class:`LegacySGD`: SGD with momentum over
every parameter, weight decay on all of them, MultiStepLR per epoch).

Weight decay rule: a parameter is decayed if and only if it has two or more dimensions
(``p.ndim >= 2``: linear and convolution weights, embedding tables). One-dimensional and scalar
parameters (biases, LayerNorm/BatchNorm/RMSNorm scales and shifts, per-channel scalars, 1-d
positional or embedding vectors) are never decayed. The gates' log-alphas are never in a weight
optimiser at all: they have their own SGD (``gate_lr``, ``gate_momentum``), without decay.

Schedules: "multistep" multiplies the learning rate by ``gamma`` at each of ``milestones`` (epochs;
None: half and three quarters of the phase) and steps once per epoch, as MultiStepLR always did
here. "cosine", "linear" and "constant" are per step: a LambdaLR stepped after every optimiser
step, over the phase's ``T = epochs · steps_per_epoch`` steps. With ``W = floor(warmup · T)``
warm-up steps, step ``s`` (0-based) runs at ``lr · f(s)`` where ``f(s) = s / W`` for ``s < W``
(linear from 0, as Hugging Face's schedules) and, with ``p = (s − W) / (T − W)``, ``f(s) =
(1 + cos(π·p)) / 2`` (cosine), ``1 − p`` (linear) or ``1`` (constant) after.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR

from graphmerge.errors import GraphMergeError

__all__ = ["OPTIMIZERS", "SCHEDULES", "LegacySGD", "Optimizer", "PhaseOptimizer", "check_superseded",
           "cli_optimizers", "lr_factor", "phase_optimizer", "steps_per_epoch"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "linear", "constant")
PER_STEP_SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_MOMENTUM = 0.9
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_GAMMA = 0.1


@dataclass(frozen=True)
class Optimizer:
    """How one weight phase trains: the optimiser, its learning-rate schedule and gradient clipping.

    ``name``: "sgd" (momentum, coupled L2 weight decay) or "adamw" (decoupled weight decay).
    ``lr``: the peak learning rate. ``momentum`` (sgd only; None: 0.9) and ``betas`` (adamw only;
    None: (0.9, 0.999)). ``weight_decay``: on parameters with ``ndim >= 2`` only (see the module
    docstring). ``schedule``: "multistep" (per epoch), "cosine", "linear" or "constant" (per step).
    ``warmup``: the fraction of the phase's steps in [0, 1) over which the learning rate rises
    linearly from 0 (per-step schedules only). ``milestones`` (epochs; None: half and three
    quarters of the phase) and ``gamma`` (None: 0.1): multistep only. ``clip``: the largest L2
    norm of the weights' gradients (over all of them together), or None for no clipping.
    A setting that does not apply to the chosen optimiser or schedule raises ``GraphMergeError``.
    """

    name: str = "sgd"
    lr: float = 0.01
    momentum: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float = 0.0
    schedule: str = "multistep"
    warmup: float = 0.0
    milestones: Sequence[int] | None = None
    gamma: float | None = None
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise GraphMergeError(f"unknown Optimizer name {self.name!r}: use 'sgd' (SGD with momentum, the paper's) "
                                  f"or 'adamw' (AdamW, decoupled weight decay).")
        if self.schedule not in SCHEDULES:
            raise GraphMergeError(f"unknown Optimizer schedule {self.schedule!r}: use 'multistep' (lr × gamma at "
                                  f"milestone epochs), 'cosine', 'linear' or 'constant' (per step, after warmup).")
        _number("lr", self.lr)
        _number("weight_decay", self.weight_decay)
        if self.momentum is not None:
            if self.name != "sgd":
                raise GraphMergeError(f"Optimizer momentum={self.momentum} applies to name='sgd' only; AdamW's "
                                      f"moments are set by betas. Leave momentum None or use name='sgd'.")
            _fraction("momentum", self.momentum)
        if self.betas is not None:
            if self.name != "adamw":
                raise GraphMergeError(f"Optimizer betas={self.betas} applies to name='adamw' only; SGD's is "
                                      f"momentum. Leave betas None or use name='adamw'.")
            if isinstance(self.betas, str | bytes) or not isinstance(self.betas, Sequence) or len(self.betas) != 2:
                raise GraphMergeError(f"Optimizer betas must be two numbers (beta1, beta2) in [0, 1), got "
                                      f"{self.betas!r}.")
            for beta in self.betas:
                _fraction("betas", beta)
            object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _fraction("warmup", self.warmup)
        if self.schedule == "multistep":
            if self.warmup:
                raise GraphMergeError(f"Optimizer warmup={self.warmup} ramps the learning rate per step, which the "
                                      f"per-epoch schedule 'multistep' does not do: use schedule='cosine', 'linear' "
                                      f"or 'constant', or warmup=0.")
            if self.gamma is not None:
                _number("gamma", self.gamma, positive=True)
            if self.milestones is not None:
                object.__setattr__(self, "milestones", _epochs("milestones", self.milestones))
        else:
            for name in ("milestones", "gamma"):
                if getattr(self, name) is not None:
                    raise GraphMergeError(f"Optimizer {name}={getattr(self, name)!r} applies to schedule='multistep' "
                                          f"only; the schedule is {self.schedule!r}. Leave {name} None or use "
                                          f"schedule='multistep'.")
        if self.clip is not None:
            _number("clip", self.clip, positive=True)

    @property
    def per_step(self) -> bool:
        """True when the scheduler steps after every optimiser step (all schedules but multistep)."""
        return self.schedule in PER_STEP_SCHEDULES

    def describe(self) -> dict[str, Any]:
        """The settings with defaults filled in and inapplicable ones left out (what a checkpoint
        fingerprints, so ``momentum=None`` and ``momentum=0.9`` resume each other)."""
        described: dict[str, Any] = {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay,
                                     "schedule": self.schedule, "clip": self.clip}
        if self.name == "sgd":
            described["momentum"] = DEFAULT_MOMENTUM if self.momentum is None else self.momentum
        else:
            described["betas"] = list(DEFAULT_BETAS if self.betas is None else self.betas)
        if self.per_step:
            described["warmup"] = self.warmup
        else:
            described["milestones"] = None if self.milestones is None else list(self.milestones)
            described["gamma"] = DEFAULT_GAMMA if self.gamma is None else self.gamma
        return described

    def param_groups(self, params: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
        """The torch param groups: ``ndim >= 2`` with ``weight_decay``, the rest with 0 (empty ones left out)."""
        params = [p for p in params if p.requires_grad]
        decayed = [p for p in params if p.ndim >= 2]
        plain = [p for p in params if p.ndim < 2]
        groups = [{"params": decayed, "weight_decay": self.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The torch optimiser over ``params``, split into decayed and not decayed groups."""
        groups = self.param_groups(params)
        if not groups:
            raise GraphMergeError("the Optimizer got no trainable parameters (none with requires_grad=True).")
        if self.name == "sgd":
            momentum = DEFAULT_MOMENTUM if self.momentum is None else self.momentum
            return torch.optim.SGD(groups, lr=self.lr, momentum=momentum)
        return torch.optim.AdamW(groups, lr=self.lr, betas=DEFAULT_BETAS if self.betas is None else self.betas)

    def scheduler(self, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int | None) -> LRScheduler:
        """MultiStepLR (step it once per epoch) or a LambdaLR over ``epochs · steps_per_epoch`` steps
        (step it after every optimiser step). ``steps_per_epoch`` None: the data has no length,
        which only the constant schedule without warmup can do without."""
        if not self.per_step:
            from graphmerge.training import default_milestones

            marks = default_milestones(epochs) if self.milestones is None else list(self.milestones)
            return MultiStepLR(optimizer, milestones=marks, gamma=DEFAULT_GAMMA if self.gamma is None else self.gamma)
        if steps_per_epoch is None:
            if self.schedule != "constant" or self.warmup:
                raise GraphMergeError(f"the {self.schedule} schedule{' with warmup' if self.warmup else ''} needs the "
                                      f"number of steps per epoch, but the training data has no length (an "
                                      f"IterableDataset). Give a map-style Dataset or a DataLoader over one, or use "
                                      f"schedule='multistep' or 'constant' without warmup.")
            steps_per_epoch = 0
        total, schedule, warmup = epochs * steps_per_epoch, self.schedule, self.warmup

        def factor(step: int) -> float:
            return lr_factor(schedule, warmup, step, total)

        return LambdaLR(optimizer, factor)

    def for_phase(self, params: Iterable[nn.Parameter], epochs: int,
                  steps_per_epoch: Callable[[], int | None]) -> PhaseOptimizer:
        """Optimiser and scheduler of one phase (``steps_per_epoch`` is asked only by per-step schedules)."""
        optimizer = self.build(params)
        scheduler = self.scheduler(optimizer, epochs, steps_per_epoch() if self.per_step else None)
        if self.per_step:
            return PhaseOptimizer(optimizer, [], [scheduler], self.clip)
        return PhaseOptimizer(optimizer, [scheduler], [], self.clip)


def lr_factor(schedule: str, warmup: float, step: int, total: int) -> float:
    """The multiplier of the peak learning rate at (0-based) ``step`` of ``total`` (see the module docstring)."""
    warm = int(warmup * total)
    if step < warm:
        return step / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


@dataclass(frozen=True)
class LegacySGD:
    """A phase's optimiser when its Optimizer is None: the paper's SGD over every parameter (weight
    decay on all of them) and, when ``scheduled``, MultiStepLR per epoch, built from the flat settings."""

    lr: float
    momentum: float
    weight_decay: float
    milestones: Sequence[int] | None = None
    gamma: float = DEFAULT_GAMMA
    scheduled: bool = True


@dataclass
class PhaseOptimizer:
    """The weights' optimiser of one phase with its schedulers, as ``fit`` and the checkpoints take them."""

    optimizer: torch.optim.Optimizer
    epoch_schedulers: list[LRScheduler]
    step_schedulers: list[LRScheduler]
    clip: float | None = None

    @property
    def schedulers(self) -> list[LRScheduler]:
        """Every scheduler, in the order a checkpoint stores them."""
        return [*self.epoch_schedulers, *self.step_schedulers]

    def phase_options(self, name: str = "weights") -> dict[str, Any]:
        """``PhaseConfig`` keywords: the schedulers and the clipping of the optimiser called ``name``."""
        return {"schedulers": self.epoch_schedulers, "step_schedulers": self.step_schedulers,
                "clip": None if self.clip is None else {name: self.clip}}


def phase_optimizer(spec: Optimizer | None, legacy: LegacySGD, params: Iterable[nn.Parameter], epochs: int,
                    steps_per_epoch: Callable[[], int | None]) -> PhaseOptimizer:
    """``spec``'s optimiser for a phase, or, when it is None, the phase's optimiser before Optimizer existed."""
    if spec is not None:
        return spec.for_phase(params, epochs, steps_per_epoch)
    from graphmerge.training import default_milestones, sgd

    optimizer = sgd(params, legacy.lr, legacy.momentum, legacy.weight_decay)
    if not legacy.scheduled:
        return PhaseOptimizer(optimizer, [], [])
    marks = default_milestones(epochs) if legacy.milestones is None else list(legacy.milestones)
    return PhaseOptimizer(optimizer, [MultiStepLR(optimizer, milestones=marks, gamma=legacy.gamma)], [])


def steps_per_epoch(data: Any, batch_size: int, ctx: Any) -> int | None:
    """Optimiser steps per epoch on each rank (``fit``'s batches), or None when the data has no length."""
    from graphmerge.training import epoch_batches

    try:
        return len(epoch_batches(data, batch_size, seed=0, epoch=0, ctx=ctx))
    except TypeError:
        return None


#: Which weight phases each flat setting of MergeSettings feeds when the phase's Optimizer is None.
FLAT_SETTINGS: Mapping[str, tuple[str, ...]] = {
    "teacher_lr": ("teacher_optimizer",), "teacher_milestones": ("teacher_optimizer",),
    "weight_lr": ("weight_optimizer",), "weight_momentum": ("teacher_optimizer", "weight_optimizer"),
    "weight_decay": ("teacher_optimizer", "weight_optimizer", "finetune_optimizer"),
    "finetune_lr": ("finetune_optimizer",), "finetune_momentum": ("finetune_optimizer",),
    "finetune_milestones": ("finetune_optimizer",), "finetune_gamma": ("finetune_optimizer",),
}


def check_superseded(settings: Any) -> None:
    """The phase Optimizers of a MergeSettings are Optimizer or None; a flat setting changed from its
    default while every phase it feeds has its own Optimizer would have no effect, so it is refused."""
    for name in ("teacher_optimizer", "weight_optimizer", "finetune_optimizer"):
        value = getattr(settings, name)
        if value is not None and not isinstance(value, Optimizer):
            raise GraphMergeError(f"{name} must be a graphmerge.Optimizer or None (the paper's SGD from the flat "
                                  f"settings), got {type(value).__name__}.")
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    for flat, phases in FLAT_SETTINGS.items():
        if getattr(settings, flat) != defaults[flat] and all(getattr(settings, p) is not None for p in phases):
            raise GraphMergeError(f"{flat} is set, but {' and '.join(phases)} {'is' if len(phases) == 1 else 'are'} "
                                  f"given, so it would have no effect: put the value into the Optimizer (lr, "
                                  f"momentum, weight_decay, milestones, gamma), or leave {flat} at its default.")


def cli_optimizers(optimizer: str | None, schedule: str | None, warmup: float | None, clip: float | None,
                   weight_decay: float, phases: Mapping[str, tuple[float, str]]) -> dict[str, Optimizer] | None:
    """The Optimizers the ``--optimizer/--schedule/--warmup/--clip`` flags ask for, one per weight
    phase: ``phases`` maps a setting name to (its learning rate, the schedule it keeps unless
    ``--schedule`` is given). None when none of those flags is given (the paper's SGD, as before)."""
    if optimizer is None and schedule is None and warmup is None and clip is None:
        return None
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise GraphMergeError(f"unknown --optimizer {optimizer!r}: use sgd (SGD with momentum 0.9, the paper's) or "
                              f"adamw (AdamW, betas 0.9/0.999, decoupled weight decay).")
    if schedule is not None and schedule not in SCHEDULES:
        raise GraphMergeError(f"unknown --schedule {schedule!r}: use multistep (lr / 10 at half and 3/4 of each "
                              f"phase, per epoch), cosine, linear or constant (per step, after --warmup).")
    if warmup is not None and not (math.isfinite(warmup) and 0 <= warmup < 1):
        raise GraphMergeError(f"--warmup {warmup} must be a fraction of each phase's steps in [0, 1).")
    if warmup and schedule in (None, "multistep"):
        raise GraphMergeError(f"--warmup {warmup} ramps the learning rate per step, but "
                              f"{'--schedule multistep' if schedule else 'the default schedule (multistep)'} "
                              f"changes it per epoch: add --schedule cosine (or linear, constant).")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise GraphMergeError(f"--clip {clip} must be a positive maximum gradient norm.")
    built = {}
    for setting, (lr, default_schedule) in phases.items():
        kind = schedule or default_schedule
        built[setting] = Optimizer(name=optimizer or "sgd", lr=lr, weight_decay=weight_decay, schedule=kind,
                                   warmup=warmup or 0.0, clip=clip)
    return built


def _number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise GraphMergeError(f"Optimizer {name} must be a finite number, got {value!r}.")
    if value < 0 or (positive and value == 0):
        raise GraphMergeError(f"Optimizer {name} must be {'positive' if positive else 'at least 0'}, got {value}.")


def _fraction(name: str, value: Any) -> None:
    _number(name, value)
    if value >= 1:
        raise GraphMergeError(f"Optimizer {name} must lie in [0, 1), got {value}.")


def _epochs(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values):
        raise GraphMergeError(f"Optimizer {name} must be a list of epochs (whole numbers >= 0), got {values!r}.")
    return tuple(int(v) for v in values)
