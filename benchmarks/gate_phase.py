"""The gate phase through its own eyes: the gated big student's validation accuracy (eval gates) at
ten points of the phase, and the student it leaves, for several gate learning rates.

Setting: ``graphmerge demo``'s (MNIST-1D CNN, two teachers of 5 epochs each from seeds 100s and
100s+1, 8 gate epochs, 4 fine-tuning epochs, batch 64, library defaults otherwise); per seed the
same teachers are merged once per gate learning rate, so the runs are paired. Reported: the trace
(``MergeResult.gate_trace``), its lowest point, and the student's test accuracy (1 000 samples).

    python benchmarks/gate_phase.py                      # 3 seeds, gate lr 0.1 (the paper's) and 1.0
    python benchmarks/gate_phase.py --seeds 1 --gate-lrs 0.1 1.0 --quick --out /tmp/g
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import compare  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.data import mnist1d  # noqa: E402
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN  # noqa: E402
from graphmerge.training import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--gate-lrs", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--quick", action="store_true", help="1 000 training samples, 2 gate epochs (smoke test)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, val, test, _ = mnist1d()
    if args.quick:
        train = TensorDataset(*(t[:1000] for t in train.tensors))
    epochs = {"teacher": 1 if args.quick else 5, "gate": 2 if args.quick else 8, "finetune": 1 if args.quick else 4}
    runs = []
    for seed in range(args.seeds):
        teachers = []
        for i in range(2):
            torch.manual_seed(100 * seed + i)
            model = MNIST1DCNN()
            graphmerge.train(model, train, epochs=epochs["teacher"], batch_size=64, seed=100 * seed + i)
            teachers.append(model.eval())
        row = {"seed": seed, "teachers": [evaluate(t, test, "cross_entropy")["acc"] for t in teachers], "by_lr": {}}
        for lr in args.gate_lrs:
            started = time.perf_counter()
            result = graphmerge.merge([copy.deepcopy(t) for t in teachers], train, val_data=val, batch_size=64,
                                      gate_epochs=epochs["gate"], finetune_epochs=epochs["finetune"], seed=seed,
                                      gate_lr=lr, preflight=False)
            trace = [e["val_acc"] for e in result.gate_trace]
            row["by_lr"][str(lr)] = {"big": result.summary["big"], "trace": trace, "lowest": min(trace),
                                     "test": evaluate(result.student, test, "cross_entropy")["acc"],
                                     "seconds": time.perf_counter() - started}
            print(f"seed {seed} gate lr {lr}: trace {[round(v, 3) for v in trace]}, "
                  f"student test {row['by_lr'][str(lr)]['test']:.4f}", flush=True)
        runs.append(row)
    lrs = [str(lr) for lr in args.gate_lrs]
    summary = {lr: {"lowest_median": float(np.median([r["by_lr"][lr]["lowest"] for r in runs])),
                    "test_median": float(np.median([r["by_lr"][lr]["test"] for r in runs]))} for lr in lrs}
    paired = {lr: compare.paired([r["by_lr"][lr]["test"] for r in runs], [r["by_lr"][lrs[0]]["test"] for r in runs],
                                 True) for lr in lrs[1:]} if len(runs) > 1 else {}
    result = {"meta": {"machine": platform.platform(), "torch": torch.__version__, "threads": 1,
                       "command": "python benchmarks/gate_phase.py " + " ".join(argv or sys.argv[1:]),
                       "epochs": epochs}, "runs": runs, "summary": summary, "paired_vs_first": paired}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate_phase.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for lr, color in zip(lrs, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        for r in runs:
            points = r["by_lr"][lr]
            ax.plot(np.linspace(0, 1, len(points["trace"]) + 1), [points["big"]] + points["trace"], color=color,
                    label=f"gate lr {lr}" if r is runs[0] else None)
    ax.set_xlabel("fraction of the gate phase")
    ax.set_ylabel("validation accuracy (eval gates)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "gate_phase.png", dpi=110)
    print("| gate lr | lowest val acc in the phase (median) | student test acc (median) |")
    print("|---|---|---|")
    for lr in lrs:
        print(f"| {lr} | {summary[lr]['lowest_median']:.3f} | {summary[lr]['test_median']:.4f} |")
    for lr, p in paired.items():
        low, high = p["ci95"]
        print(f"gate lr {lr} minus {lrs[0]}: {p['mean']:+.4f} [{low:+.4f}, {high:+.4f}] {p['verdict']}")
    return result


if __name__ == "__main__":
    main()
