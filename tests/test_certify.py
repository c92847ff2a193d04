"""The certificate: widen checks I1 and compress checks I3 on the example inputs.

The models here are the silent failures found before the certificate existed (each returned a
wrong big student without a word): a dict output, a full-width slice after a cat (GhostNet), an
uneven ``chunk`` (EdgeNeXt). Each must now be exact, checked against the teachers' own outputs
computed here. A deliberately wrong op rule shows that what the rules get wrong is refused, with
the node and the source line named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphmerge.passes import registry
from graphmerge.passes.ir import widen_info
from graphmerge.passes.rules import elementwise
from torch import nn

import graphmerge
from tests.test_invariants import assert_close_scaled

torch.set_num_threads(1)


class DictOutput(nn.Module):
    """torchvision's segmentation models return {'out': logits}: the logits group is an output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.b(torch.relu(self.a(x)))}


class GhostSlice(nn.Module):
    """timm's GhostModule: ``cat([primary, cheap])[:, :out_chs]`` with out_chs the full width."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = nn.Conv2d(3, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        z = torch.cat([y, self.cheap(y)], 1)[:, :8]
        return self.head(torch.relu(z)).mean((2, 3))


class UnevenChunk(nn.Module):
    """EdgeNeXt: ``chunk(3, dim=1)`` of 7 channels gives 3, 3, 1; of 14, 5, 5, 4 (not 6, 6, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 7, 1)
        self.b = nn.Conv2d(7, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q, r = self.a(x).chunk(3, dim=1)
        return self.b(torch.cat([q, torch.relu(p), r * 2], 1)).mean((2, 3))


class ChannelFlip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.flip(torch.relu(self.a(x)), dims=(1,))).mean((2, 3))


def _teachers(cls: type[nn.Module], n: int = 2) -> list[nn.Module]:
    teachers = []
    for seed in range(n):
        torch.manual_seed(seed)
        teachers.append(cls().eval())
    return teachers


INPUTS = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)),)


def _output(value):
    return value["out"] if isinstance(value, dict) else value


@pytest.mark.parametrize("cls", [DictOutput, GhostSlice, UnevenChunk])
def test_former_silent_failures_are_exact(cls: type[nn.Module]) -> None:
    teachers = _teachers(cls)
    with torch.no_grad():
        expected = torch.stack([_output(t(*INPUTS)) for t in teachers]).mean(0)
        big = graphmerge.widen(teachers, INPUTS)
        assert_close_scaled(_output(big.eval()(*INPUTS)), expected, f"I1 on {cls.__name__}")
    certificate = widen_info(big)[1].certificates["I1"]
    assert certificate.dtype == "float64" and certificate.skipped is None
    assert certificate.max_error <= 1e-6 * certificate.scale
    student = graphmerge.compress(big, "teacher:1")
    with torch.no_grad():
        own = _output(teachers[1](*INPUTS))
        # the head holds teacher 1's weight / N and the mean bias (I2), so compare to that layer's math
        assert _output(student(*INPUTS)).shape == own.shape
    assert graphmerge.api.student_certificate(student).invariant == "I3"


def test_dict_output_keeps_the_logits_width() -> None:
    groups = graphmerge.analyze(DictOutput(), INPUTS)
    logits = [g for g in groups if "b.bias:0" in g.to_dict()["params"]]
    assert len(logits) == 1 and logits[0].pinned and logits[0].reason == "graph output"


def test_a_wrong_rule_is_refused_naming_the_node_and_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend flip were a per-channel op: on the big student it would swap the teachers' blocks."""
    monkeypatch.setitem(registry.RULES, torch.ops.aten.flip, registry.FunctionRule(elementwise.identity))
    teachers = _teachers(ChannelFlip)
    with pytest.raises(graphmerge.CertificateError) as caught:
        graphmerge.widen(teachers, INPUTS)
    message = str(caught.value)
    assert "does not compute the mean of the teachers" in message
    assert "flip" in message and "test_certify.py" in message, message
    assert "verify=False" in message


