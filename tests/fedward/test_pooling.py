"""Pooled figures from padded statistics: the driver's sum opens only at a hospital holding the
evaluation key, into exactly the pooled statistics, and never for one hospital alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from fedward.actors.hospital import Hospital
from fedward.config import parse_config
from fedward.errors import AggregationError
from fedward import pooling
from fedward.keys import agree, derive_key, keystream, new_private_key, open_sealed, public_bytes
from fedward.pooling import EvaluationKey
from tests.conftest import ehr_config
from tests.consortium import consortium


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
    other = _keys(tmp_path / "other")  # another run's key opens nothing of this one
    with pytest.raises(AggregationError, match=r"b: the sum of \['a', 'b'\] was padded under another evaluation key than its own"):
        other["b"].open(summed)


def test_a_hospital_a_new_set_up_leaves_out_pads_nothing_and_the_driver_is_told_why(tmp_path):
    """A new driver session deals again; hospital c's acceptance is lost. Its old key is gone, so
    it pads nothing, rather than pads no other hospital can remove, and the set-up names it."""
    keys = _keys(tmp_path)
    rng = np.random.default_rng(4)
    before = keys["c"].pad(_statistics(rng))
    honest = pooling.in_process(list(keys.values()))

    def losing_c(method, arguments):
        lost = method == "evaluation_accept" and "c" in arguments
        answers, failed = honest(method, {h: a for h, a in arguments.items() if not (lost and h == "c")})
        return answers, {**failed, **({"c": "HospitalError: c did not answer"} if lost else {})}

    assert pooling.deal(sorted(keys), losing_c) == {"c": "HospitalError: c did not answer"}
    assert keys["a"].ready and keys["b"].ready and not keys["c"].ready
    with pytest.raises(AggregationError, match=r"hospitals padded statistics under different evaluation keys") as mixed:
        pooling.add([keys["a"].pad(_statistics(rng)), before])
    assert "['a']" in str(mixed.value) and "['c']" in str(mixed.value)  # each key's hospitals named


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


def _driver_reads(sealed: bytes, own_private, hospital: str, peer: str, peer_public: bytes) -> bytes:
    """What a driver holding the private key behind a swapped public key opens of a sealed key."""
    pair = agree(own_private, peer_public, purpose=pooling.PURPOSE, run_id="run-1", round=0, pair=(peer, hospital))
    return open_sealed(pair, sealed, hospital.encode(), "the driver's copy")


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "check switched off"])
def test_in_cross_site_mode_a_driver_that_swaps_a_key_offer_for_its_own_gets_no_evaluation_key(tmp_path, monkeypatch, checked):
    """A lying driver puts its own public key in hospital b's signed offer, or deals b a key of its
    own as if from a: with each hospital checking its peers' signed offers it gets nothing it can
    open; with the check switched off it reads the key and removes b's pads."""
    names = ("a", "b", "c")
    _, identities = consortium(tmp_path / "pki", [*names, "stranger"])
    keys = {h: EvaluationKey(h, "run-1", tmp_path / h, identities[h], frozenset(names)) for h in names}
    if not checked:
        monkeypatch.setattr(EvaluationKey, "_check_offer", lambda *_: None)
    offers = {h: keys[h].public() for h in names}
    ours = new_private_key()
    swapped = {**offers, "b": dataclasses.replace(offers["b"], public=public_bytes(ours))}  # b's certificate and signature kept
    if checked:
        with pytest.raises(AggregationError, match=r"a: refuses to seal the evaluation key to 'b': its key offer is refused: b's signature does not match"):
            keys["a"].deal(swapped)
        impostor = dataclasses.replace(offers["a"], public=public_bytes(ours))
        with pytest.raises(AggregationError, match=r"b: refuses to take the evaluation key from 'a': its key offer is refused"):
            keys["b"].accept(impostor, b"")
        stranger = EvaluationKey("stranger", "run-1", tmp_path / "stranger", identities["stranger"], frozenset([*names, "stranger"]))
        with pytest.raises(AggregationError, match=r"a: refuses to seal the evaluation key to 'stranger': not in its policy's roster \['a', 'b', 'c'\]"):
            keys["a"].deal({**offers, "stranger": stranger.public()})
        assert not any(k.ready for k in keys.values())  # nothing was dealt
        pooling.deal(sorted(keys), pooling.in_process(list(keys.values())))  # the honest set-up still works
        assert len({(tmp_path / h / pooling.KEY_FILE).read_bytes() for h in names}) == 1
        return
    sealed = keys["a"].deal(swapped)
    key = _driver_reads(sealed["b"], ours, "b", "a", offers["a"].public)
    statistics = {"positive_hist": np.arange(5.0)}
    padded = keys["a"].pad(statistics)  # any hospital's: the driver now holds every pad
    pad = keystream(derive_key(key, purpose="evaluation pad", run_id="run-1", round=0, parties=("a", padded.nonce.hex())), 8 * 5)
    assert np.array_equal((padded.values - np.frombuffer(pad, np.uint64)).view(np.int64) / 2.0**pooling.FRACTION_BITS, statistics["positive_hist"])


def test_a_hospital_in_cross_site_mode_signs_its_offer_and_checks_those_it_is_sent(demo_data, tmp_path):
    """The same checks, reached as a driver reaches a hospital: through its own policy and identity."""
    names = ["hospital_a", "hospital_b"]
    _, identities = consortium(tmp_path / "pki", names)
    config = parse_config(ehr_config(demo_data, tmp_path, name="offers"))
    for h in names:
        site = tmp_path / "sites" / h
        site.mkdir(parents=True, exist_ok=True)
        (site / "policy.yaml").write_text(yaml.safe_dump({"consortium": {"identity": str(identities[h].folder), "roster": names,
                                                                         "fewest_hospitals": 2, "updates": "plain"}}))
    a, b = (Hospital(h, config, "offers") for h in names)
    a.load(), b.load()
    offers = {"hospital_a": a.evaluation_public_key(), "hospital_b": b.evaluation_public_key()}
    assert all(o.signature and o.certificate for o in offers.values())
    swapped = {**offers, "hospital_b": dataclasses.replace(offers["hospital_b"], public=public_bytes(new_private_key()))}
    with pytest.raises(AggregationError, match=r"hospital_a: refuses to seal the evaluation key to 'hospital_b': its key offer is refused"):
        a.evaluation_deal(swapped)
    b.evaluation_accept(offers["hospital_a"], a.evaluation_deal(offers)["hospital_b"])
    assert (a.run_dir / pooling.KEY_FILE).read_bytes() == (b.run_dir / pooling.KEY_FILE).read_bytes()
