"""The invariants I1-I4 of DESIGN.md, on the hand-built models and on random architectures.

Every expected value is computed independently of the compiler: I1 against the mean of the
teachers' own outputs, I2 against the teachers' own tensors (the averaging head: teacher K's
weight / N and the mean of the teachers' biases, computed here), I3 against the gated big
student's own forward, I4 by loading into a fresh instance of the teacher's class.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from graphmerge.passes.ir import GroupSet
from graphmerge.passes.liveness import dead_teachers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphmerge
from graphmerge.pipeline import certify_pipeline
from tests.models import CASES, ModelCase, clone_for_loading, make_teachers
from tests.randarch import CLASSES, build, example_inputs, specs, unsupported_patterns

torch.set_num_threads(1)  # two xdist workers on two cores; tiny convs crawl with 2 threads each

CASE_LIST = list(CASES.values())
CASE_IDS = [c.name for c in CASE_LIST]
THREE_TEACHERS = ["mlp", "lenet", "densenet_block", "channel_split", "grouped_conv", "channel_shuffle"]

# Models on which an invariant cannot hold, and why. Everything else must satisfy all four.
I1_EXCEPTIONS: dict[str, str] = {}
# The student's last layer averages the teachers before the ReLU that follows it, the big student
# after it (an averaged output): compress's I3 certificate is skipped with this reason.
I3_SKIPPED = {"nonlinear_head": "non-linear op"}
I3_EXCEPTIONS = {
    "convnext_block": "LayerNorm across the widened stream group: dropping channels changes the "
                      "mean and variance the kept channels are normalised with",
}


# -- independent references --------------------------------------------------------------------


@torch.no_grad()
def mean_of_teachers(teachers: list[nn.Module], inputs: tuple) -> torch.Tensor:
    return torch.stack([t(*inputs) for t in teachers]).mean(0)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """max |actual - expected| <= 1e-4 * max(1, max |expected|)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= 1e-4 * scale, f"{what}: max abs error {error:.3g} > 1e-4 x {scale:.3g}"


def output_layer_name(model: nn.Module, inputs: tuple) -> str:
    """The last Conv/Linear the forward pass runs: the layer writing the logits."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1]


def expected_student_state(teachers: list[nn.Module], k: int, head: str) -> dict[str, torch.Tensor]:
    """I2: teacher k's tensors; the head holds teacher k's weight / N and the mean teacher bias."""
    n = len(teachers)
    expected = dict(teachers[k].state_dict())
    expected[f"{head}.weight"] = teachers[k].state_dict()[f"{head}.weight"] / n
    if f"{head}.bias" in expected:
        # The correctly rounded mean (float64, then float32): a float32 mean of N > 2 values depends
        # on the summation order, so it is not one well-defined tensor to compare bitwise with.
        biases = [t.state_dict()[f"{head}.bias"] for t in teachers]
        expected[f"{head}.bias"] = torch.stack([b.double() for b in biases]).mean(0).to(biases[0].dtype)
    return expected


def teacher_masks(groups: GroupSet, n: int, k: int) -> dict[int, torch.Tensor]:
    """Per widened group, open exactly teacher k's block of channels."""
    masks = {}
    for group in groups.gated:
        mask = torch.zeros(n * group.width, dtype=torch.bool)
        mask[k * group.width:(k + 1) * group.width] = True
        masks[group.id] = mask
    return masks


