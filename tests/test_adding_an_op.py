"""The worked example of docs/design.md, "Adding an op", run as written: a custom op whose rule says
how channels flow (``couple``), rewrites its literal channel count (``rewrite``) and rewrites itself in
the big student (``widen``); the big student then computes the teachers' mean (I1), checked here
against the teachers' own outputs.
"""

from __future__ import annotations

import torch
from torch import nn

import graphmerge

torch.set_num_threads(1)

LIBRARY = torch.library.Library("graphmerge_example", "DEF")
LIBRARY.define("channel_rms(Tensor x, int channels) -> Tensor")


@torch.library.impl(LIBRARY, "channel_rms", "CompositeExplicitAutograd")
def _channel_rms(x: torch.Tensor, channels: int) -> torch.Tensor:
    assert x.shape[1] == channels, f"channel_rms expects {channels} channels, got {x.shape[1]}"
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)


@torch.library.register_fake("graphmerge_example::channel_rms")
def _channel_rms_fake(x: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.empty_like(x)


# --- the example, as in docs/design.md ---------------------------------------------------------
from graphmerge.passes.registry import OpRule, describe, labels_of, pin_all, register, set_arg  # noqa: E402


@register(torch.ops.graphmerge_example.channel_rms)
class ChannelRmsRule(OpRule):
    """``x / rms(x over dim 1)``: channels stay in place, but the rms mixes the channels it normalises."""

    def couple(self, prop, node):
        x = labels_of(prop, node.args[0])
        if x is None or x.dim(1) is None:
            return pin_all(prop, node, f"{describe(node)}: channel_rms over a reshaped channel block")
        prop.normalised_across(x.dim(1), describe(node))  # a student keeps one teacher's whole block
        prop.role(node, "member", x.dim(1))
        return x

    def rewrite(self, node, sizes):
        """``channels`` counts dim 1: a student compressed to another width gets its own count."""
        dims = sizes.input_dims
        if dims is not None and dims[1] is not None and sizes.widened(dims[1]):
            set_arg(node, "channels", sizes.size(dims[1]))

    def widen(self, node, ctx):
        """In the big student each teacher's block is normalised on its own, which is exact (I1)."""
        dims = ctx.dims_of(node.args[0])
        if dims is None or dims[1] is None or not ctx.is_widened(dims[1]):
            return
        blocks = ctx.constant("channel_rms_blocks", ctx.teacher_blocks(dims[1]), before=node)
        with ctx.big.graph.inserting_before(node):
            per_teacher = ctx.big.graph.call_function(channel_rms_per_teacher, (*node.args[:2], blocks))
        ctx.replace(node, per_teacher)


def channel_rms_per_teacher(x: torch.Tensor, channels: int, blocks: torch.Tensor) -> torch.Tensor:
    """``channel_rms`` of each teacher's channels ``blocks[t]`` (dim 1) on their own."""
    out = torch.empty_like(x)
    for block in blocks:
        out.index_copy_(1, block, torch.ops.graphmerge_example.channel_rms(x.index_select(1, block), channels))
    return out
# --- end of the example ------------------------------------------------------------------------


class RmsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.graphmerge_example.channel_rms(torch.relu(self.conv(x)), 6)
        return self.head(y.mean((2, 3)))


def _reference(model: RmsNet, x: torch.Tensor) -> torch.Tensor:
    """The model's output written out in plain torch, without the custom op."""
    y = torch.relu(model.conv(x))
    y = y / torch.sqrt(y.pow(2).mean(1, keepdim=True) + 1e-6)
    return model.head(y.mean((2, 3)))


def test_the_design_example_widens_to_the_teachers_mean() -> None:
    inputs = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(RmsNet().eval())
    groups = graphmerge.analyze(teachers[0], inputs)
    assert groups.internal_pinned == []
    assert any(("conv.weight", 0) in g.index_maps for g in groups.widened)
    big = graphmerge.widen(teachers, inputs)
    assert any(getattr(node.target, "__name__", "") == "channel_rms_per_teacher" for node in big.graph.nodes)
    with torch.no_grad():
        expected = torch.stack([_reference(t, *inputs) for t in teachers]).mean(0)
        assert torch.allclose(big.eval()(*inputs), expected, atol=1e-5)
    student = graphmerge.compress(big, "teacher:1")
    assert isinstance(student, RmsNet)
    assert torch.equal(student.conv.weight, teachers[1].conv.weight)  # the head averages the teachers (I2)


def test_the_rewrite_gives_a_student_of_another_width_its_own_count() -> None:
    """compress to a width ratio runs the analysed graph at the student's width: channel_rms checks
    its ``channels`` against its input, so a count the rule failed to rewrite would fail there."""
    inputs = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    teachers = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        teachers.append(RmsNet().eval())
    big = graphmerge.widen(teachers, inputs)
    hidden = next(g for g in graphmerge.widen_info(big)[1].groups.widened if ("conv.weight", 0) in g.index_maps)
    scores = {hidden.id: torch.arange(2 * hidden.width, dtype=torch.float32)}
    student = graphmerge.compress(big, scores, ratio=0.75, verify=False)
    counts = [node.args[1] for node in student.graph.nodes
              if node.target is torch.ops.graphmerge_example.channel_rms.default]
    assert counts == [9]  # 0.75 of the big student's 2 x 6 channels
    with torch.no_grad():
        assert student(*inputs).shape == (2, 4)
