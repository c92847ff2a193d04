"""Zoo coverage and compile speed: every torchvision classification model through graphmerge.

Per model: graph size, groups (widened / pinned / pinned inside the network, with reasons), the
time to trace and to run the coupling analysis (measured separately), widen and compress times,
the end-to-end compile time (``widen`` - which traces and analyses itself - plus ``compress``),
the I1 error of the big student against the mean of two random teachers, whether I2 (bitwise
recovery of each teacher) and I4 (state_dict loads strict into the teacher's class) hold, and the
parameter counts of teacher, big student and student. Where ``torch_pruning`` is importable, its
``DependencyGraph().build_dependency`` time on the same model and input, in the same run, and the
ratio ours (trace + couple) / theirs; and ``torch.fx.symbolic_trace`` alone with its ratio to
Torch-Pruning, the floor any fx front end pays before shapes or analysis.

Targets: analysis <= 1/4 of Torch-Pruning's time (median ratio <= 0.25), resnet50 end-to-end
compile <= 2 s, compile time linear in the node count (resnet18 -> resnet152).

    python benchmarks/zoo.py                      # every model (several minutes)
    python benchmarks/zoo.py --quick              # 3 small models: CI smoke test
    python benchmarks/zoo.py --models resnet18,vgg11 --json /tmp/zoo.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphmerge.passes.couple import couple  # noqa: E402
from graphmerge.passes.trace import trace  # noqa: E402

import graphmerge  # noqa: E402
from tests.models import clone_for_loading, make_teachers  # noqa: E402
from tests.test_invariants import expected_student_state, output_layer_name  # noqa: E402
from tests.zoo_models import ALL_MODELS, build, example_inputs  # noqa: E402

QUICK = ["resnet18", "mobilenet_v3_small", "mnasnet0_5"]
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "zoo.json"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    runs = [timed(fn) for _ in range(repeat)]
    return runs[-1][0], statistics.median(t for _, t in runs)


def torch_pruning_time(model: torch.nn.Module, inputs: tuple, repeat: int) -> tuple[float | None, str | None]:
    """Torch-Pruning's dependency-graph build time, or the error it raised (not ours to fail on)."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None, None

    def build_graph():
        return tp.DependencyGraph().build_dependency(model, example_inputs=inputs[0], verbose=False)

    try:
        return median_time(build_graph, repeat)[1], None
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"[:200]


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def analysis_row(name: str, teacher: torch.nn.Module, inputs: tuple, repeat: int) -> dict[str, Any]:
    # torch.fx's own tracer alone, no shapes, no analysis: the floor any fx front end pays.
    try:
        fx_trace_s: float | None = median_time(lambda: torch.fx.symbolic_trace(teacher), repeat)[1]
    except Exception:  # our tracer may still trace it (leaf rules); the column is then empty
        fx_trace_s = None
    gm, trace_s = median_time(lambda: trace(teacher, inputs), repeat)
    groups, couple_s = median_time(lambda: couple(gm), repeat)
    internal = groups.internal_pinned
    return {
        "nodes": groups.node_count, "groups": len(groups), "widened": len(groups.widened),
        "pinned": len(groups.pinned), "internal_pinned": len(internal),
        "internal_reasons": sorted({g.reason for g in internal})[:5],
        "fx_trace_s": fx_trace_s, "trace_s": trace_s, "couple_s": couple_s, "analyze_s": trace_s + couple_s,
    }


def i2_holds(teachers: list[torch.nn.Module], big: torch.nn.Module, head: str) -> bool:
    for k in range(len(teachers)):
        got = graphmerge.compress(big, f"teacher:{k}").state_dict()
        expected = expected_student_state(teachers, k, head)
        if list(got) != list(expected) or not all(torch.equal(got[n], expected[n]) for n in expected):
            return False
    return True


def i4_holds(student: torch.nn.Module, teacher: torch.nn.Module) -> bool:
    if not isinstance(student, type(teacher)):
        return False
    try:
        clone_for_loading(teacher).load_state_dict(student.state_dict(), strict=True)
    except RuntimeError:
        return False
    return True


def random_scores(groups, n: int) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {g.id: torch.rand(n * g.width, generator=generator) for g in groups.widened}


