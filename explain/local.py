"""The hospital's half of explanations, run inside the hospital (its actor, or its own node).

SHAP values of the global model on the hospital's own held-out patients, with a background drawn
from those same held-out patients (its mean output is the released base value). Only the `ExplanationSummary` aggregates leave; per-patient
explanations go into the hospital's own report, in its own area.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedward.explain.aggregate import explain_images, explain_table, grouped_by_feature, patient_contributions
from fedward.explain.attribution import Attributions, deep_shap
from fedward.explain.report import PatientExplanation
from fedward.explain.summary import ExplanationSummary
from fedward.errors import DataError, HospitalError


@dataclass
class LocalExplanation:
    """What the hospital keeps of an explanation: the released summary and its own patients."""

    summary: ExplanationSummary
    patients: list[PatientExplanation]


def _background(hospital, seed: int) -> torch.Tensor:
    """Up to `explain.background` held-out samples, against which attributions are measured. Its
    mean output is released as the base value: it describes held-out patients, as the released
    figures do, never training patients, and only when they are at least `min_bin_count`."""
    settings, rows = hospital.config.explain, hospital.holdout_idx
    patients = len(np.unique(hospital.samples.patient_ids[rows]))
    if patients < settings.min_bin_count:
        raise HospitalError(
            f"{hospital.name}: {patients} held-out patients, fewer than explain.min_bin_count={settings.min_bin_count}: "
            f"the explanation's base value, their mean, would describe too few to release"
        )
    rng = np.random.default_rng(seed)
    return hospital.x[np.sort(rng.choice(rows, min(settings.background, len(rows)), replace=False))]


def _patient(hospital, attr: Attributions, rows: np.ndarray, i: int) -> PatientExplanation:
    """Sample `rows[i]` of the hospital, explained; `attr` covers `rows`."""
    samples = hospital.samples
    row = int(rows[i])
    probability = float(torch.sigmoid(torch.tensor(attr.outputs[i])))
    common = dict(
        patient_id=str(samples.patient_ids[row]),
        sample_id=samples.sample_ids[row],
        label=int(samples.labels[row]),
        probability=probability,
        base_value=attr.base_value,
    )
    if hospital.config.data.kind == "table":
        spec = hospital.config.data.table
        grouped = grouped_by_feature(attr, hospital.preprocessing, spec)[i]
        raw = {name: samples.features.column(name)[row].as_py() for name in samples.features.column_names}
        contributions = patient_contributions(grouped, raw, spec.features, attr.base_value)
        return PatientExplanation(**common, contributions=contributions, image=None, attribution=None)
    return PatientExplanation(
        **common, contributions=[], image=hospital.x[row, 0].numpy(), attribution=attr.values[i, 0]
    )


def explain_at_hospital(hospital, model: nn.Module, round: int, seed: int) -> LocalExplanation:
    """Explain the model on up to `explain.max_samples` held-out samples of `hospital`."""
    settings = hospital.config.explain
    rng = np.random.default_rng(seed)
    rows = hospital.holdout_idx
    if len(rows) > settings.max_samples:
        rows = np.sort(rng.choice(rows, settings.max_samples, replace=False))
    began = time.monotonic()
    attr = deep_shap(model, _background(hospital, seed), hospital.x[rows])
    seconds = time.monotonic() - began
    # Noise on released means must not be reproducible from the config (the run's seed is no
    # secret), so it draws from the operating system's entropy.
    common = dict(patients=hospital.samples.patient_ids[rows], hospital=hospital.name, round=round, seconds=seconds, rng=np.random.default_rng())
    if hospital.config.data.kind == "table":
        raw = hospital.samples.features.take(rows)
        summary = explain_table(attr, raw, hospital.preprocessing, hospital.config.data.table, settings, **common)
    else:
        summary = explain_images(attr, settings, **common)
    # The patients a clinician looks at first: those the model flags as most at risk.
    chosen = np.argsort(-attr.outputs, kind="stable")[: settings.patients]
    return LocalExplanation(summary, [_patient(hospital, attr, rows, int(i)) for i in chosen])


def explain_patient(hospital, model: nn.Module, patient_id: str, seed: int) -> list[PatientExplanation]:
    """Every sample of one patient at this hospital, explained against the hospital's background."""
    rows = np.flatnonzero(hospital.samples.patient_ids == patient_id)
    if len(rows) == 0:
        raise DataError(f"{hospital.name}: no usable sample of patient {patient_id!r} in its data")
    attr = deep_shap(model, _background(hospital, seed), hospital.x[rows])
    return [_patient(hospital, attr, rows, i) for i in range(len(rows))]
