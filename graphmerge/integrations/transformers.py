"""The gate phase inside ``transformers.Trainer``: a callback that drives a :class:`graphmerge.GatePhase`.

    gated = graphmerge.add_gates(graphmerge.widen(teachers, (ids,), example_kwargs={"attention_mask": mask}))
    phase = graphmerge.GatePhase(gated, total_steps=trainer_steps)
    args = TrainingArguments(..., max_steps=trainer_steps, label_names=["labels"])
    trainer = Trainer(model=gated, args=args, train_dataset=data, compute_loss_func=lm_loss,
                      callbacks=[GatePhaseCallback(phase)])
    trainer.train()
    student = graphmerge.compress(gated.eval(), "gates")

After every optimizer step the callback moves the gates to the schedule (budget projection, then
the decision), as the recipe does. The projected budget (the default) adds nothing to the loss;
the penalty budget needs ``phase.penalty()`` added in your ``compute_loss_func``. The gated big
student returns what the captured graph returns (no loss of its own): give ``compute_loss_func``
and ``label_names=["labels"]`` (its forward takes the captured inputs by name, so Trainer keeps
those columns and, with ``label_names``, the labels for the loss).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from graphmerge.gate_phase import GatePhase


class GatePhaseCallback(TrainerCallback):
    """Calls ``phase.step()`` after each optimizer step of a ``transformers.Trainer``."""

    def __init__(self, phase: GatePhase):
        self.phase = phase

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.phase.step()
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.phase.progress < 1.0:  # fewer steps than total_steps: finish the schedule, decided
            self.phase.advance_to(1.0)
        return control
