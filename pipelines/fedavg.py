"""FedAvg (McMahan et al. 2017): the example-weighted mean of the hospitals' weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedward.errors import AggregationError
from fedward.types import Update
from pipelines.strategy import Strategy


def weighted_mean(updates: Sequence[Update]) -> np.ndarray:
    layouts = {u.layout for u in updates}
    if len(layouts) != 1 or any(u.weights.shape != (u.layout.size,) for u in updates):
        raise AggregationError(f"updates from {[u.hospital for u in updates]} do not share one layout")
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise AggregationError("updates carry no training examples")
    # float64 accumulation in a fixed order (by hospital) keeps the result reproducible.
    acc = np.zeros(updates[0].weights.shape, np.float64)
    for u in sorted(updates, key=lambda u: u.hospital):
        acc += (u.num_examples / total) * u.weights.astype(np.float64)
    return acc.astype(np.float32)


class FedAvg(Strategy):
    def aggregate(self, round: int, current: np.ndarray, updates: Sequence[Update], failures: Mapping[str, str]) -> np.ndarray | None:
        if not updates:
            return None
        return weighted_mean(updates)
