"""Binary outcomes: one logit per patient, binary cross-entropy; pooled AUROC, AUPRC and accuracy
from per-class counts of scores in 0.01 slices, and a hospital's own from its released score bins."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from fedward import metrics, release
from fedward.cells import BOOLEAN, FALSE, TRUE, parse_boolean, parse_cells, parse_numeric
from fedward.config import ALL_OTHERS, LabelRule
from fedward.errors import DataError
from fedward.tasks.base import Problem, Released, Task, null_mask

LISTED_VALUES = 20  # unlisted label values named one by one; past that, together


class Binary(Task):
    kind = "binary"
    figures = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("accuracy", "accuracy"))
    breaks = {}

    def targets(self, text: pa.ChunkedArray, column_type: pa.DataType, rule: LabelRule, file: str) -> tuple[np.ndarray, list[Problem]]:
        if rule.positive_values is not None:
            return self._listed(text, rule)
        if rule.threshold is not None:  # inclusive: a value equal to the threshold is positive
            numbers, bad = parse_cells(text, parse_numeric, rule.column, "numeric", column_type, file)
            return _filled(pc.greater_equal(numbers, rule.threshold)), [(rule.column, "bad_label", f"expected a numeric label, found a {column_type} cell that is not one", bad)]
        values = sorted(set(pc.unique(text).drop_null().to_pylist()))
        meanings = {"true" if v.lower() in TRUE else "false" if v.lower() in FALSE else v for v in values}
        if len(meanings) > 2:
            shown = values if len(values) <= LISTED_VALUES else [*values[:LISTED_VALUES], f"... {len(values) - LISTED_VALUES} more"]
            raise DataError(
                f"{file}: label column {rule.column!r} holds {len(meanings)} different values {shown}, and a binary task without a "
                f"label rule reads only {BOOLEAN}. Say which values are positive (label.positive_values with label.negative_values), "
                f"give label.threshold, or choose task.kind multiclass with task.classes"
            )
        parsed, bad = parse_cells(text, parse_boolean, rule.column, BOOLEAN, column_type, file)
        return _filled(parsed), [(rule.column, "bad_label", f"expected a {BOOLEAN} label, found a {column_type} cell that is not one", bad)]

    def _listed(self, text: pa.ChunkedArray, rule: LabelRule) -> tuple[np.ndarray, list[Problem]]:
        positive = pc.is_in(text, pa.array(rule.positive_values))
        if rule.negative_values == ALL_OTHERS:
            return _filled(positive), []
        listed = pc.or_(positive, pc.is_in(text, pa.array(rule.negative_values)))
        unlisted = ~null_mask(text) & ~np.asarray(pc.fill_null(listed, False).to_numpy(zero_copy_only=False), bool)
        return _filled(positive), unlisted_problems(text, unlisted, rule.column, "label.positive_values nor label.negative_values")

    def target_counts(self, targets: np.ndarray) -> dict[str, int]:
        return {"0": int((targets == 0).sum()), "1": int((targets == 1).sum())}

    def unusable(self, targets: np.ndarray) -> str | None:
        return None if set(np.unique(targets).tolist()) == {0, 1} else "both outcomes (0 and 1) among its samples"

    def tensor(self, targets: np.ndarray, scale: dict[str, float] | None) -> torch.Tensor:
        return torch.from_numpy(targets.astype(np.float32))

    def loss(self, outputs: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(outputs.squeeze(1), y, reduction=reduction)

    def flipped(self, y: torch.Tensor) -> torch.Tensor:
        return 1 - y

    def probabilities(self, outputs: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(outputs.squeeze(1)).numpy().astype(np.float64)

    def statistics(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        pos, neg = metrics.score_histograms(self.probabilities(outputs), y.numpy())
        return {"positive_hist": pos, "negative_hist": neg, "loss_sum": np.array(self.loss(outputs, y, reduction="sum").item())}

    def pooled(self, statistics: dict[str, np.ndarray], floor: int) -> dict[str, Any]:
        pos, neg = statistics["positive_hist"], statistics["negative_hist"]
        n = pos.sum() + neg.sum()
        if min(pos.sum(), neg.sum()) < floor:
            return {"n": int(n), "held_back": release.held_back(floor)}
        return {
            "n": int(n),
            "positives": int(pos.sum()),
            "auroc": metrics.auroc_from_histograms(pos, neg),
            "auroc_error_bound": metrics.auroc_error_bound(pos, neg),
            "auprc": metrics.auprc_from_histograms(pos, neg),
            "accuracy": release.rates(release.ScoreBins.slices(pos, neg))["accuracy"],
            "loss": float(statistics["loss_sum"] / n),
        }

    def release(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None, *, patients: np.ndarray, floor: int) -> Released | None:
        scores, labels = self.probabilities(outputs), y.numpy()
        bins = release.score_bins(scores, labels, patients, floor, cut=0.5)
        if bins is None:
            return None
        return Released({"positives": int(bins.positive.sum()), "auroc": release.own_auroc(labels, scores), **release.rates(bins)}, bins.statistics())

    def predictions(self, outputs: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        return {"probability": self.probabilities(outputs)}


def _filled(values: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), np.int64)


def unlisted_problems(text: pa.ChunkedArray, unlisted: np.ndarray, column: str, lists: str) -> list[Problem]:
    """One problem per value found in no list, naming it (the most frequent LISTED_VALUES of them)."""
    if not unlisted.any():
        return []
    values = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
    found, counts = np.unique(values[unlisted].astype(str), return_counts=True)
    ranked = [str(v) for v in found[np.argsort(-counts, kind="stable")]]
    problems: list[Problem] = [
        (column, "unlisted_label", f"the value {v!r} is in neither {lists}", unlisted & (values == v)) for v in ranked[:LISTED_VALUES]
    ]
    rest = unlisted & ~np.isin(values, ranked[:LISTED_VALUES])
    if rest.any():
        problems.append((column, "unlisted_label", f"its value is in neither {lists} ({len(ranked) - LISTED_VALUES} such values)", rest))
    return problems

