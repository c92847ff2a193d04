"""The typed records the passes hand each other (passes/ir.py): pin reasons, the big student's record,
compress's certificate."""

from __future__ import annotations

import copy

import pytest
import torch
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.ir import Group, GroupSet, PinReason, WidenInfo, widen_info
from torch import nn

import graphmerge
from graphmerge.api import student_certificate

torch.set_num_threads(1)

X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class Mlp(nn.Module):
    """4 -> 7 -> (an opaque module) -> 5 -> 3: groups of width 4 (input), 7, 5 and 3 (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 7)
        self.opaque = Opaque()
        self.fc2 = nn.Linear(7, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(self.opaque(torch.relu(self.fc1(x))))))


def group_of(groups: GroupSet, param: str, dim: int) -> Group:
    found = [g for g in groups if (param, dim) in g.index_maps]
    assert len(found) == 1
    return found[0]


def test_boundary_pins_carry_their_kind() -> None:
    groups = graphmerge.analyze(Mlp().eval(), (X,))
    inputs, logits = group_of(groups, "fc1.weight", 1), group_of(groups, "fc3.weight", 0)
    assert inputs.pinned and inputs.pin_reason is PinReason.GRAPH_INPUT and inputs.pin_reason.boundary
    assert logits.pinned and logits.pin_reason is PinReason.GRAPH_OUTPUT and logits.pin_reason.boundary
    for param in ("fc1.weight", "fc2.weight"):
        hidden = group_of(groups, param, 0)
        assert not hidden.pinned and hidden.pin_reason is None and hidden.reason is None
    assert groups.internal_pinned == []
    assert {g["pin_reason"] for g in groups.to_dict()["groups"]} == {"graph input", "graph output", None}


def test_a_leaf_module_pins_inside_with_its_kind() -> None:
    groups = graphmerge.analyze(Mlp().eval(), (X,), leaf_modules=("opaque",))
    hidden = group_of(groups, "fc1.weight", 0)
    assert hidden.pinned and hidden.pin_reason is PinReason.LEAF_MODULE and not hidden.pin_reason.boundary
    assert "opaque" in hidden.reason
    assert groups.internal_pinned == [hidden]
    assert not group_of(groups, "fc2.weight", 0).pinned


def test_inside_pins_are_told_by_their_kind_not_their_message() -> None:
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    inside = Group(0, 4, pinned=True, reason="graph output of a layer a rule cannot follow",
                   pin_reason=PinReason.OP_RULE)
    boundary = Group(1, 4, pinned=True, reason="aten.view (node view) at model.py:3",
                     pin_reason=PinReason.NOT_A_CHANNEL)
    unknown = Group(2, 4, pinned=True, reason="pinned by hand")  # no kind: counted inside, the safe side
    assert GroupSet([inside, boundary, unknown], gm).internal_pinned == [inside, unknown]
    assert {reason for reason in PinReason if reason.boundary} == {
        PinReason.GRAPH_INPUT, PinReason.INPUT_POSITIONS, PinReason.GRAPH_OUTPUT, PinReason.NOT_A_CHANNEL}


def test_group_pin_keeps_the_first_reason() -> None:
    group = Group(0, 4)
    group.pin(PinReason.UNIT_ORDER, "first")
    group.pin(PinReason.STRIDED_SLICE, "second")
    assert (group.pinned, group.pin_reason, group.reason) == (True, PinReason.UNIT_ORDER, "first")


def _teachers(n: int = 2) -> list[nn.Module]:
    teachers = []
    for seed in range(n):
        torch.manual_seed(seed)
        teachers.append(Mlp().eval())
    return teachers


def test_add_gates_and_deepcopy_give_each_copy_a_record_of_the_same_big_student() -> None:
    big = graphmerge.widen(_teachers(), (X,))
    _, info = widen_info(big)
    gated = graphmerge.add_gates(big)
    _, gated_info = widen_info(gated)
    assert widen_info(big)[1] is info  # add_gates does not touch big
    assert isinstance(gated_info, WidenInfo) and gated_info is not info
    assert gated_info.groups is info.groups and gated_info.teacher is info.teacher
    assert gated_info.batch_places is info.batch_places  # located once per big student
    twin = copy.deepcopy(big)
    _, twin_info = widen_info(twin)
    assert twin_info is not info and twin_info.groups is info.groups
    assert twin.get_parameter("fc1.weight") is not big.get_parameter("fc1.weight")
    assert torch.equal(twin(X), big(X))


def test_a_module_without_a_record_is_refused_by_name() -> None:
    with pytest.raises(GraphMergeError, match=r"Linear without graphmerge metadata.*graphmerge.widen"):
        widen_info(nn.Linear(2, 2))


def test_compress_keeps_the_certificate_of_each_student() -> None:
    teachers = _teachers()
    big = graphmerge.widen(teachers, (X,))
    first = graphmerge.compress(big, "teacher:0")
    second = graphmerge.compress(big, "teacher:1", verify=False)
    certificate = student_certificate(first)
    assert certificate is not None and certificate.invariant == "I3" and certificate.relative_error <= 1e-6
    assert student_certificate(second) is None
    assert student_certificate(teachers[0]) is None
    assert isinstance(first, Mlp) and torch.equal(first.fc2.weight, teachers[0].fc2.weight)  # I2
