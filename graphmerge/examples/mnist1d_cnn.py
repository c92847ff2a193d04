"""A small 1-D CNN for MNIST-1D (inputs of shape (batch, 1, 40), 10 classes).

stem conv(1→32, k5) + BatchNorm + ReLU → one residual block (two conv k3 + BatchNorm, identity
shortcut) → max-pool /2 → conv(32→48, k3, stride 2) + BatchNorm + ReLU → flatten 48×10 → linear
→ 10 logits. The residual add ties the stem's and the block's output channels into one coupling
group; the flatten makes each of the last conv's channels own a run of 10 features of the head.
About 16k parameters: trains to useful accuracy in a few CPU-seconds per epoch.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock1d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class MNIST1DCNN(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 32, head_channels: int = 48) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, channels, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(channels)
        self.block = ResidualBlock1d(channels)
        self.pool = nn.MaxPool1d(2)
        self.conv = nn.Conv1d(channels, head_channels, 3, stride=2, padding=1, bias=False)
        self.bn_head = nn.BatchNorm1d(head_channels)
        self.fc = nn.Linear(head_channels * 10, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pool(self.block(x))
        x = torch.relu(self.bn_head(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


def build_model(num_classes: int = 10) -> MNIST1DCNN:
    return MNIST1DCNN(num_classes)


def example_inputs() -> tuple[torch.Tensor]:
    """One batch of two MNIST-1D signals of length 40."""
    return (torch.randn(2, 1, 40),)
