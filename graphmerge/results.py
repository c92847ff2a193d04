"""What ``merge`` and ``train`` return: the trained model(s), the per-epoch history and the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


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
