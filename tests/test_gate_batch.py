"""Gates follow the batch: each sample's gate realisation multiplies that sample's positions only.

Each model here puts the batch somewhere other than dim 0 alone at a gate site: moved
(``(L, N, E)`` attention), folded batch-major (a window partition, ``B*windows``), folded
sequence-major (``L*B``), and read through a layer whose first operand is a parameter (GPT-2's
Conv1D, ``addmm(bias, x, W)``). The expected outputs are written out here from the big
student's tensors with the gate values applied by hand, where the batch is plain (before the
model moves or folds it): gating commutes with moving data around, so that is the truth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from graphmerge.passes.batch import BatchPlace, locate_batch
from graphmerge.passes.gate import GATES
from torch import nn

import graphmerge
from graphmerge.pipeline import certify_pipeline, gates_follow_samples

torch.set_num_threads(1)

IN, HIDDEN, OUT = 8, 6, 3


class Moved(nn.Module):
    """(B, L, C) -> (L, B, C) before the second layer, as nn.MultiheadAttention runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).transpose(0, 1)).mean(0)


class WindowFold(nn.Module):
    """(B, 8, C) -> (B*4, 2, C): each sample's 4 windows of 2 positions, batch-major."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h.reshape(-1, 2, HIDDEN)).reshape(x.shape[0], -1, OUT).mean(1)


class SequenceFold(nn.Module):
    """(B, L, C) -> (L*B, C), sequence-major, as attention's output projection is often fed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).transpose(0, 1).reshape(-1, HIDDEN)
        return self.b(h).view(x.shape[1], x.shape[0], OUT).mean(0)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x.view(-1, in), weight)`` with the weight stored (in, out)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(fan_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class ParameterOperand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Conv1D(IN, HIDDEN), Conv1D(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean(1)


def _linear(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    weight = state[f"{name}.weight"]
    if weight.shape[0] != state[f"{name}.bias"].shape[0]:  # Conv1D: stored (in, out)
        weight = weight.t()
    return F.linear(x, weight, state[f"{name}.bias"])


def _by_hand(cls: type[nn.Module], x: torch.Tensor, state: dict[str, torch.Tensor],
             gates: torch.Tensor) -> torch.Tensor:
    """The gated big student written out: gates on the hidden layer where the batch is still dim 0."""
    hidden = torch.relu(_linear(x, state, "a")) * gates[:, None, :]
    batch, positions = x.shape[:2]
    if cls is Moved:
        return _linear(hidden.transpose(0, 1), state, "b").mean(0)
    if cls is WindowFold:
        return _linear(hidden.reshape(-1, 2, hidden.shape[-1]), state, "b").reshape(batch, -1, OUT).mean(1)
    if cls is SequenceFold:
        folded = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])
        return _linear(folded, state, "b").view(positions, batch, OUT).mean(0)
    return _linear(hidden, state, "b").mean(1)


class _Fixed(nn.Module):
    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        return self.values


def _teachers(cls: type[nn.Module]) -> list[nn.Module]:
    torch.manual_seed(0)
    return [cls().eval() for _ in range(2)]


# hand count: the site of layer b sees (B=5, L=8) as ...
PLACES = {Moved: BatchPlace(1), WindowFold: BatchPlace(0, 1, 4), SequenceFold: BatchPlace(0, 8, 1),
          ParameterOperand: BatchPlace(0, 1, 8)}


@pytest.mark.parametrize("cls", [Moved, WindowFold, SequenceFold, ParameterOperand], ids=lambda c: c.__name__)
def test_each_sample_takes_its_own_gate_row(cls: type[nn.Module]) -> None:
    teachers = _teachers(cls)
    x = torch.randn(2, 8, IN, generator=torch.Generator().manual_seed(1))
    big = graphmerge.widen(teachers, x)
    gated = graphmerge.add_gates(big, seed=0)
    assert gated.gates.total == 2 * HIDDEN  # one widened group: the hidden layer, twice
    site = next(node for node in gated.graph_module.graph.nodes if getattr(node.target, "__name__", "") ==
                "apply_gate")
    assert site.args[5] == PLACES[cls].as_arg(), site.args[5]
    assert locate_batch(big, [site.args[0].name], (x,))[site.args[0].name] == PLACES[cls]
    # a batch of 5 (capture saw 2), distinct gate values per sample, compared with the written-out model
    x5 = torch.randn(5, 8, IN, generator=torch.Generator().manual_seed(2))
    values = torch.rand(5, 2 * HIDDEN, generator=torch.Generator().manual_seed(3))
    gated.graph_module._modules[GATES] = _Fixed(torch.cat([values, torch.ones(5, 1)], 1))
    with torch.no_grad():
        got = gated.eval()(x5)
        expected = _by_hand(cls, x5, big.state_dict(), values)
    assert torch.allclose(got, expected, atol=1e-6), float((got - expected).abs().max())


@pytest.mark.parametrize("cls", [Moved, WindowFold, SequenceFold, ParameterOperand], ids=lambda c: c.__name__)
def test_the_whole_pipeline_runs(cls: type[nn.Module]) -> None:
    teachers = _teachers(cls)
    x = torch.randn(2, 8, IN, generator=torch.Generator().manual_seed(1))
    report = certify_pipeline(teachers, x)
    assert report.sample_error is not None and report.sample_error < 1e-6
    assert report.certificates["I3"].relative_error < 1e-6
    assert set(report.open_fraction.values()) == {0.5}
    assert type(report.student) is cls


def test_the_sample_check_sees_a_wrong_place() -> None:
    """Mutation: give the window fold the sequence-major place; the pipeline's check must see it."""
    teachers = _teachers(WindowFold)
    x = torch.randn(2, 8, IN, generator=torch.Generator().manual_seed(1))
    gated = graphmerge.add_gates(graphmerge.widen(teachers, x), seed=0)
    error, skipped = gates_follow_samples(gated, (x,), {})
    assert skipped is None and error < 1e-6
    for node in gated.graph_module.graph.nodes:
        if getattr(node.target, "__name__", "") == "apply_gate":
            node.args = (*node.args[:5], (0, 4, 1))
    gated.graph_module.recompile()
    error, _ = gates_follow_samples(gated, (x,), {})
    assert error > 1e-3


def test_a_static_batch_shares_one_realisation_and_says_where() -> None:
    """An example batch of 1 makes torch.export specialise the batch: the probe cannot run the graph
    on 2 samples, so add_gates names the site and shares row 0 there."""
    teachers = _teachers(SequenceFold)
    x = torch.randn(1, 8, IN)
    with pytest.warns(UserWarning):
        big = graphmerge.widen(teachers, x)
    lost = r"cannot locate the batch dimension at 1 gate site.*node reshape.*test_gate_batch.py"
    with pytest.warns(UserWarning, match=lost):
        gated = graphmerge.add_gates(big, seed=0)
    site = next(node for node in gated.graph_module.graph.nodes if getattr(node.target, "__name__", "") ==
                "apply_gate")
    assert site.args[5] is None
    gated.train()(x).sum().backward()  # runs; the only batch it can run is the captured one


def test_a_gate_on_a_parameter_operand_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule naming the wrong argument (addmm's bias, the bug GPT-2 hit) is refused at add_gates."""
    from graphmerge.passes.rules import layers

    original = layers.matrix_product

    def wrong(*args, **kwargs):
        kwargs["input_index"] = 0
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, "matrix_product", wrong)
    teachers = _teachers(ParameterOperand)
    x = torch.randn(2, 8, IN)
    big = graphmerge.widen(teachers, x)
    refused = r"aten.addmm.*argument 0 \(b.bias\), which is a parameter or constant"
    with pytest.raises(graphmerge.GraphMergeError, match=refused):
        graphmerge.add_gates(big)
