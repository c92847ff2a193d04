"""Character-level language modelling (``chars``): the student against one model, bo3, the ensemble
and weight averaging, in test bits per character, with cost, equal compute, distillation and paired
statistics (issue #12).

Data: graphmerge's built-in ``chars`` set (the source of a fixed list of Python standard-library
modules, bytes clipped to 0-127, split by position; windows of ``context`` characters, every
position predicted). Model: ``graphmerge.examples.tiny_gpt`` (rotary attention, RMSNorm, GELU MLP).
Metric: test cross-entropy over every position of the test windows, in bits per character (nats /
ln 2; lower is better).

Every run goes through graphmerge's own recipe, one model at a time on one thread: teachers, the
from-scratch baselines and weight averaging's fine-tuning are ``graphmerge.recipe.train``; the
students are ``graphmerge.merge`` (widen -> add_gates -> gate phase, projected budget -> compress
-> fine-tune), three times per seed from the same teachers and merge seed, differing only in
``distill`` (None, "big", "teachers"), so their gate phases are identical and only fine-tuning
differs. Budget (unit u, default 1 epoch): teachers 2u each (lr 0.1), gate phase u, fine-tuning u
(lr 0.05, ``--merge-lr``): 6u model-epochs at the paper's equal-epoch accounting. Strategies per seed s:

- **student**, **student (distill big)**, **student (distill teachers)**: teachers A, B (seeds
  1000s+1, 1000s+2); distillation weight 0.5, temperature 1.
- **bo3 model**: A, B and C (1000s+3), the best on validation.   **one model**: 6u epochs.
- **one model (equal FLOPs)** / **bo3 (equal FLOPs)**: as many epochs as make the training FLOPs
  (``FlopCounterMode``) the plain student pipeline's (``common.equal_compute``).
- **ensemble (2x cost)**: A and B, their next-character probabilities averaged (2x inference).
- **weight avg**: A and B averaged weight by weight, fine-tuned u.   **re-basin avg**: B aligned
  to A by weight matching on the coupling groups first (``graphmerge.align.rebasin_average``).

The full run trains on the corpus's first 100 000 characters (half the CLI's default) so that 5
seeds fit in about 40 minutes on one shared core (measured: 1 322 s at unit 1); ``--merge-lr`` sets
the merge phases' learning rate (default 0.05, the README's tiny_gpt example), ``--unit`` the budget.

    python benchmarks/chars.py --out benchmarks/results/paired         # 5 seeds, unit 1
    python benchmarks/chars.py --quick --out /tmp/c                     # smoke test: 1 seed, tiny model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # appended: benchmarks/mnist1d.py must not shadow the package

import common  # noqa: E402
import compare  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.align import rebasin_average  # noqa: E402
from graphmerge.alternatives import weight_average  # noqa: E402
from graphmerge.data import chars  # noqa: E402
from graphmerge.examples.tiny_gpt import TinyGPT  # noqa: E402
from graphmerge.recipe import merge, train  # noqa: E402
from graphmerge.training import evaluate  # noqa: E402

FULL = {"d_model": 64, "n_heads": 4, "n_layers": 2, "context": 64, "n_train": 100_000, "n_val": 20_000,
        "n_test": 20_000}
QUICK = {"d_model": 16, "n_heads": 2, "n_layers": 1, "context": 32, "n_train": 8_000, "n_val": 2_000,
         "n_test": 2_000}
BATCH = 32
LR = 0.1  # every from-scratch model (teachers, one model, bo3), default milestones: /10 at 1/2 and 3/4
MERGE_LR = 0.05  # the gate phase's weights and every fine-tuning
DISTILL = {"student": None, "student (distill big)": "big", "student (distill teachers)": "teachers"}
STUDENT_VARIANTS = list(DISTILL)
BASELINES = ["bo3 model", "one model", "one model (equal FLOPs)", "bo3 (equal FLOPs)", "ensemble (2x cost)",
             "weight avg", "re-basin avg"]
DESCRIPTIONS = {
    "student": "2 teachers (2u), graphmerge.merge: gate phase u (projected budget), compress, fine-tune u",
    "student (distill big)": "as student, fine-tuning distilled from the gated big student (weight 0.5)",
    "student (distill teachers)": "as student, fine-tuning distilled from the teachers' mean logits (weight 0.5)",
    "bo3 model": "three models of 2u epochs, the best on validation",
    "one model": "one model, 6u epochs",
    "one model (equal FLOPs)": "one model, as many epochs as make its training FLOPs the student pipeline's",
    "bo3 (equal FLOPs)": "three models whose training FLOPs add up to the student pipeline's, best on validation",
    "ensemble (2x cost)": "the two teachers' next-character probabilities averaged: 2x inference",
    "weight avg": "the two teachers averaged weight by weight, fine-tuned u",
    "re-basin avg": "weight matching on the coupling groups (B aligned to A), averaged, fine-tuned u",
}
WALL_NOTE = ("Seconds per run: every model trains on its own, one at a time, so each model's training is timed "
             "directly (its per-epoch validation and the recipe's own evaluations included); a strategy's seconds "
             "are the sum over its pipeline, teachers included (teachers shared by several strategies are counted "
             "in full for each). A merge's seconds are the whole graphmerge.merge call (widen, add_gates, gate "
             "phase, compress, fine-tuning). Test evaluation is not counted. On a shared CPU: compare ratios.")


def load(settings: dict[str, int]) -> dict[str, TensorDataset]:
    """Train / validation / test windows of the built-in ``chars`` corpus."""
    train_data, val, test, _ = chars(settings["context"], settings["n_train"], settings["n_val"], settings["n_test"])
    return {"train": train_data, "val": val, "test": test}


def builder(settings: dict[str, int]) -> Callable[[], nn.Module]:
    return lambda: TinyGPT(d_model=settings["d_model"], n_heads=settings["n_heads"], n_layers=settings["n_layers"],
                           context=settings["context"])


def bits_per_char(model: nn.Module, data: TensorDataset) -> float:
    """Mean cross-entropy over every predicted character of ``data``, in bits."""
    return evaluate(model, data, "cross_entropy")["loss"] / math.log(2)


@torch.no_grad()
def ensemble_bits_per_char(models: list[nn.Module], data: TensorDataset, batch_size: int = 256) -> float:
    """Bits per character of the mean of the models' next-character distributions."""
    x, y = data.tensors
    total = 0.0
    for m in models:
        m.eval()
    for s in range(0, len(x), batch_size):
        logp = torch.stack([F.log_softmax(m(x[s:s + batch_size]), -1) for m in models])
        mixed = torch.logsumexp(logp, 0) - math.log(len(models))
        total += float(-mixed.gather(-1, y[s:s + batch_size].unsqueeze(-1)).sum())
    return total / y.numel() / math.log(2)


