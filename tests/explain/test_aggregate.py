"""Hospital aggregates and the consortium merge, against numpy references on real SHAP values."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import norm

from fedward.actors.hospital import Hospital
from fedward.data_adapters.demo import write_demo_data
from fedward.data_adapters.harmonize import PreprocessingSpec, merge_summaries, summarize
from fedward.explain.aggregate import bin_edges, explain_images, explain_table, grouped_by_feature, merge, patient_contributions
from fedward.explain.attribution import Attributions, deep_shap
from fedward.explain.summary import consortium_from_json, summary_from_json, to_jsonable
from fedward.config import ExplainConfig, FeatureSpec, LabelRule, ModelConfig, TableSpec, TrainConfig, parse_config
from fedward.errors import AggregationError, ConfigError
from fedward.models.networks import build_model
from fedward.models.training import train
from tests.conftest import HOSPITALS, ehr_config

SPEC = TableSpec(
    file="export.csv",
    features=(
        FeatureSpec(name="age", type="numeric"),
        FeatureSpec(name="ward", type="categorical"),
        FeatureSpec(name="smoker", type="boolean"),
        FeatureSpec(name="lactate", type="numeric"),
    ),
    label=LabelRule(column="died"),
    min_category_count=5,
)
SITES = {"north": slice(0, 200), "south": slice(200, 320), "east": slice(320, 400)}


def table(rng: np.random.Generator, n: int = 400) -> pa.Table:
    age = rng.normal(65, 12, n).round()
    wards = rng.choice(["cardio", "icu", "surgery"], n, p=[0.5, 0.3, 0.2]).astype(object)
    wards[[5, 50, 250]] = "rare"  # seen fewer than min_category_count times: "other"
    wards[rng.random(n) < 0.04] = None
    smoker = rng.random(n) < 0.3
    return pa.table({
        "age": pa.array(age, mask=rng.random(n) < 0.06),
        "ward": pa.array(wards, pa.string()),
        "smoker": pa.array(smoker, mask=np.isin(np.arange(n), [3, 90, 180, 300, 333, 399])),  # 6 missing
        "lactate": pa.array(rng.lognormal(0.5, 0.4, n)),
    })


@dataclasses.dataclass
class Case:
    raw: pa.Table
    preprocessing: PreprocessingSpec
    model: torch.nn.Module
    x: torch.Tensor


@pytest.fixture(scope="module")
def case() -> Case:
    raw = table(np.random.default_rng(0))
    preprocessing = merge_summaries([summarize(raw[rows], SPEC, site) for site, rows in SITES.items()], SPEC)
    x = torch.from_numpy(preprocessing.apply(raw))
    names = preprocessing.feature_names()
    y = ((x[:, names.index("age")] + x[:, names.index("lactate")] + 2 * x[:, names.index("ward=icu")]) > 0.5).float()
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=(16, 8)), (x.shape[1],))
    train(model, x, y, epochs=5, lr=0.05, seed=0, config=TrainConfig(batch_size=32))
    return Case(raw, preprocessing, model, x)


@pytest.fixture(scope="module")
def attr(case) -> Attributions:
    return deep_shap(case.model, case.x[:60], case.x)


def grouped_reference(values: np.ndarray, names: list[str], feature: str) -> np.ndarray:
    mine = [i for i, n in enumerate(names) if n == feature or n.startswith((f"{feature}__missing", f"{feature}="))]
    return values[:, mine].sum(axis=1)


def floats(raw: pa.Table, name: str) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in raw.column(name).to_pylist()])


def settings(**changes) -> ExplainConfig:
    return ExplainConfig(**{"bins": 5, "min_bin_count": 10, **changes})


def explained(case: Case, attr: Attributions, config: ExplainConfig, seed: int = 0, raw: pa.Table | None = None):
    raw = case.raw if raw is None else raw
    return explain_table(attr, raw, case.preprocessing, SPEC, config, patients=np.arange(raw.num_rows), hospital="north", round=3,
                         seconds=1.5, rng=np.random.default_rng(seed))


def by_name(summary) -> dict:
    return {f.name: f for f in summary.features}


# -- grouping ---------------------------------------------------------------------------------------


def test_grouping_sums_each_features_columns_and_keeps_row_sums(case, attr):
    grouped = grouped_by_feature(attr, case.preprocessing, SPEC)
    names = case.preprocessing.feature_names()
    assert grouped.shape == (400, 4)
    np.testing.assert_allclose(grouped.sum(axis=1), attr.values.sum(axis=1), atol=1e-9)
    for j, feature in enumerate(SPEC.features):
        np.testing.assert_allclose(grouped[:, j], grouped_reference(attr.values, names, feature.name), atol=1e-12)
    ward = [i for i, n in enumerate(names) if n.startswith("ward=")]
    assert len(ward) == 4  # cardio, icu, surgery, other
    np.testing.assert_allclose(grouped[:, 1], attr.values[:, ward].sum(axis=1))


# -- bins ------------------------------------------------------------------------------------------


def test_numeric_edges_are_quantiles_of_the_pooled_normal(case):
    age = floats(case.raw, "age")
    reference = norm.ppf(np.arange(1, 5) / 5, loc=np.nanmean(age), scale=np.nanstd(age))
    np.testing.assert_allclose(bin_edges(case.preprocessing, "age", 5), reference, rtol=1e-9)


def test_numeric_bins_match_numpy(case, attr):
    grouped = grouped_by_feature(attr, case.preprocessing, SPEC)
    age = floats(case.raw, "age")
    edges = norm.ppf(np.arange(1, 5) / 5, loc=np.nanmean(age), scale=np.nanstd(age))
    feature = by_name(explained(case, attr, settings(min_bin_count=1)))["age"]
    present = ~np.isnan(age)
    which = np.digitize(age[present], edges)
    expected = [(int((which == k).sum()), grouped[present, 0][which == k].mean()) for k in range(5)]
    expected.append((int((~present).sum()), grouped[~present, 0].mean()))
    assert [(b.count, b.mean_shap) for b in feature.bins] == [(n, pytest.approx(m, abs=1e-12)) for n, m in expected]
    assert feature.bins[0].label.startswith("< ") and feature.bins[0].low is None
    assert feature.bins[-2].label.startswith("≥ ") and feature.bins[-2].high is None
    assert feature.bins[1].low == pytest.approx(edges[0]) and feature.bins[1].high == pytest.approx(edges[1])
    assert feature.bins[-1].label == "missing"
    assert feature.mean_abs_shap == pytest.approx(np.abs(grouped[:, 0]).mean())
    assert feature.mean_shap == pytest.approx(grouped[:, 0].mean())


def test_categories_follow_the_agreed_vocabulary(case, attr):
    grouped = grouped_by_feature(attr, case.preprocessing, SPEC)
    vocabulary = ("cardio", "icu", "surgery", "other")
    assert case.preprocessing.categorical["ward"] == vocabulary
    labels = np.array(["missing" if v is None else v if v in vocabulary else "other" for v in case.raw.column("ward").to_pylist()])
    feature = by_name(explained(case, attr, settings(min_bin_count=1)))["ward"]
    assert [b.label for b in feature.bins] == [*vocabulary, "missing"]
    for b in feature.bins:
        assert b.count == (labels == b.label).sum()
        assert b.mean_shap == pytest.approx(grouped[labels == b.label, 1].mean(), abs=1e-12)


def test_booleans_get_a_false_and_a_true_bin(case, attr):
    feature = by_name(explained(case, attr, settings(min_bin_count=1)))["smoker"]
    smoker = floats(case.raw, "smoker")
    assert [(b.label, b.count) for b in feature.bins] == [
        ("false", (smoker == 0).sum()), ("true", (smoker == 1).sum()), ("missing", 6)
    ]


def test_small_bins_are_suppressed_and_counted(case, attr):
    summary = explained(case, attr, settings(min_bin_count=10))
    assert summary.n == 400
    for feature in summary.features:
        loose = by_name(explained(case, attr, settings(min_bin_count=1)))[feature.name]
        small = {b.label for b in loose.bins if b.count < 10}
        assert not small & {b.label for b in feature.bins}
        assert all(b.count >= 10 for b in feature.bins)
        hidden = [b for b in loose.bins if b.label not in {x.label for x in feature.bins}]
        assert feature.suppressed_bins == len(hidden)
        # n and the overall mean are released, so the hidden bins' total can be had by subtraction:
        # it must never describe fewer than 10 patients.
        recovered_count = summary.n - sum(b.count for b in feature.bins)
        recovered_sum = summary.n * feature.mean_shap - sum(b.count * b.mean_shap for b in feature.bins)
        assert recovered_count == sum(b.count for b in hidden)
        assert recovered_count == 0 or recovered_count >= 10
        assert recovered_sum == pytest.approx(sum(b.count * b.mean_shap for b in hidden), abs=1e-9)
    smoker = by_name(summary)["smoker"]
    # 6 missing values are too few alone, so the smaller of false/true is hidden with them.
    assert len(smoker.bins) == 1 and smoker.suppressed_bins == 2


def test_a_bin_counts_patients_so_one_patients_visits_never_fill_it(case, attr):
    smoker = np.array(case.raw.column("smoker").to_pylist(), dtype=object)
    assert "false" in {b.label for b in by_name(explained(case, attr, settings()))["smoker"].bins}
    # The same rows, but every non-smoker's row belongs to one of nine patients who came back again and again.
    patients = np.arange(case.raw.num_rows)
    regulars = np.flatnonzero(smoker == False)  # noqa: E712 - the column's own values
    patients[regulars] = -1 - regulars % 9
    visits = explain_table(attr, case.raw, case.preprocessing, SPEC, settings(), patients=patients, hospital="north", round=3,
                           seconds=1.5, rng=np.random.default_rng(0))
    assert len(regulars) > 100 and "false" not in {b.label for b in by_name(visits)["smoker"].bins}


def test_noise_changes_released_means_only_when_asked(case, attr):
    exact = explained(case, attr, settings())
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    unchanged = explain_table(attr, case.raw, case.preprocessing, SPEC, settings(noise_sigma=0.0), patients=np.arange(case.raw.num_rows),
                              hospital="north", round=3, seconds=1.5, rng=rng)
    assert unchanged == exact and rng.bit_generator.state == state
    noisy = explained(case, attr, settings(noise_sigma=0.5), seed=7)
    assert noisy == explained(case, attr, settings(noise_sigma=0.5), seed=7)  # the seed decides the noise
    assert noisy.noise_sigma == 0.5 and noisy.base_value != exact.base_value
    for a, b in zip(exact.features, noisy.features):
        assert a.mean_shap != b.mean_shap and b.mean_abs_shap >= 0.0
        assert [x.count for x in a.bins] == [x.count for x in b.bins]
        assert all(x.mean_shap != y.mean_shap for x, y in zip(a.bins, b.bins))


def test_summary_checks_additivity_and_survives_json(case, attr):
    summary = explained(case, attr, settings())
    assert summary.checks == {"additivity": True}
    assert attr.additivity_error <= summary.additivity_error < 10 * attr.additivity_error  # rounded up to a power of ten
    assert (summary.hospital, summary.round, summary.seconds, summary.image_map) == ("north", 3, 1.5, None)
    assert summary_from_json(json.loads(json.dumps(to_jsonable(summary), allow_nan=False))) == summary
    broken = dataclasses.replace(attr, additivity_error=0.01)
    assert explained(case, broken, settings()).checks == {"additivity": False}


def test_patient_contributions_read_like_the_record(case, attr):
    grouped = grouped_by_feature(attr, case.preprocessing, SPEC)
    row = 3  # smoker missing there
    raw_row = {name: case.raw.column(name)[row].as_py() for name in case.raw.column_names}
    contributions = patient_contributions(grouped[row], raw_row, SPEC.features, attr.base_value)
    shown = {name: text for name, text, _ in contributions}
    assert shown["smoker"] == "missing"
    assert shown["age"] == ("missing" if raw_row["age"] is None else f"{raw_row['age']:g}")
    assert shown["ward"] == (raw_row["ward"] or "missing")
    values = [v for _, _, v in contributions]
    assert values == sorted(values, key=abs, reverse=True)
    assert sum(values) == pytest.approx(attr.outputs[row] - attr.base_value, abs=1e-3)
    text = {name: text for name, text, _ in patient_contributions(grouped[0], {"age": 72.0, "ward": "icu", "smoker": True, "lactate": 1.25}, SPEC.features, 0.0)}
    assert text == {"age": "72", "ward": "icu", "smoker": "true", "lactate": "1.25"}


# -- images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_attr() -> Attributions:
    x = torch.from_numpy(np.random.default_rng(4).random((40, 1, 16, 16), dtype=np.float32))
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="cnn", channels=(4, 8)), (1, 16, 16))
    return deep_shap(model, x[:10], x[10:22])


def test_image_map_is_the_pooled_mean_absolute_attribution(image_attr):
    one_each = np.arange(len(image_attr.values))
    summary = explain_images(image_attr, settings(image_grid=4), patients=one_each, hospital="north", round=1, seconds=2.0,
                             rng=np.random.default_rng(0))
    per_pixel = np.abs(image_attr.values[:, 0]).mean(axis=0)
    reference = per_pixel.reshape(4, 4, 4, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(summary.image_map, reference, rtol=1e-6)
    assert summary.features == () and summary.n == 12 and summary.checks == {"additivity": True}
    few = explain_images(image_attr, settings(min_bin_count=13), patients=one_each, hospital="north", round=1, seconds=2.0,
                         rng=np.random.default_rng(0))
    assert few.image_map is None
    # Twelve images of six patients are six patients: below a floor of ten, however many images.
    pairs = explain_images(image_attr, settings(min_bin_count=10), patients=one_each // 2, hospital="north", round=1, seconds=2.0,
                           rng=np.random.default_rng(0))
    assert pairs.image_map is None
    noisy = explain_images(image_attr, settings(image_grid=4, noise_sigma=0.1), patients=one_each, hospital="north", round=1,
                           seconds=2.0, rng=np.random.default_rng(0))
    assert not np.allclose(noisy.image_map, reference) and (noisy.image_map >= 0).all()


# -- merge -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sites(case):
    """Each site explained against a background from its own rows: (summary, grouped SHAP, raw rows)."""
    out = {}
    for site, rows in SITES.items():
        x = case.x[rows]
        attr = deep_shap(case.model, x[:30], x)
        raw = case.raw[rows]
        summary = explain_table(attr, raw, case.preprocessing, SPEC, settings(min_bin_count=1), patients=np.arange(raw.num_rows),
                                hospital=site, round=4, seconds=1.0, rng=np.random.default_rng(0))
        out[site] = (summary, grouped_by_feature(attr, case.preprocessing, SPEC), raw)
    return out


def test_merge_weights_hospitals_by_their_samples(sites):
    merged = merge([s for s, _, _ in sites.values()])
    pooled = np.concatenate([g for _, g, _ in sites.values()])
    names = [f.name for f in SPEC.features]
    reference = dict(zip(names, np.abs(pooled).mean(axis=0)))
    assert merged.global_importance == pytest.approx(reference, rel=1e-9)
    assert list(merged.features) == sorted(names, key=lambda n: -reference[n])
    assert merged.hospitals == ("north", "south", "east") and merged.round == 4
    for site, (_, grouped, _) in sites.items():
        assert merged.hospital_importance[site] == pytest.approx(dict(zip(names, np.abs(grouped).mean(axis=0))))
        assert sum(merged.drift[site].values()) == pytest.approx(0.0, abs=1e-12)
        share = np.abs(grouped).mean(axis=0) / np.abs(grouped).mean(axis=0).sum()
        expected = share - np.array([reference[n] for n in names]) / sum(reference.values())
        assert [merged.drift[site][n] for n in names] == pytest.approx(expected.tolist())
    assert merged.checks == {"additivity": True}
    assert merged.additivity_error == max(s.additivity_error for s, _, _ in sites.values())
    assert consortium_from_json(json.loads(json.dumps(to_jsonable(merged), allow_nan=False))) == merged


def test_merged_bins_are_count_weighted(sites):
    merged = merge([s for s, _, _ in sites.values()])
    grouped = np.concatenate([g for _, g, _ in sites.values()])
    wards = [v for _, _, raw in sites.values() for v in raw.column("ward").to_pylist()]
    labels = np.array(["missing" if v is None else v if v != "rare" else "other" for v in wards])
    assert [b.label for b in merged.bins["ward"]] == ["cardio", "icu", "surgery", "other", "missing"]
    for b in merged.bins["ward"]:
        assert b.count == (labels == b.label).sum()
        assert b.mean_shap == pytest.approx(grouped[labels == b.label, 1].mean(), abs=1e-12)
    age = merged.bins["age"]
    assert [b.low for b in age[1:-1]] == sorted(b.low for b in age[1:-1]) and age[-1].label == "missing"
    assert sum(b.count for b in age) == 400


def test_merge_checks_the_demo_truth(sites):
    summaries = [s for s, _, _ in sites.values()]
    ranked = merge(summaries).features
    right = {"driving_features": list(ranked[:2]), "noise_features": list(ranked[2:])}
    assert merge(summaries, right).checks == {"additivity": True, "driving_above_noise": True}
    wrong = {"driving_features": list(ranked[1:]), "noise_features": list(ranked[:1])}
    assert merge(summaries, wrong).checks["driving_above_noise"] is False
    with pytest.raises(ConfigError, match=r"\['height_cm'\]"):
        merge(summaries, {"driving_features": ["age"], "noise_features": ["height_cm"]})


def test_merge_refuses_what_does_not_line_up(sites):
    north, south, _ = (s for s, _, _ in sites.values())
    with pytest.raises(AggregationError, match="no explanation summaries"):
        merge([])
    with pytest.raises(AggregationError, match="south explained round 5, north round 4"):
        merge([north, dataclasses.replace(south, round=5)])
    with pytest.raises(AggregationError, match="south explained features"):
        merge([north, dataclasses.replace(south, features=south.features[:2])])
    with pytest.raises(AggregationError, match="repeat a hospital"):
        merge([north, north])


def test_merged_image_map_is_sample_weighted(image_attr):
    summaries = [
        explain_images(dataclasses.replace(image_attr, values=image_attr.values[rows]), settings(image_grid=4, min_bin_count=2),
                       patients=np.arange(12)[rows], hospital=name, round=1, seconds=1.0, rng=np.random.default_rng(0))
        for name, rows in (("north", slice(0, 8)), ("south", slice(8, 12)))
    ]
    merged = merge(summaries)
    reference = np.abs(image_attr.values[:, 0]).mean(axis=0).reshape(4, 4, 4, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(merged.image_map, reference, rtol=1e-6)
    assert merged.features == () and merged.global_importance == {} and merged.bins == {}


# -- the demo's EHR ----------------------------------------------------------------------------------


def test_on_demo_data_driving_features_outrank_noise(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_demo")
    # Few images: the EHR cohort is drawn from its own generators, and DICOMs take seconds to write.
    truth = write_demo_data(root / "demo", hospitals=3, seed=0, images_per_hospital=(20, 20, 20))
    config = parse_config(ehr_config(root / "demo", root / "runs"))
    hospitals = [Hospital(name, config, "explain-test") for name in HOSPITALS]
    for h in hospitals:
        h.load()
    preprocessing = merge_summaries([h.summarize() for h in hospitals], config.data.table)
    for h in hospitals:
        h.prepare(preprocessing.to_dict())
    model = hospitals[0].model
    x = torch.cat([h.x[h.train_idx] for h in hospitals])
    y = torch.cat([h.y[h.train_idx] for h in hospitals])
    train(model, x, y, epochs=5, lr=0.05, seed=0, config=config.train)
    rng = np.random.default_rng(0)
    summaries = []
    for h in hospitals:
        background = h.x[np.sort(rng.choice(h.train_idx, config.explain.background, replace=False))]
        attr = deep_shap(model, background, h.x[h.holdout_idx])
        raw = h.samples.features.take(h.holdout_idx)
        summaries.append(explain_table(attr, raw, h.preprocessing, config.data.table, config.explain,
                                       patients=h.samples.patient_ids[h.holdout_idx], hospital=h.name, round=1, seconds=0.0, rng=rng))
    merged = merge(summaries, truth["ehr"])
    importance = merged.global_importance
    assert min(importance[f] for f in truth["ehr"]["driving_features"]) > max(importance[f] for f in truth["ehr"]["noise_features"])
    assert merged.checks == {"additivity": True, "driving_above_noise": True}
    assert set(merged.features) == {f.name for f in config.data.table.features}


def test_the_base_value_is_the_mean_output_over_held_out_patients_never_training_ones(tmp_path_factory):
    from fedward.errors import HospitalError
    from fedward.explain.local import explain_at_hospital

    root = tmp_path_factory.mktemp("base_value")
    write_demo_data(root / "demo", hospitals=1, seed=0, images_per_hospital=(20,))
    raw = ehr_config(root / "demo", root / "runs")
    raw["hospitals"] = raw["hospitals"][:1]
    raw["run"]["min_hospitals"] = 1
    config = parse_config({**raw, "explain": {"enabled": True, "background": 10_000, "max_samples": 50}})
    hospital = Hospital(HOSPITALS[0], config, "base-value")
    hospital.load()
    hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict())
    summary = explain_at_hospital(hospital, hospital.model, round=1, seed=0).summary
    with torch.no_grad():
        held_out = hospital.model.eval()(hospital.x[hospital.holdout_idx]).squeeze(1).double().mean().item()
    assert summary.base_value == pytest.approx(held_out, abs=1e-5)  # every held-out sample is in the background
    hospital.config = parse_config({**raw, "explain": {"enabled": True, "min_bin_count": len(hospital.holdout_idx) + 1}})
    with pytest.raises(HospitalError, match=r"held-out patients, fewer than explain.min_bin_count"):
        explain_at_hospital(hospital, hospital.model, round=1, seed=0)
