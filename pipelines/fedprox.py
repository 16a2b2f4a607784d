"""FedProx (Li et al. 2020): FedAvg whose hospitals add mu/2 * ||w - w_global||^2 to their local
loss, so hospitals whose data differ drift less from the global model in a round."""

from __future__ import annotations

from pipelines.fedavg import FedAvg


class FedProx(FedAvg):
    def __init__(self, config):
        super().__init__(config)
        self.proximal_mu = config.strategy.proximal_mu
