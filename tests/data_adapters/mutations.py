"""Seeded mutations of DICOM, CSV and Parquet files, for the adapters' fuzz test.

Every mutation takes a file's bytes and a numpy Generator and returns new bytes, so one seed gives
the same files on every run. They imitate what reaches a hospital's folder: copies cut short, bits
flipped on disk, headers whose lengths or image dimensions lie, pixel data missing or doubled,
files that are not what their name says.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
    JPEGLSLossless, MPEG2MPML, RLELossless,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

Mutation = Callable[[bytes, np.random.Generator], bytes]

_PREAMBLE = 132  # 128-byte preamble and "DICM"
_LYING_LENGTHS = (0, 1, 0xFFFE, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF)
# Image elements and values that declare empty, absurd or enormous images.
_DIMENSIONS = {
    "Rows": (0, 1, 0xFFFF),
    "Columns": (0, 1, 0xFFFF),
    "NumberOfFrames": ("0", "-1", "65535", "2147483647"),
    "BitsAllocated": (0, 1, 7, 64, 0xFFFF),
    "BitsStored": (0, 33, 0xFFFF),
    "SamplesPerPixel": (0, 3, 0xFFFF),
    "PixelRepresentation": (1, 7),
    "PlanarConfiguration": (1, 2),
}
_HUGE_SIDES = (16384, 32768, 65535)  # far beyond any scanner; 16384 x 16384 is 4 x the adapter's cap
_SYNTAXES = (
    ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit,
    JPEGLSLossless, JPEG2000Lossless, MPEG2MPML, "1.2.3.4",
)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# --- bytes ------------------------------------------------------------------------------------


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(len(data)))] if data else data


def flip_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for at in rng.integers(len(data), size=int(rng.integers(1, 17))):
        out[at] ^= int(rng.integers(1, 256))
    return bytes(out)


def garbage(data: bytes, rng: np.random.Generator) -> bytes:
    """Random bytes, half of them behind a valid DICOM preamble so the reader gets past the magic."""
    noise = rng.bytes(int(rng.integers(1, 4096)))
    return bytes(128) + b"DICM" + noise if rng.random() < 0.5 else noise


def empty(data: bytes, rng: np.random.Generator) -> bytes:
    return b""


# --- DICOM headers ----------------------------------------------------------------------------


def _meta_end(data: bytes) -> int:
    """Where the dataset starts: after the preamble and file meta, or 0 for a bare dataset."""
    if data[128:_PREAMBLE] != b"DICM":
        return 0
    fp = io.BytesIO(data)
    fp.seek(_PREAMBLE)
    for _ in data_element_generator(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2):
        pass
    return fp.tell()


def _length_fields(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(offset, size, byte order) of the length field of each top-level element, file meta included."""
    implicit, little = pydicom.dcmread(io.BytesIO(data), force=True).original_encoding[:2]
    start = _meta_end(data)
    parts = [(_PREAMBLE, start, False, True), (start, len(data), implicit, little)]  # file meta: explicit VR LE
    for begin, end, part_implicit, part_little in parts:
        if begin >= end:
            continue
        for elem in data_element_generator(io.BytesIO(data[begin:end]), part_implicit, part_little):
            value_at = begin + (getattr(elem, "value_tell", None) or elem.file_tell)  # undefined-length sequences
            wide = part_implicit or elem.VR in EXPLICIT_VR_LENGTH_32
            yield value_at - (4 if wide else 2), 4 if wide else 2, "little" if part_little else "big"


def wrong_length(data: bytes, rng: np.random.Generator) -> bytes:
    """One element's length field overwritten with a lie: zero, odd, near the maximum, undefined."""
    fields = list(_length_fields(data))
    at, size, order = _pick(rng, fields)
    length = _pick(rng, _LYING_LENGTHS) & ((1 << 8 * size) - 1)
    return data[:at] + length.to_bytes(size, order) + data[at + size:]


