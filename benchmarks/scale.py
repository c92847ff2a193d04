"""Compile at the scale of today's models: seconds and peak memory of every stage.

Per model, two teachers with different random weights (no download), in their own dtype:

- ``resnet50``: torchvision, float32, one 224 px image;
- ``gpt2``: Hugging Face ``GPT2Config()`` (GPT-2 small, 124 M parameters), float32;
- ``llama-125m``: Llama architecture, bfloat16: hidden 768, 12 layers, 12 heads, 4 kv heads,
  intermediate 2048, vocabulary 32 000 (125 M parameters);
- ``llama-1b``: Llama architecture, bfloat16: hidden 2048, 22 layers, 32 heads, 4 kv heads,
  intermediate 5632, vocabulary 1024 (1.0 B parameters; teachers 2 x 2 GB, big student 8 GB).
  Run only when the machine has at least 18 GiB available (``/proc/meminfo``), and once.

Text models take ``input_ids`` of one sequence of ``--seq-len`` tokens. Stages, each timed (wall
and CPU time) with its own peak RSS (the kernel's high-water mark, reset before the stage through
``/proc/self/clear_refs``):

- export: ``torch.export.export`` of teacher 0 alone, in a process of its own: the capture's own cost;
- analyze: ``graphmerge.analyze`` (capture + coupling analysis);
- widen: ``graphmerge.widen(groups=...)`` with its I1 and I2 certificates;
- compress: ``graphmerge.compress(big, scores)`` with its I3 certificate; the scores are seeded
  random per channel, so the student mixes the teachers wherever I3 can hold.

compile = analyze + widen + compress, in wall-clock seconds (the median of ``--repeat`` runs) and
in CPU seconds of the median run (on a machine shared with other jobs the wall clock is noisy; the
CPU time less so, though idle OpenMP threads spinning count in it). Each run of the pipeline is a
fresh subprocess (peaks of different models never mix), after a warm-up model (torch.export's
first call in a process pays one-time costs that belong to no model).

"peak / models" is (the largest stage peak RSS - the RSS before the teachers were built, i.e. the
interpreter with torch and the libraries loaded) / (teachers + big student, in their dtype): 1.0
would be the models alone. The certificates' own working memory (their float64 parameters and
live activations, ``timings["certify_peak_mb"]`` and ``["certify_i3_peak_mb"]``) is beside it.

    python benchmarks/scale.py --quick                 # resnet50 + gpt2
    python benchmarks/scale.py                         # all four (llama-1b if memory allows)
    python benchmarks/scale.py --models llama-125m --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK = ("resnet50", "gpt2")
ALL = ("resnet50", "gpt2", "llama-125m", "llama-1b")
ONCE = {"llama-1b"}  # run once whatever --repeat says
MIN_AVAILABLE_GIB = {"llama-1b": 18.0}
STAGES = ("analyze", "widen", "compress")
GIB = 2**30
MIB = 2**20


# --- the models -------------------------------------------------------------------------------

def llama_config(size: str) -> Any:
    from transformers import LlamaConfig

    if size == "125m":
        return LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
    return LlamaConfig(vocab_size=1024, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def build(name: str, seed: int) -> Any:
    """One teacher, random weights from ``seed``, in eval mode and its benchmark dtype."""
    import torch

    torch.manual_seed(seed)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None).eval()
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config()).eval()
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bfloat16: no float32 copy of 1 B parameters
    try:
        return LlamaForCausalLM(llama_config(name.split("-")[1])).eval()
    finally:
        torch.set_default_dtype(previous)


def example(name: str, seq_len: int) -> tuple[tuple, dict[str, Any], str]:
    """(inputs, keyword inputs, a description)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if name == "resnet50":
        return (torch.randn(1, 3, 224, 224, generator=generator),), {}, "1 x 3 x 224 x 224"
    vocab = 50257 if name == "gpt2" else llama_config(name.split("-")[1]).vocab_size
    ids = torch.randint(0, vocab, (1, seq_len), generator=generator)
    return (), {"input_ids": ids}, f"input_ids 1 x {seq_len}"


