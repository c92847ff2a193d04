"""LeNet-5 for 32x32 RGB images (CIFAR-10 sized).

conv 5x5 -> 6, max-pool, conv 5x5 -> 16, max-pool, flatten 16x5x5 = 400 -> 120 -> 84 -> classes.
Input is 3x32x32 with no padding, so the second pool leaves 5x5 maps. For 28x28 MNIST digits, pad
them by 2 pixels to 32x32 (as the original LeNet did) and repeat the grey channel three times,
or build with ``in_channels=1``. The flatten makes each of the 16 channels own a run of 25
features of ``fc1``'s input: the product case of the coupling analysis.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def build_model(num_classes: int = 10, in_channels: int = 3) -> LeNet:
    return LeNet(num_classes, in_channels)


def example_inputs() -> tuple[torch.Tensor]:
    """One batch of two 3x32x32 images."""
    return (torch.randn(2, 3, 32, 32),)
