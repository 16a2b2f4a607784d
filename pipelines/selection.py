"""Model selection on the hospitals' validation parts, never on their held-out patients.

Each round the driver pools the hospitals' figures on the validation part of their training
splits (`train.validation_fraction`). The round with the best pooled headline figure (AUROC, macro
AUROC, R²: higher is better) is remembered, with its weights when `train.select` is "best", and
training stops once `train.patience` rounds have passed without a better one. `selection.json` in
the run directory says which round was chosen and why, and a resumed run reads it back.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedward.config import TrainConfig
from fedward.files import atomic_write, atomic_write_json

SELECTION, BEST_WEIGHTS = "selection.json", "best_weights.npy"


@dataclass
class Selection:
    figure: str  # the task's headline figure
    best_round: int | None = None
    best_value: float | None = None
    stopped_after: int | None = None  # the round after which training stopped early

    @classmethod
    def resumed(cls, run_dir: Path, figure: str, last_round: int) -> Selection:
        """The selection as it stood after `last_round` (a fresh one for a new run)."""
        path = run_dir / SELECTION
        if last_round == 0 or not path.is_file():
            return cls(figure)
        saved = cls(**json.loads(path.read_text()))
        # Written before the round's checkpoint: a round the resume redoes is chosen again, identically.
        return saved if (saved.best_round or 0) <= last_round else cls(figure)

    def observe(self, run_dir: Path, train: TrainConfig, round: int, pooled: dict, weights: np.ndarray) -> bool:
        """Take a round's pooled validation figures; whether training should stop after it."""
        value = pooled.get(self.figure)
        if value is not None and math.isfinite(value) and (self.best_value is None or value > self.best_value):
            self.best_round, self.best_value = round, float(value)
            if train.select == "best":
                buffer = io.BytesIO()
                np.save(buffer, weights, allow_pickle=False)
                atomic_write(run_dir / BEST_WEIGHTS, buffer.getvalue())
        if train.patience and round - (self.best_round or 0) >= train.patience:
            self.stopped_after = round
        atomic_write_json(run_dir / SELECTION, asdict(self))
        return self.stopped_after is not None

    def chosen(self, run_dir: Path, train: TrainConfig, weights: np.ndarray, last: int) -> tuple[np.ndarray, int]:
        """The weights of the model the run hands on, and their round."""
        if train.select != "best" or self.best_round is None:
            return weights, last
        return np.load(run_dir / BEST_WEIGHTS, allow_pickle=False), self.best_round
