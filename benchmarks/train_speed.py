"""Training speed of a merge: one SGD step of the teacher, the big student and the gated big student.

Per model, two teachers with different random weights are widened (``graphmerge.widen``) and
gated (``graphmerge.add_gates``); each variant below then takes SGD steps (momentum 0.9, lr 1e-3,
``zero_grad(set_to_none=True)``, forward, task loss, backward, step) on one fixed batch:

- teacher: teacher 0 in train mode;
- widened: the big student (two teachers side by side), train mode;
- gated: the gated big student, train mode (a fresh hard-concrete sample per step); the recipe's
  per-step budget projection (``project_to_budget``'s default direction) is timed apart, as
  "proj ms";
- widened+compile, gated+compile: the same under ``torch.compile`` (inductor, CPU), compiled in
  the first step (its wall time is "compile s": cold, into a fresh inductor cache directory,
  unless ``--no-fresh-compile-cache``);
- gated-ref (with ``--reference-gate FILE``): the gated big student built by another version of
  ``passes/gate.py``, e.g. ``git show REV:passes/gate.py > /tmp/gate_before.py``, for before/after;
- widened+bf16, gated+bf16 (with ``--bf16``): the eager steps with forward and loss under
  ``torch.autocast(cpu, bfloat16)``, as ``graphmerge merge --precision bf16`` runs them. With
  ``--bf16`` the table of certificate errors is added: I1 (the widened student in eval mode vs the
  mean of the float32 teachers) and I3 (the student compressed from the gates vs the gated big
  student, both in eval mode), each as max |a - b| / max(1, max |b|) on the batch, with the
  checked side in float32 and under bf16 autocast (the certificates themselves run in float64).

Timing: after warm-up steps, ``--repeat`` rounds; each round times one step of every variant, in
a rotating order, so load from other processes hits all variants alike. The table gives medians.
The clock is the process's CPU time (``time.process_time``; with one torch thread, a step's CPU
time is its time on a core, which other jobs sharing the machine disturb far less than wall
time); the wall-clock median is reported beside it.

FLOPs: forward + backward of one step under ``torch.utils.flop_counter.FlopCounterMode`` (matrix
products and convolutions; elementwise ops, the gates' multiplies among them, count zero).
"time x" and "FLOP x" are the step time and FLOPs relative to the teacher; "eff" is their quotient
(above 1: the variant runs slower than its FLOPs say); "vs widened" divides by the widened step
of the same mode (eager or compiled): for "gated", the gate overhead.

    python benchmarks/train_speed.py                       # every model, eager and compiled
    python benchmarks/train_speed.py --models resnet20 --no-compile
    python benchmarks/train_speed.py --quick               # the sine MLP, eager, 5 rounds (smoke test)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import inspect
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)  # benchmarks/coverage.py must not shadow the ``coverage`` package
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from graphmerge.passes.gate import budget_projection  # noqa: E402

import graphmerge  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "train_speed.json"
EAGER = ["teacher", "widened", "gated"]
COMPILED = ["widened+compile", "gated+compile"]
QUICK = ["mlp"]


@dataclass
class Spec:
    """A model of the benchmark: its builder, one batch (inputs, target) and the task loss."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[tuple[torch.Tensor, ...], torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    what: str


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)()
    return build


def _images(batch: int, size: int, classes: int) -> Callable[[torch.Generator], Any]:
    return lambda g: ((torch.randn(batch, 3, size, size, generator=g),),
                      torch.randint(0, classes, (batch,), generator=g))


def _sequence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _sine_batch(g: torch.Generator) -> Any:
    x = torch.rand(32, 1, generator=g) * 6 - 3
    return (x,), torch.sin(x)


def specs() -> dict[str, Spec]:
    from graphmerge.examples import mlp, mnist1d_cnn, resnet20, tiny_gpt

    return {
        "resnet20": Spec(resnet20.build_model, _images(64, 32, 10), F.cross_entropy,
                         "examples:resnet20, batch 64x3x32x32, cross-entropy over 10 classes"),
        "resnet18": Spec(_torchvision("resnet18"), _images(16, 64, 1000), F.cross_entropy,
                         "torchvision resnet18, batch 16x3x64x64, 1000 classes"),
        "mobilenet_v2": Spec(_torchvision("mobilenet_v2"), _images(16, 64, 1000), F.cross_entropy,
                             "torchvision mobilenet_v2, batch 16x3x64x64, 1000 classes"),
        "mlp": Spec(mlp.build_model, _sine_batch, F.mse_loss,
                    "examples:mlp (sine MLP 1-100-1), batch 32 (benchmarks/sine.py), MSE to sin(x)"),
        "mnist1d_cnn": Spec(mnist1d_cnn.build_model,
                            lambda g: ((torch.randn(128, 1, 40, generator=g),),
                                       torch.randint(0, 10, (128,), generator=g)),
                            F.cross_entropy, "examples:mnist1d_cnn, batch 128x1x40 (benchmarks/mnist1d.py)"),
        "tiny_gpt": Spec(tiny_gpt.build_model,
                         lambda g: ((torch.randint(0, 128, (32, 64), generator=g),),
                                    torch.randint(0, 128, (32, 64), generator=g)),
                         _sequence_loss, "examples:tiny_gpt (d 64, 4 heads, 2 layers), batch 32x64 byte ids, "
                                         "next-byte cross-entropy"),
    }


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    if hasattr(os, "getloadavg"):  # other processes share the machine: say how busy it was
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    return info


