"""From one hospital's SHAP values to what may leave it, and from every hospital's to the consortium's.

At the hospital, `explain_table` and `explain_images` reduce per-patient attributions to the
aggregates of `explain.summary`: per feature the mean |SHAP| and mean SHAP, and SHAP by value bin.
Bins are fixed by what every hospital already shares (numeric edges from the pooled mean and std,
categories from the agreed vocabulary), so hospitals' bins line up without another round of
communication and no bin edge is a patient's value. Bins with fewer patients than the minimum are
suppressed; optional Gaussian noise goes on every released mean.

At the driver, `merge` combines the hospitals' summaries into global and per-hospital importance,
the drift between them and merged bins. `patient_contributions` serves the hospital's own report
and never leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
from scipy.special import ndtri

from fedward.data_adapters.harmonize import OTHER, PreprocessingSpec
from fedward.explain.attribution import Attributions
from fedward.explain.summary import ConsortiumExplanation, ExplanationSummary, FeatureBin, FeatureExplanation
from fedward.config import ExplainConfig, FeatureSpec, TableSpec
from fedward.errors import AggregationError, ConfigError, HospitalError

ADDITIVITY_TOLERANCE = 1e-3  # base value + sum of SHAP values must give the model's logit within this
MISSING = "missing"  # the bin, and the value shown, for a missing value

Candidate = tuple[str, float | None, float | None]  # a bin before counting: label, low, high


# -- at the hospital ------------------------------------------------------------------------------


def grouped_by_feature(attr: Attributions, preprocessing: PreprocessingSpec, spec: TableSpec) -> np.ndarray:
    """(N, F) SHAP values per configured feature, in `spec.features` order: each the sum over the
    feature's input columns (value, missing indicator, one-hots). Additivity keeps the row sums."""
    columns = preprocessing.columns_by_feature()
    width = sum(map(len, columns.values()))
    if attr.values.ndim != 2 or attr.values.shape[1] != width:
        raise HospitalError(
            f"attributions of shape {attr.values.shape} do not fit the preprocessing's {width} input columns"
        )
    unknown = [f.name for f in spec.features if f.name not in columns]
    if unknown:
        raise HospitalError(f"data.table.features {unknown} have no columns in the agreed preprocessing")
    return np.column_stack([attr.values[:, columns[f.name]].sum(axis=1) for f in spec.features])


def bin_edges(preprocessing: PreprocessingSpec, feature: str, bins: int) -> np.ndarray:
    """The `bins - 1` inner edges of a numeric feature's bins: the quantiles k/bins of the normal
    with the pooled mean and std, in the feature's own units. Every hospital computes the same."""
    if feature not in preprocessing.numeric:
        raise HospitalError(f"feature {feature!r} is not numeric in the agreed preprocessing")
    mean, std = preprocessing.numeric[feature]
    return mean + std * ndtri(np.arange(1, bins) / bins)


def explain_table(
    attr: Attributions,
    raw: pa.Table,
    preprocessing: PreprocessingSpec,
    spec: TableSpec,
    settings: ExplainConfig,
    *,
    patients: np.ndarray,
    hospital: str,
    round: int,
    seconds: float,
    rng: np.random.Generator,
) -> ExplanationSummary:
    """What a hospital releases about the model on its tables; `raw` holds the explained samples'
    feature columns as the table adapter typed them, and `patients` their patients, in the rows'
    order of `attr`. A bin is released only over `min_bin_count` patients, however many rows."""
    if raw.num_rows != len(attr.values):
        raise HospitalError(f"{hospital}: {raw.num_rows} raw rows for {len(attr.values)} explained samples")
    absent = [f.name for f in spec.features if f.name not in raw.column_names]
    if absent:
        raise HospitalError(f"{hospital}: the raw feature table lacks the configured columns {absent}")
    grouped = grouped_by_feature(attr, preprocessing, spec)
    features = tuple(
        _feature(feature, grouped[:, j], _bin_codes(raw, feature, preprocessing, settings.bins), np.asarray(patients), settings, rng)
        for j, feature in enumerate(spec.features)
    )
    return _summary(attr, settings, rng, hospital=hospital, round=round, seconds=seconds, features=features, image_map=None)


