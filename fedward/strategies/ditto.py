"""Ditto (Li et al. 2021): FedAvg for the global model, plus a personal model at each hospital.

Each round a hospital also trains its own personal model on its data with lambda/2 * ||v - w||^2
pulling it toward the global weights w; lambda = 0 gives local-only models, a large lambda the
global one. The personal model is the hospital's state: saved with it, evaluated there, never sent.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedward.declarations import ACCOUNTED
from fedward.strategies.base import EXTRA_TRAINING, LocalRound, LocalTraining
from fedward.strategies.fedavg import FedAvg
from fedward.types import Update


class PersonalTraining(LocalTraining):
    """The global model's plain round, then the personal model's, pulled toward the global weights."""

    def __init__(self, config):
        super().__init__(config)
        self.personal: nn.Module | None = None

    def train(self, round: LocalRound) -> dict[str, float]:
        if self.personal is None:
            self.personal = copy.deepcopy(round.model)  # it starts from the global model of its first round
        return super().train(round)

    def finish(self, round: LocalRound, update: Update, trained: np.ndarray) -> Update:
        at = round.layout.slices()
        anchor = [torch.from_numpy(round.weights[at[name]].copy()).reshape(p.shape).to(p.device) for name, p in self.personal.named_parameters()]
        round.trainer.train(self.personal, round.plan, seed=round.plan.seed + 1, proximal_mu=self.config.strategy.ditto_lambda, anchor=anchor)
        return update

    def own_model(self) -> nn.Module | None:
        return self.personal

    def state_dict(self) -> dict[str, Any]:
        return {} if self.personal is None else {"personal_model": self.personal.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        self.personal = None
        if "personal_model" in state:
            self.personal = copy.deepcopy(model)
            self.personal.load_state_dict(state["personal_model"])

    def reset(self) -> None:
        self.personal = None


class Ditto(FedAvg):
    keeps_own_models = True
    breaks = {**EXTRA_TRAINING, ACCOUNTED: "trains a personal model outside the DP mechanism and its figures leave the hospital"}

    def local(self) -> LocalTraining:
        return PersonalTraining(self.config)
