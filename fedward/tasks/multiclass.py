"""Multiclass outcomes: one logit per class listed in `task.classes`, softmax cross-entropy.

Pooled figures come from counts: per class, one-vs-rest histograms of that class's probability
(its AUROC, and their macro mean over the classes that have both sides), and the confusion matrix
(accuracy, balanced accuracy). A hospital that lacks a class still joins; its figures for that
class are undefined (NaN, written as null), and it adds nothing to that class's pooled figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from fedward import metrics
from fedward.config import LabelRule, TaskConfig
from fedward.tasks.base import Problem, Task, null_mask
from fedward.tasks.binary import unlisted_problems
from fedward.types import Evaluation


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

    def flipped(self, y: torch.Tensor) -> torch.Tensor:
        return (y + 1) % self.output_size  # every sample trained as the next class: a consistent poisoning

    def evaluate(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None, *, round: int, hospital: str) -> Evaluation:
        k = self.output_size
        loss = nn.functional.cross_entropy(outputs, y).item()
        probabilities = torch.softmax(outputs, dim=1).numpy().astype(np.float64)
        labels = y.numpy()
        confusion = np.zeros((k, k), np.int64)  # rows: true class, columns: predicted class
        np.add.at(confusion, (labels, probabilities.argmax(axis=1)), 1)
        positive = np.zeros((k, metrics.BINS), np.int64)
        negative = np.zeros((k, metrics.BINS), np.int64)
        aurocs = {}
        for c, name in enumerate(self.classes):
            is_c = labels == c
            positive[c], negative[c] = metrics.score_histograms(probabilities[:, c], is_c)
            aurocs[name] = metrics.auroc(is_c, probabilities[:, c]) if 0 < is_c.sum() < len(labels) else float("nan")
        figures = {**_from_confusion(confusion), "macro_auroc": _macro(aurocs), "class_auroc": aurocs}
        return Evaluation(round, hospital, len(labels), loss, figures, {"class_positive_hist": positive, "class_negative_hist": negative, "confusion": confusion})

    def pool(self, evaluations: Sequence[Evaluation]) -> dict[str, Any]:
        positive = sum(e.statistics["class_positive_hist"] for e in evaluations)
        negative = sum(e.statistics["class_negative_hist"] for e in evaluations)
        confusion = sum(e.statistics["confusion"] for e in evaluations)
        aurocs = {name: metrics.auroc_from_histograms(positive[c], negative[c]) for c, name in enumerate(self.classes)}
        n = sum(e.num_examples for e in evaluations)
        return {
            "n": n,
            **_from_confusion(confusion),
            "macro_auroc": _macro(aurocs),
            "class_auroc": aurocs,
            "confusion": confusion.tolist(),
            "loss": sum(e.loss * e.num_examples for e in evaluations) / n,
        }

    def predictions(self, outputs: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        probabilities = torch.softmax(outputs, dim=1).numpy().astype(np.float64)
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
