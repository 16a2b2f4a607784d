"""A driver that lies, at the protocol boundary.

Each attack of the outside review runs to completion against honest hospitals in cross-site mode
(certified identities, their own rosters and policies). With their checks an honest hospital
refuses it, naming the inconsistency, and the attacker's estimate of the target's update is no
closer to it than the round's legitimate output. With the one check that stops it switched off
(monkeypatched to take the driver's word), the same attack recovers the update within 1e-6: each
test can fail.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import tenseal as ts

from fedward.certificates import Identity
from fedward.errors import AggregationError
from fedward.keys import agree, new_private_key, open_sealed, private_key_from, public_bytes, seal
from fedward.privacy import ckks, masking
from fedward.privacy.hooks import Trust, build_hook
from fedward.privacy.masking import Advertise, Advertisement, ConfirmSurvivors, MaskingSetup, ShareSecrets, Unmask
from tests.consortium import consortium
from tests.privacy.federation import config_with, random_updates, weighted_mean

RUN = "lying-driver"
TARGET = "h0"
EXACT = 1e-6
SIZE = 2_000


class Honest:
    """The honest hospitals' halves, reached as a driver reaches them. A refusal is kept and the
    attack goes on without that answer, as a driver goes on without a hospital that fails."""

    def __init__(self, config, trust: dict[str, Trust]):
        self.config, self.trust = config, trust
        self.hooks = {h: build_hook(config, h, RUN, t) for h, t in trust.items()}
        self.refusals: list[str] = []

    def restart(self, name: str) -> None:
        """The hospital's process restarts: only what it keeps on disk survives."""
        self.hooks[name] = build_hook(self.config, name, RUN, self.trust[name])

    def ask(self, round: int):
        def ask(requests):
            answers = {}
            for h, request in requests.items():
                try:
                    answers[h] = self.hooks[h].respond(round, request)
                except AggregationError as e:
                    self.refusals.append(str(e))
            return answers

        return ask

    def encode(self, name, update, setup, start="weights-0"):
        try:
            return self.hooks[name].encode(update, setup, start)
        except AggregationError as e:
            self.refusals.append(str(e))
            return None

    def refused(self, pattern: str) -> bool:
        return any(re.search(pattern, r) for r in self.refusals)


def federation(tmp_path, privacy: dict, hospitals: int, colluders: int = 0, fewest: int = 2, min_hospitals: int = 2):
    config = config_with(privacy, hospitals, min_hospitals)
    names = [h.name for h in config.hospitals]
    updates = random_updates(config, 1, SIZE)
    _, identities = consortium(tmp_path, names)
    trust = {
        h: Trust(weight=updates[h].weight, colluders=colluders, fewest=fewest, roster=frozenset(names), identity=identities[h],
                 record=tmp_path / h / "masking_unmasked.jsonl")
        for h in names
    }
    return config, updates, identities, Honest(config, trust)


def masked_with(hospitals: int, tolerance: int) -> dict:
    return {"masking": {"enabled": True, "ring_bits": 64, "fraction_bits": 24, "clip": 1.0, "dropout_tolerance": tolerance}}


def judge(estimate, updates, honest: Honest, refusal: str) -> None:
    """With its checks on: an honest hospital refused, naming why, and the attack learned no more
    of the target's update than the legitimate output says."""
    assert honest.refused(refusal), honest.refusals
    target = updates[TARGET].delta.astype(np.float64)
    legitimate = weighted_mean(list(updates.values()))
    assert estimate is None or np.linalg.norm(estimate - target) >= np.linalg.norm(legitimate - target)


def recovered(estimate, updates) -> None:
    """With the check switched off, the same attack reads the target's update."""
    assert estimate is not None
    assert np.abs(estimate - updates[TARGET].delta.astype(np.float64)).max() <= EXACT


# -- the driver's own arithmetic: what it does with what it learned -----------------------------


def decode(total: np.ndarray, config) -> np.ndarray:
    return total.view(np.int64).astype(np.float64) / 2.0 ** config.privacy.masking.fraction_bits


def unmask_target(config, masked: np.ndarray, secret: bytes, mask_keys: dict[str, bytes], round: int) -> np.ndarray:
    """The target's scaled change from its masked update, its self-mask seed and its mask key."""
    tool = masking.MaskingHook(config, None, RUN)
    total = masked.copy()
    total -= tool._prg(masking._seed_key(secret[: masking.SECRET_BYTES], RUN, round, TARGET), total.size)
    key = private_key_from(secret[masking.SECRET_BYTES :])
    for v, public in mask_keys.items():
        if v != TARGET:
            pad = tool._prg(tool._pair_key(key, public, round, (TARGET, v)), total.size)
            total = total - pad if TARGET < v else total + pad
    return decode(total, config)


