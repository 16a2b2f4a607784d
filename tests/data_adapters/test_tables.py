"""load_table on real Parquet, CSV and Arrow files written to tmp_path."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from fedward.data_adapters.report import DataReport
from fedward.data_adapters.tables import load_table
from fedward.config import FeatureSpec, LabelRule, TableSpec
from fedward.errors import DataError

FEATURES = (
    FeatureSpec(name="age", type="numeric"),
    FeatureSpec(name="ward", type="categorical"),
    FeatureSpec(name="smoker", type="boolean"),
)


def spec(file: str, label: LabelRule | None = None, patient_id: str | None = "pid", features=FEATURES) -> TableSpec:
    return TableSpec(file=file, features=features, label=label or LabelRule(column="died"), patient_id=patient_id)


def typed_table() -> pa.Table:
    return pa.table({
        "pid": pa.array([101, 102, 103, 104], pa.int64()),
        "age": pa.array([70, None, 55, 61], pa.int32()),
        "ward": pa.array(["icu", "cardio", None, "icu"]),
        "smoker": pa.array([True, False, None, True]),
        "died": pa.array([1, 0, 0, 1], pa.int8()),
        "unused": pa.array([[1], [2], [3], [4]]),  # an unsupported type in an undeclared column is fine
    })


def load(tmp_path, file, **kwargs):
    report = DataReport("h1")
    return load_table(tmp_path, spec(file, **kwargs), report), report


def write_csv(tmp_path, text: str, name: str = "export.csv") -> str:
    (tmp_path / name).write_text(text)
    return name


def test_parquet_is_read_with_declared_types(tmp_path):
    pq.write_table(typed_table(), tmp_path / "export.parquet")
    samples, report = load(tmp_path, "export.parquet")

    assert samples.features.schema == pa.schema([("age", pa.float64()), ("ward", pa.string()), ("smoker", pa.bool_())])
    assert samples.features.column("age").to_pylist() == [70.0, None, 55.0, 61.0]
    assert samples.features.column("ward").to_pylist() == ["icu", "cardio", None, "icu"]
    assert samples.features.column("smoker").to_pylist() == [True, False, None, True]
    assert samples.labels.dtype == np.int64 and samples.labels.tolist() == [1, 0, 0, 1]
    assert samples.patient_ids.tolist() == ["101", "102", "103", "104"]
    assert samples.sample_ids == ["row 1", "row 2", "row 3", "row 4"]
    assert samples.fingerprint == hashlib.sha256((tmp_path / "export.parquet").read_bytes()).hexdigest()
    assert report.used == 4 and report.skipped == []


@pytest.mark.parametrize("extension", [".feather", ".arrow", ".ipc"])
def test_arrow_ipc_files_are_read(tmp_path, extension):
    feather.write_feather(typed_table(), tmp_path / f"export{extension}")
    samples, report = load(tmp_path, f"export{extension}")
    assert samples.features.column("age").to_pylist() == [70.0, None, 55.0, 61.0]
    assert samples.labels.tolist() == [1, 0, 0, 1]
    assert report.used == 4


def test_csv_export_as_hospitals_write_it(tmp_path):
    file = write_csv(tmp_path, (
        "pid,age,ward,smoker,died,notes\n"
        "0007,70,icu,TRUE,1,x\n"
        "0008,,Cardio , FALSE,0,\n"
        "0009,55.5,,,FALSE,y\n"
        "0010,NaN,icu,yes,true,\n"
    ))
    samples, report = load(tmp_path, file)

    assert samples.features.schema == pa.schema([("age", pa.float64()), ("ward", pa.string()), ("smoker", pa.bool_())])
    assert samples.features.column("age").to_pylist() == [70.0, None, 55.5, None]
    assert samples.features.column("ward").to_pylist() == ["icu", "Cardio", None, "icu"]
    assert samples.features.column("smoker").to_pylist() == [True, False, None, True]
    assert samples.labels.tolist() == [1, 0, 0, 1]
    assert samples.patient_ids.tolist() == ["0007", "0008", "0009", "0010"]  # leading zeros kept
    assert report.used == 4


def test_pandas_style_columns_are_understood(tmp_path):
    # Categories dictionary-encoded, integer codes turned float by NaN, ids as floats.
    table = pa.table({
        "pid": pa.array([1.0, 2.0, 3.0]),
        "age": pa.array([1.5, float("nan"), 3.0]),
        "ward": pa.array([3.0, float("nan"), 12.0]),
        "smoker": pa.array(["yes", "no", "yes"]).dictionary_encode(),
        "died": pa.array([0.0, 1.0, 0.0]),
    })
    pq.write_table(table, tmp_path / "export.parquet")
    samples, _ = load(tmp_path, "export.parquet")
    assert samples.features.column("age").to_pylist() == [1.5, None, 3.0]
    assert samples.features.column("ward").to_pylist() == ["3", None, "12"]
    assert samples.features.column("smoker").to_pylist() == [True, False, True]
    assert samples.patient_ids.tolist() == ["1", "2", "3"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"absent\.parquet: no such file; expected a Parquet file"):
        load(tmp_path, "absent.parquet")


def test_unknown_extension(tmp_path):
    (tmp_path / "export.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"export\.xlsx: unknown table format '\.xlsx'; expected one of \.parquet"):
        load(tmp_path, "export.xlsx")


def test_corrupt_parquet(tmp_path):
    pq.write_table(typed_table(), tmp_path / "export.parquet")
    data = (tmp_path / "export.parquet").read_bytes()
    (tmp_path / "export.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"export\.parquet: cannot be read as a Parquet file"):
        load(tmp_path, "export.parquet")


def test_malformed_csv_line_names_the_line_not_its_content(tmp_path):
    file = write_csv(tmp_path, "pid,age,ward,smoker,died\n1,70,icu,TRUE,1\n2,SECRET,x,y,TRUE,0\n")
    with pytest.raises(DataError, match=r"export\.csv: line 3 has 6 fields, expected 5") as error:
        load(tmp_path, file)
    assert "SECRET" not in str(error.value)


def test_non_utf8_csv(tmp_path):
    (tmp_path / "export.csv").write_bytes("pid,age,ward,smoker,died\n1,70,Ärzte,TRUE,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"export\.csv: cannot be read as a UTF-8 CSV file"):
        load(tmp_path, "export.csv")


@pytest.mark.parametrize("dropped, expected", [("age", "numeric"), ("died", "label"), ("pid", "patient id")])
def test_missing_column(tmp_path, dropped, expected):
    pq.write_table(typed_table().drop_columns([dropped]), tmp_path / "export.parquet")
    with pytest.raises(DataError, match=rf"export\.parquet: column '{dropped}' \({expected}\) is missing"):
        load(tmp_path, "export.parquet")


def test_column_of_an_impossible_type(tmp_path):
    table = typed_table().set_column(1, "age", pa.array([[70], [71], [72], [73]]))
    pq.write_table(table, tmp_path / "export.parquet")
    with pytest.raises(DataError, match=r"column 'age' should hold numeric values but is of type list<element: int64>"):
        load(tmp_path, "export.parquet")


@pytest.mark.parametrize("column, values, expected, found", [
    ("age", ["old", "young", "", "old"], "numeric", "string"),
    ("age", [True, False, True, None], "numeric", "bool"),
    ("smoker", ["maybe", "", "often", "never"], "boolean", "string"),
])
def test_column_where_no_cell_has_the_declared_type(tmp_path, column, values, expected, found):
    index = typed_table().column_names.index(column)
    pq.write_table(typed_table().set_column(index, column, pa.array(values)), tmp_path / "export.parquet")
    with pytest.raises(DataError, match=rf"column '{column}' should hold {expected} values, but none of its 3 filled cells is one \(found {found} cells\)"):
        load(tmp_path, "export.parquet")


def test_bad_cells_skip_their_row_with_reason_and_field(tmp_path):
    file = write_csv(tmp_path, (
        "pid,age,ward,smoker,died\n"
        "1,70,icu,TRUE,1\n"
        "2,7O,icu,TRUE,0\n"  # letter O for zero
        "3,61,icu,sometimes,0\n"
        "4,inf,icu,FALSE,0\n"
        "5,1e2,icu,FALSE,0\n"
    ))
    samples, report = load(tmp_path, file)
    assert samples.sample_ids == ["row 1", "row 5"]
    assert samples.features.column("age").to_pylist() == [70.0, 100.0]
    assert [(s.source, s.field, s.reason) for s in report.skipped] == [
        ("export.csv row 2", "age", "bad_value"),
        ("export.csv row 3", "smoker", "bad_value"),
        ("export.csv row 4", "age", "bad_value"),
    ]
    assert report.skipped[0].detail == "expected a numeric value, found a string cell that is not one"
    assert all("7O" not in s.detail and "sometimes" not in s.detail for s in report.skipped)
    assert report.used == 2 and report.counts() == {"bad_value": 3}


def test_a_row_with_several_problems_is_reported_once(tmp_path):
    file = write_csv(tmp_path, "pid,age,ward,smoker,died\n1,x,icu,y,\n2,70,icu,TRUE,1\n")
    _, report = load(tmp_path, file)
    assert [(s.source, s.reason) for s in report.skipped] == [("export.csv row 1", "missing_label")]


def test_missing_labels_and_patient_ids_are_skipped(tmp_path):
    table = typed_table().set_column(4, "died", pa.array([1.0, float("nan"), None, 0.0]))
    table = table.set_column(0, "pid", pa.array(["a", "b", "c", " "]))
    pq.write_table(table, tmp_path / "export.parquet")
    samples, report = load(tmp_path, "export.parquet")
    assert samples.sample_ids == ["row 1"]
    assert [(s.source, s.field, s.reason) for s in report.skipped] == [
        ("export.parquet row 2", "died", "missing_label"),
        ("export.parquet row 3", "died", "missing_label"),
        ("export.parquet row 4", "pid", "missing_patient_id"),
    ]


def test_without_patient_column_each_row_is_its_own_patient(tmp_path):
    pq.write_table(typed_table().drop_columns(["pid"]), tmp_path / "export.parquet")
    samples, _ = load(tmp_path, "export.parquet", patient_id=None)
    assert samples.patient_ids.tolist() == ["row 1", "row 2", "row 3", "row 4"]


def label_csv(tmp_path, labels: list[str]) -> str:
    rows = "".join(f"{i},50,icu,TRUE,{label}\n" for i, label in enumerate(labels))
    return write_csv(tmp_path, "pid,age,ward,smoker,outcome\n" + rows)


def test_label_threshold(tmp_path):
    file = label_csv(tmp_path, ["3.5", "4", "10", "x", "-1"])
    samples, report = load(tmp_path, file, label=LabelRule(column="outcome", threshold=4.0))
    assert samples.labels.tolist() == [0, 1, 1, 0]
    assert [(s.source, s.reason) for s in report.skipped] == [("export.csv row 4", "bad_label")]


def test_label_positive_values_with_all_others_negative(tmp_path):
    file = label_csv(tmp_path, ["died", "icu", "home", "Died", ""])
    samples, report = load(tmp_path, file, label=LabelRule(column="outcome", positive_values=("died", "icu"), negative_values="all others"))
    assert samples.labels.tolist() == [1, 1, 0, 0]  # values compare exactly
    assert report.counts() == {"missing_label": 1}


def test_a_label_value_in_neither_list_costs_its_row_and_is_named(tmp_path):
    file = label_csv(tmp_path, ["died", "icu", "home", "Died", "transferred", "transferred", ""])
    rule = LabelRule(column="outcome", positive_values=("died", "icu"), negative_values=("home",))
    samples, report = load(tmp_path, file, label=rule)
    assert samples.labels.tolist() == [1, 1, 0]
    assert report.counts() == {"unlisted_label": 3, "missing_label": 1}
    details = {s.source: s.detail for s in report.skipped}
    assert "'Died'" in details["export.csv row 4"] and "'transferred'" in details["export.csv row 6"]
    assert "positive_values nor label.negative_values" in details["export.csv row 5"]


def test_a_threshold_is_inclusive(tmp_path):
    file = label_csv(tmp_path, ["3.999", "4", "4.0", "4.001"])
    samples, _ = load(tmp_path, file, label=LabelRule(column="outcome", threshold=4.0))
    assert samples.labels.tolist() == [0, 1, 1, 1]


def test_plain_boolean_label(tmp_path):
    file = label_csv(tmp_path, ["1", "0", "TRUE", "false", "Yes", "no", "nan"])
    samples, report = load(tmp_path, file, label=LabelRule(column="outcome"))
    assert samples.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert [(s.source, s.reason) for s in report.skipped] == [("export.csv row 7", "missing_label")]


def test_a_binary_task_on_a_column_of_five_values_without_a_rule_is_refused_listing_them(tmp_path):
    # Five grades read as 0/1 would silently drop the rows of grades 2 to 4 and train another task.
    file = label_csv(tmp_path, ["0", "1", "2", "3", "4", "1", "TRUE"])
    with pytest.raises(DataError, match=r"export.csv: label column 'outcome' holds 5 different values \['0', '1', '2', '3', '4', 'TRUE'\].*positive_values.*multiclass"):
        load(tmp_path, file, label=LabelRule(column="outcome"))


def test_label_column_with_no_usable_value(tmp_path):
    file = label_csv(tmp_path, ["died", "home"])
    with pytest.raises(DataError, match=r"column 'outcome' should hold 0/1, true/false or yes/no values"):
        load(tmp_path, file, label=LabelRule(column="outcome"))


def test_the_report_is_written_whole_as_json_whatever_lies_beside_it(tmp_path):
    file = write_csv(tmp_path, "pid,age,ward,smoker,died\n1,70,icu,TRUE,1\n2,7O,icu,TRUE,0\n")
    _, report = load(tmp_path, file)
    out = tmp_path / "run" / "data_report.json"
    # A leftover from another writer where a fixed temporary name would be: it must not matter.
    (out.parent / "data_report.json.tmp").mkdir(parents=True)
    report.write(out)
    assert json.loads(out.read_text()) == {
        "hospital": "h1",
        "used": 1,
        "skipped_counts": {"bad_value": 1},
        "skipped": [{
            "source": "export.csv row 2", "field": "age", "reason": "bad_value",
            "detail": "expected a numeric value, found a string cell that is not one",
        }],
        "notes": {},
    }
    assert sorted(p.name for p in out.parent.iterdir()) == ["data_report.json", "data_report.json.tmp"]
