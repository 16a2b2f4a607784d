"""Personalization by keeping part of the model at each hospital.

FedBN (Li et al. 2021) keeps BatchNorm layers local: each hospital normalizes with its own
scanner's or population's statistics. FedPer (Arivazhagan et al. 2019) keeps the output layer
local: a shared body, a personal head. FedRep (Collins et al. 2021) splits FedPer's local training:
first the head alone on the body as it came, then the body alone under the adapted head. The personal entries never enter an `Update`; they live in
the hospital's model and its own checkpoints.
"""

from __future__ import annotations

from torch import nn

from fedward.config import FedwardConfig
from models.networks import build_model
from pipelines.fedavg import FedAvg


def _probe(config: FedwardConfig) -> nn.Module:
    """A model of the configured architecture; entry names do not depend on the input width."""
    size = config.data.dicom.image_size if config.data.kind == "dicom" else 1
    return build_model(config.model, (1, size, size) if config.data.kind == "dicom" else (1,))


def _entries(prefix: str, module: nn.Module) -> set[str]:
    return {f"{prefix}.{name}" for name, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))}


class FedBN(FedAvg):
    def personal_keys(self) -> frozenset[str]:
        model = _probe(self.config)
        return frozenset().union(*(_entries(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)))


class FedPer(FedAvg):
    def personal_keys(self) -> frozenset[str]:
        name, head = [(n, m) for n, m in _probe(self.config).named_modules() if isinstance(m, nn.Linear)][-1]
        return frozenset(_entries(name, head))


class FedRep(FedPer):
    def __init__(self, config: FedwardConfig):
        super().__init__(config)
        self.personal_epochs = config.strategy.head_epochs