def explain_images(
    attr: Attributions, settings: ExplainConfig, *, patients: np.ndarray, hospital: str, round: int, seconds: float, rng: np.random.Generator
) -> ExplanationSummary:
    """What a hospital releases about the model on its images: a coarse map of mean |SHAP|, only
    over the images of at least `min_bin_count` patients (`patients`: each image's); the per-image
    maps stay in its own report."""
    if attr.values.ndim != 4:
        raise HospitalError(f"{hospital}: image attributions must be (N, C, H, W), got shape {attr.values.shape}")
    image_map = None
    if len(np.unique(patients)) >= settings.min_bin_count:
        # A pixel's attribution is the sum over its channels, as a feature's is over its columns.
        per_pixel = torch.from_numpy(np.abs(attr.values.sum(axis=1)).mean(axis=0))
        pooled = torch.nn.functional.adaptive_avg_pool2d(per_pixel[None, None], settings.image_grid)[0, 0].numpy()
        image_map = np.maximum(_noisy(pooled, settings.noise_sigma, rng), 0.0)
    return _summary(attr, settings, rng, hospital=hospital, round=round, seconds=seconds, features=(), image_map=image_map)


def patient_contributions(
    grouped_row: np.ndarray, raw_row: dict, features: Sequence[FeatureSpec], base: float
) -> list[tuple[str, str, float]]:
    """One patient's (feature, value as a clinician reads it, SHAP) by decreasing |SHAP|.

    The contributions add up to the patient's logit minus `base`; they stay at the hospital.
    """
    rows = [(f.name, _display(raw_row[f.name], f.type), float(v)) for f, v in zip(features, grouped_row, strict=True)]
    return sorted(rows, key=lambda row: -abs(row[2]))


def _summary(attr: Attributions, settings: ExplainConfig, rng: np.random.Generator, **fields) -> ExplanationSummary:
    return ExplanationSummary(
        n=len(attr.values),
        # The base value is a mean too: the model's output over the hospital's background patients.
        base_value=float(_noisy(attr.base_value, settings.noise_sigma, rng)),
        # Rounded up to a power of ten: the exact worst case is one patient's number.
        additivity_error=float(10.0 ** np.ceil(np.log10(attr.additivity_error))) if attr.additivity_error > 0 else 0.0,
        noise_sigma=settings.noise_sigma,
        checks={"additivity": attr.additivity_error <= ADDITIVITY_TOLERANCE},
        **fields,
    )


def _noisy(mean, sigma: float, rng: np.random.Generator):
    """A released mean (or array of means) with N(0, sigma) noise; untouched, rng unused, at sigma 0."""
    return mean + rng.normal(0.0, sigma, np.shape(mean)) if sigma > 0 else mean


def _feature(
    feature: FeatureSpec,
    shap: np.ndarray,
    binning: tuple[np.ndarray, list[Candidate]],
    patients: np.ndarray,
    settings: ExplainConfig,
    rng: np.random.Generator,
) -> FeatureExplanation:
    codes, candidates = binning
    counts = np.bincount(codes, minlength=len(candidates))
    sums = np.bincount(codes, weights=shap, minlength=len(candidates))
    sigma = settings.noise_sigma
    # The floor counts patients: one patient's visits in a bin are one patient, not several.
    held = np.array([len(np.unique(patients[codes == k])) for k in range(len(candidates))], np.int64)
    released = _released(held, settings.min_bin_count)
    bins = tuple(
        FeatureBin(label, low, high, int(count), float(_noisy(total / count, sigma, rng)))
        for (label, low, high), count, total, keep in zip(candidates, counts, sums, released)
        if keep
    )
    return FeatureExplanation(
        name=feature.name,
        type=feature.type,
        mean_abs_shap=max(0.0, float(_noisy(np.abs(shap).mean(), sigma, rng))),
        mean_shap=float(_noisy(shap.mean(), sigma, rng)),
        bins=bins,
        # An empty bin says nothing about anyone; only bins hiding patients count as suppressed.
        suppressed_bins=int(np.count_nonzero((held > 0) & ~released)),
    )


