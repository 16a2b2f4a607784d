"""The usable samples of one hospital, as an adapter hands them over; they never leave it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class Samples:
    # Images: float32 (N, 1, S, S) scaled to [0, 1]. Tables: a pyarrow Table holding exactly the
    # configured feature columns, cast to their declared types, nulls for missing values.
    features: np.ndarray | pa.Table
    labels: np.ndarray  # int64, 0 or 1, shape (N,)
    patient_ids: np.ndarray  # str, shape (N,); one patient never straddles the split
    sample_ids: list[str]  # file path relative to the data folder, or "row N"
    fingerprint: str  # sha256 over the content hashes of the inputs used, for the audit manifest
    # Patient-group attributes for subgroup evaluation (e.g. "sex", "age"), as text per sample; ""
    # where missing. They never make a sample unusable: an unknown group is a group of its own.
    attributes: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)
