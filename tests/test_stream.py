"""The streamed run behind the certificates (passes/stream.py): a captured graph run node by node in
float64 must compute what a float64 copy of the model computes, without copying the model, without
changing it, and holding one node's parameters at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from graphmerge.passes.ir import widen_info
from graphmerge.passes.stream import Meter, Streamed, flat_inputs, run_outputs
from torch import nn

import graphmerge

torch.set_num_threads(1)


def _captured(model: nn.Module, *inputs: torch.Tensor) -> Streamed:
    graph_module = graphmerge.analyze(model, inputs).graph_module
    return Streamed(graph_module, source_dtype=torch.float32)


def _float64_reference(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(*(x.double() for x in inputs))


class Stack(nn.Module):
    """Eight 512 x 512 layers (2 MB each in float64) on a residual stream, BatchNorm, an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 512)
        self.layers = nn.ModuleList(nn.Linear(512, 512) for _ in range(8))
        self.norm = nn.BatchNorm1d(512)
        self.out = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        for layer in self.layers:
            y = y + torch.relu(layer(y))
        return self.out(self.norm(y))


def _stack() -> nn.Module:
    torch.manual_seed(0)
    model = Stack().eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
    return model


def test_streamed_float64_run_equals_a_float64_copy_and_holds_one_layer_at_a_time() -> None:
    model = _stack()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meter = Meter()
    with torch.no_grad():
        (got,) = run_outputs(_captured(model, x), flat_inputs((x,), {}), torch.float64, meter)
    expected = _float64_reference(model, x)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model was changed"
    whole = sum(p.numel() for p in model.parameters()) * 8  # a float64 copy of the model
    layer = 512 * 512 * 8
    assert meter.peak >= layer, meter.peak  # it did hold a float64 weight
    assert meter.peak <= 3 * layer, f"held {meter.peak} bytes; a float64 copy is {whole}"


class TransposeOnce(nn.Module):
    """One transposed weight read by two products with another layer's (cast) weight in between: a
    cast buffer still viewed by the transpose must not be reused for the next weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(512, 512) / 20)
        self.v = nn.Parameter(torch.randn(512, 512) / 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self.w.t()
        y = torch.tanh(x @ wt)
        y = torch.tanh(y @ self.v)
        return y @ wt


def test_a_transposed_weight_survives_the_next_cast() -> None:
    torch.manual_seed(0)
    model = TransposeOnce().eval()
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (got,) = run_outputs(_captured(model, x), flat_inputs((x,), {}), torch.float64)
    expected = _float64_reference(model, x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


class Counting(nn.Module):
    """Writes into a buffer in forward, and casts with a dtype literal of its weight's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1.0)
        return self.a(x).to(self.a.weight.dtype) * self.calls


def test_an_op_writing_into_a_buffer_changes_neither_the_model_nor_the_result() -> None:
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    streamed = _captured(model, x)
    before = model.calls.clone()
    with torch.no_grad():
        (got,) = run_outputs(streamed, flat_inputs((x,), {}), torch.float64)
    assert torch.equal(model.calls, before), "the streamed run wrote into the model's buffer"
    with torch.no_grad():
        expected = (model.a.double()(x.double())) * (before.double() + 1)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=0, atol=1e-14)


def test_timings_report_the_certificates_and_their_working_set() -> None:
    """Two teachers of eight 512-wide layers: widen's and compress's certificates report seconds
    and a working set well below float64 copies of the models they compare."""
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(Stack().eval())
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    big = graphmerge.widen(teachers, x)
    student = graphmerge.compress(big, "teacher:1")
    timings = widen_info(big)[1].groups.timings
    for key in ("certify_i1_s", "certify_i2_s", "certify_s", "compress_s", "certify_i3_s"):
        assert timings[key] > 0, key
    big_copy = sum(t.numel() for t in big.state_dict().values()) * 8
    assert 0 < timings["certify_peak_mb"] * 2**20 < big_copy / 4, (timings["certify_peak_mb"], big_copy)
    certificate = graphmerge.api.student_certificate(student)
    assert certificate.skipped is None
    assert certificate.dtype == "float64" and certificate.max_error <= 1e-6 * certificate.scale
    assert 0 < certificate.peak_bytes < big_copy / 4


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmHWM:")[1].split()[0]) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def test_the_process_peak_memory_grows_by_a_layer_not_by_a_float64_copy() -> None:
    """Measured by the kernel (peak RSS, reset before the run), not by the run's own meter."""
    try:
        _reset_peak_rss()
    except OSError:
        pytest.fail("this test needs Linux's /proc/self/clear_refs to reset the peak RSS")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.Tanh()) for _ in range(8)]).eval()
    x = torch.randn(2, 2048, generator=torch.Generator().manual_seed(4))
    streamed = _captured(model, x)
    whole = sum(p.numel() for p in model.parameters()) * 8  # 268 MB: a float64 copy
    layer = 2048 * 2048 * 8
    _reset_peak_rss()
    start = _peak_rss_since_reset()
    with torch.no_grad():
        (got,) = run_outputs(streamed, flat_inputs((x,), {}), torch.float64)
    grown = _peak_rss_since_reset() - start
    assert grown < 3 * layer, f"peak RSS grew by {grown / 2**20:.0f} MB; a float64 copy is {whole / 2**20:.0f} MB"
    expected = _float64_reference(model, x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
