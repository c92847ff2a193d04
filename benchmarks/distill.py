"""Distillation in fine-tuning (issue #12): the recipe's student with ``distill`` None / "big" /
"teachers", from the same teachers and seeds, on the sine task and MNIST-1D.

Every run goes through ``graphmerge.merge`` (widen -> gate phase -> compress -> fine-tune), one
model at a time on one thread. Per task and seed: two teachers trained by ``graphmerge.train`` from
seeds ``1000·s + 1`` and ``1000·s + 2``, then three merges with merge seed ``s`` that differ only in
``distill`` (so the gate phases are identical and only fine-tuning differs). Reported on the test
split: the student of each setting, the teachers (mean of the two) and their ensemble (the mean of
their outputs, 2× the inference cost), and what distillation cost: target forwards (samples ×
models, from ``summary["distill"]``) and their FLOPs (``torch.utils.flop_counter`` on one sample of
the teacher and of the big student) relative to the fine-tuning's own training FLOPs (3 × the
student's forward per sample: forward and backward).

Short schedules, sized for about ten minutes on one CPU thread; the sine set is cut to 2 000
training samples. Sine: MLP 1-100-1, MSE, batch 32, SGD lr 0.05; MNIST-1D: the residual CNN,
cross-entropy, batch 128, lr 0.05, weight decay 5e-4, temperature 2. distill_weight 0.5.

    python benchmarks/distill.py                        # 3 seeds (writes benchmarks/results/distill.json)
    python benchmarks/distill.py --quick --out /tmp/d   # smoke test: 1 seed, 1-2 epochs per phase
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on the path, where benchmarks/mnist1d.py would shadow the
# mnist1d package the data needs: take it off, and put the repository first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import graphmerge  # noqa: E402
from graphmerge.data import first_inputs, mnist1d, sine  # noqa: E402
from graphmerge.examples.mlp import build_model as build_mlp  # noqa: E402
from graphmerge.examples.mnist1d_cnn import build_model as build_cnn  # noqa: E402
from graphmerge.recipe import merge, train  # noqa: E402
from graphmerge.training import evaluate  # noqa: E402

DISTILL = (None, "big", "teachers")
TASKS: dict[str, dict[str, Any]] = {
    "sine": {"build": build_mlp, "loss": "mse", "metric": "test MSE", "higher_is_better": False,
             "teacher": {"epochs": 15, "lr": 0.05, "batch_size": 32},
             "merge": {"gate_epochs": 6, "finetune_epochs": 6, "batch_size": 32, "weight_lr": 0.05,
                       "finetune_lr": 0.05},
             "distill": {"distill_weight": 0.5}},
    "mnist1d": {"build": build_cnn, "loss": "cross_entropy", "metric": "test accuracy", "higher_is_better": True,
                "teacher": {"epochs": 10, "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4},
                "merge": {"gate_epochs": 5, "finetune_epochs": 5, "batch_size": 128, "weight_lr": 0.05,
                          "finetune_lr": 0.05, "weight_decay": 5e-4},
                "distill": {"distill_weight": 0.5, "temperature": 2.0}},
}
QUICK_EPOCHS = {"epochs": 2, "gate_epochs": 1, "finetune_epochs": 1}


def load(task: str) -> tuple:
    if task == "sine":
        train_data, _, test_data, _ = sine(n_train=2_000, n_val=500, n_test=2_000, seed=0)
    else:
        train_data, _, test_data, _ = mnist1d(n_val=500, seed=42)
    return train_data, test_data


def metric(model: torch.nn.Module, data: Any, loss: str) -> float:
    values = evaluate(model, data, loss)
    return values.get("acc", values["loss"])


class Ensemble(torch.nn.Module):
    """The mean of the teachers' outputs (what distill="teachers" pulls towards)."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models]).mean(dim=0)


def flops_per_sample(model: torch.nn.Module, inputs: tuple) -> float:
    """Forward FLOPs of ``model`` on one sample, in eval mode."""
    one = tuple(x[:1] for x in inputs)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*one)
    model.train(was_training)
    return float(counter.get_total_flops())


