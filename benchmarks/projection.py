"""The gate phase's budget projection: Newton in a bracket (``passes/gate.budget_projection``)
against the 60-step bisection it replaced (written out below), side by side.

The projection runs after every gate step, on every group's log-alphas. Layouts: the sine
benchmark's (50 runs batched, one group of 200 gates), a ResNet-like big student (unbatched, 60
groups, 10 496 gates) and a wide one (unbatched, 120 groups, 61 440 gates). Regimes: ``cold`` (gates
at their init, every group over the budget 1/2: the first projections of a phase) and ``steady``
(projected, then moved by one gate step's size, 0.01: every later step). Each cell: median
process-CPU ms over interleaved rounds, and the largest |shift difference| between the two.

    python benchmarks/projection.py            # writes benchmarks/results/projection.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphmerge.passes.gate import budget_projection  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHIFT = 2 / 3 * torch.log(torch.tensor(0.1 / 1.1)).item()  # the default open_shift


@torch.no_grad()
def bisection(log_alpha: torch.Tensor, segments: torch.Tensor, target: float, open_shift: float,
              direction: str, iterations: int = 60, floor: float = 0.05) -> torch.Tensor:
    """The previous ``budget_projection``: 60 bisection steps on every segment at once."""
    x = log_alpha.double() - open_shift
    count = torch.bincount(segments).double()
    groups = count.numel()
    p = torch.sigmoid(x)
    weight = (4 * p * (1 - p)).clamp_min(floor) if direction == "gradient" else torch.ones_like(x)

    def mean_open(c: torch.Tensor) -> torch.Tensor:
        q = torch.sigmoid(x + c.index_select(-1, segments) * weight)
        return torch.zeros(*x.shape[:-1], groups, dtype=x.dtype).index_add_(-1, segments, q) / count

    lead = x.shape[:-1]
    high = torch.zeros(*lead, groups, dtype=x.dtype)
    over = mean_open(high) > target
    if not bool(over.any()):
        return log_alpha
    top = torch.full((*lead, groups), -torch.inf, dtype=x.dtype).scatter_reduce(-1, segments.expand_as(x), x, "amax")
    low = -(top.clamp_min(0) + 40.0) / weight.min()
    for _ in range(iterations):
        mid = (low + high) / 2
        above = mean_open(mid) > target
        low = torch.where(above, low, mid)
        high = torch.where(above, mid, high)
    shift = torch.where(over, low, torch.zeros_like(low))
    return (log_alpha.double() + shift.index_select(-1, segments) * weight).to(log_alpha.dtype)


def layouts() -> dict[str, tuple[tuple[int, ...], list[int]]]:
    """name -> (leading batch shape, group sizes)."""
    return {"sine (50 runs x 200)": ((50,), [200]),
            "resnet-like (60 groups)": ((), [64] * 20 + [128] * 20 + [256] * 14 + [512] * 6),
            "wide (120 groups)": ((), [256] * 60 + [768] * 60)}


def cases(lead: tuple[int, ...], sizes: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    segments = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    cold = torch.randn(*lead, sum(sizes), generator=generator) * 0.01 + 1.0  # HardConcreteGates' init
    projected = budget_projection(cold, segments, 0.5, SHIFT, direction="gradient")
    steady = projected + 0.01 * torch.randn(projected.shape, generator=generator)
    return {"segments": segments, "cold": cold, "steady": steady}


def cpu_ms(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(1e3 * (time.process_time() - start))
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (lead, sizes) in layouts().items():
        data = cases(lead, sizes, generator)
        for regime in ("cold", "steady"):
            log_alpha, segments = data[regime], data["segments"]

            def newton(log_alpha=log_alpha, segments=segments):
                return budget_projection(log_alpha, segments, 0.5, SHIFT, direction="gradient")

            def old(log_alpha=log_alpha, segments=segments):
                return bisection(log_alpha, segments, 0.5, SHIFT, "gradient")
            a, b = newton(), old()
            times = {"newton": [], "bisection": []}
            for _ in range(args.rounds):  # interleaved: the machine's load falls on both alike
                times["newton"] += cpu_ms(newton, 1)
                times["bisection"] += cpu_ms(old, 1)
            rows.append({"layout": name, "regime": regime, "gates": int(log_alpha.numel()),
                         "newton_ms": statistics.median(times["newton"]),
                         "bisection_ms": statistics.median(times["bisection"]),
                         "max_abs_difference": float((a.double() - b.double()).abs().max())})
    for row in rows:
        row["speedup"] = row["bisection_ms"] / row["newton_ms"]
    print(f"{'layout':28} {'regime':7} {'gates':>7} {'bisection ms':>13} {'newton ms':>10} {'speed-up':>9} "
          f"{'max |diff|':>11}")
    for r in rows:
        print(f"{r['layout']:28} {r['regime']:7} {r['gates']:7d} {r['bisection_ms']:13.3f} {r['newton_ms']:10.3f} "
              f"{r['speedup']:8.1f}x {r['max_abs_difference']:11.1e}")
    result = {"rows": rows, "rounds": args.rounds, "threads": args.threads,
              "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "command": "python benchmarks/projection.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
