"""Compile speed on the torchvision classification zoo: graphmerge's stages beside Torch-Pruning.

Per model (two teachers with different random weights, batch 2, 64 px inputs; ViT/MaxViT 224,
Inception 96, as benchmarks/coverage.py), the median over ``--repeat`` runs of each stage of
``graphmerge.widen`` + ``graphmerge.compress``:

- capture: ``torch.export`` of teacher 0 (``groups.timings["trace_s"]``);
- couple: the coupling analysis (``couple_s``);
- widen: building the big student (``widen_s``);
- certify: the I1 certificate, float64 (``certify_s``);
- compress: ``graphmerge.compress(big, "teacher:0")``, timed here (its I3 certificate included,
  whose own time is reported beside it as "I3 s");
- e2e: the sum of those five in one run (median of the runs);

and, in the same run on the same model and input, Torch-Pruning's
``DependencyGraph().build_dependency`` (median), with the ratios ours/TP for the analysis
(capture + couple) and for the whole pipeline. Each run also checks I1 (the certificate), I2
(``compress(big, "teacher:0")`` is teacher 0's tensors bitwise, or / 2, or the mean, for the
averaging head) and I4 (strict reload into a fresh instance).

Targets: resnet50 end to end (capture + couple + widen + certify + compress) <= 3 s; compile
time linear in the node count along resnet18 -> resnet152.

A warm-up (one tiny model through the same pipeline, not reported) runs first: the first
``torch.export`` in a process pays one-time costs that belong to no model.

    python benchmarks/zoo.py --models resnet18,resnet50,mobilenet_v2,vit_b_16,resnet152
    python benchmarks/zoo.py --quick              # 3 small models: CI smoke test
    python benchmarks/zoo.py                      # every classifier (a long time on a laptop)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The repository root instead of this script's folder: benchmarks/coverage.py must not shadow the
# ``coverage`` package for any library that imports it.
if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import graphmerge  # noqa: E402
from benchmarks.coverage import (  # noqa: E402
    PARAM_CAP,
    check_i2,
    machine_info,
    meta_params,
    model_spec,
    snapshot_graphmerge,
    source_revision,
)
from benchmarks.coverage import torchvision_models as all_models  # noqa: E402

QUICK = ["resnet18", "mobilenet_v3_small", "mnasnet0_5"]
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "zoo.json"
STAGES = ["capture_s", "couple_s", "widen_s", "certify_s", "compress_s"]
E2E_TARGET_S = 3.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def torch_pruning_time(model: nn.Module, inputs: tuple, repeat: int) -> tuple[float | None, str | None]:
    """Torch-Pruning's dependency-graph build time (median), or the error it raised."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None, None
    try:
        times = [timed(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=inputs[0],
                                                                    verbose=False))[1] for _ in range(repeat)]
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"[:200]
    return statistics.median(times), None


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pipeline(teachers: list[nn.Module], inputs: tuple) -> tuple[dict[str, float], nn.Module, nn.Module]:
    """One run of widen (capture, couple, widen, certify) + compress; the stage times."""
    big = graphmerge.widen(teachers, inputs)
    student, compress_s = timed(lambda: graphmerge.compress(big, "teacher:0"))
    timings = graphmerge.widen_info(big)[1].groups.timings
    times = {"capture_s": timings["trace_s"], "couple_s": timings["couple_s"], "widen_s": timings["widen_s"],
             "certify_s": timings.get("certify_s", 0.0), "compress_s": compress_s}
    times["e2e_s"] = sum(times[k] for k in STAGES)
    certificate = graphmerge.student_certificate(student)  # compress's I3 certificate, inside compress_s
    times["compress_i3_s"] = certificate.seconds if certificate is not None else 0.0
    return times, big, student


