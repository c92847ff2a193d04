"""The op registry: an op without a rule pins (and says so); a user-registered rule makes it exact.

The op is a custom ATen op the built-in table cannot know (``graphmerge_test::channel_scale``,
``x * w[None, :, None, None]`` with a per-channel parameter ``w``). Without a rule its channels are
pinned inside the network and I1 cannot hold; with a rule written against the public API, the
big student is the teachers' mean (checked here against the teachers' own outputs) and the
student loads into the teachers' class.
"""

from __future__ import annotations

import pytest
import torch
from graphmerge.passes import registry
from torch import nn

import graphmerge

torch.set_num_threads(1)

LIBRARY = torch.library.Library("graphmerge_test", "DEF")
LIBRARY.define("channel_scale(Tensor x, Tensor w) -> Tensor")


@torch.library.impl(LIBRARY, "channel_scale", "CompositeExplicitAutograd")
def _channel_scale(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w[None, :, None, None]


@torch.library.register_fake("graphmerge_test::channel_scale")
def _channel_scale_fake(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.graphmerge_test.channel_scale(torch.relu(self.conv(x)), self.scale)
        return self.head(y.mean((2, 3)))


def channel_scale_rule(prop, node):
    """Channels flow through unchanged; ``w`` is indexed by the channel dim (dim 1) of ``x``."""
    x = registry.labels_of(prop, node.args[0])
    registry.tie_param(prop, node, node.args[1], [x.dim(1)], out_dim=0)
    prop.role(node, "member", x.dim(1))
    return x


INPUTS = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def _teachers() -> list[nn.Module]:
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(ScaledNet().eval())
    return teachers


def test_an_op_without_a_rule_pins_and_names_itself() -> None:
    groups = graphmerge.analyze(ScaledNet(), INPUTS)
    reasons = [g.reason for g in groups.internal_pinned]
    assert reasons and all("graphmerge_test.channel_scale" in r and "no rule" in r for r in reasons), reasons
    assert "test_registry.py" in reasons[0]  # the user's source line


def test_a_registered_rule_makes_the_merge_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.RULES, torch.ops.graphmerge_test.channel_scale, None)  # removed again after
    graphmerge.register_rule(torch.ops.graphmerge_test.channel_scale, channel_scale_rule, linear=True)
    teachers = _teachers()
    groups = graphmerge.analyze(teachers[0], INPUTS)
    assert groups.internal_pinned == []
    hidden = [g for g in groups.widened if ("scale", 0) in g.index_maps]
    assert len(hidden) == 1 and hidden[0].width == 6
    big = graphmerge.widen(teachers, INPUTS)
    with torch.no_grad():
        expected = torch.stack([t(*INPUTS) for t in teachers]).mean(0)
        assert torch.allclose(big.eval()(*INPUTS), expected, atol=1e-5)
    student = graphmerge.compress(big, "teacher:1")
    assert isinstance(student, ScaledNet)
    assert torch.equal(student.state_dict()["scale"], teachers[1].state_dict()["scale"])


def test_the_builtin_table_is_strict():
    """A rule registered for a name that is not an ATen op, or for an op that already has one, is a
    mistake, not a skip (the later rule would silently win)."""
    from graphmerge.passes.rules import elementwise

    with pytest.raises(registry.RegistrationError, match="'tanhshrink', which is not an ATen op"):
        registry.register("tanhshrink")
    with pytest.raises(registry.RegistrationError, match="which is not an ATen op"):
        registry.register(len)
    with pytest.raises(registry.RegistrationError, match="registers aten.relu twice"):
        registry.register(torch.ops.aten.relu)(elementwise.identity)
    with pytest.raises(registry.RegistrationError, match="registers aten.relu_ twice"):
        registry.register(torch.ops.graphmerge_test.channel_scale, "relu_")(channel_scale_rule)
    assert registry.rule_for(torch.ops.graphmerge_test.channel_scale) is None  # nothing registered by halves
    assert isinstance(registry.RULES[torch.ops.aten.true_divide], elementwise.ProductRule)  # one rule, the product's