# --- measuring ----------------------------------------------------------------------------------

def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (None where there is no such file or field)."""
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_rss() -> int:
    """Peak RSS in bytes since the last reset (or since start)."""
    peak = _status_kb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    return _status_kb("VmRSS") or 0


def state_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[int, int] = {}
    for tensor in module.state_dict().values():
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def stage(record: dict[str, Any], name: str, run: Callable[[], Any]) -> Any:
    import gc

    gc.collect()
    reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    record[name] = {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                    "peak_rss_mb": peak_rss() / MIB, "rss_after_mb": current_rss() / MIB}
    return result


def warm_up() -> float:
    """A tiny model through the pipeline: torch.export's first-call costs, not any model's."""
    import torch
    from torch import nn

    import graphmerge

    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(4 * 6 * 6, 2)).eval())
    start = time.perf_counter()
    x = torch.randn(2, 3, 8, 8)
    big = graphmerge.widen(teachers, x)
    graphmerge.compress(big, "teacher:0")
    return time.perf_counter() - start


# --- one run, in a subprocess -----------------------------------------------------------------

def run_export(name: str, seq_len: int, threads: int) -> dict[str, Any]:
    """torch.export of teacher 0, alone in this process (after a warm-up export)."""
    import torch

    torch.set_num_threads(threads)
    warm_up()
    model = build(name, 0)
    args, kwargs, _ = example(name, seq_len)
    if "input_ids" in kwargs and hasattr(model, "config"):
        kwargs = {**kwargs, "use_cache": False}  # as graphmerge's capture passes it
    record: dict[str, Any] = {}
    stage(record, "export", lambda: torch.export.export(model, args, kwargs, strict=False))
    return record["export"]


def run_pipeline(name: str, seq_len: int, threads: int) -> dict[str, Any]:
    import torch

    import graphmerge

    torch.set_num_threads(threads)
    warm_up_s = warm_up()
    baseline = current_rss()
    args, kwargs, described = example(name, seq_len)
    record: dict[str, Any] = {"model": name, "input": described, "threads": threads, "warm_up_s": warm_up_s}
    stages: dict[str, Any] = {}
    teachers = stage(stages, "build", lambda: [build(name, seed) for seed in (0, 1)])
    inputs = args if args else ()
    groups = stage(stages, "analyze", lambda: graphmerge.analyze(teachers[0], inputs, example_kwargs=kwargs))
    big = stage(stages, "widen", lambda: graphmerge.widen(teachers, inputs, example_kwargs=kwargs, groups=groups))
    info = graphmerge.widen_info(big)[1]
    generator = torch.Generator().manual_seed(0)
    scores = {g.id: torch.rand(info.n_teachers * g.width, generator=generator) for g in info.groups.gated}
    student = stage(stages, "compress", lambda: graphmerge.compress(big, scores))
    dtype = next(p.dtype for p in teachers[0].parameters())
    teacher_bytes = sum(state_bytes(t) for t in teachers)
    big_bytes = state_bytes(big)
    certificates = dict(info.certificates)
    certificates["I3"] = graphmerge.student_certificate(student)
    record.update(
        dtype=str(dtype).replace("torch.", ""),
        params_per_teacher=sum(p.numel() for p in teachers[0].parameters()),
        teachers_mb=teacher_bytes / MIB, big_mb=big_bytes / MIB, student_mb=state_bytes(student) / MIB,
        baseline_rss_mb=baseline / MIB, stages=stages,
        timings=dict(groups.timings),
        certificates={k: (v.to_dict() if v is not None else None) for k, v in certificates.items()},
        compile_s=sum(stages[s]["s"] for s in STAGES), compile_cpu_s=sum(stages[s]["cpu_s"] for s in STAGES),
        peak_rss_mb=max(stages[s]["peak_rss_mb"] for s in STAGES),
        max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    record["peak_over_models"] = (record["peak_rss_mb"] - record["baseline_rss_mb"]) / (
        record["teachers_mb"] + record["big_mb"])
    record["peak_abs_over_models"] = record["peak_rss_mb"] / (record["teachers_mb"] + record["big_mb"])
    return record


def worker(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(ROOT))
    try:
        if args.worker == "export":
            result: dict[str, Any] = run_export(args.models, args.seq_len, args.threads)
        else:
            result = run_pipeline(args.models, args.seq_len, args.threads)
    except Exception as error:  # noqa: BLE001 - the parent records what failed
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
    Path(args.result).write_text(json.dumps(result, default=str))


# --- the parent ----------------------------------------------------------------------------------

def available_gib() -> float:
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) / 2**20 if match else 0.0


def spawn(kind: str, name: str, args: argparse.Namespace, limit_bytes: int) -> dict[str, Any]:
    """Run one worker; kill it if its RSS passes ``limit_bytes`` (so a model that does not fit
    cannot take the machine down with it), and say so."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--models", name,
                   "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--result", str(out)]
        start = time.perf_counter()
        env = dict(os.environ)
        if args.passive_omp:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env)
        killed: list[int] = []
        watch = threading.Thread(target=_watch, args=(process, limit_bytes, killed), daemon=True)
        watch.start()
        stdout, stderr = process.communicate()
        watch.join(timeout=1)
        elapsed = time.perf_counter() - start
        if out.exists():
            result = json.loads(out.read_text())
        else:
            result = {"error": f"worker exited with code {process.returncode}", "stderr": stderr[-3000:]}
        if killed:
            result["error"] = (f"stopped at {killed[0] / GIB:.1f} GiB RSS: over the {limit_bytes / GIB:.1f} GiB "
                               "this machine had available")
        result["process_s"] = elapsed
        return result