def scale_of(weights: dict[str, float], participants) -> float:
    return weights[TARGET] / math.fsum(weights[v] for v in sorted(participants))


# -- the attacks -----------------------------------------------------------------------------------


def scale_attack(config, updates, honest: Honest, identities: dict[str, Identity]):
    """Scale 1 to the target and 0 to every other hospital: the 'sum' is the target's change."""
    driver, ask = build_hook(config, None, RUN), honest.ask(1)
    setups = driver.setup(1, {h: u.weight for h, u in updates.items()}, ask)
    lied = {h: dataclasses.replace(s, scale=1.0 if h == TARGET else 0.0) for h, s in setups.items()}
    sent = [m for h in sorted(lied) if (m := honest.encode(h, updates[h], lied[h])) is not None]
    if not sent:
        return None
    [aggregate] = driver.finish(1, driver.combine(1, sent), {}, ask)
    return aggregate.delta.astype(np.float64)


def invented_peers_attack(config, updates, honest: Honest, identities: dict[str, Identity]):
    """The target is told its peers are three hospitals whose keys the driver made: the shares it
    seals for them are the driver's to open, and with them its seed and mask key."""
    ask = honest.ask(1)
    target = ask({TARGET: Advertise()}).get(TARGET)
    intruders = {f"intruder{i}": (new_private_key(), new_private_key()) for i in (1, 2, 3)}
    peers = {TARGET: target} | {
        name: Advertisement(public_bytes(cipher), public_bytes(mask), bytes(32), 1e-9) for name, (cipher, mask) in intruders.items()
    }
    sealed = ask({TARGET: ShareSecrets(3, peers)}).get(TARGET)
    if sealed is None:
        return None
    hook = honest.hooks[TARGET]
    index = {name: i + 1 for i, name in enumerate(sorted(peers))}
    shares = {
        index[name]: open_sealed(agree(cipher, target.cipher_key, purpose="masking-shares", run_id=RUN, round=1, pair=(TARGET, name)),
                                 sealed[name], hook._share_context(1, TARGET, name), "intruder's share")
        for name, (cipher, _) in intruders.items()
    }
    secret = masking._combine(shares)
    forged = {
        name: seal(agree(cipher, target.cipher_key, purpose="masking-shares", run_id=RUN, round=1, pair=(TARGET, name)),
                   bytes(2 * masking.SECRET_BYTES), hook._share_context(1, name, TARGET))
        for name, (cipher, _) in intruders.items()
    }
    scale = scale_of({h: a.weight for h, a in peers.items()}, peers)
    setup = MaskingSetup(1, scale, {h: a.mask_key for h, a in peers.items()}, {TARGET: sealed[TARGET], **forged})
    masked = honest.encode(TARGET, updates[TARGET], setup)
    return unmask_target(config, masked.payload, secret, setup.mask_keys, 1) / scale


def swapped_keys_attack(config, updates, honest: Honest, identities: dict[str, Identity]):
    """The target is sent the other hospitals' advertisements with the driver's keys in place of
    theirs (their signatures copied): it seals their shares for the driver."""
    ask = honest.ask(1)
    adverts = ask({h: Advertise() for h in updates})
    ours = {h: new_private_key() for h in adverts if h != TARGET}
    peers = {h: a if h == TARGET else dataclasses.replace(a, cipher_key=public_bytes(ours[h])) for h, a in adverts.items()}
    sealed = ask({TARGET: ShareSecrets(2, peers)}).get(TARGET)
    if sealed is None:
        return None
    hook = honest.hooks[TARGET]
    index = {name: i + 1 for i, name in enumerate(sorted(peers))}
    pair = {h: agree(key, adverts[TARGET].cipher_key, purpose="masking-shares", run_id=RUN, round=1, pair=(TARGET, h)) for h, key in ours.items()}
    secret = masking._combine({index[h]: open_sealed(pair[h], sealed[h], hook._share_context(1, TARGET, h), "share") for h in ours})
    forged = {h: seal(pair[h], bytes(2 * masking.SECRET_BYTES), hook._share_context(1, h, TARGET)) for h in ours}
    scale = scale_of({h: a.weight for h, a in peers.items()}, peers)
    setup = MaskingSetup(1, scale, {h: a.mask_key for h, a in peers.items()}, {TARGET: sealed[TARGET], **forged})
    masked = honest.encode(TARGET, updates[TARGET], setup)
    return unmask_target(config, masked.payload, secret, setup.mask_keys, 1) / scale