def costs(build: Callable[[], nn.Module], data: dict[str, TensorDataset]) -> tuple[common.Costs, float]:
    """FLOPs per training window (``common.flops_per_sample``) of a model and of the gated big student
    of two, and per eval forward of each (the big one is the "big" distillation target)."""
    x, y = data["train"].tensors
    xb, yb = x[:BATCH], y[:BATCH]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pair = [build().eval() for _ in range(2)]
        gated = graphmerge.add_gates(graphmerge.widen(pair, (xb[:2],)))
    c = common.Costs(small=common.flops_per_sample(pair[0], xb, yb, "lm"),
                     gated2=common.flops_per_sample(gated, xb, yb, "lm"), gated3=0.0,
                     forward=common.flops_per_sample(pair[0], xb, yb, "lm", backward=False),
                     n_train=len(x), n_val=len(data["val"]), n_bn=0)
    return c, common.flops_per_sample(gated, xb, yb, "lm", backward=False)


def strategy_flops(b: common.Budget, c: common.Costs, eq: common.EqualCompute, big_forward: float,
                   distill_forwards: dict[str, float]) -> dict[str, float]:
    """Training FLOPs of each strategy's pipeline per run, teachers included; bo3's pick on validation
    and the distillation targets' forwards (``model_forwards`` windows x the target's forward) added."""
    teachers = 2 * c.train(c.small, b.teacher)
    student = common.student_flops(b, c)
    pick = 3 * c.n_val * c.forward
    return {
        "student": student,
        "student (distill big)": student + distill_forwards["big"] * big_forward,
        "student (distill teachers)": student + distill_forwards["teachers"] * c.forward,
        "bo3 model": 3 * c.train(c.small, b.teacher) + pick,
        "one model": c.train(c.small, b.total),
        "one model (equal FLOPs)": c.train(c.small, eq.one),
        "bo3 (equal FLOPs)": 3 * c.train(c.small, eq.bo3) + pick,
        "ensemble (2x cost)": teachers,
        "weight avg": teachers + c.train(c.small, b.unit),
        "re-basin avg": teachers + c.train(c.small, b.unit),
    }


