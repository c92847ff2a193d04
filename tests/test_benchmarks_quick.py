"""CI smoke test of the benchmark scripts: each script's ``--quick`` mode, in a
subprocess, writing into a temporary folder (never over the committed results)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("student", "bo3 model", "one model")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sine", "digits", "mnist1d"])
def test_quick_mode_runs_and_reports_every_strategy(script: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / f"{script}.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / f"{script}.json").read_text())
    assert set(PAPER) <= set(result["stats"])
    for name, values in result["values"].items():
        assert len(values) == result["runs"]
        stats = result["stats"][name]
        assert stats["median"] == pytest.approx(statistics.median(values))
        assert stats["mean"] == pytest.approx(statistics.fmean(values))
        assert stats["min"] == min(values) and stats["max"] == max(values)
    epochs = result["epochs"]
    assert epochs["student"] == epochs["bo3 model"] == epochs["one model"] == result["budget"]["total"]
    for png in ("box", "gates", "first_layer"):
        assert (tmp_path / f"{script}_{png}.png").stat().st_size > 0
    assert "student" in done.stdout and "bo3 model" in done.stdout  # the rich table was printed


@pytest.mark.slow
def test_train_modes_quick_reports_both_modes_for_every_task(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "train_modes.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "train_modes.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["sine", "mnist1d", "digits"]
    for r in rows:
        assert r["vmap_ms_per_step"] > 0 and r["loop_ms_per_step"] > 0
        assert r["vmap_over_loop"] == pytest.approx(r["vmap_ms_per_step"] / r["loop_ms_per_step"])


@pytest.mark.slow
def test_zoo_quick_reports_every_model_with_consistent_ratios(tmp_path: Path) -> None:
    out = tmp_path / "zoo.json"
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "zoo.py"), "--quick", "--json",
                           str(out), "--repeat", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["models"] and (tmp_path / "zoo.md").exists()
    for row in report["models"]:
        assert "error" not in row, row.get("error")
        assert row["i1_ok"] and row["i2_ok"] and row["i4_ok"], row["model"]
        assert row["analyze_s"] == pytest.approx(row["capture_s"] + row["couple_s"])
        assert 0 < row["compress_i3_s"] <= row["compress_s"]
        if report["repeat"] == 1:  # with repeats every stage is its own median
            assert row["e2e_s"] == pytest.approx(sum(row[k] for k in ("capture_s", "couple_s", "widen_s",
                                                                       "certify_s", "compress_s")))
        if row.get("torch_pruning_s"):
            assert row["analyze_vs_tp"] == pytest.approx(row["analyze_s"] / row["torch_pruning_s"])
            assert row["e2e_vs_tp"] == pytest.approx(row["e2e_s"] / row["torch_pruning_s"])


@pytest.mark.slow
def test_coverage_quick_reports_every_suite_with_summaries(tmp_path: Path) -> None:
    out = tmp_path / "coverage.json"
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "coverage.py"), "--quick",
                           "--json", str(out), "--timeout-per-model", "300"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"platform", "cpu", "torch"} <= set(report["machine"])
    assert [(r["suite"], r["model"]) for r in report["models"]] == sorted(
        ((r["suite"], r["model"]) for r in report["models"]),
        key=lambda key: (["torchvision", "timm", "hf"].index(key[0]), key[1].lower()))
    assert set(report["summary"]) == {"torchvision", "timm", "hf"}
    for row in report["models"]:
        assert "error" not in row, (row["model"], row.get("error"))
        assert row["capture_ok"] and row["i1_ok"] and row["i2_ok"] and row["i4_ok"], row["model"]
        assert row["i1_rel_error"] <= 1e-6 and row["i1_dtype"] == "float64"
        assert "onnx_ok" not in row  # --quick skips the ONNX export
        assert "tp_build_ok" in row or "tp_error" in row
        for key in ("capture_s", "couple_s", "widen_s", "certify_s", "compress_s"):
            assert row[key] >= 0, (row["model"], key)
    for suite, summary in report["summary"].items():
        assert summary["models"] == 3 and summary["captured"] == 3, suite
    markdown = (tmp_path / "coverage.md").read_text()
    assert markdown.count("captured 3/3") >= 3 and "| resnet18 |" in markdown
    # a second run merges into the JSON by suite/model instead of replacing it
    again = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "coverage.py"), "--suite",
                            "torchvision", "--models", "resnet18", "--no-onnx", "--json", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert len(merged["models"]) == len(report["models"]) and len(merged["runs"]) == 2