def two_stories_attack(config, updates, honest: Honest, identities: dict[str, Identity]):
    """Threshold 3 among 5 hospitals, h4 colluding: the target and h1 are told everyone survived
    and give the target's seed; h2 and h3 are told the target dropped and give its mask key; the
    colluder gives both."""
    colluder = "h4"
    driver, ask = build_hook(config, None, RUN), honest.ask(1)
    try:
        setups = driver.setup(1, {h: u.weight for h, u in updates.items()}, ask)
    except AggregationError:
        return None  # too few hospitals took part in set-up
    sent = {h: m for h in sorted(setups) if (m := honest.encode(h, updates[h], setups[h])) is not None}
    everyone, story = tuple(sorted(setups)), tuple(h for h in sorted(setups) if h != TARGET)

    def signed(survivors, by):
        told = ask({h: ConfirmSurvivors(survivors) for h in by})
        peers = honest.hooks[colluder]._rounds[1].peers
        return told | {colluder: identities[colluder].sign(masking._survivors_message(RUN, 1, peers, survivors))}

    seeds = ask({h: Unmask(everyone, (), signed(everyone, [TARGET, "h1"])) for h in (TARGET, "h1")})
    keys = ask({h: Unmask(story, (TARGET,), signed(story, ["h2", "h3"])) for h in ("h2", "h3")})
    index = {h: i + 1 for i, h in enumerate(everyone)}
    held = honest.hooks[colluder]._rounds[1].shares[TARGET]  # the colluder hands over what it holds
    seed_shares = {index[h]: a.seeds[TARGET] for h, a in seeds.items()} | {index[colluder]: held[: masking.SECRET_BYTES]}
    key_shares = {index[h]: a.mask_keys[TARGET] for h, a in keys.items()} | {index[colluder]: held[masking.SECRET_BYTES :]}
    if min(len(seed_shares), len(key_shares)) < 3 or TARGET not in sent:
        return None
    secret = masking._combine(seed_shares) + masking._combine(key_shares)
    return unmask_target(config, sent[TARGET].payload, secret, setups[TARGET].mask_keys, 1) / setups[TARGET].scale


def replay_attack(config, updates, honest: Honest, identities: dict[str, Identity]):
    """The round is run twice from the same weights, the second time under a new round number and
    with the target said to have dropped: the difference of the two sums is the target's change.
    The honest hospitals restart in between."""
    driver, weights = build_hook(config, None, RUN), {h: u.weight for h, u in updates.items()}
    sums = []
    for round, dropped in ((1, ()), (2, (TARGET,))):
        if round == 2:
            for h in updates:
                honest.restart(h)
        ask = honest.ask(round)
        setups = driver.setup(round, weights, ask)
        sent = [m for h in sorted(setups) if (m := honest.encode(h, dataclasses.replace(updates[h], round=round), setups[h]))]
        try:
            [aggregate] = driver.finish(round, driver.combine(round, [m for m in sent if m.hospital not in dropped]), {}, ask)
        except AggregationError:
            return None  # the driver could not unmask the second sum
        survivors = [h for h in setups if h not in dropped]
        sums.append(aggregate.delta.astype(np.float64) * math.fsum(weights[h] for h in survivors) / math.fsum(weights.values()))
    return (sums[0] - sums[1]) / scale_of(weights, weights)


# -- the tests -------------------------------------------------------------------------------------


def test_a_certificate_of_another_authority_cannot_vouch_for_a_peer(tmp_path):
    config, updates, _, honest = federation(tmp_path, masked_with(3, 1), 3)
    _, strangers = consortium(tmp_path / "elsewhere", ["h1"])
    ask = honest.ask(1)
    adverts = ask({h: Advertise() for h in updates})
    forged = dataclasses.replace(adverts["h1"], certificate=strangers["h1"].certificate)
    forged = dataclasses.replace(forged, signature=strangers["h1"].sign(masking._advert_message(RUN, 1, "h1", forged)))
    assert ask({TARGET: ShareSecrets(2, adverts | {"h1": forged})}) == {}
    assert honest.refused(r"h1's advertisement is refused: the peer's certificate is not one this consortium's authority vouches for")


