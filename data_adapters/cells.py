"""Reading a hospital's table files and parsing their cells into typed values, one cell at a time.

Shared by the EHR table adapter and the DICOM adapter's label table, so a file format, a label
rule, a boolean or a missing value means the same in both, with the same messages. Missing cells
are empty, NaN, or the text "nan" in any case; they become nulls. A cell that does not parse costs
its row; a column where no filled cell parses refuses the whole table, since the configuration and
the file then disagree.
"""

from __future__ import annotations

import codecs
import difflib
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq

from fedward.cells import parse_boolean, parse_numeric, row_mask
from fedward.config import LabelRule
from fedward.errors import DataError
from fedward.tasks.base import Problem, Task



def _first_non_utf8_line(path: Path) -> int | None:
    """The line that holds the file's first byte that is not UTF-8, or None; read in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # the start of a character the previous block cut
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return line + block.count(b"\n", 0, max(e.start - pending, 0))
            if not block:
                return None
            line += block.count(b"\n")


def _read_csv(path: Path) -> pa.Table:
    # Arrow cannot decode a malformed row that is not UTF-8 for our handler, and then quotes the
    # row in its error, which may identify a patient; a header that is not UTF-8 escapes as a
    # UnicodeDecodeError. So such a file is refused here, by line, before Arrow parses it.
    line = _first_non_utf8_line(path)
    if line is not None:
        raise DataError(f"{path}: cannot be read as a UTF-8 CSV file: line {line} holds bytes that are not UTF-8")
    # Every column as text, so a bad cell is found per row instead of failing the file's inference,
    # and identifiers keep their leading zeros.
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


def read_table(path: Path, config_field: str) -> pa.Table:
    """The table in `path`, chosen by its extension; `config_field` is the setting that names it."""
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        formats = ", ".join(_READERS)
        raise DataError(f"{path}: unknown table format {path.suffix!r}; expected one of {formats} ({config_field})")
    expected, reader = _READERS[suffix]
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected {expected} ({config_field})")
    try:
        return reader(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot be read as {expected}: {e}") from None


def find_column(table: pa.Table, name: str, expected: str, file: str) -> pa.ChunkedArray:
    found = table.schema.get_all_field_indices(name)
    if len(found) > 1:
        raise DataError(f"{file}: column {name!r} ({expected}) appears more than once")
    if not found:
        # Only near-misses are named, not the header: in a file exported without one, it is a patient's row.
        similar = difflib.get_close_matches(name, table.column_names, n=3)
        hint = f"; similar columns: {similar}" if similar else ""
        raise DataError(f"{file}: column {name!r} ({expected}) is missing from its {table.num_columns} columns{hint}")
    return table.column(found[0])


def _is_scalar_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # pandas categoricals arrive dictionary-encoded
        return _is_scalar_type(t.value_type)
    checks = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_integer,
              pa.types.is_floating, pa.types.is_decimal, pa.types.is_boolean)
    return any(check(t) for check in checks)


def as_text(column: pa.ChunkedArray, name: str, expected: str, file: str) -> pa.ChunkedArray:
    """The column as trimmed text, null where the cell is missing."""
    if not _is_scalar_type(column.type):
        raise DataError(f"{file}: column {name!r} should hold {expected} values but is of type {column.type}")
    text = pc.utf8_trim_whitespace(column.cast(pa.string()))  # a float NaN becomes "nan"
    return pc.if_else(pc.is_in(pc.utf8_lower(text), pa.array(["", "nan"])), None, text)


PARSERS = {"numeric": parse_numeric, "boolean": parse_boolean, "categorical": lambda text: text}


# The label of a sample read for scoring (`labelled=False`): new patients have no outcome yet.
NO_LABEL = -1


def label_targets(table: pa.Table, rule: LabelRule, file: str, task: Task) -> tuple[np.ndarray, list[Problem]]:
    """Every row's target as the task reads the label column, and the problems of rows with none."""
    column = find_column(table, rule.column, "label", file)
    text = as_text(column, rule.column, "label", file)
    targets, problems = task.targets(text, column.type, rule, file)
    return targets, [(rule.column, "missing_label", "expected an outcome, found an empty cell", row_mask(text.is_null())), *problems]
