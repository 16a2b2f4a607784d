"""Federated harmonisation: one preprocessing for every hospital, built from summaries alone.

Each hospital `summarize`s its feature table into counts and moments (never rows); the driver
`merge_summaries` them into a `PreprocessingSpec` that every hospital then `apply`s, so a feature
means the same thing everywhere:

- numeric columns are standardised with the mean and std pooled over all hospitals (Chan et al.'s
  parallel merge of count/mean/M2, std 0 taken as 1); a missing value is imputed with the pooled
  mean (0 once standardised) and, if any hospital had missing values in the column, flagged in
  a `NAME__missing` indicator column;
- boolean columns are numeric columns of 0/1, standardised alike;
- categorical columns are one-hot encoded over the values seen at least `min_category_count`
  times, plus "other" for the rest; a missing value is all zeros.

A value seen fewer than `min_category_count` times at one hospital is reported as "other", as a
rare value may identify a patient; a genuine category named "other" is merged with them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import reduce
from itertools import count
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedward.config import TableSpec
from fedward.errors import DataError

OTHER = "other"


@dataclass(frozen=True)
class NumericSummary:
    count: int  # non-missing values
    mean: float
    m2: float  # sum of squared deviations from the mean
    missing: int

    def merge(self, other: NumericSummary) -> NumericSummary:
        """Chan et al.'s pairwise update: exact, and stable for large counts."""
        count = self.count + other.count
        if count == 0:
            return NumericSummary(0, 0.0, 0.0, self.missing + other.missing)
        delta = other.mean - self.mean
        return NumericSummary(
            count=count,
            mean=self.mean + delta * other.count / count,
            m2=self.m2 + other.m2 + delta * delta * self.count * other.count / count,
            missing=self.missing + other.missing,
        )


@dataclass(frozen=True)
class CategorySummary:
    counts: dict[str, int]  # rare values folded into OTHER
    missing: int


@dataclass(frozen=True)
class TableSummary:
    hospital: str
    rows: int
    numeric: dict[str, NumericSummary]  # numeric and boolean features
    categorical: dict[str, CategorySummary]


