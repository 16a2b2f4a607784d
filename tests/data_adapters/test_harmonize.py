"""Federated harmonisation against references computed with numpy on the pooled rows."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from fedward.data_adapters.harmonize import (
    CategorySummary,
    PreprocessingSpec,
    merge_summaries,
    summarize,
)
from fedward.config import FeatureSpec, LabelRule, TableSpec
from fedward.errors import DataError

MIN_COUNT = 3
SPEC = TableSpec(
    file="export.parquet",
    features=(
        FeatureSpec(name="age", type="numeric"),
        FeatureSpec(name="ward", type="categorical"),
        FeatureSpec(name="lactate", type="numeric"),
        FeatureSpec(name="smoker", type="boolean"),
    ),
    label=LabelRule(column="died"),
    min_category_count=MIN_COUNT,
)


def hospital_table(rng: np.random.Generator, age_mean: float, wards: dict, missing: float) -> pa.Table:
    ward = [value for value, n in wards.items() for _ in range(n)]  # None: a missing ward
    rows = len(ward)
    return pa.table({
        "age": pa.array(rng.normal(age_mean, 5 + age_mean / 10, rows), mask=rng.random(rows) < missing),
        "ward": pa.array(rng.permutation(np.array(ward, dtype=object)).tolist(), pa.string()),
        "lactate": pa.array(rng.lognormal(0.5, 0.4, rows)),  # never missing anywhere
        "smoker": pa.array(rng.random(rows) < 0.3, mask=rng.random(rows) < missing),
    })


@pytest.fixture
def hospitals() -> dict[str, pa.Table]:
    # "burns" is seen 6 times in all but only twice at each hospital, so it is folded everywhere;
    # "derm" is kept at east (3) and folded at north (2), so it pools to exactly MIN_COUNT.
    rng = np.random.default_rng(7)
    return {
        "north": hospital_table(rng, 40.0, {"icu": 200, "cardio": 175, None: 20, "burns": 2, "derm": 2, "onco": 1}, 0.1),
        "south": hospital_table(rng, 65.0, {"icu": 120, "cardio": 125, "burns": 2, "neuro": 3}, 0.0),
        "east": hospital_table(rng, 80.0, {"icu": 23, None: 2, "burns": 2, "derm": 3}, 0.2),
    }


def non_missing(column: pa.ChunkedArray) -> np.ndarray:
    return column.drop_null().to_numpy().astype(np.float64)


def test_merged_moments_equal_numpy_on_the_pooled_rows(hospitals):
    preprocessing = merge_summaries([summarize(t, SPEC, name) for name, t in hospitals.items()], SPEC)
    pooled = pa.concat_tables(hospitals.values())
    for name in ("age", "lactate", "smoker"):
        values = non_missing(pooled.column(name))
        mean, std = preprocessing.numeric[name]
        assert mean == pytest.approx(values.mean(), rel=1e-12)
        assert std == pytest.approx(values.std(ddof=0), rel=1e-12)
    assert preprocessing.missing_indicators == ("age", "smoker")  # lactate is complete everywhere


def test_vocabulary_pools_what_each_hospital_did_not_fold(hospitals):
    preprocessing = merge_summaries([summarize(t, SPEC, name) for name, t in hospitals.items()], SPEC)
    pooled: Counter[str] = Counter()
    for table in hospitals.values():
        local = Counter(table.column("ward").drop_null().to_pylist())
        pooled.update({value: n for value, n in local.items() if n >= MIN_COUNT})
    expected = tuple(sorted(v for v, n in pooled.items() if n >= MIN_COUNT)) + ("other",)
    assert preprocessing.categorical["ward"] == expected == ("cardio", "derm", "icu", "neuro", "other")


def test_rare_categories_are_reported_as_other():
    table = pa.table({
        "age": [1.0, 2.0, None, 4.0, 5.0, 6.0],
        "ward": ["icu", "icu", "icu", "burns", None, "neuro"],
        "lactate": [1.0] * 6,
        "smoker": [True, False, True, None, False, False],
    })
    summary = summarize(table, SPEC, "north")
    assert summary.categorical["ward"] == CategorySummary(counts={"icu": 3, "other": 2}, missing=1)
    assert summary.rows == 6
    age = summary.numeric["age"]
    present = np.array([1.0, 2.0, 4.0, 5.0, 6.0])
    assert (age.count, age.missing) == (5, 1)
    assert age.mean == pytest.approx(present.mean()) and age.m2 == pytest.approx(((present - present.mean()) ** 2).sum())
    assert summary.numeric["smoker"].mean == pytest.approx(2 / 5)  # booleans are 0/1


def test_summaries_hold_only_small_json_safe_values(hospitals):
    summary = summarize(hospitals["north"], SPEC, "north")
    json.dumps(dataclasses.asdict(summary))
    assert len(pickle.dumps(summary)) < 2000


def small_spec() -> PreprocessingSpec:
    return PreprocessingSpec(
        numeric={"age": (50.0, 10.0), "lactate": (2.0, 1.0), "smoker": (0.25, 0.5)},
        missing_indicators=("age",),
        categorical={"ward": ("cardio", "icu", "other")},
    )


def test_apply_matches_a_hand_computed_matrix():
    table = pa.table({
        "age": [60.0, None, 35.0],
        "ward": ["icu", None, "dermatology"],
        "lactate": [2.0, 4.0, 1.0],
        "smoker": [True, False, None],
    })
    expected = np.array([
        # age, lactate, smoker, age__missing, ward=cardio, ward=icu, ward=other
        [(60 - 50) / 10, 0.0, (1 - 0.25) / 0.5, 0, 0, 1, 0],
        [0.0, 2.0, (0 - 0.25) / 0.5, 1, 0, 0, 0],  # missing age -> the mean; missing ward -> zeros
        [(35 - 50) / 10, -1.0, 0.0, 0, 0, 0, 1],  # unseen ward -> other
    ], dtype=np.float32)
    preprocessing = small_spec()
    matrix = preprocessing.apply(table)
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, expected)
    assert preprocessing.feature_names() == [
        "age", "lactate", "smoker", "age__missing", "ward=cardio", "ward=icu", "ward=other",
    ]


def test_apply_standardises_the_pooled_table(hospitals):
    preprocessing = merge_summaries([summarize(t, SPEC, name) for name, t in hospitals.items()], SPEC)
    matrix = preprocessing.apply(pa.concat_tables(hospitals.values()))
    names = preprocessing.feature_names()
    assert matrix.shape == (680, len(names))
    age = matrix[:, names.index("age")]
    present = matrix[:, names.index("age__missing")] == 0
    assert age[present].mean() == pytest.approx(0.0, abs=1e-5)
    assert age[present].std() == pytest.approx(1.0, rel=1e-5)
    assert np.all(age[~present] == 0.0)


def test_constant_column_is_not_divided_by_zero():
    table = pa.table({"age": [3.0, 3.0, 3.0], "ward": ["icu"] * 3, "lactate": [1.0, 2.0, 3.0], "smoker": [True] * 3})
    preprocessing = merge_summaries([summarize(table, SPEC, "north")], SPEC)
    assert preprocessing.numeric["age"] == (3.0, 1.0)
    assert np.all(preprocessing.apply(table)[:, 0] == 0.0)


def test_round_trip_through_json_keeps_column_order(hospitals):
    preprocessing = merge_summaries([summarize(t, SPEC, name) for name, t in hospitals.items()], SPEC)
    restored = PreprocessingSpec.from_dict(json.loads(json.dumps(preprocessing.to_dict(), sort_keys=True)))
    assert restored == preprocessing
    assert restored.feature_names() == preprocessing.feature_names()
    table = hospitals["east"]
    np.testing.assert_array_equal(restored.apply(table), preprocessing.apply(table))


def test_merge_refuses_summaries_of_another_table(hospitals):
    other = TableSpec(file="x.csv", features=(FeatureSpec(name="age", type="numeric"),), label=LabelRule(column="died"))
    with pytest.raises(DataError, match="hospital north: summary has numeric"):
        merge_summaries([summarize(hospitals["north"], SPEC, "north")], other)
    with pytest.raises(DataError, match="no hospital summaries"):
        merge_summaries([], SPEC)


def test_columns_by_feature_partitions_the_model_input_by_feature(hospitals):
    preprocessing = merge_summaries([summarize(t, SPEC, name) for name, t in hospitals.items()], SPEC)
    names = preprocessing.feature_names()
    columns = preprocessing.columns_by_feature()
    assert set(columns) == {f.name for f in SPEC.features}
    assert sorted(i for indices in columns.values() for i in indices) == list(range(len(names)))
    for feature, indices in columns.items():
        assert [names[i] for i in indices] == [
            n for n in names if n == feature or n == f"{feature}__missing" or n.startswith(f"{feature}=")
        ]
    assert [names[i] for i in columns["age"]] == ["age", "age__missing"]
    assert [names[i] for i in columns["lactate"]] == ["lactate"]


def test_category_codes_are_the_one_hot_columns_apply_sets(hospitals):
    preprocessing = merge_summaries([summarize(t, SPEC, name) for name, t in hospitals.items()], SPEC)
    table = hospitals["north"]  # holds "onco" and "burns", folded into "other", and missing wards
    codes = preprocessing.category_codes(table, "ward")
    vocabulary = preprocessing.categorical["ward"]
    expected = [-1 if v is None else vocabulary.index(v if v in vocabulary else "other") for v in table.column("ward").to_pylist()]
    np.testing.assert_array_equal(codes, expected)
    hot = preprocessing.apply(table)[:, preprocessing.columns_by_feature()["ward"]]
    np.testing.assert_array_equal(np.where(hot.any(axis=1), hot.argmax(axis=1), -1), codes)
