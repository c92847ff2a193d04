"""The paper's sine problem (Table 1, Figs. 5, 9, 10), full protocol, all runs batched.

x ~ U(0, 1), y = sin(10πx) + N(0, 0.2²), 10 000 training samples; MLP 1 -> 100 -> 1 (ReLU); MSE;
batch 32; SGD lr 0.01, momentum 0.9. Budget 900 epochs per strategy: teachers 300 (lr /10 at
250), one model 900 (/10 at 800), bo3 3 x 300, gate phase 150 (gates lr 0.1, λ0 0.01,
λ <- λ + 0.05 √λ per epoch), fine-tuning 150 (/10 at 100). 50 runs; test MSE on a fresh
10 000-sample noisy set (noise floor 0.04). Validation (bo3's selection): 2 000 fresh samples.

    python benchmarks/sine.py --threads 2     # full protocol, 50 runs (writes benchmarks/results/):
                                              # 788 s on this 2-core machine, 907 s on one thread
    python benchmarks/sine.py --quick --out /tmp/x   # smoke test: 2 runs, a few epochs
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.data import sine  # noqa: E402
from graphmerge.examples.mlp import SineMLP  # noqa: E402

SINE_MILESTONES = {300: 250, 900: 800, 150: 100, 200: 167}


def load(quick: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test tensors from graphmerge's built-in sine data set."""
    train, val, test, _ = sine(n_train=2_000 if quick else 10_000, n_val=2_000, n_test=10_000, seed=0)
    return {name: split.tensors for name, split in zip(("train", "val", "test"), (train, val, test), strict=True)}


def plot_curves(result: dict, out: Path) -> None:
    """Fig. 10: the learned function of every run, one panel per strategy, over the clean sine."""
    curves = result["curves"]
    x = np.asarray(curves["x"])
    names = ["student", "bo3 model", "one model"]
    fig, axes = plt_subplots(len(names))
    for ax, name in zip(axes, names, strict=True):
        for y in curves[name]:
            ax.plot(x, y, lw=0.5, alpha=0.5)
        ax.plot(x, np.sin(10 * np.pi * x), color="black", lw=1.0, ls="--")
        ax.set_title(f"{name}: {len(curves[name])} runs (mean test MSE {result['stats'][name]['mean']:.3f})")
        ax.set_ylim(-1.6, 1.6)
    fig.tight_layout()
    fig.savefig(out / "sine_curves.png", dpi=110)
    fig.clf()


def plt_subplots(count: int):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(count, 1, figsize=(9, 2.6 * count), sharex=True)
    return fig, list(np.atleast_1d(axes))


def plot_hidden_units(gated, out: Path) -> None:
    """The first layer's features: each hidden unit is a ReLU kink at x = -b/w, slope w; kept
    units coloured by the teacher they come from (run 0)."""
    import matplotlib.pyplot as plt
    _, info = graphmerge.widen_info(gated)
    gid = info.groups.widened[0].id
    kept = set(graphmerge.kept_channels(gated)[gid].tolist())
    params = dict(gated.graph_module.named_parameters())
    w = params["fc1.weight"].detach().squeeze(1).numpy()
    b = params["fc1.bias"].detach().numpy()
    v = params["fc2.weight"].detach().squeeze(0).numpy()
    width = info.widths[gid]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for k in range(len(w)):
        teacher = k // width
        style = dict(color=f"C{teacher}", marker="o", s=18) if k in kept else dict(color="0.75", marker="x", s=12)
        ax.scatter(-b[k] / w[k] if w[k] != 0 else np.nan, abs(w[k] * v[k]), **style)
    ax.set_xlim(-0.2, 1.2)
    ax.set_xlabel("kink position -b/w of a hidden unit")
    ax.set_ylabel("|w · v| (slope it adds)")
    ax.set_title("sine, run 0: hidden units of the big student; kept ones coloured by teacher (C0 = A, C1 = B)")
    fig.tight_layout()
    fig.savefig(out / "sine_first_layer.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    unit = args.unit or (2 if quick else 150)
    budget = common.Budget(unit=unit, lr=0.01, batch_size=32, milestones=SINE_MILESTONES if unit == 150 else {},
                           **common.gate_overrides(args))
    bench = common.Benchmark(
        name="sine", task="regression", build=SineMLP, example_inputs=lambda: (torch.rand(16, 1),),
        data=load(quick), budget=budget, runs=args.runs or (2 if quick else 50), out=args.out, seed=args.seed,
        mode=args.mode or "compile", compare_budgets=args.compare_budgets)
    result, gated = common.run_protocol(bench)
    plot_curves(result, args.out)
    plot_hidden_units(gated, args.out)
    return result


if __name__ == "__main__":
    main()