def test_unmasking_needs_the_threshold_of_survivors_to_have_signed_the_same_set(tmp_path):
    config, updates, identities, honest = federation(tmp_path, masked_with(5, 1), 5)
    driver, ask = build_hook(config, None, RUN), honest.ask(1)
    setups = driver.setup(1, {h: u.weight for h, u in updates.items()}, ask)
    for h in sorted(setups):
        honest.encode(h, updates[h], setups[h])
    everyone, story = tuple(sorted(setups)), tuple(h for h in sorted(setups) if h != TARGET)
    signed = ask({h: ConfirmSurvivors(everyone) for h in ("h1", "h2")}) | ask({h: ConfirmSurvivors(story) for h in ("h3", "h4")})
    assert ask({"h1": ConfirmSurvivors(story)}) == {}  # a hospital signs one set a round
    assert honest.refused(r"h1: refuses to confirm survivors .*: it already signed the survivor set")
    assert ask({"h1": Unmask(everyone, (), signed)}) == {}
    assert honest.refused(r"h1: refuses the unmask request: it holds 2 valid survivor signatures on .*, fewer than the threshold 4")
    peers = honest.hooks["h1"]._rounds[1].peers
    forged = signed | {h: identities["h1"].sign(masking._survivors_message(RUN, 1, peers, everyone)) for h in ("h3", "h4")}
    assert ask({"h1": Unmask(everyone, (), forged)}) == {}  # h1's signature passed off as theirs
    assert honest.refused(r"holds 2 valid survivor signatures")
    assert ask({"h1": Unmask(everyone, ("h4",), signed)}) == {}
    assert honest.refused(r"would reveal both the seed and the mask key of \['h4'\]")
    assert ask({"h3": Unmask(everyone, (), signed)}) == {}
    assert honest.refused(r"h3: refuses the unmask request: it asks about survivors \['h0', .*\], but it confirmed \['h1', 'h2', 'h3', 'h4'\]")


def test_a_retry_over_the_same_survivors_gives_the_same_sum(tmp_path):
    config, updates, _, honest = federation(tmp_path, masked_with(3, 1), 3)
    driver, weights = build_hook(config, None, RUN), {h: u.weight for h, u in updates.items()}
    sums = []
    for round in (1, 2):
        ask = honest.ask(round)
        setups = driver.setup(round, weights, ask)
        sent = [honest.encode(h, dataclasses.replace(updates[h], round=round), setups[h]) for h in sorted(setups)]
        [aggregate] = driver.finish(round, driver.combine(round, sent), {}, ask)
        sums.append(aggregate.delta)
    assert np.array_equal(sums[0], sums[1]) and not honest.refusals


def swapped_ckks_key_attack(config, updates, honest: Honest, identities: dict[str, Identity]):
    """The driver deals the target a CKKS key of its own, posing as the dealer, and reads what
    the target encrypts under it."""
    offers = honest.ask(0)({h: ckks.KeyOffer() for h in updates})
    if TARGET not in offers:
        return None
    ours = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    ours.global_scale = 2.0**40
    agreement = new_private_key()
    key = agree(agreement, offers[TARGET], purpose=ckks.KEY_PURPOSE, run_id=RUN, round=0, pair=(TARGET, "h1"))
    sealed = seal(key, ours.serialize(save_secret_key=True), f"{RUN}|h1->{TARGET}".encode())
    honest.ask(0)({TARGET: ckks.KeyDelivery("h1", public_bytes(agreement), sealed)})
    encrypted = honest.encode(TARGET, updates[TARGET], 1.0)
    return np.concatenate([ts.ckks_vector_from(ours, c).decrypt() for c in encrypted.payload.ciphertexts])


def decrypt_one_attack(config, updates, honest: Honest, identities: dict[str, Identity]):
    """After an honest key set-up, the driver sends the target's ciphertext, scaled by 1, to
    another key holder as if it were the round's sum."""
    driver = build_hook(config, None, RUN)
    try:
        driver.start(sorted(updates), honest.ask(0))
    except AggregationError:
        return None
    encrypted = honest.encode(TARGET, updates[TARGET], 1.0)
    return np.asarray(honest.ask(1)({"h1": ckks.Decrypt(encrypted.payload.ciphertexts)})["h1"])


