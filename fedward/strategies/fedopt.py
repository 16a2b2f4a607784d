"""FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization").

The hospitals' weighted mean change is a pseudo-gradient (with its sign flipped) that a server
optimizer applies with its own learning rate and moments. The moments are the strategy's state:
they are checkpointed with the global weights, so a resumed run steps exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from torch import nn

from fedward.types import Layout, Update
from fedward import width
from fedward.strategies.base import Strategy


class FedOpt(Strategy):
    """The shared step; subclasses say how the second moment `v` follows the squared change."""

    def __init__(self, config):
        super().__init__(config)
        self.m: np.ndarray | None = None  # first moment of the mean change
        self.v: np.ndarray | None = None  # second moment
        self.trainable: np.ndarray | None = None  # which flat entries are parameters, not buffers

    def start(self, model: nn.Module, layout: Layout) -> None:
        super().start(model, layout)
        parameters = {name for name, _ in model.named_parameters()}
        self.trainable = np.concatenate(
            [np.full(s.stop - s.start, name in parameters) for name, s in layout.slices().items()]
        ) if layout.names else np.zeros(0, bool)

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate(self, round: int, current: np.ndarray, updates: Sequence[Update], failures: Mapping[str, str]) -> np.ndarray | None:
        if not updates:
            return None
        s = self.config.strategy
        delta = self.combine(updates)
        # Entries no hospital of the round holds (narrower models only, HeteroFL) neither move nor
        # change their moments.
        held = width.covered([u.layout for u in updates], self.layout) if self.layout is not None else np.ones(delta.size, bool)
        if self.m is None:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, s.tau**2)  # v starts at tau^2, as in the paper
        self.m = np.where(held, s.beta1 * self.m + (1 - s.beta1) * delta, self.m)
        self.v = np.where(held, self.second_moment(self.v, delta**2), self.v)
        step = s.server_lr * self.m / (np.sqrt(self.v) + s.tau)
        # Buffers (BatchNorm's running statistics) are averaged, not stepped: an adaptive step of
        # about server_lr could push a small running variance below zero.
        trainable = self.trainable if self.trainable is not None else np.ones(delta.size, bool)
        return (current + np.where(held, np.where(trainable, step, delta), 0.0)).astype(np.float32)

    def state_dict(self) -> dict:
        if self.m is None:
            return {}
        return {"m": torch.from_numpy(self.m), "v": torch.from_numpy(self.v)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.m = self.v = None
            return
        if set(state) != {"m", "v"} or state["m"].shape != state["v"].shape:
            raise ValueError(f"{type(self).__name__}: expected moments m and v of one shape, got {sorted(state)}")
        self.m, self.v = state["m"].numpy().astype(np.float64), state["v"].numpy().astype(np.float64)


class FedAdam(FedOpt):
    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        b2 = self.config.strategy.beta2
        return b2 * v + (1 - b2) * squared


class FedYogi(FedOpt):
    """Moves v toward the squared change by a fixed fraction, so a burst of large changes raises it
    less abruptly than Adam's average does."""

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v - (1 - self.config.strategy.beta2) * squared * np.sign(v - squared)


class FedAdagrad(FedOpt):
    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v + squared
