"""graphmerge/bench.py and benchmarks/onnx_latency.py: rows, files and parity, never timings."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import graphmerge.bench as bench
from graphmerge.errors import GraphMergeError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    wide = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(2, 8)
    return {"small": (small, (x,)), "wide": (wide, (x,))}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return bench.benchmark(_models(), batches=(1, 4), warmup=1, min_time=0.0, min_iters=3)


def test_rows_have_documented_fields_and_positive_latencies(rows: list[dict]) -> None:
    assert len(rows) == 2 * 2 * 2  # models x runtimes (onnxruntime, torch) x batches
    assert {(r["model"], r["runtime"], r["batch"]) for r in rows} == {
        (m, rt, b) for m in ("small", "wide") for rt in ("onnxruntime", "torch") for b in (1, 4)
    }
    for r in rows:
        assert list(r) == list(bench.ROW_FIELDS)
        assert r["status"] == "ok" and r["device"] == "cpu"
        assert r["iters"] >= 3
        assert 0 < r["p50_ms"] <= r["p90_ms"]
        assert r["throughput"] == pytest.approx(r["batch"] / (r["p50_ms"] / 1e3))


def test_parameters_flops_and_sizes_match_independent_counts(rows: list[dict]) -> None:
    by_model = {r["model"]: r for r in rows}
    assert by_model["small"]["params"] == 8 * 16 + 16 + 16 * 3 + 3
    assert by_model["wide"]["params"] == 8 * 32 + 32 + 32 * 3 + 3
    assert by_model["small"]["flops_per_sample"] == 2 * (8 * 16 + 16 * 3)  # multiply-add = 2 FLOPs
    assert by_model["small"]["onnx_bytes"] > 4 * by_model["small"]["params"]  # float32 weights inside
    assert by_model["small"]["exporter"] == "dynamo"


def test_parity_is_small_and_ratio_uses_first_model(rows: list[dict]) -> None:
    for r in rows:
        assert r["parity_max_rel"] is not None and r["parity_max_rel"] < 1e-4
        if r["model"] == "small":
            assert r["ratio"] == pytest.approx(1.0)
        else:
            same = [x for x in rows if (x["runtime"], x["batch"]) == (r["runtime"], r["batch"])]
            ref = next(x for x in same if x["model"] == "small")
            assert r["ratio"] == pytest.approx(r["p50_ms"] / ref["p50_ms"])


def test_json_and_markdown_are_written(rows: list[dict], tmp_path: pathlib.Path) -> None:
    machine = bench.machine_info()
    assert machine["torch_threads"] >= 1 and machine["providers_used"] == ["CPUExecutionProvider"]
    bench.write_json(tmp_path / "b.json", rows, machine, extra={"note": "x"})
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["machine"]["onnxruntime"] == machine["onnxruntime"]
    assert doc["note"] == "x" and doc["fields"] == list(bench.ROW_FIELDS) and len(doc["rows"]) == len(rows)
    bench.write_markdown(tmp_path / "b.md", rows, machine)
    lines = (tmp_path / "b.md").read_text().splitlines()
    assert lines[0].startswith("| model |") and sum(line.startswith("| small ") for line in lines) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md"]
    with pytest.raises(GraphMergeError, match="does not exist"):
        bench.write_json(tmp_path / "nope" / "b.json", rows, machine)


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(GraphMergeError, match="onnxruntime-gpu"):
        bench.resolve_providers(["cuda"])
    assert bench.resolve_providers(["auto"]) == ["cpu"]
    with pytest.raises(GraphMergeError, match="unknown provider"):
        bench.resolve_providers(["tpu"])


def test_export_failure_marks_onnx_rows_na_and_keeps_torch_rows() -> None:
    class Unsupported(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.airy_ai(x)

    rows = bench.benchmark(
        {"bad": (Unsupported(), (torch.randn(2, 4),))}, batches=(2,), warmup=0, min_time=0.0, min_iters=2
    )
    status = {r["runtime"]: r["status"] for r in rows}
    assert status["onnxruntime"].startswith("n/a: export failed")
    assert "special_airy_ai" in status["onnxruntime"]
    assert status["torch"] == "ok"


def test_bench_command_parses_model_args() -> None:
    from graphmerge.cli_export import parse_ints, parse_model_arg

    assert parse_model_arg("examples:mlp") == ("examples:mlp", None)
    assert parse_model_arg("m.py:Net=w=1.safetensors") == ("m.py:Net", pathlib.Path("w=1.safetensors"))
    assert parse_ints("1,8,32", "--batch") == (1, 8, 32)
    with pytest.raises(GraphMergeError, match="--batch"):
        parse_ints("1,0", "--batch")
    with pytest.raises(GraphMergeError, match="names no weights"):
        parse_model_arg("examples:mlp=")


@pytest.mark.slow
def test_quick_script_writes_json_and_markdown(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "lat.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "onnx_latency.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    assert {r["family"] for r in doc["rows"]} == {"resnet20", "mlp"}
    assert {r["model"].split(" ", 1)[1] for r in doc["rows"]} == {"teacher", "student", "big student"}
    assert all(r["status"] == "ok" and r["p50_ms"] > 0 for r in doc["rows"])
    assert all(r["parity_max_rel"] < 1e-3 for r in doc["rows"])
    assert doc["summary"] and set(doc["big_student"]) == {"resnet20", "mlp"}
    assert all(how.startswith("graphmerge.widen") for how in doc["big_student"].values())
    assert (tmp_path / "lat.md").read_text().startswith("| model |")


def test_a_cuda_session_that_falls_back_to_cpu_is_not_reported_as_cuda(tmp_path: pathlib.Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime quietly runs on CPU when CUDA cannot start: the cell must say n/a, not time it."""
    import onnxruntime as ort
    from graphmerge.passes.export import export_onnx

    model, inputs = _models()["small"]
    path = export_onnx(model.eval(), inputs, tmp_path / "small.onnx")
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda p, o, providers: real_session(p, o, providers=["CPUExecutionProvider"]))
    prep = bench._Prepared(model, inputs, 0, path, path.stat().st_size, "dynamo", None, None)
    cell = bench._ort_cell("small", prep, inputs, [model(*inputs)], "cuda", threads=1)
    assert cell.run is None
    assert cell.status.startswith("n/a: onnxruntime could not start CUDAExecutionProvider")


