"""The demo generator writes valid, deterministic hospitals whose ground truth matches the files."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sklearn.linear_model import LogisticRegression

from fedward.data_adapters.demo import MAX_BEST_AUROC, MAX_BEST_R2, write_demo_data
from fedward.errors import ConfigError

SMALL = dict(hospitals=3, seed=7, images_per_hospital=(40, 40, 40), rows_per_hospital=(80, 80, 80))
EHR_COLUMNS = [
    "patient_id", "age", "sex", "admission_weekday", "systolic_bp", "heart_rate", "height_cm", "bmi",
    "creatinine", "glucose", "sodium", "diabetes", "hypertension", "smoker", "discharge_status",
]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("small") / "demo"
    return out, write_demo_data(out, **SMALL)


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("default") / "demo"
    return out, write_demo_data(out)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def dicoms(hospital: Path) -> list[Path]:
    return sorted((hospital / "images").rglob("*.dcm"))


def test_same_seed_gives_identical_files_and_another_seed_does_not(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    write_demo_data(again, **SMALL)
    for name in ("hospital_a", "hospital_b", "hospital_c"):
        for table in ("labels.csv", "ehr.csv"):
            assert (out / name / table).read_bytes() == (again / name / table).read_bytes()
        files = [p.relative_to(out) for p in dicoms(out / name)]
        assert files == [p.relative_to(again) for p in dicoms(again / name)]
        for rel in files:
            first, second = pydicom.dcmread(out / rel), pydicom.dcmread(again / rel)
            assert first.SOPInstanceUID == second.SOPInstanceUID
            np.testing.assert_array_equal(first.pixel_array, second.pixel_array)
    assert (out / "truth.json").read_bytes() == (again / "truth.json").read_bytes()

    other = tmp_path / "other"
    write_demo_data(other, **{**SMALL, "seed": 8})
    assert (other / "hospital_a" / "labels.csv").read_bytes() != (out / "hospital_a" / "labels.csv").read_bytes()
    assert (other / "hospital_a" / "ehr.csv").read_bytes() != (out / "hospital_a" / "ehr.csv").read_bytes()


def test_every_dicom_is_a_valid_file_with_the_sites_scanner_tags(small):
    out, _ = small
    sites = {}
    for name in ("hospital_a", "hospital_b", "hospital_c"):
        seen = set()
        for path in dicoms(out / name):
            ds = pydicom.dcmread(path)  # no force=True: the preamble and file meta must be right
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            pixels = ds.pixel_array
            assert pixels.shape == (ds.Rows, ds.Columns) and ds.Rows == ds.Columns
            assert pixels.max() < 2**ds.BitsStored and pixels.std() > 0
            assert "RescaleSlope" in ds and "RescaleIntercept" in ds
            seen.add((
                ds.Modality, ds.Rows, ds.Manufacturer, ds.BitsStored, float(ds.RescaleSlope),
                float(ds.RescaleIntercept), ds.PhotometricInterpretation, float(ds.PixelSpacing[0]),
                "WindowCenter" in ds and "WindowWidth" in ds,
            ))
        assert len(seen) == 1, f"{name}: one scanner per site, got {seen}"
        sites[name] = seen.pop()

    modality, size, manufacturer, bits, slope, intercept, photometric, spacing, windowed = zip(*sites.values())
    assert sorted(size) == [64, 96, 128]
    assert len(set(manufacturer)) == 3 and len(set(spacing)) == 3
    assert set(bits) == {12, 16}
    assert (1.0, -1024.0) in zip(slope, intercept) and (0.5, -1000.0) in zip(slope, intercept)
    assert photometric.count("MONOCHROME1") == 1
    cr = photometric.index("MONOCHROME1")
    assert modality[cr] == "CR" and windowed[cr] and sum(windowed) == 1


def test_labels_name_every_file_and_patients_have_one_to_three_images(small):
    out, truth = small
    for name in truth["hospitals"]:
        rows = read_rows(out / name / "labels.csv")
        assert list(rows[0]) == ["SOPInstanceUID", "PatientID", "finding", "grade"]
        by_uid = {r["SOPInstanceUID"]: r for r in rows}
        files = {}
        for path in dicoms(out / name):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            files[ds.SOPInstanceUID] = ds.PatientID
        assert set(by_uid) == set(files) and len(rows) == len(files) == 40
        assert all(by_uid[uid]["PatientID"] == patient for uid, patient in files.items())
        assert {r["finding"] for r in rows} <= {"normal", "benign", "nodule", "mass"}
        assert {r["grade"] for r in rows} <= {"none", "mild", "severe"}

        images_per_patient = Counter(files.values())
        assert set(images_per_patient.values()) <= {1, 2, 3}
        assert sum(1 for k in images_per_patient.values() if k > 1) >= 5


def test_truth_matches_the_files(small):
    out, truth = small
    assert json.loads((out / "truth.json").read_text()) == truth
    assert truth["seed"] == 7 and truth["hospitals"] == ["hospital_a", "hospital_b", "hospital_c"]
    for name in truth["hospitals"]:
        for part, table, column, positive in [
            ("images", "labels.csv", "finding", ["nodule", "mass"]),
            ("ehr", "ehr.csv", "discharge_status", ["icu", "died"]),
        ]:
            values = [r[column] for r in read_rows(out / name / table)]
            labels = [v in positive for v in values]
            assert truth[part]["n"][name] == len(labels)
            assert truth[part]["prevalence"][name] == pytest.approx(np.mean(labels), abs=1e-4)
            rule = truth[part]["label"]
            assert rule["column"] == column and rule["positive_values"] == positive
            # The rule says which values are negative, and every value written is one or the other.
            assert set(values) <= set(positive) | set(rule["negative_values"]) and not set(positive) & set(rule["negative_values"])
    assert truth["images"]["n"]["pooled"] == 120 and truth["ehr"]["n"]["pooled"] == 240
    assert set(truth["ehr"]["driving_features"]) <= set(EHR_COLUMNS)
    assert set(truth["ehr"]["noise_features"]) <= set(EHR_COLUMNS)


def test_default_data_is_learnable_but_not_trivial(default):
    out, truth = default
    assert truth["images"]["n"] == {"hospital_a": 360, "hospital_b": 120, "hospital_c": 420, "pooled": 900}
    for part in ("images", "ehr"):
        for name, best in truth[part]["best_auroc"].items():
            assert 0.75 < best <= 0.92, (part, name, best)
        prevalence = [truth[part]["prevalence"][name] for name in truth["hospitals"]]
        assert max(prevalence) - min(prevalence) > 0.08, f"{part}: sites should differ in prevalence"
        assert all(0.15 < p < 0.55 for p in prevalence)


def test_ehr_is_a_realistic_export(small):
    out, truth = small
    missing = Counter()
    for name in truth["hospitals"]:
        rows = read_rows(out / name / "ehr.csv")
        assert list(rows[0]) == EHR_COLUMNS
        ids = [r["patient_id"] for r in rows]
        assert len(set(ids)) == len(ids) and all(i.startswith(name[-1].upper() + "-") for i in ids)
        assert {r["diabetes"] for r in rows} == {"TRUE", "FALSE"}
        assert {r["hypertension"] for r in rows} == {"TRUE", "FALSE"}
        assert {r["sex"] for r in rows} == {"F", "M"}
        assert {r["smoker"] for r in rows} <= {"never", "former", "current"}
        assert {r["admission_weekday"] for r in rows} <= {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}
        assert {r["discharge_status"] for r in rows} <= {"home", "transferred", "icu", "died"}
        for column in EHR_COLUMNS:
            missing[column] += sum(r[column] == "" for r in rows)
    assert missing["creatinine"] > 0 and missing["glucose"] > 0
    assert missing["patient_id"] == missing["age"] == missing["discharge_status"] == 0

    # What an ordinary CSV reader makes of it: booleans, and nulls for the empty cells.
    table = pa.concat_tables([pacsv.read_csv(out / name / "ehr.csv") for name in truth["hospitals"]])
    assert table.schema.field("diabetes").type == pa.bool_()
    assert table.schema.field("creatinine").type == pa.float64()
    assert table.column("creatinine").null_count == missing["creatinine"]


def test_ehr_noise_columns_are_independent_of_the_outcome_and_drivers_are_not(default):
    out, truth = default
    table = pa.concat_tables([pacsv.read_csv(out / name / "ehr.csv") for name in truth["hospitals"]])
    y = pc.is_in(table.column("discharge_status"), value_set=pa.array(["icu", "died"]))
    y = y.to_numpy(zero_copy_only=False)

    def corr(x: np.ndarray) -> float:
        x = np.asarray(x, dtype=float)
        keep = ~np.isnan(x)
        return abs(np.corrcoef(x[keep], y[keep])[0, 1])

    def numbers(column: str) -> np.ndarray:
        return table.column(column).cast(pa.float64()).fill_null(float("nan")).to_numpy()

    weekday = table.column("admission_weekday").to_numpy(zero_copy_only=False)
    assert corr(numbers("height_cm")) < 0.08
    assert corr(numbers("sodium")) < 0.08
    assert max(corr(weekday == day) for day in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")) < 0.08
    # The same measure does see the drivers, so the checks above are able to fail.
    assert corr(numbers("age")) > 0.15
    assert corr(numbers("creatinine")) > 0.15


def test_a_renal_unit_reverses_what_creatinine_says_and_only_there(tmp_path):
    counts = dict(images_per_hospital=(20, 20), rows_per_hospital=(1500, 1500))
    plain = write_demo_data(tmp_path / "plain", hospitals=2, **counts)
    truth = write_demo_data(tmp_path / "renal", hospitals=2, renal_units=["hospital_b"], **counts)
    assert (plain["ehr"]["renal_units"], truth["ehr"]["renal_units"]) == ([], ["hospital_b"])

    def creatinine_effect(name: str) -> tuple[float, float]:
        """Median creatinine, and its coefficient in a logistic model that also sees age and diabetes."""
        table = pacsv.read_csv(tmp_path / "renal" / name / "ehr.csv").filter(pc.is_valid(pc.field("creatinine")))
        y = pc.is_in(table.column("discharge_status"), value_set=pa.array(["icu", "died"])).to_numpy(zero_copy_only=False)
        creatinine = table.column("creatinine").to_numpy()
        x = np.column_stack([np.log(creatinine), table.column("age").to_numpy(), table.column("diabetes").to_numpy(zero_copy_only=False)])
        fitted = LogisticRegression(max_iter=1000).fit((x - x.mean(0)) / x.std(0), y)
        return float(np.median(creatinine)), float(fitted.coef_[0][0])

    usual, usual_effect = creatinine_effect("hospital_a")
    dialysis, dialysis_effect = creatinine_effect("hospital_b")
    assert dialysis > 2 * usual
    assert usual_effect > 0.3 and dialysis_effect < -0.1
    # The other site and every image are as without a renal unit.
    assert (tmp_path / "plain/hospital_a/ehr.csv").read_bytes() == (tmp_path / "renal/hospital_a/ehr.csv").read_bytes()
    assert (tmp_path / "plain/hospital_b/labels.csv").read_bytes() == (tmp_path / "renal/hospital_b/labels.csv").read_bytes()


def test_many_tiny_hospitals_are_written_though_some_site_is_always_too_easy_by_chance(tmp_path):
    # With 20 rows a site, one of 26 sites nearly always lets a perfect model beat the ceiling: the
    # labels are redrawn a bounded number of times, then only the pooled ceiling holds.
    truth = write_demo_data(tmp_path / "many", hospitals=26, images_per_hospital=[20] * 26, rows_per_hospital=[20] * 26)
    assert len(truth["hospitals"]) == 26 and truth["ehr"]["best_auroc"]["pooled"] <= 0.92
    assert truth["images"]["best_auroc"]["pooled"] <= 0.92


def test_more_than_three_hospitals_reuse_the_site_profiles(tmp_path):
    counts = dict(images_per_hospital=[20] * 4, rows_per_hospital=[20] * 4)
    truth = write_demo_data(tmp_path / "four", hospitals=4, **counts)
    assert truth["hospitals"] == ["hospital_a", "hospital_b", "hospital_c", "hospital_d"]
    first = pydicom.dcmread(dicoms(tmp_path / "four" / "hospital_d")[0])
    assert (first.Modality, first.Rows) == ("CT", 128)
    assert truth["ehr"]["n"]["hospital_d"] == 20


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (dict(hospitals=0), "hospitals"),
        (dict(hospitals=27), "hospitals"),
        (dict(hospitals=2.5), "hospitals"),
        (dict(seed=-1), "seed"),
        (dict(hospitals=2, images_per_hospital=(40, 40, 40)), "images_per_hospital"),
        (dict(hospitals=2, images_per_hospital=(40, 19)), "images_per_hospital"),
        (dict(hospitals=2, rows_per_hospital=(80,)), "rows_per_hospital"),
        (dict(hospitals=2, rows_per_hospital=(80, 10)), "rows_per_hospital"),
        (dict(hospitals=2, renal_units=["hospital_c"]), "renal_units"),
        (dict(hospitals=2, renal_units="hospital_b"), "renal_units"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_argument(tmp_path, arguments, named):
    with pytest.raises(ConfigError, match=f"^{named}:"):
        write_demo_data(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_refuses_to_write_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(ConfigError, match="^out:"):
        write_demo_data(tmp_path, hospitals=1, images_per_hospital=[20], rows_per_hospital=[20])
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_graded_finding_and_the_length_of_stay_are_learnable_but_not_trivial(default):
    out, truth = default
    grade, stay = truth["images"]["grade"], truth["ehr"]["stay"]
    assert all(0.75 <= v <= MAX_BEST_AUROC for v in grade["best_macro_auroc"].values()), grade
    assert all(0.5 <= v <= MAX_BEST_R2 for v in stay["best_r2"].values()), stay
    assert all(0.15 <= share <= 0.6 for share in grade["shares"].values())
    # The stay's export holds the EHR export's patients and columns, only its outcome differs.
    ehr, days = read_rows(out / "hospital_a" / "ehr.csv"), read_rows(out / "hospital_a" / "stay.csv")
    assert [r["patient_id"] for r in ehr] == [r["patient_id"] for r in days]
    assert all({k: v for k, v in a.items() if k != "discharge_status"} == {k: v for k, v in b.items() if k != "length_of_stay"} for a, b in zip(ehr, days))
    values = np.array([float(r["length_of_stay"]) for r in days])
    assert values.min() >= 0.5 and 3 < np.median(values) < 8
    # Sicker patients stay longer: the stay follows the same signal as the binary outcome.
    died = np.array([r["discharge_status"] in ("icu", "died") for r in ehr])
    assert values[died].mean() > values[~died].mean() + 1
