"""Op rules on calls the hand-built models do not make: functional layers, ops that change a
channel dim's size, argument positions, constants, attention. Each either widens exactly (I1
against the mean of the teachers' own outputs) or pins with a reason; none may crash."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from graphmerge.passes.ir import widen_info
from torch import nn

import graphmerge


def _teachers(build, n: int = 2) -> list[nn.Module]:
    teachers = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = build().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        teachers.append(model)
    return teachers


def _assert_i1(build, x: torch.Tensor) -> None:
    teachers = _teachers(build)
    big = graphmerge.widen(teachers, (x,)).eval()
    with torch.no_grad():
        expected = torch.stack([t(x) for t in teachers]).mean(0)
        assert torch.allclose(big(x), expected, atol=1e-5 * max(1.0, expected.abs().max().item()))


class FunctionalLinear(nn.Module):
    """F.linear with parameters read through get_attr (no nn.Linear module)."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
        self.w2, self.b2 = nn.Parameter(torch.randn(3, 6)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


def test_functional_linear_with_module_parameters_widens_exactly():
    groups = graphmerge.analyze(FunctionalLinear(), (torch.randn(2, 4),))
    assert sorted(g.width for g in groups.widened) == [6]
    _assert_i1(FunctionalLinear, torch.randn(5, 4))
    gated = graphmerge.add_gates(graphmerge.widen(_teachers(FunctionalLinear), (torch.randn(2, 4),)))
    assert sum(1 for n in gated.graph_module.graph.nodes if getattr(n.target, "__name__", "") == "apply_gate") == 1


class MatmulWithParameters(nn.Module):
    """``x @ W.T`` with W stored (out, in), as Falcon's Linear writes it, then ``x @ W`` stored (in, out)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.w2 = nn.Parameter(torch.randn(6, 5))
        self.w3 = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        h = torch.relu(x @ self.w1.T)
        return torch.relu(h @ self.w2) @ self.w3


def test_a_matmul_with_a_parameter_is_a_layer():
    """Before: "matmul contracts a channel dim" pinned the hidden widths inside the network."""
    x = torch.randn(2, 7, 4)
    groups = graphmerge.analyze(MatmulWithParameters(), (x,))
    assert not groups.internal_pinned, [g.reason for g in groups.internal_pinned]
    assert sorted(g.width for g in groups.widened) == [5, 6]  # w1's 6 outputs, w2's 5 outputs
    _assert_i1(MatmulWithParameters, x)
    teachers = _teachers(MatmulWithParameters)
    student = graphmerge.compress(graphmerge.widen(teachers, (x,)), "teacher:1")
    state = student.state_dict()
    assert torch.equal(state["w1"], teachers[1].w1) and torch.equal(state["w2"], teachers[1].w2)
    assert torch.equal(state["w3"], teachers[1].w3 / 2)  # the output layer averages the teachers (I2)


class PaddedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(F.pad(torch.relu(self.a(x)), (0, 1)))


class GluHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.glu, self.b = nn.Linear(4, 8), nn.GLU(), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.glu(self.a(x)))


@pytest.mark.parametrize("build", [PaddedChannels, GluHead], ids=["pad-last-dim", "glu"])
def test_ops_that_change_a_channel_dims_size_pin_it(build):
    groups = graphmerge.analyze(build(), (torch.randn(2, 4),))
    assert groups.internal_pinned, [g.to_dict() for g in groups]
    with pytest.warns(UserWarning, match="pinned inside the network"):
        big = graphmerge.widen(_teachers(build), (torch.randn(2, 4),))
    assert big(torch.randn(3, 4)).shape == (3, 3)  # it runs; I1 is not promised with inner pins


class StdAndMax(nn.Module):
    """std(dim, unbiased, keepdim) reads keepdim from position 3; max(a, b) is elementwise."""

    def __init__(self):
        super().__init__()
        self.conv, self.other, self.fc = nn.Conv2d(3, 5, 3), nn.Conv2d(3, 5, 3), nn.Linear(5, 2)

    def forward(self, x):
        y = torch.max(self.conv(x), self.other(x))
        return self.fc((y / (y.std(2, True, True) + 1)).mean((2, 3)))


def test_argument_positions_of_std_and_elementwise_max():
    _assert_i1(StdAndMax, torch.randn(2, 3, 8, 8))


class PlainTensorScale(nn.Module):
    """A per-channel tensor kept as a plain attribute (not a parameter or buffer)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
        self.scale = torch.linspace(0.5, 2.0, 4).view(4, 1, 1)

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean((2, 3)))