def _watch(process: subprocess.Popen, limit: int, killed: list[int]) -> None:
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            match = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
        except OSError:
            return
        if match and int(match.group(1)) * 1024 > limit:
            killed.append(int(match.group(1)) * 1024)
            process.kill()
            return
        time.sleep(0.2)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median compile time, with the medians of every stage's seconds beside it."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    ordered = sorted(good, key=lambda r: r["compile_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs"] = len(good)
    row["compile_s_all"] = [r["compile_s"] for r in good]
    row["compile_s_median"] = statistics.median(row["compile_s_all"])
    row["timings_median"] = {key: statistics.median(r["timings"][key] for r in good if key in r["timings"])
                             for key in good[0]["timings"]}
    return row


COLUMNS = [  # (title, value of a row)
    ("model", lambda r: r["model"]),
    ("params", lambda r: f"{r['params_per_teacher'] / 1e6:.0f} M {r['dtype']}"),
    ("export s", lambda r: f"{r['export']['s']:.2f}" if "export" in r else "-"),
    ("capture s", lambda r: f"{r['timings_median']['trace_s']:.2f}"),
    ("couple s", lambda r: f"{r['timings_median']['couple_s']:.2f}"),
    ("widen s", lambda r: f"{r['timings_median']['widen_s']:.2f}"),
    ("I1 s", lambda r: f"{r['timings_median']['certify_i1_s']:.2f}"),
    ("I2 s", lambda r: f"{r['timings_median']['certify_i2_s']:.2f}"),
    ("compress s", lambda r: f"{r['timings_median']['compress_s']:.2f}"),
    ("I3 s", lambda r: f"{r['timings_median'].get('certify_i3_s', 0.0):.2f}"
     + (" (skipped)" if (r["certificates"].get("I3") or {}).get("skipped") else "")),
    ("compile s", lambda r: f"{r['compile_s_median']:.2f}"),
    ("compile CPU s", lambda r: f"{r['compile_cpu_s']:.2f}"),
    ("teachers + big", lambda r: f"{(r['teachers_mb'] + r['big_mb']) / 1024:.2f} GB"),
    ("peak RSS", lambda r: f"{r['peak_rss_mb'] / 1024:.2f} GB"),
    ("peak / models", lambda r: f"{r['peak_over_models']:.2f}"),
    ("cert. MB", lambda r: f"{max(r['timings'].get(k, 0) for k in ('certify_peak_mb', 'certify_i3_peak_mb')):.0f}"),
]
MEMORY_COLUMNS = [
    ("model", lambda r: r["model"]),
    ("baseline", lambda r: f"{r['baseline_rss_mb'] / 1024:.2f}"),
    ("teachers", lambda r: f"{r['teachers_mb'] / 1024:.2f}"),
    ("big", lambda r: f"{r['big_mb'] / 1024:.2f}"),
    ("student", lambda r: f"{r['student_mb'] / 1024:.2f}"),
    *[(f"{s} peak", lambda r, s=s: f"{r['stages'][s]['peak_rss_mb'] / 1024:.2f}") for s in ("build", *STAGES)],
    ("export peak", lambda r: f"{r['export']['peak_rss_mb'] / 1024:.2f}" if "export" in r else "-"),
    ("I1 / I3 MB", lambda r: f"{r['timings'].get('certify_peak_mb', 0):.0f} / "
                             f"{r['timings'].get('certify_i3_peak_mb', 0):.0f}"),
]


