"""A linear model: the reference for one federated round as one step of gradient descent."""

from math import prod

from torch import nn


def linear(input_shape: tuple[int, ...], output_size: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), output_size))
