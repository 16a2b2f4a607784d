"""How the hospitals' changes become one change: their weighted mean, or a robust rule.

The mean lets one hospital move the model as far as it likes. The robust rules bound what a few
faulty or hostile hospitals can do, at some cost in efficiency when all are honest:

- `median`: the coordinate-wise median (Yin et al. 2018);
- `trimmed_mean`: per coordinate, the mean after cutting the `trim` share of values at each end;
- `krum` / `multi_krum` (Blanchard et al. 2017): the change (or the `keep` changes) closest to its
  n - f - 2 nearest neighbours, f being the hospitals per round that may be hostile;
- `fltrust` (Cao et al. 2021): the driver trains on its own small trusted data each round; each
  change counts by its cosine similarity to that trusted change (nothing when it points away),
  rescaled to the trusted change's norm (`trust_weighted`, applied before the mean);
- `norm_bound` (Sun et al. 2019), with any rule: every change is clipped to an L2 norm first, by
  the driver as it admits it (`bounded`), or inside each hospital when updates are hidden.

All but the mean and the norm bound need each change in the clear: the config refuses them with
secure aggregation or encryption, where the norm bound is enforced inside each hospital instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses

import numpy as np
from scipy.linalg.blas import saxpy

from fedward.config import RobustConfig
from fedward.declarations import CLEAR, CONTROL_CHANGES, DRIVER_TRAINS_FREELY, MEAN, SAME_ROUND, WHOLE_SHAPE, Declaration
from fedward.errors import AggregationError
from fedward.types import Layout, Update
from fedward import width


# Entries summed at once over all updates: the accumulator block stays in the CPU cache while each
# update streams through it, so the mean reads every update from memory once (BLAS saxpy, float32:
# the weights the mean moves are float32 too; a fixed order keeps the sum reproducible).
BLOCK = 1 << 15


def weighted_mean(updates: Sequence[Update], layout: Layout | None = None) -> np.ndarray:
    """The weighted mean change over `layout` (by default the one the updates share). Under width
    slicing (HeteroFL) each entry is averaged over the hospitals whose sub-model holds it; an
    entry no hospital holds does not move."""
    if layout is None:
        layouts = {u.layout for u in updates}
        if len(layouts) != 1:
            raise AggregationError(f"updates from {[u.hospital for u in updates]} do not share one layout")
        layout = layouts.pop()
    ordered = sorted(updates, key=lambda u: u.hospital)  # a fixed order keeps the float sum reproducible
    if all(u.layout == layout for u in ordered):
        for u in ordered:
            _naming(u, width.check_fills, u.delta, layout)
        return _blockwise_mean([(u.weight, u.delta) for u in ordered], layout.size)
    acc, total = np.zeros(layout.size, np.float64), np.zeros(layout.size, np.float64)
    for u in ordered:
        delta, held = _naming(u, width.put, u.delta, u.layout, layout)
        acc += u.weight * delta.astype(np.float64)
        total += u.weight * held
    if not (total > 0).any():
        raise AggregationError("updates carry no weight (no training examples)")
    return np.divide(acc, total, out=np.zeros_like(acc), where=total > 0)


def _naming(update: Update, check, *args):
    """`check(*args)`, its refusal naming the hospital whose update it is."""
    try:
        return check(*args)
    except AggregationError as e:
        raise AggregationError(f"update from {update.hospital}: {e}") from None


def _blockwise_mean(terms: Sequence[tuple[float, np.ndarray]], size: int) -> np.ndarray:
    """sum(weight * values) / sum(weight), block by block, summed in the order given."""
    total = float(sum(weight for weight, _ in terms))
    if not total > 0:
        raise AggregationError("updates carry no weight (no training examples)")
    out = np.empty(size, np.float64)
    acc = np.empty(min(BLOCK, size), np.float32)
    for start in range(0, size, BLOCK):
        block = slice(start, min(start + BLOCK, size))
        scratch = acc[: block.stop - block.start]
        scratch.fill(0.0)
        for weight, values in terms:
            saxpy(values[block], scratch, a=weight / total)
        out[block] = scratch
    return out


def _stacked(updates: Sequence[Update]) -> np.ndarray:
    if len({u.layout for u in updates}) != 1:
        raise AggregationError(f"a robust rule needs changes of one layout; {[u.hospital for u in updates]} differ")
    return np.stack([u.delta.astype(np.float64) for u in updates])


def krum_scores(deltas: np.ndarray, byzantine: int) -> np.ndarray:
    """Each change's sum of squared distances to its n - f - 2 nearest other changes."""
    n = len(deltas)
    squared = (deltas**2).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * deltas @ deltas.T, 0.0)
    nearest = max(1, n - byzantine - 2)
    return np.array([np.sort(np.delete(distances[i], i))[:nearest].sum() for i in range(n)])