def test_plain_tensor_attributes_are_constants_of_every_teacher():
    _assert_i1(PlainTensorScale, torch.randn(2, 3, 8, 8))


def test_plain_tensor_attributes_survive_compression_into_the_class():
    """The attribute is no state_dict entry: the student gets it back as an attribute (I2, I4)."""
    x = torch.randn(2, 3, 8, 8)
    teachers = _teachers(PlainTensorScale)
    big = graphmerge.widen(teachers, (x,))
    for k, teacher in enumerate(teachers):
        student = graphmerge.compress(big, f"teacher:{k}")
        assert isinstance(student, PlainTensorScale)
        assert torch.equal(student.scale, teacher.scale)
        assert set(student.state_dict()) == set(teacher.state_dict())
        body = [name for name in teacher.state_dict() if not name.startswith("fc.")]  # fc: the averaging head
        assert all(torch.equal(student.state_dict()[name], teacher.state_dict()[name]) for name in body)


class FlagBuffer(nn.Module):
    """A 0-dim bool buffer read in forward beside a counted BatchNorm: a flag, not a counter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)
        self.register_buffer("flag", torch.tensor(True))

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x)))) * self.flag


def test_scalar_flags_and_counters_come_back_per_teacher():
    teachers = _teachers(FlagBuffer)
    for count, teacher in zip((7, 19), teachers, strict=True):
        teacher.bn.num_batches_tracked.fill_(count)
    big = graphmerge.widen(teachers, (torch.randn(3, 4),))
    for k, teacher in enumerate(teachers):
        student = graphmerge.compress(big, f"teacher:{k}")
        assert student.flag.dtype == torch.bool and bool(student.flag)
        assert int(student.bn.num_batches_tracked) == int(teacher.bn.num_batches_tracked)


class TensorClampBound(nn.Module):
    """A learned per-channel lower bound applied with clamp: the bound is read per channel."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
        self.low = nn.Parameter(torch.zeros(4, 1, 1))

    def forward(self, x):
        return self.fc(torch.clamp(self.conv(x), min=self.low).mean((2, 3)))


def test_a_tensor_operand_of_a_unary_op_joins_the_input_group():
    groups = graphmerge.analyze(TensorClampBound(), (torch.randn(2, 3, 8, 8),))
    assert [g.width for g in groups.widened] == [4]  # conv out, clamp bound, fc in: one group
    (group,) = groups.widened
    assert {name for name, _ in group.index_maps} >= {"conv.weight", "low", "fc.weight"}
    _assert_i1(TensorClampBound, torch.randn(2, 3, 8, 8))


class SquaredHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y * y


def test_a_product_after_the_last_layer_makes_an_averaged_output():
    """No layer reads the output group, so it is laid out per teacher and averaged after the
    product: I1 holds, and the analysis says why the group is averaged."""
    x = torch.randn(2, 4)
    groups = graphmerge.analyze(SquaredHead(), (x,))
    assert not groups.internal_pinned
    assert any(g.averaged and g.reason.startswith("graph output after the non-linear op") for g in groups)
    _assert_i1(SquaredHead, x)


