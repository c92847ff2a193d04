"""CI smoke test of the paper-reproduction benchmarks: each script's ``--quick`` mode, in a
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
