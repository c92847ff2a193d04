"""``MergeSettings``: every setting of one ``merge`` run, validated once when it is built.

A bad value raises ``GraphMergeError`` naming the setting before anything runs, and a checkpoint
records the settings' ``fingerprint`` so that a resumed run is refused when they differ. The
checks of single values (whole numbers, finite numbers, SGD settings) are shared with ``train``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from graphmerge import sharding
from graphmerge.errors import GraphMergeError
from graphmerge.optim import Optimizer, check_superseded
from graphmerge.passes.liveness import DEAD_CHANNEL_POLICIES
from graphmerge.passes.selection import NORMALISED_SELECTIONS
from graphmerge.run_store import LogSink
from graphmerge.training import LossFn, check_precision, cross_entropy, distill_term, lambda_schedule, resolve_loss

GATE_BUDGETS = ("projected", "penalty")
SELECTIONS = ("gates", "magnitude")
DISTILL_TARGETS = ("big", "teachers")
#: The distillation settings: fingerprinted only when ``distill`` is on (see MergeSettings.fingerprint).
DISTILL_SETTINGS = ("distill", "distill_weight", "temperature", "distill_loss")
OPTIMIZER_SETTINGS = ("teacher_optimizer", "weight_optimizer", "finetune_optimizer")


@dataclass(frozen=True)
class MergeSettings:
    """Every setting of one ``merge`` run, checked once when built (a bad value raises
    ``GraphMergeError`` naming the setting). Defaults follow the paper's reference code (see
    ``graphmerge.recipe``'s module docstring). A checkpoint stores :meth:`fingerprint`, and ``resume=True`` refuses a
    checkpoint whose fingerprint differs. ``teacher_optimizer`` / ``weight_optimizer`` (the big
    student's weights in the gate phase) / ``finetune_optimizer``: a :class:`graphmerge.Optimizer`
    (AdamW, warmup, cosine, clipping), or None for the paper's SGD from the flat settings
    (``teacher_lr``, ``weight_lr``, ``weight_momentum``, ``weight_decay``, ``finetune_*``)."""

    loss: str | LossFn = "cross_entropy"
    example_inputs: tuple | None = None
    gate_epochs: int = 10
    finetune_epochs: int = 10
    batch_size: int = 32
    weight_lr: float = 0.01
    weight_momentum: float = 0.9
    weight_decay: float = 0.0
    gate_lr: float = 1.0
    gate_momentum: float = 0.9
    gate_budget: str = "projected"
    budget_ramp: float = 0.5
    budget_direction: str = "gradient"
    decide_gates: bool = True
    lambda_schedule: str | Callable[[int], float] = "quadratic"
    lambda0: float = 0.01
    lambda_growth: float = 0.05
    gate_options: Mapping[str, Any] | None = None
    finetune_lr: float = 0.01
    finetune_momentum: float = 0.9
    finetune_milestones: Sequence[int] | None = None
    finetune_gamma: float = 0.1
    teacher_epochs: int | None = None
    teacher_seeds: Sequence[int] | None = None
    n_teachers: int = 2
    teacher_lr: float = 0.01
    teacher_milestones: Sequence[int] | None = None
    checkpoint_dir: str | Path | None = None
    resume: bool = False
    seed: int = 0
    log: LogSink = None
    progress: bool = False
    device: str = "cpu"
    distill: str | None = None
    distill_weight: float = 0.5
    temperature: float = 1.0
    distill_loss: LossFn | None = None
    compile: bool = False
    precision: str = "fp32"
    preflight: bool = True
    normalised_groups: str = "block"
    dead_channels: str = "replace"  # "keep": a selection may keep channels that cannot reach the output
    # where the teachers meet (a classifier), average the teachers whose channels the student kept instead
    # of all N (passes/rebalance.py); None: where no gate phase trained the big student at its 1/N scale
    average_kept: bool | None = None
    selection: str = "gates"  # "magnitude": keep the channels the next layers weigh most (no gate learning needed)
    gate_trace: int = 10
    strategy: str = "ddp"  # "fsdp": shard the gate phase's big student and the student (graphmerge/sharding.py)
    teacher_optimizer: Optimizer | None = None
    weight_optimizer: Optimizer | None = None
    finetune_optimizer: Optimizer | None = None

    #: Settings that may change between a run and its resumption (where and how it reports, whether
    #: the steps run compiled: the same computation, and whether the pipeline is checked first).
    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = ("resume", "log", "progress", "checkpoint_dir", "device",
                                                    "example_inputs", "compile", "preflight", "gate_trace")

    def __post_init__(self) -> None:
        minimums = {"gate_trace": 0, "gate_epochs": 0, "finetune_epochs": 0, "batch_size": 1, "n_teachers": 2,
                    "seed": None,
                    "teacher_epochs": 1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is None and name == "teacher_epochs":  # None: the teachers come trained
                continue
            check_int(name, value, minimum)
            object.__setattr__(self, name, int(value))  # numpy ints too
        check_sgd("weight", self.weight_lr, self.weight_momentum, self.weight_decay)
        check_sgd("gate", self.gate_lr, self.gate_momentum)
        check_sgd("finetune", self.finetune_lr, self.finetune_momentum)
        check_sgd("teacher", self.teacher_lr)
        check_number("finetune_gamma", self.finetune_gamma, positive=True)
        check_superseded(self)
        if self.gate_budget not in GATE_BUDGETS:
            raise GraphMergeError(f"unknown gate_budget {self.gate_budget!r}: use 'projected' (the budget 1/N "
                                  f"is met by the end of any gate phase) or 'penalty' (the paper's λ·L_half).")
        if self.budget_direction not in ("gradient", "uniform"):
            raise GraphMergeError(f"unknown budget_direction {self.budget_direction!r}: use 'gradient' (gates move "
                                  f"along the budget's gradient; undecided ones close first) or 'uniform'.")
        check_number("budget_ramp", self.budget_ramp, positive=True)
        if not isinstance(self.decide_gates, bool):
            raise GraphMergeError(f"decide_gates must be True or False, got {self.decide_gates!r}.")
        if self.budget_ramp > 1:
            raise GraphMergeError(f"budget_ramp is the fraction of the gate phase spent reaching the budget; it "
                                  f"must lie in (0, 1], got {self.budget_ramp}.")
        check_number("lambda_growth", self.lambda_growth)
        check_number("lambda0", self.lambda0)
        lambda_schedule(self.lambda_schedule, self.lambda0, self.lambda_growth)  # names a bad schedule
        resolve_loss(self.loss)  # names a bad loss
        self._check_distill()
        if self.normalised_groups not in NORMALISED_SELECTIONS:
            raise GraphMergeError(f"unknown normalised_groups {self.normalised_groups!r}: use 'block' (a group a "
                                  "normalisation spans keeps one teacher's whole block; compression is exact) or "
                                  "'mixed' (the top channels of any teachers, as the paper).")
        if self.dead_channels not in DEAD_CHANNEL_POLICIES:
            raise GraphMergeError(f"unknown dead_channels {self.dead_channels!r}: use 'replace' (a kept channel that "
                                  "cannot reach the output is swapped for the best channel of a teacher that can) or "
                                  "'keep' (the selection as the scores have it).")
        if self.selection not in SELECTIONS:
            raise GraphMergeError(f"unknown selection {self.selection!r}: use 'gates' (the channels the learned gates "
                                  "keep, the paper's method) or 'magnitude' (the channels whose consumers' input "
                                  "weights are largest; with gate_epochs=0 there is no gate phase at all).")
        if self.average_kept is not None and not isinstance(self.average_kept, bool):
            raise GraphMergeError(f"average_kept must be True, False or None (where no gate phase trained the big "
                                  f"student), got {self.average_kept!r}.")
        for name in ("compile", "preflight"):
            if not isinstance(getattr(self, name), bool):
                raise GraphMergeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_precision(self.precision)
        sharding.check_strategy(self.strategy)
        for name in ("finetune_milestones", "teacher_milestones", "teacher_seeds"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int_tuple(name, value, minimum=None if name == "teacher_seeds" else 0))
        if self.gate_options is not None:
            if not isinstance(self.gate_options, Mapping):
                raise GraphMergeError(f"gate_options must be a mapping of add_gates keyword arguments, got "
                                      f"{type(self.gate_options).__name__}.")
            object.__setattr__(self, "gate_options", dict(self.gate_options))
        if self.example_inputs is not None:
            inputs = self.example_inputs
            object.__setattr__(self, "example_inputs", (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
        if self.resume and self.checkpoint_dir is None:
            raise GraphMergeError("resume=True needs checkpoint_dir (the folder of the run to resume).")

    def _check_distill(self) -> None:
        """distill in (None, 'big', 'teachers'); its weight in [0, 1]; a temperature only where it acts."""
        if self.distill is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in DISTILL_SETTINGS}
            changed = [name for name in DISTILL_SETTINGS if getattr(self, name) != defaults[name]]
            if changed:
                raise GraphMergeError(f"{changed[0]} is set but distill is None, so it would have no effect: pass "
                                      f"distill='big' or 'teachers' (--distill big|teachers) to distill during "
                                      f"fine-tuning, or leave {changed[0]} at its default.")
            return
        if self.distill not in DISTILL_TARGETS:
            raise GraphMergeError(f"unknown distill {self.distill!r}: use 'big' (the gated big student as trained at "
                                  f"the end of the gate phase), 'teachers' (the mean of the teachers' outputs) or "
                                  f"None for no distillation (--distill big|teachers|none).")
        check_number("distill_weight", self.distill_weight)
        if self.distill_weight > 1:
            raise GraphMergeError(f"distill_weight is w in the fine-tuning loss (1 - w)·task + w·distill; it must "
                                  f"lie in [0, 1], got {self.distill_weight}.")
        check_number("temperature", self.temperature, positive=True)
        if self.distill_loss is not None and not callable(self.distill_loss):
            raise GraphMergeError(f"distill_loss must be a callable (student_output, target_output) -> scalar "
                                  f"tensor, got {type(self.distill_loss).__name__}.")
        if self.temperature != 1 and (self.distill_loss is not None or resolve_loss(self.loss)[0] is not cross_entropy):
            raise GraphMergeError(f"temperature={self.temperature} softens logits in the cross-entropy distillation "
                                  f"term only; here the term is {'distill_loss' if self.distill_loss else 'the MSE'} "
                                  f"between student and target outputs, where it has no effect. Leave temperature "
                                  f"at 1 (--temperature 1).")
        distill_term(self.loss, self.temperature, self.distill_loss)  # a custom loss needs distill_loss

    @property
    def averages_kept(self) -> bool:
        """Whether compress's student gets ``average_kept_teachers``: as set, else where no gate phase
        trained the big student's weights (a phase that did learned its 1/N scale at the classifier)."""
        if self.average_kept is not None:
            return self.average_kept
        return self.gate_epochs == 0

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint records (callables by name); resuming compares them. The
        distillation settings are left out while ``distill`` is None, so checkpoints written
        before they existed resume, and a changed ``distill`` is still refused."""
        skipped = self.NOT_FINGERPRINTED + (DISTILL_SETTINGS if self.distill is None else ())
        skipped += ("precision",) if self.precision == "fp32" else ()  # checkpoints from before it existed
        # off (the behaviour before it existed) or without effect (penalty): older checkpoints resume
        skipped += ("decide_gates",) if not self.decide_gates or self.gate_budget != "projected" else ()
        skipped += ("normalised_groups",) if self.normalised_groups == "mixed" else ()  # the selection before it
        skipped += ("strategy",) if self.strategy == "ddp" else ()  # fsdp checkpoints hold shards, not weights
        skipped += ("selection",) if self.selection == "gates" else ()  # the only selection before it existed
        # the behaviour before each existed: checkpoints written before them resume
        skipped += ("dead_channels",) if self.dead_channels == "keep" else ()
        skipped += ("average_kept",) if self.average_kept is None else ()
        skipped += tuple(n for n in OPTIMIZER_SETTINGS if getattr(self, n) is None)  # None: as before they existed
        return {f.name: _describe(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in skipped}


def _describe(value: Any) -> Any:
    if isinstance(value, Optimizer):
        return value.describe()
    return getattr(value, "__qualname__", type(value).__name__) if callable(value) else value


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise GraphMergeError(f"{name} must be a whole number, got {value!r}.")
    if minimum is not None and value < minimum:
        raise GraphMergeError(f"{name} must be at least {minimum}, got {value}.")


def check_number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(value):
        raise GraphMergeError(f"{name} must be a finite number, got {value!r}.")
    if value < 0 or (positive and value == 0):
        raise GraphMergeError(f"{name} must be {'positive' if positive else 'at least 0'}, got {value}.")


def check_sgd(prefix: str, lr: float, momentum: float | None = None, weight_decay: float | None = None) -> None:
    """SGD settings: lr >= 0, momentum in [0, 1), weight_decay >= 0 (named ``{prefix}_lr`` etc.)."""
    check_number(f"{prefix}_lr".lstrip("_"), lr)
    if momentum is not None:
        name = f"{prefix}_momentum".lstrip("_")
        check_number(name, momentum)
        if momentum >= 1:
            raise GraphMergeError(f"{name} must be below 1 (SGD diverges at 1 and above), got {momentum}.")
    if weight_decay is not None:
        check_number("weight_decay", weight_decay)


def int_tuple(name: str, values: Any, minimum: int | None) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise GraphMergeError(f"{name} must be a list of whole numbers, got {values!r}.")
    for value in values:
        check_int(name, value, minimum)
    return tuple(int(v) for v in values)

