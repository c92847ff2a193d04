"""The coupling analysis against groups counted by hand (see the docstrings in tests/models.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from graphmerge.passes.ir import Group, GroupSet
from torch import nn

import graphmerge
from tests.models import CASES, ModelCase, images

torch.set_num_threads(1)  # two xdist workers on two cores

CASE_LIST = list(CASES.values())


def analyze_case(case: ModelCase, **kwargs) -> GroupSet:
    return graphmerge.analyze(case.build().eval(), case.example_inputs(), **kwargs)


def group_touching(groups: GroupSet, param: str, dim: int) -> Group:
    """The single group whose index maps include (param, dim) (a cat can give several: see below)."""
    found = [g for g in groups if (param, dim) in g.index_maps]
    assert len(found) == 1, f"{param} dim {dim} is touched by {len(found)} groups, expected 1"
    return found[0]


def groups_touching(groups: GroupSet, param: str, dim: int) -> list[Group]:
    return [g for g in groups if (param, dim) in g.index_maps]


def rows(start: int, width: int, run: int = 1) -> np.ndarray:
    """The index map of ``width`` channels at ``start`` owning consecutive runs of ``run``."""
    return start + np.arange(width * run).reshape(width, run)


# -- hand counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_LIST, ids=[c.name for c in CASE_LIST])
def test_hand_counted_groups(case: ModelCase) -> None:
    groups = analyze_case(case)
    assert sorted(g.width for g in groups.widened) == list(case.widened)
    assert len(groups.pinned) == case.pinned
    assert all(g.reason for g in groups.pinned), [g.to_dict() for g in groups.pinned]
    assert groups.internal_pinned == []
    # a ReLU after the classifier: its logits are laid out per teacher and averaged at the output
    averaged = [g.reason.split(":")[0] for g in groups if g.averaged]
    assert averaged == (["graph output after the non-linear op relu_1"] if case.name == "nonlinear_head" else [])
    assert all(g.widened == (not g.pinned) for g in groups)


@pytest.mark.parametrize("case", CASE_LIST, ids=[c.name for c in CASE_LIST])
def test_boundary_groups_are_pinned_with_their_reason(case: ModelCase) -> None:
    """The group of the head's out dim says 'graph output'; the first layer's input 'graph input'."""
    groups = analyze_case(case)
    model = case.build()
    first_layer = next(name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    input_group = group_touching(groups, f"{first_layer}.weight", 1)
    output_group = group_touching(groups, f"{case.head}.weight", 0)
    assert input_group.pinned and input_group.reason.startswith("graph input")
    if case.name == "nonlinear_head":
        assert output_group.averaged and not output_group.pinned
        assert output_group.reason.startswith("graph output after the non-linear op")
    else:
        assert output_group.pinned and output_group.reason.startswith("graph output")
    assert input_group.width == 3 or case.name == "mlp"


def test_mlp_has_three_groups_one_widened() -> None:
    groups = analyze_case(CASES["mlp"])
    assert len(groups) == 3
    hidden = group_touching(groups, "fc1.weight", 0)
    assert hidden.widened and hidden.width == 100
    assert ("fc1.bias", 0) in hidden.index_maps and ("fc2.weight", 1) in hidden.index_maps
    output = group_touching(groups, "fc2.weight", 0)
    assert ("fc2.bias", 0) in output.index_maps and output.reason.startswith("graph output")


def test_selection_units() -> None:
    for case in CASE_LIST:
        groups = analyze_case(case)
        for g in groups.widened:
            assert g.unit == case.units.get(g.width, 1), (case.name, g.to_dict())


# -- index maps --------------------------------------------------------------------------------


def test_lenet_flatten_gives_runs_of_25_features() -> None:
    groups = analyze_case(CASES["lenet"])
    g16 = group_touching(groups, "conv2.weight", 0)
    assert g16.width == 16 and g16.widened
    np.testing.assert_array_equal(g16.index_maps[("fc1.weight", 1)], rows(0, 16, 25))
    np.testing.assert_array_equal(g16.index_maps[("conv2.weight", 0)], rows(0, 16))
    np.testing.assert_array_equal(g16.index_maps[("conv2.bias", 0)], rows(0, 16))
    g120 = group_touching(groups, "fc1.weight", 0)
    assert g120.width == 120
    np.testing.assert_array_equal(g120.index_maps[("fc2.weight", 1)], rows(0, 120))


def test_densenet_bn_over_cat_has_offsets() -> None:
    groups = analyze_case(CASES["densenet_block"])
    stem = group_touching(groups, "stem.weight", 0)
    growth_a = group_touching(groups, "conv_a.weight", 0)
    growth_b = group_touching(groups, "conv_b.weight", 0)
    assert (stem.width, growth_a.width, growth_b.width) == (8, 4, 6)
    assert len({stem.id, growth_a.id, growth_b.id}) == 3
    assert {g.id for g in groups_touching(groups, "norm.weight", 0)} == {stem.id, growth_a.id, growth_b.id}
    for param in ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"):
        np.testing.assert_array_equal(stem.index_maps[(param, 0)], rows(0, 8))
        np.testing.assert_array_equal(growth_a.index_maps[(param, 0)], rows(8, 4))
        np.testing.assert_array_equal(growth_b.index_maps[(param, 0)], rows(12, 6))
    np.testing.assert_array_equal(growth_a.index_maps[("bn_b.weight", 0)], rows(8, 4))
    np.testing.assert_array_equal(growth_a.index_maps[("conv_b.weight", 1)], rows(8, 4))
    np.testing.assert_array_equal(growth_b.index_maps[("transition.weight", 1)], rows(12, 6))
    transition = group_touching(groups, "transition.weight", 0)
    np.testing.assert_array_equal(transition.index_maps[("fc.weight", 1)], rows(0, 10, 16))


def test_chunk_cuts_the_stem_into_two_groups() -> None:
    groups = analyze_case(CASES["channel_split"])
    halves = groups_touching(groups, "stem.0.weight", 0)
    assert sorted(g.width for g in halves) == [4, 4]
    by_start = sorted(halves, key=lambda g: int(g.index_maps[("stem.0.weight", 0)].min()))
    np.testing.assert_array_equal(by_start[0].index_maps[("stem.1.weight", 0)], rows(0, 4))
    np.testing.assert_array_equal(by_start[1].index_maps[("stem.1.weight", 0)], rows(4, 4))
    np.testing.assert_array_equal(by_start[0].index_maps[("branch_a.weight", 1)], rows(0, 4))
    np.testing.assert_array_equal(by_start[1].index_maps[("branch_b.weight", 1)], rows(0, 4))
    branch_b = group_touching(groups, "branch_b.weight", 0)
    np.testing.assert_array_equal(branch_b.index_maps[("mix.weight", 1)], rows(4, 6))


def test_uneven_split_offsets() -> None:
    groups = analyze_case(CASES["uneven_split"])
    pieces = sorted(groups_touching(groups, "stem.weight", 0), key=lambda g: g.width)
    assert [g.width for g in pieces] == [3, 5]
    np.testing.assert_array_equal(pieces[0].index_maps[("stem.weight", 0)], rows(0, 3))
    np.testing.assert_array_equal(pieces[1].index_maps[("stem.weight", 0)], rows(3, 5))
    np.testing.assert_array_equal(pieces[1].index_maps[("branch_b.weight", 1)], rows(0, 5))


def test_channel_shuffle_permutes_the_consumer_index_map() -> None:
    groups = analyze_case(CASES["channel_shuffle"])
    stem = group_touching(groups, "stem.0.weight", 0)
    assert stem.width == 8 and stem.widened
    expected = np.array([[2 * (c % 4) + c // 4] for c in range(8)])
    np.testing.assert_array_equal(stem.index_maps[("conv.weight", 1)], expected)
    np.testing.assert_array_equal(stem.index_maps[("stem.1.running_mean", 0)], rows(0, 8))


def test_layer_scale_parameters_join_their_channel_group() -> None:
    groups = analyze_case(CASES["layer_scale"])
    stream = group_touching(groups, "stem.0.weight", 0)
    np.testing.assert_array_equal(stream.index_maps[("gamma", 0)], rows(0, 8))
    assert ("conv_b.weight", 0) in stream.index_maps
    for name in ("channels_last_scale", "convnext_block"):
        groups = analyze_case(CASES[name])
        stream = group_touching(groups, "stem.weight", 0)
        np.testing.assert_array_equal(stream.index_maps[("gamma", 0)], rows(0, 8))
        assert {("pw2.weight", 0), ("dwconv.weight", 0), ("pw1.weight", 1)} <= set(stream.index_maps)


def test_depthwise_and_module_called_twice_tie_in_and_out() -> None:
    groups = analyze_case(CASES["mobilenet_v2_style"])
    hidden = group_touching(groups, "blocks.1.expand.0.weight", 0)
    assert hidden.width == 24 and ("blocks.1.depthwise.0.weight", 0) in hidden.index_maps
    assert ("blocks.1.project.0.weight", 1) in hidden.index_maps
    stream = group_touching(groups, "blocks.1.project.0.weight", 0)
    assert ("blocks.2.project.0.weight", 0) in stream.index_maps
    shared = analyze_case(CASES["shared_module"])
    group = group_touching(shared, "stem.weight", 0)
    assert {("shared.0.weight", 0), ("shared.0.weight", 1), ("conv.weight", 1)} <= set(group.index_maps)


# -- producers, consumers, members -------------------------------------------------------------


def test_lenet_producers_and_consumers() -> None:
    groups = analyze_case(CASES["lenet"])
    g6 = group_touching(groups, "conv1.weight", 0)
    assert g6.producers == ["conv1"] and g6.consumers == ["conv2"]
    g84 = group_touching(groups, "fc2.weight", 0)
    assert g84.producers == ["fc2"] and g84.consumers == ["fc3"]


def test_resnet20_stream_producers_and_consumers() -> None:
    groups = analyze_case(CASES["resnet20"])
    stage2 = group_touching(groups, "layers.3.shortcut.0.weight", 0)
    assert stage2.width == 32
    assert set(stage2.producers) >= {"layers.3.shortcut.0", "layers.3.conv2", "layers.4.conv2",
                                     "layers.5.conv2"}
    assert set(stage2.consumers) >= {"layers.4.conv1", "layers.5.conv1", "layers.6.conv1",
                                     "layers.6.shortcut.0"}
    assert "layers.3.conv1" not in stage2.producers
    assert set(stage2.members) >= {"layers.3.shortcut.1", "layers.3.bn2", "layers.4.bn2"}


def test_squeeze_excite_gate_joins_the_gated_channels() -> None:
    groups = analyze_case(CASES["squeeze_excite"])
    gated = group_touching(groups, "conv.0.weight", 0)
    assert gated.width == 8
    assert {"conv.0", "se.expand"} <= set(gated.producers)
    assert {"se.reduce", "classifier"} <= set(gated.consumers)
    assert ("se.expand.bias", 0) in gated.index_maps


# -- purity and unknown ops --------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_analyze_does_not_mutate_the_model(training: bool) -> None:
    case = CASES["resnet20"]
    model = case.build().train(training)
    before = copy.deepcopy(model.state_dict())
    graphmerge.analyze(model, case.example_inputs())
    assert model.training == training
    assert all(m.training == training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@torch.fx.wrap
def mystery_op(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


class WrappedOpNet(nn.Module):
    """Stem 8 -> an fx-wrapped function the analysis has no rule for -> conv 10 -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 10, 1)
        self.classifier = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(mystery_op(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class OpaqueLeafNet(WrappedOpNet):
    """Stem 8 -> a leaf module of a class the analysis does not know -> conv 10 -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque = Opaque()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.opaque(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


def test_unknown_wrapped_function_pins_what_it_touches() -> None:
    groups = graphmerge.analyze(WrappedOpNet().eval(), images())
    stem = group_touching(groups, "stem.weight", 0)
    assert stem.pinned and "mystery_op" in stem.reason
    assert stem in groups.internal_pinned
    conv = group_touching(groups, "conv.weight", 0)
    assert conv.widened and conv.width == 10


def test_unknown_leaf_module_pins_what_it_touches() -> None:
    groups = graphmerge.analyze(OpaqueLeafNet().eval(), images(), leaf_modules=(Opaque,))
    stem = group_touching(groups, "stem.weight", 0)
    assert stem.pinned and "opaque" in stem.reason.lower()
    assert stem in groups.internal_pinned
    assert group_touching(groups, "conv.weight", 0).widened
    # Without the leaf, x * 2 + 1 is traced through and understood.
    plain = graphmerge.analyze(OpaqueLeafNet().eval(), images())
    assert group_touching(plain, "stem.weight", 0).widened
