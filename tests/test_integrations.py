"""The gate phase inside transformers.Trainer (graphmerge.integrations.transformers.GatePhaseCallback).

Two tiny Llama teachers (grouped-query attention); Trainer runs the gate phase on the gated big
student with its own optimizer and loop; the callback drives graphmerge.GatePhase. At the end every
group is exactly half open (P[g>0] from the log-alphas, the hard-concrete formula written out), the
student compresses with the I3 certificate checked and is the teachers' class.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

import graphmerge
from graphmerge.api import student_certificate

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

torch.set_num_threads(1)


class Tokens(Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(3, 100, (32, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.ids[i]}


def next_token_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs["logits"]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@pytest.mark.slow
def test_trainer_runs_the_gate_phase(tmp_path) -> None:
    from graphmerge.integrations.transformers import GatePhaseCallback
    from tests.hf_tiny import tiny_model

    teachers = [tiny_model("LlamaForCausalLM", seed) for seed in (1, 2)]
    ids = Tokens().ids[:2]
    big = graphmerge.widen(teachers, (ids,), example_kwargs={"attention_mask": torch.ones(2, 8, dtype=torch.long)})
    gated = graphmerge.add_gates(big, seed=0)
    steps = 6
    phase = graphmerge.GatePhase(gated, total_steps=steps)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                          report_to=[], use_cpu=True, save_strategy="no", label_names=["labels"],
                                          learning_rate=1e-3, disable_tqdm=True)
    trainer = transformers.Trainer(model=gated, args=args, train_dataset=Tokens(), compute_loss_func=next_token_loss,
                                   callbacks=[GatePhaseCallback(phase)])
    trainer.train()
    assert phase.done and phase.steps_done == steps
    shift = (2 / 3) * math.log(0.1 / 1.1)
    for gid in gated.gates.group_ids:
        open_ = float(torch.sigmoid(gated.gates.log_alpha[f"g{gid}"].detach().double() - shift).mean())
        assert open_ == pytest.approx(0.5, abs=1e-3), gid
    student = graphmerge.compress(gated.eval(), "gates")
    certificate = student_certificate(student)
    assert certificate.skipped is None and certificate.relative_error <= certificate.tolerance, certificate
    assert type(student) is type(teachers[0])
