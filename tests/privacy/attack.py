"""An attacker of a run's released evaluation records, written apart from the code that releases them.

The attacker holds what a run writes about each hospital (its records as metrics.jsonl and
subgroups.json hold them), every global model, and the features of every held-out patient, so it
knows each patient's score under every model and which group a patient belongs to. It reads any
released table of counts over score intervals, in the layout fedward wrote before the release
policy (100 slices per class: `positive_hist`, `negative_hist`) or after it (`bin_low`, `bin_high`,
`positive_bins`, `negative_bins`), as a constraint: so many positives among the patients whose
scores fall in the interval.

A released AUROC of one hospital over its patients is a constraint too: with P positives among
them, the positives' score ranks add up to AUROC x P x N + P(P + 1)/2, known to the AUROC's last
digit.

Certain labels come from peeling the counts: a count with no positives left, or with as many
positives left as unknown patients, decides every patient it holds, and decided patients are taken
out of every other count until nothing changes. The best guess for the rest is the maximum-entropy
fit of all constraints (iterative proportional fitting on the log-odds, starting from the model's
own score), labelled positive above one half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import rankdata


@dataclass(frozen=True)
class Constraint:
    """The positives among the patients weighed by `weights` add up to `total`: a count of patients
    (weights 0 or 1, `exact`) or a sum of ranks."""

    weights: np.ndarray
    total: float
    exact: bool = True


def intervals(entry: dict) -> list[tuple[float, float, int, int]]:
    """(low, high, positives, negatives) of every score interval a released entry counts."""
    if "positive_hist" in entry:
        pos, neg = np.asarray(entry["positive_hist"]), np.asarray(entry["negative_hist"])
        k = len(pos)
        return [(i / k, (i + 1) / k, int(pos[i]), int(neg[i])) for i in range(k)]
    if "bin_low" in entry:
        return [(lo / 100, hi / 100, int(p), int(n)) for lo, hi, p, n in zip(entry["bin_low"], entry["bin_high"], entry["positive_bins"], entry["negative_bins"])]
    return []


def constraints(entry: dict, scores: np.ndarray, among: np.ndarray | None = None) -> list[Constraint]:
    """What one released entry says of the patients (`among`: the group it counts) whose scores the attacker knows."""
    slice_of = np.clip((scores * 100).astype(np.int64), 0, 99) / 100  # the 0.01-wide slice a score falls in
    out = []
    for lo, hi, pos, neg in intervals(entry):
        inside = (slice_of >= lo - 1e-9) & (slice_of < hi - 1e-9)
        if among is not None:
            inside &= among
        assert inside.sum() == pos + neg, "the attacker's scores disagree with the released counts"
        out.append(Constraint(inside.astype(np.float64), pos))
    if "auroc" in entry and isinstance(entry["auroc"], float) and "positives" in entry and among is None:
        positives = entry["positives"]
        negatives = len(scores) - positives
        out.append(Constraint(rankdata(scores), entry["auroc"] * positives * negatives + positives * (positives + 1) / 2, exact=False))
    return out


@dataclass
class Outcome:
    certain: np.ndarray  # bool per patient: decided by the released counts alone
    guess: np.ndarray  # 0/1 per patient
    posterior: np.ndarray


def attack(constraints: list[Constraint], prior: np.ndarray) -> Outcome:
    n = len(prior)
    known = np.full(n, -1)
    counts = [c for c in constraints if c.exact]
    changed = True
    while changed:
        changed = False
        for c in counts:
            members = c.weights > 0
            unknown = members & (known < 0)
            left = c.total - int((known[members] == 1).sum())
            if unknown.any() and left == 0:
                known[unknown], changed = 0, True
            elif unknown.any() and left == unknown.sum():
                known[unknown], changed = 1, True
    odds = logit(np.clip(prior, 1e-6, 1 - 1e-6))
    for _ in range(30):
        for c in constraints:
            members = c.weights > 0
            scale = c.weights[members].max() if members.any() else 1.0
            w = c.weights[members] / scale
            if not members.any() or c.total <= 0 or c.total >= c.weights[members].sum():
                continue
            shift = brentq(lambda d: (w * expit(odds[members] + d * w)).sum() - c.total / scale, -200, 200)
            odds[members] += shift * w
    posterior = np.where(known >= 0, known, expit(odds))
    return Outcome(known >= 0, (posterior >= 0.5).astype(np.int64), posterior)


def place(tables: list[tuple[np.ndarray, dict[int, int]]], n: int, k: int) -> np.ndarray:
    """Which of `k` target bins each of `n` patients can be in, given released tables of counts:
    (the patients a row counts, {bin: patients of the row in it} for the cells released; the other
    cells held back). A row whose released cells hold all its patients keeps them to those bins; a
    bin with exactly as many candidates as it counts takes all of them; a bin already filled by
    patients placed in it takes no other. Repeated until nothing changes; a patient with one bin
    left is placed with certainty."""
    possible = np.ones((n, k), bool)
    changed = True
    while changed:
        before = possible.copy()
        for members, counts in tables:
            released = np.zeros(k, bool)
            released[list(counts)] = True
            if sum(counts.values()) == members.sum():
                possible[members] &= released
            for j, count in counts.items():
                candidates = members & possible[:, j]
                if candidates.sum() == count:
                    possible[candidates] = np.eye(k, dtype=bool)[j]
                placed = members & possible[:, j] & (possible.sum(axis=1) == 1)
                if placed.sum() == count:
                    possible[members & ~placed, j] = False
        changed = not np.array_equal(before, possible)
    return possible
