"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each hospital's drift.

The driver keeps a server control variate c and each hospital its own c_i, both over the model's
trainable parameters. A hospital trains with every gradient corrected by c - c_i, then sets
c_i+ = c_i - c + (x - y) / (K * lr) (the paper's option II: x the global weights it started
from, y its trained ones, K its optimizer steps) and sends c_i+ - c_i appended to its change, so
the control change travels, and is protected, exactly as the update does. The driver moves the
weights by the mean change and c by the mean control change times the share of the federation
whose change arrived.
Each c_i is the hospital's own state: saved with its model, never sent.

With c = c_i = 0, as in the first round, a hospital trains exactly as under FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedward.errors import AggregationError, HospitalError
from fedward.declarations import ACCOUNTED, LAYERS_APART, WHOLE_SHAPE
from fedward.strategies.base import CONTROLLED, PLAIN_SGD_STEPS, LocalRound, LocalTraining, Strategy
from fedward.types import Layout, Update

CONTROL = "control:"  # prefix of the control-change entries appended to an update's layout


def control_layout(model: nn.Module, layout: Layout) -> Layout:
    """The trainable parameters of the shared layout: buffers (BatchNorm statistics) have no gradient."""
    trainable = {name for name, _ in model.named_parameters()}
    kept = [(n, s) for n, s in zip(layout.names, layout.shapes) if n in trainable]
    return Layout(tuple(n for n, _ in kept), tuple(s for _, s in kept))


def _in_weights(controls: Layout, layout: Layout) -> np.ndarray:
    """Indices of the controlled entries within the flat weights."""
    slices = layout.slices()
    return np.concatenate([np.arange(slices[n].start, slices[n].stop) for n in controls.names]) if controls.names else np.zeros(0, np.int64)


def correction(controls: Layout, server: np.ndarray, own: np.ndarray) -> dict[str, torch.Tensor]:
    """c - c_i per parameter, added to each local gradient."""
    diff = server - own
    return {n: torch.from_numpy(diff[s].copy()).reshape(shape) for (n, s), shape in zip(controls.slices().items(), controls.shapes)}


def next_control(controls: Layout, layout: Layout, own: np.ndarray, server: np.ndarray, start: np.ndarray, trained: np.ndarray, steps: int, lr: float) -> np.ndarray:
    if steps == 0:  # no step taken: nothing learnt about the drift
        return own
    at = _in_weights(controls, layout)
    return (own - server + (start[at] - trained[at]) / (steps * lr)).astype(np.float32)


def with_controls(layout: Layout, controls: Layout) -> Layout:
    return Layout(layout.names + tuple(CONTROL + n for n in controls.names), layout.shapes + controls.shapes)


def with_control_change(update: Update, controls: Layout, change: np.ndarray) -> Update:
    return Update(update.round, update.hospital, np.concatenate([update.delta, change]).astype(np.float32),
                  with_controls(update.layout, controls), update.num_examples, update.weight, update.metrics)


class ControlledTraining(LocalTraining):
    """SCAFFOLD's hospital half: every gradient corrected by c - c_i, then c_i moved and its change
    appended to the update. c_i is this hospital's own: saved with its state, never sent."""

    def __init__(self, config):
        super().__init__(config)
        self.control: np.ndarray | None = None  # c_i
        self.controls: Layout | None = None  # the controlled parameters of the current round

    def train(self, round: LocalRound) -> dict[str, float]:
        self.controls = control_layout(round.model, round.layout)
        server = round.broadcast
        if not isinstance(server, np.ndarray) or server.shape != (self.controls.size,) or not np.isfinite(server).all():
            got = getattr(server, "shape", type(server).__name__)
            raise HospitalError(f"SCAFFOLD: the driver's control variate must be {self.controls.size} finite values, got {got}")
        if self.control is None or self.control.size != self.controls.size:
            self.control = np.zeros(self.controls.size, np.float32)
        fix = correction(self.controls, server, self.control)
        return {"train_loss": round.trainer.train(round.model, round.plan, correction=fix)}

    def finish(self, round: LocalRound, update: Update, trained: np.ndarray) -> Update:
        steps = round.trainer.steps(round.plan.local_epochs)
        own = next_control(self.controls, round.layout, self.control, round.broadcast, round.weights, trained, steps, round.plan.lr)
        update = with_control_change(update, self.controls, own - self.control)
        self.control = own
        return update

    def state_dict(self) -> dict[str, Any]:
        return {} if self.control is None else {"control": torch.from_numpy(self.control)}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        self.control = state["control"].numpy().copy() if "control" in state else None

    def reset(self) -> None:
        self.control = None


class Scaffold(Strategy):
    needs = {**CONTROLLED, **PLAIN_SGD_STEPS, WHOLE_SHAPE: "adds control variates over the global model's parameters"}
    breaks = {
        ACCOUNTED: "sends control variates that no DP mechanism covers",
        LAYERS_APART: "sends control changes that reveal the update of every layer",
    }

    def __init__(self, config):
        super().__init__(config)
        self.control: np.ndarray | None = None  # the server's c, over the controlled parameters
        self.asked = 0  # hospitals asked in the current round
        self.controls: Layout | None = None  # the controlled parameters, once started

    def start(self, model: nn.Module, layout: Layout) -> None:
        super().start(model, layout)
        self.controls = control_layout(model, layout)
        size = self.controls.size
        if self.control is None:
            self.control = np.zeros(size, np.float32)
        elif self.control.size != size:
            raise AggregationError(f"SCAFFOLD: the checkpointed control has {self.control.size} values, the model {size} parameters")

    def broadcast(self) -> np.ndarray:
        return self.control

    def local(self) -> LocalTraining:
        return ControlledTraining(self.config)

    def update_layout(self, layout: Layout) -> Layout:
        return with_controls(layout, self.controls)

    def configure_round(self, round, hospitals, rng):
        plans = super().configure_round(round, hospitals, rng)
        self.asked = len(plans)
        return plans

    def aggregate(self, round: int, current: np.ndarray, updates: Sequence[Update], failures: Mapping[str, str]) -> np.ndarray | None:
        if not updates:
            return None
        mean = self.combine(updates)
        n = current.size
        if mean.size != n + self.control.size:
            raise AggregationError(f"round {round}: SCAFFOLD updates hold {mean.size} values, expected {n} weights and {self.control.size} controls")
        # |S| / N: the share of the federation whose change arrived; the others keep their c_i, so c
        # moves less. Control changes carry the updates' weights, as they travel in the same vector.
        share = (self.asked - len(failures)) / len(self.config.hospitals)
        self.control = (self.control + share * mean[n:]).astype(np.float32)
        return (current + mean[:n]).astype(np.float32)

    def state_dict(self) -> dict:
        return {} if self.control is None else {"control": torch.from_numpy(self.control)}

    def load_state_dict(self, state: dict) -> None:
        if state and set(state) != {"control"}:
            raise ValueError(f"Scaffold: expected the server control variate, got {sorted(state)}")
        self.control = state["control"].numpy().copy() if state else None
