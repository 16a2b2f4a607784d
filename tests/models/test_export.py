"""Exported models on disk: the whole state reloads to the same outputs, and tampering is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from fedward.data_adapters.harmonize import PreprocessingSpec
from fedward.config import DataConfig, DicomSpec, FeatureSpec, LabelRule, ModelConfig, TableSpec
from fedward.errors import CheckpointError
from fedward.models.export import FORMAT_VERSION, export_model, from_weights, load_exported
from fedward.models.flat import flatten
from fedward.models.networks import build_model

TABLE = DataConfig(
    kind="table",
    table=TableSpec(
        file="ehr.csv",
        features=(FeatureSpec(name="age", type="numeric"), FeatureSpec(name="sex", type="categorical")),
        label=LabelRule(column="outcome", positive_values=("died",), negative_values="all others"),
        patient_id="patient_id",
    ),
)
IMAGES = DataConfig(kind="dicom", dicom=DicomSpec(label=LabelRule(column="finding", threshold=1.0), image_size=16, frames="first"))
SPEC = PreprocessingSpec(numeric={"age": (61.5, 12.25)}, missing_indicators=("age",), categorical={"sex": ("F", "M", "other")})
CASES = {
    # BatchNorm, so running statistics and the integer counter must travel too.
    "table": (TABLE, ModelConfig(kind="mlp", hidden=(8, 4), norm="batch"), (5,), SPEC.to_dict()),
    "dicom": (IMAGES, ModelConfig(kind="cnn", channels=(4, 8), norm="group", groups=2), (1, 16, 16), None),
}


def trained_model(config: ModelConfig, shape: tuple[int, ...]) -> torch.nn.Module:
    """A model whose every entry differs from a freshly built one, integer buffers included."""
    torch.manual_seed(3)
    model = build_model(config, shape)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.rand_like(tensor) + 0.5 if tensor.is_floating_point() else torch.full_like(tensor, 7))
    return model.eval()


def export(out: Path, case: str, model: torch.nn.Module | None = None, **where) -> torch.nn.Module:
    data, config, shape, preprocessing = CASES[case]
    model = model if model is not None else trained_model(config, shape)
    where = {"kind": "global", "hospital": None, "run_id": "demo-0123456789ab", "round": 4, **where}
    export_model(out, model, model_config=config, input_shape=shape, preprocessing=preprocessing, data_config=data, **where)
    return model


@pytest.mark.parametrize("case", CASES)
def test_an_exported_model_reloads_whole_and_scores_exactly_as_the_original(tmp_path, case):
    original = export(tmp_path / "model", case, kind="personalized", hospital="hospital_a")
    exported = load_exported(tmp_path / "model")
    loaded, card = exported.model, exported.card

    assert not loaded.training
    saved, kept = original.state_dict(), loaded.state_dict()
    assert list(kept) == list(saved) and all(torch.equal(kept[k], saved[k]) for k in saved)
    assert any(not v.is_floating_point() for v in saved.values()) == (case == "table")  # BatchNorm's counter
    x = torch.rand(9, *CASES[case][2]) * 3
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))

    assert (card.format_version, card.kind, card.hospital, card.run_id, card.round) == (FORMAT_VERSION, "personalized", "hospital_a", "demo-0123456789ab", 4)
    assert card.model_config() == CASES[case][1] and card.input_shape == CASES[case][2]
    if case == "table":
        assert PreprocessingSpec.from_dict(card.preprocessing) == SPEC and card.images is None
        assert card.table_spec("new.csv") == dataclasses.replace(TABLE.table, file="new.csv")
    else:
        assert card.preprocessing is None and card.images == {"image_size": 16, "frames": "first", "window": "voi"}
        assert card.dicom_spec("scans") == dataclasses.replace(IMAGES.dicom, images="scans")
    # The file is plain safetensors, readable without fedward.
    assert set(safetensors.torch.load_file(tmp_path / "model" / "model.safetensors")) == set(saved)


def test_flat_global_weights_export_to_the_same_weights_and_the_same_bytes_twice(tmp_path):
    _, config, shape, _ = CASES["table"]
    weights, layout = flatten(trained_model(config, shape))
    for out in (tmp_path / "a", tmp_path / "b"):
        export(out, "table", from_weights(config, shape, weights, layout))
    exported = load_exported(tmp_path / "a")
    loaded, card = exported.model, exported.card
    assert np.array_equal(flatten(loaded)[0], weights) and card.kind == "global" and card.hospital is None
    for name in ("model.safetensors", "model.json"):  # a resumed run may export again: same files
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tampered_weights_are_refused_naming_the_file(tmp_path):
    export(tmp_path / "model", "table")
    weights = tmp_path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's last value
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* does not match .* recorded in .*model\.json"):
        load_exported(tmp_path / "model")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read"):
        load_exported(tmp_path / "model")


def test_an_unknown_format_a_mismatched_card_or_no_export_is_refused(tmp_path):
    export(tmp_path / "model", "table")
    card = tmp_path / "model" / "model.json"
    body = json.loads(card.read_text())
    card.write_text(json.dumps({**body, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=rf"model\.json: format_version is {FORMAT_VERSION + 1}, this fedward reads format {FORMAT_VERSION}"):
        load_exported(tmp_path / "model")
    card.write_text(json.dumps({**body, "model": {**body["model"], "hidden": [8, 8]}}))  # hash still matches
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not fit the model described in .*model\.json"):
        load_exported(tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"elsewhere.model\.json: no such file"):
        load_exported(tmp_path / "elsewhere")
