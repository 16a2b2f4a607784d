"""What a hospital releases about the patients it evaluates: score bins no outcome can be read from.

Whoever holds a global model and a held-out patient's features knows that patient's score, and
so which released bin the patient falls in. A bin whose patients all share one outcome names that
outcome, and exact means over a few patients (a loss, an accuracy) pin single patients' outcomes
down once several rounds are put together. So what leaves a hospital in the clear about a model's
scores is per-class counts over score bins cut from a fixed grid of 0.01-wide slices, each bin
holding at least `floor` patients of each outcome (the hospital's release floor), and the figures
these counts give exactly (the rates at a threshold no bin straddles), with its own AUROC to two
decimals. A hospital with fewer patients of an outcome than the floor releases none of it: "held
back: fewer than N patients". Pooled figures come from exact statistics the driver never reads
(fedward/pooling.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedward import metrics

GRID = metrics.BINS  # bin edges lie on multiples of 1 / GRID
# A hospital's own AUROC leaves it to two decimals: exact, several rounds' values would be as many
# equations in its patients' outcomes, each as sharp as one patient.
OWN_DIGITS = 2


def held_back(floor: int) -> str:
    return f"held back: fewer than {floor} patients"


@dataclass(frozen=True)
class ScoreBins:
    """Per-class sample counts over score bins [low[i] / GRID, high[i] / GRID), each from its
    lowest to its highest score's slice, in order."""

    low: np.ndarray  # int grid indices
    high: np.ndarray
    positive: np.ndarray  # samples with the outcome per bin
    negative: np.ndarray

    FIELDS = ("bin_low", "bin_high", "positive_bins", "negative_bins")

    def statistics(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}{k}": v for k, v in zip(self.FIELDS, (self.low, self.high, self.positive, self.negative))}

    @classmethod
    def of(cls, statistics: dict, prefix: str = "") -> ScoreBins | None:
        """The bins a record or an evaluation holds (None: it holds none, such as a held-back one)."""
        if f"{prefix}bin_low" not in statistics:
            return None
        return cls(*(np.asarray(statistics[f"{prefix}{k}"]) for k in cls.FIELDS))

    @classmethod
    def slices(cls, positive: np.ndarray, negative: np.ndarray) -> ScoreBins:
        """Per-class counts over every 0.01 slice (exact statistics, never released) as bins."""
        return cls(np.arange(GRID), np.arange(1, GRID + 1), np.asarray(positive), np.asarray(negative))

    def midpoints(self) -> np.ndarray:
        return (self.low + self.high) / (2 * GRID)


def score_bins(scores: np.ndarray, labels: np.ndarray, patients: np.ndarray, floor: int, cut: float | None = None) -> ScoreBins | None:
    """The bins a hospital may release of its samples' scores, or None when it has fewer than
    `floor` patients of an outcome. A patient counts once however many samples (images, visits)
    fall in a bin; the counts released are of samples. With `cut` (a multiple of 1 / GRID), no bin
    straddles that score where each side holds `floor` patients of each outcome, so that rates at
    the cut are exact."""
    labels = np.asarray(labels).astype(bool)
    grid = np.clip((np.asarray(scores, np.float64) * GRID).astype(np.int64), 0, GRID - 1)
    patients = np.asarray(patients)

    def enough(inside: np.ndarray) -> bool:
        return min(len(set(patients[inside & labels])), len(set(patients[inside & ~labels]))) >= floor

    if not enough(np.ones(len(grid), bool)):
        return None
    split = round(cut * GRID) if cut is not None else None
    parts = [(0, split), (split, GRID)] if split and enough(grid < split) and enough(grid >= split) else [(0, GRID)]
    starts = []
    for first, last in parts:
        starts.append(first)
        for end in range(first + 1, last):
            if enough((grid >= starts[-1]) & (grid < end)) and enough((grid >= end) & (grid < last)):
                starts.append(end)
    edges = np.array([*starts, GRID], np.int64)
    which = np.searchsorted(edges, grid, side="right") - 1
    positive = np.bincount(which[labels], minlength=len(starts)).astype(np.int64)
    negative = np.bincount(which[~labels], minlength=len(starts)).astype(np.int64)
    # Each bin reaches from its lowest to its highest score's slice, not over empty slices.
    low = np.array([grid[which == b].min() for b in range(len(starts))], np.int64)
    high = np.array([grid[which == b].max() + 1 for b in range(len(starts))], np.int64)
    return ScoreBins(low, high, positive, negative)


def counts(per_name: Mapping[str, int], floor: int) -> dict[str, int | str]:
    """Counts per class or per reason as they leave a hospital: those under the floor held back."""
    return {k: v if v >= floor else f"fewer than {floor}" for k, v in per_name.items()}


def total(per_name: Mapping[str, int | str]) -> str:
    """The total of counts as `counts` released them, saying whether some were held back."""
    held = [v for v in per_name.values() if not isinstance(v, int)]
    known = sum(v for v in per_name.values() if isinstance(v, int))
    return f"{known}" + (f" and {len(held)} reason(s) counting {held[0]}" if held else "")


def own_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """A hospital's AUROC over its own held-out patients, as it releases it."""
    return round(metrics.auroc(labels, scores), OWN_DIGITS)


def rates(bins: ScoreBins, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, sensitivity and specificity at `threshold`, exact from the bins when none of them
    straddles it; none at all otherwise, where they would count the few patients the bins hide."""
    cut = round(threshold * GRID)
    if not all(hi <= cut or lo >= cut for lo, hi in zip(bins.low, bins.high)):
        return {}
    above = bins.low >= cut
    n_pos, n_neg = bins.positive.sum(), bins.negative.sum()
    return {
        "accuracy": float((bins.positive[above].sum() + bins.negative[~above].sum()) / (n_pos + n_neg)),
        "sensitivity": float(bins.positive[above].sum() / n_pos),
        "specificity": float(bins.negative[~above].sum() / n_neg),
    }


def rounded(figures: dict, digits: int) -> dict:
    """Figures to `digits` decimals (nested ones too): single patients' outcomes stay below the last
    digit, where the several rounds' figures of one hospital would otherwise solve for them."""
    def one(v):
        if isinstance(v, dict):
            return {k: one(x) for k, x in v.items()}
        return round(v, digits) if isinstance(v, float) else v

    return one(figures)
