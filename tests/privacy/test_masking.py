"""Secure aggregation by masking: exact sums despite dropouts, failures instead of wrong models,
and nothing the driver receives that says anything about one hospital's update."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from scipy import stats

from fedward.errors import AggregationError
from fedward.privacy.hooks import AGGREGATE
from fedward.privacy.masking import MaskingHook, Unmask, UnmaskShares
from tests.privacy.federation import Federation, config_with, leaves, random_updates, weighted_mean

SIZE = 20_000


def masking(hospitals: int, **settings):
    return config_with({"masking": {"enabled": True, **settings}}, hospitals)


def ring_encode(delta: np.ndarray, scale: float, m) -> np.ndarray:
    """The fixed-point encoding the protocol promises, computed here from its definition."""
    fixed = np.rint(np.clip(delta.astype(np.float64), -m.clip, m.clip) * scale * 2.0**m.fraction_bits).astype(np.int64)
    return fixed.astype(f"uint{m.ring_bits}")


def ring_decode(total: np.ndarray, m) -> np.ndarray:
    return total.view(f"int{m.ring_bits}").astype(np.float64) / 2.0**m.fraction_bits


def expected_mean(updates, participants, survivors, m) -> np.ndarray:
    """The plaintext sum in the ring of each survivor's clipped, scaled, encoded delta, decoded."""
    total_weight = math.fsum(updates[h].weight for h in participants)
    ring_sum = np.sum([ring_encode(updates[h].delta, updates[h].weight / total_weight, m) for h in survivors], axis=0, dtype=f"uint{m.ring_bits}")
    share = math.fsum(updates[h].weight for h in survivors) / total_weight
    return (ring_decode(ring_sum, m) / share).astype(np.float32)


def clipped(update, clip):
    return dataclasses.replace(update, delta=np.clip(update.delta, -clip, clip))


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("drop", [(), ("h3",), ("h0", "h5", "h7")])
def test_masked_sum_is_the_plaintext_sum_despite_dropouts(ring_bits, drop):
    config = masking(8, dropout_tolerance=3, ring_bits=ring_bits, clip=0.25)
    m = config.privacy.masking
    updates = random_updates(config, 1, SIZE)
    fed = Federation(config)

    [aggregate] = fed.round(1, updates, drop_after_setup=drop)

    survivors = [h for h in sorted(updates) if h not in drop]
    assert np.array_equal(aggregate.delta, expected_mean(updates, sorted(updates), survivors, m))
    # Each survivor's encoding rounds by at most half a unit, and the sum is divided by their share.
    share = sum(updates[h].weight for h in survivors) / sum(u.weight for u in updates.values())
    reference = weighted_mean([clipped(updates[h], m.clip) for h in survivors])
    assert np.abs(aggregate.delta - reference).max() <= len(survivors) / share * 2.0**-m.fraction_bits
    assert (aggregate.hospital, aggregate.round, aggregate.metrics) == (AGGREGATE, 1, {})
    assert aggregate.weight == sum(updates[h].weight for h in survivors)
    assert aggregate.num_examples == sum(updates[h].num_examples for h in survivors)
    sent = {s.hospital: s for _, s in fed.received if getattr(s, "form", None) == "masked"}
    assert sorted(sent) == survivors
    for h, sealed in sent.items():
        # Counts and training metrics travel as they are, and nothing about the update itself.
        assert sealed.metrics == updates[h].metrics


def test_hospitals_silent_during_setup_sit_the_round_out():
    config = masking(8, dropout_tolerance=3)
    m = config.privacy.masking
    updates = random_updates(config, 1, SIZE)
    fed = Federation(config)
    fed.silent = {"h2", "h6"}

    [aggregate] = fed.round(1, updates, drop_after_setup=("h4",))

    participants = [h for h in sorted(updates) if h not in ("h2", "h6")]
    survivors = [h for h in participants if h != "h4"]
    assert np.array_equal(aggregate.delta, expected_mean(updates, participants, survivors, m))
    assert fed.driver.describe()["last_threshold"] == 5