def test_verify_false_skips_the_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.RULES, torch.ops.aten.flip, registry.FunctionRule(elementwise.identity))
    big = graphmerge.widen(_teachers(ChannelFlip), INPUTS, verify=False)
    assert "I1" not in widen_info(big)[1].certificates
    assert "certify_s" not in widen_info(big)[1].groups.timings


def test_certificate_time_is_reported() -> None:
    big = graphmerge.widen(_teachers(UnevenChunk), INPUTS)
    timings = widen_info(big)[1].groups.timings
    assert timings["certify_s"] > 0
    assert widen_info(big)[1].certificates["I1"].to_dict()["relative_error"] <= 1e-6


def test_compress_certificate_catches_a_wrong_student(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break compress's gather (keep the wrong rows of one tensor): I3 must refuse the student."""
    from graphmerge.passes import compress as compress_module

    original = compress_module._gather_state

    def wrong_gather(*args, **kwargs):
        state = original(*args, **kwargs)
        state["a.weight"] = state["a.weight"].flip(0)
        return state

    big = graphmerge.widen(_teachers(UnevenChunk), INPUTS)  # before the break: widen's I2 would catch it first
    monkeypatch.setattr(compress_module, "_gather_state", wrong_gather)
    gated = graphmerge.add_gates(big, seed=0)
    with pytest.raises(graphmerge.CertificateError, match="invariant I3"):
        graphmerge.compress(gated, "gates")
    assert graphmerge.compress(gated, "gates", verify=False) is not None


def test_a_big_student_that_crashes_is_refused_naming_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the chunk rewrite the big student splits 14 channels as 5, 5, 4; the error names the chunk."""
    monkeypatch.setattr(registry.RULES[torch.ops.aten.chunk], "_rewrite", None)
    with pytest.raises(graphmerge.CertificateError, match="does not compute the mean") as caught:
        graphmerge.widen(_teachers(UnevenChunk), INPUTS)
    assert "chunk" in str(caught.value) and "test_certify.py" in str(caught.value), str(caught.value)


class Crashing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return self.b(y.view(y.shape[0], 6, -1).view(y.shape[0], 6, 6, 6)).mean((2, 3))


def test_a_big_student_that_fails_to_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A view whose literal sizes widen forgets to rewrite: the big student cannot run at all."""
    monkeypatch.setattr(registry.RULES[torch.ops.aten.view], "_rewrite", None)
    with pytest.raises(graphmerge.CertificateError, match="fails to run") as caught:
        graphmerge.widen(_teachers(Crashing), INPUTS)
    assert "view" in str(caught.value) and "test_certify.py" in str(caught.value), str(caught.value)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_recovery_certificate_catches_a_wrong_teacher_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap the teachers' blocks in every widened dim as widen lays them out: the big student is a
    consistent relabelling (I1 still holds, checked here), but 'teacher:0' now selects teacher 1's
    channels. Only I2 sees that, and widen must refuse."""
    from graphmerge.passes import widen as widen_module

    teachers = _teachers(TwoLayer)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    certified = graphmerge.widen(teachers, x)
    i2 = widen_info(certified)[1].certificates["I2"]
    assert i2.max_error == 0.0 and i2.skipped is None
    original = widen_module.teacher_maps

    def swapped(dim, n, widths, widened):
        size, maps = original(dim, n, widths, widened)
        return size, maps[::-1] if np.isin(dim.group, list(widened)).any() else maps

    monkeypatch.setattr(widen_module, "teacher_maps", swapped)
    relabelled = graphmerge.widen(teachers, x, verify=False)
    with torch.no_grad():
        mean = (teachers[0](x) + teachers[1](x)) / 2
        assert_close_scaled(relabelled(x), mean, "the relabelled big student is still the mean (I1)")
    with pytest.raises(graphmerge.CertificateError, match=r"invariant I2.*a\.weight \(teacher 0\)"):
        graphmerge.widen(teachers, x)