def random_masks(groups: GroupSet, n: int, rng: np.random.Generator) -> dict[int, torch.Tensor]:
    """Per widened group, exactly ``width`` of the N x width big channels open, in whole selection
    units, drawn across teachers (teacher-major layout: teacher t owns [t*width, (t+1)*width))."""
    masks = {}
    for group in groups.gated:
        units = group.width // group.unit
        chosen = rng.choice(n * units, size=units, replace=False)
        if units > 1 and len(set((chosen // units).tolist())) == 1:  # make sure teachers are mixed
            chosen[0] = (chosen[0] + units) % (n * units)
            while len(set(chosen.tolist())) < units:
                chosen[0] = (chosen[0] + 1) % (n * units)
        mask = torch.zeros(n * group.width, dtype=torch.bool)
        for unit in chosen.tolist():
            mask[unit * group.unit:(unit + 1) * group.unit] = True
        masks[group.id] = mask
    return masks


# -- the invariant checks ----------------------------------------------------------------------


@torch.no_grad()
def check_i1(teachers: list[nn.Module], big: nn.Module, inputs: tuple) -> None:
    expected = mean_of_teachers(teachers, inputs)
    assert_close_scaled(big.eval()(*inputs), expected, "I1 big(x) vs mean_t teacher_t(x)")


def check_i2(teachers: list[nn.Module], big: nn.Module, head: str) -> None:
    for k in range(len(teachers)):
        student = graphmerge.compress(big, f"teacher:{k}")
        got = student.state_dict()
        expected = expected_student_state(teachers, k, head)
        assert list(got) == list(expected), f"I2 teacher:{k}: state_dict keys differ"
        differing = [name for name in expected if not torch.equal(got[name], expected[name])]
        assert not differing, f"I2 teacher:{k}: not bitwise equal: {differing}"


@torch.no_grad()
def check_i3(big: nn.Module, groups: GroupSet, n: int, inputs: tuple, seed: int,
             mixed: bool = True) -> None:
    """``mixed=False`` opens one teacher's block in every group (seed picks the teacher)."""
    if mixed:
        masks = random_masks(groups, n, np.random.default_rng(seed))
    else:
        masks = teacher_masks(groups, n, seed % n)
    gated = graphmerge.add_gates(big)
    gated.set_gates(masks)
    expected = gated.eval()(*inputs)
    student = graphmerge.compress(gated, "gates")
    assert_close_scaled(student.eval()(*inputs), expected, "I3 compress(gated)(x) vs gated(x)")
    info = graphmerge.widen_info(big)[1]
    info.dead_channels = "keep"  # the masks as given: scores alone would swap channels no path uses
    try:
        by_scores = graphmerge.compress(big, {gid: mask.float() for gid, mask in masks.items()})
    finally:
        info.dead_channels = "replace"
    assert_close_scaled(by_scores.eval()(*inputs), expected, "I3 compress(big, scores)(x) vs gated(x)")
    # by default the same scores swap channels no path uses for live ones: compress certifies the
    # swapped selection against its own closed-gates reference (CertificateError otherwise), and a
    # swap happens only where the masks kept a dead channel
    swapped = graphmerge.kept_channels(big, {gid: mask.float() for gid, mask in masks.items()})
    graphmerge.compress(big, {gid: mask.float() for gid, mask in masks.items()})
    dead = dead_teachers(info, {gid: np.flatnonzero(mask.numpy()) for gid, mask in masks.items()})
    changed = {gid for gid, k in swapped.items() if k.tolist() != np.flatnonzero(masks[gid].numpy()).tolist()}
    assert changed <= set(dead), f"groups {sorted(changed - set(dead))} changed without a dead channel"


@torch.no_grad()
def check_i4(student: nn.Module, teacher: nn.Module, inputs: tuple) -> None:
    assert isinstance(student, type(teacher)), f"I4: student is a {type(student).__name__}"
    fresh = clone_for_loading(teacher)
    fresh.load_state_dict(student.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(*inputs), student.eval()(*inputs)), "I4: reloaded student differs"


def check_pipeline(teachers: list[nn.Module], big: nn.Module, inputs: tuple, kwargs: dict | None = None,
                   batch_sizes: tuple[int, int] = (3, 1), onnx_path: Any = None) -> Any:
    """The whole merge at toy scale (graphmerge.pipeline): gates in train mode at another batch size, each
    sample gated by its own realisation (checked against each sample run alone), every group decided at
    1/N open, compress by the gates (I3 unless skipped with a reason), a strict reload and a forward at a
    third batch size."""
    report = certify_pipeline(teachers, inputs, example_kwargs=kwargs, big=big, batch_sizes=batch_sizes,
                              onnx_path=onnx_path)
    n = len(teachers)
    assert report.sample_skipped is None, report.sample_skipped
    assert report.sample_error <= 1e-4, f"gates follow samples: {report.sample_error:.3g}"
    for gid, fraction in report.open_fraction.items():
        assert abs(fraction - 1 / n) <= 1e-3, f"group {gid} is {fraction:.4f} open after decide, not 1/{n}"
    i3 = report.certificates["I3"]
    assert i3.skipped or i3.relative_error <= i3.tolerance, i3
    assert type(report.student) is type(teachers[0])
    return report


def teachers_for(case: ModelCase, n: int, seed: int = 0) -> list[nn.Module]:
    return make_teachers(case.build, n, seed)


# -- hand-built models -------------------------------------------------------------------------


def n_values(case: ModelCase) -> list[int]:
    return [2, 3] if case.name in THREE_TEACHERS else [2]


CASE_N = [(case, n) for case in CASE_LIST for n in n_values(case)]
CASE_N_IDS = [f"{case.name}-N{n}" for case, n in CASE_N]


@pytest.mark.parametrize(("case", "n"), CASE_N, ids=CASE_N_IDS)
def test_i1_function_preservation(case: ModelCase, n: int) -> None:
    teachers = teachers_for(case, n)
    inputs = case.example_inputs()
    if case.name in I1_EXCEPTIONS:
        reasons = [g.reason for g in graphmerge.analyze(teachers[0], inputs).internal_pinned]
        assert any(I1_EXCEPTIONS[case.name] in r for r in reasons), reasons
        return
    check_i1(teachers, graphmerge.widen(teachers, inputs), inputs)


@pytest.mark.parametrize(("case", "n"), CASE_N, ids=CASE_N_IDS)
def test_i2_recovery_is_bitwise(case: ModelCase, n: int) -> None:
    teachers = teachers_for(case, n)
    assert output_layer_name(teachers[0], case.example_inputs()) == case.head
    check_i2(teachers, graphmerge.widen(teachers, case.example_inputs()), case.head)


@pytest.mark.parametrize(("case", "n"), CASE_N, ids=CASE_N_IDS)
def test_i3_exact_compression(case: ModelCase, n: int) -> None:
    """Random masks mixing teachers; on an I3 exception only masks keeping one teacher's block
    in every group (the normalisation then sees the same channels in both models)."""
    teachers = teachers_for(case, n)
    inputs = case.example_inputs()
    groups = graphmerge.analyze(teachers[0], inputs)
    big = graphmerge.widen(teachers, inputs)
    if case.name in I3_SKIPPED:
        student = graphmerge.compress(graphmerge.add_gates(big), "gates")
        assert I3_SKIPPED[case.name] in (graphmerge.api.student_certificate(student).skipped or "")
        return
    for seed in range(3):
        check_i3(big, groups, n, inputs, seed, mixed=case.name not in I3_EXCEPTIONS)


@pytest.mark.parametrize(("case", "n"), CASE_N, ids=CASE_N_IDS)
def test_i4_class_round_trip(case: ModelCase, n: int) -> None:
    teachers = teachers_for(case, n)
    inputs = case.example_inputs()
    groups = graphmerge.analyze(teachers[0], inputs)
    big = graphmerge.widen(teachers, inputs)
    check_i4(graphmerge.compress(big, f"teacher:{n - 1}"), teachers[0], inputs)
    masks = random_masks(groups, n, np.random.default_rng(0))
    check_i4(graphmerge.compress(big, {gid: m.float() for gid, m in masks.items()}), teachers[0], inputs)
    gated = graphmerge.add_gates(big)
    gated.set_gates(masks)
    check_i4(graphmerge.compress(gated, "gates"), teachers[0], inputs)


def test_passes_do_not_mutate_their_inputs() -> None:
    case = CASES["densenet_block"]
    teachers = teachers_for(case, 2)
    before = [copy.deepcopy(t.state_dict()) for t in teachers]
    big = graphmerge.widen(teachers, case.example_inputs())
    big_before = copy.deepcopy(big.state_dict())
    graphmerge.compress(big, "teacher:0")
    graphmerge.add_gates(big)
    for teacher, state in zip(teachers, before, strict=True):
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())
        assert not teacher.training
    assert all(torch.equal(big.state_dict()[k], v) for k, v in big_before.items())


def test_scores_keep_the_top_width_ties_by_index() -> None:
    """Scores that rank teacher 1 first (all others tied at 0) recover teacher 1, as teacher:1 does;
    all-equal scores keep the lowest indices: teacher 0's block."""
    case = CASES["lenet"]
    teachers = teachers_for(case, 2)
    inputs = case.example_inputs()
    groups = graphmerge.analyze(teachers[0], inputs)
    big = graphmerge.widen(teachers, inputs)
    prefer_1 = {g.id: torch.cat([torch.zeros(g.width), torch.ones(g.width)]) for g in groups.widened}
    tied = {g.id: torch.zeros(2 * g.width) for g in groups.widened}
    for scores, k in ((prefer_1, 1), (tied, 0)):
        got = graphmerge.compress(big, scores).state_dict()
        expected = expected_student_state(teachers, k, case.head)
        assert [n for n in expected if not torch.equal(got[n], expected[n])] == []


# -- random architectures ----------------------------------------------------------------------


@settings(deadline=None)
@given(spec=specs(), n=st.sampled_from([2, 2, 3]), seed=st.integers(0, 2**16),
       batches=st.tuples(st.integers(2, 6), st.integers(1, 6)))
def test_random_architectures_satisfy_the_invariants(spec, n: int, seed: int, batches: tuple[int, int]) -> None:
    """All four invariants, unless the analysis pins inside the network; that is allowed only for
    the patterns ``randarch.unsupported_patterns`` lists (then I1 cannot hold)."""
    teachers = make_teachers(lambda: build(spec), n, seed)
    inputs = example_inputs()
    assert teachers[0](*inputs).shape == (inputs[0].shape[0], CLASSES)
    groups = graphmerge.analyze(teachers[0], inputs)
    if groups.internal_pinned:
        assert all(g.reason for g in groups.internal_pinned)
        patterns = unsupported_patterns(spec)
        assert patterns, f"pinned inside for no known reason: {[g.reason for g in groups.internal_pinned]}"
        return  # I1 cannot hold with groups pinned inside; only these listed patterns may pin
    try:
        big = graphmerge.widen(teachers, inputs, groups=groups)
    except graphmerge.GraphMergeError as error:  # refused with an explanation: only for listed patterns
        assert unsupported_patterns(spec), f"widen refused a supported architecture: {error}"
        assert "cannot lay out" in str(error)
        return
    check_i1(teachers, big, inputs)
    check_i2(teachers, big, output_layer_name(teachers[0], inputs))
    check_i3(big, groups, n, inputs, seed)
    check_i4(graphmerge.compress(big, "teacher:0"), teachers[0], inputs)
    check_pipeline(teachers, big, inputs, batch_sizes=batches)