def test_more_dropouts_than_tolerated_fail_the_round():
    config = masking(8, dropout_tolerance=3)
    fed = Federation(config)
    with pytest.raises(AggregationError, match="4 masked updates arrived, unmasking needs 5"):
        fed.round(1, random_updates(config, 1, SIZE), drop_after_setup=("h0", "h1", "h2", "h3"))

    fed = Federation(config)
    fed.silent = {"h0", "h1", "h2", "h3"}
    with pytest.raises(AggregationError, match="4 hospitals advertised keys, masking needs 5"):
        fed.round(1, random_updates(config, 1, SIZE))


def test_threshold_must_be_a_majority_of_at_least_two():
    config = masking(8, dropout_tolerance=3)
    planned = dict(list(random_updates(config, 1, SIZE).items())[:5])  # fewer planned than configured
    with pytest.raises(AggregationError, match="leaves a threshold of 2; it must be at least 2 and more than half"):
        Federation(config).round(1, planned)


class AltersShares(MaskingHook):
    """A hospital whose unmasking answers carry one altered share of the given secret."""

    def __init__(self, *args, secret: str):
        super().__init__(*args)
        self.secret = secret

    def respond(self, round, request):
        answer = super().respond(round, request)
        if isinstance(answer, UnmaskShares):
            shares = dict(getattr(answer, self.secret))
            owner = min(shares)
            shares[owner] = bytes([shares[owner][0] ^ 1]) + shares[owner][1:]
            answer = dataclasses.replace(answer, **{self.secret: shares})
        return answer


@pytest.mark.parametrize("secret, drop, what", [("seeds", (), "self-mask seed"), ("mask_keys", ("h4",), "mask key")])
def test_an_altered_share_fails_the_round(secret, drop, what):
    config = masking(8, dropout_tolerance=3)
    fed = Federation(config)
    fed.hospitals["h2"] = AltersShares(config, "h2", fed.driver.run_id, secret=secret)
    with pytest.raises(AggregationError, match=f"'s {what} rebuilt from shares does not match"):
        fed.round(1, random_updates(config, 1, SIZE), drop_after_setup=drop)


class MuteAtUnmasking(MaskingHook):
    def respond(self, round, request):
        return None if isinstance(request, Unmask) else super().respond(round, request)


def test_too_few_shares_fail_the_round_naming_the_hospital():
    config = masking(8, dropout_tolerance=3)
    fed = Federation(config)
    fed.hospitals["h1"] = MuteAtUnmasking(config, "h1", fed.driver.run_id)
    with pytest.raises(AggregationError, match="4 of the 5 shares needed to recover h0's self-mask seed"):
        fed.round(1, random_updates(config, 1, SIZE), drop_after_setup=("h5", "h6", "h7"))


@pytest.mark.parametrize("swap", ["altered", "addressed to another hospital"])
def test_shares_altered_in_transit_are_refused(swap):
    config = masking(5, dropout_tolerance=2)
    updates = random_updates(config, 1, SIZE)
    fed = Federation(config)
    fed.current_round = 1
    setups = fed.driver.setup(1, {h: u.weight for h, u in updates.items()}, fed.ask)
    sealed = setups["h1"].shares["h0"]
    forged = bytes([sealed[0], sealed[1] ^ 1]) + sealed[2:] if swap == "altered" else setups["h2"].shares["h0"]
    tampered = dataclasses.replace(setups["h1"], shares={**setups["h1"].shares, "h0": forged})
    with pytest.raises(AggregationError, match="shares from h0 for h1: failed authentication"):
        fed.hospitals["h1"].encode(updates["h1"], tampered, "start")


def test_a_hospital_masks_one_update_per_round():
    config = masking(3, dropout_tolerance=1)
    updates = random_updates(config, 1, SIZE)
    fed = Federation(config)
    fed.current_round = 1
    setups = fed.driver.setup(1, {h: u.weight for h, u in updates.items()}, fed.ask)
    fed.hospitals["h0"].encode(updates["h0"], setups["h0"], "start")
    with pytest.raises(AggregationError, match="round 1, h0: already sent a masked update this round"):
        fed.hospitals["h0"].encode(updates["h0"], setups["h0"], "start")


