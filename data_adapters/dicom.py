"""DICOM adapter: a hospital's folder of DICOM files plus a label table become image samples.

Every image is brought to one convention, whatever scanner wrote it: the modality LUT (e.g. CT
Hounsfield units), then the file's VOI window (its output range maps onto [0, 1], values outside
the window clip) or per-frame min-max, MONOCHROME1 inverted so bright always means dense. Colour
images become grayscale by ITU-R BT.601 luminance. Each frame is then resized so its longer side
is `image_size`, keeping the aspect ratio, and centre-padded with 0 (black) to a square.

Files are read as DICOM Part 10 (128-byte preamble, then "DICM") or, failing that, as a bare
dataset as older systems write it, accepted only if it holds image or SOP class elements.

Enhanced (multi-frame) CT and MR are rescaled and windowed frame by frame from their functional
groups. Only image storage SOP classes are read as images.

Files that cannot be used are skipped and recorded in the DataReport, never fatal; so are broken
links, folders that cannot be listed, and images whose header, or whose compressed stream's own
header, declares frames larger than MAX_FRAME_SAMPLES, refused before any decoder allocates them.
Only a missing images folder or an unusable label table raises `DataError`. Hidden files and
folders (names starting with ".") are ignored without a record: they are system debris, not
inputs. Linked folders are followed, each once.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import json
import logging
import math
import os
import stat
import struct
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyarrow as pa
import pydicom
import torch
import torch.nn.functional as F
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, iter_pixels
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import _get_jpg_parameters, get_expected_length
from pydicom.uid import (
    JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, ExplicitVRBigEndian,
    ExplicitVRLittleEndian, ImplicitVRLittleEndian,
)

from fedward.data_adapters import jpeg_decoder
from fedward.data_adapters.cells import NO_LABEL, find_column, label_targets, read_table
from fedward.data_adapters.report import DataReport
from fedward.data_adapters.samples import Samples
from fedward.config import DicomSpec
from fedward.errors import DataError
from fedward.tasks import Task, binary_task

jpeg_decoder.register()

# Bump whenever preprocessing or the cache's file layout changes, so no cache serves arrays made
# the old way.
CACHE_VERSION = 3
CONTENT_HASH = "blake3"  # of each file, keying the cache; it names the scheme of the data fingerprint
# Process-wide counts of files "decoded" and served from cache ("cache_hits"), for monitoring.
stats: Counter[str] = Counter()
# Decoders allocate a frame at its declared size before decoding it, so a header that declares an
# enormous image would take that memory whatever the file holds. Radiographs stay well below it
# (mammography: about 4000 x 5000); preprocessing a frame at the cap takes about 1.5 GB.
MAX_FRAME_SAMPLES = 8192 * 8192  # Rows x Columns x SamplesPerPixel
MAX_FILE_BYTES = 2 * 1024**3  # files are read whole; a multi-frame CT series file stays below it

_JPEG_FAMILY = {*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes}
_J2K_FAMILY = set(JPEG2000TransferSyntaxes)
_LITTLE_ENDIAN_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
_PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
NEAREST_HINTS = 20  # messages that name the nearest key of the other side
_KEY_ELEMENTS = {"sop_instance_uid": "SOPInstanceUID", "patient_id": "PatientID"}
# The functional group macros of Enhanced images that hold what a classic image keeps at its top
# level (PS3.3 C.7.6.16.2.9 and .10).
_FRAME_MACROS = {
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"),
}
# What pydicom's modality and VOI transforms read, LUT sequences aside: frames alike in these are
# transformed alike, through one table per distinct set (_stored_value_table).
_TRANSFORM_ELEMENTS = (
    "BitsStored", "PixelRepresentation", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "WindowCenter",
    "WindowWidth", "VOILUTFunction",
)
_TRANSFORM_TAGS = tuple(tag_for_keyword(keyword) for keyword in _TRANSFORM_ELEMENTS)
_WINDOW_TAGS = (tag_for_keyword("WindowCenter"), tag_for_keyword("WindowWidth"))
_SOP_CLASS_TAG = tag_for_keyword("SOPClassUID")
_LUT_SEQUENCES = ("ModalityLUTSequence", "VOILUTSequence")
MAX_TABLE_BITS = 16  # a table over 65536 stored values costs less than one 256 x 256 frame
MAX_TABLES = 64
_BLOCK = 32768  # pixels per block of a table lookup: its index stays in the CPU's cache
_TABLES: dict[tuple, tuple[int, np.ndarray]] = {}
_NOT_VIEWED = {tag_for_keyword(k) for k in ("PixelData", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
# A file that names no transfer syntax is in the encoding pydicom detected while parsing it,
# keyed here as its (implicit VR, little endian) pair.
_NATIVE_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


class _Skip(Exception):
    """Why one file or row is not used; caught per item and written to the report."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def load_dicom(
    data_dir: Path, spec: DicomSpec, report: DataReport, cache_dir: Path | None = None, labelled: bool = True,
    attributes: Mapping[str, str] = {}, task: Task | None = None, require_patient_id: bool = False,
) -> Samples:
    """Load every labelled, decodable image under `data_dir / spec.images`.

    Sample ids are paths relative to `data_dir`; with `frames="all"` each frame of a multi-frame
    file is its own sample, `"<path>#frame<i>"`. A file whose SOPInstanceUID an earlier file (in
    path order) holds is skipped as `duplicate_instance`. An image without a PatientID is split with
    its study (StudyInstanceUID, and the data report says how many), else on its own (all frames of
    a file stay together), or with `require_patient_id` (patient-level DP, whose unit it would
    break) skipped as `no_patient_id`. With `cache_dir`, each file's preprocessed frames are
    kept under its content hash and the preprocessing settings. The label table's column becomes
    targets as `task` reads it (binary when None). With `labelled=False` (new
    patients to score) no label table is read: every decodable image is used, labelled `NO_LABEL`.
    `attributes` names the header elements of patient-group attributes to carry along (name ->
    DICOM keyword, e.g. PatientSex); an unreadable one is left empty, the image still used.
    """
    data_dir = Path(data_dir)
    images_dir = data_dir / spec.images
    if not images_dir.is_dir():
        raise DataError(f"images folder {images_dir} does not exist (data.dicom.images)")
    cache = _Cache(Path(cache_dir), spec) if cache_dir is not None else None
    files = _image_files(images_dir, data_dir, report)  # path relative to the images folder -> file
    paths = set(files)
    prefix = images_dir.relative_to(data_dir).as_posix()
    labels = _Labels(_read_label_table(data_dir / spec.labels, spec), spec, report, task or binary_task(), paths) if labelled else None
    if labels is not None and spec.key == "path":  # a labelled file that proves unreadable is reported once, as itself
        labels.seen.update(paths)

    arrays, targets, patients, sample_ids, hashes = [], [], [], [], []
    groups: dict[str, list[str]] = {name: [] for name in attributes}
    instances: dict[str, str] = {}  # SOPInstanceUID -> the file used for it
    by_study, longer = 0, []
    with _pydicom_silenced(), cache if cache is not None else nullcontext():
        for key_path, path in files.items():
            source = key_path if prefix == "." else f"{prefix}/{key_path}"
            try:
                digest, label, patient, frames, ds, longer_than_declared = _load_file(path, key_path, spec, labels, cache)
                values = {name: _attribute(ds, keyword) for name, keyword in attributes.items()}
                instance, study = _attribute(ds, "SOPInstanceUID"), _attribute(ds, "StudyInstanceUID")
            except _Skip as skip:
                report.skip(source, skip.field, skip.reason, skip.detail)
                continue
            if instance and instance in instances:
                # One image exported twice (in two transfer syntaxes, say) would count twice, and could
                # land on both sides of the split.
                report.skip(source, "SOPInstanceUID", "duplicate_instance", f"the same SOPInstanceUID as {instances[instance]}, which is used")
                continue
            if require_patient_id and not patient:
                report.skip(source, "PatientID", "no_patient_id", "patient-level DP counts patients, and this image names none")
                continue
            if instance:
                instances[instance] = source
            by_study += not patient and bool(study)
            if longer_than_declared:
                longer.append(source)
            for i, frame in enumerate(frames):
                arrays.append(frame)
                targets.append(label)
                # Without a PatientID, a study's images still stay on one side of the split.
                patients.append(patient or (f"study {study}" if study else source))
                sample_ids.append(f"{source}#frame{i}" if len(frames) > 1 else source)
                for name, value in values.items():
                    groups[name].append(value)
            hashes.append(digest)
    if labels is not None:
        labels.report_unmatched(report)
    if cache is not None and cache.failure:
        report.notes["cache"] = cache.failure
    if by_study:
        report.notes["PatientID"] = f"{by_study} image(s) name no patient: each was split with the other images of its StudyInstanceUID"
    if longer:
        report.notes["PixelData"] = (f"{len(longer)} image(s) hold more pixel bytes than Rows x Columns x frames declare; the declared "
                                     f"part was read (the first: {longer[0]})")

    size = spec.image_size
    report.used = len(targets)
    return Samples(
        features=np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, size, size), np.float32),
        labels=np.array(targets) if targets else np.zeros(0, np.int64),
        patient_ids=np.array(patients, dtype=str),
        sample_ids=sample_ids,
        fingerprint=f"{CONTENT_HASH}:{blake3.blake3(''.join(sorted(hashes)).encode()).hexdigest()}",
        attributes={name: np.array(values, dtype=str) for name, values in groups.items()},
    )


