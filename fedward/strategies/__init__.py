"""Strategies: how a round's updates become the next global model, and what each hospital does
for it. A strategy with a hospital half holds both halves in one unit (see base.py); both the
driver and every hospital build it from the config, so no strategy code travels."""

from __future__ import annotations

from fedward.components import load_component
from fedward.config import FedwardConfig
from fedward.errors import ConfigError
from fedward.strategies.base import LocalTraining, Strategy
from fedward.strategies.ditto import Ditto
from fedward.strategies.fedavg import FedAvg
from fedward.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fedward.strategies.fedprox import FedProx
from fedward.strategies.personalized import FedBN, FedPer, FedRep
from fedward.strategies.scaffold import Scaffold

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


def build_strategy(config: FedwardConfig, study_dir: str | None = None) -> Strategy:
    """The strategy `strategy.name` names, or the study's own `strategy.target`."""
    target = config.strategy.target
    if target is None:
        return STRATEGIES[config.strategy.name](config)
    made = load_component(target, "strategy.target", study_dir)
    if not (isinstance(made, type) and issubclass(made, Strategy)):
        raise ConfigError(f"strategy.target: {target!r} is not a subclass of fedward.strategies.Strategy")
    return made(config)


__all__ = ["STRATEGIES", "LocalTraining", "Strategy", "build_strategy"]