def table(rows: list[dict[str, Any]], columns: list, title: str) -> str:
    """A markdown table (printed, and kept for the README)."""
    lines = [f"**{title}**", "", "| " + " | ".join(c for c, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row.get('model', '?')} | failed: {row['error']} |")
            continue
        lines.append("| " + " | ".join(str(value(row)) for _, value in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet50 and gpt2 only")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(ALL)}")
    parser.add_argument("--repeat", type=int, default=3, help="pipeline runs per model (llama-1b: once)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens in the text models' example input")
    parser.add_argument("--passive-omp", action="store_true",
                        help="run the workers with OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of "
                             "spinning between parallel regions (on a machine shared with other jobs, spinning "
                             "threads take the cores the main thread needs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for scale.json")
    parser.add_argument("--worker", choices=("export", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    names = args.models.split(",") if args.models else list(QUICK if args.quick else ALL)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    rows = []
    load_at_start = os.getloadavg()[0]
    for name in names:
        free = available_gib()
        needed = MIN_AVAILABLE_GIB.get(name, 0.0)
        if free < needed:
            rows.append({"model": name, "error": f"not run: {free:.1f} GiB available, {needed:.0f} GiB needed"})
            print(f"{name}: {rows[-1]['error']}", flush=True)
            continue
        limit = int((free - 1.0) * GIB)
        runs = []
        for _ in range(1 if name in ONCE else args.repeat):
            runs.append(spawn("pipeline", name, args, limit))
            print(f"{name}: " + (runs[-1].get("error") or f"compile {runs[-1]['compile_s']:.2f} s, peak "
                                 f"{runs[-1]['peak_rss_mb'] / 1024:.2f} GB"), flush=True)
        row = summarise(runs)
        row.setdefault("model", name)
        if "error" not in row:
            row["export"] = spawn("export", name, args, limit)
        rows.append(row)
    policy = "PASSIVE" if args.passive_omp else os.environ.get("OMP_WAIT_POLICY", "default")
    setting = (f"{args.threads} torch threads, OMP_WAIT_POLICY {policy}, text inputs of {args.seq_len} tokens, "
               f"load average {load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    text = "\n\n".join([setting, table(rows, COLUMNS, "time"), table(rows, MEMORY_COLUMNS, "memory, GB")])
    print(text)
    report = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "threads": args.threads, "seq_len": args.seq_len,
              "omp_wait_policy": "PASSIVE" if args.passive_omp else os.environ.get("OMP_WAIT_POLICY", "default"),
              "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
              "models": rows, "tables": text}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scale.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
