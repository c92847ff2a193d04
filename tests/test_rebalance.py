"""Where the teachers meet, the student averages the teachers it kept (passes/rebalance.py).

The big student's classifier holds each teacher's weight / N and the mean bias; a student that
keeps one teacher's channels would otherwise compute that teacher's logits / N plus the mean bias.
Checked against the teachers' own forward and a hand-written two-teacher mean.
"""

from __future__ import annotations

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
