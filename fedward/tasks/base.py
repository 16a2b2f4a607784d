"""The `Task` interface: what a study predicts, decided in one place.

A task turns a label column into targets (with a reason for every row it cannot use), sizes the
model's output, gives the loss, stratifies the split, computes what a hospital releases about its
held-out patients (exact statistics that leave it only padded, and the cells and figures it may
release in the clear), turns statistics summed over hospitals into the consortium's figures, and
writes what `fedward predict` shows. The hospital, the driver, the demo's baselines and `predict`
call only this interface, so a new task (one of fedward's or a study's own, named by
`task.target`) changes no other file.

Targets are numpy arrays with one entry per sample (a later task may give each sample a vector or
a mask: nothing outside the task looks inside a target).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from fedward.config import LabelRule, TaskConfig
from fedward.declarations import ONE_SCORE, Declaration

# field, reason, detail, mask of the rows affected: a label cell the task cannot use costs its row.
Problem = tuple[str, str, str, np.ndarray]


@dataclass(frozen=True)
class Released:
    """What a hospital releases in the clear of one evaluation: figures and the cells they come from."""

    figures: dict[str, Any]
    statistics: dict[str, np.ndarray]


class Task(ABC):
    kind: ClassVar[str]
    agrees_scale: ClassVar[bool] = False  # whether hospitals agree on a scale of the targets before round 1 (`scale`)
    # The figures a reader is shown first (status, reports, progress), as (record key, name); the
    # first is the task's headline figure.
    figures: ClassVar[tuple[tuple[str, str], ...]] = (("auroc", "AUROC"),)
    # What the driver learns of a hospital's data besides its counts (DataCounts.targets).
    output_size: int = 1
    # What the task takes from other components (fedward/declarations.py): explanations and
    # figures per patient group read one probability per patient, which only a binary task gives.
    needs: ClassVar[dict[str, str]] = {}
    breaks: ClassVar[dict[str, str]] = {ONE_SCORE: "gives each patient more than one probability, or a number"}

    def __init__(self, config: TaskConfig):
        self.config = config

    def declaration(self) -> Declaration:
        setting = f"task.target: {self.config.target}" if self.config.target else f"task.kind: {self.kind}"
        return Declaration(setting, self.needs, self.breaks)

    # -- labels -----------------------------------------------------------------------------------

    @abstractmethod
    def targets(self, text: pa.ChunkedArray, column_type: pa.DataType, rule: LabelRule, file: str) -> tuple[np.ndarray, list[Problem]]:
        """The target of every row of a label column given as trimmed text (null where empty), and
        the problems of the rows that have none (their target entries are then meaningless)."""

    @abstractmethod
    def target_counts(self, targets: np.ndarray) -> dict[str, int]:
        """Samples per class value (empty for a numeric target): released with a hospital's counts."""

    def unusable(self, targets: np.ndarray) -> str | None:
        """Why a hospital's targets cannot train this task (None: they can)."""
        return None

    def strata(self, targets: np.ndarray) -> np.ndarray:
        """An integer stratum per sample for the held-out split: a patient takes their largest."""
        return np.asarray(targets, np.int64)

    # -- training ---------------------------------------------------------------------------------

    def scale(self, summaries: Sequence[dict[str, float]]) -> dict[str, float] | None:
        """What the hospitals agree on before training from their `summary`s (None: nothing)."""
        return None

    def summary(self, targets: np.ndarray) -> dict[str, float] | None:
        """Sums over a hospital's training targets for `scale` (None: the task needs none)."""
        return None

    @abstractmethod
    def tensor(self, targets: np.ndarray, scale: dict[str, float] | None) -> torch.Tensor:
        """The targets as the loss reads them."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The training loss of the model's outputs (N, output_size) against `tensor`'s targets."""

    @abstractmethod
    def flipped(self, y: torch.Tensor) -> torch.Tensor:
        """The targets as a simulated label-flipping attacker trains on them (config `attack`)."""

    # -- evaluation -------------------------------------------------------------------------------

    @abstractmethod
    def statistics(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        """A hospital's exact statistics of a model's outputs on its held-out patients: counts and
        sums that add up across hospitals. They leave a hospital only padded (fedward/pooling.py)."""

    @abstractmethod
    def pooled(self, statistics: dict[str, np.ndarray], floor: int) -> dict[str, Any]:
        """The figures of statistics summed over hospitals, exactly as if the patients were pooled;
        a figure or cell counting fewer than `floor` samples is held back (fedward/release.py)."""

    @abstractmethod
    def release(self, outputs: torch.Tensor, y: torch.Tensor, scale: dict[str, float] | None, *, patients: np.ndarray, floor: int) -> Released | None:
        """What one hospital may release in the clear of a model on its held-out patients
        (`patients`: each row's patient): cells each counting at least `floor` patients
        (fedward/release.py) and figures computed from them alone; None when it may release none."""

    # -- scoring new patients ---------------------------------------------------------------------

    @abstractmethod
    def predictions(self, outputs: torch.Tensor, scale: dict[str, float] | None) -> dict[str, np.ndarray]:
        """The columns `fedward predict` writes for each sample, named for the reader."""

    def headline(self) -> str:
        """The pooled figure a progress bar shows."""
        return self.figures[0][0]


def null_mask(values: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def batch_outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs (N, output_size) in evaluation mode, 256 samples at a time, computed on
    the model's device and returned on the CPU, where statistics and releases are made."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + 256].to(device)).float().cpu() for i in range(0, len(x), 256)])
