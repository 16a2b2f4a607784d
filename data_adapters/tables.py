"""Reads a hospital's EHR table export (Parquet, CSV, Arrow/Feather) into typed samples.

Real exports hold categories as text, booleans as TRUE/FALSE (or true/false, 1/0, yes/no) and
empty cells for missing values. Every declared column is read as text and converted here, one
cell at a time, so a wrong cell costs its row (recorded in the DataReport) rather than the file,
while a column that holds no value of its declared type at all refuses the whole table.

Missing values are empty cells, NaN, or the text "nan" in any case; they become nulls.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq

from data_adapters.cells import PARSERS, Problem, as_text, find_column, label_values, parse_cells, row_mask
from data_adapters.report import DataReport
from data_adapters.samples import Samples
from fedward.config import FeatureSpec, TableSpec
from fedward.errors import DataError


def _read_csv(path: Path) -> pa.Table:
    # Every column as text, so a bad cell is found per row instead of failing the file's inference.
    skip_all = pacsv.ParseOptions(invalid_row_handler=lambda row: "skip")
    header = pacsv.open_csv(path, parse_options=skip_all).schema.names
    malformed = []

    def note(row):
        malformed.append(row)
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False),  # so malformed rows know their line
        parse_options=pacsv.ParseOptions(invalid_row_handler=note),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string())),
    )
    if malformed:
        # Arrow's own message quotes the row, which may identify a patient; give only its shape.
        row = malformed[0]
        raise DataError(
            f"{path}: line {row.number} has {row.actual_columns} fields, expected {row.expected_columns} "
            "like the header; check the quoting of text that contains commas"
        )
    return table


_READERS: dict[str, tuple[str, Callable[[Path], pa.Table]]] = {
    ".parquet": ("a Parquet file", pq.read_table),
    ".csv": ("a UTF-8 CSV file with a header row", _read_csv),
    ".arrow": ("an Arrow IPC (Feather v2) file", feather.read_table),
    ".feather": ("a Feather file", feather.read_table),
    ".ipc": ("an Arrow IPC file", feather.read_table),
}


def _read(path: Path) -> pa.Table:
    if path.suffix.lower() not in _READERS:
        raise DataError(f"{path}: unknown table format {path.suffix!r}; expected one of {', '.join(_READERS)}")
    expected, reader = _READERS[path.suffix.lower()]
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected {expected} (data.table.file)")
    try:
        return reader(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot be read as {expected}: {e}") from None


def _feature(table: pa.Table, feature: FeatureSpec, file: str) -> tuple[pa.ChunkedArray, Problem]:
    column = find_column(table, feature.name, feature.type, file)
    text = as_text(column, feature.name, feature.type, file)
    values, bad = parse_cells(text, PARSERS[feature.type], feature.name, feature.type, column.type, file)
    detail = f"expected a {feature.type} value, found a {column.type} cell that is not one"
    return values, (feature.name, "bad_value", detail, bad)


def load_table(data_dir: Path, spec: TableSpec, report: DataReport) -> Samples:
    """The usable rows of `data_dir / spec.file`; every skipped row is recorded in `report`."""
    path = Path(data_dir) / spec.file
    table = _read(path)
    file = spec.file
    labels, problems = label_values(table, spec.label, file)
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
    return Samples(
        features=pa.table({name: values.filter(keep) for name, values in features.items()}),
        labels=np.asarray(labels.filter(keep).to_numpy(), dtype=np.int64),
        patient_ids=np.array(sample_ids if patient_ids is None else patient_ids.filter(keep).to_pylist(), dtype=str),
        sample_ids=sample_ids,
        fingerprint=fingerprint,
    )
