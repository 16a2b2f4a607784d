"""The DICOM adapter against real files written with pydicom and pydicom's own test files.

References are computed from the stored arrays and tags with numpy (and PIL for resizing), never
with the adapter's code.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, MPEG2MPML, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage, generate_uid,
)

from fedward.data_adapters import dicom
from fedward.data_adapters.dicom import load_dicom
from fedward.data_adapters.report import DataReport
from fedward.data_adapters.tables import load_table
from fedward.config import DicomSpec, FeatureSpec, LabelRule, TableSpec
from fedward.errors import DataError

SKIP_REASONS = {
    "unreadable_dicom", "not_dicom", "no_pixel_data", "no_decoder", "image_without_label",
    "label_without_image", "decode_error", "missing_label", "conflicting_label", "bad_label", "unlisted_label", "image_too_large",
    "not_an_image", "duplicate_instance", "folder_linked_again",
}


# --- helpers ------------------------------------------------------------------------------------


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None, patient: str | None = "P1", **tags) -> Dataset:
    """A valid Part-10 file holding `pixels`, plus any extra tags (e.g. RescaleIntercept=-1024)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if patient is not None:
        ds.PatientID = patient
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8, generate_instance_uid=False)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_labels(path: Path, rows: list[tuple[str, str]], key="key", label="y") -> None:
    path.write_text("\n".join([f"{key},{label}", *(f"{k},{v}" for k, v in rows)]) + "\n")


def spec(**kw) -> DicomSpec:
    defaults = dict(key="path", key_column="key", label=LabelRule(column="y"), image_size=8)
    return DicomSpec(**{**defaults, **kw})


def load(root: Path, cache_dir: Path | None = None, **kw):
    report = DataReport("h")
    return load_dicom(root, spec(**kw), report, cache_dir), report


def minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


def ramp(shape=(8, 8), dtype=np.int16, lo=0, hi=None) -> np.ndarray:
    n = int(np.prod(shape))
    hi = n - 1 if hi is None else hi
    return np.linspace(lo, hi, n).round().astype(dtype).reshape(shape)


def skipped(report: DataReport) -> dict[str, str]:
    return {s.source: s.reason for s in report.skipped}


# --- intensities --------------------------------------------------------------------------------


