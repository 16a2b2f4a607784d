"""A trained model as a self-describing folder that scores new patients without the run.

`export_model` writes two files:

- `model.safetensors`: every state-dict entry of the model (integer buffers such as BatchNorm's
  counters included), in safetensors, which holds tensors only and so, unlike a pickle, runs no
  code when it is read;
- `model.json`: what it takes to rebuild and feed the model: the format version, the model
  config, one sample's input shape, the preprocessing (tables: the harmonized spec; images: the
  DICOM settings), the feature list and label rule for reference, the task (its kind, classes and
  the targets' agreed scale), the study code a `model.target` came from (its file's sha256), where
  it comes from (run, round, global or a hospital's own) and the sha256 of `model.safetensors`.

`model.json` is written last, so its presence says the export is whole; `load_exported` refuses a
folder whose weights do not match the hash it records or whose format it does not read. Nothing
in either file identifies a patient: weights, settings and pooled statistics only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import safetensors.torch
from safetensors import SafetensorError
from torch import nn

from fedward.components import provenance
from fedward.config import ALL_OTHERS, DataConfig, DicomSpec, FeatureSpec, LabelRule, ModelConfig, TableSpec, TaskConfig
from fedward.errors import CheckpointError, ConfigError
from fedward.tasks import Task, build_task
from fedward.files import atomic_write, atomic_write_json
from fedward.types import Layout
from fedward.models.flat import load_flat
from fedward.models.networks import build_model

FORMAT_VERSION = 2  # bump when the files' layout or meaning changes; older readers then refuse
# What version 2 added, as a version 1 card (binary tasks, built-in models only) meant it.
ADDED_IN_2 = {"task": dataclasses.asdict(TaskConfig()), "scale": None, "study_code": None}
WEIGHTS, CARD = "model.safetensors", "model.json"


@dataclass(frozen=True)
class ExportedModel:
    """What `model.json` says about the model beside it."""

    format_version: int
    fedward_version: str
    kind: Literal["global", "personalized"]
    hospital: str | None  # whose own model, for a personalized one
    run_id: str
    round: int
    model: dict  # the ModelConfig
    input_shape: tuple[int, ...]  # one sample: (features,) or (channels, H, W)
    data_kind: Literal["table", "dicom"]
    label: dict  # the LabelRule it was trained on, for reference
    features: tuple[dict, ...] | None  # tables: each column's name and type, in the spec's order
    patient_id: str | None  # tables: the patient id column, if the run had one
    preprocessing: dict | None  # tables: the PreprocessingSpec every hospital applied
    images: dict | None  # images: image_size, frames and window, as the DICOM adapter applied them
    sha256: str  # of model.safetensors
    task: dict  # the TaskConfig
    scale: dict | None  # the targets' scale the hospitals agreed (regression: mean and sd)
    study_code: dict | None  # model.target: its source file's name and sha256, when the model is the study's own

    def model_config(self) -> ModelConfig:
        widths = {k: tuple(v) for k, v in self.model.items() if k in ("hidden", "channels")}  # JSON has lists
        return ModelConfig(**{**self.model, **widths})

    def task_config(self) -> TaskConfig:
        classes = self.task["classes"]
        return TaskConfig(**{**self.task, "classes": None if classes is None else tuple(classes)})

    def table_spec(self, file: str) -> TableSpec:
        """The table adapter's settings for reading `file` as the model's training data was read."""
        return TableSpec(
            file=file,
            features=tuple(FeatureSpec(**f) for f in self.features),
            label=LabelRule(**self.label),
            patient_id=self.patient_id,
        )

    def dicom_spec(self, images: str) -> DicomSpec:
        """The DICOM adapter's settings for reading `images` as the model's training images were read."""
        return DicomSpec(images=images, label=LabelRule(**self.label), **self.images)


def from_weights(config: ModelConfig, input_shape: tuple[int, ...], weights: np.ndarray, layout: Layout, output_size: int = 1, study_dir: str | None = None) -> nn.Module:
    """The model of `config` holding flat `weights` that cover its whole floating-point state."""
    model = build_model(config, input_shape, output_size, study_dir)
    load_flat(model, weights, layout)
    return model


def export_model(
    out_dir: Path,
    model: nn.Module,
    *,
    model_config: ModelConfig,
    input_shape: tuple[int, ...],
    preprocessing: dict | None,
    data_config: DataConfig,
    kind: Literal["global", "personalized"],
    hospital: str | None,
    run_id: str,
    round: int,
    task: TaskConfig = TaskConfig(),
    scale: dict | None = None,
    study_dir: str | None = None,
) -> Path:
    """Write `model` (all of its state, personal layers included) and its card into `out_dir`.

    Writing the same model again gives the same bytes, so a resumed run may export again.
    """
    if (kind == "personalized") != (hospital is not None):
        raise ConfigError(f"export: a personalized model names its hospital and a global one none; got kind={kind!r}, hospital={hospital!r}")
    if (data_config.kind == "table") != (preprocessing is not None):
        raise ConfigError(f"export: a table model needs its preprocessing spec and an image model none (data.kind is {data_config.kind!r})")
    out_dir = Path(out_dir)
    # Clones: safetensors wants contiguous tensors that share no memory with each other.
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    weights = safetensors.torch.save(state, metadata={"format": "pt"})
    table, dicom = data_config.table, data_config.dicom
    rule = table.label if table is not None else dicom.label
    card = ExportedModel(
        format_version=FORMAT_VERSION,
        fedward_version=_fedward_version(),
        kind=kind,
        hospital=hospital,
        run_id=run_id,
        round=round,
        model=dataclasses.asdict(model_config),
        input_shape=tuple(input_shape),
        data_kind=data_config.kind,
        label=dataclasses.asdict(rule),
        features=tuple(dataclasses.asdict(f) for f in table.features) if table is not None else None,
        patient_id=table.patient_id if table is not None else None,
        preprocessing=preprocessing,
        images={"image_size": dicom.image_size, "frames": dicom.frames, "window": dicom.window} if dicom is not None else None,
        sha256=hashlib.sha256(weights).hexdigest(),
        task=dataclasses.asdict(task),
        scale=scale,
        study_code=_study_code(model_config, study_dir),
    )
    atomic_write(out_dir / WEIGHTS, weights)
    atomic_write_json(out_dir / CARD, dataclasses.asdict(card))  # last: its presence says the export is whole
    return out_dir


def _study_code(config: ModelConfig, study_dir: str | None) -> dict | None:
    """Where a model.target factory's code comes from (components.provenance)."""
    if config.target is None:
        return None
    return provenance(config.target, "model.target", study_dir)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # in eval mode
    card: ExportedModel
    task: Task
    warnings: tuple[str, ...]  # what changed since the export without changing the model's code (a package's version)


