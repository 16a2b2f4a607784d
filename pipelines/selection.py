"""Model selection on the hospitals' validation parts, never on their held-out patients.

Each round the driver pools the hospitals' figures on the validation part of their training
splits (`train.validation_fraction`). The round with the best pooled headline figure (AUROC, macro
AUROC, R²: higher is better) is chosen, with its weights kept when `train.select` is "best", and
training stops once `train.patience` rounds have passed without a better one. A round in which a
hospital's validation figures are missing is neither chosen nor counted: its pooled figure speaks
for fewer hospitals. The choice is replayed from the checkpointed rounds' records, so a resume
chooses exactly as an uninterrupted run; `selection.json` reports it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedward.config import TrainConfig
from fedward.files import atomic_write, atomic_write_json

SELECTION = "selection.json"


def weights_file(run_dir: Path, round: int) -> Path:
    return run_dir / f"best_weights_{round:04d}.npy"


def reported(run_dir: Path) -> dict:
    """What `selection.json` says of a finished run ({} when it used no validation part)."""
    path = run_dir / SELECTION
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Selection:
    figure: str  # the task's headline figure
    best_round: int | None = None
    best_value: float | None = None
    stopped_after: int | None = None  # the round after which training stopped early

    @classmethod
    def replayed(cls, figure: str, train: TrainConfig, records: Sequence[dict]) -> Selection:
        """The selection after the rounds of `records` (the checkpointed ones)."""
        selection = cls(figure)
        for record in records:
            if "validation" in record:
                selection._take(train, record["round"], record["validation"])
        return selection

    def _take(self, train: TrainConfig, round: int, validation: dict) -> bool:
        """Whether `round` is the new best."""
        value = validation["pooled"].get(self.figure)
        counted = not validation["failures"] and value is not None and math.isfinite(value)
        better = counted and (self.best_value is None or value > self.best_value)
        if better:
            self.best_round, self.best_value = round, float(value)
        if counted and train.patience and round - (self.best_round or 0) >= train.patience:
            self.stopped_after = round
        return better

    def observe(self, run_dir: Path, train: TrainConfig, round: int, validation: dict, weights: np.ndarray) -> bool:
        """Take a round's validation figures before its checkpoint; whether training should stop."""
        if self._take(train, round, validation) and train.select == "best":
            buffer = io.BytesIO()
            np.save(buffer, weights, allow_pickle=False)
            # Under its round's name: a round redone after a crash never overwrites the chosen one.
            atomic_write(weights_file(run_dir, round), buffer.getvalue())
        for old in run_dir.glob("best_weights_*.npy"):
            if old != weights_file(run_dir, self.best_round or 0) and int(old.stem.rsplit("_", 1)[1]) < round:
                old.unlink()
        atomic_write_json(run_dir / SELECTION, asdict(self))
        return self.stopped_after is not None

    def chosen(self, run_dir: Path, train: TrainConfig, weights: np.ndarray, last: int) -> tuple[np.ndarray, int]:
        """The weights of the model the run hands on, and their round."""
        if train.select != "best" or self.best_round is None:
            return weights, last
        return np.load(weights_file(run_dir, self.best_round), allow_pickle=False), self.best_round