def _edited(data: bytes, edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    edit(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def lying_dimensions(data: bytes, rng: np.random.Generator) -> bytes:
    """One to three image elements set to zero, absurd or enormous values, the pixels untouched."""
    keywords = rng.choice(list(_DIMENSIONS), size=int(rng.integers(1, 4)), replace=False)

    def edit(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            setattr(ds, keyword, _pick(rng, _DIMENSIONS[keyword]))

    return _edited(data, edit)


def huge_dimensions(data: bytes, rng: np.random.Generator) -> bytes:
    """Rows and Columns of an enormous image, every other element intact: a decoder that trusted
    them would allocate gigabytes for a few kilobytes of pixel data."""

    def edit(ds: pydicom.Dataset) -> None:
        ds.Rows, ds.Columns = (_pick(rng, _HUGE_SIDES) for _ in range(2))

    return _edited(data, edit)


def lying_syntax(data: bytes, rng: np.random.Generator) -> bytes:
    """The file meta names another transfer syntax than the one the dataset is written in."""
    meta = pydicom.dcmread(io.BytesIO(data), force=True).file_meta
    meta.TransferSyntaxUID = _pick(rng, _SYNTAXES)
    out = io.BytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return out.getvalue() + data[_meta_end(data):]


def pixel_data_damage(data: bytes, rng: np.random.Generator) -> bytes:
    """PixelData removed, cut to an odd share, doubled, or appended a second time after the dataset."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in ds:
        return data
    pixels = ds.PixelData
    damage = _pick(rng, ("remove", "cut", "double", "append"))
    if damage == "append":  # a second PixelData (explicit VR little endian), out of tag order
        header = (0x7FE0).to_bytes(2, "little") + (0x0010).to_bytes(2, "little") + b"OB\0\0"
        return data + header + len(pixels).to_bytes(4, "little") + pixels
    if damage == "remove":
        edit = lambda d: delattr(d, "PixelData")
    elif damage == "cut":
        # At least the first item tag stays, as pydicom writes encapsulated pixel data only with it.
        edit = lambda d: setattr(d, "PixelData", pixels[: int(rng.integers(min(8, len(pixels) - 1), len(pixels)))])
    else:
        edit = lambda d: setattr(d, "PixelData", pixels + pixels)
    return _edited(data, edit)


DICOM_MUTATIONS: dict[str, Mutation] = {
    "truncate": truncate,
    "flip_bytes": flip_bytes,
    "wrong_length": wrong_length,
    "lying_dimensions": lying_dimensions,
    "huge_dimensions": huge_dimensions,
    "lying_syntax": lying_syntax,
    "pixel_data_damage": pixel_data_damage,
    "garbage": garbage,
    "empty": empty,
}


# --- CSV --------------------------------------------------------------------------------------

_HOSTILE_CELLS = (
    "abc", "inf", "-inf", "NaN", "1e999", "1e-999", "0x1F", "1.2.3", "+", ".", "-", "TRUE", "yes", "  ",
    '"1,5"', '"', "\u00e9\u00e8", "\u202e12", "\x00", "9" * 400,
)
_HUGE_FIELD = 2 << 20  # 2 MiB: longer than the 1 MiB blocks pyarrow reads a CSV in


def _cell_edit(data: bytes, rng: np.random.Generator, edit: Callable[[list[bytes]], None]) -> bytes:
    """`edit` applied to the cells of one random line (the header included)."""
    lines = data.split(b"\n")
    row = int(rng.integers(len(lines) - 1))  # the last "line" is what follows the final newline
    cells = lines[row].split(b",")
    edit(cells)
    lines[row] = b",".join(cells)
    return b"\n".join(lines)


def hostile_cell(data: bytes, rng: np.random.Generator) -> bytes:
    """One cell replaced by text of the wrong type, an edge-case number or stray quoting."""
    value = _pick(rng, _HOSTILE_CELLS).encode()

    def edit(cells: list[bytes]) -> None:
        cells[int(rng.integers(len(cells)))] = value

    return _cell_edit(data, rng, edit)


def wrong_cell_count(data: bytes, rng: np.random.Generator) -> bytes:
    """One line with a cell dropped or an extra one."""

    def edit(cells: list[bytes]) -> None:
        at = int(rng.integers(len(cells)))
        if rng.random() < 0.5:
            del cells[at]
        else:
            cells.insert(at, b"extra")

    return _cell_edit(data, rng, edit)


def huge_field(data: bytes, rng: np.random.Generator) -> bytes:
    """One cell of free text longer than a CSV block, as a notes column may hold."""

    def edit(cells: list[bytes]) -> None:
        cells[int(rng.integers(len(cells)))] = b"7" * _HUGE_FIELD

    return _cell_edit(data, rng, edit)


def binary_line(data: bytes, rng: np.random.Generator) -> bytes:
    """A line of random bytes (NULs, invalid UTF-8, stray quotes and newlines) inserted anywhere."""
    lines = data.split(b"\n")
    lines.insert(int(rng.integers(len(lines))), rng.bytes(int(rng.integers(1, 200))))
    return b"\n".join(lines)


def header_damage(data: bytes, rng: np.random.Generator) -> bytes:
    """The header line removed, blanked or given a duplicate column."""
    header, rest = data.split(b"\n", 1)
    names = header.split(b",")
    damage = _pick(rng, ("remove", "blank", "duplicate"))
    if damage == "remove":
        return rest
    if damage == "blank":
        return b",".join(b"" for _ in names) + b"\n" + rest
    names[int(rng.integers(len(names)))] = _pick(rng, names)
    return b",".join(names) + b"\n" + rest


CSV_MUTATIONS: dict[str, Mutation] = {
    "truncate": truncate,
    "flip_bytes": flip_bytes,
    "hostile_cell": hostile_cell,
    "wrong_cell_count": wrong_cell_count,
    "huge_field": huge_field,
    "binary_line": binary_line,
    "header_damage": header_damage,
    "garbage": garbage,
    "empty": empty,
}


# --- Parquet ----------------------------------------------------------------------------------


def footer_length(data: bytes, rng: np.random.Generator) -> bytes:
    """The footer's metadata length (the 4 bytes before the closing "PAR1") made a lie."""
    length = _pick(rng, (0, 1, len(data), 0x7FFFFFFF, 0xFFFFFFFF, int(rng.integers(2**32))))
    return data[:-8] + length.to_bytes(4, "little") + data[-4:]


def _hostile_column(n: int, rng: np.random.Generator) -> pa.Array:
    kind = _pick(rng, ("list", "struct", "binary", "null", "inf", "huge_text", "timestamp", "dictionary"))
    if kind == "list":
        return pa.array([[1, 2]] * n)
    if kind == "struct":
        return pa.array([{"x": 1}] * n)
    if kind == "binary":
        return pa.array([rng.bytes(8) for _ in range(n)], pa.binary())
    if kind == "null":
        return pa.nulls(n)
    if kind == "inf":
        return pa.array(rng.choice([np.inf, -np.inf, np.nan, 1e308], n))
    if kind == "huge_text":
        return pa.array(["x" * _HUGE_FIELD] + [""] * (n - 1))
    if kind == "timestamp":
        return pa.array(np.arange(n).astype("datetime64[s]"))
    return pa.array(rng.choice(["a", "\x00", ""], n)).dictionary_encode()


def hostile_schema(data: bytes, rng: np.random.Generator) -> bytes:
    """A well-formed Parquet file whose column is of a hostile type, or renamed to a duplicate."""
    table = pq.read_table(io.BytesIO(data))
    at = int(rng.integers(table.num_columns))
    if rng.random() < 0.2:
        table = table.rename_columns([*table.column_names[:at], _pick(rng, table.column_names), *table.column_names[at + 1:]])
    else:
        table = table.set_column(at, table.field(at).name, _hostile_column(table.num_rows, rng))
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


PARQUET_MUTATIONS: dict[str, Mutation] = {
    "truncate": truncate,
    "flip_bytes": flip_bytes,
    "footer_length": footer_length,
    "hostile_schema": hostile_schema,
    "garbage": garbage,
    "empty": empty,
}