def load_exported(model_dir: Path, study_dir: str | None = None) -> LoadedModel:
    """The exported model, its card and its task; refuses a folder it cannot vouch for, and a model
    whose study code (model.target's file) changed since it was exported."""
    model_dir = Path(model_dir)
    card_path, weights_path = model_dir / CARD, model_dir / WEIGHTS
    card = _read_card(card_path)
    try:
        weights = weights_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{weights_path}: cannot be read ({e.strerror or e}); {card_path} describes weights that are not there") from None
    digest = hashlib.sha256(weights).hexdigest()
    if digest != card.sha256:
        raise CheckpointError(
            f"{weights_path}: sha256 {digest[:12]}... does not match the {card.sha256[:12]}... recorded in {card_path}; "
            f"the weights were changed or damaged after export: export the model again"
        )
    task = build_task(card.task_config(), study_dir)
    config = card.model_config()
    warnings = _code_changes(card, card_path, _study_code(config, study_dir))
    try:
        model = build_model(config, card.input_shape, task.output_size, study_dir)
        model.load_state_dict(safetensors.torch.load(weights), strict=True)
    except (TypeError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{weights_path}: does not fit the model described in {card_path}: {' '.join(str(e).split())[:300]}") from None
    return LoadedModel(model.eval(), card, task, warnings)


def _code_changes(card: ExportedModel, card_path: Path, now: dict | None) -> tuple[str, ...]:
    """Refuses study code that changed since the export; a package's new version is only said."""
    then = card.study_code
    if then is None or then == now:
        return ()
    if "sha256" in then or now is None or "sha256" in now:
        raise CheckpointError(
            f"{card_path}: the model's code {then['target']} changed since it was exported (then {_described(then)}, now "
            f"{_described(now)}); use the study code the run trained with"
        )
    return (f"{then['target']}: exported with {then['package']} {then['version']}, rebuilt with {now['package']} {now['version']}",)


def _described(code: dict | None) -> str:
    if not code:
        return "not importable"
    if "sha256" in code:
        return f"{code['file']} sha256 {code['sha256'][:12]}..."
    return f"{code.get('package', '?')} {code.get('version', '?')}"


def _read_card(path: Path) -> ExportedModel:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; expected a model folder written by fedward's export (model.json beside model.safetensors)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version == 1:  # a binary model of a built-in network, as version 2 writes one
        label = raw.get("label") or {}
        negatives = ALL_OTHERS if label.get("positive_values") else None  # what a positive_values rule meant then
        raw = {**ADDED_IN_2, **raw, "format_version": FORMAT_VERSION, "label": {"negative_values": negatives, **label}}
        version = FORMAT_VERSION
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version is {version!r}, this fedward reads format {FORMAT_VERSION}; use the fedward version that wrote it ({raw.get('fedward_version') if isinstance(raw, dict) else 'unknown'})")
    names = {f.name for f in dataclasses.fields(ExportedModel)}
    if set(raw) != names:
        raise CheckpointError(f"{path}: fields {sorted(set(raw) ^ names)} are missing or unknown; expected {sorted(names)}")
    features = raw["features"]
    return ExportedModel(**{**raw, "input_shape": tuple(raw["input_shape"]), "features": None if features is None else tuple(features)})


def _fedward_version() -> str:
    try:
        return metadata.version("fedward")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"