def benchmark_model(name: str, repeat: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    try:
        params = meta_params("torchvision", name)
        if params is not None and params > PARAM_CAP:
            row["skipped"] = f"{params / 1e6:.0f} M parameters > {PARAM_CAP / 1e6:.0f} M cap (memory)"
            return row
        build, inputs, _ = model_spec("torchvision", name)
        row["input"] = list(inputs[0].shape)
        teachers = [build(seed) for seed in (1, 2)]
        runs = []
        big = student = None
        with torch.no_grad():
            for _ in range(repeat):
                del big, student  # one big student alive at a time (ViT-B: 343 M parameters, float64 copies)
                gc.collect()
                times, big, student = pipeline(teachers, inputs)
                runs.append(times)
        for key in [*STAGES, "e2e_s", "compress_i3_s"]:
            row[key] = statistics.median(r[key] for r in runs)
        row["analyze_s"] = row["capture_s"] + row["couple_s"]
        info = graphmerge.widen_info(big)[1]
        groups = info.groups
        row.update(nodes=groups.node_count, groups=len(groups.groups), widened=len(groups.widened),
                   pinned=len(groups.pinned), internal_pinned=len(groups.internal_pinned),
                   internal_reasons=sorted({g.reason for g in groups.internal_pinned})[:3])
        certificate = info.certificates.get("I1")
        row["i1_rel_error"] = None if certificate is None or certificate.skipped else certificate.relative_error
        row["i1_dtype"] = None if certificate is None else certificate.dtype
        row["i1_ok"] = row["i1_rel_error"] is not None and row["i1_rel_error"] <= 1e-6
        row["i2_ok"] = check_i2(student, teachers)["i2_ok"]
        try:
            build(3).load_state_dict(student.state_dict(), strict=True)
            row["i4_ok"] = type(student) is type(teachers[0])
        except RuntimeError:
            row["i4_ok"] = False
        row.update(params_teacher=param_count(teachers[0]), params_big=param_count(big),
                   params_student=param_count(student))
        del big, student
        tp_s, tp_error = torch_pruning_time(teachers[0], inputs, repeat)
        row["torch_pruning_s"] = tp_s
        if tp_error:
            row["torch_pruning_error"] = tp_error
        row["analyze_vs_tp"] = None if tp_s is None else row["analyze_s"] / tp_s
        row["e2e_vs_tp"] = None if tp_s is None else row["e2e_s"] / tp_s
    except Exception as error:  # a benchmark reports failures, it does not stop on them
        row["error"] = f"{type(error).__name__}: {error}"[:500]
        row["traceback"] = traceback.format_exc(limit=-3)[-1500:]
    finally:
        gc.collect()
    return row


def warm_up() -> float:
    """One tiny model through the pipeline: torch.export's first-call costs, not any model's."""
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))

    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build()
        model(torch.zeros(2, 3, 8, 8))
        teachers.append(model.eval())
    start = time.perf_counter()
    with torch.no_grad():
        pipeline(teachers, (torch.randn(2, 3, 8, 8),))
    return time.perf_counter() - start


# -- reporting ---------------------------------------------------------------------------------

COLUMNS = [
    ("model", "model", "{}"), ("nodes", "nodes", "{}"), ("widened", "wid", "{}"), ("pinned", "pin", "{}"),
    ("internal_pinned", "int", "{}"), ("capture_s", "capture s", "{:.3f}"), ("couple_s", "couple s", "{:.3f}"),
    ("widen_s", "widen s", "{:.3f}"), ("certify_s", "certify s", "{:.3f}"), ("compress_s", "compress s", "{:.3f}"),
    ("compress_i3_s", "(I3 s)", "{:.3f}"),
    ("e2e_s", "e2e s", "{:.3f}"), ("torch_pruning_s", "TP s", "{:.3f}"), ("analyze_vs_tp", "analysis/TP", "{:.1f}"),
    ("e2e_vs_tp", "e2e/TP", "{:.1f}"), ("i1_rel_error", "I1 err", "{:.1e}"), ("i2_ok", "I2", "{}"),
    ("i4_ok", "I4", "{}"), ("params_teacher", "P teacher", "{:,}"), ("params_big", "P big", "{:,}"),
]
MEDIAN_KEYS = ["nodes", *STAGES, "compress_i3_s", "e2e_s", "analyze_s", "torch_pruning_s", "analyze_vs_tp", "e2e_vs_tp",
               "i1_rel_error"]


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "err" if key == "nodes" and "error" in row else "skip" if key == "nodes" and "skipped" in row else "-"
    return fmt.format(value)


def medians(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    result = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        result[key] = statistics.median(values) if values else None
    return result


def linearity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """e2e time per node along the ResNet family: flat means linear in the node count."""
    by_name = {r["model"]: r for r in rows}
    return [{"model": n, "nodes": by_name[n]["nodes"], "e2e_s": by_name[n]["e2e_s"],
             "analyze_s": by_name[n]["analyze_s"], "ms_per_node": 1e3 * by_name[n]["e2e_s"] / by_name[n]["nodes"]}
            for n in RESNETS if by_name.get(n, {}).get("e2e_s") is not None]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_name = {r["model"]: r for r in rows}
    resnet50 = by_name.get("resnet50", {})
    bad = [r["model"] for r in rows if "error" in r or r.get("i1_ok") is False
           or r.get("i2_ok") is False or r.get("i4_ok") is False]
    return {
        "medians": medians(rows),
        "resnet50": {k: resnet50.get(k) for k in [*STAGES, "compress_i3_s", "e2e_s", "torch_pruning_s", "e2e_vs_tp"]}
        if resnet50 else None,
        "targets": {f"resnet50_e2e_s<={E2E_TARGET_S:g}": None if resnet50.get("e2e_s") is None
                    else resnet50["e2e_s"] <= E2E_TARGET_S},
        "resnet_linearity": linearity(rows),
        "models_failing": bad,
        "models_pinning_inside": [r["model"] for r in rows if r.get("internal_pinned")],
    }


def print_table(rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="graphmerge zoo benchmark (medians per model)", show_lines=False)
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "model" else "right")
    for r in rows:
        table.add_row(*[cell(r, key, fmt) for key, _, fmt in COLUMNS])
    med = report["medians"]
    table.add_row(*["median" if key == "model" else (cell(med, key, fmt) if key in med else "")
                    for key, _, fmt in COLUMNS], style="bold")
    console = Console(width=240)
    console.print(table)
    console.print({"targets": report["targets"], "failing": report["models_failing"]})


