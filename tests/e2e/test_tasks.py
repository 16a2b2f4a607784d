"""Multiclass and regression federations on data fedward did not generate, against library references.

scikit-learn's digits become DICOM images at three hospitals (one never saw three of the ten
digits) and its diabetes table three hospitals' EHR exports. The references are scikit-learn's own
models fitted on the union of the hospitals' training splits and scored on the union of their
held-out splits: the same patients, split and preprocessed as the federation had them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score, roc_auc_score

from fedward.actors.hospital import Hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward.explain.report import write_consortium_report
from fedward.config import parse_config
from fedward.tasks import build_task
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.checkpoint import load_checkpoint
from fedward.pipelines.predict import predict
from fedward.pipelines.run import Pipeline
from tests.data_adapters.test_dicom import write_dicom

pytestmark = pytest.mark.e2e
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")
DIGITS = tuple(str(d) for d in range(10))
DIABETES_FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def hospital_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(HOSPITALS), n)


@pytest.fixture(scope="module")
def digit_sites(tmp_path_factory) -> Path:
    """Each digit an 8x8 DICOM image of its own patient; hospital_c has no 7, 8 or 9."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    site = hospital_of(len(digits.target))
    short = (site == 2) & (digits.target >= 7)
    site[short] = np.random.default_rng(1).integers(0, 2, short.sum())
    rows: dict[int, list] = {i: [] for i in range(len(HOSPITALS))}
    for i, (image, digit) in enumerate(zip(digits.images, digits.target)):
        folder = root / HOSPITALS[site[i]]
        ds = write_dicom(folder / "images" / f"{i:04d}.dcm", (image * 15).astype(np.uint8), patient=f"digit-{i}")
        rows[site[i]].append((ds.SOPInstanceUID, str(digit)))
    for i, name in enumerate(HOSPITALS):
        write_rows(root / name / "labels.csv", ("SOPInstanceUID", "digit"), rows[i])
    return root


@pytest.fixture(scope="module")
def diabetes_sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diabetes")
    data = load_diabetes()
    site = hospital_of(len(data.target))
    for i, name in enumerate(HOSPITALS):
        mine = np.flatnonzero(site == i)
        rows = [(f"p{j}", *(f"{v:.6f}" for v in data.data[j]), f"{data.target[j]:g}") for j in mine]
        write_rows(root / name / "ehr.csv", ("patient_id", *DIABETES_FEATURES, "progression"), rows)
    return root


def write_rows(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def shuffled(root: Path, dest: Path, file: str, column: str) -> Path:
    """A copy of the hospitals' data with one column permuted across each hospital's rows."""
    for i, name in enumerate(HOSPITALS):
        table = pacsv.read_csv(root / name / file, convert_options=pacsv.ConvertOptions(strings_can_be_null=False, column_types={column: pa.string()}))
        permuted = np.random.default_rng(i).permutation(table.column(column).to_numpy(zero_copy_only=False))
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(permuted))
        (dest / name).mkdir(parents=True)
        if (root / name / "images").is_dir():
            shutil.copytree(root / name / "images", dest / name / "images")
        pacsv.write_csv(table, dest / name / file)
    return dest


def digits_config(data: Path, runs: Path, name: str = "digits") -> dict:
    return {
        "run": {"name": name, "root": str(runs), "seed": 0, "rounds": 6, "min_hospitals": 2},
        "task": {"kind": "multiclass", "classes": list(DIGITS)},
        "data": {
            "kind": "dicom",
            "min_samples": 40,
            "dicom": {"images": "images", "labels": "labels.csv", "key_column": "SOPInstanceUID", "label": {"column": "digit"}, "image_size": 8, "window": "minmax"},
        },
        "model": {"kind": "cnn", "channels": [16, 32], "norm": "none"},
        "train": {"local_epochs": 2, "batch_size": 32, "lr": 0.01, "optimizer": "adam"},
        "explain": {"enabled": False},
        "hospitals": [{"name": h, "data": str(data / h), "work_dir": str(runs / "sites" / h)} for h in HOSPITALS],
    }


