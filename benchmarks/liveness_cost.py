"""What replacing dead channels costs the gate phase: one ``decision_mask`` call, by depth.

The gate phase's decision step asks every step which channels compress would keep; with
``dead_channels="replace"`` that runs the liveness sweeps (``passes/liveness.py``). Measured on
two-teacher GPT-2 configurations (Hugging Face, random weights) in the worst case for the sweeps:
the residual stream goes to teacher 0 and every other group's scores favour teacher 1, so every
head and MLP group keeps only dead channels and is mended. Median of ``--repeats`` calls after a
first one that builds the cached graph structure. Prints a table; writes
``benchmarks/results/liveness_cost.json``.

    python benchmarks/liveness_cost.py                 # 6, 12 and 24 layers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

import graphmerge

RESULTS = Path(__file__).resolve().parent / "results"


def measure(layers: int, repeats: int) -> dict[str, float | int]:
    import transformers

    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    teachers = []
    for seed in range(2):
        torch.manual_seed(seed)
        teachers.append(transformers.GPT2LMHeadModel(config).eval())
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    big = graphmerge.widen(teachers, (ids,), verify=False)
    gated = graphmerge.add_gates(big, seed=0)
    info = graphmerge.widen_info(gated)[1]
    stream = set(info.groups.layout.across_norm)
    with torch.no_grad():
        for group in info.groups.gated:
            scores = torch.zeros(2 * group.width)
            scores[group.width:] = 1.0
            gated.gates.log_alpha[f"g{group.id}"].copy_(-scores if group.id in stream else scores)
    log_alpha = gated.flat_log_alpha()
    row: dict[str, float | int] = {"layers": layers, "nodes": len(info.groups.graph_module.graph.nodes),
                                   "gated_groups": len(info.groups.gated)}
    for policy in ("keep", "replace"):
        info.dead_channels = policy
        gated.decision_mask(log_alpha)  # the first call builds and caches the sweep structure
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            gated.decision_mask(log_alpha)
            times.append(time.perf_counter() - start)
        row[f"{policy}_ms"] = 1e3 * statistics.median(times)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, float | int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "liveness_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = [measure(layers, args.repeats) for layers in args.layers]
    print("| layers | graph nodes | gated groups | decision_mask, keep | decision_mask, replace |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['nodes']} | {r['gated_groups']} | {r['keep_ms']:.1f} ms "
              f"| {r['replace_ms']:.1f} ms |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "torch": torch.__version__, "threads": 1,
            "command": "python benchmarks/liveness_cost.py " + " ".join(argv or [])}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(args.out)
    return rows


if __name__ == "__main__":
    main()
