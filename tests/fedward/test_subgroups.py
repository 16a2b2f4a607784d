"""Performance per patient group: groups, what may leave a hospital, and the figures and gaps."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from sklearn.metrics import roc_auc_score

from fedward.actors.hospital import Hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward import subgroups
from fedward import pooling
from fedward.pooling import EvaluationKey
from fedward.config import SubgroupConfig, parse_config
from fedward.errors import ConfigError, DataError
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from tests.conftest import ehr_config, image_config


def test_sex_and_age_become_groups_from_table_cells_and_dicom_strings():
    config = SubgroupConfig(sex="sex", age="age", age_bands=(40, 65))
    groups = subgroups.group_labels(
        {
            "sex": np.array(["F", "male", " m ", "W", "O", "", "x"]),
            "age": np.array(["039Y", "40", "064.9", "065Y", "018M", "", "abc"]),
        },
        config,
    )
    assert groups["sex"].tolist() == ["female", "male", "male", "female", "other", "unknown", "unknown"]
    assert groups["age"].tolist() == ["<40", "40–<65", "40–<65", "≥65", "<40", "unknown", "unknown"]


def test_small_groups_stay_home_and_so_do_groups_that_would_reveal_them():
    # The third group is too small; the hidden remainder (3 positives) could be recovered by
    # subtraction, so the next smallest group is held back with it.
    assert subgroups.releasable(np.array([50, 30, 3]), np.array([50, 30, 40]), 10).tolist() == [True, False, False]
    assert subgroups.releasable(np.array([50, 30, 12]), np.array([50, 30, 40]), 10).tolist() == [True, True, True]
    assert subgroups.releasable(np.array([50, 2]), np.array([50, 2]), 10).tolist() == [False, False]
    # A remainder of 15 positives and no negative would tell that all its patients had the outcome.
    release = subgroups.releasable(np.array([40, 40, 15]), np.array([40, 40, 0]), 10)
    assert not release[2] and release.sum() == 1  # one of the two large groups stays with it


def test_groups_are_sized_in_patients_not_images():
    scores = np.linspace(0.01, 0.99, 60)
    labels = np.array([1, 0] * 30)
    # Group "one" holds 20 positive images of 2 patients: too few patients, whatever the image count.
    patients = np.array([f"p{i % 2}" if i < 40 and labels[i] else f"q{i}" for i in range(60)])
    group = np.array(["one" if i < 40 else "two" for i in range(60)], dtype=object)
    released = subgroups.at_hospital("h", scores, labels, patients, {"g": group}, SubgroupConfig(min_count=10))
    assert released.groups["g"] == {} and released.held_back == {"g": True}


def _scores(rng, n, quality):
    labels = rng.random(n) < 0.4
    scores = np.clip(0.5 + quality * (labels - 0.5) + rng.normal(0, 0.25, n), 0.001, 0.999)
    return scores, labels.astype(np.int64)


def test_figures_per_group_match_direct_computation_and_pool_over_hospitals(tmp_path):
    rng = np.random.default_rng(0)
    config = SubgroupConfig(sex="sex", threshold=0.5, min_count=10)
    keys = {h: EvaluationKey(h, "groups", tmp_path / h) for h in ("a", "b")}
    pooling.deal(sorted(keys), pooling.in_process(list(keys.values())))

    def open_at(name, summed):
        return subgroups.pooled_figures(keys[name].open(summed), config.threshold)

    released, truth = {}, {"female": ([], []), "male": ([], [])}
    for h in ("a", "b"):
        fs, fl = _scores(rng, 200, 0.6)  # the model separates women's outcomes well
        ms, ml = _scores(rng, 200, 0.1)  # and men's barely
        scores, labels = np.concatenate([fs, ms]), np.concatenate([fl, ml])
        sex = np.array(["female"] * 200 + ["male"] * 200, dtype=object)
        released[h] = subgroups.at_hospital(h, scores, labels, np.arange(400).astype(str), {"sex": sex}, config, keys[h])
        for g, s, y in (("female", fs, fl), ("male", ms, ml)):
            truth[g][0].append(s), truth[g][1].append(y)
            bins = released[h].groups["sex"][g]  # what the driver reads of the group in the clear
            assert bins.positive.sum() == y.sum() and (bins.positive >= 10).all() and (bins.negative >= 10).all()
    summary = subgroups.summarize(4, released, {}, {"a": "global model", "b": "global model"}, config, open_at)
    for g, (s, y) in truth.items():
        s, y = np.concatenate(s), np.concatenate(y)
        pooled = summary["attributes"]["sex"]["pooled"][g]
        assert pooled["positives"] == y.sum() and pooled["negatives"] == (1 - y).sum()
        assert pooled["sensitivity"] == pytest.approx((s[y == 1] >= 0.5).mean(), abs=1e-12)
        assert pooled["specificity"] == pytest.approx((s[y == 0] < 0.5).mean(), abs=1e-12)
        assert abs(pooled["auroc"] - roc_auc_score(y, s)) < 0.01  # histogram slices of 0.01
    top = summary["gaps"][0]
    assert top["best"] == "female" and top["worst"] == "male" and top["gap"] > 0.2
    assert [g["gap"] for g in summary["gaps"]] == sorted((g["gap"] for g in summary["gaps"]), reverse=True)
    assert {g["scope"] for g in summary["gaps"]} == {"pooled", "a", "b"}
    # A group only one hospital released has its figures there, but no pooled ones: pooled over
    # one hospital, they would be its exact figures.
    released["b"] = subgroups.at_hospital("b", scores, labels, np.arange(400).astype(str), {"sex": np.array(["female"] * 400, dtype=object)}, config, keys["b"])
    summary = subgroups.summarize(4, released, {}, {}, config, open_at)
    assert summary["attributes"]["sex"]["pooled_over"] == {"female": ["a", "b"]}
    assert set(summary["attributes"]["sex"]["hospitals"]["a"]) == {"female", "male"}
    assert {g["scope"] for g in summary["gaps"]} == {"a"}


def test_subgroup_settings_are_checked_at_load(tmp_path):
    for section, match in (
        ({"threshold": 0.505}, r"subgroups.threshold: expected a multiple of 0.01"),
        ({"age_bands": [65, 40]}, r"subgroups.age_bands: expected increasing positive ages"),
        ({"min_count": 0}, r"subgroups.min_count: must be at least 1"),
        ({"age_bands": []}, r"subgroups.age_bands: expected increasing positive ages"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_config({**ehr_config(tmp_path, tmp_path), "subgroups": {"sex": "sex", **section}})


def _table_hospital(demo_data, tmp_path, subgroups_section, name="hospital_a"):
    raw = ehr_config(demo_data, tmp_path)
    raw["subgroups"] = subgroups_section
    config = parse_config(raw)
    hospital = Hospital(name, config, "groups")
    return config, hospital


def test_a_hospital_releases_its_groups_and_names_a_missing_group_column(demo_data, tmp_path):
    config, hospital = _table_hospital(demo_data, tmp_path, {"sex": "sex", "age": "age", "age_bands": [50, 70]})
    hospital.load()
    shape = hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict(), frozenset())
    weights, layout = flatten(build_model(config.model, shape))
    released = hospital.evaluate_subgroups(weights, layout)
    assert set(released.groups) == {"sex", "age"} and set(released.groups["sex"]) == {"female", "male"}
    held_out = len(hospital.holdout_idx)
    for attribute, groups in released.groups.items():
        counted = sum(int(b.positive.sum() + b.negative.sum()) for b in groups.values())
        assert counted <= held_out and (counted == held_out) == (released.held_back[attribute] == 0)
        assert all((b.positive >= 10).all() and (b.negative >= 10).all() for b in groups.values())

    data = tmp_path / "data"
    shutil.copytree(demo_data / "hospital_a", data / "hospital_a", ignore=shutil.ignore_patterns(".fedward"))
    table = pacsv.read_csv(data / "hospital_a" / "ehr.csv")
    pacsv.write_csv(table.drop_columns(["sex"]).append_column("gender", pa.array(table["sex"].to_pylist())), data / "hospital_a" / "ehr.csv")
    raw = ehr_config(data, tmp_path)
    raw["model"]["hidden"] = [8]
    raw["data"]["table"]["features"].pop("sex")
    raw["subgroups"] = {"sex": "sex"}
    config = parse_config(raw)
    hospital = Hospital("hospital_a", config, "groups")
    hospital.load()  # a missing group column costs no sample: the hospital still trains
    shape = hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict(), frozenset())
    weights, layout = flatten(build_model(config.model, shape))
    with pytest.raises(DataError, match=r"hospital_a: ehr.csv: column 'sex' \(subgroups.sex\) is missing"):
        hospital.evaluate_subgroups(weights, layout)


def test_subgroup_settings_do_not_change_the_runs_identity(tmp_path):
    from fedward.config import config_hash

    plain = parse_config(ehr_config(tmp_path, tmp_path))
    assert config_hash(parse_config({**ehr_config(tmp_path, tmp_path), "subgroups": {"sex": "sex"}})) == config_hash(plain)


def test_an_image_hospital_reads_groups_from_the_dicom_header(demo_data, tmp_path):
    raw = image_config(demo_data, tmp_path)
    raw["subgroups"] = {"sex": "PatientSex", "age": "PatientAge", "age_bands": [60]}
    hospital = Hospital("hospital_c", parse_config(raw), "groups")
    hospital.load()
    attributes = hospital.samples.attributes
    assert set(attributes["sex"]) == {"F", "M"} and all(a.endswith("Y") for a in attributes["age"])
    raw["subgroups"]["age"] = "PatientAgeInYears"
    with pytest.raises(ConfigError, match=r"subgroups.age: 'PatientAgeInYears' is not a DICOM keyword"):
        parse_config(raw)
