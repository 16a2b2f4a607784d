"""Ditto (Li et al. 2021): FedAvg for the global model, plus a personal model at each hospital.

Each round a hospital also trains its own personal model on its data with lambda/2 * ||v - w||^2
pulling it toward the global weights w; lambda = 0 gives local-only models, a large lambda the
global one. The personal model is the hospital's state: saved with it, evaluated there, never sent.
"""

from __future__ import annotations

from pipelines.fedavg import FedAvg


class Ditto(FedAvg):
    def __init__(self, config):
        super().__init__(config)
        self.personal_lambda = config.strategy.ditto_lambda
