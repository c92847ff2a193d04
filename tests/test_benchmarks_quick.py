"""CI smoke test of the benchmark scripts: each script's ``--quick`` mode, in a
subprocess, writing into a temporary folder (never over the committed results)."""

from __future__ import annotations

import json
import math
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
    _check_costs(script, result)
    _check_paired(result)
    for png in ("box", "gates", "first_layer", "paired", "cost"):
        assert (tmp_path / f"{script}_{png}.png").stat().st_size > 0
    assert "student" in done.stdout and "bo3 model" in done.stdout  # the rich table was printed
    assert "paired differences" in done.stdout


def _check_costs(script: str, result: dict) -> None:
    """FLOPs of the pipelines from the counted per-sample FLOPs (and, for the sine MLP, from a hand
    count), the equal-FLOPs baselines' epochs, and attributed seconds for every run."""
    b, per, flops, epochs = result["budget"], result["flops_per_sample"], result["flops"], result["epochs"]
    n = per["samples"]["train"]
    if script == "sine":
        # per sample, fc1 (1 -> 100): forward 2·1·100, weight gradient 2·1·100 (the data needs no
        # gradient); fc2 (100 -> 1): forward, weight and input gradients 2·100·1 each
        assert per["small_train"] == 200 + 200 + 3 * 200
        assert per["gated_N2_train"] == 2 * 1000  # the big student: 200 hidden units
        # quick mode: 2 000 samples, unit 2: teachers 2 x 4 epochs, gate 2 epochs, fine-tune 2 epochs
        assert n == 2000 and b["unit"] == 2
        assert flops["student"] == 2000 * (2 * 4 * 1000 + 2 * 2000 + 2 * 1000)
        assert epochs["one model (equal FLOPs)"] == 14  # 28e6 / (2000 x 1000) epochs of one model
        assert epochs["bo3 (equal FLOPs)"] == 3 * 5  # 14 / 3 rounded, each
    student = n * ((2 * b["teacher_epochs"] + b["finetune_epochs"]) * per["small_train"]
                   + b["gate_epochs"] * per["gated_N2_train"])
    assert flops["student"] == pytest.approx(student)
    assert epochs["one model (equal FLOPs)"] == round(student / (n * per["small_train"]))
    assert epochs["bo3 (equal FLOPs)"] == 3 * round(student / (3 * n * per["small_train"]))
    assert flops["one model"] == pytest.approx(n * b["total"] * per["small_train"])
    for name in result["stats"]:
        assert len(result["wall_s"][name]) == result["runs"] and min(result["wall_s"][name]) > 0, name


def _check_paired(result: dict) -> None:
    """Each comparison's mean is the mean of the per-run differences, inside its interval, and the
    verdict follows the interval."""
    table = result["paired"]
    variants = {c["variant"] for c in table["comparisons"]}
    assert variants == {"student", table["best_student_variant"]}
    for c in table["comparisons"]:
        diffs = [v - b for v, b in zip(result["values"][c["variant"]], result["values"][c["baseline"]], strict=True)]
        assert c["mean"] == pytest.approx(statistics.fmean(diffs))
        low, high = c["ci95"]
        assert low <= c["mean"] <= high
        better = (low > 0) if result["higher_is_better"] else (high < 0)
        worse = (high < 0) if result["higher_is_better"] else (low > 0)
        assert c["verdict"] == ("win" if better else "loss" if worse else "no difference")


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
        for key in ("capture_s", "couple_s", "widen_s", "certify_s", "compress_s", "pipeline_s"):
            assert row[key] >= 0, (row["model"], key)
        # merged end to end: certify_pipeline on the big student widen built
        assert row["pipeline_ok"], (row["model"], row.get("pipeline_stage"), row.get("pipeline_error"))
        assert row["pipeline_sample_error"] is None or row["pipeline_sample_error"] <= 1e-4, row["model"]
        assert row.get("pipeline_i3_rel_error") is not None or row.get("pipeline_i3_skipped"), row["model"]
    for suite, summary in report["summary"].items():
        assert summary["models"] == 3 and summary["captured"] == 3 and summary["merged"] == 3, suite
    markdown = (tmp_path / "coverage.md").read_text()
    assert markdown.count("captured 3/3") >= 3 and "| resnet18 |" in markdown
    assert markdown.count("merged end to end 3/3") >= 3
    # a second run merges into the JSON by suite/model instead of replacing it
    again = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "coverage.py"), "--suite",
                            "torchvision", "--models", "resnet18", "--no-onnx", "--json", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert len(merged["models"]) == len(report["models"]) and len(merged["runs"]) == 2


