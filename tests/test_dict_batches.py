"""Dict batches and keyword inputs: Hugging Face models through graphmerge.train and graphmerge.merge.

A dataset of dicts (``input_ids``, ``attention_mask``, ``labels``) trains and merges two tiny
Hugging Face causal LMs through the Python API: the inputs go to the model as keywords, the labels
are the target of ``loss="causal_lm"`` (position t predicts token t + 1, -100 ignored; checked here
against the shifted cross-entropy written out, and against the model's own loss from labels).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import graphmerge
from graphmerge.recipe import train
from graphmerge.training import causal_lm

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)


class Tokens(Dataset):
    """Sequences of a repeating pattern plus noise: something a tiny LM can learn in a few steps."""

    def __init__(self, n: int = 48, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        base = torch.arange(length).repeat(n, 1) * 7 % 90 + 3
        noise = torch.randint(0, 2, (n, length), generator=generator)
        self.ids = (base + noise).clamp(3, 99)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_causal_lm_loss_is_the_models_own_from_labels() -> None:
    from tests.hf_tiny import tiny_model

    model = tiny_model("GPT2LMHeadModel", 0)
    ids = Tokens().ids[:3]
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        output = model(input_ids=ids, labels=labels)
        logits = output.logits
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                  ignore_index=-100)
    assert float(causal_lm(logits, labels)) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(causal_lm(logits, labels)) == pytest.approx(float(output.loss), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_hugging_face_teachers_merge_from_dict_batches(arch: str) -> None:
    from tests.hf_tiny import tiny_model

    data = Tokens()
    teachers = [train(tiny_model(arch, seed), data, epochs=1, loss="causal_lm", lr=0.05, batch_size=8,
                      seed=seed).model.eval() for seed in (1, 2)]
    result = graphmerge.merge(teachers, data, loss="causal_lm", gate_epochs=1, finetune_epochs=1, batch_size=8,
                              weight_lr=0.02, finetune_lr=0.02, seed=0)
    student = result.student
    assert type(student) is type(teachers[0])
    assert all(abs(v - 0.5) < 1e-6 for v in result.open_fraction.values())
    fresh = tiny_model(arch, 5)
    fresh.load_state_dict(student.state_dict(), strict=True)
    batch = Tokens()[0]
    with torch.no_grad():
        logits = fresh(input_ids=batch["input_ids"][None], attention_mask=batch["attention_mask"][None]).logits
    assert torch.isfinite(logits).all()
    assert set(result.summary) >= {"teachers", "big", "before_finetune"}


def test_train_refuses_dict_items_that_are_python_lists():
    """A datasets.Dataset without .with_format('torch') yields lists; the collated batch is then lists of
    per-position tensors, which graphmerge.train refuses in one paragraph instead of crashing inside torch."""
    from graphmerge.errors import GraphMergeError
    from graphmerge.recipe import train

    class Lists(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": [1, 2, 3], "labels": [2, 3, 4]}

    with pytest.raises(GraphMergeError, match=r"with_format\('torch'\)"):
        train(torch.nn.Linear(3, 3), Lists(), epochs=1, batch_size=2)
