"""Which way the reproduction benchmarks should train a stack of runs: one ``vmap`` call or a loop.

``common.train`` computes every run's gradient either with one ``vmap`` over the stacked
parameters or with the same functional gradient called once per run (``--mode`` of the task
scripts). Which is faster depends on the model and the CPU; this times one epoch of each mode
for each task's model, side by side and interleaved, and reports medians and the ratio.

    python benchmarks/train_modes.py                  # writes benchmarks/results/train_modes.json
    python benchmarks/train_modes.py --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from digits import DigitsLeNet  # noqa: E402

from graphmerge.examples.mlp import SineMLP  # noqa: E402
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN  # noqa: E402

# task: (model, runs in one stack, input shape of one sample, task kind, batch size), as the
# task scripts train them (sine: the 7 from-scratch models of each of its 50 runs).
TASKS = {
    "sine": (SineMLP, 350, (1,), "regression", 32),
    "mnist1d": (MNIST1DCNN, 70, (1, 40), "classification", 128),
    "digits": (DigitsLeNet, 70, (1, 8, 8), "classification", 64),
}


def epoch_seconds(task: str, mode: str, steps: int) -> float:
    build, runs, shape, kind, batch = TASKS[task]
    torch.manual_seed(0)
    stack = common.Stack.of([build() for _ in range(runs)])
    x = torch.randn(steps * batch, *shape)
    y = torch.randn(len(x), 1) if kind == "regression" else torch.randint(0, 10, (len(x),))
    phase = common.Phase(0, 1, batch, lambda e: torch.full((runs,), 0.01))
    start = time.perf_counter()
    common.train(stack, x, y, kind, phase, mode)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 repeat: a CI smoke test")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, repeat = (2, 1) if args.quick else (args.steps, args.repeat)
    rows = []
    for task in TASKS:
        times: dict[str, list[float]] = {"vmap": [], "loop": []}
        for _ in range(repeat + 1):  # the first round warms up and is dropped
            for mode in times:
                times[mode].append(epoch_seconds(task, mode, steps))
        vmap_s, loop_s = (statistics.median(times[m][1:]) / steps for m in ("vmap", "loop"))
        rows.append({"task": task, "runs": TASKS[task][1], "steps": steps, "vmap_ms_per_step": 1e3 * vmap_s,
                     "loop_ms_per_step": 1e3 * loop_s, "vmap_over_loop": vmap_s / loop_s})
    result = {"rows": rows, "repeat": repeat, "machine": common.machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_modes.json").write_text(json.dumps(result, indent=1))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one training step of a whole stack, median of {repeat} ({args.threads} torch thread)")
    for column in ("task", "runs", "vmap ms/step", "loop ms/step", "vmap / loop"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for r in rows:
        table.add_row(r["task"], str(r["runs"]), f"{r['vmap_ms_per_step']:.1f}", f"{r['loop_ms_per_step']:.1f}",
                      f"{r['vmap_over_loop']:.2f}")
    Console(width=120).print(table)
    return result


if __name__ == "__main__":
    main()