def _column(features: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in features.column_names:
        raise DataError(f"feature table has no column {name!r}; columns are {features.column_names}")
    return features.column(name)


def _as_float(column: pa.ChunkedArray) -> np.ndarray:
    """Values as float64 with NaN for missing; booleans become 0/1."""
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _summarize_numeric(column: pa.ChunkedArray) -> NumericSummary:
    values = _as_float(column)
    present = values[~np.isnan(values)]
    if len(present) == 0:
        return NumericSummary(0, 0.0, 0.0, len(values))
    mean = float(present.mean())
    return NumericSummary(len(present), mean, float(((present - mean) ** 2).sum()), len(values) - len(present))


def _summarize_categorical(column: pa.ChunkedArray, min_count: int) -> CategorySummary:
    counts: Counter[str] = Counter()
    for entry in pc.value_counts(column.cast(pa.string()).drop_null()).to_pylist():
        counts[entry["values"] if entry["counts"] >= min_count else OTHER] += entry["counts"]
    return CategorySummary(dict(sorted(counts.items())), column.null_count)


def summarize(features: pa.Table, spec: TableSpec, hospital: str) -> TableSummary:
    """What one hospital shares about its feature table: counts and moments, never rows."""
    numeric, categorical = {}, {}
    for feature in spec.features:
        column = _column(features, feature.name)
        if feature.type == "categorical":
            categorical[feature.name] = _summarize_categorical(column, spec.min_category_count)
        else:
            numeric[feature.name] = _summarize_numeric(column)
    return TableSummary(hospital, features.num_rows, numeric, categorical)


def _one_hot(column: pa.ChunkedArray, vocabulary: tuple[str, ...]) -> np.ndarray:
    """One column per vocabulary value; unseen values count as OTHER, missing ones as nothing."""
    text = column.cast(pa.string())
    index = pc.index_in(text, value_set=pa.array(vocabulary))
    unseen = pc.and_(text.is_valid(), index.is_null())
    index = pc.if_else(unseen, vocabulary.index(OTHER), index)
    codes = np.asarray(pc.fill_null(index, -1).to_numpy(), dtype=np.int64)
    return codes[:, None] == np.arange(len(vocabulary))


@dataclass(frozen=True)
class PreprocessingSpec:
    """The shared recipe turning a hospital's feature table into the model's input matrix."""

    numeric: dict[str, tuple[float, float]]  # name -> (mean, std), in the table spec's order
    missing_indicators: tuple[str, ...]  # numeric columns that get a NAME__missing column
    categorical: dict[str, tuple[str, ...]]  # name -> sorted vocabulary ending with OTHER

    def feature_names(self) -> list[str]:
        """Names of `apply`'s output columns: numeric, then missing indicators, then one-hots."""
        return [
            *self.numeric,
            *(f"{name}__missing" for name in self.missing_indicators),
            *(f"{name}={value}" for name, vocabulary in self.categorical.items() for value in vocabulary),
        ]

    def columns_by_feature(self) -> dict[str, list[int]]:
        """For each feature, the indices of its columns in `apply`'s output: its value and missing
        indicator, or its one-hots. SHAP values are additive, so their sum is the feature's."""
        position = count()  # walks the columns in `feature_names`' order
        columns = {name: [next(position)] for name in self.numeric}
        for name in self.missing_indicators:
            columns[name].append(next(position))
        columns.update({name: [next(position) for _ in vocabulary] for name, vocabulary in self.categorical.items()})
        return columns

    def category_codes(self, features: pa.Table, name: str) -> np.ndarray:
        """Each row's index into categorical `name`'s vocabulary, exactly as `apply` one-hot encodes
        it (unseen values as OTHER), or -1 where the value is missing."""
        hot = _one_hot(_column(features, name), self.categorical[name])
        return np.where(hot.any(axis=1), hot.argmax(axis=1), -1)

    def apply(self, features: pa.Table) -> np.ndarray:
        """The model's input matrix, float32 (N, len(feature_names()))."""
        values = {name: _as_float(_column(features, name)) for name in self.numeric}
        return np.column_stack([
            *(np.nan_to_num((values[name] - mean) / std, nan=0.0) for name, (mean, std) in self.numeric.items()),
            *(np.isnan(values[name]) for name in self.missing_indicators),
            *(_one_hot(_column(features, name), vocabulary) for name, vocabulary in self.categorical.items()),
        ]).astype(np.float32)

    def to_dict(self) -> dict:
        # Lists of records, so the column order survives any JSON writer, even one sorting keys.
        return {
            "numeric": [{"name": n, "mean": m, "std": s} for n, (m, s) in self.numeric.items()],
            "missing_indicators": list(self.missing_indicators),
            "categorical": [{"name": n, "vocabulary": list(v)} for n, v in self.categorical.items()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessingSpec:
        return cls(
            numeric={c["name"]: (float(c["mean"]), float(c["std"])) for c in d["numeric"]},
            missing_indicators=tuple(d["missing_indicators"]),
            categorical={c["name"]: tuple(c["vocabulary"]) for c in d["categorical"]},
        )


def merge_summaries(summaries: Sequence[TableSummary], spec: TableSpec) -> PreprocessingSpec:
    """The preprocessing every hospital applies, pooled from all hospitals' summaries."""
    if not summaries:
        raise DataError("no hospital summaries to merge; at least one hospital must report its table")
    categorical_names = {f.name for f in spec.features if f.type == "categorical"}
    numeric_names = {f.name for f in spec.features} - categorical_names
    for s in summaries:
        if set(s.numeric) != numeric_names or set(s.categorical) != categorical_names:
            raise DataError(
                f"hospital {s.hospital}: summary has numeric {sorted(s.numeric)} and categorical "
                f"{sorted(s.categorical)}, expected {sorted(numeric_names)} and {sorted(categorical_names)}"
            )
    numeric, indicators, categorical = {}, [], {}
    for feature in spec.features:
        name = feature.name
        if feature.type == "categorical":
            pooled = sum((Counter(s.categorical[name].counts) for s in summaries), Counter())
            kept = sorted(v for v, n in pooled.items() if n >= spec.min_category_count and v != OTHER)
            categorical[name] = (*kept, OTHER)
        else:
            merged = reduce(NumericSummary.merge, (s.numeric[name] for s in summaries))
            std = math.sqrt(merged.m2 / merged.count) if merged.count else 0.0
            numeric[name] = (merged.mean, std or 1.0)
            if merged.missing:
                indicators.append(name)
    return PreprocessingSpec(numeric, tuple(indicators), categorical)
