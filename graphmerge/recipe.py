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

This module is the recipe's public home: ``merge`` checks its options into a ``MergeSettings``
(graphmerge/merge_settings.py) and runs ``graphmerge.merge_run.MergeRun``; ``train`` trains one
model with the same training loop, checkpoint store and epoch log (graphmerge/run_store.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from graphmerge import checkpoint as ckpt
from graphmerge.errors import GraphMergeError
from graphmerge.merge_run import Data, MergeRun, ensemble_target
from graphmerge.merge_settings import MergeSettings, check_int, check_number, check_sgd, int_tuple
from graphmerge.optim import LegacySGD, Optimizer, phase_optimizer, steps_per_epoch
from graphmerge.results import MergeResult, TrainResult
from graphmerge.run_store import (
    CHECKPOINT_NAME,
    TRAIN_CHECKPOINT_NAME,
    CheckpointStore,
    EpochLog,
    LogSink,
    seed_everything,
    state_digest,
)
from graphmerge.training import (
    Distillation,
    LossFn,
    PhaseConfig,
    check_precision,
    distill_term,
    evaluate,
    fit,
    setup_distributed,
)

__all__ = ["CHECKPOINT_NAME", "MergeResult", "MergeSettings", "TrainResult", "merge", "train"]


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
    return MergeRun(teachers, train_data, val_data, settings).execute()


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
    check_int("epochs", epochs, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_sgd("", lr, momentum, weight_decay)
    check_number("gamma", gamma, positive=True)
    if milestones is not None:
        milestones = int_tuple("milestones", milestones, minimum=0)
    ctx = setup_distributed(device)
    logger = EpochLog(log, ctx)
    store = CheckpointStore(checkpoint_dir, TRAIN_CHECKPOINT_NAME, ctx)
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
        seed_everything(seed)
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
    check_number("distill_weight", weight)
    if weight > 1:
        raise GraphMergeError(f"distill_weight must lie in [0, 1], got {weight}.")
    check_number("temperature", temperature, positive=True)
    settings["distill"] = {"models_sha256": state_digest(models), "weight": weight, "temperature": temperature}
    return Distillation(target=ensemble_target(models), term=distill_term(loss, temperature, None), weight=weight)


def _check_train_optimizer(optimizer: Any, settings: Mapping[str, Any]) -> None:
    """train(optimizer=...) replaces the SGD settings, which must then stay at their defaults."""
    if not isinstance(optimizer, Optimizer):
        raise GraphMergeError(f"optimizer must be a graphmerge.Optimizer or None, got {type(optimizer).__name__}.")
    defaults = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "milestones": None, "gamma": 0.1}
    changed = [name for name, value in defaults.items() if settings[name] != value]
    if changed:
        raise GraphMergeError(f"{changed[0]} is set, but optimizer is given, so it would have no effect: put it into "
                              f"the Optimizer (graphmerge.Optimizer({changed[0]}=...)) or leave {changed[0]} out.")
