"""ONNX latency of teacher, student and big student, side by side.

For each model family this builds three networks and benchmarks them in ONE interleaved run
(:func:`graphmerge.bench.benchmark`), on onnxruntime (CPU) and torch eager:

- teacher: the model with random weights;
- student: the same architecture with different random weights — what ``graphmerge merge``
  produces. Same architecture, so the same latency is expected (ratio 1 within noise);
- big student: ``graphmerge.widen([teacher, student])``, checked against the two models' mean
  output before it is timed.

Families: a CIFAR ResNet20 (32x32, batches 1/8/32), torchvision resnet18 (224x224, batches 1/8)
and a 784-256-256-10 MLP (batches 1/8/32). Usage::

    python benchmarks/onnx_latency.py              # full run (~2-3 min on 2 cores)
    python benchmarks/onnx_latency.py --quick      # smoke test: tiny counts, skips resnet18
    python benchmarks/onnx_latency.py --batch 1,4 --models resnet20 --json /tmp/out.json

Writes the JSON (rows, machine, summary) and a markdown table next to it (same stem, ``.md``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from graphmerge.bench import benchmark, machine_info, print_table, write_json, write_markdown  # noqa: E402
from graphmerge.errors import GraphMergeError  # noqa: E402
from graphmerge.examples.resnet20 import ResNet20  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "onnx_latency.json"
FAMILIES = ("resnet20", "resnet18", "mlp")


# --------------------------------------------------------------------------------------------
# The benchmarked models
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """784-256-256-10 MLP."""

    def __init__(self) -> None:
        super().__init__()
        h = 256
        self.net = nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18()


# name -> (constructor, example input shape, batches, (warmup, min_time, min_iters))
Spec = tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...], tuple[int, float, int]]
SPECS: dict[str, Spec] = {
    "resnet20": (ResNet20, (2, 3, 32, 32), (1, 8, 32), (3, 0.5, 20)),
    "resnet18": (resnet18, (2, 3, 224, 224), (1, 8), (2, 0.5, 5)),
    "mlp": (MLP, (2, 784), (1, 8, 32), (3, 0.5, 20)),
}
QUICK_SHAPES = {"resnet18": (2, 3, 64, 64)}


# --------------------------------------------------------------------------------------------
# Building the three networks
# --------------------------------------------------------------------------------------------


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm non-trivial running stats, as a trained network has (eval mode uses them)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def build_trio(family: str, shape: Sequence[int]) -> tuple[dict[str, tuple[nn.Module, Any]], str]:
    """teacher, student (same arch, other weights) and big student; returns (models, how big was built)."""
    ctor = SPECS[family][0]
    torch.manual_seed(0)
    teacher = _randomize_bn(ctor(), 0)
    torch.manual_seed(1)
    student = _randomize_bn(ctor(), 1)
    x = torch.randn(*shape)
    big, how = _big_student(teacher, student, x)
    return {"teacher": (teacher, (x,)), "student": (student, (x,)), "big student": (big, (x,))}, how


def _big_student(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> tuple[nn.Module, str]:
    """The big student graphmerge.widen builds from the two models, checked against their mean."""
    import graphmerge

    big = graphmerge.widen([teacher, student], (x,))
    with torch.no_grad():
        err = float((big(x) - (teacher(x) + student(x)) / 2).abs().max())
    if err > 1e-3:
        raise GraphMergeError(f"widened model differs from the teachers' mean by {err:.2e}")
    return big.eval(), "graphmerge.widen([teacher, student])"


# --------------------------------------------------------------------------------------------
# Summary: the ratios the benchmark is for
# --------------------------------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (family, runtime, batch): student/teacher and big/teacher p50; per model: ORT speed-up."""
    p50 = {(r["family"], r["model"], r["runtime"], r["batch"]): r["p50_ms"] for r in rows if r["p50_ms"]}
    out = []
    for (family, model, runtime, batch), t in sorted(p50.items()):
        if model != "teacher":
            continue
        out.append({
            "family": family,
            "runtime": runtime,
            "batch": batch,
            "teacher_ms": t,
            "student_ratio": _div(p50.get((family, "student", runtime, batch)), t),
            "big_ratio": _div(p50.get((family, "big student", runtime, batch)), t),
            "ort_speedup_over_eager": (
                _div(p50.get((family, model, "torch", batch)), t)
                if runtime == "onnxruntime" else None
            ),
        })
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _summary_markdown(summary: Sequence[dict[str, Any]], how: dict[str, str]) -> str:
    lines = [
        "| family | runtime | batch | teacher p50 ms | student / teacher | big / teacher "
        "| ORT speed-up vs eager |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['family']} | {s['runtime']} | {s['batch']} | {s['teacher_ms']:.3f} | "
            f"{_fmt(s['student_ratio'])} | {_fmt(s['big_ratio'])} | {_fmt(s['ort_speedup_over_eager'])} |"
        )
    lines.append("")
    lines += [f"- big student for {family}: {text}" for family, text in how.items()]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny iteration counts, small inputs; skips resnet18")
    p.add_argument("--batch", help="comma-separated batch sizes for every family (default: per family)")
    p.add_argument("--models", help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument(
        "--json", type=pathlib.Path, default=DEFAULT_JSON, help="output JSON (markdown next to it)"
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and onnxruntime")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    families = _families(args)
    batches = tuple(int(b) for b in args.batch.split(",")) if args.batch else None
    json_path = args.json.expanduser().absolute()
    if not json_path.parent.is_dir():
        print(f"error: directory {json_path.parent} does not exist; create it", file=sys.stderr)
        return 2
    all_rows: list[dict[str, Any]] = []
    how: dict[str, str] = {}
    start = time.perf_counter()
    for family in families:
        _, shape, default_batches, (warmup, min_time, min_iters) = SPECS[family]
        if args.quick:
            shape, warmup, min_time, min_iters = QUICK_SHAPES.get(family, shape), 1, 0.0, 3
            default_batches = default_batches[:2]
        models, how[family] = build_trio(family, shape)
        print(f"[{family}] input {tuple(shape)}; big student: {how[family]}", flush=True)
        rows = benchmark(
            models,
            batches=batches or default_batches,
            threads=args.threads,
            warmup=warmup,
            min_time=min_time,
            min_iters=min_iters,
        )
        for r in rows:
            r["family"] = family
            r["input_shape"] = [r["batch"], *shape[1:]]
        all_rows.extend(rows)
    machine = machine_info(args.threads)
    machine["wall_s"] = round(time.perf_counter() - start, 1)
    summary = summarize(all_rows)
    for r in all_rows:
        r["model"] = f"{r['family']} {r['model']}"
    print_table(all_rows, machine)
    notes = _summary_markdown(summary, how)
    print(notes)
    extra = {"quick": args.quick, "big_student": how, "summary": summary}
    write_json(json_path, all_rows, machine, extra=extra)
    md = write_markdown(json_path.with_suffix(".md"), all_rows, machine, notes=notes)
    print(f"wrote {json_path} and {md}")
    return 0


def _families(args: argparse.Namespace) -> list[str]:
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in SPECS]
        if unknown:
            raise SystemExit(f"error: unknown model(s) {unknown}; choose from {', '.join(FAMILIES)}")
        return names
    return [f for f in FAMILIES if not (args.quick and f == "resnet18")]


if __name__ == "__main__":
    sys.exit(main())
