"""The privacy ledger's accounting: charged before training, never forgotten, checked against budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedward import outflows
from fedward.errors import CheckpointError
from fedward.privacy.accounting import GaussianSteps, epsilon
from fedward.privacy.ledger import over_budget, read_spend, record_spend, spend_entries, spent
from tests.privacy.federation import config_with

DP = {"dp_sgd": {"enabled": True, "noise_multiplier": 2.0, "epsilon": 1.0}, "dp_fedavg": {"enabled": True, "noise_multiplier": 4.0}}


def test_every_charge_counts_retries_and_redone_rounds_included(tmp_path):
    config = config_with(DP, 3)
    log = tmp_path / "privacy_spend.jsonl"
    units = {"h0": 100, "h1": 400, "h2": 50}
    record_spend(log, spend_entries(config, 1, 0, ["h0", "h1", "h2"], units))
    record_spend(log, spend_entries(config, 1, 1, ["h0", "h1"], units))  # round 1 tried again without h2
    entries = read_spend(log)
    assert len(entries) == 10  # two levels per hospital per attempt
    eps = spent(config, entries)
    per_round = GaussianSteps(2.0, 32 / 100, 1 * 4)  # batch 32, one local epoch: ceil(100 / 32) steps
    assert eps["patient"]["h0"] == pytest.approx(epsilon([per_round, per_round], 1e-5))
    assert eps["patient"]["h2"] == pytest.approx(epsilon([GaussianSteps(2.0, 32 / 50, 2)], 1e-5))  # charged once
    assert eps["hospital"]["h0"] == pytest.approx(epsilon([GaussianSteps(4.0, 1.0, 1)] * 2, 1e-5))
    assert eps["hospital"]["h2"] == pytest.approx(epsilon([GaussianSteps(4.0, 1.0, 1)], 1e-5))


def test_the_next_round_is_refused_when_it_would_cross_a_budget_naming_the_hospital(tmp_path):
    config = config_with(DP, 3)
    units = {"h0": 300, "h1": 4000, "h2": 4000}
    spend = []
    for round in range(1, 50):
        nxt = spend_entries(config, round, 0, sorted(units), units)
        why = over_budget(config, spend, nxt)
        if why:
            break
        spend += nxt
    # The hospital with the fewest patients samples the largest share of them and runs out first.
    assert round >= 2 and "h0's patient-level epsilon" in why and "above the budget 1" in why
    assert spent(config, spend)["patient"]["h0"] <= 1.0
    # A round without h0 still fits.
    assert over_budget(config, spend, spend_entries(config, round, 0, ["h1", "h2"], units)) is None


def test_a_torn_last_line_is_ignored_but_a_corrupt_middle_is_refused(tmp_path):
    config = config_with(DP, 3)
    log = tmp_path / "privacy_spend.jsonl"
    record_spend(log, spend_entries(config, 1, 0, ["h0"], {"h0": 10}))
    with open(log, "a") as f:
        f.write('{"round": 2, "hosp')
    assert len(read_spend(log)) == 2
    with open(log, "a") as f:
        f.write("\n{}\n")
    with pytest.raises(CheckpointError, match="line 3 is corrupt"):
        read_spend(log)


def test_the_ledger_and_the_privacy_docs_list_every_outflow_with_the_tests_that_show_it():
    text = (Path(__file__).parents[2] / "docs" / "privacy.md").read_text()
    assert outflows.with_table(text) == text, "regenerate the table: python -m fedward.outflows"
    root = Path(__file__).parents[2]
    for row in outflows.ledger_rows():
        if row["shown_by"] != "not tested":
            assert all((root / t).is_file() for t in row["shown_by"].split(", ")), row
