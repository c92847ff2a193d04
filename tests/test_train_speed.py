"""benchmarks/train_speed.py in --quick mode, and torch.compile of a gated big student."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphmerge
from graphmerge.examples.mlp import build_model as sine_mlp

ROOT = Path(__file__).resolve().parents[1]
EVERY_ROW = ("model", "variant", "params", "cpu_ms", "wall_ms", "steps", "gflops", "time_x", "flop_x", "eff")


def _linear_step_flops(layers: list[tuple[int, int]], batch: int) -> int:
    """Hand count of one forward + backward of a chain of linear layers: 2·batch·in·out for the
    forward product, the same again for the weight gradient, and again for the input gradient of
    every layer but the first (the network's input needs none). Bias adds and sums count zero."""
    return sum(2 * batch * i * o * (2 if k == 0 else 3) for k, (i, o) in enumerate(layers))


@pytest.mark.slow
def test_quick_mode_reports_every_column_and_the_hand_counted_flop_ratio(tmp_path: Path) -> None:
    out = tmp_path / "train_speed.json"
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "train_speed.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (tmp_path / "train_speed.md").exists()
    assert {"cpu", "logical_cpus", "torch_threads", "torch"} <= set(report["machine"])
    assert "torch thread" in done.stdout  # the machine is printed with the table
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["teacher", "widened", "gated"]
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert set(EVERY_ROW) <= set(row), set(EVERY_ROW) - set(row)
        assert row["steps"] == report["settings"]["repeat"] and row["cpu_ms"] > 0
        assert row["eff"] == pytest.approx(row["time_x"] / row["flop_x"])
    assert {"vs_widened", "vs_widened_paired", "proj_ms"} <= set(rows["gated"])
    assert rows["gated"]["vs_widened"] == pytest.approx(rows["gated"]["cpu_ms"] / rows["widened"]["cpu_ms"])
    # the sine MLP 1 -> 100 -> 1 at batch 32; the big student of two is 1 -> 200 -> 1
    teacher = _linear_step_flops([(1, 100), (100, 1)], 32)
    widened = _linear_step_flops([(1, 200), (200, 1)], 32)
    assert rows["teacher"]["gflops"] * 1e9 == pytest.approx(teacher)
    assert rows["widened"]["flop_x"] == pytest.approx(widened / teacher)
    assert rows["gated"]["gflops"] == rows["widened"]["gflops"]  # the gates' multiplies are not FLOPs here
    assert report["summary"]["mlp"]["gate_overhead_eager"] == rows["gated"]["vs_widened"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on CPU needs a C++ compiler")
def test_compiled_gated_student_matches_eager_under_the_same_seed() -> None:
    """Train mode, so the gates draw a sample: with inductor's fallback_random the compiled
    student draws the same uniforms as eager, and computes the same output and gradients."""
    from torch import _dynamo
    from torch._inductor import config as inductor_config

    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(sine_mlp().eval())
    x = torch.linspace(-3, 3, 32).unsqueeze(1)
    big = graphmerge.widen(teachers, (x[:2],), verify=False)
    eager = graphmerge.add_gates(big, seed=0, init_std=0.5).train()
    compiled_student = graphmerge.add_gates(big, seed=0, init_std=0.5).train()
    try:
        with inductor_config.patch(fallback_random=True):
            compiled = torch.compile(compiled_student)
            for step in range(2):  # the second call runs the cached compiled graph
                outputs = []
                for model in (eager, compiled):
                    torch.manual_seed(10 + step)
                    out = model(x)
                    (out - torch.sin(x)).square().mean().backward()
                    outputs.append(out.detach())
                assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
        grads = dict(compiled_student.named_parameters())
        for name, param in eager.named_parameters():
            assert torch.allclose(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6), name
    finally:
        _dynamo.reset()
