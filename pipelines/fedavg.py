"""FedAvg (McMahan et al. 2017): the global weights move by the weighted mean of the hospitals'
changes. Weights are example counts, or 1 per hospital under hospital-level DP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedward.errors import AggregationError
from fedward.types import Layout, Update
from models import width
from pipelines.strategy import Strategy


def weighted_mean(updates: Sequence[Update], layout: Layout | None = None) -> np.ndarray:
    """The weighted mean change over `layout` (by default the one the updates share). Under width
    slicing (HeteroFL) each entry is averaged over the hospitals whose sub-model holds it; an
    entry no hospital holds does not move."""
    if layout is None:
        layouts = {u.layout for u in updates}
        if len(layouts) != 1:
            raise AggregationError(f"updates from {[u.hospital for u in updates]} do not share one layout")
        layout = layouts.pop()
    # float64 accumulation in a fixed order (by hospital) keeps the result reproducible.
    acc, total = np.zeros(layout.size, np.float64), np.zeros(layout.size, np.float64)
    for u in sorted(updates, key=lambda u: u.hospital):
        try:
            delta, held = width.put(u.delta, u.layout, layout)
        except AggregationError as e:
            raise AggregationError(f"update from {u.hospital}: {e}") from None
        acc += u.weight * delta.astype(np.float64)
        total += u.weight * held
    if not (total > 0).any():
        raise AggregationError("updates carry no weight (no training examples)")
    return np.divide(acc, total, out=np.zeros_like(acc), where=total > 0)


class FedAvg(Strategy):
    def aggregate(self, round: int, current: np.ndarray, updates: Sequence[Update], failures: Mapping[str, str]) -> np.ndarray | None:
        if not updates:
            return None
        return (current.astype(np.float64) + weighted_mean(updates, self.layout)).astype(np.float32)
