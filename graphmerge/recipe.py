"""The paper's training strategy end to end: (train N teachers →) widen → gate phase → compress →
fine-tune, resumable from a checkpoint after every epoch of every phase.

Defaults follow the paper's reference code (SGD lr 0.01, momentum 0.9, in every phase; the gates'
log-alphas have their own SGD, momentum 0.9, never weight decay; fine-tuning uses MultiStepLR),
except for the gates' learning rate and how the gate phase meets its budget. The gates learn at lr
1.0, not the paper's 0.1: on gate phases of a few epochs (not the paper's 150), at 0.1 the gates
barely move before the budget closes them, so the selection is made by the projection alone and the
gated big student's validation accuracy collapses mid-phase (benchmarks/README.md, "gate phase").
The paper adds ``λ·Σ_groups L_half`` with λ grown by ``λ ← λ + 0.05·√λ`` from ``λ₀ = 0.01`` once per
epoch; that schedule assumes about 150 gate epochs and leaves groups far above 1/N open on short
phases (``gate_budget="penalty"`` keeps it). The default, ``gate_budget="projected"``, treats "mean
P[g > 0] ≤ budget" as a constraint: after every step each group's log-alphas are moved onto the
budget along the mean's gradient (``budget_direction="gradient"``: undecided gates close first;
"uniform" shifts them all by one constant), the budget falling linearly from 1 to 1/N over the first
``budget_ramp`` of the phase. Then (``decide_gates=True``) the gates are decided: the rest of the
phase drives the channels compress would keep to eval gate 1 and the others to 0
(``decided_projection``), every group held at exactly 1/N open, so the weights train with the
network compress will cut out. The budget is met, from both sides, on any number of gate epochs,
with nothing to tune per task. ``teacher_optimizer`` / ``weight_optimizer`` / ``finetune_optimizer``
replace a weight phase's SGD by a :class:`graphmerge.Optimizer` (AdamW, per-step warmup and
cosine/linear decay, clipping; see graphmerge/optim.py); left None, the phase is bit for bit the SGD
above.

Distillation (``distill="big"`` or ``"teachers"``): fine-tuning minimises
``(1 − distill_weight)·task + distill_weight·distill``, where the distill term pulls the student's
outputs towards a target computed in eval mode without gradient: the gated big student as it is at
the end of the gate phase (deterministic gates), or the mean of the teachers' outputs (their
ensemble; for classifiers the mean of the logits, which is what the big student computes before
the gate phase). For ``loss="cross_entropy"`` the term is Hinton's ``KL(softmax(t/T) ||
softmax(s/T))·T²``, for ``loss="mse"`` the MSE between the two outputs; a custom loss callable
needs ``distill_loss``. The target runs once per training sample, counted per epoch
(``distill_samples``) and in ``summary["distill"]``.

Reproducibility: each phase starts by seeding every RNG from its own seed (teacher i: its seed;
gate phase: ``seed + 2``, gate initialisation ``seed``; fine-tuning: ``seed + 1``; under torchrun
rank r adds ``r * RANK_SEED_STRIDE``, so ranks draw independent gate noise for their samples).
Data order depends only on (seed, epoch), and a checkpoint holds every rank's RNG states, so
``resume=True`` after an interruption gives bitwise the result of an uninterrupted run on CPU.

Speed (``compile=True``, ``precision="bf16"``): every training step of every phase runs through
``torch.compile`` of the module (compiled once per phase; checkpoints hold the plain module's
state) and/or under ``torch.autocast(bfloat16)`` (weights, gradients and optimiser state stay
float32; the certificates (float64) and the evaluations (float32) run outside autocast). Under
compile the gates' uniforms come from inductor's generator, which draws its seeds from torch's, so
a run and its resumption still agree; with ``torch._inductor.config.fallback_random = True`` they
are torch's own, the eager run's draws (tests/test_compile_precision.py checks both).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import graphmerge
from graphmerge import checkpoint as ckpt
from graphmerge import sharding
from graphmerge.data import first_example
from graphmerge.errors import GraphMergeError
from graphmerge.gate_phase import GatePhase, PhaseTrace
from graphmerge.optim import LegacySGD, Optimizer, PhaseOptimizer, check_superseded, phase_optimizer, steps_per_epoch
from graphmerge.passes.gate import NORMALISED_SELECTIONS
from graphmerge.passes.util import check_teacher_count, eval_mode
from graphmerge.pipeline import certify_pipeline
from graphmerge.training import (
    DistContext,
    Distillation,
    LossFn,
    PhaseConfig,
    check_precision,
    cross_entropy,
    distill_term,
    evaluate,
    fit,
    lambda_schedule,
    logits_of,
    resolve_loss,
    setup_distributed,
    sgd,
)

__all__ = ["MergeResult", "MergeSettings", "TrainResult", "merge", "train"]

CHECKPOINT_NAME = "merge.safetensors"
TRAIN_CHECKPOINT_NAME = "train.safetensors"
OPEN_FRACTION_TOLERANCE = 0.1
GATE_BUDGETS = ("projected", "penalty")
DISTILL_TARGETS = ("big", "teachers")
#: The distillation settings: fingerprinted only when ``distill`` is on (see MergeSettings.fingerprint).
DISTILL_SETTINGS = ("distill", "distill_weight", "temperature", "distill_loss")
OPTIMIZER_SETTINGS = ("teacher_optimizer", "weight_optimizer", "finetune_optimizer")
RANK_SEED_STRIDE = 7919  # rank r of a torchrun job draws its random numbers from seed + r * stride
Data = Dataset | DataLoader
LogSink = Callable[[dict[str, Any]], None] | str | Path | None


@dataclass
class MergeResult:
    """The merged student (an instance of the teachers' class) and how it got there.

    ``summary`` holds the validation metric (``metric``: ``val_acc`` or ``val_loss``) of each
    teacher, of the big student before the gate phase, of the student straight after compression
    and after fine-tuning. ``open_fraction`` / ``teacher_share`` are the gate report per group.
    With distillation, ``summary["distill"]`` says what the target was and what it cost: ``samples``
    run through it, ``target_models`` per sample (N for the teachers' ensemble, 1 for the big
    student) and ``model_forwards`` (their product), to add to a FLOP count.
    """

    student: nn.Module
    teachers: list[nn.Module]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    open_fraction: dict[int, float] = field(default_factory=dict)
    teacher_share: dict[int, list[int]] = field(default_factory=dict)

    @property
    def gate_trace(self) -> list[dict[str, Any]]:
        """The validation metrics (eval gates) at ``gate_trace`` evenly spaced points of the gate phase,
        each with its ``progress`` (fraction of the phase); empty without validation data."""
        return [entry for r in self.history if r.get("phase") == "gate" for entry in r.get("trace", [])]


@dataclass
class TrainResult:
    """A model trained from one seed, with its per-epoch history and final validation metrics."""

    model: nn.Module
    history: list[dict[str, Any]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class MergeSettings:
    """Every setting of one ``merge`` run, checked once when built (a bad value raises
    ``GraphMergeError`` naming the setting). Defaults follow the paper's reference code (see the
    module docstring). A checkpoint stores :meth:`fingerprint`, and ``resume=True`` refuses a
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
            _check_int(name, value, minimum)
            object.__setattr__(self, name, int(value))  # numpy ints too
        _check_sgd("weight", self.weight_lr, self.weight_momentum, self.weight_decay)
        _check_sgd("gate", self.gate_lr, self.gate_momentum)
        _check_sgd("finetune", self.finetune_lr, self.finetune_momentum)
        _check_sgd("teacher", self.teacher_lr)
        _check_number("finetune_gamma", self.finetune_gamma, positive=True)
        check_superseded(self)
        if self.gate_budget not in GATE_BUDGETS:
            raise GraphMergeError(f"unknown gate_budget {self.gate_budget!r}: use 'projected' (the budget 1/N "
                                  f"is met by the end of any gate phase) or 'penalty' (the paper's λ·L_half).")
        if self.budget_direction not in ("gradient", "uniform"):
            raise GraphMergeError(f"unknown budget_direction {self.budget_direction!r}: use 'gradient' (gates move "
                                  f"along the budget's gradient; undecided ones close first) or 'uniform'.")
        _check_number("budget_ramp", self.budget_ramp, positive=True)
        if not isinstance(self.decide_gates, bool):
            raise GraphMergeError(f"decide_gates must be True or False, got {self.decide_gates!r}.")
        if self.budget_ramp > 1:
            raise GraphMergeError(f"budget_ramp is the fraction of the gate phase spent reaching the budget; it "
                                  f"must lie in (0, 1], got {self.budget_ramp}.")
        _check_number("lambda_growth", self.lambda_growth)
        _check_number("lambda0", self.lambda0)
        lambda_schedule(self.lambda_schedule, self.lambda0, self.lambda_growth)  # names a bad schedule
        resolve_loss(self.loss)  # names a bad loss
        self._check_distill()
        if self.normalised_groups not in NORMALISED_SELECTIONS:
            raise GraphMergeError(f"unknown normalised_groups {self.normalised_groups!r}: use 'block' (a group a "
                                  "normalisation spans keeps one teacher's whole block; compression is exact) or "
                                  "'mixed' (the top channels of any teachers, as the paper).")
        for name in ("compile", "preflight"):
            if not isinstance(getattr(self, name), bool):
                raise GraphMergeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_precision(self.precision)
        sharding.check_strategy(self.strategy)
        for name in ("finetune_milestones", "teacher_milestones", "teacher_seeds"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _int_tuple(name, value, minimum=None if name == "teacher_seeds" else 0))
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
        _check_number("distill_weight", self.distill_weight)
        if self.distill_weight > 1:
            raise GraphMergeError(f"distill_weight is w in the fine-tuning loss (1 - w)·task + w·distill; it must "
                                  f"lie in [0, 1], got {self.distill_weight}.")
        _check_number("temperature", self.temperature, positive=True)
        if self.distill_loss is not None and not callable(self.distill_loss):
            raise GraphMergeError(f"distill_loss must be a callable (student_output, target_output) -> scalar "
                                  f"tensor, got {type(self.distill_loss).__name__}.")
        if self.temperature != 1 and (self.distill_loss is not None or resolve_loss(self.loss)[0] is not cross_entropy):
            raise GraphMergeError(f"temperature={self.temperature} softens logits in the cross-entropy distillation "
                                  f"term only; here the term is {'distill_loss' if self.distill_loss else 'the MSE'} "
                                  f"between student and target outputs, where it has no effect. Leave temperature "
                                  f"at 1 (--temperature 1).")
        distill_term(self.loss, self.temperature, self.distill_loss)  # a custom loss needs distill_loss

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
        skipped += tuple(n for n in OPTIMIZER_SETTINGS if getattr(self, n) is None)  # None: as before they existed
        return {f.name: _describe(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in skipped}


def _describe(value: Any) -> Any:
    if isinstance(value, Optimizer):
        return value.describe()
    return getattr(value, "__qualname__", type(value).__name__) if callable(value) else value


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise GraphMergeError(f"{name} must be a whole number, got {value!r}.")
    if minimum is not None and value < minimum:
        raise GraphMergeError(f"{name} must be at least {minimum}, got {value}.")


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(value):
        raise GraphMergeError(f"{name} must be a finite number, got {value!r}.")
    if value < 0 or (positive and value == 0):
        raise GraphMergeError(f"{name} must be {'positive' if positive else 'at least 0'}, got {value}.")


def _check_sgd(prefix: str, lr: float, momentum: float | None = None, weight_decay: float | None = None) -> None:
    """SGD settings: lr >= 0, momentum in [0, 1), weight_decay >= 0 (named ``{prefix}_lr`` etc.)."""
    _check_number(f"{prefix}_lr".lstrip("_"), lr)
    if momentum is not None:
        name = f"{prefix}_momentum".lstrip("_")
        _check_number(name, momentum)
        if momentum >= 1:
            raise GraphMergeError(f"{name} must be below 1 (SGD diverges at 1 and above), got {momentum}.")
    if weight_decay is not None:
        _check_number("weight_decay", weight_decay)


def _int_tuple(name: str, values: Any, minimum: int | None) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise GraphMergeError(f"{name} must be a list of whole numbers, got {values!r}.")
    for value in values:
        _check_int(name, value, minimum)
    return tuple(int(v) for v in values)


# --- public entry points -------------------------------------------------------------------

def merge(teachers: Sequence[nn.Module] | Callable[[], nn.Module], train_data: Data,
          settings: MergeSettings | None = None, *, val_data: Data | None = None, **options: Any) -> MergeResult:
    """Merge teachers into one student of the same size (see the module docstring).

    ``teachers``: trained modules of one architecture, or, with ``teacher_epochs``, a factory
    ``() -> nn.Module`` from which ``n_teachers`` teachers are built and trained from
    ``teacher_seeds`` (default ``seed + 1000 + i``), so one call runs the whole strategy. Given
    modules plus ``teacher_epochs`` are trained further from where they are.
    ``settings`` / ``**options``: a :class:`MergeSettings`, and/or its fields as keywords (they
    override ``settings``), e.g. ``merge(teachers, data, gate_epochs=5, loss="mse")``.
    ``log``: a callable receiving one dict per epoch, or a path to append JSON lines to.
    ``checkpoint_dir``: save after every epoch of every phase; ``resume=True`` continues there.
    ``batch_size`` is the global batch: under torchrun each rank takes ``batch_size / world``.
    """
    known = {f.name for f in dataclasses.fields(MergeSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise GraphMergeError(f"merge() got unknown setting(s) {', '.join(unknown)}: the settings are the fields "
                              f"of graphmerge.recipe.MergeSettings ({', '.join(sorted(known))}).")
    settings = dataclasses.replace(settings, **options) if settings is not None else MergeSettings(**options)
    return _MergeRun(teachers, train_data, val_data, settings).execute()


def train(model: nn.Module, train_data: Data, *, epochs: int, val_data: Data | None = None,
          loss: str | LossFn = "cross_entropy", batch_size: int = 32, lr: float = 0.01,
          momentum: float = 0.9, weight_decay: float = 0.0, milestones: Sequence[int] | None = None,
          gamma: float = 0.1, seed: int = 0, checkpoint_dir: str | Path | None = None, resume: bool = False,
          log: LogSink = None, progress: bool = False, device: str = "cpu", compile: bool = False,
          precision: str = "fp32", optimizer: Optimizer | None = None,
          distill_from: Sequence[nn.Module] | None = None, distill_weight: float = 0.5,
          temperature: float = 1.0) -> TrainResult:
    """Train one model (a teacher) in place with the paper's SGD recipe; resumable like ``merge``.
    ``compile`` / ``precision`` as in :class:`MergeSettings`. ``optimizer``: a
    :class:`graphmerge.Optimizer` instead of the SGD of ``lr`` .. ``gamma`` (then left at their defaults).
    ``distill_from``: models whose mean output (their ensemble, eval mode, no gradient) the model is pulled
    towards: the loss is ``(1 - distill_weight)·task + distill_weight·distill`` as in ``merge``'s
    fine-tuning (Hinton's KL at ``temperature`` for cross-entropy, the MSE for ``loss="mse"``)."""
    _check_int("epochs", epochs, minimum=1)
    _check_int("batch_size", batch_size, minimum=1)
    _check_sgd("", lr, momentum, weight_decay)
    _check_number("gamma", gamma, positive=True)
    if milestones is not None:
        milestones = _int_tuple("milestones", milestones, minimum=0)
    ctx = setup_distributed(device)
    logger = _Logger(log, ctx)
    store = _Store(checkpoint_dir, TRAIN_CHECKPOINT_NAME, ctx)
    check_precision(precision)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
                "weight_decay": weight_decay, "milestones": milestones, "gamma": gamma, "seed": seed}
    if optimizer is not None:
        _check_train_optimizer(optimizer, settings)
        settings["optimizer"] = optimizer.describe()
    if precision != "fp32":  # fp32 runs keep the fingerprint of checkpoints from before the setting
        settings["precision"] = precision
    distill = _train_distillation(distill_from, distill_weight, temperature, loss, settings)
    state = store.load(settings) if resume else None
    model.to(ctx.device)
    tools = phase_optimizer(optimizer, LegacySGD(lr, momentum, weight_decay, milestones, gamma), model.parameters(),
                            epochs, lambda: steps_per_epoch(train_data, batch_size, ctx))
    scheduler = tools.schedulers[0]
    history: list[dict[str, Any]] = []
    if state is None:
        _seed_everything(seed)
    else:
        model.load_state_dict(state["model"])
        tools.optimizer.load_state_dict(state["optim"])
        scheduler.load_state_dict(state["sched"])
        history = state["history"]
        ckpt.restore_rng(state["rng"])

    def save(epoch: int, record: dict[str, Any]) -> None:
        history.append(record)
        store.save({"settings": settings, "model": model.state_dict(), "optim": tools.optimizer.state_dict(),
                    "sched": scheduler.state_dict(), "history": history, "rng": ckpt.capture_rng()})
        logger(record)

    phase = PhaseConfig(name="train", epochs=epochs, batch_size=batch_size, seed=seed,
                        optimizers={"weights": tools.optimizer}, progress=progress, compile=compile,
                        precision=precision, distill=distill, **tools.phase_options())
    fit(model, train_data, loss, phase, val_data=val_data, start_epoch=len(history), ctx=ctx,
        on_epoch_end=save)
    metrics = evaluate(model, val_data if val_data is not None else train_data, loss, ctx=ctx)
    return TrainResult(model=model, history=history, metrics=metrics)


def _train_distillation(models: Sequence[nn.Module] | None, weight: float, temperature: float, loss: Any,
                        settings: dict[str, Any]) -> Distillation | None:
    """train()'s distillation term towards ``models``' ensemble (recorded in the checkpoint settings)."""
    if models is None:
        if weight != 0.5 or temperature != 1.0:
            raise GraphMergeError("distill_weight / temperature are set but distill_from is None, so they would have "
                                  "no effect: pass distill_from=[models] to distill from their ensemble.")
        return None
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise GraphMergeError("distill_from must be a non-empty list of modules (the models whose mean output the "
                              "trained model is pulled towards).")
    _check_number("distill_weight", weight)
    if weight > 1:
        raise GraphMergeError(f"distill_weight must lie in [0, 1], got {weight}.")
    _check_number("temperature", temperature, positive=True)
    settings["distill"] = {"models_sha256": _state_digest(models), "weight": weight, "temperature": temperature}
    return Distillation(target=ensemble_target(models), term=distill_term(loss, temperature, None), weight=weight)


def ensemble_target(models: Sequence[nn.Module]) -> Callable[..., torch.Tensor]:
    """The mean of ``models``' outputs (their logits) on a batch, each run in eval mode."""
    models = list(models)

    def target(*inputs: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        outputs = []
        for model in models:
            with eval_mode(model):
                outputs.append(logits_of(model(*inputs, **kwargs)))
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(dim=0)

    return target


def _check_train_optimizer(optimizer: Any, settings: Mapping[str, Any]) -> None:
    """train(optimizer=...) replaces the SGD settings, which must then stay at their defaults."""
    if not isinstance(optimizer, Optimizer):
        raise GraphMergeError(f"optimizer must be a graphmerge.Optimizer or None, got {type(optimizer).__name__}.")
    defaults = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "milestones": None, "gamma": 0.1}
    changed = [name for name, value in defaults.items() if settings[name] != value]
    if changed:
        raise GraphMergeError(f"{changed[0]} is set, but optimizer is given, so it would have no effect: put it into "
                              f"the Optimizer (graphmerge.Optimizer({changed[0]}=...)) or leave {changed[0]} out.")


# --- the merge run -------------------------------------------------------------------------

class _MergeRun:
    """One call of ``merge``: holds the settings, the checkpoint store and the growing state."""

    def __init__(self, teachers: Any, train_data: Data, val_data: Data | None, settings: MergeSettings):
        self.s: MergeSettings = settings
        self.train_data, self.val_data = train_data, val_data
        self.eval_data = val_data if val_data is not None else train_data
        self.ctx: DistContext = setup_distributed(settings.device)
        sharding.check_strategy(settings.strategy, self.ctx.world_size)
        self.logger = _Logger(settings.log, self.ctx)
        self.store = _Store(settings.checkpoint_dir, CHECKPOINT_NAME, self.ctx)
        self.templates, self.factory = self._teacher_templates(teachers)
        self.lambda_at = lambda_schedule(settings.lambda_schedule, settings.lambda0, settings.lambda_growth)
        self.state: dict[str, Any] = {"stage": "teachers", "teacher": 0, "teachers": [], "history": [],
                                      "summary": {}, "report": {}}
        self.resumed: dict[str, Any] | None = None
        if settings.resume:
            self.resumed = self.store.load(self._fingerprint())
            if self.resumed is not None:
                self.state = {k: self.resumed[k] for k in self.state}

    # -- orchestration

    def execute(self) -> MergeResult:
        if self.s.preflight and (self.state["stage"] == "teachers" or self._gate_phase_pending()):
            self._preflight()
        teachers = self._teachers()
        self._record_teacher_metrics(teachers)
        gated = self._gate_phase(teachers) if self._gate_phase_pending() else None
        student = self._finetune(teachers, gated)
        summary = self.state["summary"]
        report = self.state["report"]
        return MergeResult(student=student, teachers=teachers, history=self.state["history"],
                           summary=summary, open_fraction={int(k): v for k, v in report["open"].items()},
                           teacher_share={int(k): v for k, v in report["share"].items()})

    def _preflight(self) -> None:
        """The whole merge at toy scale (``certify_pipeline``) on the teachers as they start, before any
        training: a model that cannot be gated, compressed or reloaded fails in seconds, naming the stage,
        not after the teachers were trained and the first gate epoch spent. The global RNG is left as
        it was, so the run is the same with or without it."""
        inputs, kwargs = self._example()
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            teachers = [self._fresh_teacher(i).eval() for i in range(self._n_teachers())]
            certify_pipeline(teachers, inputs, example_kwargs=kwargs, seed=self.s.seed)
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    def _example(self) -> tuple[tuple, dict[str, torch.Tensor]]:
        """The example inputs capture runs on (positional, keyword), on the run's device."""
        inputs, kwargs = (self.s.example_inputs, {}) if self.s.example_inputs else first_example(self.train_data)
        device = self.ctx.device
        return tuple(x.to(device) for x in inputs), {k: v.to(device) for k, v in kwargs.items()}

    def _gate_phase_pending(self) -> bool:
        """True when the gate phase must run, or its last checkpoint be reloaded to compress it."""
        stage = self.state["stage"]
        return stage == "gate" or (stage == "finetune" and (self.resumed or {}).get("phase") == "gate")

    def _teacher_templates(self, teachers: Any) -> tuple[list[nn.Module], Callable[[], nn.Module] | None]:
        """Modules to copy teachers from, and the factory when teachers are to be built."""
        if callable(teachers) and not isinstance(teachers, nn.Module):
            if self.s.teacher_epochs is None:
                raise GraphMergeError("merge() got a model factory but no teacher_epochs: give trained "
                                      "teacher modules, or teacher_epochs=E to train them from seeds first.")
            return [], teachers
        teachers = list(teachers)
        check_teacher_count(len(teachers), "train more teachers from different seeds (graphmerge train ... "
                                           "--seed S), or pass a factory with teacher_epochs=E.")
        kinds = {type(t) for t in teachers}
        if len(kinds) > 1:
            raise GraphMergeError(f"teachers must share one architecture, got classes "
                                  f"{', '.join(sorted(k.__name__ for k in kinds))}.")
        return teachers, None

    def _n_teachers(self) -> int:
        return len(self.templates) if self.templates else self.s.n_teachers

    def _teacher_seeds(self) -> list[int]:
        seeds = self.s.teacher_seeds
        seeds = list(seeds) if seeds is not None else [self.s.seed + 1000 + i
                                                       for i in range(self._n_teachers())]
        if len(seeds) != self._n_teachers() or len(set(seeds)) != len(seeds):
            raise GraphMergeError(f"teacher_seeds must be {self._n_teachers()} distinct seeds, got {seeds}.")
        return seeds

    def _fresh_teacher(self, index: int) -> nn.Module:
        """Teacher ``index`` before training: a copy of the given module, or built from its seed."""
        if self.factory is None:
            return copy.deepcopy(self.templates[index]).to(self.ctx.device)
        _seed_everything(self._teacher_seeds()[index])
        return self.factory().to(self.ctx.device)

    def _fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must have been written with to be resumed here."""
        settings = self.s.fingerprint()
        settings["teachers_sha256"] = _state_digest(self.templates)
        settings["data_sizes"] = [_size(d) for d in (self.train_data, self.val_data)]
        return settings

    def _sharded(self, model: nn.Module, phase: str,
                 replicated: Sequence[nn.Parameter] = ()) -> tuple[nn.Module, Callable[[], Any]]:
        """The module a phase trains and what ends the phase: ``model`` itself, or under strategy="fsdp" its
        sharded training copy, whose end writes the trained weights back into ``model`` (graphmerge/sharding.py;
        the per-rank parameter memory goes into ``summary["sharding"]``)."""
        if self.s.strategy != "fsdp":
            return model, lambda: model
        sharded = sharding.shard(model, self.ctx, replicated=replicated, example=self._example())
        self.state["summary"].setdefault("sharding", {})[phase] = sharding.memory_report(sharded, self.ctx)
        return sharded.module, sharded.finish

    def _phase_optimizer(self, spec: Optimizer | None, legacy: LegacySGD, params: Any, epochs: int) -> PhaseOptimizer:
        """A weight phase's optimiser and schedulers: ``spec``'s, or the paper's SGD when it is None."""
        return phase_optimizer(spec, legacy, params, epochs,
                               lambda: steps_per_epoch(self.train_data, self.s.batch_size, self.ctx))

    # -- phase 1: teachers

    def _teachers(self) -> list[nn.Module]:
        """The N teachers: trained here when teacher_epochs is set (resuming mid-way if needed)."""
        if self.s.teacher_epochs is None:
            if self.state["stage"] == "teachers":
                self.state["stage"] = "gate"
            return [copy.deepcopy(t).to(self.ctx.device).eval() for t in self.templates]
        done = [self._fresh_teacher(i) for i in range(len(self.state["teachers"]))]
        for teacher, weights in zip(done, self.state["teachers"], strict=True):
            teacher.load_state_dict(weights)
        while self.state["stage"] == "teachers":
            done.append(self._train_teacher(self.state["teacher"]))
        return [t.eval() for t in done]

    def _train_teacher(self, index: int) -> nn.Module:
        teacher = self._fresh_teacher(index)
        epochs = self.s.teacher_epochs
        legacy = LegacySGD(self.s.teacher_lr, self.s.weight_momentum, self.s.weight_decay, self.s.teacher_milestones)
        tools = self._phase_optimizer(self.s.teacher_optimizer, legacy, teacher.parameters(), epochs)
        optimizers, schedulers = {"weights": tools.optimizer}, tools.schedulers
        start = self._restore_phase(teacher, optimizers, schedulers, f"teacher{index}",
                                    fresh_seed=self._teacher_seeds()[index])
        phase = PhaseConfig(name=f"teacher{index}", epochs=epochs, batch_size=self.s.batch_size,
                            seed=self._teacher_seeds()[index], optimizers=optimizers, progress=self.s.progress,
                            compile=self.s.compile, precision=self.s.precision, **tools.phase_options())

        def end_of_epoch(epoch: int, record: dict[str, Any]) -> None:
            if epoch + 1 == epochs:
                self.state["teachers"].append(teacher.state_dict())
                last = index + 1 == self._n_teachers()
                self.state.update(stage="gate" if last else "teachers", teacher=index + 1)
            self._save(epoch, record, teacher, optimizers, schedulers)

        fit(teacher, self.train_data, self.s.loss, phase, val_data=self.val_data, start_epoch=start,
            ctx=self.ctx, on_epoch_end=end_of_epoch)
        return teacher

    def _record_teacher_metrics(self, teachers: list[nn.Module]) -> None:
        summary = self.state["summary"]
        if "teachers" in summary:
            return
        metrics = [evaluate(t, self.eval_data, self.s.loss, ctx=self.ctx) for t in teachers]
        summary["metric"] = _metric_name(metrics[0], self.val_data is not None)
        summary["teachers"] = [_metric_value(m) for m in metrics]

    # -- phase 2: gates

    def _build_gated(self, teachers: list[nn.Module]) -> tuple[nn.Module, nn.Module]:
        """widen + add_gates (deterministic given the teachers, except the gates' init noise)."""
        inputs, kwargs = self._example()
        big = graphmerge.widen([t.eval() for t in teachers], inputs, example_kwargs=kwargs)
        big.meta["graphmerge"].normalised_selection = self.s.normalised_groups
        _seed_everything(self.s.seed)
        gated = graphmerge.add_gates(big, **(self.s.gate_options or {}))
        return big.to(self.ctx.device), gated.to(self.ctx.device)

    def _gate_phase(self, teachers: list[nn.Module]) -> nn.Module:
        big, gated = self._build_gated(teachers)
        summary = self.state["summary"]
        if "big" not in summary:
            summary["big"] = _metric_value(evaluate(big, self.eval_data, self.s.loss, ctx=self.ctx))
        del big
        trained, finish = self._sharded(gated, "gate", replicated=list(gated.gate_parameters()))
        epochs = self.s.gate_epochs
        legacy = LegacySGD(self.s.weight_lr, self.s.weight_momentum, self.s.weight_decay, scheduled=False)
        tools = self._phase_optimizer(self.s.weight_optimizer, legacy, trained.weight_parameters(), epochs)
        optimizers = {"weights": tools.optimizer,
                      "gates": sgd(gated.gate_parameters(), self.s.gate_lr, self.s.gate_momentum)}
        schedulers = tools.schedulers
        start = self._restore_phase(trained, optimizers, schedulers, "gate", fresh_seed=self.s.seed + 2)

        projected = self.s.gate_budget == "projected"
        schedule = GatePhase(gated, max(1, epochs), budget=self.s.gate_budget, ramp=self.s.budget_ramp,
                             direction=self.s.budget_direction, decide=self.s.decide_gates, epochs=max(1, epochs),
                             lambda_at=self.lambda_at)

        trace = PhaseTrace(self.s.gate_trace if self.val_data is not None else 0,
                           lambda: {f"val_{k}": v for k, v in evaluate(trained, self.val_data, self.s.loss,
                                                                       ctx=self.ctx).items()})
        trace.resume_at(start / epochs if epochs else 1.0)

        def after_step(progress: float) -> None:
            if projected:
                schedule.advance_to(progress)
            trace(progress)

        def fields(epoch: int) -> dict[str, Any]:
            return schedule.fields((epoch + 1) / epochs) if projected else {"lambda": self.lambda_at(epoch)}

        def end_of_epoch(epoch: int, record: dict[str, Any]) -> None:
            record.update(_gate_fields(gated))
            record["trace"] = trace.take()
            if epoch + 1 == epochs:
                self._finish_gate_phase(gated)
            self._save(epoch, record, trained, optimizers, schedulers)

        phase = PhaseConfig(name="gate", epochs=epochs, batch_size=self.s.batch_size, seed=self.s.seed,
                            optimizers=optimizers, progress=self.s.progress, epoch_fields=fields,
                            after_step=after_step,
                            aux_loss=None if projected else schedule.penalty,
                            compile=self.s.compile, precision=self.s.precision, **tools.phase_options())
        fit(trained, self.train_data, self.s.loss, phase, val_data=self.val_data, start_epoch=start,
            ctx=self.ctx, on_epoch_end=end_of_epoch)
        finish()
        if epochs == 0 or start >= epochs:
            self._finish_gate_phase(gated)
        return gated

    def _finish_gate_phase(self, gated: nn.Module) -> None:
        """Gate report, warning on badly converged groups, and the move to fine-tuning."""
        with torch.no_grad():
            report = {"open": {str(k): float(v) for k, v in gated.open_fraction().items()},
                      "share": {str(k): [int(c) for c in v] for k, v in gated.teacher_share().items()}}
        self.state["report"] = report
        self.state["stage"] = "finetune"
        target = 1.0 / gated.n_teachers
        far = {k: v for k, v in report["open"].items() if abs(v - target) > OPEN_FRACTION_TOLERANCE}
        if far and self.ctx.is_main:
            listed = ", ".join(f"group {k}: {v:.2f}" for k, v in list(far.items())[:5])
            warnings.warn(f"after the gate phase {len(far)} group(s) are far from {target:.2f} open "
                          f"({listed}); compression will cut channels the student still uses. Use the "
                          f"default gate_budget='projected' (--gate-budget projected), which meets the budget on "
                          f"any number of gate epochs, or increase lambda0 or gate_epochs.", stacklevel=2)

    # -- phase 3: compress and fine-tune

    def _finetune(self, teachers: list[nn.Module], gated: nn.Module | None) -> nn.Module:
        summary = self.state["summary"]
        if gated is not None:
            student = graphmerge.compress(gated.eval(), "gates").to(self.ctx.device)
        else:  # resumed inside fine-tuning: the student has the teachers' class (compress's contract)
            student = copy.deepcopy(teachers[0])
        if "before_finetune" not in summary:
            summary["before_finetune"] = _metric_value(evaluate(student, self.eval_data, self.s.loss,
                                                                ctx=self.ctx))
        epochs = self.s.finetune_epochs
        distill, kept = self._distillation(teachers, gated) if epochs else (None, {})
        trained, finish = self._sharded(student, "finetune")
        legacy = LegacySGD(self.s.finetune_lr, self.s.finetune_momentum, self.s.weight_decay,
                           self.s.finetune_milestones, self.s.finetune_gamma)
        tools = self._phase_optimizer(self.s.finetune_optimizer, legacy, trained.parameters(), epochs)
        optimizers, schedulers = {"weights": tools.optimizer}, tools.schedulers
        start = self._restore_phase(trained, optimizers, schedulers, "finetune", fresh_seed=self.s.seed + 1)

        def end_of_epoch(epoch: int, record: dict[str, Any]) -> None:
            if epoch + 1 == epochs:
                self.state["stage"] = "done"
            self._save(epoch, record, trained, optimizers, schedulers, extra=kept)

        phase = PhaseConfig(name="finetune", epochs=epochs, batch_size=self.s.batch_size,
                            seed=self.s.seed + 1, optimizers=optimizers, distill=distill, progress=self.s.progress,
                            compile=self.s.compile, precision=self.s.precision, **tools.phase_options())
        fit(trained, self.train_data, self.s.loss, phase, val_data=self.val_data, start_epoch=start,
            ctx=self.ctx, on_epoch_end=end_of_epoch)
        finish()
        final = evaluate(student, self.eval_data, self.s.loss, ctx=self.ctx)
        summary["after_finetune"] = _metric_value(final)
        if self.s.distill is not None:
            samples = sum(r.get("distill_samples", 0) for r in self.state["history"] if r["phase"] == "finetune")
            models = len(teachers) if self.s.distill == "teachers" else 1
            summary["distill"] = {"target": self.s.distill, "weight": self.s.distill_weight,
                                  "temperature": self.s.temperature, "samples": samples,
                                  "target_models": models, "model_forwards": samples * models}
        return student.eval()

    def _distillation(self, teachers: list[nn.Module],
                      gated: nn.Module | None) -> tuple[Distillation | None, dict[str, Any]]:
        """The fine-tuning target, and what each fine-tuning checkpoint must keep to rebuild it.

        "big" is the gated big student at the end of the gate phase: at hand after the gate phase
        (or its reload), else (resumed inside fine-tuning) rebuilt by widen + add_gates and loaded
        from the state every fine-tuning checkpoint keeps. Called before the RNG state is restored,
        so the rebuild's seeding changes nothing.
        """
        if self.s.distill is None:
            return None, {}
        kept: dict[str, Any] = {}
        if self.s.distill == "teachers":
            models = list(teachers)
        else:
            if gated is None:
                saved = (self.resumed or {}).get("distill_target")
                if saved is None:
                    raise GraphMergeError("the checkpoint to resume holds no distillation target (the gated big "
                                          "student); restart the run in a new checkpoint folder.")
                _, gated = self._build_gated(teachers)
                gated.load_state_dict(saved)
            else:  # a copy: compress's student may share tensors with it (a shared output bias), and trains
                gated = copy.deepcopy(gated)
            models = [gated]
            kept = {"distill_target": gated.state_dict()}

        term = distill_term(self.s.loss, self.s.temperature, self.s.distill_loss)
        return Distillation(target=ensemble_target(models), term=term, weight=self.s.distill_weight), kept

    # -- checkpoints

    def _restore_phase(self, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                       schedulers: Sequence[Any], phase: str, fresh_seed: int | None) -> int:
        """Load the checkpointed model/optimiser/RNG state if it belongs to ``phase``; -> start epoch.

        Without such a checkpoint the phase starts at epoch 0 with every RNG seeded from
        ``fresh_seed`` (None: leave the RNGs as they are).

        The RNG state is restored last, after every model was built, so that the run continues
        with exactly the random stream the interrupted run would have used.
        """
        saved = self.resumed
        if saved is None or saved.get("phase") != phase:
            if fresh_seed is not None:
                _seed_everything(fresh_seed + RANK_SEED_STRIDE * self.ctx.rank)
            return 0
        sharding.restore_entries(model, optimizers, saved, self.s.checkpoint_dir)
        for scheduler, scheduler_state in zip(schedulers, saved["sched"], strict=True):
            scheduler.load_state_dict(scheduler_state)
        ckpt.restore_rng(saved["rng"][self.ctx.rank])
        return saved["epoch"]

    def _save(self, epoch: int, record: dict[str, Any], model: nn.Module,
              optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Sequence[Any],
              extra: Mapping[str, Any] | None = None) -> None:
        """Checkpoint after a finished epoch (main rank writes, all ranks wait), then log it.
        ``extra``: more top-level entries of the checkpoint (fine-tuning's distillation target)."""
        self.state["history"].append(record)
        tag = f"{record['phase']}-{epoch + 1}"
        weights = sharding.checkpoint_entries(model, optimizers, self.s.checkpoint_dir, tag)
        self.store.save({**self.state, **(extra or {}), "settings": self._fingerprint(), "phase": record["phase"],
                         "epoch": epoch + 1, **weights,
                         "sched": [s.state_dict() for s in schedulers], "rng": self._rng_of_all_ranks()})
        sharding.prune_sharded(self.s.checkpoint_dir, weights, self.ctx)
        self.logger(record)

    def _rng_of_all_ranks(self) -> list[dict[str, Any]]:
        """Every rank's RNG state (they differ: each rank draws its own gate noise)."""
        state = ckpt.capture_rng()
        if not self.ctx.distributed:
            return [state]
        states: list[Any] = [None] * self.ctx.world_size
        torch.distributed.all_gather_object(states, state)
        return states


def _gate_fields(gated: nn.Module) -> dict[str, Any]:
    """Per-epoch gate metrics: L_half summed over groups, and the mean open fraction."""
    with torch.no_grad():
        l_half = float(gated.gate_loss())
        fractions = list(gated.open_fraction().values())
    return {"l_half": l_half, "open_fraction": float(np.mean(fractions)) if fractions else float("nan")}


def _metric_name(metrics: Mapping[str, float], has_val: bool) -> str:
    prefix = "val" if has_val else "train"
    return f"{prefix}_acc" if "acc" in metrics else f"{prefix}_loss"


def _metric_value(metrics: Mapping[str, float]) -> float:
    return metrics["acc"] if "acc" in metrics else metrics["loss"]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --- checkpoint store and logging ----------------------------------------------------------

def _state_digest(modules: Sequence[nn.Module]) -> str | None:
    """SHA-256 over every tensor of the given teachers: resuming with other teachers is refused."""
    if not modules:
        return None
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _size(data: Any) -> int | None:
    """Samples in a data set (or batches in a loader); None when it has no length."""
    try:
        return len(data.dataset) if hasattr(data, "dataset") else len(data)
    except TypeError:
        return None


class _Store:
    """The one checkpoint file of a run; only the main rank writes, every rank waits for it."""

    def __init__(self, folder: str | Path | None, name: str, ctx: DistContext):
        self.path = Path(folder) / name if folder is not None else None
        self.ctx = ctx
        if self.path is not None and ctx.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self.ctx.is_main:
            ckpt.save_state(self.path, state)
        self.ctx.barrier()

    def load(self, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """The saved state, or None (with a warning) when there is nothing to resume."""
        if self.path is None:
            raise GraphMergeError("resume=True needs checkpoint_dir (the folder of the run to resume).")
        if not self.path.is_file():
            warnings.warn(f"nothing to resume in {self.path.parent}: starting from scratch.", stacklevel=3)
            return None
        state = ckpt.load_state(self.path)
        saved = json.loads(json.dumps(state["settings"], default=str))
        wanted = json.loads(json.dumps(dict(settings), default=str))
        for key in sorted(set(saved) | set(wanted)):
            if saved.get(key) != wanted.get(key):
                raise GraphMergeError(
                    f"the checkpoint in {self.path.parent} was written with {key}={saved.get(key)!r}, but "
                    f"this run has {key}={wanted.get(key)!r}. Resume with the original settings, or use a "
                    f"new checkpoint folder.")
        return state


class _Logger:
    """Sends each epoch record to a callable and/or appends it as a JSON line (main rank only)."""

    def __init__(self, sink: LogSink, ctx: DistContext):
        self.sink = sink
        self.ctx = ctx

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main or self.sink is None:
            return
        if callable(self.sink):
            self.sink(dict(record))
            return
        with open(self.sink, "a") as handle:
            handle.write(json.dumps(record) + "\n")
