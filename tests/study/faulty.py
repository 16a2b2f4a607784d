"""Models a study might bring by mistake: each must be refused before round 1, named."""

from __future__ import annotations

from math import prod

import torch
from torch import nn


def two_outputs(input_shape: tuple[int, ...], output_size: int) -> nn.Module:
    """Ignores the output size the task asks for."""
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), 2))


class _NotANumber(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * float("nan")


def not_a_number(input_shape: tuple[int, ...], output_size: int) -> nn.Module:
    return _NotANumber(prod(input_shape))


def takes_nothing_fedward_gives():
    return nn.Linear(1, 1)
