"""Training / held-out split by patient, stratified by the task's strata (binary: the label).

A patient's samples all land on one side, so no patient is both learned from and evaluated on.
"""

from __future__ import annotations

import numpy as np


def split_by_patient(
    patient_ids: np.ndarray, strata: np.ndarray, holdout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out samples; `strata` are integers >= 0, one per sample."""
    patients, inverse = np.unique(patient_ids, return_inverse=True)
    # A patient takes the largest stratum of their samples (binary: positive if any sample is).
    patient_label = np.zeros(len(patients), np.int64)
    np.maximum.at(patient_label, inverse, np.asarray(strata, np.int64))
    rng = np.random.default_rng(seed)
    holdout_patient = np.zeros(len(patients), bool)
    for label in np.unique(patient_label):
        members = np.flatnonzero(patient_label == label)
        take = int(round(holdout_fraction * len(members)))
        # Keep every stratum on both sides whenever it has at least two patients.
        take = min(max(take, 1), len(members) - 1) if len(members) >= 2 else take
        holdout_patient[rng.permutation(members)[:take]] = True
    holdout = holdout_patient[inverse]
    return np.flatnonzero(~holdout), np.flatnonzero(holdout)