def test_ct_rescale_then_voi_window_matches_the_standard_linear_formula(tmp_path):
    stored = ramp(lo=800, hi=1400)  # HU -224..376 with the intercept below; the window is 40/400
    write_dicom(tmp_path / "images/ct.dcm", stored, RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    write_labels(tmp_path / "labels.csv", [("ct.dcm", "1")])

    voi, _ = load(tmp_path)
    plain, _ = load(tmp_path, window="minmax")

    hu = stored.astype(np.float64) - 1024
    # PS3.3 C.11.2.1.2.1, LINEAR, mapped onto [0, 1]
    expected = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(voi.features[0, 0], expected, atol=1e-6)
    assert voi.features.min() == 0 and voi.features.max() == 1  # the ramp passes both window ends
    np.testing.assert_allclose(plain.features[0, 0], minmax(hu), atol=1e-6)
    assert voi.features.dtype == np.float32 and voi.features.shape == (1, 1, 8, 8)


def test_a_window_is_a_fixed_mapping_not_stretched_to_the_image(tmp_path):
    stored = ramp(lo=1000, hi=1080)  # HU -24..56, all inside the 40/400 window
    write_dicom(tmp_path / "images/ct.dcm", stored, RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    write_labels(tmp_path / "labels.csv", [("ct.dcm", "0")])
    got, _ = load(tmp_path)
    expected = (stored - 1024 - 39.5) / 399 + 0.5
    np.testing.assert_allclose(got.features[0, 0], expected, atol=1e-6)
    assert 0.3 < got.features.min() and got.features.max() < 0.6


def test_monochrome1_is_inverted_so_bright_means_dense(tmp_path):
    stored = ramp(dtype=np.uint16, lo=0, hi=4095)
    write_dicom(tmp_path / "images/cr.dcm", stored, photometric="MONOCHROME1", bits=12)
    write_dicom(tmp_path / "images/cr_voi.dcm", stored, photometric="MONOCHROME1", bits=12, WindowCenter=2048, WindowWidth=4096)
    write_labels(tmp_path / "labels.csv", [("cr.dcm", "1"), ("cr_voi.dcm", "1")])
    got, _ = load(tmp_path)
    np.testing.assert_allclose(got.features[0, 0], 1 - minmax(stored), atol=1e-6)
    windowed = np.clip((stored - 2047.5) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(got.features[1, 0], 1 - windowed, atol=1e-6)
    assert got.features[0, 0, 0, 0] == 1.0  # the lowest stored value is the densest


def test_rgb_becomes_bt601_luminance(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_dicom(tmp_path / "images/photo.dcm", rgb, photometric="RGB", bits=8)
    write_labels(tmp_path / "labels.csv", [("photo.dcm", "0")])
    got, _ = load(tmp_path)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    np.testing.assert_allclose(got.features[0, 0], minmax(luma), atol=1e-6)


def test_resize_keeps_aspect_by_centre_padding_and_matches_pil(tmp_path):
    wide = ramp((4, 8))
    big = np.random.default_rng(1).integers(0, 1000, (32, 32)).astype(np.int16)
    write_dicom(tmp_path / "images/wide.dcm", wide)
    write_dicom(tmp_path / "images/big.dcm", big)
    write_labels(tmp_path / "labels.csv", [("wide.dcm", "0"), ("big.dcm", "1")])
    got, _ = load(tmp_path)
    big_out, wide_out = got.features[:, 0]  # sorted by path
    np.testing.assert_array_equal(wide_out[:2], 0)
    np.testing.assert_array_equal(wide_out[6:], 0)
    np.testing.assert_allclose(wide_out[2:6], minmax(wide), atol=1e-6)
    pil = Image.fromarray(minmax(big).astype(np.float32), mode="F").resize((8, 8), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(big_out, np.asarray(pil), atol=1e-5)


@pytest.mark.parametrize("photometric, bits, signed, tags", [
    ("MONOCHROME2", 12, False, dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)),
    ("MONOCHROME1", 12, False, dict(WindowCenter=[2150, 1000], WindowWidth=[3700, 500], VOILUTFunction="SIGMOID")),
    ("MONOCHROME2", 16, True, dict(RescaleSlope=0.5, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=100, VOILUTFunction="LINEAR_EXACT")),
    ("MONOCHROME2", 16, True, dict(RescaleSlope=-2, RescaleIntercept=7)),  # a falling rescale: its extremes swap
    ("MONOCHROME1", 8, False, {}),
])
@pytest.mark.parametrize("window", ["voi", "minmax"])
def test_the_tabulated_transforms_give_pydicoms_values_to_the_last_bit(photometric, bits, signed, tags, window):
    rng = np.random.default_rng(bits)
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    frame = rng.integers(low, high, (37, 53)).astype(np.int16 if signed else (np.uint8 if bits == 8 else np.uint16))
    ds = Dataset()
    ds.BitsStored, ds.BitsAllocated, ds.PixelRepresentation, ds.PhotometricInterpretation = bits, frame.itemsize * 8, int(signed), photometric
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    for _ in range(2):  # the table is built, then served
        got = dicom._to_unit(frame, ds, window)
        windowed = window == "voi" and dicom._has_voi(ds)
        direct = dicom._unit(dicom._grayscale(frame, ds, windowed), windowed, photometric).astype(np.float32)
        np.testing.assert_array_equal(got, direct)  # to the last bit: these rescales are exact in float64
        assert got.dtype == np.float32 and 0 <= got.min() and got.max() <= 1


@pytest.mark.parametrize("allocated, stored, signed", [(8, 8, False), (8, 6, True), (16, 12, False), (16, 12, True), (16, 16, True), (16, 10, False)])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixels_are_read_in_place_exactly_as_pydicom_decodes_them(tmp_path, allocated, stored, signed, syntax):
    rng = np.random.default_rng(stored)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    raw = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (3, 5, 7), endpoint=True).astype(dtype)  # unused bits set at random
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = 5, 7, 3, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, int(signed)
    ds.PixelData = raw.tobytes()
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    for indices in ([0], [1], range(3)):
        ours = list(dicom._native_frames(ds, indices, 3))
        theirs = list(pydicom.pixels.iter_pixels(ds, indices=indices))
        assert [a.dtype for a in ours] == [b.dtype for b in theirs]
        np.testing.assert_array_equal(np.stack(ours), np.stack(theirs))


@pytest.mark.parametrize("frames, chosen", [("first", [0]), ("middle", [2]), ("all", [0, 1, 2, 3, 4])])
def test_multi_frame_rules(tmp_path, frames, chosen):
    stack = np.stack([np.roll(ramp(), 7 * i) for i in range(5)])  # min-max cannot hide a wrong frame
    write_dicom(tmp_path / "images/cine.dcm", stack, patient="P9")
    write_labels(tmp_path / "labels.csv", [("cine.dcm", "1")])
    got, report = load(tmp_path, frames=frames)
    assert len(got) == report.used == len(chosen)
    for sample, i in zip(got.features[:, 0], chosen):
        np.testing.assert_allclose(sample, minmax(stack[i]), atol=1e-6)
    expected_ids = [f"images/cine.dcm#frame{i}" for i in range(5)] if frames == "all" else ["images/cine.dcm"]
    assert got.sample_ids == expected_ids
    assert set(got.patient_ids) == {"P9"} and set(got.labels) == {1}


@pytest.mark.parametrize("groups", ["shared", "per frame"])
@pytest.mark.parametrize("classic, converter", [("CT_small.dcm", "LegacyConvertedEnhancedCTImage"), ("MR_small.dcm", "LegacyConvertedEnhancedMRImage")])
def test_an_enhanced_image_is_windowed_frame_by_frame_as_the_classic_slices_it_was_made_from(tmp_path, classic, converter, groups):
    import highdicom as hd
    from pydicom.data import get_testdata_file

    source = pydicom.dcmread(get_testdata_file(classic))
    slices = []
    for i in range(3):
        s = copy.deepcopy(source)
        s.SOPInstanceUID, s.InstanceNumber = generate_uid(), i + 1
        s.ImagePositionPatient = [*source.ImagePositionPatient[:2], float(source.ImagePositionPatient[2]) + 5 * i]
        s.PixelData = np.roll(source.pixel_array, 9 * i).tobytes()  # a frame out of order shows
        step = i if groups == "per frame" else 0
        s.RescaleSlope, s.RescaleIntercept = 1, -1024 + 7 * step
        s.WindowCenter, s.WindowWidth = 300 + 150 * step, 500 + 200 * step
        (tmp_path / "images" / "classic").mkdir(parents=True, exist_ok=True)
        s.save_as(tmp_path / "images" / "classic" / f"{i}.dcm")
        slices.append(s)
    enhanced = getattr(hd.legacy, converter)(slices, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.save_as(tmp_path / "images" / "enhanced.dcm")
    in_groups = enhanced.PerFrameFunctionalGroupsSequence[0] if groups == "per frame" else enhanced.SharedFunctionalGroupsSequence[0]
    assert "FrameVOILUTSequence" in in_groups and "WindowCenter" not in enhanced  # the converter put the window where Enhanced keeps it
    write_labels(tmp_path / "labels.csv", [("enhanced.dcm", "1")] + [(f"classic/{i}.dcm", "1") for i in range(3)])

    got, report = load(tmp_path, frames="all", image_size=32)
    plain, _ = load(tmp_path, frames="all", image_size=32, window="minmax")

    assert report.used == 6
    tensors = dict(zip(got.sample_ids, got.features[:, 0]))
    by_instance = {s.SOPInstanceUID: f"images/classic/{i}.dcm" for i, s in enumerate(slices)}
    for i, frame in enumerate(enhanced.PerFrameFunctionalGroupsSequence):
        classic_file = by_instance[frame.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(tensors[f"images/enhanced.dcm#frame{i}"], tensors[classic_file], atol=1e-6)
    assert not np.allclose(got.features, plain.features, atol=1e-3)  # the windows were applied, not min-max


# --- files and labels ---------------------------------------------------------------------------


def test_any_nesting_and_file_name_hidden_files_ignored_and_order_deterministic(tmp_path):
    names = ["b/deep/er/IMG 0001", "a/x (1).DCM", "c.bin", "a/z"]
    for i, name in enumerate(names):
        write_dicom(tmp_path / "images" / name, ramp() + i, patient=f"P{i}")
    (tmp_path / "images/.DS_Store").write_bytes(b"\0\1junk")
    write_dicom(tmp_path / "images/.trash/old.dcm", ramp())
    write_labels(tmp_path / "labels.csv", [(n, "1") for n in names])
    got, report = load(tmp_path)
    assert got.sample_ids == [f"images/{n}" for n in sorted(names)]
    assert report.skipped == [] and report.used == 4


@pytest.mark.parametrize("suffix", ["csv", "parquet", "feather"])
@pytest.mark.parametrize("key", ["sop_instance_uid", "patient_id", "path"])
def test_labels_join_by_each_key_kind(tmp_path, key, suffix):
    a = write_dicom(tmp_path / "images/a.dcm", ramp(), patient="007")
    b = write_dicom(tmp_path / "images/sub/b.dcm", ramp() + 1, patient="007")
    c = write_dicom(tmp_path / "images/c.dcm", ramp() + 2, patient="012")
    keys = {
        "sop_instance_uid": [a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID],
        "patient_id": ["007", "012"],  # one row per patient labels all their images
        "path": ["a.dcm", "sub/b.dcm", "c.dcm"],
    }[key]
    values = {"sop_instance_uid": ["1", "1", "0"], "patient_id": ["1", "0"], "path": ["1", "1", "0"]}[key]
    if suffix == "csv":
        write_labels(tmp_path / "labels.csv", list(zip(keys, values)), key="ID")
    else:  # a typed label column may be boolean
        write = pq.write_table if suffix == "parquet" else feather.write_feather
        write(pa.table({"ID": keys, "y": [v == "1" for v in values]}), tmp_path / f"labels.{suffix}")
    got, report = load(tmp_path, key=key, key_column="ID", labels=f"labels.{suffix}")
    assert got.sample_ids == ["images/a.dcm", "images/c.dcm", "images/sub/b.dcm"]
    assert got.labels.tolist() == [1, 0, 1] and got.labels.dtype == np.int64
    assert got.patient_ids.tolist() == ["007", "012", "007"]  # leading zeros kept
    assert report.skipped == []


@pytest.mark.parametrize(
    "rule, values, expected",
    [
        (LabelRule(column="y", positive_values=("died", "icu"), negative_values=("home",)), ["died", "home", "icu"], [1, 0, 1]),
        (LabelRule(column="y", threshold=0.5), ["0.7", "0.2", "0.5"], [1, 0, 1]),
        (LabelRule(column="y"), ["TRUE", "no", "yes"], [1, 0, 1]),
    ],
)
def test_label_rules(tmp_path, rule, values, expected):
    names = ["a.dcm", "b.dcm", "c.dcm"]
    for i, name in enumerate(names):
        write_dicom(tmp_path / "images" / name, ramp() + i)
    write_labels(tmp_path / "labels.csv", list(zip(names, values)))
    got, _ = load(tmp_path, label=rule)
    assert got.labels.tolist() == expected


def test_parquet_nan_and_null_labels_are_missing(tmp_path):
    names = ["a.dcm", "b.dcm", "c.dcm", "d.dcm"]
    for i, name in enumerate(names):
        write_dicom(tmp_path / "images" / name, ramp() + i)
    table = pa.table({"key": names, "y": pa.array([0.9, float("nan"), None, 0.1], pa.float64())})
    pq.write_table(table, tmp_path / "labels.parquet")
    got, report = load(tmp_path, labels="labels.parquet", label=LabelRule(column="y", threshold=0.5))
    assert got.sample_ids == ["images/a.dcm", "images/d.dcm"] and got.labels.tolist() == [1, 0]
    assert skipped(report) == {
        "images/b.dcm": "missing_label", "images/c.dcm": "missing_label",
        "labels.parquet row 2": "missing_label", "labels.parquet row 3": "missing_label",
    }


def test_every_skip_reason_is_recorded_and_the_rest_is_used(tmp_path):
    img = tmp_path / "images"
    good = write_dicom(img / "good.dcm", ramp())
    write_dicom(img / "cut_pixels.dcm", ramp())
    write_dicom(img / "cut_header.dcm", ramp())
    data = (img / "cut_pixels.dcm").read_bytes()
    (img / "cut_pixels.dcm").write_bytes(data[:-20])
    (img / "cut_header.dcm").write_bytes(data[: -128 - 2])  # inside the PixelData element's length
    (img / "notes.txt").write_text("not an image\n")
    no_pixels = write_dicom(img / "no_pixels.dcm", ramp())
    del no_pixels.PixelData
    no_pixels.save_as(img / "no_pixels.dcm", enforce_file_format=True)
    mpeg = write_dicom(img / "video.dcm", ramp(dtype=np.uint8), bits=8)
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    mpeg.save_as(img / "video.dcm", enforce_file_format=True)
    broken_jpeg = write_dicom(img / "broken.dcm", ramp(dtype=np.uint8), bits=8)
    broken_jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    broken_jpeg.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"])
    broken_jpeg.save_as(img / "broken.dcm", enforce_file_format=True)
    for name in ["unlabelled.dcm", "nan.dcm", "conflict.dcm", "maybe.dcm"]:
        write_dicom(img / name, ramp())
    names = ["good.dcm", "cut_pixels.dcm", "cut_header.dcm", "notes.txt", "no_pixels.dcm", "video.dcm", "broken.dcm"]
    rows = [(n, "1") for n in names] + [("nan.dcm", "NaN"), ("conflict.dcm", "1"), ("conflict.dcm", "0")]
    rows += [("gone.dcm", "1"), ("maybe.dcm", "maybe")]
    write_labels(tmp_path / "labels.csv", rows)

    # With the rule said in full, "maybe" is a value of neither list: it costs its row, named.
    got, report = load(tmp_path, label=LabelRule(column="y", positive_values=("1",), negative_values=("0",)))

    assert got.sample_ids == ["images/good.dcm"] and report.used == 1
    assert skipped(report) == {
        "images/cut_pixels.dcm": "unreadable_dicom",
        "images/cut_header.dcm": "unreadable_dicom",
        "images/notes.txt": "not_dicom",
        "images/no_pixels.dcm": "no_pixel_data",
        "images/video.dcm": "no_decoder",
        "images/broken.dcm": "decode_error",
        "images/unlabelled.dcm": "image_without_label",
        "images/nan.dcm": "missing_label",
        "labels.csv row 8": "missing_label",
        "images/conflict.dcm": "conflicting_label",
        "labels.csv row 9": "conflicting_label",
        "labels.csv row 10": "conflicting_label",
        "labels.csv row 11": "label_without_image",
        "images/maybe.dcm": "unlisted_label",
        "labels.csv row 12": "unlisted_label",
    }
    assert "'maybe'" in next(s.detail for s in report.skipped if s.source == "labels.csv row 12")
    no_decoder = next(s for s in report.skipped if s.reason == "no_decoder")
    assert MPEG2MPML in no_decoder.detail and no_decoder.field == "TransferSyntaxUID"
    assert all(good.PatientID not in s.detail for s in report.skipped)


def test_missing_folder_label_file_or_column_raises_naming_file_and_column(tmp_path):
    with pytest.raises(DataError, match=r"images.*data\.dicom\.images"):
        load(tmp_path)
    write_dicom(tmp_path / "images/a.dcm", ramp())
    with pytest.raises(DataError, match="labels.csv"):
        load(tmp_path)
    write_labels(tmp_path / "labels.csv", [("a.dcm", "1")], label="outcome")
    with pytest.raises(DataError, match=r"labels\.csv.*'y'.*label\.column"):
        load(tmp_path)
    with pytest.raises(DataError, match=r"labels\.csv.*'SOP'.*key_column"):
        load(tmp_path, key_column="SOP", label=LabelRule(column="outcome"))


def test_a_bad_label_table_gets_the_table_adapters_message(tmp_path):
    write_dicom(tmp_path / "images/a.dcm", ramp())
    (tmp_path / "labels.csv").write_text("key,y\na.dcm,1\nb.dcm,SECRET,0\n")
    with pytest.raises(DataError, match=r"labels\.csv: line 3 has 3 fields, expected 2 like the header") as error:
        load(tmp_path)
    assert "SECRET" not in str(error.value)
    as_ehr_table = TableSpec(file="labels.csv", features=(FeatureSpec(name="key", type="categorical"),),
                             label=LabelRule(column="y"))
    with pytest.raises(DataError) as table_error:
        load_table(tmp_path, as_ehr_table, DataReport("h"))
    assert str(error.value) == str(table_error.value)

    (tmp_path / "labels.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"labels\.xlsx: unknown table format '\.xlsx'; expected one of \.parquet, \.csv"):
        load(tmp_path, labels="labels.xlsx")


def test_no_usable_image_gives_empty_samples(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/readme.txt").write_text("nothing here")
    write_labels(tmp_path / "labels.csv", [])
    got, report = load(tmp_path, image_size=16)
    assert got.features.shape == (0, 1, 16, 16) and got.features.dtype == np.float32
    assert len(got) == 0 and report.used == 0 and got.labels.dtype == np.int64
    assert skipped(report) == {"images/readme.txt": "not_dicom"}


def test_broken_links_and_special_files_are_recorded_and_linked_files_used(tmp_path):
    write_dicom(tmp_path / "elsewhere/real.dcm", ramp())
    (tmp_path / "images").mkdir()
    (tmp_path / "images/linked.dcm").symlink_to(tmp_path / "elsewhere/real.dcm")
    (tmp_path / "images/gone.dcm").symlink_to(tmp_path / "elsewhere/deleted.dcm")
    os.mkfifo(tmp_path / "images/pipe")  # reading it would block: it must be recorded, not opened
    write_labels(tmp_path / "labels.csv", [("linked.dcm", "1"), ("gone.dcm", "0"), ("pipe", "1")])
    got, report = load(tmp_path)
    assert got.sample_ids == ["images/linked.dcm"]
    assert skipped(report) == {"images/gone.dcm": "unreadable_dicom", "images/pipe": "not_dicom"}
    gone = next(s for s in report.skipped if s.source == "images/gone.dcm")
    assert gone.field == "file" and "broken link" in gone.detail


def bare_dataset(path: Path, pixels: np.ndarray, implicit_vr: bool, little_endian: bool) -> None:
    """The dataset alone, as older systems write it: no preamble, no 'DICM', no file meta."""
    ds = write_dicom(path, pixels)
    del ds.file_meta
    ds.preamble = None
    if not little_endian:  # pydicom writes the pixel bytes as they are, so swap them here
        ds.PixelData = pixels.byteswap().tobytes()
    ds.save_as(path, implicit_vr=implicit_vr, little_endian=little_endian)


@pytest.mark.parametrize("implicit_vr, little_endian", [(True, True), (False, True), (False, False)])
def test_a_bare_dataset_without_preamble_is_read_in_its_encoding(tmp_path, implicit_vr, little_endian):
    stored = ramp(lo=-300, hi=900)
    bare_dataset(tmp_path / "images/old.dcm", stored, implicit_vr, little_endian)
    assert (tmp_path / "images/old.dcm").read_bytes()[128:132] != b"DICM"
    (tmp_path / "images/notes.txt").write_text("Rows,Columns\n512,512\n")  # text stays not DICOM
    write_labels(tmp_path / "labels.csv", [("old.dcm", "1"), ("notes.txt", "0")])
    got, report = load(tmp_path)
    assert got.sample_ids == ["images/old.dcm"]
    np.testing.assert_allclose(got.features[0, 0], minmax(stored), atol=1e-6)
    assert skipped(report) == {"images/notes.txt": "not_dicom"}


def test_pydicom_logs_nothing_while_files_are_read_and_decoded(tmp_path, caplog):
    broken_jpeg = write_dicom(tmp_path / "images/broken.dcm", ramp(dtype=np.uint8), bits=8)
    broken_jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    broken_jpeg.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"])
    broken_jpeg.save_as(tmp_path / "images/broken.dcm", enforce_file_format=True)
    (tmp_path / "images/junk.bin").write_bytes(bytes(range(256)) * 4)
    write_labels(tmp_path / "labels.csv", [("broken.dcm", "1"), ("junk.bin", "0")])
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        _, report = load(tmp_path)
        assert logging.getLogger("pydicom").level == logging.DEBUG  # restored after each file
    assert skipped(report) == {"images/broken.dcm": "decode_error", "images/junk.bin": "not_dicom"}
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []


def test_patient_defaults_to_the_sample_and_fingerprint_follows_content(tmp_path):
    write_dicom(tmp_path / "images/anon.dcm", ramp(), patient=None)
    write_dicom(tmp_path / "images/empty.dcm", ramp() + 1, patient="")
    write_labels(tmp_path / "labels.csv", [("anon.dcm", "1"), ("empty.dcm", "0")])
    first, _ = load(tmp_path)
    assert first.patient_ids.tolist() == ["images/anon.dcm", "images/empty.dcm"]
    assert load(tmp_path)[0].fingerprint == first.fingerprint
    write_dicom(tmp_path / "images/anon.dcm", ramp() + 5, patient=None)
    assert load(tmp_path)[0].fingerprint != first.fingerprint


def test_under_patient_level_dp_an_image_naming_no_patient_is_skipped_never_counted_as_one(tmp_path):
    write_dicom(tmp_path / "images/anon.dcm", ramp(), patient=None)
    write_dicom(tmp_path / "images/known.dcm", ramp() + 1, patient="P7")
    write_labels(tmp_path / "labels.csv", [("anon.dcm", "1"), ("known.dcm", "0")])
    report = DataReport("h")
    samples = load_dicom(tmp_path, spec(), report, require_patient_id=True)
    assert samples.patient_ids.tolist() == ["P7"] and report.counts() == {"no_patient_id": 1}


# --- cache --------------------------------------------------------------------------------------


def test_cache_serves_the_second_load_and_never_a_stale_setting(tmp_path):
    stored = ramp(lo=800, hi=1400)
    write_dicom(tmp_path / "images/ct.dcm", stored, RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    write_dicom(tmp_path / "images/multi.dcm", np.stack([ramp(), ramp() * 2, ramp()[::-1]]))
    write_labels(tmp_path / "labels.csv", [("ct.dcm", "1"), ("multi.dcm", "0")])
    cache = tmp_path / "cache"
    decoded = dicom.stats["decoded"]

    first, _ = load(tmp_path, cache)
    assert dicom.stats["decoded"] == decoded + 2
    hits = dicom.stats["cache_hits"]
    second, _ = load(tmp_path, cache)
    assert dicom.stats["decoded"] == decoded + 2 and dicom.stats["cache_hits"] == hits + 2
    np.testing.assert_array_equal(first.features, second.features)
    content_hash = blake3.blake3((tmp_path / "images/ct.dcm").read_bytes()).hexdigest()
    (pack,) = cache.iterdir()  # one pack for the load, an entry per file
    assert sorted(np.load(pack)["digests"]) == sorted([content_hash, blake3.blake3((tmp_path / "images/multi.dcm").read_bytes()).hexdigest()])

    minmaxed, _ = load(tmp_path, cache, window="minmax")
    assert dicom.stats["decoded"] == decoded + 4
    np.testing.assert_allclose(minmaxed.features[0, 0], minmax(stored), atol=1e-6)
    assert not np.allclose(minmaxed.features[0], first.features[0])
    bigger, _ = load(tmp_path, cache, image_size=16)
    assert bigger.features.shape == (2, 1, 16, 16) and dicom.stats["decoded"] == decoded + 6
    all_frames, _ = load(tmp_path, cache, frames="all")
    assert len(all_frames) == 4 and dicom.stats["decoded"] == decoded + 8
    assert len(list(cache.iterdir())) == 4 and not any(p.name.startswith(".") for p in cache.iterdir())  # no partial pack left


@pytest.mark.parametrize("damage", ["emptied", "cut short", "one byte flipped"])
def test_a_damaged_cache_entry_is_decoded_again_never_served(tmp_path, damage):
    write_dicom(tmp_path / "images/a.dcm", ramp())
    write_dicom(tmp_path / "images/b.dcm", ramp()[::-1])  # two entries of one damaged pack: each decoded again
    write_labels(tmp_path / "labels.csv", [("a.dcm", "1"), ("b.dcm", "0")])
    cache = tmp_path / "cache"
    first, _ = load(tmp_path, cache)
    (pack,) = cache.iterdir()
    data = bytearray(pack.read_bytes())
    member = zipfile.ZipFile(pack).getinfo("frames.npy")
    assert np.load(pack)["frames"].shape == (2, 8, 8)  # a pack is a plain .npz at heart
    if damage == "emptied":  # what a crash before the data reached the disk leaves
        data = b""
    elif damage == "cut short":
        data = data[: len(data) // 2]
    else:  # the last pixel's last byte: still a zip, an .npy and a float, with one wrong pixel
        data[member.header_offset + 30 + len(member.filename) + member.file_size - 1] ^= 0x01
    pack.write_bytes(bytes(data))
    decoded, hits = dicom.stats["decoded"], dicom.stats["cache_hits"]

    again, _ = load(tmp_path, cache)
    np.testing.assert_array_equal(again.features, first.features)
    assert dicom.stats["decoded"] == decoded + 2 and dicom.stats["cache_hits"] == hits
    load(tmp_path, cache)  # a new pack holds the entries, read before the damaged one
    assert dicom.stats["decoded"] == decoded + 2 and dicom.stats["cache_hits"] == hits + 2


# --- pydicom's own test files -------------------------------------------------------------------


def test_pydicom_bundled_files_decode_or_are_skipped_with_a_known_reason(tmp_path):
    bundled = Path(pydicom.__file__).parent / "data" / "test_files"
    shutil.copytree(bundled, tmp_path / "images")
    files = sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*") if p.is_file())
    write_labels(tmp_path / "labels.csv", [(f, str(i % 2)) for i, f in enumerate(files)])

    got, report = load(tmp_path, frames="all", image_size=16)

    used_files = {s.split("#")[0] for s in got.sample_ids}
    print(f"{len(used_files)} of {len(files)} bundled files used ({len(got)} samples); skipped: {report.counts()}")
    assert len(used_files) >= 60
    assert {s.reason for s in report.skipped} <= SKIP_REASONS
    assert used_files | {s.source for s in report.skipped} == {f"images/{f}" for f in files}  # each file accounted for
    assert got.features.shape == (len(got), 1, 16, 16)
    assert np.isfinite(got.features).all() and got.features.min() >= 0 and got.features.max() <= 1
    assert report.counts()["no_pixel_data"] > 0 and report.counts()["not_dicom"] > 0
    assert skipped(report)["images/MR_truncated.dcm"] == "unreadable_dicom"
    # Bare datasets (no preamble, no file meta) are read; these hold no image.
    for name in ["rtstruct.dcm", "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"]:
        assert skipped(report)[f"images/{name}"] == "no_pixel_data"
    for name in ["README.txt", "test1.json", "zipMR.gz", "rtplan.dump"]:
        assert skipped(report)[f"images/{name}"] == "not_dicom"


def test_jpeg_lossless_and_12_bit_jpeg_extended_are_decoded_as_their_uncompressed_pictures(tmp_path):
    import imagecodecs
    from pydicom.data import get_testdata_file

    # GDCM's JPEG Lossless file holds the picture of pydicom's RLE file (the same SOPInstanceUID,
    # so each is read by a hospital of its own).
    tensors = {}
    for name in ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"]:
        shutil.copy(get_testdata_file(name), _folder(tmp_path / name / "images") / name)
        write_labels(tmp_path / name / "labels.csv", [(name, "1")])
        got, report = load(tmp_path / name, image_size=32)
        assert report.used == 1, report.skipped
        tensors[name] = got.features[0]
    np.testing.assert_array_equal(tensors["SC_rgb_jpeg_gdcm.dcm"], tensors["SC_rgb_rle.dcm"])

    # A signed 16-bit CT slice as JPEG Lossless, first-order prediction (1.2.840.10008.1.2.4.70).
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.save_as(_folder(tmp_path / "ct" / "images") / "classic.dcm")
    lossless = copy.deepcopy(ct)
    lossless.SOPInstanceUID = generate_uid()
    stream = imagecodecs.jpeg8_encode(ct.pixel_array.view(np.uint16), lossless=True, predictor=1, bitspersample=16)
    lossless.PixelData, lossless.file_meta.TransferSyntaxUID = encapsulate([stream]), JPEGLosslessSV1
    lossless["PixelData"].VR = "OB"
    lossless.save_as(tmp_path / "ct" / "images" / "lossless.dcm")
    # 12-bit JPEG Extended (1.2.840.10008.1.2.4.51), which Pillow does not read.
    shutil.copy(get_testdata_file("JPEG-lossy.dcm"), tmp_path / "ct" / "images" / "extended.dcm")
    write_labels(tmp_path / "ct" / "labels.csv", [("classic.dcm", "1"), ("lossless.dcm", "1"), ("extended.dcm", "0")])

    got, report = load(tmp_path / "ct", image_size=32)

    assert report.used == 3, report.skipped
    classic, extended, lossless_tensor = (got.features[got.sample_ids.index(f"images/{n}.dcm")] for n in ["classic", "extended", "lossless"])
    np.testing.assert_array_equal(lossless_tensor, classic)
    # The values pydicom's own tests hold for this file's decoded pixels.
    pixels = pydicom.pixels.pixel_array(tmp_path / "ct" / "images" / "extended.dcm")
    assert (pixels[420, 140], pixels[230, 120]) == (244, 95) and extended.std() > 0


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def jpeg_with_header(sof_rows: int, sof_columns: int, rows: int = 8, columns: int = 8) -> Dataset:
    """A DICOM JPEG Baseline image of Rows x Columns whose stream's start of frame claims other
    dimensions, the stream itself a few hundred bytes."""
    buffer = io.BytesIO()
    Image.fromarray(ramp(dtype=np.uint8, hi=255)).save(buffer, format="JPEG")
    stream = bytearray(buffer.getvalue())
    sof = stream.index(b"\xff\xc0")
    stream[sof + 5:sof + 9] = struct.pack(">HH", sof_rows, sof_columns)
    return encapsulated(bytes(stream), JPEGBaseline8Bit, rows, columns)


def encapsulated(stream: bytes, syntax, rows: int, columns: int, samples: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.Rows, ds.Columns, ds.SamplesPerPixel = "P1", rows, columns, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    return ds


def test_a_compressed_stream_claiming_a_huge_or_another_image_is_refused_before_decoding(tmp_path):
    images = _folder(tmp_path / "images")
    write_dicom(images / "good.dcm", ramp())
    jpeg_with_header(8, 8).save_as(images / "jpeg_ok.dcm", enforce_file_format=True)
    jpeg_with_header(60000, 60000).save_as(images / "jpeg_bomb.dcm", enforce_file_format=True)
    jpeg_with_header(16, 8).save_as(images / "jpeg_taller.dcm", enforce_file_format=True)
    buffer = io.BytesIO()
    Image.fromarray(ramp(dtype=np.uint8, hi=255)).save(buffer, format="JPEG2000", no_jp2=True)
    j2k = bytearray(buffer.getvalue())
    assert len(j2k) < 1000
    j2k[8:16] = struct.pack(">II", 50000, 50000)  # the SIZ segment's Xsiz, Ysiz
    encapsulated(bytes(j2k), JPEG2000Lossless, 8, 8).save_as(images / "j2k_bomb.dcm", enforce_file_format=True)
    write_labels(tmp_path / "labels.csv", [(n, "1") for n in ["good.dcm", "jpeg_ok.dcm", "jpeg_bomb.dcm", "jpeg_taller.dcm", "j2k_bomb.dcm"]])

    got, report = load(tmp_path)

    assert got.sample_ids == ["images/good.dcm", "images/jpeg_ok.dcm"]
    details = {s.source: (s.reason, s.field, s.detail) for s in report.skipped}
    assert details["images/jpeg_bomb.dcm"][:2] == ("image_too_large", "PixelData") and "60000 x 60000 x 1" in details["images/jpeg_bomb.dcm"][2]
    assert details["images/j2k_bomb.dcm"][:2] == ("image_too_large", "PixelData") and "50000 x 50000 x 1" in details["images/j2k_bomb.dcm"][2]
    assert details["images/jpeg_taller.dcm"][:2] == ("decode_error", "PixelData")
    assert "16 x 8 x 1" in details["images/jpeg_taller.dcm"][2] and "declare 8 x 8 x 1" in details["images/jpeg_taller.dcm"][2]


def test_a_file_too_large_to_read_whole_is_skipped_unread(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_dicom(images / "ok.dcm", ramp())
    with open(images / "huge.dcm", "wb") as f:  # sparse: the size is declared, not written
        f.truncate(dicom.MAX_FILE_BYTES + 1)
    write_labels(tmp_path / "labels.csv", [("ok.dcm", "1"), ("huge.dcm", "0")])
    samples, report = load(tmp_path)
    assert samples.sample_ids == ["images/ok.dcm"] and skipped(report)["images/huge.dcm"] == "image_too_large"


def test_objects_that_are_not_images_are_reported_by_their_sop_class_and_the_images_used(tmp_path):
    import highdicom as hd
    from pydicom.data import get_testdata_file
    from pydicom.sr.codedict import codes

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mask = np.zeros((1, ct.Rows, ct.Columns), bool)
    mask[0, 20:40, 20:40] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=[ct], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedward tests",
        manufacturer_model_name="none", software_versions="0", device_serial_number="0",
    )
    (tmp_path / "images").mkdir()
    seg.save_as(tmp_path / "images" / "seg.dcm")
    shutil.copy(get_testdata_file("rtdose.dcm"), tmp_path / "images" / "dose.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "images" / "ct.dcm")
    write_labels(tmp_path / "labels.csv", [("seg.dcm", "1"), ("dose.dcm", "0"), ("ct.dcm", "1")])

    got, report = load(tmp_path)

    assert got.sample_ids == ["images/ct.dcm"]
    details = {s.source: (s.reason, s.field, s.detail) for s in report.skipped}
    assert details["images/seg.dcm"][:2] == ("not_an_image", "SOPClassUID") and "Segmentation Storage" in details["images/seg.dcm"][2]
    assert details["images/dose.dcm"][:2] == ("not_an_image", "SOPClassUID") and "RT Dose Storage" in details["images/dose.dcm"][2]


def test_an_instance_exported_twice_is_used_once_and_a_study_keeps_images_without_a_patient_together(tmp_path):
    from pydicom.data import get_testdata_file

    # pydicom's MR_small in two transfer syntaxes: one SOP instance, exported twice.
    (tmp_path / "images").mkdir()
    for name in ("MR_small.dcm", "MR_small_RLE.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / "images" / name)
    write_dicom(tmp_path / "images/a/first.dcm", ramp(), patient=None, StudyInstanceUID="1.2.3")
    (tmp_path / "images/b").mkdir()
    shutil.copy(tmp_path / "images/a/first.dcm", tmp_path / "images/b/copy.dcm")  # the same file under another name
    write_dicom(tmp_path / "images/c/second.dcm", ramp() + 1, patient=None, StudyInstanceUID="1.2.3")
    write_labels(tmp_path / "labels.csv", [(k, "1") for k in ("MR_small.dcm", "MR_small_RLE.dcm", "a/first.dcm", "b/copy.dcm", "c/second.dcm")])

    got, report = load(tmp_path)

    assert got.sample_ids == ["images/MR_small.dcm", "images/a/first.dcm", "images/c/second.dcm"]
    details = {s.source: s.detail for s in report.skipped if s.reason == "duplicate_instance"}
    assert details == {"images/MR_small_RLE.dcm": "the same SOPInstanceUID as images/MR_small.dcm, which is used",
                       "images/b/copy.dcm": "the same SOPInstanceUID as images/a/first.dcm, which is used"}
    # No PatientID: the study's two images are one unit of the split, and the report says why.
    assert got.patient_ids.tolist()[1:] == ["study 1.2.3", "study 1.2.3"]
    assert report.notes["PatientID"] == "2 image(s) name no patient: each was split with the other images of its StudyInstanceUID"


def test_path_keys_match_relative_to_the_hospital_or_the_images_folder_with_dots_and_backslashes(tmp_path):
    for name in ("ct/a.dcm", "ct/b.dcm", "ct/c.dcm", "mr/d.dcm"):
        write_dicom(tmp_path / "images" / name, ramp())
    write_labels(tmp_path / "labels.csv", [
        ("images/ct/a.dcm", "1"),  # relative to the hospital's folder
        ("./ct/b.dcm", "0"),  # with a leading ./
        ("ct\\c.dcm", "1"),  # written on Windows
        ("mr/D.dcm", "0"),  # a key of no file: the message names the nearest file
    ])

    got, report = load(tmp_path)

    assert got.sample_ids == ["images/ct/a.dcm", "images/ct/b.dcm", "images/ct/c.dcm"] and got.labels.tolist() == [1, 0, 1]
    details = {s.source: s.detail for s in report.skipped}
    assert details["images/mr/d.dcm"] == "no row of labels.csv matches its key 'mr/d.dcm'; the nearest is 'mr/D.dcm'"
    assert details["labels.csv row 4"] == "no image matches this key 'mr/D.dcm'; the nearest is 'mr/d.dcm'"


def test_a_linked_folder_is_read_once_and_a_loop_or_a_second_link_is_reported(tmp_path):
    write_dicom(tmp_path / "images/ct/a.dcm", ramp())
    write_dicom(tmp_path / "archive/mr/b.dcm", ramp() + 1)
    (tmp_path / "images/mr").symlink_to(tmp_path / "archive/mr")  # a folder kept elsewhere: read
    (tmp_path / "images/ct/again").symlink_to(tmp_path / "images/ct")  # a loop
    (tmp_path / "images/mr_again").symlink_to(tmp_path / "archive/mr")  # the same folder twice: the first in path order is read
    write_labels(tmp_path / "labels.csv", [("ct/a.dcm", "1"), ("mr/b.dcm", "0")])

    got, report = load(tmp_path)

    assert got.sample_ids == ["images/ct/a.dcm", "images/mr/b.dcm"]
    assert {s.source: (s.reason, s.detail) for s in report.skipped} == {
        "images/ct/again": ("folder_linked_again", "a link to the folder images/ct, read already: its files are read once"),
        "images/mr_again": ("folder_linked_again", "a link to the folder images/mr, read already: its files are read once"),
    }


def test_pixel_data_longer_than_declared_is_read_as_declared_and_noted(tmp_path):
    ds = write_dicom(tmp_path / "images/long.dcm", ramp())
    ds.PixelData = ds.PixelData + bytes(64)  # 32 more pixels than 8 x 8
    ds.save_as(tmp_path / "images/long.dcm", enforce_file_format=True)
    write_dicom(tmp_path / "images/fine.dcm", ramp() + 1)
    write_labels(tmp_path / "labels.csv", [("long.dcm", "1"), ("fine.dcm", "0")])

    got, report = load(tmp_path)

    assert got.sample_ids == ["images/fine.dcm", "images/long.dcm"] and report.skipped == []
    np.testing.assert_allclose(got.features[1, 0], minmax(ramp()), atol=1e-6)  # the declared 8 x 8
    assert report.notes["PixelData"] == "1 image(s) hold more pixel bytes than Rows x Columns x frames declare; the declared part was read (the first: images/long.dcm)"