@torch.no_grad()
def compile_row(name: str, teachers: list[torch.nn.Module], inputs: tuple) -> dict[str, Any]:
    n = len(teachers)
    big, widen_s = timed(lambda: graphmerge.widen(teachers, inputs))
    groups = graphmerge.analyze(teachers[0], inputs)
    student, compress_s = timed(lambda: graphmerge.compress(big, random_scores(groups, n)))
    mean = torch.stack([t(*inputs) for t in teachers]).mean(0)
    i1 = (big.eval()(*inputs) - mean).abs().max().item() / max(1.0, mean.abs().max().item())
    head = output_layer_name(teachers[0], inputs)
    return {
        "widen_s": widen_s, "compress_s": compress_s, "compile_s": widen_s + compress_s,
        "i1_rel_error": i1, "i1_ok": i1 <= 1e-4, "i2_ok": i2_holds(teachers, big, head),
        "i4_ok": i4_holds(student, teachers[0]),
        "params_teacher": param_count(teachers[0]), "params_big": param_count(big),
        "params_student": param_count(student),
    }


def benchmark_model(name: str, repeat: int, skip_compile: bool, max_compile_params: int,
                    dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "input": list(example_inputs(name)[0].shape)}
    inputs = tuple(x.to(dtype) for x in example_inputs(name))
    try:
        teachers = [t.to(dtype) for t in make_teachers(lambda: build(name), 2, seed=0)]
        row.update(analysis_row(name, teachers[0], inputs, repeat))
        tp_s, tp_error = torch_pruning_time(teachers[0], inputs, repeat)
        row["torch_pruning_s"] = tp_s
        if tp_error:
            row["torch_pruning_error"] = tp_error
        row["ratio_vs_tp"] = None if tp_s is None else row["analyze_s"] / tp_s
        row["fx_trace_vs_tp"] = None if tp_s is None or row["fx_trace_s"] is None else row["fx_trace_s"] / tp_s
        if skip_compile:
            pass
        elif param_count(teachers[0]) > max_compile_params:
            row["compile_skipped"] = (f"{param_count(teachers[0]):,} parameters: the big student and "
                                      f"teachers would not fit in memory (--max-compile-params)")
        else:
            row.update(compile_row(name, teachers, inputs))
    except Exception as error:  # a benchmark reports failures, it does not stop on them
        row["error"] = f"{type(error).__name__}: {error}"[:500]
        row["traceback"] = traceback.format_exc(limit=-3)[-1500:]
    finally:
        gc.collect()
    return row


# -- reporting ---------------------------------------------------------------------------------

COLUMNS = [
    ("model", "model", "{}"), ("nodes", "nodes", "{}"), ("widened", "wid", "{}"), ("pinned", "pin", "{}"),
    ("internal_pinned", "int", "{}"), ("fx_trace_s", "fx s", "{:.3f}"),
    ("trace_s", "trace s", "{:.3f}"), ("couple_s", "couple s", "{:.3f}"),
    ("torch_pruning_s", "TP s", "{:.3f}"), ("ratio_vs_tp", "ours/TP", "{:.2f}"), ("fx_trace_vs_tp", "fx/TP", "{:.2f}"),
    ("widen_s", "widen s", "{:.3f}"), ("compress_s", "compr s", "{:.3f}"), ("compile_s", "e2e s", "{:.3f}"),
    ("i1_rel_error", "I1 err", "{:.1e}"), ("i2_ok", "I2", "{}"), ("i4_ok", "I4", "{}"),
    ("params_teacher", "P teacher", "{:,}"), ("params_big", "P big", "{:,}"),
    ("params_student", "P student", "{:,}"),
]
MEDIAN_KEYS = ["nodes", "fx_trace_s", "trace_s", "couple_s", "analyze_s", "torch_pruning_s", "ratio_vs_tp",
               "fx_trace_vs_tp",
               "widen_s", "compress_s", "compile_s", "i1_rel_error"]


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "err" if key == "nodes" and "error" in row else "-"
    return fmt.format(value)


