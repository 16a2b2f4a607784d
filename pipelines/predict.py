"""`fedward predict`: an exported model scores new patients, at the hospital that holds them.

New data goes through the very adapters and preprocessing the model was trained with: a table
through the table adapter and the exported harmonization spec, a folder of DICOM files through the
DICOM adapter with the exported image settings. A row or file that cannot be used is skipped and
counted by reason, as in training; input that does not fit the model at all (a missing feature
column, images for a table model) is refused naming the file and the field. The output holds the
task's columns per row or image (a binary probability; one probability per class, named by its
value, and the predicted class; a regression prediction in the target's units), next to its sample
id and patient id: it identifies patients, so it belongs in the hospital's own area, like its data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from fedward.data_adapters.dicom import load_dicom
from fedward.data_adapters.harmonize import PreprocessingSpec
from fedward.data_adapters.report import DataReport
from fedward.data_adapters.samples import Samples
from fedward.data_adapters.tables import load_table
from fedward.errors import CheckpointError, ConfigError, DataError
from fedward.files import atomic_write
from fedward.models import training
from fedward.models.export import CARD, ExportedModel, load_exported


@dataclass(frozen=True)
class Prediction:
    """What a prediction did: counts only, so it may be printed anywhere."""

    out: Path
    scored: int
    skipped: dict[str, int]  # reason -> count
    skipped_file: Path  # beside `out`: each input not scored, with the field at fault and why
    warnings: tuple[str, ...] = ()  # what changed since the model was exported without changing its code


def predict(model_dir: Path, data: Path, out: Path) -> Prediction:
    """Score every usable row of the table file, or image under the folder, `data` into `out`
    (`.csv` or `.parquet`)."""
    model_dir, data, out = Path(model_dir), Path(data), Path(out)
    writer = _writer(out)  # a wrong extension is refused before any reading
    loaded = load_exported(model_dir, str(Path.cwd()))
    model, card, task = loaded.model, loaded.card, loaded.task
    report = DataReport(card.hospital or "new patients")
    samples, x = _read(card, model_dir, data, report)
    if len(samples) == 0:
        nothing = "no usable row in this table" if card.data_kind == "table" else "no readable DICOM image in this folder"
        raise DataError(f"{data}: {nothing}; skipped per reason: {report.counts()}")
    if tuple(x.shape[1:]) != card.input_shape:
        raise CheckpointError(f"{model_dir / CARD}: the model takes inputs of shape {card.input_shape}, its preprocessing gave {tuple(x.shape[1:])}")
    columns = {"sample_id": pa.array(samples.sample_ids, pa.string())}
    if card.data_kind == "dicom" or card.patient_id is not None:  # tables without the column have none
        columns["patient_id"] = pa.array(samples.patient_ids.tolist(), pa.string())
    outputs = training.outputs(model, torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    columns.update({name: pa.array(values) for name, values in task.predictions(outputs, card.scale).items()})
    writer(pa.table(columns), out)
    skipped_file = out.with_name(f"{out.stem}.skipped.csv")
    fields = ("source", "field", "reason", "detail")
    pacsv.write_csv(pa.table({f: pa.array([getattr(s, f) for s in report.skipped], pa.string()) for f in fields}), skipped_file)
    return Prediction(out, len(samples), report.counts(), skipped_file, loaded.warnings)


def _read(card: ExportedModel, model_dir: Path, data: Path, report: DataReport) -> tuple[Samples, np.ndarray]:
    """The usable samples of `data` and the model's inputs for them, as in training."""
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    if card.data_kind == "table":
        if data.is_dir():
            raise DataError(
                f"{data} is a folder, but the model in {model_dir} scores table rows: give one CSV, Parquet or "
                f"Arrow file with the columns {[f['name'] for f in card.features]}"
            )
        # An absolute or cwd-relative file: the adapter reads `Path('.') / file` and names `file` in its messages.
        samples = load_table(Path("."), card.table_spec(str(data)), report, labelled=False)
        return samples, PreprocessingSpec.from_dict(card.preprocessing).apply(samples.features)
    if not data.is_dir():
        raise DataError(
            f"{data} is a file, but the model in {model_dir} scores DICOM images: give the folder that holds "
            f"them (any nesting; every file in it is read)"
        )
    samples = load_dicom(data, card.dicom_spec("."), report, labelled=False)  # sample ids relative to `data`
    return samples, samples.features


def _write_csv(table: pa.Table, out: Path) -> None:
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    atomic_write(out, buffer.getvalue())


def _write_parquet(table: pa.Table, out: Path) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(out, buffer.getvalue())


_WRITERS = {".csv": _write_csv, ".parquet": _write_parquet}


def _writer(out: Path):
    try:
        return _WRITERS[out.suffix.lower()]
    except KeyError:
        raise ConfigError(f"--out {out}: unknown output format {out.suffix!r}; expected one of {', '.join(_WRITERS)}") from None
