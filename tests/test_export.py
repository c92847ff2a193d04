"""passes/export.py and the export CLI: ONNX files that onnxruntime runs like torch does."""

from __future__ import annotations

import os
import pathlib
import warnings

import graphmerge.passes.onnx_checks as onnx_checks
import graphmerge.passes.onnx_exporters as onnx_exporters
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graphmerge.passes.export import ExportResult, export_onnx, export_onnx_report
from torch import nn

from graphmerge.errors import GraphMergeError


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class LiteralBatch(ConvNet):
    """Writes the example batch size into a view: the classic dynamic-batch breaker."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).view(2, -1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), torch.tanh(self.a(x))


class ExportDiverges(nn.Module):
    """Computes something else while being exported: the ONNX file cannot match eager torch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + 1.0 if torch.compiler.is_exporting() else y


class Unsupported(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.airy_ai(x)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))


def _bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running stats so that eval-mode BatchNorm is not the identity."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _ort_run(path: pathlib.Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})


def _only(tmp_path: pathlib.Path) -> list[str]:
    """Everything in the directory, hidden temp dirs included: a failed export must leave nothing."""
    return sorted(os.listdir(tmp_path))


def test_convnet_dynamic_batch_matches_independent_torch_forward(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = _bn_stats(ConvNet())
    out = export_onnx(model, (torch.randn(2, 3, 8, 8),), tmp_path / "conv.onnx")
    assert out == (tmp_path / "conv.onnx").absolute()
    x = torch.randn(5, 3, 8, 8)  # a batch size the export never saw
    (got,) = _ort_run(out, x)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert _only(tmp_path) == ["conv.onnx"]  # self-contained: no .data side file


def test_mlp_batch_one_example_is_repeated_and_stays_dynamic(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(1)
    model = mlp().eval()
    report = export_onnx_report(model, torch.randn(1, 10), tmp_path / "mlp.onnx")
    assert isinstance(report, ExportResult)
    assert report.exporter == "dynamo"
    assert [p.batch for p in report.parity] == [2, 3]
    assert report.max_rel <= 1e-4
    assert report.size_bytes == (tmp_path / "mlp.onnx").stat().st_size
    proto = onnx.load(str(report.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert report.opset == next(o.version for o in proto.opset_import if o.domain == "")
    x = torch.randn(7, 10)
    (got,) = _ort_run(report.path, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_several_tensor_inputs_and_tuple_outputs(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(2)
    model = TwoInputs().eval()
    path = export_onnx(model, (torch.randn(3, 4), torch.randn(3, 6)), tmp_path / "two.onnx")
    x, y = torch.randn(4, 4), torch.randn(4, 6)
    got = _ort_run(path, x, y)
    with torch.no_grad():
        want = model(x, y)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


def test_fx_graph_module_exports(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(3)
    gm = torch.fx.symbolic_trace(_bn_stats(ConvNet()))
    path = export_onnx(gm, torch.randn(2, 3, 8, 8), tmp_path / "gm.onnx")
    x = torch.randn(3, 3, 8, 8)
    (got,) = _ort_run(path, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, gm(x).numpy(), rtol=1e-4, atol=1e-5)


def test_training_flags_are_restored(tmp_path: pathlib.Path) -> None:
    model = ConvNet().train()
    model.bn.eval()
    export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert model.training and model.conv.training and not model.bn.training


def test_literal_batch_in_reshape_is_reported(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GraphMergeError, match=r"literal batch size.*flatten\(1\).*dynamic_batch=False"):
        export_onnx(_bn_stats(LiteralBatch()), torch.randn(2, 3, 8, 8), tmp_path / "lit.onnx")
    assert _only(tmp_path) == []


def test_literal_batch_exports_with_dynamic_batch_off(tmp_path: pathlib.Path) -> None:
    model = _bn_stats(LiteralBatch())
    x = torch.randn(2, 3, 8, 8)
    report = export_onnx_report(model, x, tmp_path / "lit.onnx", dynamic_batch=False)
    assert [p.batch for p in report.parity] == [2]
    (got,) = _ort_run(report.path, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_missing_directory_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GraphMergeError, match="does not exist"):
        export_onnx(mlp(), torch.randn(2, 10), tmp_path / "no" / "such" / "m.onnx")
    assert _only(tmp_path) == []


def test_parent_that_is_a_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(GraphMergeError, match="not a directory"):
        export_onnx(mlp(), torch.randn(2, 10), tmp_path / "f" / "m.onnx")
    with pytest.raises(GraphMergeError, match="is a directory"):
        export_onnx(mlp(), torch.randn(2, 10), tmp_path)
    assert _only(tmp_path) == ["f"]


def test_parity_failure_reports_numbers_and_leaves_no_file(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "bad.onnx"
    target.write_bytes(b"previous good file")  # an earlier export must survive a failed one
    # max rel is max abs / max(1, max |torch output|): below 1 when the random input's output exceeds 1
    with pytest.raises(GraphMergeError, match=r"batch 2: max abs 1, max rel (1|0\.\d+).*batch 3: max abs 1"):
        export_onnx(ExportDiverges(), torch.randn(2, 4), target)
    assert _only(tmp_path) == ["bad.onnx"]
    assert target.read_bytes() == b"previous good file"


def test_parity_failure_at_second_batch_only(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrupt what onnxruntime returns at the second batch size: the check must still fire."""
    real = onnx_checks._run_ort

    def corrupt(session, feed, batch):
        out = real(session, feed, batch)
        return [o + 0.5 for o in out] if batch == 3 else out

    monkeypatch.setattr(onnx_checks, "_run_ort", corrupt)
    with pytest.raises(GraphMergeError, match=r"batch 3: max abs 0.5"):
        export_onnx(mlp(), torch.randn(2, 10), tmp_path / "m.onnx")
    assert _only(tmp_path) == []


def test_check_false_skips_parity(tmp_path: pathlib.Path) -> None:
    report = export_onnx_report(ExportDiverges(), torch.randn(2, 4), tmp_path / "m.onnx", check=False)
    assert report.parity == [] and report.path.exists()


def test_unsupported_op_names_the_op_and_leaves_no_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GraphMergeError, match="special_airy_ai"):
        export_onnx(Unsupported(), torch.randn(2, 4), tmp_path / "u.onnx")
    assert _only(tmp_path) == []


def test_fallback_to_torchscript_warns_and_is_recorded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(onnx_exporters, "_export_dynamo", broken)
    model = _bn_stats(ConvNet())
    with pytest.warns(UserWarning, match="TorchScript exporter"):
        report = export_onnx_report(model, torch.randn(2, 3, 8, 8), tmp_path / "ts.onnx")
    assert report.exporter == "torchscript"
    assert "simulated torch.export failure" in report.warnings[0]
    x = torch.randn(4, 3, 8, 8)
    (got,) = _ort_run(report.path, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_non_tensor_inputs_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GraphMergeError, match="not a tensor"):
        export_onnx(mlp(), (torch.randn(2, 10), 3), tmp_path / "m.onnx")


def test_parity_error_is_relative_to_output_scale() -> None:
    ref = [torch.tensor([100.0, 0.0])]
    max_abs, max_rel = onnx_checks.parity_error(ref, [np.array([101.0, 0.5])])
    assert max_abs == pytest.approx(1.0) and max_rel == pytest.approx(0.01)
    max_abs, max_rel = onnx_checks.parity_error([torch.tensor([0.1])], [np.array([0.3])])
    assert max_abs == pytest.approx(0.2) and max_rel == pytest.approx(0.2)  # scale floor 1


def test_gated_and_plain_big_students_export_with_the_recommended_exporter(tmp_path: pathlib.Path) -> None:
    """GatedStudent.forward takes ``*args``: dynamic shapes must still fit (no TorchScript fallback)."""
    import graphmerge

    teachers = [_bn_stats(ConvNet()).eval() for _ in range(2)]
    x = torch.randn(2, 3, 8, 8)
    big = graphmerge.widen(teachers, (x,))
    gated = graphmerge.add_gates(big).eval()
    for name, model in (("big", big), ("gated", gated)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would warn
            report = export_onnx_report(model, x, tmp_path / f"{name}.onnx")
        assert report.exporter == "dynamo"
        x3 = torch.randn(3, 3, 8, 8)
        (got,) = _ort_run(report.path, x3)
        with torch.no_grad():
            want = model(x3).numpy()
            mean = torch.stack([t(x3) for t in teachers]).mean(0).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        if name == "big":  # I1 survives the export: the ONNX big student is the teachers' mean
            np.testing.assert_allclose(got, mean, rtol=1e-4, atol=1e-5)


def _zoo_cases() -> list[tuple[str, tuple]]:
    """Three representative models by default; every torchvision classifier with GRAPHMERGE_FULL_ZOO=1."""
    if os.environ.get("GRAPHMERGE_FULL_ZOO") != "1":
        return [("resnet18", (2, 3, 64, 64)), ("mobilenet_v2", (2, 3, 64, 64)), ("squeezenet1_0", (2, 3, 64, 64))]
    from tests.zoo_models import ALL_MODELS, INPUT_SIZE

    return [(name, (2, 3, INPUT_SIZE.get(name, 64), INPUT_SIZE.get(name, 64))) for name in ALL_MODELS]


ZOO = _zoo_cases()


@pytest.mark.zoo
@pytest.mark.parametrize(("name", "shape"), ZOO, ids=[n for n, _ in ZOO])
def test_torchvision_models_export_with_parity(tmp_path: pathlib.Path, name: str, shape: tuple) -> None:
    torchvision = pytest.importorskip("torchvision")
    from tests.zoo_models import skip_above_param_cap

    torch.manual_seed(0)
    model = _bn_stats(torchvision.models.get_model(name, weights=None))
    skip_above_param_cap(name, model)
    report = export_onnx_report(model, torch.randn(*shape), tmp_path / f"{name}.onnx")
    assert report.max_rel <= 1e-4
    x = torch.randn(3, *shape[1:])
    (got,) = _ort_run(report.path, x)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))) <= 1e-4


# --------------------------------------------------------------------------------------------
# graphmerge/checkpoint.py's weights reader (export --weights) and the export command
# --------------------------------------------------------------------------------------------


def test_load_weights_safetensors_and_pt(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import save_file

    from graphmerge.checkpoint import load_weights

    src = _bn_stats(ConvNet())
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        dst = ConvNet()
        load_weights(dst, tmp_path / name)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (name, k)


def test_load_weights_names_first_mismatching_key(tmp_path: pathlib.Path) -> None:
    from safetensors.torch import save_file

    from graphmerge.checkpoint import load_weights

    state = ConvNet().state_dict()
    state["fc.weight"] = torch.zeros(5, 7)
    del state["conv.bias"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    expected = r"'fc.weight' has shape \(5, 7\) in the checkpoint but \(5, 512\) in the model.*'conv.bias'"
    with pytest.raises(GraphMergeError, match=expected):
        load_weights(ConvNet(), tmp_path / "bad.safetensors")


def test_load_weights_refuses_arbitrary_pickles(tmp_path: pathlib.Path) -> None:
    from graphmerge.checkpoint import load_weights

    torch.save({"model": ConvNet()}, tmp_path / "whole_model.pt")  # a pickled module, not a state dict
    with pytest.raises(GraphMergeError, match="weights_only=True"):
        load_weights(ConvNet(), tmp_path / "whole_model.pt")
    with pytest.raises(GraphMergeError, match="does not exist"):
        load_weights(ConvNet(), tmp_path / "missing.safetensors")


def test_export_command_end_to_end(tmp_path: pathlib.Path) -> None:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from graphmerge.cli_export import export_command

    app = typer.Typer()
    app.command("export")(export_command)
    app.command("other")(lambda: None)  # two commands: the subcommand name is required
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))\n"
        "def example_inputs():\n    return (torch.randn(2, 6),)\n"
    )
    out = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, ["export", str(tmp_path / "net.py"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "parity vs torch at batch 3" in result.output
    assert out.exists()
