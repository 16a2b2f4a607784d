"""FedAvg (McMahan et al. 2017): the global weights move by the weighted mean of the hospitals'
changes. Weights are example counts, or 1 per hospital under hospital-level DP. With `robust`
settings the mean gives way to a robust rule (`fedward/aggregation.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedward.types import Update
from fedward.strategies.base import Strategy


class FedAvg(Strategy):
    def aggregate(self, round: int, current: np.ndarray, updates: Sequence[Update], failures: Mapping[str, str]) -> np.ndarray | None:
        if not updates:
            return None
        change = self.combine(updates)
        change += current  # in the change's own float64 buffer: no third full-size array
        return change.astype(np.float32)
