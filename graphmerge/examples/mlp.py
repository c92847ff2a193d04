"""The paper's toy network: an MLP 1 -> 100 -> 1 with ReLU, fitted to a sine curve."""

from __future__ import annotations

import torch
from torch import nn


class SineMLP(nn.Module):
    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build_model(hidden: int = 100) -> SineMLP:
    return SineMLP(hidden)


def example_inputs() -> tuple[torch.Tensor]:
    """A batch of 16 scalar inputs x; the training target is sin(x)."""
    return (torch.linspace(-3.0, 3.0, 16).unsqueeze(1),)