def markdown(rows: list[dict[str, Any]], report: dict[str, Any], machine: dict[str, Any], command: str,
             repeat: int, warm_up_s: float) -> str:
    lines = ["# graphmerge zoo benchmark", "",
             f"Command: `{command}` ({len(rows)} models: {', '.join(r['model'] for r in rows)}; not the whole "
             "zoo). Every time is the median of "
             f"{repeat} runs; the machine ({machine['cpu_count']}-core {machine['cpu']}, torch {machine['torch']}, "
             f"1 torch thread, Torch-Pruning {machine['torch_pruning'] or 'not installed'}) is shared with other "
             f"jobs, so times are noisy (expect +-30%). graphmerge at {machine['graphmerge_source']}.", "",
             f"Stages: capture (torch.export) + couple (analysis) + widen + certify (I1, float64) + compress "
             f"(with its I3 certificate) = e2e. TP: Torch-Pruning's `build_dependency` on the same model and "
             f"input (median). A warm-up model ran first ({warm_up_s:.1f} s, not counted): torch.export's "
             "first call in a process.", "",
             "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |")
    med = report["medians"]
    lines.append("| **median** | " + " | ".join(cell(med, key, fmt) if key in med else ""
                                                for key, _, fmt in COLUMNS[1:]) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"- `{k}`: {v}" for k, v in report["targets"].items()]
    if report["resnet50"]:
        r50 = report["resnet50"]
        parts = " + ".join(f"{k[:-2]} {r50[k]:.2f}" for k in STAGES if r50.get(k) is not None)
        parts += f" (of which its I3 certificate {r50['compress_i3_s']:.2f})"
        lines.append(f"- resnet50: {parts} = **{r50['e2e_s']:.2f} s** end to end"
                     + (f"; Torch-Pruning build_dependency {r50['torch_pruning_s']:.2f} s "
                        f"(e2e/TP {r50['e2e_vs_tp']:.1f}x)" if r50.get("torch_pruning_s") else ""))
    lines += ["", "## e2e time along the ResNet family (linear in nodes = flat ms/node)", "",
              "| model | nodes | analysis s | e2e s | ms/node |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['nodes']} | {r['analyze_s']:.3f} | {r['e2e_s']:.3f} | {r['ms_per_node']:.2f} |"
              for r in report["resnet_linearity"]]
    pinning = [r for r in rows if r.get("internal_pinned")]
    if pinning:
        lines += ["", "## Models pinning groups inside the network (I1 cannot hold)", ""]
        lines += [f"- {r['model']}: {r['internal_pinned']} groups; e.g. {r['internal_reasons'][0][:160]}"
                  for r in pinning]
    failing = [r for r in rows if r["model"] in report["models_failing"]]
    if failing:
        lines += ["", "## Models failing an invariant or erroring", ""]
        for r in failing:
            what = r.get("error") or ", ".join(k for k in ("i1_ok", "i2_ok", "i4_ok") if r.get(k) is False)
            lines.append(f"- {r['model']}: {what}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated torchvision model names (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (CI smoke test)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON results")
    parser.add_argument("--markdown", default=None, help="markdown table path (default: JSON path .md)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


def write_results(rows: list[dict[str, Any]], machine: dict[str, Any], json_path: pathlib.Path,
                  md_path: pathlib.Path, command: str, repeat: int, warm_up_s: float) -> dict[str, Any]:
    report = summary(rows)
    for path, text in ((json_path, json.dumps({"command": command, "repeat": repeat, "warm_up_s": warm_up_s,
                                               "machine": machine, "models": rows, **report}, indent=1,
                                              default=str)),
                       (md_path, markdown(rows, report, machine, command, repeat, warm_up_s))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    models = all_models()
    names = QUICK if args.quick else (args.models.split(",") if args.models else models)
    unknown = [n for n in names if n not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from torchvision.models.list_models()")
    snapshot_graphmerge()  # the code as it is now, even if the checkout is edited during the run
    machine = {**machine_info(), "threads": args.threads, "graphmerge_source": source_revision()}
    json_path = pathlib.Path(args.json)
    md_path = pathlib.Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    command = "python benchmarks/zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    warm_up_s = warm_up()
    rows: list[dict[str, Any]] = []
    for name in names:
        row = benchmark_model(name, args.repeat)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k not in ("model", "traceback")), flush=True)
        report = write_results(rows, machine, json_path, md_path, command, args.repeat, warm_up_s)
    print_table(rows, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
