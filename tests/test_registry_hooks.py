"""Rules rewrite their op in the big student through their widen hooks, and widen knows no op.

Each case is checked against the teachers' own outputs (their mean), never against the compiler.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import graphmerge

torch.set_num_threads(1)


class TiedHead(nn.Module):
    """The output layer reads the token embedding (tied weights): widen cannot divide that weight by
    N, so the linear rule's widen hook divides the layer's product instead."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(ids))))


class NormedSoftmax(nn.Module):
    """LayerNorm and softmax over a widened channel dim: their rules run them per teacher block."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.norm = nn.LayerNorm(10)
        self.down = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.softmax(self.norm(self.up(x)), -1))


def _teachers(cls: type[nn.Module], seeds: tuple[int, ...] = (1, 2)) -> list[nn.Module]:
    teachers = []
    for seed in seeds:
        torch.manual_seed(seed)
        teachers.append(cls().eval())
    return teachers


def _mean(teachers: list[nn.Module], *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([t(*inputs) for t in teachers]).mean(0)


def test_a_tied_head_averages_the_teachers_with_an_explicit_one_over_n() -> None:
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    teachers = _teachers(TiedHead)
    big = graphmerge.widen(teachers, (ids,))
    heads = graphmerge.widen_info(big)[1].tied_heads
    assert len(heads) == 1
    assert big.get_parameter("embed.weight") is big.get_parameter("head.weight")  # still one tensor
    with torch.no_grad():
        assert torch.allclose(big(ids), _mean(teachers, ids), atol=1e-5)


def test_layer_norm_and_softmax_run_per_teacher_block() -> None:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    teachers = _teachers(NormedSoftmax)
    big = graphmerge.widen(teachers, (x,))
    called = {getattr(node.target, "__name__", str(node.target)) for node in big.graph.nodes}
    assert "run_per_teacher_block" in called  # softmax
    assert any(type(module).__name__ == "BlockNorm" for module in big.modules())
    with torch.no_grad():
        assert torch.allclose(big(x), _mean(teachers, x), atol=1e-5)


def test_widen_knows_no_op() -> None:
    """The one ATen op widen.py names is the gather of the structural channel-permutation rewrite."""
    source = (Path(__file__).resolve().parents[1] / "passes" / "widen.py").read_text()
    assert re.findall(r"aten\.\w+", source) == ["aten.index_select"]


class NormedOutput(nn.Module):
    """A feature extractor whose output is a LayerNorm over channels no layer reads (an averaged
    output group): the LayerNorm rule's hook replaces the output node, and widen must still average
    the teachers' blocks at the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.fc(x)))


def test_an_output_a_hook_replaced_is_still_averaged() -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    teachers = _teachers(NormedOutput)
    big = graphmerge.widen(teachers, (x,))
    with torch.no_grad():
        torch.testing.assert_close(big(x), (teachers[0](x) + teachers[1](x)) / 2)
    graphmerge.certify_pipeline(teachers, (x,))  # the whole merge at toy scale runs, or raises naming the stage
