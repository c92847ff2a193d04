"""Gate epochs (issue #12): does the gate phase reach its budget, and how good is the student, on
3 to 150 gate epochs, with the projected budget (graphmerge's default) and the paper's penalty?

For each task two teachers are trained once (``graphmerge.train``, seeds 1 and 2); then, for every
number of gate epochs and both ``gate_budget`` settings, ``graphmerge.merge`` runs the real gate
phase, compresses and fine-tunes for a fixed number of epochs, every run from the same teachers
with merge seed 0. Both budgets run at the library's defaults, tuned for no task: ``projected``
(budget ramp 0.5, gradient direction, gates decided after the ramp: ``decide_gates``) and
``penalty`` (the paper's λ₀ 0.01, λ ← λ + 0.05·√λ per epoch); the gates' SGD is lr 0.1, momentum
0.9 in both. ``--budgets`` adds ``undecided``: the projected budget with ``decide_gates=False`` (the
default before the decision existed, every gate left half open on short phases). The weights'
learning rate, batch size and weight decay are the task's (the teachers').

Reported per run: each group's mean P[g > 0] at the end of the gate phase, computed here from the
gates' log-alphas (read from the checkpoint ``merge`` writes after the last gate epoch) and its
largest distance from 1/N over groups; the student's test metric right after compression and after
fine-tuning (``merge``'s summary with the test split as ``val_data``: it is only evaluated, never
selected on); the teachers' test metric. An *epoch* is one pass over the task's gate-phase
training set (the first ``gate_train`` training samples, so an epoch is a few SGD steps and 150 of
them stay affordable); ``steps_per_epoch`` is in the output. Fine-tuning uses the same set.

Tasks: ``sine`` (the paper's MLP 1-100-1), ``mnist1d`` (the benchmarks' residual CNN in the
``--hard`` regime: 8 channels, head 12, 1 000 training samples), ``chars`` (``examples/tiny_gpt``
on the ``chars`` data set, metric bits per character) and ``resnet20`` (``examples/resnet20`` on
scikit-learn's 8×8 digits, the grey channel repeated to 3: stages at 8×8, 4×4 and 2×2).

    python benchmarks/gate_epochs.py                       # every task (writes benchmarks/results/)
    python benchmarks/gate_epochs.py --tasks sine,mnist1d  # some tasks
    python benchmarks/gate_epochs.py --quick --out /tmp/g  # smoke test: sine, gate epochs 3 and 10
    python benchmarks/gate_epochs.py --report              # rewrite gate_epochs.md (and .json) from the JSON
    python benchmarks/gate_epochs.py --budgets undecided   # only some budgets (runs of others are kept)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on the path, where benchmarks/mnist1d.py would shadow the
# mnist1d package the data needs: take it off, and put the repository first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from graphmerge import checkpoint as ckpt  # noqa: E402
from graphmerge.data import chars, digits, mnist1d, sine  # noqa: E402
from graphmerge.examples.mlp import SineMLP  # noqa: E402
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN  # noqa: E402
from graphmerge.examples.resnet20 import ResNet20  # noqa: E402
from graphmerge.examples.tiny_gpt import TinyGPT  # noqa: E402
from graphmerge.recipe import CHECKPOINT_NAME, MergeSettings, merge, train  # noqa: E402
from graphmerge.training import cross_entropy  # noqa: E402

#: merge settings of each budget compared; the first and the last run by default
VARIANTS: dict[str, dict[str, Any]] = {"projected": {"gate_budget": "projected"},
                                       "undecided": {"gate_budget": "projected", "decide_gates": False},
                                       "penalty": {"gate_budget": "penalty"}}
BUDGETS = tuple(VARIANTS)
DEFAULT_BUDGETS = ("projected", "penalty")
GATE_EPOCHS = (3, 10, 30, 150)
QUICK_GATE_EPOCHS = (3, 10)
TOLERANCE = 0.005  # max |mean P[g>0] - 1/N| over groups that counts as "budget met"
LOG_ALPHA = "graphmerge_gates.log_alpha."


@dataclass
class Task:
    """One task: model, data, metric and the settings of its teachers and merges."""

    build: Callable[[], nn.Module]
    data: Callable[[bool], tuple[TensorDataset, TensorDataset, TensorDataset]]  # quick -> teacher/gate train, test
    loss: Any
    metric: str
    higher_is_better: bool
    teacher: dict[str, Any]
    merge: dict[str, Any]
    scale: float = 1.0  # metric shown = summary value x scale (chars: nats -> bits)
    notes: str = ""
    quick: dict[str, Any] = field(default_factory=dict)


def sine_data(quick: bool) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    train_set, _, test_set, _ = sine(n_train=1_000 if quick else 2_000, n_val=10, n_test=2_000, seed=0)
    return train_set, _head(train_set, 256 if quick else 640), test_set


def mnist1d_data(quick: bool) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    train_set, _, test_set, _ = mnist1d(n_val=500, seed=42)
    train_set = _head(train_set, 1000)  # --hard: the first 1 000 training samples
    return train_set, train_set, test_set


def chars_data(quick: bool) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    train_set, _, test_set, _ = chars(context=64, n_train=65_536, n_val=64, n_test=8_192)
    return train_set, _head(train_set, 128), test_set


def resnet_digits(quick: bool) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """sklearn's 8×8 digits as 3×8×8 images (the grey channel repeated, standardised)."""
    train_set, _, test_set, _ = digits(n_val=10, n_test=400, seed=0)

    def image(split: TensorDataset) -> TensorDataset:
        x, y = split.tensors
        return TensorDataset(((x - 0.3) / 0.4).repeat(1, 3, 1, 1), y)

    train_set = image(train_set)
    return train_set, _head(train_set, 256), image(test_set)