def _image_files(folder: Path, data_dir: Path, report: DataReport) -> dict[str, Path]:
    """Every visible entry under `folder` that is not a folder, by its path relative to `folder`
    (POSIX), in that path's order.

    Broken links and special files are included so that reading them records why they are not
    used; folders that cannot be listed are recorded here. A linked folder is read, once: a link to
    a folder read already (an enclosing one, which would loop, or another link's) is recorded as
    `folder_linked_again`.
    """

    def unlisted(error: OSError) -> None:
        source = Path(error.filename).relative_to(data_dir).as_posix()
        report.skip(source, "folder", "unreadable_dicom", f"the folder cannot be listed: {error.strerror}")

    def identity(path: str) -> tuple[int, int] | str:
        try:
            status = os.stat(path)
            return status.st_dev, status.st_ino
        except OSError:  # gone meanwhile: os.walk reports it when it tries to list it
            return path

    files, read = {}, {identity(folder): ""}  # a folder's (device, inode) -> its path relative to `folder`
    for root, folders, names in os.walk(folder, onerror=unlisted, followlinks=True):
        relative = Path(root).relative_to(folder).as_posix()
        stem = "" if relative == "." else f"{relative}/"
        kept = []
        for name in sorted(folders):
            if name.startswith("."):  # not descended into
                continue
            real = identity(os.path.join(root, name))
            if real in read:
                first = Path(folder, read[real]).relative_to(data_dir).as_posix()
                report.skip(Path(root, name).relative_to(data_dir).as_posix(), "folder", "folder_linked_again",
                            f"a link to the folder {first}, read already: its files are read once")
                continue
            read[real] = stem + name
            kept.append(name)
        folders[:] = kept
        files.update((stem + name, Path(root, name)) for name in names if not name.startswith("."))
    return dict(sorted(files.items()))


