"""Each task on its own: labels to targets, the loss, what a hospital releases and what the driver pools."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from fedward.data_adapters.cells import label_targets
from fedward.config import LabelRule, TaskConfig
from fedward.errors import DataError
from fedward.tasks import build_task
from fedward.tasks.multiclass import Multiclass
from fedward.tasks.regression import Regression

GRADES = ("none", "mild", "severe")


def column(values: list[str | None]) -> pa.Table:
    return pa.table({"y": pa.array(values, pa.string())})


def hospitals_outputs(seed: int, sizes: tuple[int, ...], classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        y = rng.integers(0, classes, n)
        logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[y]
        out.append((torch.tensor(logits, dtype=torch.float32), torch.tensor(y)))
    return out


def test_multiclass_targets_follow_the_listed_classes_and_name_every_other_value():
    task = build_task(TaskConfig(kind="multiclass", classes=GRADES))
    targets, problems = label_targets(column(["mild", "severe", None, "none", "Mild", "moderate", "moderate"]), LabelRule(column="y"), "labels.csv", task)
    assert task.output_size == 3 and targets[[0, 1, 3]].tolist() == [1, 2, 0]
    by_reason = {(reason, detail): mask.nonzero()[0].tolist() for _, reason, detail, mask in problems if mask.any()}
    assert by_reason == {
        ("missing_label", "expected an outcome, found an empty cell"): [2],
        ("unlisted_label", "the value 'moderate' is in neither task.classes"): [5, 6],
        ("unlisted_label", "the value 'Mild' is in neither task.classes"): [4],
    }


def test_pooled_multiclass_figures_equal_scikit_learn_on_all_patients_and_a_missing_class_is_undefined():
    task = Multiclass(TaskConfig(kind="multiclass", classes=GRADES))
    sites = hospitals_outputs(0, (300, 200), 3)
    rng = np.random.default_rng(1)
    y = torch.tensor(rng.integers(0, 2, 150))  # a hospital without the "severe" class
    sites.append((torch.tensor(rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[y.numpy()], dtype=torch.float32), y))
    released = [task.release(out, y, None, patients=np.arange(len(y)), floor=10) for out, y in sites]
    assert np.isnan(released[2].figures["class_auroc"]["severe"]) and not np.isnan(released[2].figures["macro_auroc"])
    assert all((v >= 10).all() for r in released for k, v in r.statistics.items() if k.endswith("_bins"))

    pooled = task.pooled(summed([task.statistics(out, y, None) for out, y in sites]), floor=1)
    probabilities = torch.softmax(torch.cat([o for o, _ in sites]), 1).numpy().astype(np.float64)
    labels = torch.cat([y for _, y in sites]).numpy()
    exact = {name: roc_auc_score(labels == c, probabilities[:, c]) for c, name in enumerate(GRADES)}
    for name in GRADES:  # from 100-bin histograms: exact up to ties within a bin
        assert pooled["class_auroc"][name] == pytest.approx(exact[name], abs=0.01)
    assert pooled["macro_auroc"] == pytest.approx(np.mean(list(exact.values())), abs=0.01)
    predicted = probabilities.argmax(1)
    assert pooled["confusion"] == confusion_matrix(labels, predicted).tolist()
    assert pooled["accuracy"] == pytest.approx((predicted == labels).mean(), abs=1e-12)
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-12)
    assert pooled["n"] == 650
    assert pooled["loss"] == pytest.approx(torch.nn.functional.cross_entropy(torch.cat([o for o, _ in sites]), torch.cat([y for _, y in sites])).item(), rel=1e-5)


def test_regression_is_pooled_exactly_from_sums_in_the_targets_units():
    task = Regression(TaskConfig(kind="regression"))
    rng = np.random.default_rng(2)
    observed = [rng.normal(150, 70, n) for n in (120, 80, 45)]
    predicted = [o + rng.normal(0, 40, len(o)) for o in observed]
    scale = task.scale([task.summary(o) for o in observed])
    everything = np.concatenate(observed)
    assert scale["mean"] == pytest.approx(everything.mean()) and scale["sd"] == pytest.approx(everything.std())
    statistics, released = [], []
    for o, p in zip(observed, predicted):
        out = torch.tensor((p - scale["mean"]) / scale["sd"], dtype=torch.float32)[:, None]
        statistics.append(task.statistics(out, task.tensor(o, scale), scale))
        released.append(task.release(out, task.tensor(o, scale), scale, patients=np.arange(len(o)), floor=10))
    pooled = task.pooled(summed(statistics), floor=10)
    all_predicted = np.concatenate(predicted)
    assert pooled["r2"] == pytest.approx(r2_score(everything, all_predicted), abs=1e-5)
    assert pooled["mse"] == pytest.approx(mean_squared_error(everything, all_predicted), rel=1e-5)
    assert pooled["mae"] == pytest.approx(mean_absolute_error(everything, all_predicted), rel=1e-5)
    # A hospital's own figures leave it rounded to two significant digits, and no cells in the clear.
    assert released[1].figures["r2"] == float(f"{r2_score(observed[1], predicted[1]):.2g}") and released[1].statistics == {}
    # Pooled, the 2-D histogram's cells under the floor are held back.
    cells = np.array(pooled["calibration"], dtype=object)
    assert sum(c for c in cells.ravel() if c is not None) <= 245 and all(c is None or c >= 10 for c in cells.ravel())
    # No row of predictions tells its patients' targets: a released row has two cells or more.
    assert all(sum(c is not None for c in row) != 1 for row in pooled["calibration"])
    assert any(c is not None for c in cells.ravel())
    columns = task.predictions(torch.tensor((predicted[0] - scale["mean"]) / scale["sd"], dtype=torch.float32)[:, None], scale)
    assert np.allclose(columns["prediction"], predicted[0], rtol=1e-5)  # in the target's own units


def test_a_regression_target_that_is_not_a_number_costs_its_row_and_a_column_of_text_is_refused():
    task = build_task(TaskConfig(kind="regression"))
    targets, problems = label_targets(column(["3.5", "12", "n/a", "", "7e1"]), LabelRule(column="y"), "ehr.csv", task)
    assert targets[[0, 1, 4]].tolist() == [3.5, 12.0, 70.0]
    reasons = {reason: mask.nonzero()[0].tolist() for _, reason, _, mask in problems if mask.any()}
    assert reasons == {"missing_label": [3], "bad_label": [2]}
    with pytest.raises(DataError, match=r"ehr.csv: column 'y' should hold numeric values, but none of its 2 filled cells is one"):
        label_targets(column(["long", "short"]), LabelRule(column="y"), "ehr.csv", task)


def test_strata_keep_every_class_and_the_range_of_a_number_on_both_sides_of_the_split():
    from fedward.data_adapters.splits import split_by_patient

    regression = Regression(TaskConfig(kind="regression"))
    y = np.random.default_rng(3).normal(size=400)
    train, held_out = split_by_patient(np.arange(400).astype(str), regression.strata(y), 0.25, 0)
    assert len(held_out) == 100
    for lo, hi in zip(np.quantile(y, [0, 0.25, 0.5, 0.75]), np.quantile(y, [0.25, 0.5, 0.75, 1])):
        assert ((y[held_out] >= lo) & (y[held_out] <= hi)).sum() >= 20
    grades = np.repeat([0, 1, 2], [50, 30, 4])
    _, held_out = split_by_patient(np.arange(84).astype(str), grades, 0.25, 0)
    assert set(grades[held_out]) == {0, 1, 2}


def test_label_flips_follow_the_task():
    y = torch.tensor([0, 1, 2, 2])
    assert build_task(TaskConfig(kind="multiclass", classes=GRADES)).flipped(y).tolist() == [1, 2, 0, 0]
    assert build_task(TaskConfig(kind="regression")).flipped(torch.tensor([0.5, -1.0])).tolist() == [-0.5, 1.0]
    assert build_task(TaskConfig()).flipped(torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.0]


def test_a_number_too_large_for_a_float_is_no_number():
    task = build_task(TaskConfig(kind="regression"))
    targets, problems = label_targets(column(["3.5", "1e400", "-1e400"]), LabelRule(column="y"), "ehr.csv", task)
    assert targets[0] == 3.5 and {r: m.nonzero()[0].tolist() for _, r, _, m in problems if m.any()} == {"bad_label": [1, 2]}


def summed(statistics: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Hospitals' statistics added up, as fedward/pooling.py opens them."""
    return {k: sum(s[k] for s in statistics) for k in statistics[0]}
