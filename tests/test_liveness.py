"""A selection never keeps channels that cannot reach the output while live ones are left over.

The big student is block-diagonal, so where a selection keeps one teacher's whole residual stream,
every head and hidden unit it keeps from the other teacher reads and writes only dropped channels.
Checked against the teachers' own forward: with the stream and the hidden units scored as below,
the student must BE the stream's teacher; a convolutional chain whose first layer keeps one
teacher must not keep the other teacher's second-layer filters (they would see only biases).
"""

from __future__ import annotations

import pytest
import torch
from graphmerge.passes.ir import widen_info
from graphmerge.passes.liveness import dead_teachers
from graphmerge.passes.rebalance import average_kept_teachers
from graphmerge.passes.selection import select_channels
from torch import nn

import graphmerge
from graphmerge.recipe import MergeSettings
from tests.models import PreNormBlock

torch.set_num_threads(1)

D, HIDDEN = 6, 10


class PreNorm(PreNormBlock):
    def __init__(self) -> None:
        super().__init__(D, HIDDEN)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(-1))


def _widened(model_class: type[nn.Module], x: torch.Tensor, policy: str):
    torch.manual_seed(0)
    teachers = [model_class().eval() for _ in range(2)]
    big = graphmerge.widen(teachers, x)
    widen_info(big)[1].dead_channels = policy
    return teachers, big, widen_info(big)[1]


def _group(info, width: int):
    return next(g for g in info.groups.gated if g.width == width)


def _prenorm_scores(info) -> dict[int, torch.Tensor]:
    """The stream favours teacher 1; the hidden units' top half mixes both teachers (4 of 0, 6 of 1)."""
    stream, hidden = _group(info, D), _group(info, HIDDEN)
    hidden_scores = torch.zeros(2 * HIDDEN)
    hidden_scores[:4] = 5.0  # teacher 0's units 0-3
    hidden_scores[HIDDEN:HIDDEN + 6] = 4.0  # teacher 1's units 0-5
    return {stream.id: torch.cat([torch.zeros(D), torch.ones(D)]), hidden.id: hidden_scores}


def test_a_transformer_block_that_keeps_one_teachers_stream_becomes_that_teacher() -> None:
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    teachers, big, info = _widened(PreNorm, x, "replace")
    scores = _prenorm_scores(info)
    student = graphmerge.compress(big, scores)
    # the head reads teacher 1's stream only: it becomes teacher 1's, not teacher 1's / 2 plus the mean bias
    assert average_kept_teachers(student, big, teachers, scores) == {"head": 1}
    # teacher 0's hidden units read teacher 0's stream, which compress drops: all ten come from teacher 1
    with torch.no_grad():
        assert torch.allclose(student(x), teachers[1](x), atol=1e-6)
    for name, tensor in teachers[1].state_dict().items():
        assert torch.equal(student.state_dict()[name], tensor), name


def test_keeping_dead_channels_is_still_available_and_mixes() -> None:
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    teachers, big, info = _widened(PreNorm, x, "keep")
    scores = _prenorm_scores(info)
    kept = select_channels(info, scores)
    hidden = _group(info, HIDDEN)
    assert sorted(kept[hidden.id].tolist()) == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15]  # by hand: the top ten
    assert dead_teachers(info, kept) == {hidden.id: {0}}
    student = graphmerge.compress(big, scores)
    with torch.no_grad():
        assert not torch.allclose(student(x), teachers[1](x), atol=1e-3)


def test_filters_that_read_only_dropped_channels_are_replaced() -> None:
    x = torch.randn(2, 2, 7, generator=torch.Generator().manual_seed(2))
    _, big, info = _widened(Chain, x, "replace")
    first, second = _group(info, 4), _group(info, 5)
    scores = {first.id: torch.tensor([1.0] * 4 + [0.0] * 4),  # conv1 keeps teacher 0 only
              second.id: torch.tensor([0.0] * 5 + [1.0] * 5)}  # conv2's scores favour teacher 1
    kept = select_channels(info, scores)
    assert kept[first.id].tolist() == [0, 1, 2, 3]
    assert kept[second.id].tolist() == [0, 1, 2, 3, 4]  # teacher 1's filters would read only dropped maps


def test_live_mixtures_are_left_alone() -> None:
    """Both teachers keep channels in every group: nothing is dead, the selection is the scores' top."""
    x = torch.randn(2, 2, 7, generator=torch.Generator().manual_seed(2))
    _, big, info = _widened(Chain, x, "replace")
    first, second = _group(info, 4), _group(info, 5)
    scores = {first.id: torch.tensor([4.0, 3, 0, 0, 2, 1, 0, 0]), second.id: torch.arange(10.0) % 3}
    kept = select_channels(info, scores)
    assert kept[first.id].tolist() == [0, 1, 4, 5]
    assert kept[second.id].tolist() == sorted(torch.argsort(-(torch.arange(10.0) % 3), stable=True)[:5].tolist())
    assert dead_teachers(info, kept) == {}


def test_the_gate_decision_steers_to_live_channels_and_compress_keeps_what_the_gates_say() -> None:
    """The gate phase's decision step marks the replaced selection; compressing by the gates keeps
    the gates' own top channels, so the student is what the gated big student computes (I3)."""
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    _, big, info = _widened(PreNorm, x, "replace")
    gated = graphmerge.add_gates(big, seed=0)
    scores = _prenorm_scores(info)
    with torch.no_grad():
        for gid, values in scores.items():
            gated.gates.log_alpha[f"g{gid}"].copy_(values)
    hidden = _group(info, HIDDEN)
    marked = gated.decision_mask(gated.flat_log_alpha())
    start = gated.gates.offsets[hidden.id]
    assert marked[start:start + 2 * HIDDEN].tolist() == [False] * HIDDEN + [True] * HIDDEN
    assert gated.teacher_share()[hidden.id] == [4, 6]  # the gates' own top ten
    student = graphmerge.compress(gated.eval(), "gates")
    with torch.no_grad():
        assert torch.allclose(student(x), graphmerge.closed_gates_reference(gated)(x), atol=1e-6)


