"""Parsing one cell of text into a typed value: numbers, booleans, nothing else.

Shared by the data adapters (features) and the tasks (labels), so a number or a boolean means the
same everywhere, with the same messages. Cells arrive as trimmed text, null where missing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedward.errors import DataError

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")
BOOLEAN = "0/1, true/false or yes/no"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"  # no inf: it would wreck the standardisation


def parse_numeric(text: pa.ChunkedArray) -> pa.ChunkedArray:
    numbers = pc.if_else(pc.match_substring_regex(text, _NUMBER), text, None).cast(pa.float64())
    return pc.if_else(pc.is_finite(numbers), numbers, None)  # 1e400 overflows to infinity: not a number either


def parse_boolean(text: pa.ChunkedArray) -> pa.ChunkedArray:
    lower = pc.utf8_lower(text)
    return pc.if_else(pc.is_in(lower, pa.array(TRUE)), True, pc.if_else(pc.is_in(lower, pa.array(FALSE)), False, None))


def row_mask(values: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(), dtype=bool)


def parse_cells(text: pa.ChunkedArray, parse, name: str, expected: str, found: pa.DataType, file: str):
    """Parsed values (null where missing or unparseable) and the mask of unparseable cells. A
    column where no filled cell parses refuses the file: the configuration and the file disagree."""
    values = parse(text)
    bad = row_mask(pc.and_(text.is_valid(), values.is_null()))
    if bad.any() and bad.sum() == text.length() - text.null_count:
        raise DataError(
            f"{file}: column {name!r} should hold {expected} values, but none of its "
            f"{bad.sum()} filled cells is one (found {found} cells)"
        )
    return values, bad