CKKS = {"encryption": {"enabled": True}}
# attack, its federation (privacy, hospitals, colluders its policy assumes), the refusal an honest
# hospital gives, and the check whose switching off lets the attack through.
ATTACKS = [
    pytest.param(scale_attack, masked_with(3, 1), 3, 0, r"refuses the set-up's scale 1\.0: its weight over the participants' signed weights is",
                 (masking, "_agreed_scale", lambda round, me, peers, participants, claimed: claimed), id="scale"),
    pytest.param(invented_peers_attack, masked_with(3, 1), 3, 0,
                 r"h0: refuses to share its secrets: the share request names \['intruder1', 'intruder2', 'intruder3'\], who are not in its policy's roster",
                 (masking, "_check_peers", lambda *args: None), id="invented-peers"),
    pytest.param(swapped_keys_attack, masked_with(3, 1), 3, 0,
                 r"h0: refuses to share its secrets: h1's advertisement is refused: h1's signature does not match what it is said to have signed",
                 (Identity, "check_signature", lambda *args: None), id="swapped-keys-forged-signature"),
    pytest.param(two_stories_attack, masked_with(5, 2), 5, 1,
                 r"refuses threshold 3 among 5 hospitals: it must be at least 4 \(.* more than half of 5 hospitals plus the 1 colluder\(s\) its policy assumes\)",
                 (masking, "_check_threshold", lambda *args: None), id="two-stories-one-colluder"),
    pytest.param(replay_attack, masked_with(3, 1), 3, 0,
                 r"h1: refuses the unmask request: it already unmasked a sum of \['h0', 'h1', 'h2'\] from the same starting weights",
                 (masking.UnmaskRecord, "survivors", lambda self, start: None), id="replay-under-a-new-round-after-a-restart"),
    pytest.param(swapped_ckks_key_attack, CKKS, 3, 0, r"h\d: refuses CKKS in cross-site mode: without threshold decryption",
                 (ckks, "refuse_across_sites", lambda trust, hospital: None), id="swapped-ckks-key"),
    pytest.param(decrypt_one_attack, CKKS, 3, 0, r"h\d: refuses CKKS in cross-site mode: without threshold decryption",
                 (ckks, "refuse_across_sites", lambda trust, hospital: None), id="ckks-ciphertext-to-a-key-holder"),
]


@pytest.mark.parametrize("attack, privacy, hospitals, colluders, refusal, check", ATTACKS)
def test_an_honest_hospital_refuses_the_attack_and_without_the_check_the_attack_reads_the_update(
        tmp_path, monkeypatch, attack, privacy, hospitals, colluders, refusal, check):
    config, updates, identities, honest = federation(tmp_path, privacy, hospitals, colluders)
    judge(attack(config, updates, honest, identities), updates, honest, refusal)

    config, updates, identities, honest = federation(tmp_path / "off", privacy, hospitals, colluders)
    monkeypatch.setattr(*check)
    recovered(attack(config, updates, honest, identities), updates)


def noise_share_std(config, updates, honest: Honest) -> float:
    """The standard deviation of the DP-FedAvg noise the target adds, after a set-up in which the
    driver asks for all 8 hospitals (threshold 8, run.min_hospitals 8)."""
    from fedward import aggregation
    from fedward.actors import outbound

    setups = build_hook(config, None, RUN).setup(1, {h: u.weight for h, u in updates.items()}, honest.ask(1))
    update = updates[TARGET]
    sending = outbound.Sending(1, 0, setups[TARGET], SIZE, frozenset(), "weights-0")
    noised = outbound.PrivateNoise(config, honest.hooks[TARGET], 0).apply(update, sending)
    return float(np.std(noised.delta - aggregation.bounded(update, 1.0, SIZE).delta))


def test_a_noise_share_is_sized_from_the_hospitals_policy_not_the_drivers_threshold(tmp_path, monkeypatch):
    privacy = {**masked_with(8, 0), "dp_fedavg": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0}}
    config, updates, _, honest = federation(tmp_path, privacy, 8, fewest=3, min_hospitals=8)
    # The policy lets a round complete with 3 hospitals: the 2 others than this one carry the full noise.
    assert noise_share_std(config, updates, honest) == pytest.approx(1 / math.sqrt(2), rel=0.1)

    monkeypatch.setattr(masking.MaskingHook, "contributors_agreed", lambda self, round: self._hospital_round(round).threshold)
    assert noise_share_std(config, updates, honest) == pytest.approx(1 / math.sqrt(7), rel=0.1)  # the driver's word: too little
