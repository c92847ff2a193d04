"""Pair the strategies of one post-hoc run with those of another, seed by seed.

``posthoc.py`` trains each seed's teachers deterministically (same seeds, same data, same recipe), so
a run that measures only a new strategy can be compared with an earlier run's strategies without
training them again: this script checks that the teachers scored the same in both runs, then prints
the new run's strategies minus every earlier one (paired by seed, 95 % bootstrap interval) and
writes the table as JSON.

    python benchmarks/posthoc_pairs.py benchmarks/results/posthoc_magnitude/posthoc.json \\
        --against benchmarks/results/posthoc/posthoc.json benchmarks/results/posthoc_magnitude_chars/posthoc.json \\
        benchmarks/results/posthoc_chars/posthoc.json --out benchmarks/results/posthoc_magnitude/pairs.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent))

import compare  # noqa: E402


def _results(paths: list[Path]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for result in json.loads(path.read_text())["results"]:
            merged[result["task"]] = result
    return merged


def pairs(new: dict[str, dict[str, Any]], old: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for task, result in new.items():
        if task not in old:
            continue
        seeds = min(len(result["per_seed"]), len(old[task]["per_seed"]))
        for a, b in zip(result["per_seed"][:seeds], old[task]["per_seed"][:seeds], strict=True):
            if not np.allclose(a["teachers"], b["teachers"]):
                raise SystemExit(f"{task} seed {a['seed']}: the teachers differ between the runs "
                                 f"({a['teachers']} vs {b['teachers']}); pair only runs of one recipe.")
        higher = result["higher_is_better"]
        for budget in result["per_seed"][0]["budgets"]:
            if budget not in old[task]["per_seed"][0]["budgets"]:
                continue
            for strategy in result["per_seed"][0]["budgets"][budget]["scores"]:
                mine = [r["budgets"][budget]["scores"][strategy] for r in result["per_seed"][:seeds]]
                for other in old[task]["per_seed"][0]["budgets"][budget]["scores"]:
                    theirs = [r["budgets"][budget]["scores"][other] for r in old[task]["per_seed"][:seeds]]
                    paired = compare.paired(mine, theirs, higher)
                    rows.append({"task": task, "budget": float(budget), "strategy": strategy, "median": float(
                        np.median(mine)), "vs": other, "vs_median": float(np.median(theirs)), "seeds": seeds,
                        "mean_diff": paired["mean"], "ci95": paired["ci95"], "verdict": paired["verdict"]})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", nargs="+", type=Path, help="posthoc.json files of the new strategies")
    parser.add_argument("--against", nargs="+", type=Path, required=True, help="posthoc.json files to pair with")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    rows = pairs(_results(args.new), _results(args.against))
    for r in rows:
        low, high = r["ci95"]
        print(f"{r['task']:9s} B={r['budget']:<5g} {r['strategy']} {r['median']:.4f} - {r['vs']} {r['vs_median']:.4f}: "
              f"{r['mean_diff']:+.4f} [{low:+.4f}, {high:+.4f}] {r['verdict']}")
    if args.out:
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps({"command": "python benchmarks/posthoc_pairs.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "rows": rows}, indent=1) + "\n")
        partial.replace(args.out)
    return rows


if __name__ == "__main__":
    main()