def diabetes_config(data: Path, runs: Path, name: str = "diabetes", **model) -> dict:
    return {
        "run": {"name": name, "root": str(runs), "seed": 0, "rounds": 8, "min_hospitals": 2},
        "task": {"kind": "regression"},
        "data": {
            "kind": "table",
            "min_samples": 50,
            "table": {"file": "ehr.csv", "patient_id": "patient_id", "features": dict.fromkeys(DIABETES_FEATURES, "numeric"), "label": {"column": "progression"}},
        },
        "model": model or {"kind": "mlp", "hidden": [16], "norm": "none"},
        "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.02, "optimizer": "sgd", "momentum": 0.9},
        "explain": {"enabled": False},
        "hospitals": [{"name": h, "data": str(data / h), "work_dir": str(runs / "sites" / h)} for h in HOSPITALS],
    }


def last_record(config) -> dict:
    return json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def split_as_the_federation(config) -> tuple[list[Hospital], dict | None]:
    """The hospitals as the run read, split and preprocessed them, built here for the reference."""
    hospitals = [Hospital(h.name, config, "reference") for h in config.hospitals]
    for h in hospitals:
        h.load()
    spec = merge_summaries([h.summarize() for h in hospitals], config.data.table).to_dict() if config.data.kind == "table" else None
    task = build_task(config.task)
    scale = task.scale([h.summarize_targets() for h in hospitals]) if task.agrees_scale else None
    for h in hospitals:
        h.prepare(spec, scale)
    return hospitals, scale


