"""Whole federations on a real Ray with real files: learning, chance on shuffled labels, resume."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import tarfile
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from fedward.config import parse_config
from fedward.errors import CheckpointError, ConfigError, DataError
from fedward.checkpoint import load_checkpoint
from fedward.pipelines.run import Pipeline
from fedward.pipelines.status import run_status
from fedward.explain.report import write_consortium_report
from fedward.pipelines.patient import explain_patient_at_hospital
from tests.conftest import copy_hospitals, ehr_config, image_config
from tests.e2e.pins import assert_pinned

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
NOT_YET = SimpleNamespace(round=0)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def shuffle_labels(data_root: Path, file: str, column: str) -> None:
    """Permute one column of each hospital's CSV, leaving every other cell as written."""
    for site in sorted(p for p in data_root.iterdir() if p.is_dir()):
        with open(site / file, newline="") as f:
            rows = list(csv.DictReader(f))
        permuted = np.random.default_rng(1).permutation([r[column] for r in rows])
        for row, value in zip(rows, permuted):
            row[column] = value
        with open(site / file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def test_ehr_federation_learns_everywhere_and_a_hospital_without_data_stays_out(ray_session, demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path)
    tiny = tmp_path / "tiny_site"
    tiny.mkdir()
    (tiny / "ehr.csv").write_text("\n".join((demo_data / "hospital_a" / "ehr.csv").read_text().splitlines()[:11]) + "\n")
    raw["hospitals"].append({"name": "hospital_d", "data": str(tiny), "work_dir": str(tmp_path / "sites" / "d")})
    config = parse_config(raw)

    Pipeline(config, progress=False).run()

    records = metrics(config.run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert_pinned(config.run_dir, "ehr")
    last = records[-1]
    assert sorted(last["hospitals"]) == ["hospital_a", "hospital_b", "hospital_c"]
    assert all(m["auroc"] >= 0.75 for m in last["hospitals"].values()), last["hospitals"]
    assert last["pooled"]["auroc"] >= 0.78
    data = json.loads((config.run_dir / "data.json").read_text())
    assert "min_samples=50" in data["refused"]["hospital_d"]
    assert sorted(data["hospitals"]) == ["hospital_a", "hospital_b", "hospital_c"]
    # The full data report stays at the hospital; the run directory only has counts.
    assert len(list((tmp_path / "sites" / "hospital_a" / "runs").glob("ehr-*/data_report.json"))) == 1
    assert not list(config.run_dir.rglob("data_report.json"))
    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    assert manifest["invocations"][0]["packages"]["torch"].startswith("2.13.0")
    assert len(manifest["data"]["hospital_a"]["fingerprint"]) == 64
    assert (config.run_dir / "preprocessing.json").is_file()
    status = run_status(config.run_dir)
    assert "round 5 of 5 (finished)" in status and "hospital_d: did not join" in status
    # Explanations: aggregates in the run directory, each hospital's own report in its own area.
    explanations = json.loads((config.run_dir / "explanations.json").read_text())
    assert explanations["round"] == 5 and explanations["consortium"]["checks"]["additivity"]
    assert sorted(explanations["hospitals"]) == ["hospital_a", "hospital_b", "hospital_c"]
    own_reports = sorted((tmp_path / "sites").glob("hospital_*/runs/ehr-*/report/report.html"))
    assert len(own_reports) == 3 and "Against the consortium" in own_reports[0].read_text()
    assert "Global importance" in write_consortium_report(config.run_dir).read_text()

    # One patient's explanation, computed at their hospital from the run's last checkpoint.
    with open(demo_data / "hospital_a" / "ehr.csv", newline="") as f:
        patient = next(csv.DictReader(f))["patient_id"]
    pages = explain_patient_at_hospital(config.run_dir, "hospital_a", patient)
    assert len(pages) == 1 and pages[0].is_relative_to(tmp_path / "sites" / "hospital_a")
    assert "log-odds" in pages[0].read_text()
    with pytest.raises(DataError, match="no usable sample of patient 'nobody'"):
        explain_patient_at_hospital(config.run_dir, "hospital_a", "nobody")
    with pytest.raises(ConfigError, match="no hospital named 'hospital_x'"):
        explain_patient_at_hospital(config.run_dir, "hospital_x", patient)

    # Running a finished run again changes nothing and is recorded as one more invocation.
    again = Pipeline(config, progress=False).run()
    assert np.array_equal(again, load_checkpoint(config.run_dir).weights)
    assert len(json.loads((config.run_dir / "manifest.json").read_text())["invocations"]) == 2
    assert [r["round"] for r in metrics(config.run_dir)] == [1, 2, 3, 4, 5]

    changed = dict(raw, run={**raw["run"], "rounds": 6}, hospitals=raw["hospitals"][:3])
    with pytest.raises(CheckpointError, match="run.rounds: 5 -> 6"):
        Pipeline(parse_config(changed), progress=False).run()


@pytest.mark.parametrize(
    "make_config, file, column",
    [(ehr_config, "ehr.csv", "discharge_status"), (image_config, "labels.csv", "finding")],
    ids=["ehr", "images"],
)
def test_shuffled_labels_stay_at_chance(ray_session, demo_data, tmp_path, make_config, file, column):
    data = copy_hospitals(demo_data, tmp_path / "data")
    shuffle_labels(data, file, column)
    raw = make_config(data, tmp_path / "runs", name="shuffled")
    raw["explain"] = {"enabled": False}
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    assert metrics(config.run_dir)[-1]["pooled"]["auroc"] <= 0.6


def test_image_federation_learns_at_every_hospital(ray_session, demo_data, tmp_path):
    config = parse_config(image_config(demo_data, tmp_path))
    Pipeline(config, progress=False).run()
    assert_pinned(config.run_dir, "images")
    last = metrics(config.run_dir)[-1]
    assert all(m["auroc"] >= 0.75 for m in last["hospitals"].values()), last["hospitals"]
    assert last["pooled"]["auroc"] >= 0.8
    consortium = json.loads((config.run_dir / "explanations.json").read_text())["consortium"]
    assert consortium["checks"]["additivity"] and len(consortium["image_map"]) == 8


def test_driver_killed_mid_round_resumes_to_identical_weights(ray_session, demo_data, tmp_path):
    rounds = 5

    def slow_config(run_root):  # more local epochs, so a round lasts long enough to be killed inside
        raw = ehr_config(demo_data, run_root, rounds=rounds)
        raw["train"]["local_epochs"] = 40
        return raw

    reference = parse_config(slow_config(tmp_path / "reference"))
    Pipeline(reference, progress=False).run()

    raw = slow_config(tmp_path / "killed")
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    killed = parse_config(raw)
    driver = subprocess.Popen(
        [sys.executable, "-m", "fedward.pipelines", "simulate", str(config_file), "--no-progress"],
        cwd=ROOT,
        start_new_session=True,  # its own process group: the kill takes its embedded Ray down too
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        # Wait for round 2 (round 1 also pays for warm-up), then kill at a random point of round 3.
        while (load_checkpoint(killed.run_dir) or NOT_YET).round < 2:
            assert driver.poll() is None and time.monotonic() < deadline, "driver ended before round 2"
            time.sleep(0.02)
        round_seconds = metrics(killed.run_dir)[1]["seconds"]
        time.sleep(random.Random(os.getpid()).uniform(0.1, 0.9) * round_seconds)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    stopped_after = load_checkpoint(killed.run_dir).round
    assert stopped_after < rounds, "the driver finished before it could be killed"

    resumed = Pipeline(killed, progress=False).run()

    expected = load_checkpoint(reference.run_dir).weights
    assert torch.equal(torch.from_numpy(resumed), torch.from_numpy(expected))
    assert torch.equal(torch.from_numpy(load_checkpoint(killed.run_dir).weights), torch.from_numpy(expected))
    assert [r["round"] for r in metrics(killed.run_dir)] == list(range(1, rounds + 1))


def test_a_run_that_commit_0d6210f_stopped_after_round_2_resumes_on_this_code_to_the_same_weights(ray_session, demo_data, tmp_path):
    # Packed at 0d6210f: the run directory and the hospitals' own areas of a 3-round EHR run
    # stopped after round 2, with this test's demo data and paths (tests/e2e/data).
    with tarfile.open(ROOT / "tests" / "e2e" / "data" / "resume_0d6210f.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    raw = ehr_config(demo_data, tmp_path, name="resume", rounds=3)
    raw["explain"] = {"enabled": False}
    # What 0d6210f's positive_values meant, now said: the run keeps its identity.
    raw["data"]["table"]["label"]["negative_values"] = "all others"
    config = parse_config(raw)
    logged = []
    Pipeline(config, progress=False, log=logged.append).run()
    assert any("resuming resume after round 2" in line for line in logged), logged
    assert [r["round"] for r in metrics(config.run_dir)] == [1, 2, 3]
    assert_pinned(config.run_dir, "resumed_from_0d6210f")
