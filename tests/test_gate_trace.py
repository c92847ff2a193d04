"""The gate phase's validation trace: where it is measured, that it changes nothing, what it reads."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from graphmerge.errors import GraphMergeError
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN
from graphmerge.gate_phase import PhaseTrace
from graphmerge.recipe import merge, train
from graphmerge.training import evaluate


def _data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    return TensorDataset(torch.randn(n, 1, 40, generator=generator) + labels.view(-1, 1, 1) / 3, labels)


@pytest.fixture(scope="module")
def teachers():
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = MNIST1DCNN(channels=8, head_channels=8)
        train(model, _data(192, 0), epochs=2, batch_size=32, seed=seed)
        models.append(model.eval())
    return models


def test_phase_trace_measures_once_per_point_passed():
    calls = []
    trace = PhaseTrace(4, lambda: {"n": len(calls.append(0) or calls)})
    for progress in (0.1, 0.3, 0.3, 0.8, 1.0):  # passes 0.25, then 0.5 and 0.75 at once, then 1.0
        trace(progress)
    assert [e["progress"] for e in trace.take()] == [0.25, 0.5, 0.75, 1.0]
    assert len(calls) == 4 and trace.take() == []
    resumed = PhaseTrace(4, lambda: {})
    resumed.resume_at(0.5)
    resumed(1.0)
    assert [e["progress"] for e in resumed.take()] == [0.75, 1.0]
    with pytest.raises(GraphMergeError, match="whole number of points"):
        PhaseTrace(-1, dict)


def test_trace_changes_nothing_and_ends_at_the_compressed_student(teachers):
    train_data, val_data = _data(160, 1), _data(64, 2)
    runs = {points: merge([m for m in teachers], train_data, val_data=val_data, gate_epochs=2, finetune_epochs=0,
                          batch_size=32, gate_trace=points, preflight=False)
            for points in (0, 4)}
    untraced, traced = runs[0], runs[4]
    for name, tensor in untraced.student.state_dict().items():  # the measurements draw nothing
        assert torch.equal(tensor, traced.student.state_dict()[name]), name
    assert untraced.gate_trace == []
    trace = traced.gate_trace
    assert [e["progress"] for e in trace] == [0.25, 0.5, 0.75, 1.0]
    assert [len(r["trace"]) for r in traced.history if r["phase"] == "gate"] == [2, 2]
    # at the end the gates are decided (kept channels' eval gate 1, the rest 0), so the gated big student
    # computes what compress cut out of it (I3): the last point is the student's validation loss
    student = evaluate(traced.student, val_data, "cross_entropy")
    assert trace[-1]["val_loss"] == pytest.approx(student["loss"], rel=1e-5)
    assert trace[-1]["val_acc"] == pytest.approx(student["acc"])