def _released(counts: np.ndarray, minimum: int) -> np.ndarray:
    """Which bins may be released, from the patients each holds (`counts`).

    A bin with fewer than `minimum` patients is hidden; and since n and the feature's overall mean
    are released, the hidden bins together could be recovered by subtraction, so the next smallest
    bins are hidden too until the hidden ones hold at least `minimum` patients (or none).
    """
    release = counts >= minimum
    hidden = int(counts[~release].sum())
    while 0 < hidden < minimum and release.any():
        smallest = np.flatnonzero(release)[np.argmin(counts[release])]
        release[smallest] = False
        hidden += int(counts[smallest])
    return release


def _bin_codes(
    raw: pa.Table, feature: FeatureSpec, preprocessing: PreprocessingSpec, bins: int
) -> tuple[np.ndarray, list[Candidate]]:
    """Each row's bin index and the bins in value order, the bin of missing values last."""
    column = raw.column(feature.name)
    if feature.type == "numeric":
        codes, candidates = _numeric_codes(_floats(column), bin_edges(preprocessing, feature.name, bins))
    elif feature.type == "boolean":
        values = _floats(column)
        codes = np.where(np.isnan(values), -1, values).astype(np.int64)
        candidates = [(_display(value, "boolean"), None, None) for value in (False, True)]
    else:
        codes = preprocessing.category_codes(raw, feature.name)
        candidates = [(value, None, None) for value in preprocessing.categorical[feature.name]]
    labels = [label for label, _, _ in candidates]
    if MISSING not in labels:  # a genuine category named "missing" takes the missing values too
        candidates.append((MISSING, None, None))
        labels.append(MISSING)
    return np.where(codes < 0, labels.index(MISSING), codes), candidates


def _numeric_codes(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, list[Candidate]]:
    text = _edge_texts(edges)
    labels = [f"< {text[0]}", *(f"[{a}, {b})" for a, b in zip(text, text[1:])), f"≥ {text[-1]}"]
    lows, highs = [None, *map(float, edges)], [*map(float, edges), None]
    codes = np.where(np.isnan(values), -1, np.searchsorted(edges, values, side="right"))
    return codes, list(zip(labels, lows, highs))


