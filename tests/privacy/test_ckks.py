"""The CKKS hook: aggregates right, and the driver never holds or receives anything that reads an update."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tenseal as ts

from fedward.errors import AggregationError, ConfigError
from fedward.privacy.ckks import Dealt, Decrypt, EncryptedPayload, KeyOffer
from fedward.privacy.hooks import AGGREGATE
from fedward.keys import agree, derive_key, new_private_key, open_sealed
from tests.privacy.federation import Federation, config_with, leaves, random_updates, weighted_mean

SIZE = 10_000  # three ciphertexts of 4096 slots at degree 8192


def federation(hospitals: int = 3, min_hospitals: int = 2, **encryption) -> Federation:
    return Federation(config_with({"encryption": {"enabled": True, **encryption}}, hospitals, min_hospitals))


def test_aggregate_matches_weighted_mean_across_several_ciphertexts():
    fed = federation()
    fed.start()
    updates = random_updates(fed.config, 1, SIZE)

    [aggregate] = fed.round(1, updates)

    assert aggregate.hospital == AGGREGATE
    np.testing.assert_allclose(aggregate.delta, weighted_mean(list(updates.values())), atol=1e-4)
    assert aggregate.delta.dtype == np.float32
    assert aggregate.weight == sum(u.weight for u in updates.values())
    assert aggregate.num_examples == sum(u.num_examples for u in updates.values())
    sent = [m for _, m in fed.received if isinstance(getattr(m, "payload", None), EncryptedPayload)]
    assert [len(m.payload.ciphertexts) for m in sent] == [3, 3, 3]
    described = fed.driver.describe()
    assert described["ciphertexts_per_update"] == 3 and described["key_holders"] == ["h0", "h1", "h2"]
    assert described["decrypting_hospital"] == "h1"  # round 1 rotates to the second key holder


def test_hospital_dropping_after_setup_leaves_the_others_mean():
    fed = federation()
    fed.start()
    updates = random_updates(fed.config, 2, SIZE, seed=1)

    [aggregate] = fed.round(2, updates, drop_after_setup=["h1"])

    survivors = [u for h, u in updates.items() if h != "h1"]
    np.testing.assert_allclose(aggregate.delta, weighted_mean(survivors), atol=1e-4)
    assert aggregate.weight == sum(u.weight for u in survivors)


def test_silent_decrypter_falls_back_to_next_key_holder():
    fed = federation(hospitals=4)
    fed.start()
    updates = random_updates(fed.config, 3, 100)
    fed.silent.add("h3")  # holds the key, not asked to train, would decrypt round 3 first
    del updates["h3"]

    [aggregate] = fed.round(3, updates)

    np.testing.assert_allclose(aggregate.delta, weighted_mean(list(updates.values())), atol=1e-4)
    assert fed.driver.describe()["decrypting_hospital"] == "h0"


def test_no_decrypting_hospital_fails_the_round():
    fed = federation()
    fed.start()
    updates = random_updates(fed.config, 1, 100)
    setups = fed.driver.setup(1, {h: u.weight for h, u in updates.items()}, fed.ask)
    combined = fed.driver.combine(1, [fed.hospitals[h].encode(updates[h], s, "start") for h, s in setups.items()])
    fed.silent |= set(fed.hospitals)

    with pytest.raises(AggregationError, match="round 1: no key holder decrypted"):
        fed.driver.finish(1, combined, {}, fed.ask)


def test_hospitals_failing_setup_are_left_out():
    fed = federation(hospitals=3)
    fed.silent.add("h0")  # the would-be dealer
    fed.start()

    described = fed.driver.describe()
    assert described["dealer"] == "h1" and described["key_holders"] == ["h1", "h2"]
    updates = random_updates(fed.config, 1, 100)
    assert set(fed.driver.setup(1, {h: u.weight for h, u in updates.items()}, fed.ask)) == {"h1", "h2"}

    lonely = federation(hospitals=3)
    lonely.silent |= {"h0", "h1"}
    with pytest.raises(AggregationError, match=r"only \['h2'\] hold the key, run.min_hospitals is 2"):
        lonely.start()


def test_driver_never_holds_the_secret_key():
    fed = federation()
    fed.start()
    fed.round(1, random_updates(fed.config, 1, SIZE))

    assert not fed.driver._context.is_private()
    offers = {h: m for h, m in fed.received if isinstance(m, bytes) and len(m) == 32}
    [(dealer, dealt)] = [(h, m) for h, m in fed.received if isinstance(m, Dealt)]
    ciphertext = next(m.payload.ciphertexts[0] for _, m in fed.received if isinstance(getattr(m, "payload", None), EncryptedPayload))
    contexts = 0
    for blob in (b for _, m in fed.received for b in leaves(m) if isinstance(b, bytes)):
        try:
            context = ts.context_from(blob)
        except ValueError:  # not a context at all: sealed keys and ciphertexts
            continue
        contexts += 1
        assert not context.is_private()
        with pytest.raises(ValueError, match="secret_key"):
            ts.ckks_vector_from(context, ciphertext).decrypt()
    assert contexts == 1  # the dealer's public parameters, and nothing else that reads as a context
    # The driver knows every public key and can make its own; no key it derives opens a sealed part.
    own = new_private_key()
    for peer, sealed in dealt.sealed.items():
        guesses = [agree(own, offers[p], purpose="ckks-key", run_id="test-run", round=0, pair=(dealer, peer)) for p in (dealer, peer)]
        guesses.append(derive_key(offers[dealer] + offers[peer], purpose="ckks-key", run_id="test-run", round=0, parties=(dealer, peer)))
        for key in guesses:
            with pytest.raises(AggregationError, match="failed authentication"):
                open_sealed(key, sealed, f"test-run|{dealer}->{peer}".encode(), "guess")


def test_nothing_the_driver_receives_correlates_with_an_update():
    fed = federation()
    fed.start()
    updates = random_updates(fed.config, 1, SIZE, seed=2)
    fed.round(1, updates)

    checked = 0
    for _, message in fed.received:
        if isinstance(message, np.ndarray) and message.dtype == np.float64 and message.size == SIZE:
            continue  # the decrypted sum: the aggregate the driver is meant to learn, checked below
        for leaf in leaves(message):
            values = np.frombuffer(leaf, np.uint8) if isinstance(leaf, bytes) else leaf.ravel()
            for update in updates.values():
                n = min(values.size, SIZE)
                if n < 3:
                    continue
                correlation = np.corrcoef(values[:n].astype(float), update.delta[:n].astype(float))[0, 1]
                # Hundreds of checks on structured serializations (headers, padding): 6 standard
                # errors keeps chance out (a 4.4 was seen once), while an update that leaked in any
                # recoverable form would correlate near 1.
                assert abs(correlation) < 6 / np.sqrt(n)
                checked += 1
    assert checked > 30, checked  # offers, contexts, sealed keys and ciphertexts were all looked at
    [release] = [m for _, m in fed.received if isinstance(m, np.ndarray) and m.size == SIZE]
    np.testing.assert_allclose(release, weighted_mean(list(updates.values())), atol=1e-5)


def test_named_layers_are_encrypted_the_rest_travel_in_the_clear():
    fed = federation(layers=["head.weight"])
    fed.start()
    updates = random_updates(fed.config, 1, SIZE, seed=3)

    [aggregate] = fed.round(1, updates)

    np.testing.assert_allclose(aggregate.delta, weighted_mean(list(updates.values())), atol=1e-4)
    sent = {h: m for h, m in fed.received if isinstance(getattr(m, "payload", None), EncryptedPayload)}
    body = updates["h0"].layout.slices()["body.weight"]
    scale = updates["h0"].weight / sum(u.weight for u in updates.values())
    np.testing.assert_allclose(sent["h0"].payload.clear, updates["h0"].delta[body] * scale, rtol=1e-6)
    assert len(sent["h0"].payload.ciphertexts) == 1  # the 2,500 head values fit one ciphertext
    described = fed.driver.describe()
    assert described["encrypted_layers"] == ["head.weight"] and described["clear_layers"] == ["body.weight"]


def test_unknown_layer_is_a_config_error_naming_it():
    fed = federation(layers=["head.weight", "tail.bias"])
    fed.start()

    with pytest.raises(ConfigError, match="tail.bias"):
        fed.round(1, random_updates(fed.config, 1, 100))


def test_released_values_are_rounded():
    fed = federation(release_decimals=3)
    fed.start()
    updates = random_updates(fed.config, 1, 1000, seed=4)

    [aggregate] = fed.round(1, updates)

    [release] = [m for _, m in fed.received if isinstance(m, np.ndarray) and m.dtype == np.float64]
    np.testing.assert_array_equal(release, np.round(release, 3))
    assert np.abs(release * 1e3 - np.rint(release * 1e3)).max() < 1e-9
    np.testing.assert_allclose(aggregate.delta, weighted_mean(list(updates.values())), atol=1e-3)


def test_hospital_without_key_refuses_to_decrypt():
    fed = federation()
    fed.start()
    outsider = federation().hospitals["h0"]  # same names, never given this run's key
    updates = random_updates(fed.config, 1, 100)
    setups = fed.driver.setup(1, {h: u.weight for h, u in updates.items()}, fed.ask)
    ciphertext = fed.hospitals["h0"].encode(updates["h0"], setups["h0"], "start").payload.ciphertexts

    with pytest.raises(AggregationError, match="h0: holds no CKKS secret key"):
        outsider.respond(1, Decrypt(ciphertext))
    outsider.respond(0, KeyOffer())  # an agreement key alone is not a CKKS key
    with pytest.raises(AggregationError, match="refuses to decrypt"):
        outsider.respond(1, Decrypt(ciphertext))


def test_driver_refuses_updates_it_cannot_add():
    fed = federation()
    fed.start()
    updates = random_updates(fed.config, 1, 100)
    setups = fed.driver.setup(1, {h: u.weight for h, u in updates.items() if h != "h2"}, fed.ask)
    encoded = {h: fed.hospitals[h].encode(updates[h], s, "start") for h, s in setups.items()}

    with pytest.raises(AggregationError, match="round 1, h0: expected an encrypted update, got form 'plain'"):
        fed.driver.combine(1, [updates["h0"]])
    with pytest.raises(AggregationError, match="round 1, h0: sent a second update"):
        fed.driver.combine(1, [encoded["h0"], encoded["h0"]])
    outsider = fed.hospitals["h2"].encode(updates["h2"], 0.5, "start")
    with pytest.raises(AggregationError, match="round 1, h2: sent an update without this round's set-up"):
        fed.driver.combine(1, [encoded["h0"], outsider])
    truncated = dataclasses.replace(encoded["h1"], payload=EncryptedPayload((), encoded["h1"].payload.clear))
    with pytest.raises(AggregationError, match="round 1, h1: expected 1 ciphertexts and 0 clear values, got 0"):
        fed.driver.combine(1, [encoded["h0"], truncated])