@contextmanager
def _pydicom_silenced() -> Iterator[None]:
    """No warnings or log records from pydicom: they quote element values, which may be patients',
    and its decoders log full tracebacks for failures that are already recorded in the report."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    # Raising the parent's level also silences pydicom's child loggers, which inherit it.
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load_file(
    path: Path, key_path: str, spec: DicomSpec, labels: _Labels | None, cache: _Cache | None
) -> tuple[str, int, str, np.ndarray, pydicom.Dataset, bool]:
    """(content hash, label, PatientID, frames as float32 (F, S, S), header, whether its native
    pixel data is longer than declared) of one file, or `_Skip`."""
    data = _read_bytes(path)
    ds = _read_dataset(data)
    if labels is not None:
        key = key_path if spec.key == "path" else _text(ds, _KEY_ELEMENTS[spec.key])
        labels.seen.add(key)
    if not any(element in ds for element in _PIXEL_ELEMENTS):
        # pydicom reads a file cut short within its header silently, so that lands here too.
        raise _Skip("no_pixel_data", "PixelData", "no PixelData element: not an image, or a file cut short")
    _check_image_storage(ds)
    held, declared = _native_lengths(ds)
    # Checked here because the decoder reports a cut-off copy only as a generic ValueError.
    if held < declared:
        raise _Skip("unreadable_dicom", "PixelData", "PixelData is shorter than its Rows x Columns x frames: truncated")
    label = labels.take(key) if labels is not None else NO_LABEL
    # BLAKE3, three times faster than SHA-256 here: the content hash is a fixed cost of every
    # file's first read, as large as the decoding for a 512 x 512 CT slice.
    digest = blake3.blake3(data).hexdigest()
    frames = cache.get(digest) if cache else None
    if frames is None:
        frames = _preprocess(ds, spec)
        if cache:
            cache.put(digest, frames)
    # Beyond the one byte that pads an odd length, what the attributes declare is what is read.
    return digest, label, _text(ds, "PatientID"), frames, ds, held > declared + declared % 2


def _check_image_storage(ds: pydicom.Dataset) -> None:
    """Only objects of an image storage SOP class are pictures of a patient: a segmentation's or
    an RT dose grid's pixel data is a mask or a dose, not an image to train on. A file naming no
    SOP class (hand-made, or exported bare) is read as an image when it holds pixels."""
    element = ds.get_item(_SOP_CLASS_TAG)
    if element is None:
        return
    # Read without converting it: a verdict per SOP class, kept.
    sop_class = element.value.decode("ascii", "replace") if isinstance(element.value, bytes) else str(element.value or "")
    if why := _not_image_storage(sop_class.strip("\x00 ")):
        raise _Skip("not_an_image", "SOPClassUID", why)


@functools.lru_cache(maxsize=256)
def _not_image_storage(sop_class: str) -> str | None:
    uid = pydicom.uid.UID(sop_class)
    if "Image Storage" in uid.name:
        return None
    known = uid.name if uid.name != str(uid) else "an SOP class pydicom does not know"
    return f"its SOP class is {known} ({uid}), not an image storage class: its pixel data is not read as an image"


def _read_bytes(path: Path) -> bytes:
    try:
        status = os.stat(path)  # one call, following links, for what the file is and its size
    except FileNotFoundError:
        if path.is_symlink():
            raise _Skip("unreadable_dicom", "file", "a broken link: the file it points to does not exist") from None
        raise _Skip("unreadable_dicom", "file", "the file disappeared while it was read") from None
    except OSError as e:
        raise _Skip("unreadable_dicom", "file", f"the file cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(status.st_mode):  # reading a pipe or device could block forever
        raise _Skip("not_dicom", "file", "expected a DICOM file, found a pipe, socket or device")
    if status.st_size > MAX_FILE_BYTES:  # read whole, it would take that much memory
        raise _Skip("image_too_large", "file", f"the file holds {status.st_size} bytes, more than {MAX_FILE_BYTES}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _Skip("unreadable_dicom", "file", f"the file cannot be read: {e.strerror}") from None


def _read_dataset(data: bytes) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:  # no preamble and "DICM": maybe a bare dataset
        ds = _read_bare_dataset(data)
    except Exception as e:  # pydicom signals a truncated or garbled file in many ways
        raise _Skip("unreadable_dicom", "file", f"cannot read the file ({type(e).__name__})") from None
    syntax = _NATIVE_SYNTAX.get(ds.original_encoding[:2])
    if "TransferSyntaxUID" not in ds.file_meta and syntax:  # the decoders need it named
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _read_bare_dataset(data: bytes) -> pydicom.Dataset:
    """A dataset without preamble and file meta, as older systems write; `not_dicom` unless it
    holds image or SOP class elements, since pydicom's `force` makes elements of any bytes."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        looks_dicom = any(element in ds for element in ("SOPClassUID", "Rows", *_PIXEL_ELEMENTS))
    except Exception:
        looks_dicom = False
    if not looks_dicom:
        expected = "expected a DICOM file: no 128-byte preamble and 'DICM', nor a bare dataset"
        raise _Skip("not_dicom", "file", expected)
    return ds


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    try:  # pydicom converts values on first access, so a garbled one fails only here
        return str(ds.get(keyword, "") or "").strip()
    except Exception as e:
        raise _Skip("unreadable_dicom", keyword, f"cannot read {keyword} ({type(e).__name__})") from None