def strategy_epochs(b: common.Budget, eq: common.EqualCompute) -> dict[str, int]:
    merged = 2 * b.teacher + 2 * b.unit
    return {**dict.fromkeys(STUDENT_VARIANTS, merged), "bo3 model": 3 * b.teacher, "one model": b.total,
            "one model (equal FLOPs)": eq.one, "bo3 (equal FLOPs)": 3 * eq.bo3, "ensemble (2x cost)": 2 * b.teacher,
            "weight avg": 2 * b.teacher + b.unit, "re-basin avg": 2 * b.teacher + b.unit}


class Run:
    """One seed's models, trained one at a time, each timed."""

    def __init__(self, seed: int, build: Callable[[], nn.Module], data: dict[str, TensorDataset],
                 log: Callable[[str], None]) -> None:
        self.seed, self.build, self.data, self.log = seed, build, data, log

    def scratch(self, index: int, epochs: int) -> tuple[nn.Module, float]:
        """A model from seed ``1000·seed + index``, trained ``epochs`` epochs at ``LR``."""
        t0 = time.perf_counter()
        torch.manual_seed(1000 * self.seed + index)
        model = train(self.build(), self.data["train"], epochs=epochs, val_data=self.data["val"], lr=LR,
                      batch_size=BATCH, seed=1000 * self.seed + index).model.eval()
        return model, time.perf_counter() - t0

    def finetune(self, model: nn.Module, epochs: int, lr: float) -> nn.Module:
        return train(model, self.data["train"], epochs=epochs, val_data=self.data["val"], lr=lr,
                     batch_size=BATCH, seed=1000 * self.seed + 9).model.eval()


