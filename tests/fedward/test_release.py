"""The score bins a hospital releases: every cell holds the floor in patients of each outcome, and
the figures the driver computes from them say how far from exact they can be."""

from __future__ import annotations

import numpy as np
import pytest

from fedward import metrics, release


def _scores(rng, n, prevalence=0.3):
    labels = rng.random(n) < prevalence
    return np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, n), 0, 1), labels


@pytest.mark.parametrize("floor", [1, 10, 25])
def test_every_released_bin_holds_the_floor_in_patients_of_each_outcome(floor):
    rng = np.random.default_rng(floor)
    scores, labels = _scores(rng, 600)
    patients = (np.arange(600) // 3).astype(str)  # three samples (images, visits) per patient
    labels = labels[(np.arange(600) // 3) * 3]  # a patient's samples share the outcome
    bins = release.score_bins(scores, labels, patients, floor)
    for lo, hi in zip(bins.low, bins.high):
        inside = (np.floor(scores * 100) >= lo) & (np.floor(scores * 100) < hi)
        assert len(set(patients[inside & labels])) >= floor and len(set(patients[inside & ~labels])) >= floor
    assert bins.positive.sum() == labels.sum() and bins.negative.sum() == (~labels).sum()
    assert (bins.low[1:] >= bins.high[:-1]).all()  # in order, none overlapping


def test_a_hospital_with_fewer_patients_of_an_outcome_than_the_floor_releases_no_bins():
    rng = np.random.default_rng(0)
    scores, labels = _scores(rng, 200, prevalence=0.0)
    labels[:9] = True  # nine patients with the outcome
    assert release.score_bins(scores, labels, np.arange(200), 10) is None
    assert release.held_back(10) == "held back: fewer than 10 patients"
    # Ten images of one patient are one patient.
    labels[:20] = True
    assert release.score_bins(scores, labels, np.where(labels, "p", np.arange(200).astype(str)), 10) is None


def test_a_cut_where_both_sides_hold_the_floor_makes_the_rates_there_exact():
    rng = np.random.default_rng(1)
    scores, labels = _scores(rng, 2000, prevalence=0.5)
    bins = release.score_bins(scores, labels, np.arange(2000), 10, cut=0.5)
    assert 50 in bins.low
    figures = release.rates(bins, threshold=0.5)
    assert figures["sensitivity"] == pytest.approx((scores[labels] >= 0.5).mean(), abs=1e-12)
    assert figures["specificity"] == pytest.approx((scores[~labels] < 0.5).mean(), abs=1e-12)


def test_no_rate_is_released_at_a_threshold_a_bin_straddles():
    rng = np.random.default_rng(2)
    scores, labels = _scores(rng, 60, prevalence=0.5)
    bins = release.score_bins(scores, labels, np.arange(60), 10, cut=0.5)
    assert (bins.low < 50).any() and (bins.high > 50).any() and not (bins.low == 50).any()  # too few on one side to cut there
    assert release.rates(bins, threshold=0.5) == {}


def test_a_hospitals_own_auroc_leaves_it_to_two_decimals():
    rng = np.random.default_rng(3)
    scores, labels = _scores(rng, 300)
    assert release.own_auroc(labels, scores) == round(metrics.auroc(labels, scores), 2)