def test_a_hospital_never_reveals_both_secrets_of_one_hospital():
    config = masking(5, dropout_tolerance=2)
    fed = Federation(config)
    fed.round(1, random_updates(config, 1, SIZE), drop_after_setup=("h4",))
    survivors = ("h0", "h1", "h2", "h3")
    h0 = fed.hospitals["h0"]

    again = h0.respond(1, Unmask(survivors, ("h4",)))  # a retried request gets the same shares
    assert sorted(again.seeds) == list(survivors) and sorted(again.mask_keys) == ["h4"]
    refused = {
        "would reveal both the seed and the mask key of ['h3']": Unmask(survivors, ("h3", "h4")),
        "would reveal both the seed and the mask key of ['h2']": Unmask(("h0", "h1", "h3"), ("h2",)),
        "names ['h9'], who are not participants": Unmask(survivors + ("h9",), ("h4",)),
        "names 2 survivors, fewer than the threshold 3": Unmask(("h0", "h1"), ("h4",)),
    }
    for reason, request in refused.items():
        with pytest.raises(AggregationError, match=re.escape(f"h0: refuses the unmask request: it {reason}")):
            h0.respond(1, request)


def test_masks_are_fresh_every_round():
    config = masking(5, dropout_tolerance=2)
    m = config.privacy.masking
    fed = Federation(config)
    first = random_updates(config, 1, SIZE)
    second = {h: dataclasses.replace(u, round=2) for h, u in first.items()}

    fed.round(1, first)
    [aggregate] = fed.round(2, second)

    assert np.array_equal(aggregate.delta, expected_mean(second, sorted(second), sorted(second), m))
    masked = [s.payload for h, s in fed.received if h == "h0" and getattr(s, "form", None) == "masked"]
    assert len(masked) == 2
    assert np.mean(masked[0] == masked[1]) < 1e-3
    assert abs(np.corrcoef(masked[0].view(np.int32), masked[1].view(np.int32))[0, 1]) < 6 / math.sqrt(SIZE)
    with pytest.raises(AggregationError, match="round 1, h0: sent no masked update this round"):
        fed.hospitals["h0"].respond(1, Unmask(("h0", "h1", "h2"), ()))  # round 1's secrets are gone


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_a_masked_update_looks_uniform(ring_bits):
    size = 200_000
    config = masking(3, dropout_tolerance=1, ring_bits=ring_bits)
    updates = random_updates(config, 1, size)
    fed = Federation(config)
    fed.round(1, updates)
    [masked] = [s.payload for h, s in fed.received if h == "h0" and getattr(s, "form", None) == "masked"]
    total = sum(u.weight for u in updates.values())
    unmasked = ring_encode(updates["h0"].delta, updates["h0"].weight / total, config.privacy.masking)

    def p_values(ring: np.ndarray) -> tuple[float, float]:
        top_byte = np.bincount((ring >> np.uint64(ring_bits - 8)).astype(np.int64), minlength=256)
        return stats.chisquare(top_byte).pvalue, stats.kstest(ring / 2.0**ring_bits, "uniform").pvalue

    assert min(p_values(masked)) > 1e-6
    assert max(p_values(unmasked)) < 1e-12  # the same tests do tell an unmasked update apart


def numeric_leaves(message):
    """Every byte string and numeric vector in a message, as raw bytes and as float values."""
    for leaf in leaves(message):
        if len(leaf) == 0:  # an unsigned confirmation: nothing at all
            continue
        if isinstance(leaf, bytes):
            yield leaf, np.frombuffer(leaf, np.uint8).astype(np.float64)
        else:
            signed = leaf.view(f"i{leaf.itemsize}") if leaf.dtype.kind == "u" else leaf
            yield leaf.tobytes(), signed.astype(np.float64)


