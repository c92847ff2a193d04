"""Parameters without a channel dim broadcast against channels: StarReLU's ``scale * relu(x)**2 + bias``
(MetaFormer v2), a learnable affine scalar ``s * x`` on a conv's output (HGNetV2).

Each teacher has its own scalar, so the big student must multiply teacher t's channels by teacher
t's value (I1); keeping one teacher's channels gives back its scalar (I2); a student mixing
teachers has one scalar for all of them: the share-weighted mean, and no I3 claim. Expected
values come from the teachers' own outputs and tensors.
"""

from __future__ import annotations

import pytest
import torch
from graphmerge.passes.ir import widen_info
from torch import nn

import graphmerge


class StarReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.relu(x) ** 2 + self.bias


class Scalars(nn.Module):
    """A channels-last MLP with StarReLU and a conv branch scaled by one learned scalar, whose (1,)
    shape aligns with the width axis, not the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), StarReLU(), nn.Linear(6, 3)
        self.conv, self.conv2 = nn.Conv2d(3, 5, 1), nn.Conv2d(5, 3, 1)
        self.affine = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) + self.conv2(torch.relu(self.affine * self.conv(image))).mean((2, 3))


def _teachers(n: int) -> list[nn.Module]:
    teachers = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = Scalars().double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        teachers.append(model)
    return teachers


generator = torch.Generator().manual_seed(0)
INPUTS = (torch.randn(3, 4, generator=generator, dtype=torch.float64),
          torch.randn(3, 3, 4, 4, generator=generator, dtype=torch.float64))
SCALARS = ("act.scale", "act.bias", "affine")


@pytest.mark.parametrize("n", [2, 3])
def test_the_big_student_gives_each_teachers_channels_its_own_scalar(n: int) -> None:
    teachers = _teachers(n)
    assert len({t.act.scale.item() for t in teachers}) == n  # the scalars differ
    big = graphmerge.widen(teachers, INPUTS)
    with torch.no_grad():
        expected = torch.stack([t(*INPUTS) for t in teachers]).mean(0)
        assert torch.allclose(big.eval()(*INPUTS), expected, atol=1e-12, rtol=0)
    for name in SCALARS:  # stacked, one value per teacher
        assert big.get_parameter(name).shape == (n, 1)


def test_keeping_one_teachers_channels_gives_back_its_scalars() -> None:
    teachers = _teachers(2)
    big = graphmerge.widen(teachers, INPUTS)
    for k, teacher in enumerate(teachers):
        student = graphmerge.compress(big, f"teacher:{k}")
        for name in SCALARS:
            assert torch.equal(student.get_parameter(name), teacher.get_parameter(name)), (k, name)


def test_a_student_mixing_teachers_gets_the_share_weighted_scalar_and_no_i3_claim() -> None:
    teachers = _teachers(2)
    big = graphmerge.widen(teachers, INPUTS)
    info = widen_info(big)[1]
    scores = {}
    for group in info.groups.widened:  # teacher 0's first channel, then teacher 1's others
        score = torch.zeros(2 * group.width)
        score[0] = 1.0
        score[group.width + 1:] = 1.0
        scores[group.id] = score
    student = graphmerge.compress(big, scores)
    fc1 = next(g for g in info.groups.widened if "fc1" in g.members)
    share0 = 1 / fc1.width  # one of fc1's channels comes from teacher 0
    expected = share0 * teachers[0].act.scale + (1 - share0) * teachers[1].act.scale
    assert torch.allclose(student.act.scale, expected, atol=1e-12, rtol=0)
    certificate = graphmerge.api.student_certificate(student)
    assert certificate.skipped and "applied per teacher" in certificate.skipped
