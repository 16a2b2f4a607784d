"""Reads a hospital's EHR table export (Parquet, CSV, Arrow/Feather) into typed samples.

Real exports hold categories as text, booleans as TRUE/FALSE (or true/false, 1/0, yes/no) and
empty cells for missing values. Every declared column is read as text and converted here, one
cell at a time, so a wrong cell costs its row (recorded in the DataReport) rather than the file,
while a column that holds no value of its declared type at all refuses the whole table.

Missing values are empty cells, NaN, or the text "nan" in any case; they become nulls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedward.data_adapters.cells import NO_LABEL, PARSERS, as_text, find_column, label_targets, read_table
from fedward.data_adapters.report import DataReport
from fedward.data_adapters.samples import Samples
from fedward.cells import parse_cells, parse_numeric, row_mask
from fedward.config import FeatureSpec, TableSpec
from fedward.errors import DataError
from fedward.tasks import Task, binary_task
from fedward.tasks.base import Problem


def _feature(table: pa.Table, feature: FeatureSpec, file: str) -> tuple[pa.ChunkedArray, Problem]:
    column = find_column(table, feature.name, feature.type, file)
    text = _without_missing_codes(as_text(column, feature.name, feature.type, file), feature)
    values, bad = parse_cells(text, PARSERS[feature.type], feature.name, feature.type, column.type, file)
    detail = f"expected a {feature.type} value, found a {column.type} cell that is not one"
    return values, (feature.name, "bad_value", detail, bad)


def _without_missing_codes(text: pa.ChunkedArray, feature: FeatureSpec) -> pa.ChunkedArray:
    """The column with the feature's `missing_values` codes as missing cells; numeric codes match
    by value, so -9 also catches "-9.0"."""
    if not feature.missing_values:
        return text
    codes = pc.is_in(text, pa.array(feature.missing_values))
    if feature.type == "numeric":
        numbers = parse_numeric(pa.chunked_array([pa.array(feature.missing_values)])).drop_null()
        if len(numbers):
            codes = pc.or_(codes, pc.is_in(parse_numeric(text), value_set=numbers.combine_chunks()))
    return pc.if_else(pc.fill_null(codes, False), None, text)


def load_table(
    data_dir: Path, spec: TableSpec, report: DataReport, labelled: bool = True, attributes: Mapping[str, str] = {}, task: Task | None = None,
) -> Samples:
    """The usable rows of `data_dir / spec.file`; every skipped row is recorded in `report`.

    The label column becomes targets as `task` reads it (binary when None). With `labelled=False`
    (new patients to score) the label column is not read, may be absent, and every target is
    `NO_LABEL`; features and patient ids are read and checked as for training.
    `attributes` names the columns of patient-group attributes to carry along (name -> column);
    one missing or unreadable is noted in `report` and left out, as it costs no sample.
    """
    path = Path(data_dir) / spec.file
    table = read_table(path, "data.table.file")
    file = spec.file
    task = task or binary_task()
    targets, problems = label_targets(table, spec.label, file, task) if labelled else (None, [])
    patient_ids = None
    if spec.patient_id is not None:
        patient_ids = as_text(find_column(table, spec.patient_id, "patient id", file), spec.patient_id, "patient id", file)
        problems.append((spec.patient_id, "missing_patient_id", "expected a patient id, found an empty cell",
                         row_mask(patient_ids.is_null())))
    features = {}
    for feature in spec.features:
        features[feature.name], problem = _feature(table, feature, file)
        problems.append(problem)

    # A row is reported once, for its first problem, so the report counts skipped rows.
    masks = np.stack([mask for *_, mask in problems])
    skipped, first = masks.any(axis=0), masks.argmax(axis=0)
    for row in np.flatnonzero(skipped):
        field, reason, detail, _ = problems[first[row]]
        report.skip(f"{file} row {row + 1}", field, reason, detail)

    keep = pa.array(~skipped)
    sample_ids = [f"row {row + 1}" for row in np.flatnonzero(~skipped)]
    report.used = len(sample_ids)
    with path.open("rb") as f:
        fingerprint = hashlib.file_digest(f, "sha256").hexdigest()
    groups = {}
    for name, column in attributes.items():
        try:
            groups[name] = as_text(find_column(table, column, f"subgroups.{name}", file), column, f"subgroups.{name}", file).filter(keep)
        except DataError as e:
            report.notes[f"subgroups.{name}"] = str(e)
    return Samples(
        features=pa.table({name: values.filter(keep) for name, values in features.items()}),
        labels=targets[~skipped] if labelled else np.full(len(sample_ids), NO_LABEL, np.int64),
        patient_ids=np.array(sample_ids if patient_ids is None else patient_ids.filter(keep).to_pylist(), dtype=str),
        sample_ids=sample_ids,
        fingerprint=fingerprint,
        attributes={name: np.array(values.fill_null("").to_pylist(), dtype=str) for name, values in groups.items()},
    )