def test_nothing_the_driver_receives_correlates_with_an_update():
    config = masking(4, dropout_tolerance=1)
    m = config.privacy.masking
    updates = random_updates(config, 1, SIZE)
    fed = Federation(config)
    fed.round(1, updates, drop_after_setup=("h3",))

    leaves = [leaf for _, message in fed.received for leaf in numeric_leaves(message)]
    assert sum(len(values) == SIZE for _, values in leaves) == 3  # the masked updates are among them
    assert len(leaves) > 40  # keys, commitments, sealed shares, unmasking shares
    received = b"".join(raw for raw, _ in leaves)
    total = sum(u.weight for u in updates.values())
    # Uncorrelated: |r| * sqrt(n) stays below z. At 4 (sigma) one of these ~170 comparisons would
    # exceed it by chance in about one run in 300; z is chosen so that happens once in a million.
    z = stats.norm.isf(0.5e-6 / (len(leaves) * len(updates)))
    for h, update in updates.items():
        delta = update.delta.astype(np.float64)
        for _, values in leaves:
            n = min(len(values), len(delta))
            assert abs(np.corrcoef(values[:n], delta[:n])[0, 1]) <= z / math.sqrt(n)
        encoded = ring_encode(update.delta, update.weight / total, m)
        for start in range(0, SIZE - 8, 997):
            assert update.delta[start : start + 8].tobytes() not in received
            assert encoded[start : start + 8].tobytes() not in received
        # The test has power: an update sent as its fixed-point encoding would fail it.
        assert np.corrcoef(encoded.view(np.int32).astype(np.float64), delta)[0, 1] > 0.99


def test_combine_refuses_mismatched_updates():
    config = masking(3, dropout_tolerance=1)
    updates = random_updates(config, 1, SIZE)
    fed = Federation(config)
    fed.round(1, updates)
    sent = [s for _, s in fed.received if getattr(s, "form", None) == "masked"]
    short = dataclasses.replace(sent[1], payload=sent[1].payload[:-1])
    with pytest.raises(AggregationError, match=f"round 1, {short.hospital}: expected {SIZE} 32-bit ring elements"):
        fed.driver.combine(1, [sent[0], short])
    with pytest.raises(AggregationError, match="sent a second update"):
        fed.driver.combine(1, [sent[0], sent[0]])


def test_a_retried_round_is_never_unmasked_over_other_survivors():
    config = masking(4, dropout_tolerance=1)
    fed = Federation(config)
    updates = random_updates(config, 1, 500)
    fed.round(1, updates)  # everyone's sum unmasked
    fed.silent.clear()
    fed.round(1, updates)  # the same round again over the same hospitals: the same sum, allowed
    with pytest.raises(AggregationError, match="already unmasked a sum of .* from the same starting weights"):
        fed.round(1, updates, drop_after_setup=["h3"])  # its difference with the first would be h3's update


def test_a_ring_that_dp_noise_could_wrap_is_refused_and_the_wrong_sums_it_prevents_are_real():
    from fedward.errors import ConfigError
    from fedward.privacy import dp_fedavg
    from fedward.privacy.masking import check_ring

    def private(ring_bits: int):
        return config_with({"masking": {"enabled": True, "fraction_bits": 24, "clip": 1.0, "ring_bits": ring_bits},
                            "dp_fedavg": {"enabled": True, "noise_multiplier": 120.0}}, 3)

    narrow, wide = private(32), private(64)
    # Each hospital's change with its unclipped noise share on top, as it leaves under DP-FedAvg.
    updates = {h: dp_fedavg.add_noise_share(dataclasses.replace(u, weight=1.0), narrow, shares=1) for h, u in random_updates(narrow, 1, SIZE).items()}
    plain = np.mean([u.delta.astype(np.float64) for u in updates.values()], axis=0)
    [wrapped] = Federation(narrow).round(1, updates)
    off = np.abs(wrapped.delta - plain)
    assert (off > 100).sum() > 100  # those coordinates left the ring and came back a ring's span (256) away, with no error
    with pytest.raises(ConfigError, match=r"privacy.masking: a sum of 20000 coordinates .* could leave the 32-bit ring with fraction_bits=24 .* use ring_bits: 64"):
        check_ring(narrow, SIZE)
    check_ring(wide, SIZE)
    [exact] = Federation(wide).round(1, updates)
    assert np.abs(exact.delta - plain).max() < 1e-3  # float32 and fixed-point rounding only
    check_ring(masking(3), 10**8)  # without noise the clip bounds every sum: the default ring holds any model
    check_ring(config_with({"masking": {"enabled": True}, "dp_fedavg": {"enabled": True, "noise_multiplier": 1.0}}, 3), 10**8)
