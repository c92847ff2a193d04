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
    python benchmarks/mnist1d.py --hard                # the non-saturated regime (writes mnist1d_hard.*)

``--hard`` is a regime where one model does not saturate: 8 channels (head 12) instead of 32 (48)
and the first 1 000 of the 3 500 training samples. Chosen from short single runs (one model, 90
epochs at the benchmark's settings, 2 seeds, test accuracy): 32 channels on 3 500 / 1 000 / 500
samples 0.986 0.982 / 0.947 0.938 / 0.795 0.751; 8 channels 0.962 0.965 / 0.843 0.881 / 0.518
0.692; 4 channels 0.923 0.884 / 0.821 0.751 / 0.590 0.496. 8 channels on 1 000 samples stays well
below 90 % without collapsing, and is cheap to run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the ``mnist1d`` package it needs: take its folder off the front of the
# path (where Python puts a script's folder) and append it, so ``import mnist1d`` finds the package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import argparse  # noqa: E402
import functools  # noqa: E402

import common  # noqa: E402
import torch  # noqa: E402

from graphmerge.data import mnist1d  # noqa: E402
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN, example_inputs  # noqa: E402

HARD = {"channels": 8, "head_channels": 12, "n_train": 1000}  # --hard (see the module docstring)


def load(quick: bool, n_train: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test tensors (the quick mode trains on the first 1 000 samples,
    ``n_train`` on the first ``n_train``)."""
    train, val, test, _ = mnist1d(n_val=500, seed=42)
    x, y = train.tensors
    n = 1000 if quick else n_train
    if n is not None:
        x, y = x[:n], y[:n]
    return {"train": (x, y), "val": val.tensors, "test": test.tensors}


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hard", action="store_true",
                        help=f"the non-saturated regime {HARD} (results named mnist1d_hard)")
    parser.add_argument("--channels", type=int, default=None, help="stem/block channels (default 32; --hard 8)")
    parser.add_argument("--head-channels", type=int, default=None, help="last conv's channels (default 48; --hard 12)")
    parser.add_argument("--n-train", type=int, default=None, help="first N training samples (default all 3 500)")


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=options)
    preset = HARD if args.hard else {"channels": 32, "head_channels": 48, "n_train": None}
    given = {"channels": args.channels, "head_channels": args.head_channels, "n_train": args.n_train}
    settings = {k: given[k] if given[k] is not None else v for k, v in preset.items()}
    build = functools.partial(MNIST1DCNN, channels=settings["channels"], head_channels=settings["head_channels"])
    data = load(args.quick, settings["n_train"])
    settings["n_train"] = len(data["train"][0])
    return common.run_classification(args, "mnist1d_hard" if args.hard else "mnist1d", build, example_inputs, data,
                                     batch_size=128, mode="loop", first_layer="stem.weight", settings=settings)


if __name__ == "__main__":
    main()
