"""Where the teachers meet, the student averages the teachers it kept (passes/rebalance.py).

The big student's classifier holds each teacher's weight / N and the mean bias; a student that
keeps one teacher's channels would otherwise compute that teacher's logits / N plus the mean bias.
Checked against the teachers' own forward and a hand-written two-teacher mean.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphmerge
from graphmerge import average_kept_teachers

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _teachers(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Net().eval() for _ in range(n)]


def test_one_teachers_selection_is_that_teacher_for_any_number_of_teachers() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for n in (2, 3):
        teachers = _teachers(n)
        big = graphmerge.widen(teachers, x)
        for k in range(n):
            student = graphmerge.compress(big, f"teacher:{k}")
            with torch.no_grad():
                assert not torch.allclose(student(x), teachers[k](x), atol=1e-3)  # logits / N + mean bias
                assert average_kept_teachers(student, big, teachers, f"teacher:{k}") == {"fc": 1}
                assert torch.allclose(student(x), teachers[k](x), atol=1e-6)


def test_a_mix_of_two_of_three_teachers_averages_those_two() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    teachers = _teachers(3)
    big = graphmerge.widen(teachers, x)
    scores = {g.id: torch.tensor([1.0] * 3 + [0.0] * 3 + [0.0] * 3 + [1.0] * 3 + [0.0] * 6)
              for g in graphmerge.widen_info(big)[1].groups.gated}  # teacher 0's first three, teacher 1's last three
    student = graphmerge.compress(big, scores)
    assert average_kept_teachers(student, big, teachers, scores) == {"fc": 2}
    with torch.no_grad():
        features = [torch.relu(t.conv(x)).mean((2, 3)) for t in teachers]
        expected = (teachers[0].fc(torch.cat([features[0][:, :3], torch.zeros(2, 3)], 1))
                    + teachers[1].fc(torch.cat([torch.zeros(2, 3), features[1][:, 3:]], 1))) / 2
        assert torch.allclose(student(x), expected, atol=1e-6)


def test_a_selection_reading_every_teacher_is_left_alone() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    teachers = _teachers(2)
    big = graphmerge.widen(teachers, x)
    scores = {g.id: torch.tensor([1.0, 0, 1, 0, 1, 0] * 2) for g in graphmerge.widen_info(big)[1].groups.gated}
    student = graphmerge.compress(big, scores)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert average_kept_teachers(student, big, teachers, scores) == {}
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_the_merge_averages_the_kept_teachers_only_where_no_gate_phase_trained_the_weights() -> None:
    from torch.utils.data import TensorDataset

    from graphmerge.recipe import MergeSettings, merge
    from tests.models import PreNormBlock

    assert MergeSettings(gate_epochs=0).averages_kept and not MergeSettings(gate_epochs=2).averages_kept
    assert MergeSettings(gate_epochs=2, average_kept=True).averages_kept
    assert not MergeSettings(gate_epochs=0, average_kept=False).averages_kept
    torch.manual_seed(0)
    teachers = [PreNormBlock().eval() for _ in range(2)]
    x = torch.randn(16, 5, 4, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2)))
    result = merge([t for t in teachers], data, selection="magnitude", gate_epochs=0, finetune_epochs=0,
                   batch_size=8, example_inputs=x[:2], preflight=False)
    # the stream keeps one teacher's block, its dead heads are replaced, the head averages that teacher only:
    # the student is one of the teachers, exactly
    with torch.no_grad():
        gaps = [float((result.student.eval()(x) - t(x)).abs().max()) for t in teachers]
    assert min(gaps) <= 1e-6 < max(gaps), gaps


def test_a_student_of_another_width_is_refused() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    teachers = _teachers(2)
    big = graphmerge.widen(teachers, x)
    scores = {g.id: torch.arange(12.0) for g in graphmerge.widen_info(big)[1].groups.gated}
    narrow = graphmerge.compress(big, scores, ratio=0.75)
    with pytest.raises(graphmerge.GraphMergeError, match="width ratio"):
        average_kept_teachers(narrow, big, teachers, scores)


def test_the_wrong_number_of_teachers_is_refused() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    teachers = _teachers(2)
    big = graphmerge.widen(teachers, x)
    student = graphmerge.compress(big, "teacher:0")
    with pytest.raises(graphmerge.GraphMergeError, match="needs the 2 teachers"):
        average_kept_teachers(student, big, teachers[:1], "teacher:0")