def test_missing_onnxruntime_is_a_clear_error_naming_the_extra(tmp_path: pathlib.Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from graphmerge.passes.export import export_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    model, inputs = _models()["small"]
    with pytest.raises(GraphMergeError, match=r"graphmerge\[cpu\]"):
        export_onnx(model.eval(), inputs, tmp_path / "small.onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GraphMergeError, match=r"graphmerge\[cpu\]"):
        bench.resolve_providers(["cpu"])


def test_bench_command_end_to_end_with_weights(run_cli, tmp_path: pathlib.Path) -> None:
    """`graphmerge bench MODEL MODEL=WEIGHTS --json`: rows for both models, runtimes and batches."""
    from graphmerge.checkpoint import save_weights
    from graphmerge.examples.mlp import SineMLP

    torch.manual_seed(5)
    student = SineMLP()
    save_weights(tmp_path / "student.safetensors", student)
    done = run_cli("bench", "examples:mlp", "examples:mlp=student.safetensors", "--batch", "1,4", "--json",
                   "out.json", "--warmup", "1", "--min-time", "0", "--min-iters", "3", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out.json").read_text())
    rows = report["rows"]
    assert {(r["model"], r["runtime"], r["batch"]) for r in rows} == {
        (m, rt, b) for m in ("mlp", "mlp=student.safetensors")
        for rt in ("onnxruntime", "torch") for b in (1, 4)}
    assert all(r["status"] == "ok" and r["p50_ms"] > 0 for r in rows)
    assert {r["params"] for r in rows} == {sum(p.numel() for p in student.parameters())}
    assert report["machine"]["onnxruntime"] and report["machine"]["cpu"]
    assert "p50" in done.stdout
