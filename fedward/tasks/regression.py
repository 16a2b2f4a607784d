"""Regression: one output per patient, a numeric target in its own units.

The model learns the target standardized with the consortium's mean and standard deviation, agreed
before round 1 from each hospital's sums over its training targets (count, sum, sum of squares),
so one scale fits every hospital; predictions and figures are back in the target's units. Pooled
MSE, MAE and R² are exact: each hospital's sums over its held-out patients (count, sum and sum of
squares of the targets, of the squared and of the absolute errors) are added up under the
hospitals' pads (fedward/pooling.py), and R² is one minus the pooled squared error over the pooled
total sum of squares. A hospital's own figures leave it rounded to two significant digits. The
report's predicted-against-observed plot comes from the pooled 2-D histogram of (predicted,
observed) over bins set by the agreed scale, its cells under the release floor held back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fedward import release
from fedward.cells import parse_cells, parse_numeric
from fedward.config import LabelRule
from fedward.errors import DataError
from fedward.tasks.base import Problem, Released, Task

# The calibration plot's bins: standardized units from -EDGE to EDGE, the outermost catching the tails.
EDGE, PLOT_BINS = 3.0, 12
HOSPITAL_DIGITS = 2  # significant digits of a hospital's own figures


class Regression(Task):
    kind = "regression"
    agrees_scale = True
    figures = (("r2", "R²"), ("mse", "MSE"), ("mae", "MAE"))

    def targets(self, text: pa.ChunkedArray, column_type: pa.DataType, rule: LabelRule, file: str) -> tuple[np.ndarray, list[Problem]]:
        numbers, bad = parse_cells(text, parse_numeric, rule.column, "numeric", column_type, file)
        values = np.asarray(numbers.to_numpy(zero_copy_only=False), np.float64)
        return np.nan_to_num(values), [(rule.column, "bad_label", f"expected a numeric target, found a {column_type} cell that is not a number", bad)]

    def target_counts(self, targets: np.ndarray) -> dict[str, int]:
        return {}

    def unusable(self, targets: np.ndarray) -> str | None:
        return None if len(np.unique(targets)) >= 2 else "at least two different target values"

    def strata(self, targets: np.ndarray) -> np.ndarray:
        # Quartiles of the hospital's own targets: each side of the split spans the range.
        edges = np.quantile(targets, [0.25, 0.5, 0.75]) if len(targets) else []
        return np.searchsorted(edges, targets, side="right").astype(np.int64)

    def summary(self, targets: np.ndarray) -> dict[str, float]:
        t = np.asarray(targets, np.float64)
        return {"n": float(len(t)), "sum": float(t.sum()), "sum_squares": float((t * t).sum())}

    def scale(self, summaries: Sequence[dict[str, float]]) -> dict[str, float]:
        n = sum(s["n"] for s in summaries)
        mean = sum(s["sum"] for s in summaries) / n
        variance = max(sum(s["sum_squares"] for s in summaries) / n - mean * mean, 0.0)
        if not variance > 0:
            raise DataError("task: every hospital's training targets hold the same value; there is nothing to regress")
        return {"mean": mean, "sd": math.sqrt(variance)}

    def tensor(self, targets: np.ndarray, scale: dict[str, float] | None) -> torch.Tensor:
        return torch.from_numpy(((np.asarray(targets, np.float64) - scale["mean"]) / scale["sd"]).astype(np.float32))

    def loss(self, outputs: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return nn.functional.mse_loss(outputs.squeeze(1), y, reduction=reduction)

    def flipped(self, y: torch.Tensor) -> torch.Tensor:
        return -y  # mirrored about the consortium's mean

    def statistics(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        predicted = self._units(outputs, scale)
        observed = y.numpy().astype(np.float64) * scale["sd"] + scale["mean"]
        error = predicted - observed
        sums = np.array([len(observed), observed.sum(), (observed**2).sum(), (error**2).sum(), np.abs(error).sum()])
        loss = self.loss(outputs, y, reduction="sum").item()
        return {"sums": sums, "calibration": _calibration(predicted, observed, scale), "loss_sum": np.array(loss)}

    def pooled(self, statistics: dict[str, np.ndarray], floor: int) -> dict[str, Any]:
        sums = statistics["sums"]
        n = int(round(sums[0]))
        if n < floor:
            return {"n": n, "held_back": release.held_back(floor)}
        counts = np.rint(statistics["calibration"]).astype(np.int64)
        # A cell of fewer patients than the floor would place those few patients' targets, and a
        # row of predictions with one cell left would place all of them: such rows are held back.
        cells = [[int(v) if v >= floor and (row >= floor).sum() >= 2 else None for v in row] for row in counts]
        return {"n": n, **_figures(sums), "loss": float(statistics["loss_sum"] / n), "calibration": cells}

    def release(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None, *, patients: np.ndarray, floor: int) -> Released | None:
        # Sums over all of a hospital's patients; rounded, so that rounds taken together do not
        # solve for single patients' targets.
        if len(set(patients)) < floor:
            return None
        figures = _figures(self.statistics(outputs, y, scale)["sums"])
        return Released({k: float(f"{v:.{HOSPITAL_DIGITS}g}") for k, v in figures.items()}, {})

    def predictions(self, outputs: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        return {"prediction": self._units(outputs, scale)}

    @staticmethod
    def _units(outputs: torch.Tensor, scale: dict[str, float]) -> np.ndarray:
        return outputs.squeeze(1).numpy().astype(np.float64) * scale["sd"] + scale["mean"]


def _figures(sums: np.ndarray) -> dict[str, float]:
    n, total, squares, squared_error, absolute_error = (float(v) for v in sums)
    spread = squares - total * total / n
    return {"mse": squared_error / n, "mae": absolute_error / n, "r2": 1 - squared_error / spread if spread > 0 else float("nan")}


def _calibration(predicted: np.ndarray, observed: np.ndarray, scale: dict[str, float]) -> np.ndarray:
    """Patients per (predicted bin, observed bin): what the report's binned plot shows."""
    edges = scale["mean"] + scale["sd"] * np.linspace(-EDGE, EDGE, PLOT_BINS + 1)[1:-1]
    counts = np.zeros((PLOT_BINS, PLOT_BINS), np.int64)
    np.add.at(counts, (np.searchsorted(edges, predicted), np.searchsorted(edges, observed)), 1)
    return counts