def run_seed(seed: int, b: common.Budget, eq: common.EqualCompute, build: Callable[[], nn.Module],
             data: dict[str, TensorDataset], args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Every strategy of one seed: test and validation bits per character, seconds, the merges' reports."""
    run = Run(seed, build, data, log)
    test, val = data["test"], data["val"]
    out: dict[str, Any] = {"test": {}, "val": {}, "wall_s": {}, "merge": {}}
    abc = [run.scratch(k, b.teacher) for k in (1, 2, 3)]
    teachers = [m for m, _ in abc[:2]]
    pair_s = abc[0][1] + abc[1][1]
    out["teachers"] = [bits_per_char(m, test) for m in teachers]
    picked = min(abc, key=lambda ms: bits_per_char(ms[0], val))[0]
    out["test"]["bo3 model"], out["wall_s"]["bo3 model"] = bits_per_char(picked, test), sum(s for _, s in abc)
    for name, index, epochs in (("one model", 4, b.total), ("one model (equal FLOPs)", 5, eq.one)):
        model, seconds = run.scratch(index, epochs)
        out["test"][name], out["wall_s"][name] = bits_per_char(model, test), seconds
    three = [run.scratch(k, eq.bo3) for k in (6, 7, 8)]
    picked = min(three, key=lambda ms: bits_per_char(ms[0], val))[0]
    out["test"]["bo3 (equal FLOPs)"], out["wall_s"]["bo3 (equal FLOPs)"] = (bits_per_char(picked, test),
                                                                             sum(s for _, s in three))
    out["test"]["ensemble (2x cost)"] = ensemble_bits_per_char(teachers, test)
    out["wall_s"]["ensemble (2x cost)"] = pair_s
    log(f"  seed {seed}: teachers {out['teachers'][0]:.3f} {out['teachers'][1]:.3f}, one model "
        f"{out['test']['one model']:.3f}, ensemble {out['test']['ensemble (2x cost)']:.3f} bits/char")
    groups = graphmerge.analyze(teachers[0], (data["train"].tensors[0][:2],))
    for name, combine in (("weight avg", lambda: weight_average(teachers)),
                          ("re-basin avg", lambda: rebasin_average(teachers, groups,
                                                                     example_inputs=data["train"].tensors[0][:32]))):
        t0 = time.perf_counter()
        model = run.finetune(combine(), b.unit, args.merge_lr)
        out["test"][name], out["val"][name] = bits_per_char(model, test), bits_per_char(model, val)
        out["wall_s"][name] = pair_s + time.perf_counter() - t0
    for name, distill in DISTILL.items():
        extra = {"distill_weight": args.distill_weight, "temperature": args.temperature} if distill else {}
        t0 = time.perf_counter()
        result = merge([copy.deepcopy(t) for t in teachers], data["train"], val_data=val, loss="cross_entropy",
                       gate_epochs=b.unit, finetune_epochs=b.unit, batch_size=BATCH, weight_lr=args.merge_lr,
                       finetune_lr=args.merge_lr, seed=seed, distill=distill, **extra, **args.overrides)
        out["wall_s"][name] = pair_s + time.perf_counter() - t0
        out["test"][name], out["val"][name] = bits_per_char(result.student, test), bits_per_char(result.student, val)
        out["merge"][name] = {"open_fraction": {str(k): float(v) for k, v in result.open_fraction.items()},
                              "teacher_share": {str(k): [int(c) for c in v] for k, v in result.teacher_share.items()},
                              "distill": result.summary.get("distill"),
                              "gate_trace": result.gate_trace,
                              "val_accuracy": {k: result.summary[k] for k in ("teachers", "big", "before_finetune",
                                                                              "after_finetune")}}
        log(f"  seed {seed}: {name} {out['test'][name]:.3f} bits/char ({out['wall_s'][name]:.0f} s with teachers)")
    return out


def distill_table(values: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Each distilled student minus the plain student, run by run (the same gate phase)."""
    return [{"variant": name, "baseline": "student", **compare.paired(values[name], values["student"], False)}
            for name in STUDENT_VARIANTS[1:]]


def distill_view(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the distillation comparisons in place of the paired table (for compare's
    tables and plots)."""
    return {**result, "benchmark": "chars distillation",
            "paired": {"comparisons": result["distill_paired"], "best_student_variant": "student",
                       "higher_is_better": False}}


def markdown_report(result: dict[str, Any], command: str) -> str:
    title, columns, rows = compare.paired_rows(result)
    _, _, distill_rows = compare.paired_rows(distill_view(result))
    s = result["settings"]
    return "\n\n".join([
        f"# chars: {result['metric']}, {result['runs']} seeds\n\n`{command}`",
        f"TinyGPT d_model {s['d_model']}, {s['n_heads']} heads, {s['n_layers']} layers, context {s['context']}; "
        f"{s['n_train']} training characters. Budget: {json.dumps(result['budget'])}.",
        common.markdown_table(result), f"{title}:", compare.markdown(columns, rows),
        "Distillation in fine-tuning (same teachers and gate phase; distilled minus plain student):",
        compare.markdown(columns, distill_rows),
        f"Wall time {result['timings_s']['total_s']:.0f} s. {WALL_NOTE}"]) + "\n"


def plot_gate_traces(result: dict[str, Any], path: Path) -> None:
    """Validation bits per character of the gated big student (eval gates) through each merge's gate
    phase (``MergeResult.gate_trace``), one line per seed and merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for seed, merges in enumerate(result["merges"]):
        for k, (name, merge_record) in enumerate(merges.items()):
            trace = merge_record.get("gate_trace") or []
            if trace:
                ax.plot([e["progress"] for e in trace], [e["val_loss"] / math.log(2) for e in trace],
                        color=f"C{k}", alpha=0.7, label=name if seed == 0 else None)
    ax.set_xlabel("fraction of the gate phase")
    ax.set_ylabel("validation bits/char, eval gates")
    ax.set_title("the gated big student through the gate phase", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a tiny model on 8 000 characters (smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="seeds (default 5; quick 1)")
    parser.add_argument("--unit", type=int, default=1, help="u: teachers 2u epochs, gate u, fine-tune u")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "paired", help="folder for chars.* results")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--merge-lr", type=float, default=MERGE_LR,
                        help="lr of the gate phase's weights and of every fine-tuning (weight averaging's too)")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--set", nargs="*", default=[], metavar="SETTING=VALUE",
                        help="merge settings for every merge, e.g. average_kept=false (JSON values)")
    args = parser.parse_args(argv)
    args.overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    runs = args.runs or (1 if args.quick else 5)
    data = load(settings)
    build = builder(settings)
    b = common.Budget(unit=args.unit, lr=LR, batch_size=BATCH)
    c, big_forward = costs(build, data)
    eq = common.equal_compute(b, c)
    log = lambda line: print(line, flush=True)  # noqa: E731
    log(f"chars: {runs} seeds, unit {b.unit}; equal FLOPs: one model {eq.one} epochs, bo3 {eq.bo3} each")
    t0 = time.perf_counter()
    per_seed = [run_seed(args.seed + i, b, eq, build, data, args, log) for i in range(runs)]
    names = STUDENT_VARIANTS + BASELINES
    values = {n: [r["test"][n] for r in per_seed] for n in names}
    val_means = {n: float(np.mean([r["val"][n] for r in per_seed])) for n in STUDENT_VARIANTS}
    best = min(STUDENT_VARIANTS, key=val_means.__getitem__)
    forwards = {d: float(np.mean([r["merge"][n]["distill"]["model_forwards"] for r in per_seed]))
                for n, d in DISTILL.items() if d}
    result = {
        "benchmark": "chars", "task": "language modelling", "runs": runs, "higher_is_better": False,
        "metric": "test bits per character (lower is better)", "settings": {**settings, "batch_size": BATCH},
        "budget": {"unit": b.unit, "teacher_epochs": b.teacher, "gate_epochs": b.unit, "finetune_epochs": b.unit,
                   "total": b.total, "lr": LR, "merge_lr": args.merge_lr, "batch_size": BATCH,
                   "gate_budget": "projected (graphmerge.merge default)", "distill_weight": args.distill_weight,
                   "temperature": args.temperature, "equal_flops_one_model_epochs": eq.one,
                   "equal_flops_bo3_epochs_each": eq.bo3, "merge_overrides": args.overrides},
        "epochs": strategy_epochs(b, eq), "descriptions": DESCRIPTIONS,
        "values": values, "stats": {n: common.summary(values[n]) for n in names},
        "teachers": [r["teachers"] for r in per_seed],
        "flops": strategy_flops(b, c, eq, big_forward, forwards),
        "flops_per_sample": {"small_train": c.small, "gated_N2_train": c.gated2, "small_eval_forward": c.forward,
                             "gated_N2_eval_forward": big_forward, "distill_model_forwards": forwards,
                             "samples": {"train": c.n_train, "val": c.n_val},
                             "note": "per window of `context` characters: FlopCounterMode on one training batch "
                                     "(forward, loss, backward) divided by the batch size; it counts the matmuls "
                                     "(linear layers); scaled_dot_product_attention's own products are not "
                                     "counted by it on this CPU"},
        "wall_s": {n: [r["wall_s"][n] for r in per_seed] for n in names}, "wall_note": WALL_NOTE,
        "val_student_variants": val_means, "best_student_variant": best,
        "paired": compare.paired_table(values, best, BASELINES, False),
        "distill_paired": distill_table(values),
        "merges": [r["merge"] for r in per_seed],
        "timings_s": {"total_s": time.perf_counter() - t0}, "machine": common.machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chars.json").write_text(json.dumps(result, indent=1) + "\n")
    command = "python benchmarks/chars.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "chars.md").write_text(markdown_report(result, command.strip()))
    common.print_table(result)
    compare.print_rich(*compare.paired_rows(distill_view(result)))
    compare.plot_paired(result, args.out / "chars_paired.png")
    compare.plot_paired(distill_view(result), args.out / "chars_distill_paired.png")
    compare.plot_cost(result, args.out / "chars_cost.png")
    plot_gate_traces(result, args.out / "chars_gate_traces.png")
    return result


if __name__ == "__main__":
    main()
