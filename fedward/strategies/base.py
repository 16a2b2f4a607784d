"""The `Strategy` interface: a federated algorithm's two halves in one unit.

The driver half says who trains with what settings (`configure_round`), what every asked hospital
receives besides the weights (`broadcast`), and how updates become the next global weights
(`aggregate`). The hospital half (`LocalTraining`, made by `local()`) says how a hospital trains in
a round and what it keeps between rounds. Both say which parameters stay at the hospital
(`personal_keys`). The pipeline owns the round loop, Ray and checkpoints; the hospital owns its
data, its model and the steps an update takes on its way out. Both sides build the strategy from
the config, so no strategy code travels, and each hospital trains by its own settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fedward.config import FedwardConfig
from fedward.declarations import ACCOUNTED, CONTROL_CHANGES, PLAIN_EPOCHS, PLAIN_SGD, Declaration
from fedward.seeds import derived_seed
from fedward.types import Layout, RoundPlan, Update
from fedward import aggregation


class Trainer(Protocol):
    """What a hospital offers its strategy's hospital half: training on its own training split."""

    def train(self, model: nn.Module, plan: RoundPlan, **options: Any) -> float:
        """Local training of `model` as `plan` asks; `options` are `models.training.train`'s own
        (epochs, seed, proximal_mu, anchor, correction, only). Returns the mean training loss."""

    def steps(self, epochs: int) -> int:
        """The optimizer steps `epochs` local epochs take."""


@dataclass
class LocalRound:
    """One round at one hospital, as its strategy's hospital half sees it."""

    plan: RoundPlan
    weights: np.ndarray  # the global weights as this hospital's model holds them
    layout: Layout
    model: nn.Module  # the hospital's model, holding `weights`; trained in place
    trainer: Trainer
    broadcast: Any = None  # what the strategy's driver half sent every hospital (SCAFFOLD's control)


class LocalTraining:
    """A strategy's hospital half: plain local training, keeping nothing between rounds.

    Strategies that train differently or keep state at the hospital (a control variate, a personal
    model) subclass it. Its state is saved with the hospital's round state and restored on resume
    and retry; it never leaves the hospital.
    """

    def __init__(self, config: FedwardConfig):
        self.config = config

    def train(self, round: LocalRound) -> dict[str, float]:
        """Train `round.model`; the metrics that leave the hospital with the update."""
        return {"train_loss": round.trainer.train(round.model, round.plan)}

    def finish(self, round: LocalRound, update: Update, trained: np.ndarray) -> Update:
        """The update as the strategy sends it, from the trained flat weights (`trained`)."""
        return update

    def own_model(self) -> nn.Module | None:
        """A model this hospital keeps as its own (Ditto's personal one): evaluated and exported here."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor | dict]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        """Restore what `state_dict` saved; `model` is the hospital's model, as restored."""

    def reset(self) -> None:
        """Forget everything kept, as a hospital that has not trained yet."""


class Strategy(ABC):
    keeps_own_models = False  # whether each hospital keeps a model of its own, evaluated beside the global one (Ditto)
    layout: Layout | None = None  # the global model's shared entries, once started
    # What the strategy needs of the run and takes from it, each fact with the reason (fedward/declarations.py).
    needs: dict[str, str] = {}
    breaks: dict[str, str] = {}

    def __init__(self, config: FedwardConfig):
        self.config = config

    def declaration(self) -> Declaration:
        strategy = self.config.strategy
        setting = f"strategy.target: {strategy.target}" if strategy.target else f"strategy.name: {strategy.name}"
        return Declaration(setting, self.needs, self.breaks)

    def configure_round(self, round: int, hospitals: Sequence[str], rng: np.random.Generator) -> list[RoundPlan]:
        """Plans for the hospitals asked this round: a share `strategy.fraction` of those available."""
        cfg = self.config
        count = max(cfg.run.min_hospitals, int(np.ceil(cfg.strategy.fraction * len(hospitals))))
        chosen = sorted(hospitals) if count >= len(hospitals) else sorted(rng.choice(sorted(hospitals), count, replace=False))
        return [
            RoundPlan(
                round=round,
                hospital=h,
                seed=derived_seed(cfg.run.seed, round, h),
                local_epochs=cfg.train.local_epochs,
                lr=cfg.train.lr_at(round, cfg.run.rounds),
            )
            for h in chosen
        ]

    @abstractmethod
    def aggregate(self, round: int, current: np.ndarray, updates: Sequence[Update], failures: Mapping[str, str]) -> np.ndarray | None:
        """The next global weights, or None to keep `current`."""

    def combine(self, updates: Sequence[Update]) -> np.ndarray:
        """The round's change from the hospitals' changes: their weighted mean, or the robust rule
        the config names (float64)."""
        return aggregation.combine(updates, None if self.layout is None else self.update_layout(self.layout), self.config.robust)

    def start(self, model: nn.Module, layout: Layout) -> None:
        """Called before the first round of a run or a resume, once the shared layout is known."""
        self.layout = layout

    def broadcast(self) -> np.ndarray | None:
        """What every asked hospital receives with the weights each round (SCAFFOLD's control)."""
        return None

    def update_layout(self, layout: Layout) -> Layout:
        """What an update from a hospital whose model holds `layout` carries (SCAFFOLD adds its control change)."""
        return layout

    def local(self) -> LocalTraining:
        """The hospital half: how a hospital trains under this strategy."""
        return LocalTraining(self.config)

    def personal_keys(self, model: nn.Module) -> frozenset[str]:
        """State-dict entries of `model` that stay at each hospital and never enter the aggregate."""
        return frozenset()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


def own_model_declarations(config: FedwardConfig) -> list[Declaration]:
    """The models each hospital trains for itself after the rounds, when the config asks for them."""
    outside = {ACCOUNTED: "trains a model outside the DP mechanism and its figures leave the hospital"}
    own = []
    if config.strategy.fine_tune_epochs:
        own.append(Declaration("strategy.fine_tune_epochs", breaks=outside))
    if config.strategy.local_only:
        own.append(Declaration("strategy.local_only", breaks=outside))
    return own


# Shared by the strategies whose hospital half trains more than plain local epochs.
EXTRA_TRAINING = {PLAIN_EPOCHS: "trains more than the plain local epochs (its own loss or extra passes)"}
CONTROLLED = {CONTROL_CHANGES: "sends each change with the control change SCAFFOLD's update needs"}
PLAIN_SGD_STEPS = {PLAIN_SGD: "derives its control update from plain SGD steps"}
