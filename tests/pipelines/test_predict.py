"""`fedward predict` on a hospital's held-out patients, with their labels removed, scores exactly as
evaluation does; input that does not fit the model is refused naming the file and the field."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from fedward.actors.hospital import Hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward.config import parse_config
from fedward.errors import ConfigError, DataError
from fedward.types import RoundPlan
from fedward.models.export import load_exported
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.pipelines.cli import main
from fedward.pipelines.predict import predict
from tests.conftest import ehr_config, image_config


def trained_site(hospital: Hospital, preprocessing: dict | None) -> SimpleNamespace:
    """One round of training at `hospital`, its model exported, and what evaluation scores on its
    held-out samples with the new weights."""
    torch.manual_seed(0)
    shape = hospital.prepare(preprocessing)
    weights, layout = flatten(build_model(hospital.config.model, shape), hospital.personal)
    update = hospital.fit(RoundPlan(1, hospital.name, seed=5, local_epochs=1, lr=hospital.config.train.lr), weights, layout)
    weights = weights + update.delta
    model_dir = Path(hospital.export_model(1, weights, layout, "run-1"))
    hospital.evaluate(1, weights, layout)  # the model exactly as evaluation uses it, in eval mode
    with torch.no_grad():
        expected = torch.sigmoid(hospital.model(hospital.x[hospital.holdout_idx]).squeeze(1)).numpy()
    held_out = [hospital.samples.sample_ids[i] for i in hospital.holdout_idx]
    return SimpleNamespace(hospital=hospital, model_dir=model_dir, expected=expected, held_out=held_out)


@pytest.fixture(scope="module")
def table_site(demo_data, tmp_path_factory):
    # FedPer: the output layer is the hospital's own, so its export must carry it.
    raw = ehr_config(demo_data, tmp_path_factory.mktemp("predict-ehr"))
    raw["strategy"] = {"name": "fedper"}
    config = parse_config(raw)
    hospital = Hospital("hospital_a", config, "run-1")
    hospital.load(record=False)
    spec = merge_summaries([hospital.summarize()], config.data.table).to_dict()
    return trained_site(hospital, spec)


@pytest.fixture(scope="module")
def image_site(demo_data, tmp_path_factory):
    raw = image_config(demo_data, tmp_path_factory.mktemp("predict-images"))
    hospital = Hospital("hospital_b", parse_config(raw), "run-1")
    hospital.load(record=False)
    return trained_site(hospital, None)


def held_out_rows(site: SimpleNamespace, dest: Path) -> Path:
    """The held-out patients' rows as a new export would hold them: no outcome column, Parquet."""
    table = pacsv.read_csv(site.hospital.data_dir / "ehr.csv").drop_columns(["discharge_status"])
    rows = [int(sample.removeprefix("row ")) - 1 for sample in site.held_out]
    pq.write_table(table.take(rows), dest)
    return dest


def test_a_hospitals_exported_model_keeps_its_own_layers_in_its_own_area(table_site):
    hospital = table_site.hospital
    assert table_site.model_dir == hospital.work_dir / "runs" / "run-1" / "model"
    loaded = load_exported(table_site.model_dir)
    model, card = loaded.model, loaded.card
    assert (card.kind, card.hospital, card.run_id, card.round) == ("personalized", "hospital_a", "run-1", 1)
    own, exported = hospital.model.state_dict(), model.state_dict()
    assert list(exported) == list(own) and all(torch.equal(v, own[k]) for k, v in exported.items())
    torch.manual_seed(hospital.config.run.seed)  # the head as `prepare` built it, before training
    untrained = build_model(hospital.config.model, card.input_shape).state_dict()
    assert hospital.personal and all(not torch.equal(exported[k], untrained[k]) for k in hospital.personal)


def test_table_predictions_equal_the_models_outputs_in_evaluation(table_site, tmp_path):
    new = held_out_rows(table_site, tmp_path / "new_patients.parquet")
    done = predict(table_site.model_dir, new, tmp_path / "scores.parquet")
    assert (done.scored, done.skipped) == (len(table_site.held_out), {})

    scores = pq.read_table(done.out)
    assert scores.column_names == ["sample_id", "patient_id", "probability"]
    assert scores["sample_id"].to_pylist() == [f"row {i + 1}" for i in range(len(table_site.held_out))]
    hospital = table_site.hospital
    assert scores["patient_id"].to_pylist() == hospital.samples.patient_ids[hospital.holdout_idx].tolist()
    np.testing.assert_allclose(scores["probability"].to_numpy(), table_site.expected, rtol=0, atol=1e-6)


