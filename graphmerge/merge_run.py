"""The merge driver: one ``merge`` call from teachers to fine-tuned student, resumable at every epoch.

``MergeRun`` trains the teachers (when asked), widens them and runs the gate phase (``GatePhase``
after every step), compresses, and fine-tunes (optionally distilling from the gated big student or
the teachers' ensemble), checkpointing after every epoch of every phase and resuming from that
checkpoint with the same random stream. ``graphmerge.recipe.merge`` checks the settings and runs it.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import graphmerge
from graphmerge import checkpoint as ckpt
from graphmerge import sharding
from graphmerge.alternatives import magnitude_scores
from graphmerge.data import first_example
from graphmerge.errors import GraphMergeError
from graphmerge.gate_phase import GatePhase, PhaseTrace
from graphmerge.merge_settings import MergeSettings
from graphmerge.optim import LegacySGD, Optimizer, PhaseOptimizer, phase_optimizer, steps_per_epoch
from graphmerge.passes.ir import widen_info
from graphmerge.passes.rebalance import average_kept_teachers
from graphmerge.passes.util import check_teacher_count, eval_mode
from graphmerge.pipeline import certify_pipeline
from graphmerge.results import MergeResult
from graphmerge.run_store import CHECKPOINT_NAME, CheckpointStore, EpochLog, data_size, seed_everything, state_digest
from graphmerge.training import (
    DistContext,
    Distillation,
    PhaseConfig,
    distill_term,
    evaluate,
    fit,
    lambda_schedule,
    logits_of,
    setup_distributed,
    sgd,
)

OPEN_FRACTION_TOLERANCE = 0.1
RANK_SEED_STRIDE = 7919  # rank r of a torchrun job draws its random numbers from seed + r * stride
Data = Dataset | DataLoader


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


class MergeRun:
    """One call of ``merge``: holds the settings, the checkpoint store and the growing state."""

    def __init__(self, teachers: Any, train_data: Data, val_data: Data | None, settings: MergeSettings):
        self.s: MergeSettings = settings
        self.train_data, self.val_data = train_data, val_data
        self.eval_data = val_data if val_data is not None else train_data
        self.ctx: DistContext = setup_distributed(settings.device)
        sharding.check_strategy(settings.strategy, self.ctx.world_size)
        self.logger = EpochLog(settings.log, self.ctx)
        self.store = CheckpointStore(settings.checkpoint_dir, CHECKPOINT_NAME, self.ctx)
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
        seed_everything(self._teacher_seeds()[index])
        return self.factory().to(self.ctx.device)

    def _fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must have been written with to be resumed here."""
        settings = self.s.fingerprint()
        settings["teachers_sha256"] = state_digest(self.templates)
        settings["data_sizes"] = [data_size(d) for d in (self.train_data, self.val_data)]
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
        widen_info(big)[1].normalised_selection = self.s.normalised_groups
        widen_info(big)[1].dead_channels = self.s.dead_channels
        seed_everything(self.s.seed)
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
        if self.s.gate_epochs == 0 and self.s.selection == "gates" and self.ctx.is_main:
            warnings.warn("gate_epochs=0 with selection='gates': the gates are untrained, so compress keeps "
                          "channels by their initial values (at random) and folds their eval value (0.78) into "
                          "the kept ones. Pass selection='magnitude' (--selection magnitude) to keep the channels "
                          "the next layers weigh most, or train the gates.", stacklevel=2)
        elif far and self.ctx.is_main and self.s.selection == "gates":  # other selections do not read the gates
            listed = ", ".join(f"group {k}: {v:.2f}" for k, v in list(far.items())[:5])
            warnings.warn(f"after the gate phase {len(far)} group(s) are far from {target:.2f} open "
                          f"({listed}); compression will cut channels the student still uses. Use the "
                          f"default gate_budget='projected' (--gate-budget projected), which meets the budget on "
                          f"any number of gate epochs, or increase lambda0 or gate_epochs.", stacklevel=2)

    # -- phase 3: compress and fine-tune

    def _finetune(self, teachers: list[nn.Module], gated: nn.Module | None) -> nn.Module:
        summary = self.state["summary"]
        if gated is not None:
            keep = "gates" if self.s.selection == "gates" else magnitude_scores(gated)
            student = graphmerge.compress(gated.eval(), keep).to(self.ctx.device)
            if self.s.averages_kept:
                summary["averaged_layers"] = average_kept_teachers(student, gated, teachers, keep)
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
                seed_everything(fresh_seed + RANK_SEED_STRIDE * self.ctx.rank)
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

