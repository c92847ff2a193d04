"""scikit-learn's 8x8 digits with a LeNet-style CNN: the paper's protocol.

Data: ``sklearn.datasets.load_digits`` (1 797 images, bundled with scikit-learn), split by a
fixed permutation into 1 197 train, 300 validation, 300 test (``graphmerge.data.digits``). Model:
conv 3x3 (1->16) + ReLU + max-pool, conv 3x3 (16->32) + ReLU + max-pool, flatten 32x2x2, linear
128->64 + ReLU, linear 64->10. 10 seeds per strategy, test accuracy. Budget (unit u = 1/6 of it,
default u = 15, 90 epochs per strategy): teachers 2u each (lr /10 at 5/6), gate phase u, fine-tune
u; batch 64, SGD lr 0.05, momentum 0.9, weight decay 5e-4; gate phase λ0 4, λ += 0.5·√λ per epoch,
gates' SGD lr 0.5 (common.CNN_GATES; --lambda0/--lambda-growth/--gate-lr override).

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



def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    return common.run_classification(args, "digits", DigitsLeNet, lambda: (torch.rand(2, 1, 8, 8),), load(args.quick),
                                     batch_size=64, mode="vmap", first_layer="conv1.weight")


if __name__ == "__main__":
    main()
