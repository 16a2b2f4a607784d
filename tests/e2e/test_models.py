"""Models a study brings, through the real pipeline: MONAI's DenseNet121, and models that must be refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch
import yaml

from fedward.data_adapters.demo import write_demo_data
from fedward.release import ScoreBins
from fedward.config import parse_config
from fedward.errors import ConfigError, DeploymentError
from fedward.models.export import load_exported
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.checkpoint import load_checkpoint, read_metrics
from fedward.pipelines.predict import predict
from fedward.pipelines.run import Pipeline
from tests.conftest import HOSPITALS, ehr_config

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def small_image_sites(tmp_path_factory) -> Path:
    """Three demo hospitals of 60 images each: enough to train a DenseNet121 two rounds on CPU."""
    out = tmp_path_factory.mktemp("small") / "demo"
    write_demo_data(out, hospitals=3, seed=0, images_per_hospital=(60, 60, 60), rows_per_hospital=(60, 60, 60))
    return out


def densenet_config(data: Path, runs: Path) -> dict:
    demo = yaml.safe_load((ROOT / "configs" / "demo_images.yaml").read_text())
    return {
        "run": {"name": "densenet", "root": str(runs), "seed": 0, "rounds": 2, "min_hospitals": 2},
        "data": {**demo["data"], "min_samples": 20},
        "model": {"target": "monai.networks.nets:DenseNet121"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.001, "optimizer": "adam"},
        "explain": {"enabled": False},
        "hospitals": [{"name": h, "data": str(data / h), "work_dir": str(runs / "sites" / h)} for h in HOSPITALS],
    }


def test_monai_densenet121_federates_exports_and_predicts_its_final_evaluation_exactly(ray_session, small_image_sites, tmp_path):
    config = parse_config(densenet_config(small_image_sites, tmp_path))
    for h in HOSPITALS:  # 15 held-out images a site: their own policy lets bins of 2 patients of each outcome leave
        (tmp_path / "sites" / h).mkdir(parents=True, exist_ok=True)
        (tmp_path / "sites" / h / "policy.yaml").write_text("release_floor: 2\n")
    Pipeline(config, progress=False).run()
    records = read_metrics(config.run_dir / "metrics.jsonl")
    assert [sorted(r["participants"]) for r in records] == [list(HOSPITALS)] * 2 and not any(r["failures"] for r in records)
    final = load_checkpoint(config.run_dir)
    torch.manual_seed(config.run.seed)
    initial, layout = flatten(build_model(config.model, (1, 64, 64)))
    assert final.layout == layout and layout.size > 6_900_000 and not np.array_equal(final.weights, initial)

    loaded = load_exported(config.run_dir / "model")
    assert flatten(loaded.model) [1] == final.layout and np.array_equal(flatten(loaded.model)[0], final.weights)
    assert loaded.card.study_code == {"target": "monai.networks.nets:DenseNet121", "package": "monai", "version": loaded.card.study_code["version"]}
    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    assert manifest["invocations"][-1]["model_built_with"]["model.target"]["package"] == "monai"

    # hospital_b's held-out images, scored by the exported model, fall in its last round's released bins exactly.
    site = small_image_sites / "hospital_b"
    split = json.loads(next((tmp_path / "sites" / "hospital_b" / "runs").glob("densenet-*/split.json")).read_text())
    for sample in split["holdout"]:
        (tmp_path / "held_out" / sample).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / sample, tmp_path / "held_out" / sample)
    predict(config.run_dir / "model", tmp_path / "held_out", tmp_path / "scores.csv")
    scores = pacsv.read_csv(tmp_path / "scores.csv")
    with open(site / "labels.csv", newline="") as f:
        finding = {row["SOPInstanceUID"]: row["finding"] in ("nodule", "mass") for row in csv.DictReader(f)}
    import pydicom

    labels = np.array([finding[pydicom.dcmread(tmp_path / "held_out" / s, stop_before_pixels=True).SOPInstanceUID] for s in scores.column("sample_id").to_pylist()])
    probability = scores.column("probability").to_numpy()
    bins = ScoreBins.of(records[-1]["hospitals"]["hospital_b"])
    assert sorted(scores.column("sample_id").to_pylist()) == sorted(split["holdout"])
    slices = np.clip((probability * 100).astype(np.int64), 0, 99)
    for lo, hi, pos, neg in zip(bins.low, bins.high, bins.positive, bins.negative):
        inside = (slices >= lo) & (slices < hi)
        assert (labels[inside].sum(), (~labels[inside]).sum()) == (pos, neg)
    assert sum(bins.positive) + sum(bins.negative) == len(labels)


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("tests.study.faulty:two_outputs", r"model.target tests.study.faulty:two_outputs: gives outputs of shape \(2,\) per batch of 2 samples, but task.kind binary needs \(1,\) per sample"),
        ("tests.study.faulty:not_a_number", r"model.target tests.study.faulty:not_a_number: gives non-finite outputs"),
        ("tests.study.faulty:takes_nothing_fedward_gives", r"takes neither input_shape and output_size nor in_channels and out_channels"),
        ("tests.study.nowhere:model", r"model.target: cannot import 'tests.study.nowhere'"),
    ],
    ids=["output_size", "nan", "signature", "import"],
)
def test_a_model_that_does_not_fit_the_task_stops_the_run_before_round_1_naming_it(ray_session, demo_data, tmp_path, target, fragment):
    raw = ehr_config(demo_data, tmp_path, name="faulty", rounds=1)
    raw["explain"] = {"enabled": False}
    raw["model"] = {"target": target}
    config = parse_config(raw)
    with pytest.raises((ConfigError, DeploymentError), match=fragment):
        Pipeline(config, progress=False).run()
    assert not (config.run_dir / "metrics.jsonl").exists()


def test_hospitals_that_built_the_model_from_other_code_stop_the_run_naming_them(ray_session, demo_data, tmp_path, monkeypatch):
    study = tmp_path / "study"
    study.mkdir()
    (study / "edited_net.py").write_text("from torch import nn\n\ndef net(input_shape, output_size):\n    return nn.Linear(input_shape[0], output_size)\n")
    raw = ehr_config(demo_data, tmp_path, name="edited", rounds=1)
    raw["explain"] = {"enabled": False}
    raw["model"] = {"target": "edited_net:net"}
    raw["run"]["study_dir"] = str(study)
    config = parse_config(raw)
    from fedward.components import load_component

    load_component("edited_net:net", "model.target", str(study))  # the driver imported this version
    (study / "edited_net.py").write_text((study / "edited_net.py").read_text() + "# edited after the driver imported it\n")
    with pytest.raises(DeploymentError, match=r"hospital_a: model.target \{.*'file': 'edited_net.py'.*\} \(driver: \{.*\}\)") as refused:
        Pipeline(config, progress=False).run()
    assert all(h in str(refused.value) for h in HOSPITALS)
