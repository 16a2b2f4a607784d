"""Pooled figures from padded statistics: the driver's sum opens only at a hospital holding the
evaluation key, into exactly the pooled statistics, and never for one hospital alone."""

from __future__ import annotations

import numpy as np
import pytest

from fedward.errors import AggregationError
from fedward import pooling
from fedward.pooling import EvaluationKey


def _keys(tmp_path, names=("a", "b", "c")):
    keys = {h: EvaluationKey(h, "run-1", tmp_path / h) for h in names}
    pooling.deal(sorted(keys), pooling.in_process(list(keys.values())))
    return keys


def _statistics(rng):
    return {"positive_hist": rng.integers(0, 5, 100), "negative_hist": rng.integers(0, 9, 100), "loss_sum": np.array(rng.random() * 100)}


def test_the_sum_opens_into_the_exact_pooled_statistics_and_the_padded_ones_hide_each_hospital(tmp_path):
    rng = np.random.default_rng(0)
    keys = _keys(tmp_path)
    own = {h: _statistics(rng) for h in keys}
    padded = [keys[h].pad(own[h]) for h in sorted(keys)]
    opened = keys["b"].open(pooling.add(padded))
    for name in ("positive_hist", "negative_hist"):
        assert np.array_equal(opened[name], sum(s[name] for s in own.values()))
    assert opened["loss_sum"] == pytest.approx(sum(float(s["loss_sum"]) for s in own.values()), abs=1e-6)
    # What the driver holds of one hospital is its counts under a pad it cannot remove.
    plain = np.round(np.concatenate([own["a"][k].ravel() for k in sorted(own["a"])]) * 2.0**pooling.FRACTION_BITS).astype(np.int64)
    assert (padded[0].values.view(np.int64) != plain).mean() > 0.99
    # The same statistics padded twice share no pad: their difference is no difference of counts.
    again = keys["a"].pad(own["a"])
    assert again.nonce != padded[0].nonce and (again.values != padded[0].values).mean() > 0.99


def test_a_hospital_opens_no_sum_of_one_hospital_nor_one_it_is_not_part_of(tmp_path):
    rng = np.random.default_rng(1)
    keys = _keys(tmp_path)
    alone = pooling.add([keys["a"].pad(_statistics(rng))])
    with pytest.raises(AggregationError, match="opens only sums of 2 or more different hospitals, itself among them"):
        keys["a"].open(alone)
    pair = pooling.add([keys["a"].pad(_statistics(rng)), keys["b"].pad(_statistics(rng))])
    with pytest.raises(AggregationError, match="itself among them"):
        keys["c"].open(pair)
    twice = keys["a"].pad(_statistics(rng))
    with pytest.raises(AggregationError, match="different hospitals"):
        keys["a"].open(pooling.add([twice, twice]))


def test_the_driver_reads_no_key_and_a_restarted_hospital_finds_its_own(tmp_path):
    keys = _keys(tmp_path)
    assert all((tmp_path / h / pooling.KEY_FILE).read_bytes() == (tmp_path / "a" / pooling.KEY_FILE).read_bytes() for h in keys)
    rng = np.random.default_rng(2)
    stats = [_statistics(rng) for _ in range(2)]
    summed = pooling.add([keys["a"].pad(stats[0]), keys["b"].pad(stats[1])])
    restarted = EvaluationKey("b", "run-1", tmp_path / "b")  # a new process of hospital b
    assert np.array_equal(restarted.open(summed)["positive_hist"], stats[0]["positive_hist"] + stats[1]["positive_hist"])
    # Another run's key opens nothing of this one.
    other = _keys(tmp_path / "other")
    assert not np.array_equal(other["b"].open(summed)["positive_hist"], stats[0]["positive_hist"] + stats[1]["positive_hist"])


def test_pooled_figures_skip_a_hospital_that_fails_to_open_and_name_the_hospitals_pooled(tmp_path):
    keys = _keys(tmp_path)
    rng = np.random.default_rng(3)
    padded = [keys[h].pad(_statistics(rng)) for h in ("a", "b")]

    def open_at(name, summed):
        if name == "a":
            raise RuntimeError("lost")
        return {"n": int(keys[name].open(summed)["positive_hist"].sum())}

    figures = pooling.pooled([*padded, None], open_at)
    assert figures["pooled_over"] == ["a", "b"] and figures["n"] > 0
    assert pooling.pooled(padded[:1], open_at) == {}  # one hospital: its own exact figures, so none