def keep_freed_memory() -> bool:
    """glibc only: keep freed memory in the heap (never trim it; mmap only above 32 MiB), so the
    next step does not fault it in again. Returns whether both settings took."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError, TypeError):
        return False


def load_gate_module(path: str) -> Any:
    """Another version of passes/gate.py, loaded under its own name (for ``gated-ref``)."""
    spec = importlib.util.spec_from_file_location("graphmerge_reference_gate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- measuring ------------------------------------------------------------------------------------

class Variant:
    """One model in training: its step, timed by the caller."""

    def __init__(self, name: str, module: nn.Module, inputs: tuple, target: torch.Tensor, loss: Callable,
                 compile: bool = False, bf16: bool = False):
        self.name, self.module, self.inputs, self.target, self.loss = name, module, inputs, target, loss
        self.bf16 = bf16
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
        self.call = torch.compile(module) if compile else module
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(self.call(*self.inputs), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def timed_step(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)


def step_flops(module: nn.Module, inputs: tuple, target: torch.Tensor, loss: Callable) -> int:
    """FLOPs of one forward + backward (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss(module(*inputs), target).backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def projection_ms(gated: nn.Module, repeat: int) -> float:
    """Median CPU ms of the recipe's per-step budget projection (its default direction) of every
    group to 1/N (the gates start above it, the cold case of benchmarks/projection.py; the log-alphas are not
    changed)."""
    gates = gated.gates
    flat, segments = gates.all_log_alpha().detach(), gates.segments()
    target = 1.0 / gated.n_teachers
    direction = inspect.signature(gated.project_to_budget).parameters["direction"].default
    times = []
    for _ in range(repeat):
        start = time.process_time()
        budget_projection(flat, segments, target, gates.open_shift, direction=direction)
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def measure_model(name: str, spec: Spec, args: argparse.Namespace, reference_gate: Any) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    inputs, target = spec.batch(generator)
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(spec.build().eval())
    example = tuple(x[:2] for x in inputs)
    big = graphmerge.widen(teachers, example, verify=False)
    errors: dict[str, Any] = {}
    if args.bf16:  # before any variant trains: the teachers and the big student as widen made them
        try:
            errors = certificate_errors(teachers, big, inputs)
        except Exception as error:
            errors = {"certificate_error": f"{type(error).__name__}: {error}"[:500]}
    # a second big student for compilation, built before any variant trains
    big_to_compile = graphmerge.widen(teachers, example, verify=False) if args.compile else None
    modules: dict[str, Callable[[], nn.Module]] = {
        "teacher": lambda: teachers[0].train(),
        "widened": lambda: big.train(),
        "gated": lambda: graphmerge.add_gates(big, seed=0).train(),
    }
    if reference_gate is not None:
        modules["gated-ref"] = lambda: reference_gate.add_gates(big, seed=0).train()
    if args.compile:
        modules["widened+compile"] = lambda: big_to_compile.train()
        modules["gated+compile"] = lambda: graphmerge.add_gates(big, seed=0).train()
    if args.bf16:
        modules["widened+bf16"] = lambda: big.train()
        modules["gated+bf16"] = lambda: graphmerge.add_gates(big, seed=0).train()
    rows: dict[str, dict[str, Any]] = {}
    variants: list[Variant] = []
    for variant, make in modules.items():
        row = rows[variant] = {"model": name, "variant": variant, "input": [list(x.shape) for x in inputs]}
        try:
            module = make()
            row["params"] = sum(p.numel() for p in module.parameters())
            if "+" not in variant:
                row["gflops"] = step_flops(module, inputs, target, spec.loss) / 1e9
            v = Variant(variant, module, inputs, target, spec.loss, compile=variant.endswith("+compile"),
                        bf16=variant.endswith("+bf16"))
            start = time.perf_counter()
            v.step()  # the first step compiles a compiled variant
            row["first_step_s"] = time.perf_counter() - start
            if variant.endswith("+compile"):
                row["compile_s"] = row["first_step_s"]
            for _ in range(args.warmup):
                v.step()
            variants.append(v)
            if variant == "gated":
                row["proj_ms"] = projection_ms(module, max(3, args.repeat // 2))
        except Exception as error:  # a benchmark reports failures, it does not stop on them
            row["error"] = f"{type(error).__name__}: {error}"[:500]
            row["traceback"] = traceback.format_exc(limit=-4)[-2000:]
            print(f"  {name} {variant}: {row['error'][:200]}", flush=True)
    for r in range(args.repeat):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.timed_step()
    for v in variants:
        rows[v.name].update(cpu_ms=1e3 * statistics.median(v.cpu), wall_ms=1e3 * statistics.median(v.wall),
                            steps=len(v.cpu))
    for variant in rows:
        eager = variant.split("+")[0]
        if variant != eager and "gflops" in rows.get(eager, {}):
            rows[variant]["gflops"] = rows[eager]["gflops"]  # the same model: the same FLOPs
    ratios(list(rows.values()), {v.name: v for v in variants})
    rows["widened"].update(errors)
    del variants
    gc.collect()
    return list(rows.values())


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The certificates' measure: max |actual - expected| / max(1, max |expected|)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1))


@torch.no_grad()
def certificate_errors(teachers: list[nn.Module], big: nn.Module, inputs: tuple) -> dict[str, float]:
    """I1 and I3 as errors of the float32 and the bf16-autocast forward (eval mode), on ``inputs``."""
    for module in (*teachers, big):
        module.eval()
    mean = torch.stack([t(*inputs).float() for t in teachers]).mean(0)
    gated = graphmerge.add_gates(big, seed=0).eval()
    student = graphmerge.compress(gated, "gates", verify=False).eval()
    try:  # the gated big student with the dropped channels' gates closed: what I3 compares with
        closed_out = graphmerge.closed_gates_reference(gated).eval()(*inputs)
    except graphmerge.GraphMergeError:  # I3 cannot be exact for this model (a normalised mix, tied heads)
        closed_out = None
    out = {}
    for precision, enabled in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out[f"i1_{precision}"] = _relative_error(big(*inputs), mean)
            if closed_out is not None:
                out[f"i3_{precision}"] = _relative_error(student(*inputs), closed_out)
    return out


def ratios(rows: list[dict[str, Any]], variants: dict[str, Variant]) -> None:
    """time x / FLOP x (vs teacher), eff, vs widened (same mode), from per-round pairs' medians too."""
    by = {r["variant"]: r for r in rows}
    teacher = by.get("teacher", {})

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of step(a) / step(b), both timed in the same round."""
        if a not in variants or b not in variants:
            return None
        return statistics.median(x / y for x, y in zip(variants[a].cpu, variants[b].cpu, strict=True))

    for r in rows:
        if "cpu_ms" in r and "cpu_ms" in teacher:
            r["time_x"] = r["cpu_ms"] / teacher["cpu_ms"]
        if r.get("gflops") and teacher.get("gflops"):
            r["flop_x"] = r["gflops"] / teacher["gflops"]
        if r.get("time_x") and r.get("flop_x"):
            r["eff"] = r["time_x"] / r["flop_x"]
        eager, plus, mode = r["variant"].partition("+")
        base = "widened" + plus + mode
        if eager == "gated-ref":
            base = "widened"
        if r["variant"] != base and "cpu_ms" in r and "cpu_ms" in by.get(base, {}):
            r["vs_widened"] = r["cpu_ms"] / by[base]["cpu_ms"]
            r["vs_widened_paired"] = paired(r["variant"], base)
        if mode and "cpu_ms" in r and "cpu_ms" in by.get(eager, {}):
            r["vs_eager"] = r["cpu_ms"] / by[eager]["cpu_ms"]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == model}

        def get(variant: str, key: str, by: dict = by) -> Any:
            return by.get(variant, {}).get(key)
        out[model] = {"gate_overhead_eager": get("gated", "vs_widened"),
                      "gate_overhead_eager_paired": get("gated", "vs_widened_paired"),
                      "gate_overhead_reference": get("gated-ref", "vs_widened"),
                      "gate_overhead_compiled": get("gated+compile", "vs_widened"),
                      "compile_speedup_widened": None if not get("widened+compile", "vs_eager")
                      else 1 / get("widened+compile", "vs_eager"),
                      "compile_speedup_gated": None if not get("gated+compile", "vs_eager")
                      else 1 / get("gated+compile", "vs_eager"),
                      "gate_overhead_bf16": get("gated+bf16", "vs_widened"),
                      "bf16_speedup_widened": None if not get("widened+bf16", "vs_eager")
                      else 1 / get("widened+bf16", "vs_eager"),
                      "bf16_speedup_gated": None if not get("gated+bf16", "vs_eager")
                      else 1 / get("gated+bf16", "vs_eager"),
                      **{k: get("widened", k) for k in ("i1_fp32", "i1_bf16", "i3_fp32", "i3_bf16")},
                      "errors": {v: r["error"] for v, r in by.items() if "error" in r}}
    return out


# -- reporting ------------------------------------------------------------------------------------

COLUMNS = [
    ("model", "model", "{}"), ("variant", "variant", "{}"), ("params", "params", "{:,}"),
    ("cpu_ms", "ms/step", "{:.2f}"), ("wall_ms", "wall ms", "{:.2f}"), ("gflops", "GFLOP f+b", "{:.4g}"),
    ("time_x", "time x", "{:.2f}"), ("flop_x", "FLOP x", "{:.2f}"), ("eff", "eff", "{:.2f}"),
    ("vs_widened", "vs widened", "{:.3f}"), ("vs_widened_paired", "(paired)", "{:.3f}"),
    ("vs_eager", "vs eager fp32", "{:.2f}"), ("compile_s", "compile s", "{:.0f}"), ("proj_ms", "proj ms", "{:.2f}"),
]


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "error" if key == "cpu_ms" and "error" in row else "-"
    return fmt.format(value)


def machine_line(machine: dict[str, Any]) -> str:
    allocator = "; glibc malloc told to keep freed memory" if machine.get("malloc_no_trim") else ""
    return (f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['torch_threads']} torch "
            f"thread(s), torch {machine['torch']}, load average {machine.get('load_avg_1m_at_start', '?')} at "
            f"start{allocator}")


def print_table(rows: list[dict[str, Any]], machine: dict[str, Any], repeat: int) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        print(" | ".join(t for _, t, _ in COLUMNS))
        for r in rows:
            print(" | ".join(cell(r, k, f) for k, _, f in COLUMNS))
        print(machine_line(machine))
        return
    table = Table(title=f"graphmerge training speed: one SGD step, median CPU ms of {repeat} interleaved rounds")
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="left" if title in ("model", "variant") else "right")
    for i, r in enumerate(rows):
        last_of_model = i + 1 == len(rows) or rows[i + 1]["model"] != r["model"]
        table.add_row(*[cell(r, k, f) for k, _, f in COLUMNS], end_section=last_of_model)
    console = Console(width=220)
    console.print(table)
    console.print(machine_line(machine))


def markdown(rows: list[dict[str, Any]], report: dict[str, Any], machine: dict[str, Any], command: str,
             args: argparse.Namespace) -> str:
    lines = ["# graphmerge training speed", "",
             f"Command: `{command}`. Machine: {machine_line(machine)}; shared with other jobs, so the "
             f"medians (of {args.repeat} interleaved rounds after {args.warmup} warm-up steps) are what "
             "to compare, side by side within a model.", "",
             "One SGD step (forward, task loss, backward, momentum step) on one fixed batch. ms/step: median "
             "process CPU time; wall ms: median wall time. time x / FLOP x: vs the teacher; eff = time x / "
             "FLOP x. vs widened: step / widened step in the same mode (for gated, the gate overhead; "
             "(paired): median of the per-round quotients). vs eager fp32: compiled or bf16 step / eager "
             "float32 step. "
             "proj ms: the recipe's per-step budget projection (not in ms/step). compile s: wall time of "
             "the first compiled step, which compiles forward and backward ("
             + ("cold: a fresh inductor cache" if args.compile and args.fresh_compile_cache
                else "inductor cache as found")
             + "). FLOPs count matrix products and convolutions (FlopCounterMode), forward + backward; the "
             "gates' multiplies are not among them."
             + (f" gated-ref: the gated big student built by `{args.reference_gate}`'s `add_gates` (another "
                "version of passes/gate.py), in the same rounds." if args.reference_gate else ""), "",
             "| " + " | ".join(t for _, t, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    lines += ["", "## Gate overhead and torch.compile", "",
              "| model | gated / widened (eager) | (paired) | reference gate / widened | gated / widened "
              "(compiled) | compile speed-up widened | compile speed-up gated |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    for model, s in report.items():
        lines.append(f"| {model} | {fmt(s['gate_overhead_eager'])} | {fmt(s['gate_overhead_eager_paired'])} | "
                     f"{fmt(s['gate_overhead_reference'])} | {fmt(s['gate_overhead_compiled'])} | "
                     f"{fmt(s['compile_speedup_widened'], '{:.2f}x')} | {fmt(s['compile_speedup_gated'], '{:.2f}x')} |")
    if args.bf16:
        lines += ["", "## bf16 autocast: speed and certificate errors", "",
                  "Certificate errors: max |a - b| / max(1, max |b|) in eval mode on the benchmark batch; I1: the "
                  "widened student vs the mean of the float32 teachers; I3: the student compressed from the "
                  "gates vs the float32 gated big student; the checked side in float32 and under bf16 autocast.",
                  "", "| model | bf16 speed-up widened | bf16 speed-up gated | gated / widened (bf16) | I1 fp32 | "
                  "I1 bf16 | I3 fp32 | I3 bf16 |", "|---|---|---|---|---|---|---|---|"]
        for model, s in report.items():
            lines.append(f"| {model} | {fmt(s['bf16_speedup_widened'], '{:.2f}x')} | "
                         f"{fmt(s['bf16_speedup_gated'], '{:.2f}x')} | {fmt(s['gate_overhead_bf16'])} | "
                         + " | ".join(fmt(s[k], "{:.1e}") for k in ("i1_fp32", "i1_bf16", "i3_fp32", "i3_bf16"))
                         + " |")
    errors = [(m, v, e) for m, s in report.items() for v, e in s["errors"].items()]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {m} {v}: {e}" for m, v, e in errors]
    return "\n".join(lines) + "\n"


def write(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a killed run leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated, from: {', '.join(specs())} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {', '.join(QUICK)}, eager only, 5 rounds, 1 warm-up step")
    parser.add_argument("--repeat", type=int, default=20, help="interleaved rounds (medians over them)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after the first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile'd widened and gated students (default: on, off with --quick)")
    parser.add_argument("--fresh-compile-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="compile into a new, empty inductor cache directory, so 'compile s' is the cold "
                             "compile time (default: on)")
    parser.add_argument("--reference-gate", metavar="FILE",
                        help="another passes/gate.py: adds a 'gated-ref' variant built by its add_gates")
    parser.add_argument("--malloc-no-trim", action="store_true",
                        help="glibc: keep freed memory (mallopt M_TRIM_THRESHOLD, M_MMAP_THRESHOLD) instead of "
                             "returning it to the OS after every step and faulting it in again")
    parser.add_argument("--bf16", action="store_true",
                        help="also time the eager widened and gated steps under bf16 autocast, and measure I1/I3 "
                             "errors of the bf16 forward")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON results")
    parser.add_argument("--markdown", default=None, help="markdown path (default: the JSON path with .md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or ",".join(QUICK)
        args.repeat, args.warmup = 5, 1
    if args.compile is None:
        args.compile = not args.quick
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    available = specs()
    names = args.models.split(",") if args.models else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(available)}")
    reference_gate = load_gate_module(args.reference_gate) if args.reference_gate else None
    machine = machine_info(args.threads)
    if args.malloc_no_trim:
        machine["malloc_no_trim"] = keep_freed_memory()
    cache = None
    if args.compile and args.fresh_compile_cache:  # read by inductor when it first compiles
        cache = tempfile.mkdtemp(prefix="graphmerge-train-speed-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    print(f"machine: {machine_line(machine)}", flush=True)
    command = "python benchmarks/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    json_path = pathlib.Path(args.json)
    md_path = pathlib.Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    rows: list[dict[str, Any]] = []
    for name in names:
        start = time.perf_counter()
        model_rows = measure_model(name, available[name], args, reference_gate)
        rows += model_rows
        overhead = next((r.get("vs_widened") for r in model_rows if r["variant"] == "gated"), None)
        print(f"{name}: {time.perf_counter() - start:.0f} s; gated / widened "
              f"{'-' if overhead is None else f'{overhead:.3f}'}", flush=True)
        report = summary(rows)
        settings = {"repeat": args.repeat, "warmup": args.warmup, "threads": args.threads, "compile": args.compile,
                    "clock": "process CPU time (time.process_time), wall time beside it",
                    "reference_gate": args.reference_gate, "malloc_no_trim": args.malloc_no_trim, "bf16": args.bf16,
                    "fresh_compile_cache": bool(args.compile and args.fresh_compile_cache),
                    "models": {n: available[n].what for n in names}}
        write(json_path, json.dumps({"command": command, "machine": machine, "settings": settings, "rows": rows,
                                     "summary": report}, indent=1, default=str))
        write(md_path, markdown(rows, report, machine, command, args))
    print_table(rows, machine, args.repeat)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