class TinyAttention(nn.Module):
    """Embedding -> LayerNorm -> MultiheadAttention (2 heads) -> residual -> linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attention(self.norm(h), self.norm(h), self.norm(h), need_weights=False)
        return self.head((h + a).mean(1))


def test_attention_widens_exactly_and_selects_whole_heads():
    x = torch.randn(2, 6, 5)
    groups = graphmerge.analyze(TinyAttention(), (x,))
    heads = [g for g in groups.widened if ("attention.in_proj_weight", 0) in g.index_maps]
    # a head is one channel of its group: 2 heads, each owning its q, k and v rows (3 x 4)
    assert len(heads) == 1 and heads[0].width == 2
    rows = heads[0].index_maps[("attention.in_proj_weight", 0)]
    assert rows.tolist() == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19], [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]]
    assert heads[0].index_maps[("attention.out_proj.weight", 1)].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    _assert_i1(TinyAttention, x)
    teachers = _teachers(TinyAttention)
    big = graphmerge.widen(teachers, (x,)).eval()
    assert big.get_submodule("attention").in_proj_weight.shape == (48, 16)  # 4 heads of 4, q k v
    student = graphmerge.compress(big, "teacher:1")
    assert torch.equal(student.state_dict()["attention.in_proj_weight"],
                       teachers[1].state_dict()["attention.in_proj_weight"])
    gated = graphmerge.add_gates(big).eval()
    info = widen_info(big)[1]
    masks = {}
    for group in info.groups.widened:
        mask = torch.zeros(2 * group.width, dtype=torch.bool)
        if group.id == heads[0].id:  # heads: keep head 1 of teacher 0 and head 1 of teacher 1 (mixing)
            mask[[1, 3]] = True
        else:  # the LayerNorm'd stream keeps teacher 0's block, so LayerNorm sees the same channels
            mask[: group.width] = True
        masks[group.id] = mask
    gated.set_gates(masks)
    student = graphmerge.compress(gated, "gates").eval()
    with torch.no_grad():
        expected = gated(x)
        assert torch.allclose(student(x), expected, atol=1e-5 * max(1.0, expected.abs().max().item()))
    assert student.state_dict()["attention.in_proj_weight"].shape == (24, 8)


class GroupedQkvByIndex(nn.Module):
    """Falcon's spelling of grouped-query attention: a fused qkv viewed as (kv groups, query heads
    per group + 2, head_dim); the key and value heads read with a literal list index, then
    broadcast_to the query heads."""

    def __init__(self, groups: int = 2, per_group: int = 2, head_dim: int = 4, width: int = 8):
        super().__init__()
        self.groups, self.per_group, self.head_dim = groups, per_group, head_dim
        self.qkv = nn.Linear(width, groups * (per_group + 2) * head_dim)
        self.out = nn.Linear(groups * per_group * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.groups, self.per_group + 2, self.head_dim)
        q, k, v = qkv[:, :, :, :-2], qkv[:, :, :, [-2]], qkv[:, :, :, [-1]]
        k, v = torch.broadcast_to(k, q.shape), torch.broadcast_to(v, q.shape)
        q, k, v = (y.flatten(2, 3).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


def test_a_literal_list_index_inside_a_heads_block_keeps_whole_kv_groups():
    """Each kv group (its query heads, key and value) is one unit: the group of qkv's outputs has
    width 2 (hand count: two kv groups), and the big student, which indexes the same role axis,
    computes the teachers' mean."""
    x = torch.randn(2, 5, 8)
    groups = graphmerge.analyze(GroupedQkvByIndex(), (x,))
    assert not groups.internal_pinned, [g.reason for g in groups.internal_pinned]
    heads = [g for g in groups.groups if "qkv" in g.members]
    assert len(heads) == 1 and heads[0].width == 2
    _assert_i1(GroupedQkvByIndex, x)


class IndexedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x)[:, [4, 1]])


def test_a_literal_list_index_into_a_channel_dim_pins():
    """Channels picked by a list index would move in the big student: pinned, with the reason."""
    groups = graphmerge.analyze(IndexedChannels(), (torch.randn(3, 4),))
    reasons = [g.reason for g in groups.internal_pinned]
    assert reasons and all("tensor index into a channel dim" in r for r in reasons), reasons