def run_task(task: str, seeds: list[int], quick: bool) -> dict[str, Any]:
    spec = TASKS[task]
    train_data, test_data = load(task)
    inputs = first_inputs(train_data)
    teacher_options = {**spec["teacher"], **({"epochs": QUICK_EPOCHS["epochs"]} if quick else {})}
    merge_options = {**spec["merge"], **({k: QUICK_EPOCHS[k] for k in ("gate_epochs", "finetune_epochs")}
                                          if quick else {})}
    runs = []
    for seed in seeds:
        start = time.perf_counter()
        teachers = []
        for index in (1, 2):
            torch.manual_seed(1000 * seed + index)
            teachers.append(train(spec["build"](), train_data, loss=spec["loss"], seed=1000 * seed + index,
                                  **teacher_options).model.eval())
        run: dict[str, Any] = {"seed": seed, "teacher_s": time.perf_counter() - start,
                               "teachers": [metric(t, test_data, spec["loss"]) for t in teachers],
                               "ensemble": metric(Ensemble(teachers), test_data, spec["loss"]), "students": {}}
        for distill in DISTILL:
            start = time.perf_counter()
            extra = spec["distill"] if distill is not None else {}
            result = merge(teachers, train_data, loss=spec["loss"], seed=seed, distill=distill, **merge_options,
                           **extra)
            run["students"][str(distill)] = {"metric": metric(result.student, test_data, spec["loss"]),
                                             "seconds": time.perf_counter() - start,
                                             "distill": result.summary.get("distill")}
            print(f"  {task} seed {seed} distill {str(distill):>8}: {spec['metric']} "
                  f"{run['students'][str(distill)]['metric']:.4f}", flush=True)
        runs.append(run)
    big = graphmerge.widen(teachers, inputs, verify=False)
    flops = {"student": flops_per_sample(teachers[0], inputs), "big": flops_per_sample(big, inputs)}
    flops["teachers"] = 2 * flops["student"]
    finetune_samples = merge_options["finetune_epochs"] * len(train_data)
    return {"metric": spec["metric"], "higher_is_better": spec["higher_is_better"], "teacher": teacher_options,
            "merge": merge_options, "distill": spec["distill"], "flops_per_sample": flops,
            "finetune_training_flops": 3 * flops["student"] * finetune_samples, "runs": runs}


def table(results: dict[str, Any]) -> str:
    lines = ["| task | model | metric | mean | std | per seed | extra target FLOPs / fine-tuning FLOPs | merge s |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for task, result in results["tasks"].items():
        runs = result["runs"]
        rows: list[tuple[str, list[float], str, str]] = [
            ("teachers (mean of 2)", [statistics.fmean(r["teachers"]) for r in runs], "", ""),
            ("ensemble (2x cost)", [r["ensemble"] for r in runs], "", "")]
        for distill in DISTILL:
            students = [r["students"][str(distill)] for r in runs]
            cost = "0"
            if distill is not None:
                target_flops = result["flops_per_sample"][distill] * students[0]["distill"]["samples"]
                cost = f"{target_flops / result['finetune_training_flops']:.2f}"
            seconds = statistics.fmean(s["seconds"] for s in students)
            rows.append((f"student, distill={distill}", [s["metric"] for s in students], cost, f"{seconds:.0f}"))
        for name, values, cost, seconds in rows:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            per_seed = " / ".join(f"{v:.4f}" for v in values)
            lines.append(f"| {task} | {name} | {result['metric']} | {statistics.fmean(values):.4f} | {std:.4f} | "
                         f"{per_seed} | {cost} | {seconds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1-2 epochs per phase (smoke test)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (default 3; quick: 1)")
    parser.add_argument("--tasks", default="sine,mnist1d", help="comma-separated: sine, mnist1d")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of distill.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                           "torch": torch.__version__, "threads": torch.get_num_threads()},
                               "quick": args.quick, "seeds": seeds, "tasks": {}}
    for task in args.tasks.split(","):
        results["tasks"][task] = run_task(task, seeds, args.quick)
    results["seconds"] = time.perf_counter() - start
    results["table"] = table(results)
    print(results["table"])
    print(f"total {results['seconds']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
