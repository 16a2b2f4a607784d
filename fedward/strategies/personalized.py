"""Personalization by keeping part of the model at each hospital.

FedBN (Li et al. 2021) keeps BatchNorm layers local: each hospital normalizes with its own
scanner's or population's statistics. FedPer (Arivazhagan et al. 2019) keeps the output layer
local: a shared body, a personal head. FedRep (Collins et al. 2021) splits FedPer's local training:
first the head alone on the body as it came, then the body alone under the adapted head. The personal entries never enter an `Update`; they live in
the hospital's model and its own checkpoints.
"""

from __future__ import annotations

from torch import nn

from fedward.strategies.base import EXTRA_TRAINING, LocalRound, LocalTraining
from fedward.strategies.fedavg import FedAvg


def _entries(prefix: str, module: nn.Module) -> set[str]:
    return {f"{prefix}.{name}" for name, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))}


class FedBN(FedAvg):
    def personal_keys(self, model: nn.Module) -> frozenset[str]:
        return frozenset().union(*(_entries(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)))


def _head(model: nn.Module) -> frozenset[str]:
    """The entries of the model's last linear layer, its output head."""
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return frozenset(_entries(name, head))


class FedPer(FedAvg):
    def personal_keys(self, model: nn.Module) -> frozenset[str]:
        return _head(model)


class HeadFirstTraining(LocalTraining):
    """FedRep's round: the personal head adapts to the body as it came, then the body trains alone."""

    def train(self, round: LocalRound) -> dict[str, float]:
        names = frozenset(n for n, _ in round.model.named_parameters())
        head = names & _head(round.model)
        round.trainer.train(round.model, round.plan, epochs=self.config.strategy.head_epochs, seed=round.plan.seed + 1, only=head)
        return {"train_loss": round.trainer.train(round.model, round.plan, only=names - head)}


class FedRep(FedPer):
    breaks = EXTRA_TRAINING

    def local(self) -> LocalTraining:
        return HeadFirstTraining(self.config)