def test_image_predictions_equal_the_models_outputs_in_evaluation(image_site, tmp_path):
    data_dir = image_site.hospital.data_dir
    new = tmp_path / "new_scans"
    for sample in image_site.held_out:  # the held-out files only, in their folders, without labels
        (new / sample).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / sample, new / sample)
    (new / "README.txt").write_text("scanned on ward 3\n")  # not DICOM: skipped and counted, not fatal
    nan = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    nan[2, 3] = np.nan
    write_float_dicom(new / "nan.dcm", nan)  # a float image holding NaN: refused, never scored as a black image

    done = predict(image_site.model_dir, new, tmp_path / "scores.csv")
    assert (done.scored, done.skipped) == (len(image_site.held_out), {"decode_error": 1, "not_dicom": 1})
    beside = pacsv.read_csv(done.skipped_file).to_pylist()
    assert done.skipped_file == tmp_path / "scores.skipped.csv"
    assert [(r["source"], r["reason"]) for r in beside] == [("README.txt", "not_dicom"), ("nan.dcm", "decode_error")]
    assert beside[1]["detail"] == "the pixel data holds NaN or infinite values"
    scores = pacsv.read_csv(done.out, convert_options=pacsv.ConvertOptions(column_types={"patient_id": pa.string()}))
    assert scores.column_names == ["sample_id", "patient_id", "probability"]
    by_id = dict(zip(scores["sample_id"].to_pylist(), scores["probability"].to_pylist()))
    assert sorted(by_id) == sorted(image_site.held_out)
    np.testing.assert_allclose([by_id[s] for s in image_site.held_out], image_site.expected, rtol=0, atol=1e-6)


def test_rows_that_cannot_be_read_are_skipped_and_counted(table_site, tmp_path):
    table = pq.read_table(held_out_rows(table_site, tmp_path / "rows.parquet")).cast(
        pa.schema([pa.field(name, pa.string()) for name in pq.read_schema(tmp_path / "rows.parquet").names])
    )
    ages = table["age"].to_pylist()
    ages[0], ages[2] = "about sixty", "58 y"
    pacsv.write_csv(table.set_column(table.column_names.index("age"), "age", pa.array(ages)), tmp_path / "rows.csv")
    done = predict(table_site.model_dir, tmp_path / "rows.csv", tmp_path / "scores.csv")
    assert (done.scored, done.skipped) == (len(table_site.held_out) - 2, {"bad_value": 2})
    scores = pacsv.read_csv(done.out)
    assert scores["sample_id"].to_pylist()[:2] == ["row 2", "row 4"]
    np.testing.assert_allclose(scores["probability"].to_numpy()[:2], table_site.expected[[1, 3]], rtol=0, atol=1e-6)


def test_input_that_does_not_fit_the_model_is_refused_naming_file_and_field(table_site, image_site, tmp_path):
    table = pq.read_table(held_out_rows(table_site, tmp_path / "rows.parquet"))
    pq.write_table(table.drop_columns(["creatinine"]), tmp_path / "no_creatinine.parquet")
    with pytest.raises(DataError, match=r"no_creatinine\.parquet: column 'creatinine' \(numeric\) is missing"):
        predict(table_site.model_dir, tmp_path / "no_creatinine.parquet", tmp_path / "out.csv")

    ages = pa.array(["unknown"] * table.num_rows)
    pq.write_table(table.set_column(table.column_names.index("age"), "age", ages), tmp_path / "text_ages.parquet")
    with pytest.raises(DataError, match=r"text_ages\.parquet: column 'age' should hold numeric values"):
        predict(table_site.model_dir, tmp_path / "text_ages.parquet", tmp_path / "out.csv")

    images = image_site.hospital.data_dir / "images"
    with pytest.raises(DataError, match=r"images is a folder, but the model in .* scores table rows: give one CSV, Parquet or Arrow file"):
        predict(table_site.model_dir, images, tmp_path / "out.csv")
    with pytest.raises(DataError, match=r"rows\.parquet is a file, but the model in .* scores DICOM images"):
        predict(image_site.model_dir, tmp_path / "rows.parquet", tmp_path / "out.csv")

    (tmp_path / "exports").mkdir()
    shutil.copy(tmp_path / "rows.parquet", tmp_path / "exports" / "rows.parquet")
    with pytest.raises(DataError, match=r"exports: no readable DICOM image in this folder; skipped per reason: \{'not_dicom': 1\}"):
        predict(image_site.model_dir, tmp_path / "exports", tmp_path / "out.csv")
    with pytest.raises(ConfigError, match=r"--out .*out\.xlsx: unknown output format '\.xlsx'"):
        predict(table_site.model_dir, tmp_path / "rows.parquet", tmp_path / "out.xlsx")
    assert not (tmp_path / "out.csv").exists()


def test_the_command_writes_the_scores_and_exits_2_on_a_refusal(table_site, tmp_path, capsys):
    new = held_out_rows(table_site, tmp_path / "new.parquet")
    assert main(["predict", str(table_site.model_dir), "--data", str(new), "--out", str(tmp_path / "scores.csv")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"scored {len(table_site.held_out)} samples; skipped per reason: none",
        f"wrote {tmp_path / 'scores.csv'}",
    ]
    assert pacsv.read_csv(tmp_path / "scores.csv").num_rows == len(table_site.held_out)

    assert main(["predict", str(table_site.model_dir), "--data", str(tmp_path), "--out", str(tmp_path / "again.csv")]) == 2
    assert "is a folder, but the model in" in capsys.readouterr().err and not (tmp_path / "again.csv").exists()


def write_float_dicom(path, pixels: np.ndarray) -> None:
    """A Part-10 file whose pixels are 32-bit floats (FloatPixelData)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "P9"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = pixels.astype(np.float32).tobytes()
    ds.save_as(path, enforce_file_format=True)