def _edge_texts(edges: np.ndarray) -> list[str]:
    """Edges printed with the fewest significant digits (at least 3) that keep them distinct:
    merged bins are matched by label."""
    for digits in range(3, 18):
        text = [f"{edge:.{digits}g}" for edge in edges]
        if len(set(text)) == len(text):
            break
    return text


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """Numbers and booleans as float64, NaN where missing."""
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _display(value, type: str) -> str:
    """A raw value as a clinician reads it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if type == "boolean":
        return "true" if value else "false"
    if type == "numeric":
        return f"{value:g}"
    return str(value)


# -- at the driver --------------------------------------------------------------------------------


def merge(summaries: Sequence[ExplanationSummary], truth: dict | None = None) -> ConsortiumExplanation:
    """The consortium's view of every hospital's summary. `truth` is the demo's truth.json "ehr"
    section; with it, the check that every driving feature outranks every pure-noise feature."""
    features = _check_mergeable(summaries)
    weights = np.array([s.n for s in summaries], dtype=np.float64)
    mean_abs = np.array([[f.mean_abs_shap for f in s.features] for s in summaries], dtype=np.float64)
    pooled = np.average(mean_abs, axis=0, weights=weights)
    order = sorted(range(len(features)), key=lambda j: -pooled[j])  # stable: ties keep the configured order
    ranked = tuple(features[j] for j in order)
    global_importance = {features[j]: float(pooled[j]) for j in order}
    hospital_importance = {s.hospital: {features[j]: float(mean_abs[i, j]) for j in order} for i, s in enumerate(summaries)}
    global_share = _shares(global_importance)
    drift = {
        hospital: {name: share - global_share[name] for name, share in _shares(importance).items()}
        for hospital, importance in hospital_importance.items()
    }
    bins = {features[j]: _merged_bins(b for s in summaries for b in s.features[j].bins) for j in order}
    maps = [(s.n, s.image_map) for s in summaries if s.image_map is not None]
    image_map = np.average(np.stack([m for _, m in maps]), axis=0, weights=[n for n, _ in maps]) if maps else None
    additivity_error = max(s.additivity_error for s in summaries)
    checks = {"additivity": additivity_error <= ADDITIVITY_TOLERANCE}
    if truth is not None:
        checks["driving_above_noise"] = _driving_above_noise(global_importance, truth)
    return ConsortiumExplanation(
        round=summaries[0].round,
        hospitals=tuple(s.hospital for s in summaries),
        features=ranked,
        global_importance=global_importance,
        hospital_importance=hospital_importance,
        drift=drift,
        bins=bins,
        image_map=image_map,
        additivity_error=additivity_error,
        checks=checks,
    )


def _check_mergeable(summaries: Sequence[ExplanationSummary]) -> tuple[str, ...]:
    """The features every summary explains, in their configured order; refuses what cannot merge."""
    if not summaries:
        raise AggregationError("no explanation summaries to merge; at least one hospital must explain the model")
    first = summaries[0]
    features = tuple(f.name for f in first.features)
    hospitals = [s.hospital for s in summaries]
    if len(set(hospitals)) != len(hospitals):
        raise AggregationError(f"explanation summaries repeat a hospital: {hospitals}")
    for s in summaries:
        if s.round != first.round:
            raise AggregationError(f"{s.hospital} explained round {s.round}, {first.hospital} round {first.round}")
        if tuple(f.name for f in s.features) != features:
            raise AggregationError(
                f"{s.hospital} explained features {[f.name for f in s.features]}, {first.hospital} {list(features)}"
            )
        if s.n < 1:
            raise AggregationError(f"{s.hospital}: an explanation of {s.n} samples cannot be weighted")
    return features


def _shares(importance: dict[str, float]) -> dict[str, float]:
    """Each feature's share of the total importance (all zero when there is none)."""
    total = sum(importance.values())
    return {name: value / total if total > 0 else 0.0 for name, value in importance.items()}


def _merged_bins(bins: Iterable[FeatureBin]) -> tuple[FeatureBin, ...]:
    """Bins of the same label over hospitals as one: counts summed, mean SHAP count-weighted."""
    by_label: dict[str, list[FeatureBin]] = {}
    for b in bins:
        by_label.setdefault(b.label, []).append(b)
    merged = []
    for label, group in by_label.items():
        count = sum(b.count for b in group)
        mean = sum(b.count * b.mean_shap for b in group) / count
        merged.append(FeatureBin(label, group[0].low, group[0].high, count, mean))
    return tuple(sorted(merged, key=_value_order))


def _value_order(b: FeatureBin) -> tuple:
    """The order `explain_table` lays bins out in: numeric bins by their low edge, categories as
    the agreed vocabulary sorts them (alphabetically, OTHER last), the missing values' bin last."""
    is_missing = b.label == MISSING and b.low is None and b.high is None
    return (is_missing, -math.inf if b.low is None else b.low, b.label == OTHER, b.label)


def _driving_above_noise(importance: dict[str, float], truth: dict) -> bool:
    driving, noise = list(truth["driving_features"]), list(truth["noise_features"])
    unknown = sorted(set(driving + noise) - set(importance))
    if unknown:
        raise ConfigError(f"explain.truth names features {unknown} that data.table.features does not list")
    return min(importance[f] for f in driving) > max(importance[f] for f in noise)
