"""The post-hoc regime: "I have these N trained models and B more FLOPs: what is my best single model?"

The teachers are given and not counted. Every strategy spends the same measured extra training
FLOPs B (``torch.utils.flop_counter``: forward + loss + backward per sample, plus every extra
forward a strategy runs: the teachers' for distillation and feature matching, the big student's in
the gate phase). B is swept in teacher-epochs (one epoch of training one teacher on its task's
training set). Strategies, each through graphmerge's public API:

- **best teacher + FT**: the teacher best on validation, fine-tuned on all of B.
- **weight avg + FT** / **re-basin avg + FT** / **zipit avg + FT**: the teachers averaged weight by
  weight; aligned first by weight matching (Git Re-Basin) or by activation correlation (ZipIt!-
  style) on graphmerge's coupling groups; BatchNorm statistics re-estimated; fine-tuned on B.
- **zipit mosaic + FT**: the teachers aligned as for zipit, then ``graphmerge.align.mosaic``: each
  unit (a row of a layer, with the norm entries of its channel) taken whole from the teacher whose
  version of it the next layers weigh most, reading every aligned feature (no block-diagonal split
  as in a selection from the concatenated teachers); BatchNorm re-estimated; fine-tuned on B.
- **magnitude select + FT**: graphmerge's compress with no gate phase: the channels whose consumers'
  input weights are largest (``alternatives.magnitude_scores``), block-diagonal like graphmerge's
  student, fine-tuned on all of B: what the gate phase buys, and what the mosaic's filling buys.
- **KD ensemble -> best**: the teachers' ensemble (mean logits) distilled into the best teacher.
- **graphmerge**: ``graphmerge.merge`` (widen, gate phase, compress by the gates) on a share
  ``--gate-share`` of B (default half), fine-tuning on the rest; **graphmerge + KD** fine-tunes by distilling
  the teachers' ensemble (``distill="teachers"``).
- **ensemble (2x)**: the teachers' mean probabilities: 2x the inference cost, shown for reference.

A strategy whose B buys ``S`` training samples of its per-sample cost trains ``ceil(S / n)``
epochs over a seeded random subset of ``S / epochs`` samples, so it spends B to within one sample.

Tasks, chosen so the ensemble is clearly better than either teacher (the table reports the gap):

- ``chars``: a tiny GPT on the built-in character corpus, AdamW (warmup, cosine) teachers trained
  close to convergence; metric bits per character (lower is better).
- ``mnist1d``: MNIST-1D ``--hard`` (8 channels, 1 000 training samples), SGD; test accuracy.
- ``disjoint``: MNIST-1D (32 channels), teacher A trained on classes 0-4 only and B on 5-9 only,
  the strategies' budget spent on the union; test accuracy on all ten classes.

    python benchmarks/posthoc.py                            # every task, 5 seeds, B = 1, 4, 16
    python benchmarks/posthoc.py --tasks mnist1d --seeds 2 --budgets 1 --quick --out /tmp/p

Writes ``posthoc.json`` / ``posthoc.md`` / ``posthoc.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import compare  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.align import feature_matching, mosaic, rebasin_average, zipit_average  # noqa: E402
from graphmerge.alternatives import (  # noqa: E402
    Plan,
    budget_subset,
    forward_flops_per_sample,
    magnitude_scores,
    plan_budget,
    spend,
    train_flops_per_sample,
    weight_average,
)
from graphmerge.data import chars, mnist1d  # noqa: E402
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN  # noqa: E402
from graphmerge.examples.tiny_gpt import TinyGPT  # noqa: E402

STRATEGIES = ["best teacher + FT", "weight avg + FT", "re-basin avg + FT", "zipit avg + FT", "zipit mosaic + FT",
              "magnitude select + FT", "KD ensemble -> best", "graphmerge", "graphmerge + KD"]
REFERENCE = "graphmerge"
DISTILL_WEIGHT = 0.5


@dataclass
class Task:
    """One post-hoc task: how to build and train its models, and how to score them."""

    name: str
    build: Callable[[], nn.Module]
    data: dict[str, TensorDataset]
    teacher_data: list[TensorDataset]  # one per teacher (the same set, or disjoint parts)
    teacher_epochs: int
    train_options: dict[str, Any]  # graphmerge.train keywords for the teachers
    finetune_options: dict[str, Any]  # graphmerge.train keywords for every strategy's fine-tuning
    merge_options: dict[str, Any]  # graphmerge.merge keywords (the gate phase)
    higher_is_better: bool
    metric_name: str
    batch_size: int
    example: Callable[[], tuple] = field(default=lambda: ())

    def score(self, model: nn.Module) -> float:
        return self._score(model, self.data["test"])

    def val_score(self, model: nn.Module) -> float:
        return self._score(model, self.data["val"])

    def _score(self, model: nn.Module, data: TensorDataset) -> float:
        metrics = graphmerge.training.evaluate(model, data, "cross_entropy")
        return metrics["acc"] if self.higher_is_better else metrics["loss"] / math.log(2)

    def ensemble_score(self, models: Sequence[nn.Module]) -> float:
        """The models' mean next-token / class probabilities, scored on the test set."""
        x, y = self.data["test"].tensors
        logp_sum, correct = 0.0, 0
        with torch.no_grad():
            for m in models:
                m.eval()
            for s in range(0, len(x), 256):
                logp = torch.stack([F.log_softmax(m(x[s:s + 256]), -1) for m in models])
                mixed = torch.logsumexp(logp, 0) - math.log(len(models))
                target = y[s:s + 256]
                logp_sum += float(mixed.gather(-1, target.unsqueeze(-1)).sum())
                correct += int((mixed.argmax(-1) == target).sum())
        if self.higher_is_better:
            return correct / y.numel()
        return -logp_sum / y.numel() / math.log(2)


