"""Hospital-level DP: clipping, the noise shares and the driver's noised mean."""

from __future__ import annotations

import numpy as np
import pytest

from fedward import aggregation
from fedward.privacy import dp_fedavg
from fedward.privacy.hooks import AGGREGATE
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
