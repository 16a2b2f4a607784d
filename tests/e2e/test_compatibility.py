"""Every task with every setting of the compatibility table: one round, evaluation, export and
`fedward predict`, or a refusal before Ray is touched that names both settings.

The cells come from pipelines/compatibility.py, the table docs/tasks-and-models.md shows; the
hospitals run in the driver's process (`run.hosting: in_process`) on a small network and small
tables, so the whole table takes about a minute.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from fedward.config import parse_config
from fedward.errors import ConfigError
from fedward.pipelines.compatibility import SETTINGS, TASKS, cell, refusal
from fedward.pipelines.predict import predict
from fedward.pipelines.run import Pipeline
from fedward.tasks import build_task

pytestmark = pytest.mark.e2e
HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")
ROWS = 70


def write_records(path: Path, rng: np.random.Generator, prefix: str) -> None:
    """Patients with an outcome, a grade and a length of stay, each driven by `marker`."""
    path.parent.mkdir(parents=True)
    marker, age = rng.normal(size=ROWS), rng.normal(60, 10, ROWS)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["patient", "age", "marker", "sex", "outcome", "grade", "stay"])
        for i in range(ROWS):
            score = marker[i] + rng.normal(0, 0.7)
            grade = "low" if score < -0.5 else "mid" if score < 0.5 else "high"
            out.writerow([f"{prefix}-{i}", f"{age[i]:.1f}", f"{marker[i]:.3f}", rng.choice(["F", "M"]),
                          "yes" if score > 0 else "no", grade, f"{4 + 2 * marker[i] + rng.normal(0, 0.5):.2f}"])


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(7)
    for name in (*HOSPITALS, "trusted"):
        write_records(root / name / "records.csv", rng, name)
    return root


def model_folder(run_dir: Path, logs: list[str]) -> Path:
    """The global model, or hospital_a's own where the strategy keeps layers at each hospital."""
    if (run_dir / "model").is_dir():
        return run_dir / "model"
    return Path(next(re.match(r"hospital_a: its own model is at (.*) on its node$", line).group(1)
                     for line in logs if line.startswith("hospital_a: its own model is at")))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_with_each_setting_runs_a_round_and_predicts_or_is_refused_naming_both(ray_session, sites, tmp_path, task, setting):
    raw = cell(task, setting, folder=str(sites), run_root=str(tmp_path))
    raw["run"]["hosting"] = "in_process"
    if "trusted_data" in raw.get("robust", {}):
        raw["robust"]["trusted_data"] = str(sites / "trusted")
    config = parse_config(raw)
    why = refusal(raw)
    if why is not None:
        assert setting in why and f"task.kind: {task}" in why, why
        with pytest.raises(ConfigError, match=re.escape(why)):
            Pipeline(config, progress=False)
        return
    logs: list[str] = []
    Pipeline(config, progress=False, log=logs.append).run()
    record = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["round"] == 1 and record["participants"] == list(HOSPITALS), record["failures"]
    headline = build_task(config.task).headline()
    assert math.isfinite(record["pooled"][headline]) and sorted(record["hospitals"]) == list(HOSPITALS)
    out = tmp_path / "scores.csv"
    scored = predict(model_folder(config.run_dir, logs), sites / "hospital_a" / "records.csv", out)
    assert scored.scored == ROWS and scored.skipped == {}
    with open(out) as f:
        columns = next(csv.reader(f))
    expected = {"binary": ["probability"], "multiclass": ["predicted_class", "probability_low", "probability_mid", "probability_high"],
                "regression": ["prediction"]}[task]
    assert columns[:2] == ["sample_id", "patient_id"] and set(expected) <= set(columns), columns
    if setting == "explain.enabled":
        assert json.loads((config.run_dir / "explanations.json").read_text())["round"] == 1
    if setting == "subgroups":
        assert json.loads((config.run_dir / "subgroups.json").read_text())["round"] == 1
    if setting in ("strategy.fine_tune_epochs", "strategy.local_only"):
        own = json.loads((config.run_dir / "personalization.json").read_text())["models"][setting.split(".")[1].removesuffix("_epochs").replace("fine_tune", "fine_tuned")]
        assert sorted(own["hospitals"]) == list(HOSPITALS) and math.isfinite(own["pooled"][headline]), own
