"""A channel group a normalisation spans keeps one teacher's whole block.

In a pre-norm transformer every block's LayerNorm reads the residual stream. The big student
normalises each teacher's block of it over that block; a student that keeps a mix of both
teachers' channels would normalise over the mix (compression inexact, the I3 certificate
skipped) and feed every layer a stream half of whose features come from another network. So the
stream keeps the whole block of the teacher whose gates score highest in sum; the other groups
(the MLP's hidden units) still mix freely. Checked here against the teachers' own tensors.
"""

from __future__ import annotations

import pytest
import torch
from graphmerge.passes.ir import widen_info
from torch import nn

import graphmerge
from graphmerge.api import student_certificate
from tests.models import PreNormBlock

torch.set_num_threads(1)

D, HIDDEN = 6, 10


class PreNorm(PreNormBlock):
    def __init__(self) -> None:
        super().__init__(D, HIDDEN)


def _setup(selection: str):
    torch.manual_seed(0)
    teachers = [PreNorm().eval() for _ in range(2)]
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    big = graphmerge.widen(teachers, x)
    info = widen_info(big)[1]
    info.normalised_selection = selection
    gated = graphmerge.add_gates(big, seed=0)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in gated.gates.log_alpha.values():
            param.copy_(torch.randn(param.shape, generator=generator) * 3)
    stream = next(g for g in info.groups.gated if g.width == D)
    hidden = next(g for g in info.groups.gated if g.width == HIDDEN)
    return teachers, x, info, gated, stream, hidden


def test_the_residual_stream_keeps_one_teachers_block_and_compresses_exactly() -> None:
    teachers, x, info, gated, stream, hidden = _setup("block")
    assert set(info.groups.layout.across_norm) == {stream.id}  # hand count: the LayerNorms span the stream only
    scores = gated.gates.log_alpha[f"g{stream.id}"].detach()
    best = int(torch.argmax(scores.view(2, D).sum(1)))  # the block with the highest score sum
    student = graphmerge.compress(gated.eval(), "gates")
    certificate = student_certificate(student)
    assert certificate.skipped is None and certificate.relative_error <= certificate.tolerance, certificate
    own = teachers[best].state_dict()
    for name in ("embed.weight", "embed.bias", "norm1.weight", "norm2.bias"):
        assert torch.equal(student.state_dict()[name], own[name]), name  # the stream is teacher `best`'s
    hidden_kept = torch.topk(gated.gates.log_alpha[f"g{hidden.id}"].detach(), HIDDEN).indices
    assert len({int(i) // HIDDEN for i in hidden_kept}) == 2, "this draw's hidden units mix both teachers"
    assert gated.teacher_share()[stream.id] == [D if t == best else 0 for t in range(2)]


def test_mixed_selection_is_still_available_and_says_compression_is_inexact() -> None:
    _, _, info, gated, stream, _ = _setup("mixed")
    kept = torch.topk(gated.gates.log_alpha[f"g{stream.id}"].detach(), D).indices
    assert len({int(i) // D for i in kept}) == 2, "this draw's top stream channels mix both teachers"
    certificate = student_certificate(graphmerge.compress(gated.eval(), "gates"))
    assert "normalised across its channels" in (certificate.skipped or ""), certificate


def test_decide_drives_the_stream_to_the_whole_block() -> None:
    _, _, _, gated, stream, _ = _setup("block")
    scores = gated.gates.log_alpha[f"g{stream.id}"].detach()
    best = int(torch.argmax(scores.view(2, D).sum(1)))
    gated.decide(0.5, 1.0)
    values = gated.eval_gate_values()[stream.id].view(2, D)
    assert bool((values[best] == 1).all()) and bool((values[1 - best] == 0).all()), values


def test_an_unknown_selection_is_refused() -> None:
    with pytest.raises(graphmerge.GraphMergeError, match="normalised_groups"):
        graphmerge.merge([PreNorm(), PreNorm()], [], normalised_groups="best")


class NormOverCat(nn.Module):
    """One LayerNorm over the concatenation of two layers' outputs: two groups, one normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], -1))))


def test_groups_one_norm_spans_keep_the_same_teacher() -> None:
    """Scores favour teacher 0 in the 3-wide group and teacher 1 in the 5-wide one; the norm spans both,
    so both keep the teacher with the higher score sum over the two (teacher 1: 5 x 2 > 3 x 1), and the
    student's LayerNorm is exactly teacher 1's block's (I3 checked)."""
    torch.manual_seed(0)
    teachers = [NormOverCat().eval() for _ in range(2)]
    x = torch.randn(3, 4)
    big = graphmerge.widen(teachers, x)
    info = widen_info(big)[1]
    small, wide = sorted(info.groups.gated, key=lambda g: g.width)[:2]
    assert (small.width, wide.width) == (3, 5)
    assert tuple(sorted((small.id, wide.id))) in info.groups.layout.norm_spans
    gated = graphmerge.add_gates(big, seed=0)
    with torch.no_grad():
        gated.gates.log_alpha[f"g{small.id}"].copy_(torch.tensor([1.0] * 3 + [0.0] * 3))
        gated.gates.log_alpha[f"g{wide.id}"].copy_(torch.tensor([0.0] * 5 + [2.0] * 5))
    assert gated.teacher_share()[small.id] == [0, 3] and gated.teacher_share()[wide.id] == [0, 5]
    student = graphmerge.compress(gated.eval(), "gates")
    certificate = student_certificate(student)
    assert certificate.skipped is None and certificate.relative_error <= certificate.tolerance, certificate
    for name in ("a.weight", "b.bias", "norm.weight"):
        assert torch.equal(student.state_dict()[name], teachers[1].state_dict()[name]), name
