"""What an explanation may carry out of a hospital, and what the driver makes of them.

A hospital computes SHAP values of the global model on its own held-out patients; only these
aggregates leave it: per feature the mean |SHAP| and mean SHAP, and SHAP against the feature's
value in bins shared by every hospital, each bin with its count. Bins with fewer patients than the
configured minimum are suppressed (counted, not shown). For images, a coarse map of mean |SHAP|
over the image grid. Nothing here is per patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedward.declarations import ONE_SCORE, Declaration

# Imported by the compatibility check, which must not pull in SHAP: hence here, not in explain/local.py.
DECLARATION = Declaration("explain.enabled", needs={ONE_SCORE: "attributes one probability per patient to the features"})


@dataclass(frozen=True)
class FeatureBin:
    label: str  # "[61.2, 68.4)" for numbers, the value itself for categories and booleans
    low: float | None  # numeric bin edges in the feature's own units; None for categories
    high: float | None
    count: int
    mean_shap: float  # mean SHAP value (log-odds) of the feature for the patients in this bin


@dataclass(frozen=True)
class FeatureExplanation:
    name: str  # the configured feature column; one-hot and missing-indicator columns summed into it
    type: str  # "numeric", "categorical" or "boolean"
    mean_abs_shap: float
    mean_shap: float
    bins: tuple[FeatureBin, ...]  # in value order; suppressed bins left out
    suppressed_bins: int  # bins with fewer patients than the minimum


@dataclass(frozen=True)
class ExplanationSummary:
    """One hospital's explanation of the global model after `round`."""

    hospital: str
    round: int
    n: int  # held-out samples explained
    base_value: float  # the explainer's expected model output (log-odds) over the background
    features: tuple[FeatureExplanation, ...]  # tables; empty for images
    # Images: mean |SHAP| on a coarse grid (grid x grid) over the explained images, or None.
    image_map: np.ndarray | None
    additivity_error: float  # max over samples of |base + sum(SHAP) - model output|
    noise_sigma: float  # std of the Gaussian noise added to every released mean (0: none)
    seconds: float  # time the hospital spent explaining
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class ConsortiumExplanation:
    """The driver's merge of every hospital's `ExplanationSummary`."""

    round: int
    hospitals: tuple[str, ...]
    features: tuple[str, ...]  # most important first (by global importance)
    global_importance: dict[str, float]  # feature -> sample-weighted mean |SHAP| over hospitals
    hospital_importance: dict[str, dict[str, float]]  # hospital -> feature -> mean |SHAP|
    # hospital -> feature -> the feature's share of the hospital's total importance minus its
    # share of the global total: where a feature matters more (+) or less (-) than across sites.
    drift: dict[str, dict[str, float]]
    bins: dict[str, tuple[FeatureBin, ...]]  # feature -> bins merged over hospitals (count-weighted)
    image_map: np.ndarray | None  # sample-weighted mean of the hospitals' maps
    additivity_error: float  # worst over hospitals
    checks: dict[str, bool]  # "additivity"; on demo data also "driving_above_noise"


def to_jsonable(value):
    """Dataclasses, numpy arrays and tuples as plain JSON values."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: to_jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _bins(raw: list[dict]) -> tuple[FeatureBin, ...]:
    return tuple(FeatureBin(**b) for b in raw)


def summary_from_json(raw: dict) -> ExplanationSummary:
    features = tuple(FeatureExplanation(**{**f, "bins": _bins(f["bins"])}) for f in raw["features"])
    image_map = None if raw["image_map"] is None else np.asarray(raw["image_map"], dtype=np.float64)
    return ExplanationSummary(**{**raw, "features": features, "image_map": image_map})


def consortium_from_json(raw: dict) -> ConsortiumExplanation:
    return ConsortiumExplanation(
        **{
            **raw,
            "hospitals": tuple(raw["hospitals"]),
            "features": tuple(raw["features"]),
            "bins": {name: _bins(b) for name, b in raw["bins"].items()},
            "image_map": None if raw["image_map"] is None else np.asarray(raw["image_map"], dtype=np.float64),
        }
    )
