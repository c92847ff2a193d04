"""scikit-learn's 8x8 digits with a LeNet-style CNN: the paper's protocol.

Data: ``sklearn.datasets.load_digits`` (1 797 images, bundled with scikit-learn), split by a
fixed permutation into 1 197 train, 300 validation, 300 test (``graphmerge.data.digits``). Model:
conv 3x3 (1->16) + ReLU + max-pool, conv 3x3 (16->32) + ReLU + max-pool, flatten 32x2x2, linear
128->64 + ReLU, linear 64->10. 10 seeds per strategy, test accuracy. Budget (unit u = 1/6 of it,
default u = 15, 90 epochs per strategy): teachers 2u each (lr /10 at 5/6), gate phase u, fine-tune
u; batch 64, SGD lr 0.05, momentum 0.9, weight decay 5e-4; gate phase λ0 4, λ += 0.5·√λ per epoch,
gates' SGD lr 0.5 (see GATES below; --lambda0/--lambda-growth/--gate-lr override).

    python benchmarks/digits.py                       # 10 seeds (writes benchmarks/results/)
    python benchmarks/digits.py --quick --out /tmp/x  # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from graphmerge.data import digits  # noqa: E402


class DigitsLeNet(nn.Module):
    """LeNet for 8x8 inputs: two conv + pool stages, then three linear layers' worth of head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def load(quick: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    train, val, test, _ = digits(n_val=300, n_test=300, seed=0)
    return {"train": train.tensors, "val": val.tensors, "test": test.tensors}


# Gate phase: the sine settings (λ0 0.01, gates' lr 0.1) are tuned for 47 000 gate steps; in the
# few hundred steps here they leave the gates almost untouched (P[g>0] stayed near 0.93, measured,
# so compression would cut channels still in use). As in ``make demo``, λ starts high and the
# gates get a faster optimiser; with these settings every group ends at 1/N open (measured on
# digits with 2 runs: 0.50/0.50/0.50 for N=2, 0.33/0.34/0.34 for N=3).
GATES = {"lambda0": 4.0, "lambda_growth": 0.5, "gate_lr": 0.5}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    unit = args.unit or (1 if args.quick else 15)
    budget = common.Budget(unit=unit, lr=0.05, batch_size=64, weight_decay=5e-4,
                           **{**GATES, **common.gate_overrides(args)})
    bench = common.Benchmark(name="digits", task="classification", build=DigitsLeNet,
                             example_inputs=lambda: (torch.rand(2, 1, 8, 8),), data=load(args.quick), budget=budget,
                             runs=args.runs or (2 if args.quick else 10), out=args.out, seed=args.seed,
                             mode=args.mode or "vmap")
    result, gated = common.run_protocol(bench)
    common.plot_first_layer(gated, "conv1.weight", args.out, "digits")
    return result


if __name__ == "__main__":
    main()
