"""Robust rules against a few hostile hospitals, anomaly scores and the attack simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import trim_mean

from fedward.actors import attacks
from fedward.config import AttackConfig, RobustConfig, parse_config
from fedward.errors import ConfigError
from fedward.tasks import binary_task
from fedward.types import Layout, Update
from fedward import aggregation
from fedward.strategies import STRATEGIES
from tests.conftest import ehr_config

SIZE = 50
LAYOUT = Layout(("w",), ((SIZE,),))
HONEST = np.linspace(-0.5, 0.5, SIZE)


def federation(attack=None, n=8, hostile=2, seed=0):
    """n changes near HONEST, the first `hostile` of them replaced by what `attack` makes of them."""
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(n):
        delta = HONEST + rng.normal(0, 0.05, SIZE)
        if i < hostile and attack is not None:
            delta = attack(delta)
        updates.append(Update(1, f"h{i}", delta.astype(np.float32), LAYOUT, 100 + i, 100.0 + i))
    return updates


ATTACKS = {"sign_flip": lambda d: -10 * d, "scale": lambda d: 50 * d, "noise": lambda d: np.random.default_rng(1).normal(0, 5, SIZE)}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_robust_rules_stay_near_the_honest_change_where_the_mean_does_not(rule, attack):
    updates = federation(ATTACKS[attack])
    mean = aggregation.combine(updates, LAYOUT, RobustConfig())
    robust = aggregation.combine(updates, LAYOUT, RobustConfig(rule=rule, trim=0.25, byzantine=2))
    # Honest changes scatter by about 0.35 around HONEST; the attacks drag the mean away by several units.
    assert np.linalg.norm(robust - HONEST) < 0.6 and np.linalg.norm(mean - HONEST) > 2.0


def test_each_rule_computes_what_it_says():
    updates = federation(ATTACKS["scale"])
    deltas = np.stack([u.delta.astype(np.float64) for u in updates])
    np.testing.assert_array_equal(aggregation.combine(updates, LAYOUT, RobustConfig(rule="median")), np.median(deltas, axis=0))
    np.testing.assert_array_equal(aggregation.combine(updates, LAYOUT, RobustConfig(rule="trimmed_mean", trim=0.25)), trim_mean(deltas, 0.25, axis=0))
    scores = aggregation.krum_scores(deltas, byzantine=2)
    assert scores[:2].min() > scores[2:].max()  # the attackers lie far from everyone
    by_hand = [sum(sorted(np.sum((deltas[i] - deltas[j]) ** 2) for j in range(8) if j != i)[:4]) for i in range(8)]
    np.testing.assert_allclose(scores, by_hand, rtol=1e-9)
    krum = aggregation.combine(updates, LAYOUT, RobustConfig(rule="krum", byzantine=2))
    assert any(np.array_equal(krum, u.delta.astype(np.float64)) for u in updates[2:])
    multi = aggregation.combine(updates, LAYOUT, RobustConfig(rule="multi_krum", byzantine=2))
    np.testing.assert_allclose(multi, aggregation.weighted_mean(updates[2:], LAYOUT), atol=1e-12)  # keeps n - f = 6
    bounded = [aggregation.bounded(u, 1.0, SIZE) for u in updates]
    clipped = [u.delta / max(1.0, np.linalg.norm(u.delta.astype(np.float64))) for u in updates]
    np.testing.assert_allclose([b.delta for b in bounded], clipped, atol=1e-6)
    # Past the model's values (SCAFFOLD's control change) entries scale along but do not count.
    extended = Update(1, "h", np.concatenate([HONEST, 100 * HONEST]).astype(np.float32), Layout(("w", "control:w"), ((SIZE,), (SIZE,))), 1, 1.0)
    np.testing.assert_allclose(aggregation.bounded(extended, 1.0, SIZE).delta, extended.delta / np.linalg.norm(HONEST), rtol=1e-5)


def test_anomaly_scores_single_out_the_attackers():
    scores = aggregation.anomaly_scores(federation(ATTACKS["sign_flip"]), SIZE)
    assert all(scores[f"h{i}"]["cosine"] < 0 < scores[f"h{j}"]["cosine"] for i in range(2) for j in range(2, 8))
    assert min(scores[f"h{i}"]["distance"] for i in range(2)) > 5 * max(scores[f"h{j}"]["distance"] for j in range(2, 8))
    assert aggregation.anomaly_scores(federation()[:1], SIZE) == {}  # nothing to compare one change with


def test_robust_rules_are_refused_where_they_cannot_work(tmp_path):
    def config(robust, **sections):
        return parse_config({**ehr_config(tmp_path, tmp_path), "robust": robust, **sections})

    with pytest.raises(ConfigError, match=r"robust.byzantine=1: Krum needs more than 2f \+ 2 = 4 hospitals per round, and a round may go ahead with run.min_hospitals=2"):
        config({"rule": "multi_krum"})
    with pytest.raises(ConfigError, match=r"robust.trim=0.2: a round with run.min_hospitals=2 hospitals would cut nothing; raise it to at least 0.50"):
        config({"rule": "trimmed_mean"})
    with pytest.raises(ConfigError, match=r"robust.norm_bound: privacy.dp_fedavg already bounds each update"):
        config({"norm_bound": 1.0}, privacy={"dp_fedavg": {"enabled": True, "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match=r"attack.hospitals: \['hospital_z'\] are not hospitals of this run"):
        config({}, attack={"hospitals": ["hospital_z"]})
    assert config({"norm_bound": 2.0}, privacy={"masking": {"enabled": True}}).robust.norm_bound == 2.0  # offered with masking
    with pytest.raises(ConfigError, match=r"robust.trusted_data: fltrust needs the driver's trusted data folder"):
        config({"rule": "fltrust"})


def test_every_strategy_combines_by_the_configured_rule(tmp_path):
    raw = ehr_config(tmp_path, tmp_path)
    raw["hospitals"] = [{"name": f"h{i}", "data": str(tmp_path)} for i in range(8)]
    raw["robust"] = {"rule": "median"}
    for name in ("fedavg", "fedprox", "fedyogi"):
        strategy = STRATEGIES[name](parse_config({**raw, "strategy": {"name": name}}))
        strategy.start(torch.nn.Linear(SIZE, 1, bias=False), Layout(("weight",), ((1, SIZE),)))
        updates = [Update(1, u.hospital, u.delta, Layout(("weight",), ((1, SIZE),)), u.num_examples, u.weight) for u in federation(ATTACKS["scale"])]
        moved = strategy.aggregate(1, np.zeros(SIZE, np.float32), updates, {})
        assert np.abs(moved).max() < 1.0, name  # the scaled attackers (changes of up to 25) do not drag it


def test_simulated_attackers_tamper_only_with_their_own_updates():
    update = federation()[0]
    for kind, check in (
        ("sign_flip", lambda d: np.array_equal(d, -update.delta)),
        ("scale", lambda d: np.allclose(d, 10 * update.delta)),
        ("noise", lambda d: abs(d.std() - 1.0) < 0.3 and not np.allclose(d, update.delta)),
        ("label_flip", lambda d: np.array_equal(d, update.delta)),  # its harm is in training, not in the update
    ):
        attack = AttackConfig(hospitals=("h0",), kind=kind)
        assert check(attacks.tampered(attack, update, seed=3).delta), kind
        assert attacks.tampered(AttackConfig(hospitals=("h1",), kind=kind), update, seed=3) is update
    y = torch.tensor([0.0, 1.0, 1.0])
    assert torch.equal(attacks.training_targets(AttackConfig(hospitals=("h0",), kind="label_flip"), "h0", y, binary_task()), 1 - y)
    assert attacks.training_targets(AttackConfig(hospitals=("h0",), kind="label_flip"), "h1", y, binary_task()) is y


def test_a_change_far_beyond_the_typical_distance_is_flagged():
    scores = aggregation.anomaly_scores(federation(ATTACKS["scale"], hostile=1), SIZE)
    assert aggregation.flagged(scores, 3.0) == ["h0"]
    assert aggregation.flagged(aggregation.anomaly_scores(federation(), SIZE), 3.0) == []
    assert aggregation.flagged(aggregation.anomaly_scores(federation(ATTACKS["scale"], n=2, hostile=1), SIZE), 3.0) == []


def test_fltrust_weighs_changes_by_their_agreement_with_the_trusted_one():
    updates = federation(ATTACKS["sign_flip"], hostile=1)
    updates[1] = Update(1, "h1", (HONEST * 40).astype(np.float32), LAYOUT, 101, 101.0)  # the right way, but huge
    kept, trust = aggregation.trust_weighted(updates, HONEST.astype(np.float32))
    assert trust["h0"] == 0.0 and "h0" not in {u.hospital for u in kept}  # it points away: it counts for nothing
    assert trust["h1"] == pytest.approx(1.0) and all(0.9 < trust[f"h{i}"] < 1.0 for i in range(2, 8))
    norm = np.linalg.norm(HONEST)
    assert all(np.linalg.norm(u.delta.astype(np.float64)) == pytest.approx(norm, rel=1e-5) for u in kept)  # a larger change weighs no more
    combined = aggregation.combine(kept, LAYOUT, RobustConfig(rule="fltrust", trusted_data="x"))
    assert np.linalg.norm(combined - HONEST) < 0.2
    assert aggregation.trust_weighted(updates[:1], HONEST.astype(np.float32)) == ([], {"h0": 0.0})  # the weights then stay
