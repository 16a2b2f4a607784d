"""Privacy accounting: fedward's epsilons are dp-accounting's PLD epsilons, and calibration hits its budget."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from fedward.errors import ConfigError
from fedward.privacy.accounting import (
    ACCOUNTANT,
    VALUE_DISCRETIZATION_INTERVAL,
    GaussianSteps,
    calibrate_noise_multiplier,
    epsilon,
)

DELTA = 1e-5


def pld_epsilon(events: list[dp_accounting.DpEvent]) -> float:
    accountant = PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)
    for event in events:
        accountant.compose(event)
    return accountant.get_epsilon(DELTA)


def test_epsilon_is_dp_accountings_pld_epsilon():
    history = [GaussianSteps(1.1, 0.05, 120), GaussianSteps(1.1, 0.05, 80), GaussianSteps(3.0, 1.0, 4)]
    sampled = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1))
    direct = pld_epsilon(
        [
            dp_accounting.SelfComposedDpEvent(sampled, 120),
            dp_accounting.SelfComposedDpEvent(sampled, 80),
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 4),
        ]
    )
    assert epsilon(history, DELTA) == pytest.approx(direct, rel=1e-3)
    assert epsilon(history[2:], DELTA) == pytest.approx(pld_epsilon([dp_accounting.GaussianDpEvent(1.5)]), rel=1e-3)


def test_a_long_history_costs_what_one_run_of_its_steps_costs():
    one_run = epsilon([GaussianSteps(1.0, 0.1, 40 * 50)], DELTA)
    assert epsilon([GaussianSteps(1.0, 0.1, 40)] * 50, DELTA) == one_run


def test_more_steps_less_noise_or_larger_samples_spend_more():
    base = epsilon([GaussianSteps(1.0, 0.1, 100)], DELTA)
    assert epsilon([GaussianSteps(1.0, 0.1, 200)], DELTA) > base
    assert epsilon([GaussianSteps(0.8, 0.1, 100)], DELTA) > base
    assert epsilon([GaussianSteps(1.0, 0.2, 100)], DELTA) > base
    assert epsilon([GaussianSteps(1.0, 0.1, 100)], 1e-7) > base


def test_nothing_spent_is_zero():
    assert epsilon([], DELTA) == 0.0
    assert epsilon([GaussianSteps(1.0, 0.1, 0)], DELTA) == 0.0


@pytest.mark.parametrize(
    "target, sample_rate, steps",
    [(2.0, 0.05, 300), (1.0, 1.0, 20), (8.0, 0.25, 40)],  # DP-SGD-like, DP-FedAvg-like, few big batches
)
def test_calibration_spends_the_budget_and_no_more(target, sample_rate, steps):
    sigma = calibrate_noise_multiplier(target, DELTA, sample_rate, steps)
    spent = epsilon([GaussianSteps(sigma, sample_rate, steps)], DELTA)
    assert target * 0.99 <= spent <= target
    # the smallest such noise: a little less overspends
    assert epsilon([GaussianSteps(sigma * 0.98, sample_rate, steps)], DELTA) > target


def test_an_unreachable_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="noise multiplier"):
        calibrate_noise_multiplier(1e5, DELTA, 1.0, 1)
    with pytest.raises(ConfigError, match="no step"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 0)


def test_steps_are_checked_and_the_accountant_is_named():
    with pytest.raises(ConfigError, match="sample_rate"):
        GaussianSteps(1.0, 1.5, 10)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        GaussianSteps(0.0, 0.1, 10)
    assert "PLD" in ACCOUNTANT and str(VALUE_DISCRETIZATION_INTERVAL) in ACCOUNTANT
