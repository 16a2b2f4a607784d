"""FedProx (Li et al. 2020): FedAvg whose hospitals add mu/2 * ||w - w_global||^2 to their local
loss, so hospitals whose data differ drift less from the global model in a round. Each hospital
takes mu from its own config."""

from __future__ import annotations

from fedward.strategies.base import EXTRA_TRAINING, LocalRound, LocalTraining
from fedward.strategies.fedavg import FedAvg


class ProximalTraining(LocalTraining):
    def train(self, round: LocalRound) -> dict[str, float]:
        return {"train_loss": round.trainer.train(round.model, round.plan, proximal_mu=self.config.strategy.proximal_mu)}


class FedProx(FedAvg):
    breaks = EXTRA_TRAINING

    def local(self) -> LocalTraining:
        return ProximalTraining(self.config)
