"""Latency benchmark: several models, several runtimes, one interleaved run.

The question a merge answers is relative ("is the student as fast as the teacher; what does the
2x-wide big student cost?"), so every model is measured in the same run and the timing loop is
round-robin: each repetition runs every (model, runtime) cell once before any cell runs again.
Machine noise (frequency scaling, a neighbour process) then lands on all cells alike instead of
on whichever model happened to be measured during the disturbance.

Runtimes: onnxruntime (CPUExecutionProvider always; CUDAExecutionProvider with io-binding when
the installed runtime and torch both offer CUDA), torch eager, and optionally ``torch.compile``
(opt-in: compiling takes minutes on small CPUs). Every ONNX file is exported with
:func:`graphmerge.passes.export.export_onnx_report`, so it has already passed the checker and a parity
check; the parity reported per row is measured again on the benchmark's own inputs.

onnxruntime's worker threads are told not to spin while idle: spinning is its default and makes
it slightly faster alone, but in an interleaved run the spinning threads steal the cores torch is
about to use, and torch eager latency then measures the contention, not the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from graphmerge.errors import GraphMergeError
from graphmerge.passes.export import export_onnx_report, normalize_inputs
from graphmerge.passes.onnx_checks import batch_like, flatten_outputs, import_onnxruntime, parity_error
from graphmerge.passes.util import eval_mode, one_line, write_atomic

__all__ = [
    "ROW_FIELDS",
    "benchmark",
    "count_flops",
    "machine_info",
    "print_table",
    "resolve_providers",
    "write_json",
    "write_markdown",
]

#: Keys of every row :func:`benchmark` returns (documented in the JSON output too).
ROW_FIELDS = (
    "model",  # the key in the ``models`` dict
    "runtime",  # "onnxruntime", "torch", "torch.compile"
    "device",  # "cpu" or "cuda"
    "batch",
    "status",  # "ok" or "n/a: <why>"
    "p50_ms",
    "p90_ms",
    "mean_ms",
    "iters",
    "throughput",  # samples per second at the median latency
    "ratio",  # p50 over the p50 of the first model for the same runtime, device and batch
    "params",
    "flops_per_sample",  # FlopCounterMode count (a multiply-add is 2 FLOPs)
    "onnx_bytes",  # ONNX file size including any external-data side file
    "exporter",  # "dynamo" or "torchscript"
    "parity_max_abs",  # against torch eager on the same inputs
    "parity_max_rel",  # max abs over max(1, max|torch output|)
)

_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: Timed calls per cell at the most, whatever ``min_time`` asks (bounds time and memory for tiny models).
MAX_ITERS = 10_000


@dataclass
class _Cell:
    """One (model, runtime, device) at one batch size: a closure to time and its samples."""

    model: str
    runtime: str
    device: str
    run: Callable[[], Any] | None
    status: str = "ok"
    parity: tuple[float, float] | None = None
    samples_ns: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def benchmark(
    models: Mapping[str, tuple[nn.Module, Any]],
    *,
    batches: Sequence[int] = (1, 8, 32),
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    warmup: int = 3,
    min_time: float = 0.5,
    min_iters: int = 20,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Measure every model on every runtime at every batch size; return one dict per cell.

    ``models`` maps a display name to ``(module, example_inputs)``; the first entry is the
    reference for the ``ratio`` column. ``providers`` holds "cpu", "cuda" or "auto" (every one
    the installed onnxruntime and torch support). ``threads`` sets both torch's and
    onnxruntime's intra-op threads (default: torch's current count), so neither runtime gets
    more cores than the other. Each cell runs ``warmup`` untimed calls, then timed calls
    interleaved with the other cells until it has at least ``min_iters`` samples and
    ``min_time`` seconds (capped at :data:`MAX_ITERS`). ONNX files go to a temporary folder. Rows
    have the keys in :data:`ROW_FIELDS`.
    """
    if not models:
        raise GraphMergeError("benchmark needs at least one model; pass {'name': (module, example_inputs)}.")
    devices = resolve_providers(providers)
    threads = _check_threads(threads)
    rows: list[dict[str, Any]] = []
    with (
        _torch_threads(threads),
        tempfile.TemporaryDirectory(prefix="graphmerge-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        for module, _ in models.values():
            stack.enter_context(eval_mode(module))
        prepared = {
            name: _prepare(name, m, x, pathlib.Path(tmp) / f"{i:02d}-{_safe(name)}.onnx")
            for i, (name, (m, x)) in enumerate(models.items())
        }
        for batch in batches:
            cells = _build_cells(prepared, batch, devices, threads, compile)
            _time_interleaved(cells, warmup, min_time, min_iters)
            rows.extend(_rows_for(cells, prepared, batch))
    _add_ratios(rows, next(iter(models)))
    return rows


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """Map "cpu"/"cuda"/"auto" to the devices this machine can run, failing clearly otherwise."""
    ort = import_onnxruntime()

    available = ort.get_available_providers()
    cuda_ok = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    wanted: list[str] = []
    for item in requested:
        item = item.strip().lower()
        if item == "auto":
            wanted += ["cpu"] + (["cuda"] if cuda_ok else [])
        elif item == "cpu":
            wanted.append("cpu")
        elif item == "cuda":
            if not cuda_ok:
                raise GraphMergeError(
                    f"provider 'cuda' requested but unavailable: onnxruntime offers {available} and "
                    f"torch.cuda.is_available() is {torch.cuda.is_available()}. Install the 'gpu' extra "
                    f"(onnxruntime-gpu, instead of onnxruntime) on a CUDA machine, or use --providers cpu."
                )
            wanted.append("cuda")
        else:
            raise GraphMergeError(
                f"unknown provider {item!r}; choose from cpu, cuda, auto (comma-separated)."
            )
    return list(dict.fromkeys(wanted)) or ["cpu"]


def machine_info(threads: int | None = None, devices: Sequence[str] = ("cpu",)) -> dict[str, Any]:
    """Describe what the numbers were measured on; latency without this is meaningless."""
    ort = import_onnxruntime()

    n_threads = threads or torch.get_num_threads()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "torch_threads": n_threads,
        "ort_intra_op_threads": n_threads,
        "ort_available_providers": ort.get_available_providers(),
        "providers_used": [_ORT_PROVIDERS[d] for d in devices],
    }
    if hasattr(os, "getloadavg"):  # other processes on the machine distort latency; record them
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if "cuda" in devices and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def count_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int | None:
    """FLOPs of one forward on ``inputs`` by ``torch.utils.flop_counter`` (None if it fails)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(*inputs)
        return int(counter.get_total_flops())
    except Exception:  # the counter is a nice-to-have; never fail a benchmark on it
        return None


def print_table(rows: Sequence[Mapping[str, Any]], machine: Mapping[str, Any], console: Any = None) -> None:
    """Print rows and the machine description as a rich table."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
            console = Console(width=160)
    table = Table(title="graphmerge latency benchmark", caption=_machine_line(machine))
    for col, justify in _COLUMNS:
        table.add_column(col, justify=justify)
    for row in rows:
        table.add_row(*_format_row(row))
    console.print(table)


def write_json(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    machine: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write ``{"machine", "fields", "rows", **extra}`` atomically (``passes.util.write_atomic``)."""
    doc = {"machine": dict(machine), **(dict(extra) if extra else {})}
    doc.update(fields=list(ROW_FIELDS), rows=list(rows))
    return write_atomic(path, json.dumps(doc, indent=2, default=_json_default) + "\n")


def write_markdown(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], machine: Mapping[str, Any], notes: str = ""
) -> pathlib.Path:
    """Write the same table as GitHub markdown, machine line and notes underneath."""
    header = [c for c, _ in _COLUMNS]
    rule = "|" + "|".join("---:" if j == "right" else "---" for _, j in _COLUMNS) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(_format_row(r)) + " |" for r in rows]
    text = "\n".join(lines) + f"\n\nMachine: {_machine_line(machine)}\n"
    if notes:
        text += f"\n{notes}\n"
    return write_atomic(path, text)


# --------------------------------------------------------------------------------------------
# Preparation: export, parameters, FLOPs
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    params: int
    onnx_path: pathlib.Path | None
    onnx_bytes: int | None
    exporter: str | None
    export_error: str | None
    flops_per_sample: float | None


def _prepare(
    name: str, module: nn.Module, example_inputs: Any, onnx_path: pathlib.Path
) -> _Prepared:
    """Export ``module`` once (dynamic batch serves every batch size) and count its cost."""
    inputs = normalize_inputs(example_inputs)
    path, size, exporter, error = None, None, None, None
    try:
        report = export_onnx_report(module, inputs, onnx_path, tolerance=1e-3)
        path, size, exporter = report.path, report.size_bytes, report.exporter
    except GraphMergeError as exc:
        error = str(exc)
    one = batch_like(inputs, 1)
    flops = count_flops(module, one)
    return _Prepared(
        module=module,
        inputs=inputs,
        params=sum(p.numel() for p in module.parameters()),
        onnx_path=path,
        onnx_bytes=size,
        exporter=exporter,
        export_error=error,
        flops_per_sample=float(flops) if flops is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Cells: one closure per (model, runtime, device) at a batch size
# --------------------------------------------------------------------------------------------


def _build_cells(
    prepared: Mapping[str, _Prepared],
    batch: int,
    devices: Sequence[str],
    threads: int,
    compile: bool,
) -> list[_Cell]:
    cells: list[_Cell] = []
    for name, prep in prepared.items():
        inputs = batch_like(prep.inputs, batch, seed=batch)
        with torch.no_grad():
            reference = flatten_outputs(prep.module(*inputs))
        for device in devices:
            cells.append(_ort_cell(name, prep, inputs, reference, device, threads))
            cells.append(_torch_cell(name, prep.module, inputs, reference, device, compiled=False))
            if compile:
                cells.append(_torch_cell(name, prep.module, inputs, reference, device, compiled=True))
    return cells


def _ort_cell(
    name: str,
    prep: _Prepared,
    inputs: tuple[torch.Tensor, ...],
    reference: list[torch.Tensor],
    device: str,
    threads: int,
) -> _Cell:
    """An onnxruntime session; on CUDA, inputs and outputs are bound on the device once."""
    if prep.onnx_path is None:
        return _Cell(name, "onnxruntime", device, None, status=f"n/a: export failed: {prep.export_error}")
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT worker threads spin by default; interleaved with torch they steal its cores
    # (measured: resnet20 eager 1.4 ms -> 26 ms on 2 cores). Off for a fair comparison.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(prep.onnx_path), options, providers=[_ORT_PROVIDERS[device]])
    except Exception as exc:  # a provider that cannot start must not end the whole run
        return _Cell(name, "onnxruntime", device, None, status=f"n/a: session failed: {one_line(exc, 200)}")
    if _ORT_PROVIDERS[device] not in session.get_providers():  # onnxruntime falls back to CPU silently
        return _Cell(name, "onnxruntime", device, None,
                     status=f"n/a: onnxruntime could not start {_ORT_PROVIDERS[device]} "
                            f"(session uses {session.get_providers()})")
    names = [i.name for i in session.get_inputs()]
    feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=False)}
    outputs = session.run(None, feeds)
    parity = parity_error(reference, outputs)
    if device == "cpu":
        return _Cell(name, "onnxruntime", device, lambda: session.run(None, feeds), parity=parity)
    binding = session.io_binding()
    for n, array in feeds.items():
        binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run_cuda() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return _Cell(name, "onnxruntime", device, run_cuda, parity=parity)


def _torch_cell(
    name: str,
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    reference: list[torch.Tensor],
    device: str,
    compiled: bool,
) -> _Cell:
    """torch eager or torch.compile on ``device``; a compile failure marks the cell n/a."""
    runtime = "torch.compile" if compiled else "torch"
    dev = torch.device(device)
    try:
        target = module.to(dev) if device == "cpu" else _copy_to(module, dev)
        xs = tuple(x.to(dev) for x in inputs)
        fn = torch.compile(target) if compiled else target
        with torch.inference_mode():
            out = flatten_outputs(fn(*xs))
    except Exception as exc:  # torch.compile fails in many ways; report, do not abort the run
        return _Cell(name, runtime, device, None, status=f"n/a: {one_line(exc, 200)}")
    parity = parity_error(reference, [o.detach().cpu().numpy() for o in out])

    def run() -> None:
        with torch.inference_mode():
            fn(*xs)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return _Cell(name, runtime, device, run, parity=parity)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _time_interleaved(cells: list[_Cell], warmup: int, min_time: float, min_iters: int) -> None:
    """Warm every cell, then round-robin until each has enough samples and enough time."""
    live = [c for c in cells if c.run is not None]
    for _ in range(max(warmup, 0)):
        for cell in live:
            cell.run()  # type: ignore[misc]
    min_ns = int(min_time * 1e9)
    pending = list(live)
    while pending:
        for cell in pending:
            start = time.perf_counter_ns()
            cell.run()  # type: ignore[misc]
            cell.samples_ns.append(time.perf_counter_ns() - start)
        pending = [c for c in pending if not _done(c, min_ns, min_iters)]


def _done(cell: _Cell, min_ns: int, min_iters: int) -> bool:
    n = len(cell.samples_ns)
    return n >= MAX_ITERS or (n >= max(min_iters, 1) and sum(cell.samples_ns) >= min_ns)


def _rows_for(cells: Sequence[_Cell], prepared: Mapping[str, _Prepared], batch: int) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        prep = prepared[cell.model]
        row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
        row.update(
            model=cell.model,
            runtime=cell.runtime,
            device=cell.device,
            batch=batch,
            status=cell.status,
            params=prep.params,
            flops_per_sample=prep.flops_per_sample,
            onnx_bytes=prep.onnx_bytes,
            exporter=prep.exporter,
            iters=len(cell.samples_ns),
        )
        if cell.parity is not None:
            row["parity_max_abs"], row["parity_max_rel"] = cell.parity
        if cell.samples_ns:
            ms = np.asarray(cell.samples_ns, dtype=np.float64) / 1e6
            p50 = float(np.percentile(ms, 50))
            row.update(
                p50_ms=p50,
                p90_ms=float(np.percentile(ms, 90)),
                mean_ms=float(statistics.fmean(ms)),
                throughput=batch / (p50 / 1e3) if p50 > 0 else None,
            )
        rows.append(row)
    return rows


def _add_ratios(rows: list[dict[str, Any]], reference_model: str) -> None:
    """ratio = p50 / p50 of the reference model in the same (runtime, device, batch)."""
    base = {
        (r["runtime"], r["device"], r["batch"]): r["p50_ms"]
        for r in rows
        if r["model"] == reference_model and r["p50_ms"]
    }
    for r in rows:
        ref = base.get((r["runtime"], r["device"], r["batch"]))
        r["ratio"] = r["p50_ms"] / ref if ref and r["p50_ms"] else None


# --------------------------------------------------------------------------------------------
# Formatting and small helpers
# --------------------------------------------------------------------------------------------

_COLUMNS = (
    ("model", "left"),
    ("runtime", "left"),
    ("dev", "left"),
    ("batch", "right"),
    ("p50 ms", "right"),
    ("p90 ms", "right"),
    ("samples/s", "right"),
    ("ratio", "right"),
    ("params", "right"),
    ("MFLOPs/sample", "right"),
    ("ONNX MB", "right"),
    ("max rel err", "right"),
)


def _format_row(r: Mapping[str, Any]) -> list[str]:
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    status = r.get("status", "ok")
    p50 = num(r.get("p50_ms"), ".3f") if status == "ok" else status[:60]
    return [
        str(r["model"]),
        str(r["runtime"]),
        str(r["device"]),
        str(r["batch"]),
        p50,
        num(r.get("p90_ms"), ".3f"),
        num(r.get("throughput"), ",.0f"),
        num(r.get("ratio"), ".2f"),
        num(r.get("params"), ","),
        num(r["flops_per_sample"] / 1e6 if r.get("flops_per_sample") is not None else None, ".2f"),
        num(r["onnx_bytes"] / 1e6 if r.get("onnx_bytes") is not None else None, ".2f"),
        num(r.get("parity_max_rel"), ".1e"),
    ]


def _machine_line(m: Mapping[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (
        f"{m.get('cpu')} ({m.get('logical_cpus')} logical CPUs){gpu}; torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads), onnxruntime {m.get('onnxruntime')} "
        f"({m.get('ort_intra_op_threads')} intra-op threads), "
        f"providers {', '.join(m.get('providers_used', []))}"
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _check_threads(threads: int | None) -> int:
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise GraphMergeError(f"threads must be a positive integer, got {threads}.")
    return threads


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(module).to(device)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"


