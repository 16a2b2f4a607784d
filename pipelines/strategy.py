"""The `Strategy` interface: what a federated algorithm decides, and nothing else.

The pipeline owns the round loop, Ray and checkpoints; a strategy only says who trains with
what settings (`configure_round`), how updates become the next global weights (`aggregate`), and
which parameters stay at the hospital (`personal_keys`). Strategies never mutate their inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from fedward.config import FedwardConfig
from fedward.seeds import derived_seed
from fedward.types import Layout, RoundPlan, Update
from pipelines import aggregation


class Strategy(ABC):
    proximal_mu = 0.0  # asked of hospitals' local training; FedProx sets it
    personal_lambda: float | None = None  # Ditto sets it: hospitals then keep and evaluate a personal model
    personal_epochs = 0  # FedRep sets it: hospitals train their personal layers alone first
    layout: Layout | None = None  # the global model's shared entries, once started

    def __init__(self, config: FedwardConfig):
        self.config = config

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
                proximal_mu=self.proximal_mu,
                personal_lambda=self.personal_lambda,
                personal_epochs=self.personal_epochs,
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

    def personal_keys(self) -> frozenset[str]:
        """State-dict entries that stay at each hospital and never enter the aggregate."""
        return frozenset()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")