def gpt_forward_flops_per_token(d: int, layers: int, vocab: int, mlp_ratio: int = 4) -> int:
    """TinyGPT's linear layers per token, forward: qkv (d -> 3d), proj (d -> d), fc1 (d -> 4d), fc2
    (4d -> d) per block, and the head (d -> vocab); 2·in·out each. The attention's own products are
    not counted (FlopCounterMode has no count for the CPU kernel of scaled_dot_product_attention)."""
    block = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * mlp_ratio * d
    return layers * block + 2 * d * vocab


@pytest.mark.slow
def test_chars_quick_reports_bits_per_char_costs_and_paired_statistics(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "chars.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "chars.json").read_text())
    names = {"student", "student (distill big)", "student (distill teachers)", "bo3 model", "one model",
             "one model (equal FLOPs)", "bo3 (equal FLOPs)", "ensemble (2x cost)", "weight avg", "re-basin avg"}
    assert set(result["values"]) == names and result["runs"] == 1
    for name, values in result["values"].items():
        assert len(values) == 1 and 0 < values[0] < 7, name  # below 7 bits: better than uniform over 128 bytes
        assert result["stats"][name]["mean"] == pytest.approx(statistics.fmean(values))
        assert len(result["wall_s"][name]) == 1 and result["wall_s"][name][0] > 0, name
    # the mixture's log-loss is at most the mean of its members' (Jensen), position by position
    assert result["values"]["ensemble (2x cost)"][0] <= statistics.fmean(result["teachers"][0]) + 1e-9
    # quick model: d_model 16, 1 layer, context 32, vocab 128, 8 000 training characters
    per, flops, epochs, b = result["flops_per_sample"], result["flops"], result["epochs"], result["budget"]
    context, windows = 32, (8000 - 1) // 32
    small_fwd = context * gpt_forward_flops_per_token(16, 1, 128)
    big_fwd = context * gpt_forward_flops_per_token(32, 1, 128)  # the big student: every width doubled
    assert small_fwd == 32 * 10240 and big_fwd == 32 * 32768
    # training: forward, weight gradient and input gradient of every linear (the embedding's output
    # needs a gradient, so even the first layer's input does)
    assert per["small_train"] == 3 * small_fwd and per["small_eval_forward"] == small_fwd
    assert per["gated_N2_train"] == 3 * big_fwd and per["gated_N2_eval_forward"] == big_fwd
    assert per["samples"]["train"] == windows and b["unit"] == 1
    student = windows * (2 * 2 * 3 * small_fwd + 3 * big_fwd + 3 * small_fwd)  # teachers 2 x 2u, gate u, ft u
    assert flops["student"] == student
    assert flops["one model"] == windows * 6 * 3 * small_fwd
    assert epochs["one model (equal FLOPs)"] == 8  # student / one epoch = 4 + 3.2 + 1 = 8.2 epochs
    assert epochs["bo3 (equal FLOPs)"] == 3 * 3  # 8.2 / 3 rounded, each
    # distillation's targets run once per training window per fine-tuning epoch: the big student, or both teachers
    assert flops["student (distill big)"] - student == windows * big_fwd
    assert flops["student (distill teachers)"] - student == 2 * windows * small_fwd
    _check_paired(result)
    for c in result["distill_paired"]:
        assert c["baseline"] == "student"
        assert c["mean"] == pytest.approx(result["values"][c["variant"]][0] - result["values"]["student"][0])
    for png in ("paired", "cost", "distill_paired"):
        assert (tmp_path / f"chars_{png}.png").stat().st_size > 0
    assert "| student |" in (tmp_path / "chars.md").read_text()


def test_chars_ensemble_averages_probabilities_not_logits() -> None:
    sys.path.append(str(ROOT / "benchmarks"))  # appended: benchmarks/mnist1d.py must not shadow the package
    import chars
    import torch

    class Fixed(torch.nn.Module):
        """P('a') = p at every position, the rest spread evenly over the other 127 bytes."""

        def __init__(self, p: float) -> None:
            super().__init__()
            self.logits = torch.zeros(128)
            self.logits[97] = math.log(127 * p / (1 - p))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(*x.shape, 128)

    x = torch.zeros(5, 8, dtype=torch.long)
    data = torch.utils.data.TensorDataset(x, torch.full((5, 8), 97))
    assert chars.ensemble_bits_per_char([Fixed(0.5)], data) == pytest.approx(1.0)
    # the mixture gives 'a' probability (1/2 + 1/4) / 2 = 3/8
    assert chars.ensemble_bits_per_char([Fixed(0.5), Fixed(0.25)], data) == pytest.approx(-math.log2(3 / 8))


# The hard-concrete gates' constants (add_gates' defaults) and P[g > 0], written out here so the test
# does not trust the benchmark's own summary: P[g > 0] = sigmoid(log_alpha - beta·log(-gamma/zeta)).
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _open_probability(log_alpha: list[float]) -> list[float]:
    shift = BETA * math.log(-GAMMA / ZETA)
    return [1 / (1 + math.exp(-(a - shift))) for a in log_alpha]


def run_quick(script: str, folder: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """``benchmarks/<script>.py --quick --out folder`` in a subprocess -> (the process, its JSON)."""
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / f"{script}.py"), "--quick",
                           "--out", str(folder)], capture_output=True, text=True, timeout=600, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((folder / f"{script}.json").read_text())


