"""A run with the EHR demo's settings (subgroups and explanations on) writes no count under the
release floor anywhere in its run directory, and a hospital whose policy floor its patients do not
reach shows "held back" instead of figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import yaml

from fedward.config import parse_config
from fedward.explain.report import write_consortium_report
from fedward.checkpoint import read_metrics
from fedward.pipelines.run import Pipeline
from tests.conftest import ehr_config
from tests.privacy.scan import scan
from tests.privacy.test_release_attack import release_before_policy

DEMO = yaml.safe_load((Path(__file__).parents[2] / "configs" / "demo_ehr.yaml").read_text())


def test_no_file_of_a_demo_run_counts_fewer_patients_than_the_floor(ray_session, demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path, name="release", rounds=2)
    # hospital_b's own policy: no cell under 80 patients; its ~70 held-out patients with the outcome
    # are fewer. The config asks as much of the cells it sets, or hospital_b would refuse it.
    raw |= {"explain": {**{k: v for k, v in DEMO["explain"].items() if k != "truth"}, "min_bin_count": 80},
            "subgroups": {**DEMO["subgroups"], "min_count": 80}}
    (tmp_path / "sites" / "hospital_b").mkdir(parents=True)
    (tmp_path / "sites" / "hospital_b" / "policy.yaml").write_text("release_floor: 80\n")
    config = parse_config(raw)
    Pipeline(config, progress=False, log=lambda m: None).run()

    found, files = scan(config.run_dir, floor=10)
    assert files >= 8 and found == []
    assert {"metrics.jsonl", "data.json", "subgroups.json", "explanations.json", "privacy.json"} <= {p.name for p in config.run_dir.iterdir()}
    last = read_metrics(config.run_dir / "metrics.jsonl")[-1]
    assert last["hospitals"]["hospital_b"] == {"n": last["hospitals"]["hospital_b"]["n"], "held_back": "held back: fewer than 80 patients",
                                               "train_loss": last["hospitals"]["hospital_b"]["train_loss"]}
    assert last["pooled"]["pooled_over"] == ["hospital_a", "hospital_b", "hospital_c"]  # its exact counts still pool, padded
    page = write_consortium_report(config.run_dir).read_text()
    assert "<td>hospital_b</td>" in page and "held back: fewer than 80 patients" in page


def test_the_scan_finds_the_cells_the_release_before_the_policy_wrote(tmp_path):
    """What a hospital's entry held before the release policy (commit 0e9f19b), as the scan reads it."""
    scores, labels = np.linspace(0, 1, 200), np.arange(200) % 3 == 0
    entry = {"n": 200, **release_before_policy(scores, labels), "auroc": 0.8}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "hospitals": {"hospital_a": entry}}) + "\n")
    found, files = scan(tmp_path, floor=10)
    assert files == 1 and len(found) == 200 and found[0] == "metrics.jsonl:1.hospitals.hospital_a.positive_hist holds 1"
