"""MNIST-1D (Greydanus 2020) with a small residual 1-D CNN with BatchNorm: the paper's protocol.

Data: generated offline by the ``mnist1d`` package with its default arguments (4 000 train, of
which 500 are held out for validation, 1 000 test); never downloaded. Model:
``graphmerge.examples.mnist1d_cnn`` (stem conv + BN, one residual block, a strided conv + BN,
flatten, linear). 10 seeds per strategy, test accuracy. Budget (unit u = 1/6 of it, default
u = 15, 90 epochs per strategy): teachers 2u each (lr /10 at 5/6), gate phase u, fine-tune u;
batch 128, SGD lr 0.05, momentum 0.9, weight decay 5e-4; gate phase λ0 4, λ += 0.5·√λ per
epoch, gates' SGD lr 0.5 (common.CNN_GATES; --lambda0/--lambda-growth/--gate-lr override).

    python benchmarks/mnist1d.py                       # 10 seeds (writes benchmarks/results/)
    python benchmarks/mnist1d.py --quick --out /tmp/x  # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the ``mnist1d`` package it needs: take its folder off the front of the
# path (where Python puts a script's folder) and append it, so ``import mnist1d`` finds the package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import common  # noqa: E402
import torch  # noqa: E402

from graphmerge.data import mnist1d  # noqa: E402
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN, example_inputs  # noqa: E402


def load(quick: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test tensors (the quick mode trains on the first 1 000 samples)."""
    train, val, test, _ = mnist1d(n_val=500, seed=42)
    x, y = train.tensors
    if quick:
        x, y = x[:1000], y[:1000]
    return {"train": (x, y), "val": val.tensors, "test": test.tensors}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    return common.run_classification(args, "mnist1d", MNIST1DCNN, example_inputs, load(args.quick), batch_size=128,
                                     mode="loop", first_layer="stem.weight")


if __name__ == "__main__":
    main()