@pytest.mark.slow
def test_gate_epochs_quick_projected_runs_end_at_one_over_n(tmp_path: Path) -> None:
    done, result = run_quick("gate_epochs", tmp_path)
    task = result["tasks"]["sine"]
    runs = task["runs"]
    assert sorted((r["budget"], r["gate_epochs"]) for r in runs) == [
        ("penalty", 3), ("penalty", 10), ("projected", 3), ("projected", 10)]
    n = 2
    for run in runs:
        assert run["hard_concrete"] == pytest.approx({"beta": BETA, "gamma": GAMMA, "zeta": ZETA})
        assert run["gate_records"] == run["gate_epochs"] == len(run["schedule_by_epoch"])
        means = {gid: statistics.fmean(_open_probability(la)) for gid, la in run["log_alpha"].items()}
        assert means and set(means) == set(run["open_fraction_reported"])
        deviation = max(abs(p - 1 / n) for p in means.values())
        assert run["max_abs_dev"] == pytest.approx(deviation, abs=1e-7)
        for gid, p in means.items():  # the checkpoint's gates are those merge reported on
            assert run["open_fraction_reported"][gid] == pytest.approx(p, abs=1e-5)
        epochs = run["gate_epochs"]
        if run["budget"] == "projected":
            assert deviation <= 0.005, (epochs, means)
            assert run["kept_gate_value"] >= 0.99, epochs  # decided: compress keeps gates that are 1
            # the budget falls linearly from 1 to 1/N over the first half of the phase, then holds
            expected = [1 / n + (1 - 1 / n) * max(0.0, 1 - 2 * (e + 1) / epochs) for e in range(epochs)]
        else:  # the paper's λ, updated before each epoch: λ <- λ + 0.05·√λ from λ0 = 0.01
            expected, lam = [], 0.01
            for _ in range(epochs):
                lam += 0.05 * math.sqrt(lam)
                expected.append(lam)
        assert run["schedule_by_epoch"] == pytest.approx(expected)
        assert run["teachers"] == runs[0]["teachers"]  # every merge starts from the same two teachers
    markdown = (tmp_path / "gate_epochs.md").read_text()
    assert markdown.count("| sine |") == len(runs)
    assert "projected budget met (max |P - 1/N| <= 0.005) in 2 of 2 runs" in done.stdout


@pytest.mark.slow
def test_posthoc_quick_spends_one_budget_on_every_strategy(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "posthoc.py"), "--quick",
                           "--tasks", "mnist1d", "--seeds", "2", "--budgets", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "posthoc.json").read_text())["results"][0]
    for record in result["per_seed"]:
        costs, spent = record["costs"], record["budgets"]["4.0"]["spent"]
        budget = 4 * 1000 * costs["small"]  # 4 teacher-epochs of the 1 000 training samples
        for name, plan in spent.items():
            parts = list(plan.values()) if "finetune" in plan else [plan]  # gate phase or feature matching first
            total = sum(p["flops"] for p in parts if p)
            # none spends more than B, nor leaves more than one sample per epoch of its costliest step unspent
            costliest = costs["gated"] + costs["small"] + 2 * costs["forward"]
            assert budget - sum(p["epochs"] for p in parts if p) * costliest <= total <= budget, name
        trace = record["budgets"]["4.0"]["gate_traces"]["graphmerge"]["trace"]
        assert [e["progress"] for e in trace] == [k / 10 for k in range(1, 11)]
    assert (tmp_path / "posthoc.png").stat().st_size > 0 and (tmp_path / "posthoc_gate_traces.png").stat().st_size > 0
    assert "graphmerge minus each strategy" in done.stdout
