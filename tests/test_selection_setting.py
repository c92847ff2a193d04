"""``merge(selection="magnitude")``: compress keeps the channels the next layers weigh most, so a
merge needs no gate phase. Checked against the selection computed here from the teachers' weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import graphmerge
from graphmerge.examples.mlp import SineMLP


def _data(n: int = 64) -> TensorDataset:
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, torch.sin(10 * x))


def _teachers() -> list[SineMLP]:
    teachers = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        teachers.append(SineMLP(6).eval())
    return teachers


def test_magnitude_selection_keeps_the_units_the_output_weighs_most() -> None:
    teachers = _teachers()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "far from 1/N open" warning: the gates are not read
        result = graphmerge.merge([t for t in teachers], _data(), loss="mse", selection="magnitude",
                                  gate_epochs=0, finetune_epochs=0, preflight=False)
    # hidden unit c of teacher t is read by the head only: its score is |fc2.weight_t[0, c]|
    scores = torch.cat([t.fc2.weight[0].abs() for t in teachers]).detach()
    kept = sorted(torch.topk(scores, 6).indices.tolist())  # compress keeps big channels in ascending order
    rows = torch.cat([t.fc1.weight for t in teachers]).detach()[kept]
    torch.testing.assert_close(result.student.fc1.weight, rows)
    torch.testing.assert_close(result.student.fc1.bias, torch.cat([t.fc1.bias for t in teachers]).detach()[kept])


def test_an_unknown_selection_is_refused() -> None:
    with pytest.raises(graphmerge.GraphMergeError, match="'magnitude'"):
        graphmerge.merge(_teachers(), _data(), loss="mse", selection="largest")


def test_the_cli_takes_selection(run_cli, sine_merge_args) -> None:
    result = run_cli("merge", "examples:mlp", *sine_merge_args, "--selection", "magnitude", "--gate-epochs", "0")
    assert result.returncode == 0, result.stderr
    assert "far from" not in result.stderr  # the gates are not read, so their budget is not warned about


def test_untrained_gates_are_warned_about() -> None:
    with pytest.warns(UserWarning, match="selection='magnitude'"):
        graphmerge.merge(_teachers(), _data(), loss="mse", gate_epochs=0, finetune_epochs=0, preflight=False)
