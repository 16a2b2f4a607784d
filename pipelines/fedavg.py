"""FedAvg (McMahan et al. 2017): the global weights move by the weighted mean of the hospitals'
changes. Weights are example counts, or 1 per hospital under hospital-level DP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedward.errors import AggregationError
from fedward.types import Update
from pipelines.strategy import Strategy


def weighted_mean(updates: Sequence[Update]) -> np.ndarray:
    layouts = {u.layout for u in updates}
    if len(layouts) != 1 or any(u.delta.shape != (u.layout.size,) for u in updates):
        raise AggregationError(f"updates from {[u.hospital for u in updates]} do not share one layout")
    total = sum(u.weight for u in updates)
    if total <= 0:
        raise AggregationError("updates carry no weight (no training examples)")
    # float64 accumulation in a fixed order (by hospital) keeps the result reproducible.
    acc = np.zeros(updates[0].delta.shape, np.float64)
    for u in sorted(updates, key=lambda u: u.hospital):
        acc += (u.weight / total) * u.delta.astype(np.float64)
    return acc


class FedAvg(Strategy):
    def aggregate(self, round: int, current: np.ndarray, updates: Sequence[Update], failures: Mapping[str, str]) -> np.ndarray | None:
        if not updates:
            return None
        return (current.astype(np.float64) + weighted_mean(updates)).astype(np.float32)