def test_an_unknown_policy_is_refused() -> None:
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    _, big, info = _widened(PreNorm, x, "sometimes")
    with pytest.raises(graphmerge.GraphMergeError, match="dead_channels must be one of replace, keep"):
        select_channels(info, _prenorm_scores(info))
    with pytest.raises(graphmerge.GraphMergeError, match="unknown dead_channels 'sometimes'"):
        MergeSettings(dead_channels="sometimes")


class _Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class PinnedInside(nn.Module):
    """4 -> A (7) -> P (6, pinned inside: a leaf module the analysis cannot read) -> B (5) -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.opaque = nn.Linear(4, 7), nn.Linear(7, 6), _Opaque()
        self.fc3, self.fc4 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc4(torch.relu(self.fc3(self.opaque(self.fc2(torch.relu(self.fc1(x)))))))


def test_a_group_pinned_inside_is_shared_by_every_teacher() -> None:
    """Widen averages the teachers into a pinned group, so teacher 1's B reads what teacher 0's A
    wrote: both stay, and in the student B's channels vary with the input."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    teachers = [PinnedInside().eval() for _ in range(2)]
    big = graphmerge.widen(teachers, (x,), leaf_modules=("opaque",))
    info = widen_info(big)[1]
    assert [g.width for g in info.groups.internal_pinned] == [6]
    a, b = _group(info, 7), _group(info, 5)
    scores = {a.id: torch.tensor([1.0] * 7 + [0.0] * 7), b.id: torch.tensor([0.0] * 5 + [1.0] * 5)}
    kept = select_channels(info, scores)
    assert kept[a.id].tolist() == list(range(7)) and kept[b.id].tolist() == list(range(5, 10))
    student = graphmerge.compress(big, scores)
    with torch.no_grad():
        hidden = student.fc3(student.opaque(student.fc2(torch.relu(student.fc1(x)))))
    assert float(hidden.std(0).min()) > 1e-3


def test_a_gpt2_student_by_magnitude_is_one_of_its_teachers_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    from graphmerge.alternatives import magnitude_scores

    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    teachers = []
    for seed in range(2):
        torch.manual_seed(seed)
        teachers.append(transformers.GPT2LMHeadModel(config).eval())
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    big = graphmerge.widen(teachers, (), example_kwargs={"input_ids": ids})
    scores = magnitude_scores(big)
    student = graphmerge.compress(big, scores)
    assert average_kept_teachers(student, big, teachers, scores) == {}  # a tied head keeps the teacher's scale
    with torch.no_grad():
        gaps = [float((student(input_ids=ids).logits - t(input_ids=ids).logits).abs().max()) for t in teachers]
    assert min(gaps) <= 1e-5 < max(gaps), gaps


def test_the_project_tiny_gpt_student_by_magnitude_is_one_of_its_teachers_exactly() -> None:
    """The chars benchmark's model (RMSNorm stream, rotary attention, untied head): the stream keeps
    one teacher's block, every other kept channel must be that teacher's, and the head its own."""
    from graphmerge.alternatives import magnitude_scores
    from graphmerge.examples.tiny_gpt import TinyGPT

    teachers = []
    for seed in range(2):
        torch.manual_seed(seed)
        teachers.append(TinyGPT(vocab_size=20, d_model=16, n_heads=2, n_layers=2, context=8).eval())
    ids = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(3))
    big = graphmerge.widen(teachers, (ids,))
    scores = magnitude_scores(big)
    student = graphmerge.compress(big, scores)
    average_kept_teachers(student, big, teachers, scores)
    with torch.no_grad():
        gaps = [float((student(ids) - t(ids)).abs().max()) for t in teachers]
    assert min(gaps) <= 1e-5 < max(gaps), gaps


class FilledInPlace(nn.Module):
    """``buf[:, :] = a`` then a layer reads ``buf``: the data reaches it through an in-place write."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fz, self.fb = nn.Linear(4, 6), nn.Linear(4, 7), nn.Linear(6, 5)
        self.gz, self.fo = nn.Linear(7, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(x.shape[0], 6)
        buf[:, :] = torch.relu(self.fa(x))
        return self.fo(torch.relu(self.fb(buf) + self.gz(torch.relu(self.fz(x)))))


def test_a_tensor_filled_in_place_carries_what_was_written() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    teachers = [FilledInPlace().eval() for _ in range(2)]
    big = graphmerge.widen(teachers, (x,))
    info = widen_info(big)[1]
    z, b = _group(info, 7), _group(info, 5)
    scores = {z.id: torch.tensor([1.0] * 7 + [0.0] * 7), b.id: torch.tensor([0.0] * 5 + [1.0] * 5)}
    info.dead_channels = "keep"
    kept = select_channels(info, scores)
    # teacher 1's fb reads buf, which holds relu(fa(x)): live; teacher 0's z writes only into teacher
    # 0's part of b, which is dropped: dead
    assert dead_teachers(info, kept) == {z.id: {0}}
    info.dead_channels = "replace"
    kept = select_channels(info, scores)
    assert kept[b.id].tolist() == list(range(5, 10)) and kept[z.id].tolist() == list(range(7, 14))
