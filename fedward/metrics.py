"""Discrimination metrics that can be pooled without per-patient scores leaving a hospital.

A hospital sends, per class, a histogram of its predicted probabilities over fixed bins. Summed
across hospitals these give pooled AUROC and AUPRC: exact up to ties inside a bin, and
`auroc_error_bound` says how far off that can be.

A hospital's own exact AUROC and average precision are computed here too, as scikit-learn's
roc_auc_score and average_precision_score compute them (tests hold them equal): importing
scikit-learn, with the pandas and scipy.stats it loads, costs every hospital process about 120 MB,
and a simulation or a cluster runs many of them.
"""

from __future__ import annotations

import numpy as np

# What leaves a hospital is, per class, how many held-out scores fall in each 0.01-wide bin: the
# score distribution, not which patient has which score. Finer bins would make pooled AUROC a
# little more exact and pin single scores down; `auroc_error_bound` reports the cost.
BINS = 100


def score_histograms(scores: np.ndarray, labels: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    idx = np.clip((np.asarray(scores, np.float64) * bins).astype(np.int64), 0, bins - 1)
    labels = np.asarray(labels).astype(bool)
    return (
        np.bincount(idx[labels], minlength=bins).astype(np.int64),
        np.bincount(idx[~labels], minlength=bins).astype(np.int64),
    )


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative, ties in a bin counted half."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def auroc_error_bound(pos: np.ndarray, neg: np.ndarray) -> float:
    """Largest possible gap to the exact AUROC: half of the positive-negative pairs sharing a bin."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(0.5 * (pos * neg).sum() / (n_pos * n_neg))


def auprc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with one threshold per bin edge, from the highest bin down."""
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.ones_like(tp, dtype=np.float64), where=predicted > 0)
    recall_step = pos[::-1] / n_pos
    return float((precision * recall_step).sum())


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative, ties counted half (the
    Mann-Whitney U statistic over both classes' sizes)."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # tied scores share their mean rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Precision at each distinct score, from the highest down, weighed by the recall it adds."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    last_of_tie = np.r_[np.diff(scores[order]) != 0, True]
    tp = np.cumsum(labels[order])[last_of_tie]
    predicted = np.arange(1, len(scores) + 1)[last_of_tie]
    return float(np.sum(np.diff(np.r_[0, tp]) / n_pos * tp / predicted))
