"""Per-rank parameter memory of a sharded merge (``strategy="fsdp"``) against an unsharded one (DDP).

Two teachers of the tiny GPT example (``graphmerge.examples.tiny_gpt``, bigger than its defaults:
d_model 384, 6 blocks, vocabulary 256) are merged by ``graphmerge.merge`` under torchrun with 2
CPU processes (gloo), once with ``strategy="fsdp"`` and once with the default DDP, on random
token sequences (1 gate epoch, 1 fine-tuning epoch, 4 steps each). Reported per phase:

- **parameter bytes per rank**: what each rank holds of the gated big student (gate phase) and
  of the student (fine-tuning), from the run's ``summary["sharding"]``: the local shards of the
  sharded parameters plus the whole gates, against the unsharded model's bytes. Gradients and
  the SGD momentum are sharded the same way, so the ratio is that of the whole training state.
- **RSS**: rank 0's resident set size at the end of the first gate epoch (``/proc/self/status``, in
  the epoch's log callback, which runs on rank 0 only, after the phase's weights, gradients and
  momentum exist) and every rank's peak over the run (``ru_maxrss``). The workers run with
  ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns freed tensors to the system and the RSS
  follows the live memory. Both runs build the teachers and the full big student on every rank
  (and widen certifies it in float64) before the gate phase shards it, so the peak is set before
  sharding starts; the epoch-end RSS shows the saving while training.

    python benchmarks/fsdp_memory.py            # writes benchmarks/results/fsdp_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = {"vocab_size": 256, "d_model": 384, "n_heads": 6, "n_layers": 6, "context": 32}
PROCESSES = 2


def _rss_kib() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


def worker(strategy: str, out: Path) -> None:
    """One rank of one merge (run under torchrun); writes its figures to ``out/<strategy>_rank<r>.json``."""
    import torch
    from torch.utils.data import TensorDataset

    import graphmerge
    from graphmerge.examples.tiny_gpt import build_model

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (64, MODEL["context"] + 1), generator=generator)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(build_model(**MODEL))
    figures: dict[str, Any] = {}

    def measure(record: dict[str, Any]) -> None:
        if record["phase"] == "gate" and record["epoch"] == 1:
            figures["rss_gate_epoch_kib"] = _rss_kib()

    result = graphmerge.merge(teachers, data, loss="cross_entropy", gate_epochs=1, finetune_epochs=1, batch_size=16,
                              strategy=strategy, preflight=False, log=measure)
    figures.setdefault("rss_gate_epoch_kib", None)  # the log runs on rank 0 only
    figures.update(rank=rank, strategy=strategy, sharding=result.summary.get("sharding"),
                   peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    (out / f"{strategy}_rank{rank}.json").write_text(json.dumps(figures))


def _launch(strategy: str, out: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={PROCESSES}",
                           "--standalone", __file__, "--worker", strategy, str(out)], env=environment,
                          capture_output=True, text=True, timeout=1200)
    if done.returncode:
        raise SystemExit(f"the {strategy} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("STRATEGY", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp_memory.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    with tempfile.TemporaryDirectory() as folder:
        for strategy in ("fsdp", "ddp"):
            _launch(strategy, Path(folder))
        ranks = {(s, r): json.loads((Path(folder) / f"{s}_rank{r}.json").read_text())
                 for s in ("fsdp", "ddp") for r in range(PROCESSES)}
    sharding = ranks[("fsdp", 0)]["sharding"]
    rows = []
    for phase in ("gate", "finetune"):
        report = sharding[phase]
        for rank, held in enumerate(report["param_bytes_per_rank"]):
            rows.append({"phase": phase, "rank": rank, "units": report["units"],
                         "param_bytes_unsharded": report["param_bytes_unsharded"], "param_bytes_rank": held,
                         "ratio": held / report["param_bytes_unsharded"]})
    rss = [{"rank": r, "strategy": s, "rss_gate_epoch_kib": ranks[(s, r)]["rss_gate_epoch_kib"],
            "peak_rss_kib": ranks[(s, r)]["peak_rss_kib"]} for s in ("fsdp", "ddp") for r in range(PROCESSES)]
    for row in rss:
        if row["rss_gate_epoch_kib"] is None:
            del row["rss_gate_epoch_kib"]
    print(f"tiny GPT {MODEL}, 2 teachers, {PROCESSES} processes (gloo, CPU)")
    print(f"{'phase':<9} {'rank':>4} {'units':>5} {'unsharded MiB':>14} {'this rank MiB':>14} {'ratio':>6}")
    for row in rows:
        print(f"{row['phase']:<9} {row['rank']:>4} {row['units']:>5} {row['param_bytes_unsharded'] / 2**20:>14.2f} "
              f"{row['param_bytes_rank'] / 2**20:>14.2f} {row['ratio']:>6.3f}")
    print(f"\n{'strategy':<8} {'rank':>4} {'RSS after gate epoch MiB':>25} {'peak RSS MiB':>13}")
    for row in rss:
        epoch = f"{row['rss_gate_epoch_kib'] / 1024:.1f}" if "rss_gate_epoch_kib" in row else "-"
        print(f"{row['strategy']:<8} {row['rank']:>4} {epoch:>25} {row['peak_rss_kib'] / 1024:>13.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": MODEL, "processes": PROCESSES, "parameters": rows, "rss": rss}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
