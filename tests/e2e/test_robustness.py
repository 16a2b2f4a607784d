"""Hostile hospitals through the real pipeline: refused updates, robust rules, anomaly scores."""

from __future__ import annotations

import json

import pytest

from fedward.explain.report import write_consortium_report
from fedward.config import parse_config
from fedward.pipelines.run import Pipeline
from tests.conftest import ehr_config

pytestmark = pytest.mark.e2e


def _run(demo_data, tmp_path, name, **sections):
    raw = {**ehr_config(demo_data, tmp_path, name=name, rounds=3), "explain": {"enabled": False}, **sections}
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    return config, [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_update_with_infinite_values_is_refused_and_the_round_goes_on(ray_session, demo_data, tmp_path):
    config, records = _run(demo_data, tmp_path, "refused", attack={"hospitals": ["hospital_a"], "kind": "scale", "scale": float("inf")})
    for r in records:
        assert r["participants"] == ["hospital_b", "hospital_c"]
        assert r["failures"]["hospital_a"].startswith("rejected: its change holds") and "NaN or infinite" in r["failures"]["hospital_a"]
        assert sorted(r["hospitals"]) == ["hospital_a", "hospital_b", "hospital_c"]  # it is still evaluated
    assert records[-1]["pooled"]["auroc"] >= 0.75
    page = write_consortium_report(config.run_dir).read_text()
    assert "rejected: its change holds" in page and "Simulated attack: hospital_a ran &#x27;scale&#x27;" in page


def test_the_median_holds_against_a_hospital_scaling_its_change(ray_session, demo_data, tmp_path):
    attack = {"hospitals": ["hospital_a"], "kind": "scale", "scale": 50.0}
    config, records = _run(demo_data, tmp_path, "median", attack=attack, robust={"rule": "median", "quarantine_after": 2})
    assert records[-1]["pooled"]["auroc"] >= 0.75
    for r in records[:2]:
        distance = {h: s["distance"] for h, s in r["anomaly"].items()}
        assert max(distance, key=distance.get) == "hospital_a" and distance["hospital_a"] > 10 * distance["hospital_b"]
        assert r["flagged"] == ["hospital_a"] and r["quarantined"] == []
    # Flagged in two rounds, it is asked no more; the others carry on.
    assert records[2]["quarantined"] == ["hospital_a"] and records[2]["participants"] == ["hospital_b", "hospital_c"]
    page = write_consortium_report(config.run_dir).read_text()
    assert "Anomaly scores" in page and "hospital_a from round 3" in page


def test_fltrust_gives_a_hospital_sending_the_opposite_change_no_weight(ray_session, demo_data, tmp_path):
    attack = {"hospitals": ["hospital_a"], "kind": "sign_flip"}
    robust = {"rule": "fltrust", "trusted_data": str(demo_data / "hospital_c")}
    config, records = _run(demo_data, tmp_path, "fltrust", attack=attack, robust=robust)
    assert all(r["trust"]["hospital_a"] == 0.0 and r["trust"]["hospital_b"] > 0 for r in records[1:])
    assert records[-1]["pooled"]["auroc"] >= 0.75
    assert (config.run_dir / "trusted_root" / "runs").is_dir()  # the trusted data is read at the driver, in its own area
