"""Token-mixing layers (MLP-Mixer, ResMLP): a Linear over the token axis, applied to every channel.

Its weight carries no channel dim, yet differs between teachers. The big student must apply each
teacher's weight to that teacher's channels (I1); keeping one teacher's channels gives back that
teacher's weight (I2); a student whose channels mix teachers has one weight for all of them, so
the I3 certificate is skipped with that reason. Expected values are computed here from the
teachers' own outputs and tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from graphmerge.passes.ir import widen_info
from torch import nn

import graphmerge


class TokenMixer(nn.Module):
    def __init__(self, tokens: int = 6, channels: int = 8, hidden: int = 5, classes: int = 3, norm: bool = True):
        super().__init__()
        self.embed = nn.Linear(4, channels)
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.token_fc1 = nn.Linear(tokens, hidden)
        self.token_fc2 = nn.Linear(hidden, tokens)
        self.channel_fc = nn.Linear(channels, channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, 4)
        h = self.embed(x)
        mixed = self.token_fc2(torch.relu(self.token_fc1(self.norm(h).transpose(1, 2)))).transpose(1, 2)
        h = h + mixed
        h = h + torch.relu(self.channel_fc(h))
        return self.head(h.mean(1))


def _teachers(n: int = 2, norm: bool = True) -> list[nn.Module]:
    teachers = []
    for seed in range(n):
        torch.manual_seed(seed)
        teachers.append(TokenMixer(norm=norm).double().eval())
    return teachers


X = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("n", [2, 3])
def test_big_student_applies_each_teachers_token_weights_to_its_channels(n: int) -> None:
    teachers = _teachers(n)
    big = graphmerge.widen(teachers, (X,))
    info = widen_info(big)[1]
    assert not info.groups.internal_pinned
    assert set(info.stacked_params) == {"token_fc1.weight", "token_fc1.bias", "token_fc2.weight", "token_fc2.bias"}
    with torch.no_grad():
        expected = torch.stack([t(X) for t in teachers]).mean(0)
        assert torch.allclose(big(X), expected, atol=1e-12, rtol=0)
    # the channel width is widened, the token-mixing hidden width is not
    assert big.state_dict()["channel_fc.weight"].shape == (8 * n, 8 * n)
    assert big.state_dict()["token_fc1.weight"].shape == (n, 5, 6)


def test_keeping_one_teachers_channels_gives_back_its_token_weights() -> None:
    teachers = _teachers(2)
    big = graphmerge.widen(teachers, (X,))
    for k, teacher in enumerate(teachers):
        student = graphmerge.compress(big, f"teacher:{k}")
        assert type(student) is TokenMixer
        for name, value in student.state_dict().items():
            own = teacher.state_dict()[name]
            if name.startswith("head."):  # the averaging head: weight / N, mean bias
                mean = (teachers[0].state_dict()[name] + teachers[1].state_dict()[name]) / 2
                assert torch.equal(value, own / 2) or torch.equal(value, mean), name
            else:
                assert torch.equal(value, own), name


def test_a_student_mixing_teachers_gets_the_share_weighted_token_weights_and_no_i3_claim() -> None:
    teachers = _teachers(2, norm=False)  # a LayerNorm would be the first reason I3 cannot hold
    big = graphmerge.widen(teachers, (X,))
    info = widen_info(big)[1]
    scores = {}
    for group in info.groups.widened:  # keep the first 3/4 of teacher 0's channels, then teacher 1's
        score = torch.zeros(2 * group.width)
        keep0 = (3 * group.width) // 4
        score[:keep0] = 1.0
        score[group.width:2 * group.width - keep0] = 1.0
        scores[group.id] = score
    student = graphmerge.compress(big, copy.deepcopy(scores))
    share0 = ((3 * 8) // 4) / 8
    expected = share0 * teachers[0].token_fc1.weight + (1 - share0) * teachers[1].token_fc1.weight
    assert torch.allclose(student.token_fc1.weight, expected, atol=1e-12, rtol=0)
    certificate = graphmerge.api.student_certificate(student)
    assert certificate.skipped and "token-mixing" in certificate.skipped