def combine(updates: Sequence[Update], layout: Layout | None, robust: RobustConfig) -> np.ndarray:
    """The round's change under the configured rule (float64)."""
    if robust.rule in ("mean", "fltrust"):  # FLTrust's weights are already in the updates
        return weighted_mean(updates, layout)
    ordered = sorted(updates, key=lambda u: u.hospital)
    deltas = _stacked(ordered)
    if robust.rule == "median":
        return np.median(deltas, axis=0)
    if robust.rule == "trimmed_mean":
        from scipy.stats import trim_mean  # scipy.stats: 65 MB, in the driver that trims and nowhere else

        return trim_mean(deltas, robust.trim, axis=0)
    # A round may have fewer hospitals than the config planned for (some failed): Krum then keeps
    # what it can, and never fewer than one.
    keep = 1 if robust.rule == "krum" else max(1, min(robust.keep or len(deltas) - robust.byzantine, len(deltas)))
    chosen = np.argsort(krum_scores(deltas, robust.byzantine), kind="stable")[:keep]
    return weighted_mean([ordered[i] for i in sorted(chosen)], layout)


def rule_declaration(robust: RobustConfig) -> Declaration | None:
    """What a robust rule other than the mean needs of the updates it compares, and takes away."""
    if robust.rule == "mean":
        return None
    needs = {CLEAR: "compares each hospital's change with the others'", WHOLE_SHAPE: "compares whole changes, entry by entry"}
    breaks = {MEAN: "does not take the weighted mean of the changes"}
    if robust.rule == "fltrust":
        needs[DRIVER_TRAINS_FREELY] = "trains a reference change on the driver's trusted data each round"
        breaks[CONTROL_CHANGES] = "re-weighs each change by the driver's reference change, which carries no control change"
    return Declaration(f"robust.rule: {robust.rule}", needs, breaks)


LATE_UPDATES = Declaration(
    "run.stale_weight",
    needs={MEAN: "weighs a late change down by how many rounds late it is"},
    breaks={SAME_ROUND: "counts a late change in a later round"},
)


def bounded(update: Update, bound: float, size: int) -> Update:
    """The update with its weight change clipped to L2 norm `bound`; entries past the model's
    `size` values (SCAFFOLD's control change) scale with it."""
    norm = float(np.linalg.norm(update.delta[:size].astype(np.float64)))
    if norm <= bound:
        return update
    return dataclasses.replace(update, delta=(update.delta * (bound / norm)).astype(np.float32))


def anomaly_scores(updates: Sequence[Update], size: int) -> dict[str, dict[str, float]]:
    """Per hospital: its change's norm, and its distance and cosine similarity to the
    coordinate-wise median of all changes, a reference no single hospital can drag away. Over
    the model's first `size` values: SCAFFOLD's control change after them is no weight change."""
    if len(updates) < 2 or len({u.layout for u in updates}) != 1:
        return {}
    ordered = sorted(updates, key=lambda u: u.hospital)
    deltas = _stacked(ordered)[:, :size]
    reference = np.median(deltas, axis=0)
    ref_norm = float(np.linalg.norm(reference))
    out = {}
    for u, d in zip(ordered, deltas):
        norm = float(np.linalg.norm(d))
        cosine = float(d @ reference / (norm * ref_norm)) if norm > 0 and ref_norm > 0 else 0.0
        out[u.hospital] = {"norm": norm, "distance": float(np.linalg.norm(d - reference)), "cosine": cosine}
    return out


def flagged(scores: dict[str, dict[str, float]], factor: float) -> list[str]:
    """Hospitals whose change lies more than `factor` times the round's median distance from the
    median change: with honest hospitals spread alike, a hostile one stands out."""
    if len(scores) < 3:  # with two, each is as far from their median as the other
        return []
    typical = float(np.median([s["distance"] for s in scores.values()]))
    return sorted(h for h, s in scores.items() if s["distance"] > factor * typical)


def trust_weighted(updates: Sequence[Update], trusted: np.ndarray) -> tuple[list[Update], dict[str, float]]:
    """FLTrust: each change rescaled to the trusted change's norm, so that no hospital counts more
    by sending a larger change, and weighted by its cosine similarity to it, floored at zero.
    Returns the updates that still count (none when every change points away), and every
    hospital's trust score."""
    reference = trusted.astype(np.float64)
    ref_norm = float(np.linalg.norm(reference))
    kept, trust = [], {}
    for u in sorted(updates, key=lambda u: u.hospital):
        delta = u.delta.astype(np.float64)
        norm = float(np.linalg.norm(delta))
        trust[u.hospital] = max(0.0, float(delta @ reference) / (norm * ref_norm)) if norm > 0 and ref_norm > 0 else 0.0
        if trust[u.hospital] > 0:
            kept.append(dataclasses.replace(u, delta=(delta * (ref_norm / norm)).astype(np.float32), weight=trust[u.hospital]))
    return kept, trust