class ConstantDepthwiseFilter(nn.Module):
    """BlurPool's spelling: a depthwise conv whose weight is a non-persistent buffer (the same in
    every teacher), one filter per channel."""

    def __init__(self, channels: int = 5):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, channels, 1), nn.Conv2d(channels, 2, 1)
        filters = torch.arange(channels * 9, dtype=torch.float32).reshape(channels, 1, 3, 3) / 50
        self.register_buffer("filt", filters, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(torch.relu(self.conv1(x)), self.filt, stride=2, padding=1, groups=self.filt.shape[0])
        return self.conv2(y).mean((2, 3))


def test_a_constant_depthwise_filter_widens_with_its_channels():
    """The filter buffer is laid out by the channels it filters: the big student holds it once per
    teacher (each channel keeps its own filter) and computes the teachers' mean; the student is
    the class again, with its own filter."""
    x = torch.randn(2, 3, 8, 8)
    _assert_i1(ConstantDepthwiseFilter, x)
    teachers = _teachers(ConstantDepthwiseFilter)
    big = graphmerge.widen(teachers, (x,))
    assert torch.equal(big.get_buffer("filt"), torch.cat([teachers[0].filt] * 2))
    student = graphmerge.compress(big, "teacher:1")
    assert isinstance(student, ConstantDepthwiseFilter) and torch.equal(student.filt, teachers[1].filt)
    assert torch.equal(student.conv1.weight, teachers[1].conv1.weight)


class NormalizedFeatures(nn.Module):
    """Features divided by their L2 norm over the channels (keepdim) inside the network: written
    out, and as SwiftFormer writes it (``F.normalize``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h / torch.linalg.vector_norm(h, dim=-1, keepdim=True) + h / h.norm(dim=-1, keepdim=True)
                        + F.normalize(h, dim=-1))  # F.normalize: norm.clamp_min(eps).expand_as(h)


def test_an_l2_norm_over_widened_channels_runs_per_teacher_block():
    """The norm of the big student's channels would mix both teachers' blocks; it runs on each."""
    x = torch.randn(3, 4)
    groups = graphmerge.analyze(NormalizedFeatures(), (x,))
    assert not groups.internal_pinned, [g.reason for g in groups.internal_pinned]
    assert sorted(g.width for g in groups.widened) == [6]
    _assert_i1(NormalizedFeatures, x)


class AlibiAttention(nn.Module):
    """ALiBi: a per-head linear distance bias, built at init as a non-persistent buffer, added to
    the scores written out or passed to SDPA as its mask."""

    def __init__(self, heads: int = 2, head_dim: int = 4, tokens: int = 5, sdpa: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.sdpa = heads, head_dim, sdpa
        self.qkv, self.out = nn.Linear(8, 3 * heads * head_dim), nn.Linear(heads * head_dim, 8)
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)])
        distance = torch.arange(tokens)[None, :] - torch.arange(tokens)[:, None]
        self.register_buffer("alibi", slopes[:, None, None] * distance.tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.alibi)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5 + self.alibi, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("sdpa", [False, True])
def test_an_alibi_bias_table_widens_with_the_heads(sdpa: bool):
    """The bias buffer's heads axis holds each teacher's heads (one copy per teacher: the table is
    the same in every teacher), so each head keeps its own slope."""
    x = torch.randn(2, 5, 8)
    groups = graphmerge.analyze(AlibiAttention(sdpa=sdpa), (x,))
    assert not groups.internal_pinned, [g.reason for g in groups.internal_pinned]
    _assert_i1(lambda: AlibiAttention(sdpa=sdpa), x)
    teachers = _teachers(lambda: AlibiAttention(sdpa=sdpa))
    big = graphmerge.widen(teachers, (x,))
    assert torch.equal(big.get_buffer("alibi"), torch.cat([teachers[0].alibi] * 2))
    student = graphmerge.compress(big, "teacher:0")
    assert isinstance(student, AlibiAttention) and torch.equal(student.alibi, teachers[0].alibi)
