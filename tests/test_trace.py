"""graphmerge.passes.trace: tracing, shape metadata, leaf modules, and the errors users see."""

from __future__ import annotations

import inspect

import pytest
import torch
from graphmerge.passes.trace import trace
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from graphmerge.errors import TraceError


class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.fx cannot trace this."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.gate = DataDependent()
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.gate(self.stem(x))))


class UsesLen(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(len(x)):
            x = x + 1
        return x


class WithFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        if project:
            return self.fc(x)
        return x


def line_of(function, text: str) -> int:
    """The line number of the first source line of ``function`` containing ``text``."""
    lines, start = inspect.getsourcelines(function)
    return start + next(i for i, line in enumerate(lines) if text in line)


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 5, 3, stride=2), nn.Flatten(), nn.Linear(5 * 3 * 3, 7))


def test_every_node_has_the_shape_it_computes():
    gm = trace(small_cnn(), (torch.randn(2, 3, 8, 8),))
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes}
    # hand-computed: padding 1 keeps 8x8; a 3x3 stride-2 conv without padding gives 3x3
    assert shapes["input_1"] == (2, 3, 8, 8)
    assert shapes["_0"] == shapes["_1"] == shapes["_2"] == (2, 8, 8, 8)
    assert shapes["_3"] == (2, 5, 3, 3)
    assert shapes["_4"] == (2, 45)
    assert shapes["_5"] == shapes["output"] == (2, 7)


def test_traced_graph_computes_what_the_model_computes():
    model = small_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_bare_tensor_is_accepted_as_the_example_input():
    gm = trace(nn.Linear(4, 3), torch.randn(5, 4))
    assert tuple(gm.graph.find_nodes(op="output")[0].meta["tensor_meta"].shape) == (5, 3)


def test_training_flags_and_batchnorm_statistics_are_left_alone():
    model = Wrapper()
    model.train()
    model.bn.eval()  # a user's deliberately frozen BatchNorm must stay frozen
    model.bn.running_mean.fill_(0.5)
    trace(model, (torch.randn(3, 3),), leaf_modules=["gate"])
    assert model.training and model.stem.training and model.head.training
    assert not model.bn.training
    assert torch.equal(model.bn.running_mean, torch.full((4,), 0.5))
    assert all(p.grad is None for p in model.parameters())


def test_data_dependent_control_flow_names_the_line_of_the_if():
    with pytest.raises(TraceError) as info:
        trace(Wrapper(), (torch.randn(3, 3),))
    message = str(info.value)
    assert f"{__file__}:{line_of(DataDependent.forward, 'if x.sum()')}" in message
    assert "if x.sum() > 0:" in message
    assert "'gate'" in message and "--leaf gate" in message  # the submodule to mark a leaf
    assert "control flow" in message and "concrete_args" in message
    assert "\n" not in message


@pytest.mark.parametrize("leaf", ["gate", DataDependent, "DataDependent"])
def test_marking_the_submodule_a_leaf_makes_it_traceable(leaf):
    model = Wrapper().eval()
    x = torch.randn(3, 3)
    gm = trace(model, (x,), leaf_modules=[leaf])
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["stem", "gate", "bn", "head"]  # gate kept whole, not traced into
    torch.testing.assert_close(gm(x), model(x))


def test_an_unknown_leaf_name_suggests_close_matches():
    with pytest.raises(TraceError, match=r"'gaet'.*Did you mean gate"):
        trace(Wrapper(), (torch.randn(3, 3),), leaf_modules=["gaet"])


def test_len_of_a_proxy_in_the_root_forward_names_the_line_and_the_fixes():
    with pytest.raises(TraceError) as info:
        trace(UsesLen(), (torch.randn(2, 2),))
    message = str(info.value)
    assert f"{__file__}:{line_of(UsesLen.forward, 'len(x)')}" in message
    assert "'len' is not supported" in message
    assert "concrete_args" in message and "leaf" in message


def test_concrete_args_fix_a_python_branch():
    with pytest.raises(TraceError):
        trace(WithFlag(), (torch.randn(2, 4),))
    model = WithFlag().eval()
    x = torch.randn(2, 4)
    gm = trace(model, (x,), concrete_args={"project": False})
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # the branch taken skips fc
    assert tuple(gm.graph.find_nodes(op="output")[0].meta["tensor_meta"].shape) == (2, 4)


def test_a_wrong_example_input_names_its_shape_and_the_failing_layer(capsys):
    with pytest.raises(TraceError) as info:
        trace(small_cnn(), (torch.randn(2, 4, 8, 8),))
    message = str(info.value)
    assert "(2, 4, 8, 8)" in message
    assert "'_0'" in message  # the first conv, which expects 3 channels
    assert "--input-shape" in message
    assert "Traceback" not in capsys.readouterr().err  # ShapeProp's own printout is suppressed


def test_model_name_appears_in_errors():
    with pytest.raises(TraceError, match="'teacher-a'"):
        trace(UsesLen(), (torch.randn(2, 2),), name="teacher-a")


def test_source_lines_are_recorded_for_later_passes():
    gm = trace(Wrapper(), (torch.randn(3, 3),), leaf_modules=["gate"])
    head = next(n for n in gm.graph.nodes if n.target == "head")
    assert f'line {line_of(Wrapper.forward, "self.head(")}' in head.stack_trace


@given(widths=st.lists(st.integers(1, 9), min_size=2, max_size=6), batch=st.integers(1, 4))
def test_shapes_of_random_mlps(widths, batch):
    layers = []
    for fan_in, fan_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    gm = trace(nn.Sequential(*layers), (torch.randn(batch, widths[0]),))
    linear_shapes = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                     if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    assert linear_shapes == [(batch, w) for w in widths[1:]]
