"""A federation whose changes travel compressed still learns, on a fraction of the bytes."""

from __future__ import annotations

import json

import pytest

from fedward.config import parse_config
from fedward.pipelines.run import Pipeline
from tests.conftest import ehr_config

pytestmark = pytest.mark.e2e


def test_top_k_with_error_feedback_learns_on_an_eighth_of_the_bytes(ray_session, demo_data, tmp_path):
    # A model of 11,000 weights: on the demo's default one (1,100) the update's fixed fields would dominate.
    raw = {**ehr_config(demo_data, tmp_path, name="top_k"), "explain": {"enabled": False}, "model": {"kind": "mlp", "hidden": [128, 64]},
           "compression": {"kind": "top_k", "top_k_fraction": 0.05}}
    pipeline = Pipeline(parse_config(raw), progress=False, log=lambda _: None)
    weights = pipeline.run()
    records = [json.loads(line) for line in (pipeline.run_dir / "metrics.jsonl").read_text().splitlines()]
    plain_bytes = 4 * weights.size
    assert weights.size > 10_000
    for r in records:
        assert r["failures"] == {} and len(r["participants"]) == 3
        assert all(sent < plain_bytes / 8 for sent in r["privacy"]["sent_bytes"].values()), r["privacy"]["sent_bytes"]
    assert records[-1]["pooled"]["auroc"] >= 0.8