def union(hospitals: list[Hospital], part: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([h.x[getattr(h, f"{part}_idx")].reshape(len(getattr(h, f"{part}_idx")), -1).numpy() for h in hospitals])
    y = np.concatenate([h.samples.labels[getattr(h, f"{part}_idx")] for h in hospitals])
    return x.astype(np.float64), y


def test_digits_as_dicom_multiclass_matches_logistic_regression_and_a_hospital_without_three_digits_joins(ray_session, digit_sites, tmp_path):
    config = parse_config(digits_config(digit_sites, tmp_path))
    Pipeline(config, progress=False).run()
    last = last_record(config)
    assert sorted(last["participants"]) == list(HOSPITALS)
    c = last["hospitals"]["hospital_c"]
    assert [c["class_auroc"][d] for d in "789"] == [None, None, None] and c["macro_auroc"] > 0.9  # undefined, written as null
    # In the clear, a hospital's one-vs-rest score bins of the classes it has; no confusion matrix.
    assert {k.split("/")[0] for k in c if "/" in k} == set("0123456") and "confusion" not in c

    hospitals, _ = split_as_the_federation(config)
    x, y = union(hospitals, "train")
    held_x, held_y = union(hospitals, "holdout")
    reference = LogisticRegression(max_iter=5000).fit(x, y).predict_proba(held_x)
    macro = np.mean([roc_auc_score(held_y == c, reference[:, c]) for c in range(10)])
    pooled = last["pooled"]
    print(f"digits: federated macro AUROC {pooled['macro_auroc']:.4f}, logistic regression {macro:.4f}")
    assert pooled["macro_auroc"] >= macro - 0.03, (pooled["macro_auroc"], macro)
    cells = [v for row in pooled["confusion"] for v in row]
    assert pooled["n"] == len(held_y) and all(v is None or v >= 10 for v in cells) and sum(v for v in cells if v) <= len(held_y)
    assert 0.85 <= pooled["accuracy"] <= 1 and 0.85 <= pooled["balanced_accuracy"] <= 1

    page = write_consortium_report(config.run_dir).read_text()
    assert "AUROC of each class against the rest" in page and "Pooled confusion matrix" in page and "macro AUROC on held-out samples" in page
    assert "digit, one of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (multiclass)" in page

    # The exported model scores new images with one probability column per class, named by its value.
    out = tmp_path / "scores.csv"
    predict(config.run_dir / "model", digit_sites / "hospital_a" / "images", out)
    scores = pacsv.read_csv(out)
    assert scores.column_names == ["sample_id", "patient_id", *(f"probability_{d}" for d in DIGITS), "predicted_class"]
    probabilities = np.stack([scores.column(f"probability_{d}").to_numpy() for d in DIGITS], axis=1)
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_diabetes_regression_matches_ridge_pooled_exactly_and_predicts_in_the_targets_units(ray_session, diabetes_sites, tmp_path):
    config = parse_config(diabetes_config(diabetes_sites, tmp_path))
    Pipeline(config, progress=False).run()
    last = last_record(config)
    scale = json.loads((config.run_dir / "target_scale.json").read_text())
    assert 100 < scale["mean"] < 200 and scale["sd"] > 30  # the consortium's, in the target's units

    hospitals, _ = split_as_the_federation(config)
    x, y = union(hospitals, "train")
    held_x, held_y = union(hospitals, "holdout")
    ridge = r2_score(held_y, Ridge(alpha=1.0).fit(x, y).predict(held_x))
    pooled = last["pooled"]
    print(f"diabetes: federated R² {pooled['r2']:.4f}, ridge {ridge:.4f}")
    assert pooled["r2"] >= ridge - 0.03, (pooled["r2"], ridge)
    # Pooled from every held-out patient's sums, added up under the hospitals' pads; each hospital
    # shows only its own figures, rounded.
    assert pooled["n"] == len(held_y) and pooled["pooled_over"] == list(HOSPITALS)
    assert all(set(last["hospitals"][h]) == {"n", "r2", "mse", "mae", "train_loss"} for h in HOSPITALS)

    page = write_consortium_report(config.run_dir).read_text()
    assert "Predicted against observed" in page and "progression, a number in its own units (regression)" in page
    assert "MSE and MAE in the target" in page and "R² on held-out samples after each round" in page

    out = tmp_path / "predicted.csv"
    predict(config.run_dir / "model", diabetes_sites / "hospital_b" / "ehr.csv", out)
    predicted = pacsv.read_csv(out)
    assert predicted.column_names == ["sample_id", "patient_id", "prediction"]
    assert 25 <= np.median(predicted.column("prediction").to_numpy()) <= 350  # in the target's units, not standardized


@pytest.mark.parametrize(
    "sites, make_config, file, column, figure, at_most",
    [("digit_sites", digits_config, "labels.csv", "digit", "macro_auroc", 0.60), ("diabetes_sites", diabetes_config, "ehr.csv", "progression", "r2", 0.05)],
    ids=["digits", "diabetes"],
)
def test_shuffled_labels_leave_nothing_to_learn(ray_session, request, tmp_path, sites, make_config, file, column, figure, at_most):
    data = shuffled(request.getfixturevalue(sites), tmp_path / "data", file, column)
    config = parse_config(make_config(data, tmp_path / "runs", name="shuffled"))
    Pipeline(config, progress=False).run()
    assert last_record(config)["pooled"][figure] <= at_most


def test_one_round_of_a_linear_regression_is_one_step_of_gradient_descent_on_the_union(ray_session, diabetes_sites, tmp_path):
    raw = diabetes_config(diabetes_sites, tmp_path, name="one-step", target="tests.study.linear:linear")
    raw["run"]["rounds"] = 1
    raw["train"] = {"local_epochs": 1, "batch_size": 10_000, "lr": 0.1, "optimizer": "sgd", "momentum": 0.0}  # full batch
    config = parse_config(raw)
    Pipeline(config, progress=False).run()

    hospitals, scale = split_as_the_federation(config)
    x, _ = union(hospitals, "train")
    y = np.concatenate([h.y[h.train_idx].numpy() for h in hospitals]).astype(np.float64)  # standardized, as trained
    torch.manual_seed(config.run.seed)
    start, layout = flatten(build_model(config.model, (x.shape[1],), 1, str(Path.cwd())))
    w, b = start[:-1].astype(np.float64), float(start[-1])
    residual = x @ w + b - y
    step = np.concatenate([2 * x.T @ residual / len(y), [2 * residual.mean()]])  # the gradient of the mean squared error
    expected = start - 0.1 * step
    assert layout.names == ("1.weight", "1.bias")
    assert np.allclose(load_checkpoint(config.run_dir).weights, expected, atol=1e-6), np.abs(load_checkpoint(config.run_dir).weights - expected).max()


def test_a_hospital_export_records_the_task_and_where_the_model_code_came_from(ray_session, diabetes_sites, tmp_path):
    raw = diabetes_config(diabetes_sites, tmp_path, name="card", target="tests.study.linear:linear")
    raw["run"]["rounds"] = 1
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    card = json.loads((config.run_dir / "model" / "model.json").read_text())
    source = Path(__file__).parents[1] / "study" / "linear.py"
    assert card["task"]["kind"] == "regression" and set(card["scale"]) == {"mean", "sd"}
    assert card["study_code"] == {"target": "tests.study.linear:linear", "file": "tests/study/linear.py", "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert card["model"]["target"] == "tests.study.linear:linear"
