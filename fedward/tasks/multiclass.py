"""Multiclass outcomes: one logit per class listed in `task.classes`, softmax cross-entropy.

Pooled figures come from counts summed under the hospitals' pads: per class, one-vs-rest
histograms of that class's probability (its AUROC, and their macro mean over the classes that have
both sides), and the confusion matrix (accuracy, balanced accuracy). A hospital releases in the
clear only each class's one-vs-rest score bins (fedward/release.py) and its AUROC to two decimals;
a class it has too few patients of, or lacks, has none (NaN, written as null), and a hospital
still joins without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from fedward import metrics, release
from fedward.config import LabelRule, TaskConfig
from fedward.tasks.base import Problem, Released, Task, null_mask
from fedward.tasks.binary import unlisted_problems


class Multiclass(Task):
    kind = "multiclass"
    figures = (("macro_auroc", "macro AUROC"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"))

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.classes = tuple(config.classes)
        self.output_size = len(self.classes)

    def targets(self, text: pa.ChunkedArray, column_type: pa.DataType, rule: LabelRule, file: str) -> tuple[np.ndarray, list[Problem]]:
        index = pc.index_in(text, value_set=pa.array(self.classes))
        unlisted = ~null_mask(text) & null_mask(index)
        return np.asarray(pc.fill_null(index, 0).to_numpy(zero_copy_only=False), np.int64), unlisted_problems(text, unlisted, rule.column, "task.classes")

    def target_counts(self, targets: np.ndarray) -> dict[str, int]:
        counts = np.bincount(targets, minlength=self.output_size)
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def unusable(self, targets: np.ndarray) -> str | None:
        return None if len(np.unique(targets)) >= 2 else "at least two of the classes among its samples"

    def tensor(self, targets: np.ndarray, scale: dict[str, float] | None) -> torch.Tensor:
        return torch.from_numpy(targets.astype(np.int64))

    def loss(self, outputs: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, y, reduction=reduction)

    def probabilities(self, outputs: torch.Tensor) -> np.ndarray:
        return torch.softmax(outputs, dim=1).numpy().astype(np.float64)

    def flipped(self, y: torch.Tensor) -> torch.Tensor:
        return (y + 1) % self.output_size  # every sample trained as the next class: a consistent poisoning

    def statistics(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        k = self.output_size
        probabilities = self.probabilities(outputs)
        labels = y.numpy()
        confusion = np.zeros((k, k), np.int64)  # rows: true class, columns: predicted class
        np.add.at(confusion, (labels, probabilities.argmax(axis=1)), 1)
        positive = np.zeros((k, metrics.BINS), np.int64)
        negative = np.zeros((k, metrics.BINS), np.int64)
        for c in range(k):
            positive[c], negative[c] = metrics.score_histograms(probabilities[:, c], labels == c)
        loss = self.loss(outputs, y, reduction="sum").item()
        return {"class_positive_hist": positive, "class_negative_hist": negative, "confusion": confusion, "loss_sum": np.array(loss)}

    def pooled(self, statistics: dict[str, np.ndarray], floor: int) -> dict[str, Any]:
        positive, negative = statistics["class_positive_hist"], statistics["class_negative_hist"]
        confusion = np.rint(statistics["confusion"]).astype(np.int64)
        n = int(confusion.sum())
        present = confusion.sum(axis=1)
        if (present[present > 0] < floor).any():
            return {"n": n, "held_back": release.held_back(floor)}
        aurocs = {name: metrics.auroc_from_histograms(positive[c], negative[c]) for c, name in enumerate(self.classes)}
        return {
            "n": n,
            **_from_confusion(confusion),
            "macro_auroc": _macro(aurocs),
            "class_auroc": aurocs,
            # A cell of fewer samples than the floor, an empty one too, tells which class those predicted patients have or lack.
            "confusion": [[int(v) if v >= floor else None for v in row] for row in confusion],
            "loss": float(statistics["loss_sum"] / n),
        }

    def release(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None, *, patients: np.ndarray, floor: int) -> Released | None:
        probabilities = self.probabilities(outputs)
        labels = y.numpy()
        bins = {name: release.score_bins(probabilities[:, c], labels == c, patients, floor) for c, name in enumerate(self.classes)}
        if all(b is None for b in bins.values()):
            return None
        aurocs = {name: float("nan") if bins[name] is None else release.own_auroc(labels == c, probabilities[:, c]) for c, name in enumerate(self.classes)}
        statistics = {k: v for name, b in bins.items() if b is not None for k, v in b.statistics(f"{name}/").items()}
        return Released({"macro_auroc": _macro(aurocs), "class_auroc": aurocs}, statistics)

    def predictions(self, outputs: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        probabilities = self.probabilities(outputs)
        columns = {f"probability_{name}": probabilities[:, c] for c, name in enumerate(self.classes)}
        return {**columns, "predicted_class": np.asarray(self.classes, dtype=object)[probabilities.argmax(axis=1)]}


def _from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, and balanced accuracy: the mean recall over the classes present."""
    present = confusion.sum(axis=1) > 0
    recall = np.diag(confusion)[present] / confusion.sum(axis=1)[present]
    total = confusion.sum()
    return {
        "accuracy": float(np.trace(confusion) / total) if total else float("nan"),
        "balanced_accuracy": float(recall.mean()) if present.any() else float("nan"),
    }


def _macro(aurocs: dict[str, float]) -> float:
    defined = [v for v in aurocs.values() if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")