def medians(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    result = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        result[key] = statistics.median(values) if values else None
    return result


def linearity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compile time per node along the ResNet family: flat means linear in the node count."""
    by_name = {r["model"]: r for r in rows}
    family = []
    for name in RESNETS:
        r = by_name.get(name)
        if r and r.get("compile_s") is not None:
            family.append({"model": name, "nodes": r["nodes"], "compile_s": r["compile_s"],
                           "analyze_s": r["analyze_s"], "ms_per_node": 1e3 * r["compile_s"] / r["nodes"]})
    return family


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    med = medians(rows)
    by_name = {r["model"]: r for r in rows}
    resnet50 = by_name.get("resnet50", {}).get("compile_s")
    bad = [r["model"] for r in rows if "error" in r or r.get("i1_ok") is False
           or r.get("i2_ok") is False or r.get("i4_ok") is False]
    return {
        "medians": med,
        "targets": {
            "median_ratio_vs_tp<=0.25": None if med["ratio_vs_tp"] is None else med["ratio_vs_tp"] <= 0.25,
            "resnet50_compile_s<=2": None if resnet50 is None else resnet50 <= 2.0,
        },
        "resnet_linearity": linearity(rows),
        "models_failing": bad,
        "models_pinning_inside": [r["model"] for r in rows if r.get("internal_pinned")],
    }


def print_table(rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="graphmerge zoo benchmark", show_lines=False)
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "model" else "right")
    for r in rows:
        table.add_row(*[cell(r, key, fmt) for key, _, fmt in COLUMNS])
    med = report["medians"]
    table.add_row(*["median" if key == "model" else
                    (cell(med, key, fmt) if key in med else "") for key, _, fmt in COLUMNS], style="bold")
    console = Console(width=240)
    console.print(table)
    console.print({"targets": report["targets"], "failing": report["models_failing"]})


def markdown(rows: list[dict[str, Any]], report: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = ["# graphmerge zoo benchmark", "",
             f"Machine: {machine['cpu_count']}-core CPU ({machine['processor'] or machine['machine']}), "
             f"torch {machine['torch']}, {machine['threads']} torch thread(s); "
             f"Torch-Pruning {machine['torch_pruning'] or 'not installed'}.", "",
             "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |")
    med = report["medians"]
    lines.append("| **median** | " + " | ".join(cell(med, key, fmt) if key in med else ""
                                                for key, _, fmt in COLUMNS[1:]) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"- `{k}`: {v}" for k, v in report["targets"].items()]
    lines += ["", "## Compile time along the ResNet family (linear in nodes = flat ms/node)", "",
              "| model | nodes | analyze s | e2e s | ms/node |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['nodes']} | {r['analyze_s']:.3f} | {r['compile_s']:.3f} | "
              f"{r['ms_per_node']:.2f} |" for r in report["resnet_linearity"]]
    lines += ["", "## Models pinning groups inside the network (I1 cannot hold)", ""]
    lines += [f"- {r['model']}: {r['internal_pinned']} groups; e.g. {r['internal_reasons'][0][:160]}"
              for r in rows if r.get("internal_pinned")]
    lines += ["", "## Models failing an invariant or erroring", ""]
    for r in rows:
        if r["model"] in report["models_failing"]:
            what = r.get("error") or ", ".join(k for k in ("i1_ok", "i2_ok", "i4_ok") if r.get(k) is False)
            lines.append(f"- {r['model']}: {what}")
    return "\n".join(lines) + "\n"


def machine_info(threads: int) -> dict[str, Any]:
    try:
        import torch_pruning as tp
        tp_version = getattr(tp, "__version__", "installed")
    except ImportError:
        tp_version = None
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "torch_pruning": tp_version}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated torchvision model names (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (CI smoke test)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON results")
    parser.add_argument("--markdown", default=None, help="markdown table path (default: JSON path .md)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats for analysis and TP (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--analysis-only", action="store_true", help="skip widen/compress/invariants")
    parser.add_argument("--double", action="store_true",
                        help="teachers and inputs in float64 (tells float32 rounding from real I1 errors)")
    parser.add_argument("--max-compile-params", type=int, default=300_000_000,
                        help="skip widen/compress above this many teacher parameters (memory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = QUICK if args.quick else (args.models.split(",") if args.models else ALL_MODELS)
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from torchvision.models.list_models()")
    machine = machine_info(args.threads)
    json_path = pathlib.Path(args.json)
    md_path = pathlib.Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    rows: list[dict[str, Any]] = []
    for name in names:
        row = benchmark_model(name, args.repeat, args.analysis_only, args.max_compile_params,
                              torch.float64 if args.double else torch.float32)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k not in ("model", "traceback")), flush=True)
        report = write_results(rows, machine, json_path, md_path)  # after every model: partial runs count
    print_table(rows, report)
    return 0


def write_results(rows: list[dict[str, Any]], machine: dict[str, Any], json_path: pathlib.Path,
                  md_path: pathlib.Path) -> dict[str, Any]:
    report = summary(rows)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"machine": machine, "models": rows, **report}, indent=1,
                                    default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    md_path.write_text(markdown(rows, report, machine))
    return report


if __name__ == "__main__":
    raise SystemExit(main())
