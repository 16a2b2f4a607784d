"""Privacy hooks on a real Ray with the demo hospitals: each one, and a combination, through the config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedward.explain.report import write_consortium_report
from fedward.config import parse_config
from fedward.checkpoint import load_checkpoint
from fedward.pipelines.run import Pipeline
from fedward.pipelines.status import run_status
from fedward.privacy.accounting import GaussianSteps, epsilon
from tests.conftest import ehr_config

pytestmark = pytest.mark.e2e


def run(demo_data, tmp_path, name: str, privacy: dict, rounds: int = 2):
    raw = ehr_config(demo_data, tmp_path, name=name, rounds=rounds)
    raw["explain"] = {"enabled": False}
    raw["privacy"] = privacy
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    return config, json.loads((config.run_dir / "privacy.json").read_text())


@pytest.fixture(scope="module")
def plaintext(ray_session, demo_data, tmp_path_factory):
    config, ledger = run(demo_data, tmp_path_factory.mktemp("plain"), "plain", {}, rounds=1)
    return load_checkpoint(config.run_dir).weights, ledger


@pytest.mark.parametrize(
    "privacy, form, tolerance",
    [
        ({"masking": {"enabled": True}}, "masked", 1e-5),
        ({"encryption": {"enabled": True}}, "encrypted", 1e-5),
    ],
    ids=["masking", "encryption"],
)
def test_a_hidden_sum_trains_the_same_model_as_plaintext(plaintext, demo_data, tmp_path, privacy, form, tolerance):
    # One round: the aggregate itself is compared; later rounds of SGD would amplify its rounding.
    expected, plain_ledger = plaintext
    config, ledger = run(demo_data, tmp_path, form, privacy, rounds=1)
    weights = load_checkpoint(config.run_dir).weights
    np.testing.assert_allclose(weights, expected, atol=tolerance)
    assert ledger["transport"]["form"] == form
    for entry in ledger["rounds"]:
        assert set(entry["hospitals"]) == {"hospital_a", "hospital_b", "hospital_c"}
        for h, e in entry["hospitals"].items():
            assert e["update"] == form
            # What a hospital sent, protocol messages included, against the plain update's size.
            assert e["bytes_sent"] > plain_ledger["rounds"][0]["hospitals"][h]["bytes_sent"]
    page = write_consortium_report(config.run_dir).read_text()
    assert "How updates travelled" in page and form in page


def test_patient_level_dp_stops_at_its_budget_with_the_accountants_epsilon(ray_session, demo_data, tmp_path):
    # At this noise multiplier, a budget the smallest hospital exhausts after two or three rounds.
    privacy = {"dp_sgd": {"enabled": True, "noise_multiplier": 2.0, "epsilon": 1.3, "max_grad_norm": 1.0}}
    config, ledger = run(demo_data, tmp_path, "dp", privacy, rounds=6)
    stopped_after = len(ledger["rounds"])
    assert 1 <= stopped_after < 6, ledger["stopped"]
    assert ledger["stopped"].startswith(f"before round {stopped_after + 1}") and "above the budget 1.3" in ledger["stopped"]
    assert load_checkpoint(config.run_dir).round == stopped_after
    spent = ledger["differential_privacy"]["patient_level"]["spent_epsilon"]
    for h, eps in spent.items():
        steps = [GaussianSteps(**r["hospitals"][h]["dp_sgd"]) for r in ledger["rounds"]]
        assert eps == pytest.approx(epsilon(steps, 1e-5), rel=1e-9) and eps <= 1.3
        assert all(s.noise_multiplier == 2.0 and 0 < s.sample_rate < 1 for s in steps)
    # Run again: the budget still holds, nothing more is trained.
    Pipeline(config, progress=False).run()
    assert load_checkpoint(config.run_dir).round == stopped_after
    page = write_consortium_report(config.run_dir).read_text()
    assert "stopped by the privacy budget" in page and "Patient level differential privacy" in page
    status = run_status(config.run_dir)
    assert f"round {stopped_after} of 6 (stopped by the privacy budget before round {stopped_after + 1}" in status
    assert "patient-level DP: epsilon spent at most" in status


def test_hospital_level_dp_behind_masking_adds_the_noise_at_the_hospitals(ray_session, demo_data, tmp_path):
    privacy = {"masking": {"enabled": True}, "dp_fedavg": {"enabled": True, "epsilon": 8.0, "clip_norm": 2.0}}
    config, ledger = run(demo_data, tmp_path, "dpmask", privacy)
    assert len(ledger["rounds"]) == 2 and ledger["stopped"] is None
    level = ledger["differential_privacy"]["hospital_level"]
    assert level["noise_added_by"].startswith("the hospitals")
    # Calibrated for run.rounds rounds: the last round spends the whole budget.
    assert level["spent_epsilon_max"] == pytest.approx(8.0, rel=1e-2) and level["spent_epsilon_max"] <= 8.0 * (1 + 1e-6)
    entry = ledger["rounds"][-1]
    # Threshold 2 of 3: without the hospital at stake one other may remain, so each adds the full noise.
    assert entry["dp_fedavg"]["noise"] == "distributed" and entry["dp_fedavg"]["noise_shares"] == 1
    assert all(e["update"] == "masked, clipped, with its noise share" for e in entry["hospitals"].values())


def test_encryption_with_both_levels_of_dp_composes(ray_session, demo_data, tmp_path):
    privacy = {
        "encryption": {"enabled": True},
        "dp_sgd": {"enabled": True, "noise_multiplier": 1.0},
        "dp_fedavg": {"enabled": True, "noise_multiplier": 0.5, "clip_norm": 2.0},
    }
    config, ledger = run(demo_data, tmp_path, "all", privacy, rounds=1)
    assert set(ledger["differential_privacy"]) >= {"patient_level", "hospital_level", "accountant"}
    entry = ledger["rounds"][0]
    for e in entry["hospitals"].values():
        assert e["update"] == "encrypted, clipped, with its noise share, trained with DP-SGD"
        assert e["epsilon_patient"] > 0 and e["epsilon_hospital"] > 0
    assert entry["protocol"]["scheme"] == "CKKS"
    assert np.isfinite(load_checkpoint(config.run_dir).weights).all()
