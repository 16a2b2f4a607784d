"""The strategies a config can name (`strategy.name`)."""

from __future__ import annotations

from pipelines.ditto import Ditto
from pipelines.fedavg import FedAvg
from pipelines.fedopt import FedAdagrad, FedAdam, FedYogi
from pipelines.fedprox import FedProx
from pipelines.personalized import FedBN, FedPer, FedRep
from pipelines.scaffold import Scaffold
from pipelines.strategy import Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedprox": FedProx,
    "scaffold": Scaffold,
    "fedbn": FedBN,
    "fedper": FedPer,
    "fedrep": FedRep,
    "ditto": Ditto,
}
