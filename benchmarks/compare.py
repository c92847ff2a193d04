"""Paired comparisons of the benchmarks' strategies, seed by seed, and their tables and plots.

Run ``i`` of every strategy shares its seed (its teachers, data order and test set), so each
comparison is made on the per-run differences ``variant[i] - baseline[i]``: their mean, a 95 %
percentile bootstrap confidence interval of that mean (10 000 resamples of the runs, fixed seed),
and the Wilcoxon signed-rank test's p-value (``scipy.stats.wilcoxon``, two-sided). The verdict
that the README states follows the interval alone: "win" only when it excludes 0 on the better
side, "loss" when it excludes 0 on the worse side, "no difference" otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """"win" when the interval of ``variant - baseline`` excludes 0 on the better side, "loss" when
    it excludes 0 on the worse side, else "no difference"."""
    if low > 0:
        return "win" if higher_is_better else "loss"
    if high < 0:
        return "loss" if higher_is_better else "win"
    return "no difference"


def bootstrap_ci(differences: Sequence[float], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the runs resampled with replacement."""
    d = np.asarray(differences, dtype=float)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def wilcoxon_p(differences: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is 0, None below 2 runs."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return None
    if not np.any(d):
        return 1.0
    return float(wilcoxon(d).pvalue)


def paired(variant: Sequence[float], baseline: Sequence[float], higher_is_better: bool) -> dict[str, Any]:
    """The paired comparison of two strategies' per-run values (same runs, same order)."""
    d = np.asarray(variant, dtype=float) - np.asarray(baseline, dtype=float)
    low, high = bootstrap_ci(d)
    return {"differences": d.tolist(), "mean": float(d.mean()), "ci95": [low, high], "wilcoxon_p": wilcoxon_p(d),
            "verdict": verdict(low, high, higher_is_better)}


def paired_table(values: Mapping[str, Sequence[float]], best: str, baselines: Sequence[str],
                 higher_is_better: bool) -> dict[str, Any]:
    """The student, and the best student variant (on validation) when it is another, minus every
    baseline."""
    variants = ["student"] + ([best] if best != "student" else [])
    return {"higher_is_better": higher_is_better, "resamples": RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED,
            "best_student_variant": best,
            "comparisons": [{"variant": v, "baseline": b, **paired(values[v], values[b], higher_is_better)}
                            for v in variants for b in baselines]}


PAIRED_COLUMNS = ("variant - baseline", "mean diff", "95% CI", "Wilcoxon p", "verdict")


def paired_rows(result: Mapping[str, Any]) -> tuple[str, tuple[str, ...], list[list[str]]]:
    """Title, columns and rows of the paired table of a benchmark result."""
    table = result["paired"]
    best = table["best_student_variant"]
    better = "higher" if table["higher_is_better"] else "lower"
    title = (f"{result['benchmark']}: paired differences over {result['runs']} runs ({better} is better; "
             f"best student variant on validation: {best})")
    rows = []
    for c in table["comparisons"]:
        p = "n/a" if c["wilcoxon_p"] is None else f"{c['wilcoxon_p']:.3g}"
        rows.append([f"{c['variant']} - {c['baseline']}", f"{c['mean']:+.4f}",
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]", p, c["verdict"]])
    return title, PAIRED_COLUMNS, rows


def print_rich(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for k, column in enumerate(columns):
        table.add_column(column, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_paired(result: Mapping[str, Any], path: Path) -> None:
    """Per variant, one row per baseline: each run's difference (dots), the mean (black bar) and
    its 95 % bootstrap interval (line); the better side of 0 is labelled."""
    comparisons = result["paired"]["comparisons"]
    variants = list(dict.fromkeys(c["variant"] for c in comparisons))
    fig, axes = plt.subplots(1, len(variants), figsize=(7 * len(variants), 0.42 * len(comparisons) / len(variants)
                                                        + 1.8), squeeze=False, sharey=True)
    rng = np.random.default_rng(0)
    for ax, variant in zip(axes[0], variants, strict=True):
        rows = [c for c in comparisons if c["variant"] == variant]
        for y, c in enumerate(rows):
            d = np.asarray(c["differences"])
            ax.scatter(d, y + rng.uniform(-0.15, 0.15, len(d)), s=10, alpha=0.6,
                       color={"win": "C2", "loss": "C3"}.get(c["verdict"], "C0"))
            ax.plot(c["ci95"], [y, y], color="black", lw=1.5)
            ax.scatter([c["mean"]], [y], marker="|", s=200, color="black")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(rows)), [c["baseline"] for c in rows])
        ax.invert_yaxis()
        better = "→ better" if result["paired"]["higher_is_better"] else "← better"
        ax.set_xlabel(f"{variant} − baseline, per run ({result['metric']}; {better})")
        ax.set_title(f"{result['benchmark']}: {variant} vs baselines, {result['runs']} runs "
                     "(green: win, red: loss)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(result: Mapping[str, Any], path: Path) -> None:
    """Quality against cost: per strategy, each run (faint) and the mean (marker, labelled), against
    the pipeline's training FLOPs (left) and attributed wall seconds (right)."""
    names = list(result["values"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for k, name in enumerate(names):
        v = np.asarray(result["values"][name])
        costs = (np.full(len(v), result["flops"][name]), np.asarray(result["wall_s"][name]))
        for ax, c in zip(axes, costs, strict=True):
            ax.scatter(c, v, s=8, alpha=0.25, color=f"C{k % 10}")
            ax.scatter([c.mean()], [v.mean()], s=50, color=f"C{k % 10}", marker="os^D"[k // 10 % 4],
                       edgecolor="black", label=name)
            ax.annotate(name, (c.mean(), v.mean()), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training FLOPs of the whole pipeline per run (FlopCounterMode)")
    axes[1].set_xlabel("wall seconds per run (attributed; see wall_note in the JSON)")
    axes[0].set_ylabel(result["metric"])
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle(f"{result['benchmark']}: quality against cost, {result['runs']} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the paired table of benchmark result JSONs; for results written before the paired
    statistics existed, compute it (the student against every other strategy in the file)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="benchmark result JSON files")
    for path in parser.parse_args(argv).results:
        result = json.loads(path.read_text())
        if "paired" not in result:
            higher = "higher is better" in result["metric"]
            others = [n for n in result["values"] if n != "student"]
            result["paired"] = paired_table(result["values"], "student", others, higher)
            result["paired"]["best_student_variant"] = "not chosen (no validation values in this file)"
        title, columns, rows = paired_rows(result)
        print(f"{path}: {title}\n\n{markdown(columns, rows)}\n")


if __name__ == "__main__":
    main()