def _head(split: TensorDataset, count: int) -> TensorDataset:
    return TensorDataset(*(t[:count] for t in split.tensors))


CNN = {"lr": 0.05, "batch_size": 64, "weight_decay": 5e-4}
TASKS: dict[str, Task] = {
    "sine": Task(build=SineMLP, data=sine_data, loss="mse", metric="test MSE", higher_is_better=False,
                 teacher={"epochs": 300, "lr": 0.05, "batch_size": 32, "milestones": [250]},
                 merge={"batch_size": 32, "weight_lr": 0.05, "finetune_lr": 0.05, "finetune_epochs": 20},
                 notes="MLP 1-100-1, MSE",
                 quick={"teacher": {"epochs": 20, "milestones": [15]}, "merge": {"finetune_epochs": 2}}),
    "mnist1d": Task(build=lambda: MNIST1DCNN(channels=8, head_channels=12), data=mnist1d_data, loss="cross_entropy",
                    metric="test accuracy", higher_is_better=True,
                    teacher={"epochs": 60, "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4},
                    merge={"batch_size": 128, "weight_lr": 0.05, "finetune_lr": 0.05, "weight_decay": 5e-4,
                           "finetune_epochs": 15},
                    notes="residual CNN, --hard regime: 8 channels (head 12)"),
    "chars": Task(build=TinyGPT, data=chars_data, loss=cross_entropy, metric="test bits per character",
                  higher_is_better=False, scale=1 / math.log(2),
                  teacher={"epochs": 6, "lr": 0.1, "batch_size": 32},
                  merge={"batch_size": 32, "weight_lr": 0.05, "finetune_lr": 0.05, "finetune_epochs": 10},
                  notes="tiny_gpt (d_model 64, 2 layers, 4 heads), windows of 64 characters"),
    "resnet20": Task(build=ResNet20, data=resnet_digits, loss="cross_entropy", metric="test accuracy",
                     higher_is_better=True, teacher={"epochs": 15, **CNN},
                     merge={"batch_size": 64, "weight_lr": 0.05, "finetune_lr": 0.05, "weight_decay": 5e-4,
                            "finetune_epochs": 10},
                     notes="digits as 3x8x8 images"),
}


def open_probability(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """P[g > 0] of hard-concrete gates: sigmoid(log_alpha - beta·log(-gamma/zeta))."""
    return torch.sigmoid(log_alpha.double() - beta * math.log(-gamma / zeta))


def kept_gate_value(log_alpha: torch.Tensor, n: int, gamma: float, zeta: float) -> float:
    """Mean eval gate value, clamp(sigmoid(log_alpha)(zeta - gamma) + gamma, 0, 1), of the 1/N of
    the group's gates with the highest log-alpha (the channels compression keeps; conv groups kept
    in units may differ slightly): 1 where the kept channels pass unscaled, near 0.1 where every
    gate sits half open."""
    top = log_alpha.double().sort(descending=True).values[:len(log_alpha) // n]
    return float((torch.sigmoid(top) * (zeta - gamma) + gamma).clamp(0, 1).mean())


def run_merge(teachers: list[nn.Module], gate_train: TensorDataset, test: TensorDataset, task: Task,
              options: dict[str, Any], gate_epochs: int, budget: str) -> dict[str, Any]:
    """One ``merge`` with the test split as ``val_data``; the gates' log-alphas come from the
    checkpoint written after the last gate epoch (read as the log record of that epoch arrives),
    rounded to 5 decimals; everything reported about them is computed from the rounded values."""
    gates: dict[str, list[float]] = {}
    history: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        def log(record: dict[str, Any]) -> None:
            history.append(record)
            if record["phase"] == "gate" and record["epoch"] == gate_epochs:
                state = ckpt.load_state(Path(folder) / CHECKPOINT_NAME)["model"]
                gates.update({key.split(LOG_ALPHA)[1].lstrip("g"): [round(v, 5) for v in value.tolist()]
                              for key, value in state.items() if LOG_ALPHA in key})

        start = time.perf_counter()
        result = merge(teachers, gate_train, val_data=test, loss=task.loss, seed=0, gate_epochs=gate_epochs,
                       checkpoint_dir=folder, log=log, **VARIANTS[budget], **options)
        seconds = time.perf_counter() - start
    hard = {"beta": 2 / 3, "gamma": -0.1, "zeta": 1.1, **(MergeSettings().gate_options or {})}  # add_gates' defaults
    n = len(teachers)
    mean_open = {gid: float(open_probability(torch.tensor(v), **hard).mean()) for gid, v in gates.items()}
    kept = [kept_gate_value(torch.tensor(v), n, hard["gamma"], hard["zeta"]) for v in gates.values()]
    summary = result.summary
    gate_records = [r for r in history if r["phase"] == "gate"]
    return {"gate_epochs": gate_epochs, "budget": budget, "seconds": seconds,
            "max_abs_dev": max(abs(p - 1 / n) for p in mean_open.values()), "mean_open": mean_open,
            "kept_gate_value": statistics.fmean(kept),
            "open_fraction_reported": {str(k): v for k, v in result.open_fraction.items()},
            "before_finetune": summary["before_finetune"] * task.scale,
            "after_finetune": summary["after_finetune"] * task.scale,
            "teachers": [v * task.scale for v in summary["teachers"]], "big": summary["big"] * task.scale,
            "teacher_share": {str(k): v for k, v in result.teacher_share.items()},
            "open_by_epoch": [r["open_fraction"] for r in gate_records],
            "schedule_by_epoch": [r.get("budget", r.get("lambda")) for r in gate_records],
            "gate_records": len(gate_records), "hard_concrete": hard, "log_alpha": gates}


def run_task(name: str, quick: bool, epochs_list: tuple[int, ...],
             budgets: tuple[str, ...] = DEFAULT_BUDGETS) -> dict[str, Any]:
    task = TASKS[name]
    teacher_train, gate_train, test = task.data(quick)
    teacher_options = {**task.teacher, **task.quick.get("teacher", {})} if quick else task.teacher
    merge_options = {**task.merge, **task.quick.get("merge", {})} if quick else task.merge
    start = time.perf_counter()
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(train(task.build(), teacher_train, loss=task.loss, seed=seed, **teacher_options).model.eval())
    teacher_seconds = time.perf_counter() - start
    steps = math.ceil(len(gate_train) / merge_options["batch_size"])
    runs = []
    for gate_epochs in epochs_list:
        for budget in budgets:
            run = run_merge(teachers, gate_train, test, task, merge_options, gate_epochs, budget)
            runs.append(run)
            print(f"  {name:>8} {budget:>9} {gate_epochs:>4} gate epochs: max |P - 1/N| {run['max_abs_dev']:.4f}, "
                  f"{task.metric} before FT {run['before_finetune']:.4f}, after {run['after_finetune']:.4f} "
                  f"({run['seconds']:.0f} s)", flush=True)
    return {"metric": task.metric, "higher_is_better": task.higher_is_better, "notes": task.notes,
            "teacher": teacher_options, "merge": merge_options, "teacher_train": len(teacher_train),
            "gate_train": len(gate_train), "test": len(test), "steps_per_epoch": steps,
            "teacher_seconds": teacher_seconds, "runs": runs}


def table(results: dict[str, Any]) -> str:
    lines = ["| task | metric | gate epochs (steps) | budget | max \\|P−1/N\\| | kept gate | before FT | after FT | "
             "teachers | s |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in results["tasks"].items():
        for run in sorted(result["runs"], key=lambda r: (r["gate_epochs"], BUDGETS.index(r["budget"]))):
            teachers = " / ".join(f"{v:.4f}" for v in run["teachers"])
            steps = run["gate_epochs"] * result["steps_per_epoch"]
            lines.append(f"| {name} | {result['metric']} | {run['gate_epochs']} ({steps}) | {run['budget']} | "
                         f"{run['max_abs_dev']:.4f} | {run['kept_gate_value']:.2f} | {run['before_finetune']:.4f} | "
                         f"{run['after_finetune']:.4f} | {teachers} | {run['seconds']:.0f} |")
    return "\n".join(lines)


def pivot(results: dict[str, Any]) -> str:
    """One row per task and gate epochs, the budgets side by side (max |P − 1/N|, kept gate,
    before / after fine-tuning)."""
    present = {r["budget"] for result in results["tasks"].values() for r in result["runs"]}
    budgets = [b for b in BUDGETS if b in present]
    lines = ["| task (metric; teachers) | gate epochs | "
             + " | ".join(f"{b}: \\|P−1/N\\|, kept gate, before → after FT" for b in budgets) + " |",
             "|---|---:|" + "---|" * len(budgets)]
    for name, result in results["tasks"].items():
        runs = {(r["gate_epochs"], r["budget"]): r for r in result["runs"]}
        teachers = " / ".join(f"{v:.3f}" for v in result["runs"][0]["teachers"])
        for epochs in sorted({e for e, _ in runs}):
            cells = [f"{r['max_abs_dev']:.3f}, {r['kept_gate_value']:.2f}, {r['before_finetune']:.3f} → "
                     f"**{r['after_finetune']:.3f}**" if (r := runs.get((epochs, b))) else "–" for b in budgets]
            lines.append(f"| {name} ({result['metric']}; {teachers}) | {epochs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    parts = ["# Gate epochs: projected (decided) vs undecided vs penalty budget\n", f"{results['epoch_note']}\n",
             pivot(results), "", table(results), ""]
    for name, result in results["tasks"].items():
        commands = ", ".join(f"`{c}`" for c in result["commands"])
        parts.append(f"- **{name}** ({commands}; {result['seconds']:.0f} s in all): {result['notes']}; "
                     f"teachers on {result['teacher_train']} training samples, gate phase and fine-tuning on the first "
                     f"{result['gate_train']}, {result['steps_per_epoch']} steps per epoch "
                     f"(batch {result['merge']['batch_size']}); "
                     f"fine-tuning {result['merge']['finetune_epochs']} epochs; teachers "
                     f"{result['teacher']['epochs']} epochs ({result['teacher_seconds']:.0f} s, trained again by "
                     f"each command).")
    machine = results["machine"]
    parts.append(f"\n{machine['platform']}, torch {machine['torch']}, {machine['threads']} torch thread.")
    return "\n".join(parts) + "\n"


def combine(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``, plus the runs of ``old`` at other (gate epochs, budget) pairs when both ran at the
    same settings (the teachers are seeded, so they are the same teachers: their test metric must
    agree)."""
    same = old is not None and all(old[k] == new[k] for k in ("teacher", "merge", "teacher_train", "gate_train"))
    if not same or old["runs"][0]["teachers"] != new["runs"][0]["teachers"]:
        return new
    done = {(r["gate_epochs"], r["budget"]) for r in new["runs"]}
    new["runs"] = [r for r in old["runs"] if (r["gate_epochs"], r["budget"]) not in done] + new["runs"]
    new.update(commands=old["commands"] + new["commands"], seconds=old["seconds"] + new["seconds"],
               teacher_seconds=old["teacher_seconds"] + new["teacher_seconds"])
    return new


def dump(results: dict[str, Any]) -> str:
    """JSON with one entry a line, except lists of numbers (the log-alphas), which stay on one line."""
    text = json.dumps(results, indent=1)
    return re.sub(r"\[\s*([-\d.e+]+(?:,\s*[-\d.e+]+)*)\s*\]",
                  lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sine only, gate epochs 3 and 10, tiny (smoke test)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--gate-epochs", default=None, help="comma-separated (default 3,10,30,150; quick 3,10)")
    parser.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS),
                        help=f"comma-separated, of {', '.join(BUDGETS)} (default: {','.join(DEFAULT_BUDGETS)})")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the results")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON in --out")
    args = parser.parse_args(argv)
    path = args.out / "gate_epochs.json"
    if args.report:
        results = json.loads(path.read_text())
        path.write_text(dump(results))
        (args.out / "gate_epochs.md").write_text(markdown(results))
        return results
    torch.set_num_threads(1)
    names = args.tasks.split(",") if args.tasks else (["sine"] if args.quick else list(TASKS))
    budgets = tuple(args.budgets.split(","))
    if unknown := [b for b in budgets if b not in VARIANTS]:
        parser.error(f"unknown budget(s) {', '.join(unknown)}: use {', '.join(BUDGETS)}")
    epochs_list = (tuple(int(e) for e in args.gate_epochs.split(",")) if args.gate_epochs
                   else QUICK_GATE_EPOCHS if args.quick else GATE_EPOCHS)
    command = "python benchmarks/gate_epochs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # Tasks run by other commands stay in the JSON (each task records its own command).
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() and not args.quick else {"tasks": {}}
    results.update({
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "quick": args.quick, "tolerance": TOLERANCE,
        "epoch_note": "An epoch is one pass over the task's gate-phase training set (its size and the steps per "
                      "epoch are listed below the table); fine-tuning uses the same set. kept gate: the mean "
                      "eval gate value of the channels compression keeps (1: passed unscaled). undecided: the "
                      "projected budget with decide_gates=False (`--budgets undecided`); its runs from before "
                      "that option existed ran as `projected`, the default then."})
    for name in names:
        start = time.perf_counter()
        new = run_task(name, args.quick, epochs_list, budgets)
        new.update(commands=[command], seconds=time.perf_counter() - start)
        results["tasks"][name] = combine(results["tasks"].get(name), new)
    results["tasks"] = {name: results["tasks"][name] for name in TASKS if name in results["tasks"]}
    results["table"] = table(results)
    print(results["table"])
    met = [r["max_abs_dev"] <= TOLERANCE for t in results["tasks"].values() for r in t["runs"]
           if r["budget"] == "projected"]
    print(f"projected budget met (max |P - 1/N| <= {TOLERANCE}) in {sum(met)} of {len(met)} runs")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(results))
    (args.out / "gate_epochs.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
