"""Hospital-level DP: clipping, the noise shares and the driver's noised mean."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedward import aggregation
from fedward.actors import outbound
from fedward.errors import ConfigError, HospitalError
from fedward.privacy import dp_fedavg, ledger
from fedward.privacy.hooks import AGGREGATE
from fedward.actors.hospital import Hospital
from fedward.config import parse_config
from fedward.data_adapters.harmonize import merge_summaries
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.types import RoundPlan
from tests.conftest import ehr_config
from tests.privacy.federation import config_with, random_updates


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    config = config_with({"dp_fedavg": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5}}, 3)
    updates = random_updates(config, 1, 1000, scale=1.0)
    clipped = aggregation.bounded(updates["h0"], 0.5, 1000)  # the clip a hospital applies under dp_fedavg
    assert np.linalg.norm(clipped.delta) == pytest.approx(0.5, rel=1e-5)
    assert np.allclose(clipped.delta / np.linalg.norm(clipped.delta), updates["h0"].delta / np.linalg.norm(updates["h0"].delta), atol=1e-6)
    small = aggregation.bounded(updates["h1"], 1e6, 1000)
    assert small is updates["h1"]
    assert dp_fedavg.aggregation_weight(config, 500) == 1.0  # every hospital counts once


@pytest.mark.parametrize("min_hospitals, fewest, shares", [(2, 1, 1), (2, 5, 4), (4, 2, 3), (1, 1, 1)])
def test_noise_shares_leave_full_noise_without_any_one_hospital(min_hospitals, fewest, shares):
    config = config_with({"dp_fedavg": {"enabled": True, "noise_multiplier": 1.0}}, 8, min_hospitals=min_hospitals)
    assert dp_fedavg.noise_shares(config, fewest) == shares


def test_noise_shares_and_the_central_noise_have_the_configured_size():
    config = config_with({"dp_fedavg": {"enabled": True, "noise_multiplier": 2.0, "clip_norm": 0.5}}, 3)
    update = random_updates(config, 1, 200_000, scale=0.0)["h0"]
    share = dp_fedavg.add_noise_share(update, config, shares=4)
    assert np.std(share.delta) == pytest.approx(2.0 * 0.5 / 2, rel=0.01)
    zeros = list(random_updates(config, 1, 200_000, scale=0.0).values())
    mean = dp_fedavg.noised_mean(zeros, config)
    assert mean.hospital == AGGREGATE and mean.weight == 3
    assert np.std(mean.delta) == pytest.approx(2.0 * 0.5 / 3, rel=0.01)
    # Fresh noise from OS entropy each time: never reproducible from a seed the driver knows.
    assert not np.array_equal(dp_fedavg.noised_mean(zeros, config).delta, mean.delta)


def test_a_budget_without_a_noise_multiplier_is_calibrated_to_the_planned_rounds():
    from fedward.privacy.accounting import epsilon

    config = config_with({"dp_fedavg": {"enabled": True, "epsilon": 4.0}}, 3)
    steps = dp_fedavg.round_steps(config)
    assert steps.sample_rate == 1.0 and steps.steps == 1
    assert epsilon([steps] * config.run.rounds, 1e-5) == pytest.approx(4.0, rel=1e-2)
    assert epsilon([steps] * config.run.rounds, 1e-5) <= 4.0 * (1 + 1e-6)


def test_noise_shares_are_sized_for_the_colluders_a_hospital_assumes_and_refused_when_none_would_hide_it():
    config = config_with({"dp_fedavg": {"enabled": True, "noise_multiplier": 1.0}}, 8, min_hospitals=2)
    assert [dp_fedavg.noise_shares(config, 8, c) for c in range(7)] == [7, 6, 5, 4, 3, 2, 1]
    with pytest.raises(ConfigError, match="with as few as 8 hospitals in a round, 7 colluding with the driver leave no other hospital's noise"):
        dp_fedavg.noise_shares(config, 8, 7)


def _independent_epsilon(z: float, rounds: int, delta: float) -> float:
    """The Gaussian mechanism's ε by dp-accounting's PLD accountant directly."""
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def test_epsilon_as_a_function_of_colluders_matches_dp_accounting():
    # The review's case: noise sized for no colluders, ε = 1 over 10 rounds of 8 hospitals.
    config = config_with({"dp_fedavg": {"enabled": True, "epsilon": 1.0, "delta": 1e-5}}, 8, min_hospitals=8)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, rounds=10))
    by = dp_fedavg.epsilon_by_colluders(config, fewest=8, assumed=0, rounds=10)
    z = dp_fedavg.noise_multiplier(config)
    for colluders in range(7):
        # The honest hospitals' shares, each of variance z²/7, less the colluders' and the target's.
        honest_z = z * np.sqrt((7 - colluders) / 7)
        assert by[colluders] == pytest.approx(_independent_epsilon(honest_z, 10, 1e-5), rel=1e-3)
    assert by[0] == pytest.approx(1.0, rel=0.02) and by[7] == float("inf")
    print({c: round(e, 2) for c, e in by.items()})
    assert 1.05 < by[1] < by[2] < by[5] < 4
    # Sized for two colluders, two colluding leave the configured ε.
    sized = dp_fedavg.epsilon_by_colluders(config, fewest=8, assumed=2, rounds=10)
    assert sized[2] == pytest.approx(by[0], rel=1e-6) and sized[0] < by[0]


def test_a_hospital_sizes_its_share_for_its_own_colluders_and_the_ledger_reports_epsilon_by_colluders():
    config = config_with({"dp_fedavg": {"enabled": True, "noise_multiplier": 2.0, "clip_norm": 0.5}, "masking": {"enabled": True}}, 6, min_hospitals=6)
    update = random_updates(config, 1, 200_000, scale=0.0)["h0"]

    class Agreed:  # the masking hook's word on how few hospitals can complete the round
        reveals_individual_updates = False

        def contributors_agreed(self, round):
            return 6

    sending = outbound.Sending(1, 0, None, update.delta.size, None, "start", None)
    sent = outbound.PrivateNoise(config, Agreed(), colluders=2).apply(update, sending)
    assert np.std(sent.delta) == pytest.approx(2.0 * 0.5 / np.sqrt(6 - 1 - 2), rel=0.01) and sent.metrics["dp_fedavg_colluders"] == 2
    records = [{"round": r, "privacy": {"dp_fedavg": {"participants": [f"h{i}" for i in range(6)], "fewest": 6,
                                                       "colluders_assumed": {"h0": 2, "h1": 1}}}} for r in (1, 2, 3)]
    entry = ledger._collusion(config, records)
    assert entry["colluders_assumed"] == 1
    assert entry["epsilon_by_colluders"] == {str(c): e for c, e in dp_fedavg.epsilon_by_colluders(config, 6, 1, 3).items()}


def test_masking_is_refused_where_the_assumed_colluders_and_the_driver_would_read_the_last_survivor():
    config = config_with({"masking": {"enabled": True}}, 4, min_hospitals=3)

    class Threshold:
        reveals_individual_updates, form = False, "masked"

        def contributors_agreed(self, round):
            return 3  # a round completes with 3 survivors

    update = random_updates(config, 1, 10, scale=1.0)["h0"]
    sending = outbound.Sending(1, 0, None, 10, None, "start", None)
    with pytest.raises(HospitalError, match="round 1 can complete with 3 hospitals; its policy assumes 2 of them collude .* at least 4"):
        outbound.Encode(Threshold(), colluders=2).apply(update, sending)


def test_a_hospital_refuses_the_round_that_would_take_its_hospital_level_epsilon_past_the_budget(demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path, rounds=3)
    config = parse_config({**raw, "privacy": {"dp_fedavg": {"enabled": True, "epsilon": 2.0, "delta": 1e-5}}})
    # Its noise is calibrated so that 3 rounds spend 2.0.
    hospital = Hospital("hospital_a", config, "capped")
    hospital.load()
    weights, layout = flatten(build_model(config.model, hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict())))
    for r in (1, 2, 3):
        hospital.fit(RoundPlan(r, "hospital_a", seed=r, local_epochs=1, lr=0.05), weights, layout)
    with pytest.raises(HospitalError, match=r"hospital_a: round 3 would raise its hospital-level epsilon to .* above its budget 2; it refuses to train"):
        hospital.fit(RoundPlan(3, "hospital_a", seed=3, local_epochs=1, lr=0.05), weights, layout)  # a fourth charge, asked as a retry