# --- tasks ----------------------------------------------------------------------------------------

def _adamw(lr: float, warmup: float = 0.1) -> graphmerge.Optimizer:
    return graphmerge.Optimizer("adamw", lr=lr, weight_decay=0.01, schedule="cosine", warmup=warmup, clip=1.0)


def chars_task(quick: bool) -> Task:
    size = (dict(d_model=16, n_heads=2, n_layers=1, context=32) if quick
            else dict(d_model=48, n_heads=4, n_layers=2, context=64))
    n_train = 12_000 if quick else 60_000
    train, val, test, _ = chars(size["context"], n_train, n_train // 5, n_train // 5)
    ft = {"optimizer": _adamw(3e-3, warmup=0.05), "batch_size": 32}
    return Task(name="chars", build=lambda: TinyGPT(**size), data={"train": train, "val": val, "test": test},
                teacher_data=[train, train], teacher_epochs=2 if quick else 8,
                train_options={"optimizer": _adamw(1e-2), "batch_size": 32},
                finetune_options=ft,
                merge_options={"weight_optimizer": _adamw(3e-3, warmup=0.0), "batch_size": 32},
                higher_is_better=False, metric_name="test bits/char", batch_size=32)


def _mnist1d_splits(n_train: int | None) -> dict[str, TensorDataset]:
    train, val, test, _ = mnist1d(n_val=500, seed=42)
    if n_train is not None:
        train = TensorDataset(*(t[:n_train] for t in train.tensors))
    return {"train": train, "val": val, "test": test}


def _sgd_options(lr: float = 0.05) -> dict[str, Any]:
    return {"lr": lr, "weight_decay": 5e-4, "batch_size": 32}


def mnist1d_task(quick: bool) -> Task:
    data = _mnist1d_splits(1000)
    return Task(name="mnist1d", build=lambda: MNIST1DCNN(channels=8, head_channels=12), data=data,
                teacher_data=[data["train"], data["train"]], teacher_epochs=10 if quick else 40,
                train_options=_sgd_options(), finetune_options=_sgd_options(0.01),
                merge_options={"weight_lr": 0.01, "weight_decay": 5e-4, "batch_size": 32},
                higher_is_better=True, metric_name="test accuracy", batch_size=32)


def disjoint_task(quick: bool) -> Task:
    data = _mnist1d_splits(None)
    x, y = data["train"].tensors
    halves = [TensorDataset(x[y < 5], y[y < 5]), TensorDataset(x[y >= 5], y[y >= 5])]
    return Task(name="disjoint", build=lambda: MNIST1DCNN(channels=16, head_channels=24), data=data,
                teacher_data=halves, teacher_epochs=10 if quick else 30,
                train_options=_sgd_options(), finetune_options=_sgd_options(0.01),
                merge_options={"weight_lr": 0.01, "weight_decay": 5e-4, "batch_size": 32},
                higher_is_better=True, metric_name="test accuracy (10 classes)", batch_size=32)


TASKS = {"chars": chars_task, "mnist1d": mnist1d_task, "disjoint": disjoint_task}


# --- strategies -----------------------------------------------------------------------------------

def finetune(task: Task, model: nn.Module, p: Plan | None, seed: int,
             distill_from: Sequence[nn.Module] | None = None) -> nn.Module:
    options = dict(task.finetune_options)
    if distill_from is not None:
        options.update(distill_from=list(distill_from), distill_weight=DISTILL_WEIGHT)
    return spend(model, task.data["train"], p, seed=seed, **options)


def zipit_mosaic(teachers: Sequence[nn.Module], groups: Any, inputs: torch.Tensor) -> nn.Module:
    """Every teacher aligned to the first by feature matching, then one mosaic of them."""
    aligned = [teachers[0]] + [feature_matching(teachers[0], t, groups, inputs)[0] for t in teachers[1:]]
    return mosaic(aligned, groups, bn_data=inputs)


def run_budget(task: Task, teachers: list[nn.Module], budget: float, seed: int,
               costs: dict[str, float], gate_share: float, wanted: Sequence[str] = STRATEGIES
               ) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """Every strategy's test score at extra FLOPs ``budget`` (in teacher-epochs), and what each spent."""
    n = len(task.data["train"])
    flops = budget * n * costs["small"]
    n_teachers = len(teachers)
    best = max(teachers, key=task.val_score) if task.higher_is_better else min(teachers, key=task.val_score)
    scores, spent, traces = {}, {}, {}
    if "best teacher + FT" in wanted:
        p = plan_budget(flops, costs["small"], n)
        scores["best teacher + FT"] = task.score(finetune(task, best, p, seed))
        spent["best teacher + FT"] = p

    groups = graphmerge.analyze(teachers[0], task.example())
    x_train = task.data["train"].tensors[0][:512]
    bn_data = TensorDataset(x_train, task.data["train"].tensors[1][:512])
    starts = {"weight avg + FT": lambda: weight_average(teachers, bn_data=bn_data),
              "re-basin avg + FT": lambda: rebasin_average(teachers, groups, bn_data, example_inputs=x_train[:32]),
              "zipit avg + FT": lambda: zipit_average(teachers, groups, x_train),
              "zipit mosaic + FT": lambda: zipit_mosaic(teachers, groups, x_train)}
    for name, start in starts.items():
        if name not in wanted:
            continue
        extra = n_teachers * costs["forward"] * len(x_train) if name.startswith("zipit") else 0.0
        p = plan_budget(flops - extra, costs["small"], n)
        scores[name] = task.score(finetune(task, start(), p, seed))
        spent[name] = {"matching": Plan(epochs=1, samples=len(x_train), flops=extra), "finetune": p} if extra else p

    if "magnitude select + FT" in wanted:  # graphmerge's compress without a gate phase: all of B fine-tunes
        big = graphmerge.widen(teachers, task.example())
        p = plan_budget(flops, costs["small"], n)
        keep = magnitude_scores(big)
        student = graphmerge.compress(big, keep)
        graphmerge.average_kept_teachers(student, big, teachers, keep)
        scores["magnitude select + FT"] = task.score(finetune(task, student, p, seed))
        spent["magnitude select + FT"] = p

    kd_cost = costs["small"] + n_teachers * costs["forward"]
    if "KD ensemble -> best" in wanted:
        p = plan_budget(flops, kd_cost, n)
        scores["KD ensemble -> best"] = task.score(finetune(task, best, p, seed, distill_from=teachers))
        spent["KD ensemble -> best"] = p

    gate = plan_budget(gate_share * flops, costs["gated"], n)
    for name, distill in (("graphmerge", None), ("graphmerge + KD", teachers)):
        if name not in wanted:
            continue
        if gate is None:
            scores[name], spent[name] = float("nan"), None
            continue
        result = graphmerge.merge([copy.deepcopy(t) for t in teachers],
                                  budget_subset(task.data["train"], gate.samples, seed), val_data=task.data["val"],
                                  gate_epochs=gate.epochs, finetune_epochs=0, seed=seed, preflight=False,
                                  example_inputs=task.example(), **task.merge_options)
        traces[name] = {"big": result.summary["big"], "trace": result.gate_trace}
        per_sample = costs["small"] + (n_teachers * costs["forward"] if distill is not None else 0.0)
        p = plan_budget(flops - gate.flops, per_sample, n)
        scores[name] = task.score(finetune(task, result.student, p, seed, distill_from=distill))
        spent[name] = {"gate": gate, "finetune": p}
    return scores, {k: _describe(v) for k, v in spent.items()}, traces


def _describe(value: Any) -> Any:
    if isinstance(value, Plan):
        return {"epochs": value.epochs, "samples": value.samples, "flops": value.flops}
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    return value


def train_teachers(task: Task, seed: int, count: int) -> list[nn.Module]:
    teachers = []
    for i in range(count):
        torch.manual_seed(1000 * seed + i)
        model = task.build()
        graphmerge.train(model, task.teacher_data[i], epochs=task.teacher_epochs, seed=1000 * seed + i,
                         **task.train_options)
        teachers.append(model.eval())
    return teachers


def measure_costs(task: Task, teachers: list[nn.Module]) -> dict[str, float]:
    train, b = task.data["train"], task.batch_size
    gated = graphmerge.add_gates(graphmerge.widen(teachers, task.example()))
    return {"small": train_flops_per_sample(teachers[0], train, batch_size=b),
            "forward": forward_flops_per_sample(teachers[0], train, batch_size=b),
            "gated": train_flops_per_sample(gated, train, batch_size=b)}


# --- the run --------------------------------------------------------------------------------------

def run_task(task: Task, seeds: Sequence[int], budgets: Sequence[float], gate_share: float,
             wanted: Sequence[str] = STRATEGIES, reference: str = REFERENCE) -> dict[str, Any]:
    x = task.data["train"].tensors[0]
    task.example = lambda: (x[:2],)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        started = time.perf_counter()
        teachers = train_teachers(task, seed, 2)
        costs = measure_costs(task, teachers)
        record = {"seed": seed, "teachers": [task.score(t) for t in teachers],
                  "ensemble": task.ensemble_score(teachers), "costs": costs, "budgets": {}}
        for budget in budgets:
            scores, spent, traces = run_budget(task, teachers, budget, seed, costs, gate_share, wanted)
            record["budgets"][str(budget)] = {"scores": scores, "spent": spent, "gate_traces": traces}
            print(f"[{task.name}] seed {seed} B={budget}: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        record["seconds"] = time.perf_counter() - started
        per_seed.append(record)
    return {"task": task.name, "metric": task.metric_name, "higher_is_better": task.higher_is_better,
            "per_seed": per_seed, "verdicts": verdicts(per_seed, budgets, task.higher_is_better, reference)}


def run_strategies(per_seed: list[dict[str, Any]]) -> list[str]:
    """The strategies a run measured, in the table's order."""
    measured = per_seed[0]["budgets"][next(iter(per_seed[0]["budgets"]))]["scores"]
    return [s for s in STRATEGIES if s in measured]


def verdicts(per_seed: list[dict[str, Any]], budgets: Sequence[float], higher: bool,
             reference: str = REFERENCE) -> dict[str, Any]:
    """Per budget: each strategy's median, and the reference against each other strategy, paired by seed."""
    out: dict[str, Any] = {}
    strategies = run_strategies(per_seed)
    for budget in budgets:
        values = {s: [r["budgets"][str(budget)]["scores"][s] for r in per_seed] for s in strategies}
        best_teacher = [max(r["teachers"]) if higher else min(r["teachers"]) for r in per_seed]
        ensemble = [r["ensemble"] for r in per_seed]
        out[str(budget)] = {
            "median": {s: float(np.nanmedian(v)) for s, v in values.items()},
            "best teacher (no training)": float(np.median(best_teacher)),
            "ensemble (2x)": float(np.median(ensemble)),
            "reference": reference,
            "paired": {s: compare.paired(values[reference], values[s], higher) for s in strategies
                       if s != reference and len(per_seed) > 1},
        }
    return out


def markdown(results: list[dict[str, Any]], budgets: Sequence[float], command: str) -> str:
    lines = [f"# Post-hoc regime: best single model at equal extra FLOPs\n\n`{command}`\n"]
    for result in results:
        per_seed = result["per_seed"]
        higher = result["higher_is_better"]
        best = [max(r["teachers"]) if higher else min(r["teachers"]) for r in per_seed]
        gap = np.median([(e - b) if higher else (b - e) for e, b in zip([r["ensemble"] for r in per_seed], best,
                                                                      strict=True)])
        lines.append(f"\n## {result['task']} ({result['metric']}, {'higher' if higher else 'lower'} is better; "
                     f"{len(per_seed)} seeds; ensemble better than the best teacher by {gap:.4f} (median))\n")
        header = ["strategy"] + [f"B={b}" for b in budgets]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        v = result["verdicts"]
        strategies = run_strategies(per_seed)
        reference = v[str(budgets[0])]["reference"]
        for s in strategies:
            lines.append(f"| {s} | " + " | ".join(f"{v[str(b)]['median'][s]:.4f}" for b in budgets) + " |")
        for extra in ("best teacher (no training)", "ensemble (2x)"):
            lines.append(f"| {extra} | " + " | ".join(f"{v[str(b)][extra]:.4f}" for b in budgets) + " |")
        lines.append(f"\n{reference} minus each strategy (paired by seed; 95 % bootstrap interval; verdict):\n")
        lines.append("| vs | " + " | ".join(f"B={b}" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for s in strategies:
            if s == reference or not v[str(budgets[0])]["paired"]:
                continue
            cells = []
            for b in budgets:
                p = v[str(b)]["paired"][s]
                low, high = p["ci95"]
                cells.append(f"{p['mean']:+.4f} [{low:+.4f}, {high:+.4f}] {p['verdict']}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], budgets: Sequence[float], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for s in run_strategies(result["per_seed"]):
            ax.plot(budgets, [result["verdicts"][str(b)]["median"][s] for b in budgets], marker="o", label=s)
        ax.axhline(result["verdicts"][str(budgets[0])]["ensemble (2x)"], color="k", ls="--", label="ensemble (2x)")
        ax.set_xscale("log")
        ax.set_xlabel("extra training FLOPs (teacher-epochs)")
        ax.set_ylabel(result["metric"])
        ax.set_title(result["task"])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_traces(results: list[dict[str, Any]], budgets: Sequence[float], path: Path) -> None:
    """Validation metric (eval gates) through each gate phase of the plain graphmerge strategy: one line
    per seed, one panel per task and budget, starting (classification) from the big student before it."""
    fig, axes = plt.subplots(len(results), len(budgets), figsize=(4 * len(budgets), 3 * len(results)),
                             squeeze=False)
    for row, result in zip(axes, results, strict=True):
        for ax, budget in zip(row, budgets, strict=True):
            for r in result["per_seed"]:
                run = r["budgets"][str(budget)]["gate_traces"].get("graphmerge")
                if not run or not run["trace"]:
                    continue
                higher = result["higher_is_better"]
                scale = 1 if higher else math.log(2)
                values = [e["val_acc" if higher else "val_loss"] / scale for e in run["trace"]]
                start = [run["big"]] if higher else []  # the recipe's summary holds the big student's accuracy
                ax.plot(([0] if higher else []) + [e["progress"] for e in run["trace"]], start + values)
            ax.set_title(f"{result['task']}, B={budget}", fontsize=9)
            ax.set_xlabel("fraction of the gate phase")
            ax.set_ylabel("val accuracy" if result["higher_is_better"] else "val bits/char")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--gate-share", type=float, default=0.5, help="share of B spent in the gate phase")
    parser.add_argument("--quick", action="store_true", help="tiny models and data (smoke test)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SETTING=VALUE",
                        help="merge settings for the graphmerge strategies, e.g. gate_lr=1.0 budget_ramp=0.2")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES, metavar="STRATEGY",
                        help=f"a subset of: {', '.join(STRATEGIES)}")
    parser.add_argument("--reference", default=REFERENCE, choices=STRATEGIES,
                        help="the strategy compared with every other (paired by seed)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.reference not in args.strategies:
        parser.error(f"--reference {args.reference!r} is not among --strategies")
    torch.set_num_threads(1)
    results = []
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    for name in args.tasks:
        task = TASKS[name](args.quick)
        task.merge_options.update(overrides)
        results.append(run_task(task, range(args.seeds), args.budgets, args.gate_share, args.strategies,
                                args.reference))
    command = "python benchmarks/posthoc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": 1, "command": command, "gate_share": args.gate_share, "budgets": args.budgets,
            "merge_overrides": overrides}
    (args.out / "posthoc.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    (args.out / "posthoc.md").write_text(markdown(results, args.budgets, command))
    plot(results, args.budgets, args.out / "posthoc.png")
    plot_traces(results, args.budgets, args.out / "posthoc_gate_traces.png")
    print(markdown(results, args.budgets, command))
    return results


if __name__ == "__main__":
    main()