def _attribute(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        return _text(ds, keyword)
    except _Skip:  # a garbled group attribute costs the image its group, not its use
        return ""


def _preprocess(ds: pydicom.Dataset, spec: DicomSpec) -> np.ndarray:
    """The selected frames as float32 (F, S, S) in [0, 1]."""
    _check_decodable(ds)
    try:
        n = int(ds.get("NumberOfFrames") or 1)
        indices = {"first": [0], "middle": [n // 2], "all": range(n)}[spec.frames]
        _check_streams(ds, indices, n)
        frames = _native_frames(ds, indices, n) or iter_pixels(ds, indices=indices)
        out = np.stack([
            _fit_square(_to_unit(frame, _frame_view(ds, index), spec.window), spec.image_size) for index, frame in zip(indices, frames)
        ])
    except _Skip:
        raise
    except Exception as e:  # decoders and LUTs fail in many ways on unusual files
        # Decoder messages name codecs and image attributes, which tell the operator what to fix.
        why = " ".join(str(e).split())[:200]
        raise _Skip("decode_error", "PixelData", f"cannot decode the image: {type(e).__name__}: {why}") from None
    stats["decoded"] += 1
    if not np.isfinite(out).all():
        raise _Skip("decode_error", "PixelData", "the pixel data holds NaN or infinite values")
    return out


def _native_frames(ds: pydicom.Dataset, indices, frames: int) -> Iterator[np.ndarray] | None:
    """The chosen frames of little-endian native grayscale pixel data, exactly as pydicom's
    `iter_pixels` gives them (bits above BitsStored cleared, or sign-extended when signed), read in
    place without its per-call set-up, which costs more than the reading for small images. None
    for anything else, which pydicom decodes."""
    if ds.file_meta.TransferSyntaxUID not in _LITTLE_ENDIAN_NATIVE or "PixelData" not in ds:
        return None
    try:
        rows, columns, allocated, stored = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated), int(ds.BitsStored)
        signed, samples = int(ds.PixelRepresentation) == 1, int(ds.get("SamplesPerPixel") or 1)
        photometric = ds.get("PhotometricInterpretation")
    except Exception:  # malformed image attributes: pydicom names what is wrong
        return None
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2") or allocated not in (8, 16) or not 0 < stored <= allocated:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    pixels = np.frombuffer(ds.PixelData, dtype, count=rows * columns * frames).reshape(frames, rows, columns)
    unused = allocated - stored

    def chosen() -> Iterator[np.ndarray]:  # one frame at a time, as iter_pixels
        for index in indices:
            yield np.right_shift(np.left_shift(pixels[index], unused), unused) if unused else pixels[index]

    return chosen()


def _check_decodable(ds: pydicom.Dataset) -> None:
    """Refuse what no installed decoder reads, or what declares more than fedward reads, before
    decoding."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        raise _Skip("decode_error", "TransferSyntaxUID", "the file meta names no transfer syntax")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise _Skip("no_decoder", "TransferSyntaxUID", f"pydicom cannot decode {tsyntax.name} ({tsyntax})") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise _Skip("no_decoder", "TransferSyntaxUID", f"{tsyntax.name} ({tsyntax}) needs a decoder: {needs}")
    samples = math.prod(_declared_frame(ds))
    if samples > MAX_FRAME_SAMPLES:
        raise _Skip(
            "image_too_large", "Rows",
            f"Rows x Columns x SamplesPerPixel declares {samples} samples per frame, more than {MAX_FRAME_SAMPLES} (8192 x 8192)",
        )


def _check_streams(ds: pydicom.Dataset, indices, frames: int) -> None:
    """Each compressed frame to decode, checked against its own stream's header: a decoder sizes
    its buffers from the stream, so a few-KB stream claiming a huge image would cost that image's
    memory, whatever the DICOM header declares."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_encapsulated or (tsyntax not in _JPEG_FAMILY and tsyntax not in _J2K_FAMILY):
        return
    # One pass over the fragments, not one per frame (without an offset table pydicom would walk
    # the fragments from the first for every frame). `indices` is ascending: a list or a range.
    for index, stream in zip(range(indices[-1] + 1), generate_frames(ds.PixelData, number_of_frames=frames)):
        if index not in indices:
            continue
        header = _jpeg_header(stream) if tsyntax in _JPEG_FAMILY else _j2k_header(stream)
        if header is None:  # left to the decoder, which rejects a stream it cannot parse
            continue
        rows, columns, components = header
        if rows * columns * components > MAX_FRAME_SAMPLES:
            raise _Skip(
                "image_too_large", "PixelData",
                f"frame {index}'s {tsyntax.name} stream declares {rows} x {columns} x {components} samples, more than "
                f"{MAX_FRAME_SAMPLES} (8192 x 8192): not decoded",
            )
        declared = _declared_frame(ds)
        if (rows, columns, components) != declared:
            raise _Skip(
                "decode_error", "PixelData",
                f"frame {index}'s {tsyntax.name} stream holds {rows} x {columns} x {components} samples, but Rows x Columns x "
                f"SamplesPerPixel declare {' x '.join(map(str, declared))}: not decoded",
            )


def _jpeg_header(stream: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS stream's start of frame."""
    found = _get_jpg_parameters(stream)
    return (found["height"], found["width"], found["components"]) if found else None


def _j2k_header(stream: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ segment (ISO/IEC 15444-1
    A.5.1), bare or inside a JP2 file."""
    at = stream.find(b"\xff\x4f\xff\x51")  # SOC, then SIZ: every codestream opens with them
    if at < 0 or len(stream) < at + 42:
        return None
    width, height, x_offset, y_offset = struct.unpack(">4I", stream[at + 8:at + 24])
    (components,) = struct.unpack(">H", stream[at + 40:at + 42])
    return height - y_offset, width - x_offset, components


def _declared_frame(ds: pydicom.Dataset) -> tuple[int, int, int]:
    """(Rows, Columns, SamplesPerPixel); (0, 0, 0) for missing or malformed image attributes, left
    to the decoder to reject."""
    try:
        return int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1)
    except Exception:
        return 0, 0, 0


def _native_lengths(ds: pydicom.Dataset) -> tuple[int, int]:
    """(bytes held, bytes Rows x Columns x frames declare) of native pixel data; (0, 0) for
    encapsulated pixel data or malformed image attributes, which the decoder rejects."""
    try:
        if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_encapsulated:
            return 0, 0
        return len(ds.PixelData), get_expected_length(ds)
    except Exception:
        return 0, 0


def _frame_view(ds: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """The dataset as a classic image of frame `index` would hold it.

    Enhanced CT and MR (and their legacy-converted kin) keep the rescale and window in functional
    groups, the frame's own or shared by all frames, where pydicom's LUT functions do not look:
    they are lifted to the top level, so the same anatomy is preprocessed alike in either format.
    """
    per_frame, shared = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    if not per_frame and not shared:
        return ds
    groups = [group for group in (per_frame[index] if per_frame and index < len(per_frame) else None, shared[0] if shared else None) if group]
    view = pydicom.Dataset({tag: element for tag, element in ds.items() if tag not in _NOT_VIEWED})
    for sequence, keywords in _FRAME_MACROS.items():
        item = next((group[sequence][0] for group in groups if group.get(sequence)), None)
        for keyword in keywords if item is not None else ():
            if keyword in item:
                view[keyword] = item[keyword]
    return view


def _to_unit(frame: np.ndarray, ds: pydicom.Dataset, window: str) -> np.ndarray:
    """One decoded frame as float32 (H, W) in [0, 1], bright meaning dense; NaN throughout where
    the frame holds a non-finite value, which scaling would otherwise turn into a black image.

    Where the transform depends on the stored value alone, pydicom's transform is tabulated once
    per series (`_stored_value_table`): a window is looked up, and min-max after a linear rescale
    computed from the stored values. Either gives pydicom's float64 values rounded once to
    float32, to the last bit where the rescale is exact in float64 (Hounsfield units are).
    """
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        return np.full(frame.shape[:2], np.nan, np.float32)
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
    if frame.ndim == 3:  # colour: the modality and VOI LUTs are defined for grayscale only
        gray = frame.astype(np.float64) @ _LUMA
        return _scale(gray, gray.min(), gray.max()).astype(np.float32)
    windowed = window == "voi" and _has_voi(ds)
    table = _stored_value_table(frame, ds, windowed)
    if table is None:
        return _unit(_grayscale(frame, ds, windowed), windowed, photometric).astype(np.float32)
    low, values = table
    first, last = int(frame.min()) - low, int(frame.max()) - low
    if first < 0 or last >= len(values):  # values beyond BitsStored: transformed directly
        return _unit(_grayscale(frame, ds, windowed), windowed, photometric).astype(np.float32)
    if windowed:  # pydicom's window, inverted for MONOCHROME1 and rounded to float32 once per series
        return _lookup(values, frame, low)
    # Min-max after a linear rescale is the stored values' own, reversed where the slope falls or
    # for MONOCHROME1. A float32 division of integers below 2**24 rounds the exact quotient once,
    # as the float64 transform rounded to float32 does: the same bits, in a third of the time.
    rising = (values[last] >= values[first]) != (photometric == "MONOCHROME1")
    if last == first:
        return np.full(frame.shape, 0.0 if rising else 1.0, np.float32)
    unit = frame.astype(np.float32)
    if rising:
        unit -= first + low
    else:
        np.subtract(last + low, unit, out=unit)
    unit /= np.float32(last - first)
    return unit


def _lookup(table: np.ndarray, frame: np.ndarray, offset: int) -> np.ndarray:
    """`table[frame - offset]`, a block of rows at a time: an index array as large as the frame
    would cost more memory traffic than the lookup itself."""
    out = np.empty(frame.shape, table.dtype)
    rows = max(1, _BLOCK // frame.shape[1])
    index = np.empty((min(rows, frame.shape[0]), frame.shape[1]), np.intp)  # take's own index type: no conversion inside
    for start in range(0, frame.shape[0], rows):
        block = frame[start:start + rows]
        np.subtract(block, offset, out=index[:len(block)], dtype=np.intp)
        np.take(table, index[:len(block)], out=out[start:start + rows])
    return out


def _unit(values: np.ndarray, windowed: bool, photometric: str) -> np.ndarray:
    """Transformed values onto [0, 1] (a window maps there already, else min-max), inverted for
    MONOCHROME1."""
    unit = values if windowed else _scale(values, values.min(), values.max())
    return 1.0 - unit if photometric == "MONOCHROME1" else unit


def _key(element: pydicom.dataelem.DataElement | pydicom.dataelem.RawDataElement | None) -> object:
    """An element's value as a table key, read without converting it: raw bytes with their VR and
    byte order, or a converted value's repr."""
    if isinstance(element, pydicom.dataelem.RawDataElement):
        return element.VR, element.value, element.is_little_endian
    return None if element is None else repr(element.value)


def _grayscale(values: np.ndarray, ds: pydicom.Dataset, windowed: bool) -> np.ndarray:
    """pydicom's modality LUT, then, `windowed`, its VOI LUT mapped onto [0, 1]."""
    values = apply_modality_lut(values, ds)
    return _scale(apply_voi_lut(values, ds), *_voi_range(ds)) if windowed else values


def _stored_value_table(frame: np.ndarray, ds: pydicom.Dataset, windowed: bool) -> tuple[int, np.ndarray] | None:
    """(lowest storable value, `_grayscale` of every storable value from it; a window's as final
    float32 units) where the transform depends on the stored value alone, as viewers tabulate it:
    one table per set of the elements it reads, so the next image of a series is a lookup. None
    for LUT sequences (whose tables may be anything), float or wide samples, and malformed
    elements, transformed directly."""
    if frame.dtype.kind not in "iu" or any(sequence in ds for sequence in _LUT_SEQUENCES):
        return None
    try:
        bits = int(ds.BitsStored)
        key = (windowed, *(_key(ds.get_item(tag)) for tag in _TRANSFORM_TAGS))
    except Exception:  # left to pydicom's transforms to reject
        return None
    if not 0 < bits <= MAX_TABLE_BITS:
        return None
    if key not in _TABLES:
        if len(_TABLES) >= MAX_TABLES:
            _TABLES.clear()
        low = _lowest_storable(ds, bits)
        values = _grayscale(np.arange(low, low + (1 << bits)), ds, windowed)
        # A window's table is final (the key holds PhotometricInterpretation); min-max needs the
        # frame's own extremes, so its table stays the rescaled values.
        _TABLES[key] = low, _unit(values, True, ds.get("PhotometricInterpretation", "")).astype(np.float32) if windowed else values
    return _TABLES[key]


def _has_voi(ds: pydicom.Dataset) -> bool:
    """Whether the file holds a window (centre and width) or a VOI LUT, its values not converted
    (pydicom converts them when it tabulates the transform, once per series)."""
    windowed = all(_filled(ds.get_item(tag)) for tag in _WINDOW_TAGS)
    return windowed or bool(ds.get("VOILUTSequence"))


def _filled(element: pydicom.dataelem.DataElement | pydicom.dataelem.RawDataElement | None) -> bool:
    if isinstance(element, pydicom.dataelem.RawDataElement):
        return bool(element.length)
    return element is not None and not element.is_empty


def _voi_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The output range of the file's modality + VOI transform over every storable value.

    A window sends everything below/above it to the ends of its output range; pushing the extreme
    stored values through pydicom's own transforms yields those ends without re-deriving PS3.3 C.11.
    """
    bits = int(ds.BitsStored)
    low = _lowest_storable(ds, bits)
    ends = apply_voi_lut(apply_modality_lut(np.array([low, low + (1 << bits) - 1]), ds), ds)
    return float(ends.min()), float(ends.max())


def _lowest_storable(ds: pydicom.Dataset, bits: int) -> int:
    return -(1 << (bits - 1)) if ds.get("PixelRepresentation") == 1 else 0


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo
    return np.clip((x - lo) / span, 0.0, 1.0) if span > 0 else np.zeros(x.shape)


def _fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W) so the longer side is `size`, then centre-pad the shorter side with 0."""
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(image.astype(np.float32, copy=False))[None, None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (size - nh) // 2, (size - nw) // 2
    x = F.pad(x, (left, size - nw - left, top, size - nh - top))
    return x[0, 0].clamp_(0.0, 1.0).numpy()


class _Cache:
    """Preprocessed frames by file content and preprocessing settings, so no setting serves stale data.

    Each load that decodes files adds one pack, renamed into place whole when the load ends: an
    uncompressed .npz of the files' content hashes, their frame counts and all their frames in
    one array. One pack per load, not a file per image, because creating a file, or even a zip
    member, costs more than preprocessing a small image. Zip's CRC-32 of every member catches
    damage on disk; a damaged pack is removed, and its images decoded again, never served.
    """

    _READ_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError)

    def __init__(self, folder: Path, spec: DicomSpec):
        settings = dict(version=CACHE_VERSION, image_size=spec.image_size, frames=spec.frames, window=spec.window)
        self._folder = folder
        self._prefix = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16] + "-"
        self._packs: dict[zipfile.ZipFile, np.ndarray | None] = {}  # open packs, newest first -> their frames once read
        self._index: dict[str, list[tuple[zipfile.ZipFile, int, int]]] = {}  # content hash -> (pack, first frame, count)
        self._new: dict[str, np.ndarray] = {}
        self.failure: str | None = None

    def __enter__(self) -> _Cache:
        def age(path: Path) -> int:
            try:
                return path.stat().st_mtime_ns
            except OSError:  # removed meanwhile by another load: opening it fails below
                return 0

        for path in sorted(self._folder.glob(f"{self._prefix}*.npz"), key=age, reverse=True):
            try:
                pack = zipfile.ZipFile(path)
            except self._READ_ERRORS:
                path.unlink(missing_ok=True)
                continue
            self._packs[pack] = None
            try:
                digests, counts = _member(pack, "digests"), _member(pack, "counts")
            except self._READ_ERRORS:
                self._drop(pack)
                continue
            for digest, start, count in zip(digests.tolist(), (np.cumsum(counts) - counts).tolist(), counts.tolist()):
                self._index.setdefault(digest, []).append((pack, start, count))
        return self

    def __exit__(self, *exc) -> None:
        for pack in self._packs:
            pack.close()
        if self._new and exc[0] is None:
            self._write()

    def get(self, digest: str) -> np.ndarray | None:
        for pack, start, count in self._index.get(digest, ()):
            if pack not in self._packs:  # dropped as damaged while serving another of its entries
                continue
            if self._packs[pack] is None:
                try:
                    self._packs[pack] = _member(pack, "frames")
                except self._READ_ERRORS:
                    self._drop(pack)
                    continue
            stats["cache_hits"] += 1
            return self._packs[pack][start:start + count]
        return None

    def put(self, digest: str, frames: np.ndarray) -> None:
        self._new[digest] = frames

    def _drop(self, pack: zipfile.ZipFile) -> None:
        pack.close()
        del self._packs[pack]
        Path(pack.filename).unlink(missing_ok=True)

    def _write(self) -> None:
        path = self._folder / f"{self._prefix}{os.urandom(8).hex()}.npz"
        partial = path.with_name(f".{path.name}")  # hidden from readers until whole
        frames = list(self._new.values())
        # Without the fsyncs of a durable record: a pack a crash leaves damaged is caught on reading.
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            np.savez(partial, digests=np.array(list(self._new)), counts=np.array([len(f) for f in frames]), frames=np.concatenate(frames))
            os.replace(partial, path)
        except OSError as e:  # a full or read-only disk costs the cache, not the images
            partial.unlink(missing_ok=True)
            self.failure = f"the preprocessing cache cannot be written ({e.strerror or e}): images were decoded and not cached"


def _member(pack: zipfile.ZipFile, name: str) -> np.ndarray:
    """One array of a pack, its CRC-32 checked (reading a member whole checks it)."""
    return np.load(io.BytesIO(pack.read(f"{name}.npy")), allow_pickle=False)


def _read_label_table(path: Path, spec: DicomSpec) -> pa.Table:
    table = read_table(path, "data.dicom.labels")
    find_column(table, spec.key_column, "data.dicom.key_column", spec.labels)
    find_column(table, spec.label.column, "data.dicom.label.column", spec.labels)
    return table


class _Labels:
    """The label table as key -> target; rows that give none are reported as they are read."""

    def __init__(self, table: pa.Table, spec: DicomSpec, report: DataReport, task: Task, paths: set[str]):
        self._spec = spec
        self.labels: dict[str, Any] = {}
        self.failed: dict[str, str] = {}  # key -> why none of its rows gives a label
        self.rows: dict[str, list[int]] = defaultdict(list)  # key -> rows with a usable label
        self.seen: set[str] = set()  # keys of files found, usable or not
        self.hints = 0
        found: dict[str, set] = defaultdict(set)
        # Parsed as the table adapter parses labels, so a rule means the same for images and tables.
        values, problems = label_targets(table, spec.label, spec.labels, task)
        values = values.tolist()
        keys = table.column(spec.key_column).to_pylist()
        for row, key in enumerate(keys, start=1):
            key = "" if key is None else str(key).strip()
            if spec.key == "path":
                key = _path_key(key, spec.images, paths)
            where = self._where(row)
            if not key:
                report.skip(where, spec.key_column, "label_without_image", f"the row has no {spec.key_column}")
                continue
            problem = next(((reason, detail) for _, reason, detail, rows in problems if rows[row - 1]), None)
            if problem:
                report.skip(where, spec.label.column, *problem)
                self.failed.setdefault(key, problem[0])
                continue
            found[key].add(values[row - 1])
            self.rows[key].append(row)
        for key, labels in found.items():
            if len(labels) == 1:
                self.labels[key] = labels.pop()
                self.failed.pop(key, None)
                continue
            self.failed[key] = "conflicting_label"
            for row in self.rows.pop(key):
                disagree = f"rows with this {spec.key_column} disagree"
                report.skip(self._where(row), spec.label.column, "conflicting_label", disagree)

    def _where(self, row: int) -> str:
        return f"{self._spec.labels} row {row}"

    def take(self, key: str) -> Any:
        spec = self._spec
        if key in self.labels:
            return self.labels[key]
        if key in self.failed:
            raise _Skip(self.failed[key], spec.label.column, f"its rows in {spec.labels} give no usable label")
        if not key:
            element = _KEY_ELEMENTS[spec.key]
            raise _Skip("image_without_label", element, f"the file has no {element} to find its label by")
        raise _Skip("image_without_label", spec.key_column, f"no row of {spec.labels} matches its {spec.key_column} {key!r}{self._nearest(key, self.labels)}")

    def report_unmatched(self, report: DataReport) -> None:
        column = self._spec.key_column
        for key in sorted(set(self.labels) - self.seen):
            for row in self.rows[key]:
                report.skip(self._where(row), column, "label_without_image", f"no image matches this {column} {key!r}{self._nearest(key, self.seen)}")

    def _nearest(self, key: str, keys) -> str:
        """"; the nearest is ..." when a key of the other side is like `key` (a typo, another case),
        for the first NEAREST_HINTS keys that match nothing: each search reads every key."""
        self.hints += 1
        if self.hints > NEAREST_HINTS:
            return ""
        close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.8)
        return f"; the nearest is {close[0]!r}" if close else ""


def _path_key(key: str, images: str, paths: set[str]) -> str:
    """A label table's path as the files' keys are written: relative to the images folder, with
    forward slashes and no leading "./". A path relative to the hospital's folder (through the
    images folder) is taken as such unless it names a file as it is."""
    key = key.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    through = Path(images).as_posix().strip("/") + "/"
    return key[len(through):] if key.startswith(through) and key not in paths else key


