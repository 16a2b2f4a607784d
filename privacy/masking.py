"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"): the driver learns the weighted sum of the updates that
arrived and nothing about any one of them.

Each round, every hospital u encodes its clipped, scaled delta in fixed point in the ring
Z_{2**ring_bits} and adds a self mask PRG(b_u) and, for every other participant v, +PRG(s_uv) if
u < v else -PRG(s_uv), where s_uv is agreed by X25519: the pairwise masks cancel in the sum. So
that hospitals may drop out after set-up, each one Shamir-shares b_u and its mask private key
among the others, threshold t = (hospitals planned) - dropout_tolerance. After the updates
arrive, the survivors give the driver shares of b_u for each hospital whose update arrived and of
the mask private key of each one whose update did not, never both for one hospital, so no single
update is ever unmasked. A reconstructed secret is checked against the hospital's commitment or
public key: altered shares fail the round instead of giving a wrong model.

A hospital takes nothing that decides what it reveals from the driver's word (`Trust`):

- its weight it derives from its own data and signs into its advertisement; its scale it computes
  from the signed weights of the round's participants, and refuses a set-up that says otherwise;
- in cross-site mode every advertisement is signed under the sender's certified identity, and a
  hospital shares its secrets only with peers its own authority vouches for and its own policy's
  roster names, so a driver can neither invent peers nor swap a peer's keys;
- it accepts a threshold only if it is at least its policy's fewest hospitals and more than half
  of the sharing hospitals plus the colluders its policy assumes (2t > n + c);
- before any secret is revealed, the survivor set is agreed (Bonawitz et al.'s consistency check):
  each survivor signs the one set it is told, and a hospital reveals shares only for a set that t
  survivors signed. With 2t > n + c, two different stories cannot both gather t signatures;
- it never helps unmask two sums over different survivor sets from the same starting weights (by
  digest), whatever the round number or seed: its record of unmaskings outlives restarts.

Outside cross-site mode (one trust domain) advertisements are unsigned and the driver relays keys
faithfully. In either mode fewer hospitals collude with the driver than a round's survivors less
one: with exactly t survivors, t - 1 colluders and the driver take their own changes from the sum
and read the last one's (a hospital refuses rounds too small for the colluders its policy assumes,
actors/outbound.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.certificates import PeerRefused
from fedward.config import FedwardConfig
from fedward.errors import AggregationError, ConfigError
from fedward.files import append_lines
from fedward.types import Layout, SealedUpdate, Update
from fedward.privacy import dp_fedavg
from fedward.privacy.hooks import AGGREGATE, AggregationHook, Ask, Trust
from fedward.keys import agree, derive_key, keystream, new_private_key, open_sealed, private_bytes, private_key_from, public_bytes, seal

SECRET_BYTES = 32  # the self-mask seed b and an X25519 private key
SHAMIR_BLOCK = 16  # pycryptodome's Shamir shares 16-byte secrets (elements of GF(2^128))

WRAP_CHANCE = 2.0**-40  # the most a run may risk that a masked sum leaves the ring and decodes wrong


def wrap_chance(config: FedwardConfig, size: int, colluders: int = 0) -> float:
    """An upper bound on the chance that any of a round's `size` summed coordinates leaves the
    ring's signed range, where it would decode to a wrong value without any error.

    The scales of a round's participants sum to at most 1, so the sum of clipped changes stays
    within the clip; under DP-FedAvg each hospital's noise share comes on top, unclipped, and the
    sum's noise is largest when the fewest participants the threshold allows take part, and each
    share larger where a hospital's policy assumes `colluders`."""
    m, dp = config.privacy.masking, config.privacy.dp_fedavg
    limit = 2.0 ** (m.ring_bits - 1 - m.fraction_bits)  # the largest magnitude a decoded sum holds
    signal = dp.clip_norm if dp.enabled else m.clip
    if signal >= limit:
        return 1.0
    if not dp.enabled:
        return 0.0
    fewest = max(1, config.fewest_asked - m.dropout_tolerance)  # the reconstruction threshold of the smallest round
    shares = dp_fedavg.noise_shares(config, fewest, colluders)
    sigma = dp_fedavg.noise_multiplier(config) * dp.clip_norm / math.sqrt(shares) / math.sqrt(fewest)
    return min(1.0, size * math.erfc((limit - signal) / sigma / math.sqrt(2)))  # a union bound over the coordinates


def check_ring(config: FedwardConfig, size: int, colluders: int = 0) -> None:
    """Refuse a ring a round's masked sum could wrap, naming the settings that size it."""
    chance = wrap_chance(config, size, colluders)
    if chance >= WRAP_CHANCE:
        m = config.privacy.masking
        raise ConfigError(
            f"privacy.masking: a sum of {size} coordinates with DP-FedAvg's noise (noise_multiplier "
            f"{dp_fedavg.noise_multiplier(config):.3g}, clip_norm {config.privacy.dp_fedavg.clip_norm:g}) could leave the "
            f"{m.ring_bits}-bit ring with fraction_bits={m.fraction_bits} (chance up to {chance:.2g}, allowed {WRAP_CHANCE:.2g}) and "
            f"decode wrong without an error; use ring_bits: 64 or fewer fraction_bits"
        )



# Requests from the driver, answered by `MaskingHook.respond` at a hospital.
@dataclass(frozen=True)
class Advertise:
    """Make this round's keys and self-mask seed (answer: an `Advertisement`)."""


@dataclass(frozen=True)
class Advertisement:
    cipher_key: bytes  # X25519 public key the others encrypt their shares for this hospital under
    mask_key: bytes  # X25519 public key the pairwise masks are agreed with
    commitment: bytes  # SHA-256 of the self-mask seed, bound to run, round and hospital
    weight: float  # its weight in the mean, which it derived from its own data
    certificate: bytes = b""  # cross-site: its certificate (PEM), which vouches for its name
    signature: bytes = b""  # cross-site: over all of the above, bound to run, round and name


@dataclass(frozen=True)
class ShareSecrets:
    """Shamir-share the seed and mask private key among `peers` (answer: recipient -> sealed share)."""

    threshold: int
    peers: dict[str, Advertisement]


@dataclass(frozen=True)
class ConfirmSurvivors:
    """Sign the one survivor set the round will be unmasked over (answer: the signature; empty
    outside cross-site mode)."""

    survivors: tuple[str, ...]


@dataclass(frozen=True)
class Unmask:
    """Give this hospital's shares of the seeds of `survivors` and the mask keys of `dropped`
    (answer: an `UnmaskShares`); `confirmations` are the survivors' signatures on the set."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    confirmations: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskShares:
    seeds: dict[str, bytes]  # survivor -> this hospital's share of its self-mask seed
    mask_keys: dict[str, bytes]  # dropped hospital -> this hospital's share of its mask private key


@dataclass(frozen=True)
class MaskingSetup:
    """A hospital's set-up message: who masks with it, its scale, and the shares sealed for it."""

    round: int
    scale: float  # its weight over the participants' total weight, as the driver computed it; the hospital checks it
    mask_keys: dict[str, bytes]  # participant -> mask public key
    shares: dict[str, bytes]  # participant -> its shares for this hospital, sealed


@dataclass(frozen=True)
class MaskedSum:
    round: int
    hospitals: tuple[str, ...]  # whose masked update is in the sum
    total: np.ndarray  # ring elements
    layout: Layout
    num_examples: int


@dataclass(frozen=True)
class _DriverRound:
    threshold: int
    index: dict[str, int]  # each hospital that was asked to share: its Shamir share index
    adverts: dict[str, Advertisement]
    weights: dict[str, float]  # the participants: hospitals whose shares went out


@dataclass
class _HospitalRound:
    cipher_key: X25519PrivateKey
    mask_key: X25519PrivateKey
    seed: bytes
    advertisement: Advertisement
    threshold: int = 0
    peers: dict[str, Advertisement] = field(default_factory=dict)  # whom it shared its secrets with
    participants: tuple[str, ...] = ()  # set once it has masked its update
    start: str = ""  # a digest of the weights its update was trained from
    shares: dict[str, bytes] = field(default_factory=dict)  # participant -> its share of seed + mask key
    confirmed: tuple[str, ...] | None = None  # the survivor set it signed
    revealed_seeds: set[str] = field(default_factory=set)
    revealed_mask_keys: set[str] = field(default_factory=set)


class MaskingHook(AggregationHook):
    name = "masking"
    form = "masked"
    reveals_individual_updates = False

    def __init__(self, config: FedwardConfig, hospital: str | None, run_id: str, trust: Trust | None = None):
        super().__init__(config, hospital, run_id, trust)
        self.masking = config.privacy.masking
        self.ring = np.dtype(f"<u{self.masking.ring_bits // 8}")
        self._rounds: dict[int, Any] = {}  # round -> _DriverRound at the driver, _HospitalRound at a hospital
        self._last_threshold: int | None = None
        self._unmasked = UnmaskRecord(self.trust.record)  # at a hospital

    def _begin(self, round: int, state: Any) -> None:
        # An older round's secrets are of no use once a new round starts: keep none longer.
        self._rounds = {round: state}

    def fewest_contributors(self, planned: int) -> int:
        return max(1, planned - self.masking.dropout_tolerance)

    def contributors_agreed(self, round: int) -> int:
        if self.trust.fewest is not None:  # its threshold is at least this: its policy's word, not the driver's
            return self.trust.fewest
        return max(self.config.run.min_hospitals, self._hospital_round(round).threshold)

    def describe(self) -> dict[str, Any]:
        m = self.masking
        return {
            **super().describe(),
            "protocol": "pairwise masking with dropout recovery and signed consistency checks (Bonawitz et al. 2017)",
            "ring_bits": m.ring_bits,
            "fraction_bits": m.fraction_bits,
            "clip": m.clip,
            "dropout_tolerance": m.dropout_tolerance,
            "threshold_rule": "hospitals planned for the round - dropout_tolerance; at least 2, and each hospital checks 2t > n + its assumed colluders",
            "last_threshold": self._last_threshold,
            "key_agreement": "X25519, fresh keys every round",
            "prg": "ChaCha20 keystream under 256-bit HKDF-SHA256 keys bound to run, round and pair",
            "secret_sharing": "Shamir over GF(2^128) (pycryptodome), 32-byte secrets as two 16-byte halves",
            "share_encryption": "ChaCha20-Poly1305 under X25519-agreed keys",
            "seed_commitment": "SHA-256",
            "signatures": "ECDSA P-256 under the hospitals' certified identities (cross-site mode); none in one trust domain",
        }

    # -- driver ---------------------------------------------------------------------------------

    def setup(self, round: int, weights: Mapping[str, float], ask: Ask) -> Mapping[str, MaskingSetup]:
        planned = sorted(weights)
        threshold = len(planned) - self.masking.dropout_tolerance
        if threshold < 2 or 2 * threshold <= len(planned):
            raise AggregationError(
                f"round {round}: privacy.masking.dropout_tolerance={self.masking.dropout_tolerance} with {len(planned)} "
                f"hospitals leaves a threshold of {threshold}; it must be at least 2 and more than half of them "
                "(lower dropout_tolerance or plan more hospitals)"
            )
        adverts = {h: a for h, a in ask({h: Advertise() for h in planned}).items() if h in weights}
        for h, advert in adverts.items():
            if not (isinstance(advert, Advertisement) and len(advert.cipher_key) == len(advert.mask_key) == 32 and advert.weight > 0):
                raise AggregationError(f"round {round}, {h}: answered the advertise request without two X25519 public keys and a positive weight")
        _need_quorum(round, "advertised keys", adverts, planned, threshold)

        sealed = {h: s for h, s in ask({h: ShareSecrets(threshold, adverts) for h in adverts}).items() if h in adverts}
        for h, shares in sealed.items():
            if not (isinstance(shares, dict) and set(shares) == set(adverts) and all(isinstance(c, bytes) for c in shares.values())):
                raise AggregationError(f"round {round}, {h}: answered the share request without one sealed share per hospital")
        _need_quorum(round, "shared their secrets", sealed, planned, threshold)

        participants = {h: adverts[h].weight for h in sorted(sealed)}  # the weights each signed, which scale its update
        total = math.fsum(participants.values())
        self._begin(round, _DriverRound(threshold, {h: i + 1 for i, h in enumerate(sorted(adverts))}, adverts, participants))
        self._last_threshold = threshold
        mask_keys = {h: adverts[h].mask_key for h in participants}
        return {h: MaskingSetup(round, w / total, mask_keys, {u: sealed[u][h] for u in participants}) for h, w in participants.items()}

    def combine(self, round: int, received: Iterable[SealedUpdate]) -> MaskedSum:
        state = self._driver_round(round)
        total, layout, seen, examples = None, None, [], 0
        for sealed in received:
            where = f"round {round}, {sealed.hospital}"
            if sealed.form != self.form or sealed.round != round:
                raise AggregationError(f"{where}: expected a masked update of this round, got form {sealed.form!r} of round {sealed.round}")
            if sealed.hospital not in state.weights or sealed.hospital in seen:
                raise AggregationError(f"{where}: not a participant of the round's set-up, or sent a second update")
            layout = layout or sealed.layout
            payload = sealed.payload
            if sealed.layout != layout or not (isinstance(payload, np.ndarray) and payload.dtype == self.ring and payload.shape == (layout.size,)):
                raise AggregationError(f"{where}: expected {layout.size} {self.masking.ring_bits}-bit ring elements in the round's layout")
            if total is None:
                total = np.zeros(layout.size, self.ring)
            total += payload  # wraps around: arithmetic mod 2**ring_bits
            seen.append(sealed.hospital)
            examples += sealed.num_examples
        if total is None:
            raise AggregationError(f"round {round}: no masked update arrived")
        return MaskedSum(round, tuple(sorted(seen)), total, layout, examples)

    def finish(self, round: int, combined: MaskedSum, dropped: Mapping[str, str], ask: Ask) -> Sequence[Update]:
        state = self._driver_round(round)
        survivors = combined.hospitals
        gone = tuple(h for h in state.weights if h not in survivors)
        if len(survivors) < state.threshold:
            why = ", ".join(f"{h} ({dropped.get(h, 'no update')})" for h in gone)
            raise AggregationError(
                f"round {round}: {len(survivors)} masked updates arrived, unmasking needs {state.threshold}; dropped: {why}"
            )
        signed = ask({h: ConfirmSurvivors(survivors) for h in survivors})
        confirmations = {h: c for h, c in signed.items() if h in survivors and isinstance(c, bytes)}
        if len(confirmations) < state.threshold:
            raise AggregationError(
                f"round {round}: {len(confirmations)} survivors confirmed the survivor set, unmasking needs {state.threshold}; "
                f"not confirming: {sorted(set(survivors) - set(confirmations))}"
            )
        answers = ask({h: Unmask(survivors, gone, confirmations) for h in survivors})

        def recover(owner: str, secret: str, what: str) -> bytes:
            shares = {}
            for h, answer in answers.items():
                share = getattr(answer, secret).get(owner) if isinstance(answer, UnmaskShares) else None
                if h in survivors and isinstance(share, bytes) and len(share) == SECRET_BYTES:
                    shares[state.index[h]] = share
            if len(shares) < state.threshold:
                raise AggregationError(
                    f"round {round}: {len(shares)} of the {state.threshold} shares needed to recover {owner}'s {what} "
                    "arrived; the round fails rather than give a wrong model"
                )
            return _combine(shares)

        total = combined.total.copy()
        for u in survivors:
            seed = recover(u, "seeds", "self-mask seed")
            if _commitment(self.run_id, round, u, seed) != state.adverts[u].commitment:
                raise AggregationError(f"round {round}: {u}'s self-mask seed rebuilt from shares does not match its commitment; a share was altered")
            total -= self._prg(_seed_key(seed, self.run_id, round, u), total.size)
        for d in gone:
            key = private_key_from(recover(d, "mask_keys", "mask key"))
            if public_bytes(key) != state.adverts[d].mask_key:
                raise AggregationError(f"round {round}: {d}'s mask key rebuilt from shares does not match its public key; a share was altered")
            for u in survivors:
                pad = self._prg(self._pair_key(key, state.adverts[u].mask_key, round, (u, d)), total.size)
                if u < d:  # undo what u added for its pair with d
                    total -= pad
                else:
                    total += pad
        # Scales sum to at most 1 and clip * 2**fraction_bits < 2**(ring_bits - 2): the sum never wraps.
        decoded = total.view(f"<i{self.ring.itemsize}").astype(np.float64) / 2.0**self.masking.fraction_bits
        weight = math.fsum(state.weights[h] for h in survivors)
        share = weight / math.fsum(state.weights.values())  # the survivors' scales summed
        return [Update(round, AGGREGATE, (decoded / share).astype(np.float32), combined.layout, combined.num_examples, weight, {})]

    def _driver_round(self, round: int) -> _DriverRound:
        if round not in self._rounds:
            raise AggregationError(f"round {round}: the masking hook did not set this round up")
        return self._rounds[round]

    # -- hospital -------------------------------------------------------------------------------

    def respond(self, round: int, request: Any) -> Any:
        match request:
            case Advertise():
                return self._advertise(round)
            case ShareSecrets():
                return self._share(round, request)
            case ConfirmSurvivors():
                return self._confirm(round, request)
            case Unmask():
                return self._unmask(round, request)
        raise AggregationError(f"round {round}, {self.hospital}: the masking hook cannot answer a {type(request).__name__}")

    def _advertise(self, round: int) -> Advertisement:
        cipher_key, mask_key, seed = new_private_key(), new_private_key(), os.urandom(SECRET_BYTES)
        advert = Advertisement(public_bytes(cipher_key), public_bytes(mask_key), _commitment(self.run_id, round, self.hospital, seed), self.trust.weight)
        if (identity := self.trust.identity) is not None:
            advert = dataclasses.replace(advert, certificate=identity.certificate)
            advert = dataclasses.replace(advert, signature=identity.sign(_advert_message(self.run_id, round, self.hospital, advert)))
        self._begin(round, _HospitalRound(cipher_key, mask_key, seed, advert))
        return advert

    def _share(self, round: int, request: ShareSecrets) -> dict[str, bytes]:
        state = self._hospital_round(round)
        peers, t = request.peers, request.threshold
        if peers.get(self.hospital) != state.advertisement:
            raise AggregationError(f"round {round}, {self.hospital}: the share request does not carry the keys it advertised")
        _check_peers(self.trust, self.run_id, round, self.hospital, peers)
        _check_threshold(self.trust, round, self.hospital, t, len(peers))
        state.threshold, state.peers = t, dict(peers)
        # One share per peer, in name order: share i + 1 goes to the i-th peer.
        shares = _split(state.seed + private_bytes(state.mask_key), t, len(peers))
        return {
            v: seal(self._share_key(state, v, round), share, self._share_context(round, self.hospital, v))
            for v, share in zip(sorted(peers), shares)
        }

    def encode(self, update: Update, setup: MaskingSetup, start: str) -> SealedUpdate:
        round, me = setup.round, self.hospital
        state = self._hospital_round(round)
        if state.participants:
            # Two updates under the same masks would give the driver their difference.
            raise AggregationError(f"round {round}, {me}: already sent a masked update this round; masks are never reused")
        participants = tuple(sorted(setup.mask_keys))
        if update.round != round or me not in setup.mask_keys or len(participants) < state.threshold:
            raise AggregationError(f"round {round}, {me}: the set-up message does not fit this update or names too few participants")
        if any(v not in state.peers or state.peers[v].mask_key != setup.mask_keys[v] for v in participants) or set(setup.shares) != set(participants):
            raise AggregationError(f"round {round}, {me}: the set-up message's keys or shares differ from those shared in set-up")
        scale = _agreed_scale(round, me, state.peers, participants, setup.scale)
        delta = update.delta.astype(np.float64)
        if not np.isfinite(delta).all():
            raise AggregationError(f"round {round}, {me}: the update holds non-finite values; refusing to mask it")
        state.shares = {
            u: open_sealed(self._share_key(state, u, round), setup.shares[u], self._share_context(round, u, me), f"round {round}: shares from {u} for {me}")
            for u in participants
        }
        state.participants, state.start = participants, start

        if not self.config.privacy.dp_fedavg.enabled:
            delta = np.clip(delta, -self.masking.clip, self.masking.clip)
        # Under hospital-level DP the delta was clipped in norm (to at most masking.clip, which the
        # config requires) before its noise share was added; clipping the noised delta again would
        # cut the noise. Ring arithmetic wraps exactly, so the driver still gets the noised sum.
        fixed = np.rint(delta * scale * 2.0**self.masking.fraction_bits).astype(np.int64)
        masked = fixed.astype(self.ring)  # two's complement: negative values wrap into the ring
        masked += self._prg(_seed_key(state.seed, self.run_id, round, me), masked.size)
        for v in participants:
            if v != me:
                pad = self._prg(self._pair_key(state.mask_key, setup.mask_keys[v], round, (me, v)), masked.size)
                if me < v:
                    masked += pad
                else:
                    masked -= pad
        return SealedUpdate(round, me, self.form, masked, update.layout, update.num_examples, update.metrics)

    def _confirm(self, round: int, request: ConfirmSurvivors) -> bytes:
        me, state = self.hospital, self._rounds.get(round)
        survivors = tuple(sorted(request.survivors))
        refusal = None
        if state is None or not state.participants:
            refusal = "it sent no masked update this round"
        elif state.confirmed not in (None, survivors):
            refusal = f"it already signed the survivor set {list(state.confirmed)}; two sets would let their difference be unmasked"
        elif me not in survivors:
            refusal = "the set leaves out this hospital, which sent its update"
        elif unknown := sorted(set(survivors) - set(state.participants)):
            refusal = f"the set names {unknown}, who are not participants"
        elif len(survivors) < state.threshold:
            refusal = f"the set names {len(survivors)} survivors, fewer than the threshold {state.threshold}"
        if refusal:
            raise AggregationError(f"round {round}, {me}: refuses to confirm survivors {list(survivors)}: {refusal}")
        state.confirmed = survivors
        identity = self.trust.identity
        return identity.sign(_survivors_message(self.run_id, round, state.peers, survivors)) if identity is not None else b""

    def _unmask(self, round: int, request: Unmask) -> UnmaskShares:
        me = self.hospital
        state = self._rounds.get(round)
        if state is None or not state.participants:
            raise AggregationError(f"round {round}, {me}: sent no masked update this round, so holds no shares to give")
        survivors, gone = set(request.survivors), set(request.dropped)
        refusal = None
        if both := survivors & gone | survivors & state.revealed_mask_keys | gone & state.revealed_seeds:
            refusal = f"would reveal both the seed and the mask key of {sorted(both)}"
        elif unknown := (survivors | gone) - set(state.participants):
            refusal = f"names {sorted(unknown)}, who are not participants"
        elif len(survivors) < state.threshold:
            refusal = f"names {len(survivors)} survivors, fewer than the threshold {state.threshold}"
        elif me in gone:
            refusal = "lists this hospital as dropped, but it sent its update"
        elif missing := set(state.participants) - survivors - gone:
            refusal = f"leaves {sorted(missing)} neither survived nor dropped"
        elif state.confirmed != tuple(sorted(survivors)):
            refusal = f"asks about survivors {sorted(survivors)}, but it confirmed {list(state.confirmed or ())}"
        else:
            refusal = _confirmation_problem(self.trust, self.run_id, round, state, tuple(sorted(survivors)), request.confirmations)
        if refusal is None and (earlier := self._unmasked.survivors(state.start)) not in (None, sorted(survivors)):
            # A round retrained from the same weights gives the same changes, under any round number
            # or seed: two sums over different survivors would give the driver their difference.
            refusal = (f"already unmasked a sum of {earlier} from the same starting weights; another set would reveal the difference. "
                       "The round can complete over those survivors, or from other starting weights (another run.seed)")
        if refusal:
            raise AggregationError(f"round {round}, {me}: refuses the unmask request: it {refusal}")
        self._unmasked.add(state.start, sorted(survivors), self.run_id, round)
        state.revealed_seeds |= survivors
        state.revealed_mask_keys |= gone
        return UnmaskShares(
            seeds={u: state.shares[u][:SECRET_BYTES] for u in sorted(survivors)},
            mask_keys={u: state.shares[u][SECRET_BYTES:] for u in sorted(gone)},
        )

    def _hospital_round(self, round: int) -> _HospitalRound:
        if round not in self._rounds:
            raise AggregationError(f"round {round}, {self.hospital}: has not advertised keys for this round")
        return self._rounds[round]

    # -- keys and masks -------------------------------------------------------------------------

    def _share_key(self, state: _HospitalRound, peer: str, round: int) -> bytes:
        return agree(state.cipher_key, state.peers[peer].cipher_key, purpose="masking-shares", run_id=self.run_id, round=round, pair=(self.hospital, peer))

    def _share_context(self, round: int, sender: str, recipient: str) -> bytes:
        return f"fedward|masking-shares|{self.run_id}|{round}|{sender}->{recipient}".encode()

    def _pair_key(self, own: X25519PrivateKey, peer_public: bytes, round: int, pair: tuple[str, str]) -> bytes:
        return agree(own, peer_public, purpose="mask", run_id=self.run_id, round=round, pair=pair)

    def _prg(self, key: bytes, size: int) -> np.ndarray:
        return np.frombuffer(keystream(key, size * self.ring.itemsize), dtype=self.ring)


# -- a hospital's checks of what the driver says; each names the inconsistency it refuses --------


def _advert_message(run_id: str, round: int, hospital: str, advert: Advertisement) -> bytes:
    return _message("masking-advertisement", run_id, round, hospital, advert.cipher_key.hex(), advert.mask_key.hex(),
                    advert.commitment.hex(), repr(float(advert.weight)), advert.certificate.decode())


def _survivors_message(run_id: str, round: int, peers: Mapping[str, Advertisement], survivors: Sequence[str]) -> bytes:
    """A survivor set, bound to this attempt at the round by the peers' fresh seed commitments: a
    signature from an earlier attempt, or a restart, does not count."""
    attempt = hashlib.sha256(b"".join(peers[p].commitment for p in sorted(peers))).hexdigest()
    return _message("masking-survivors", run_id, round, attempt, *sorted(survivors))


def _message(*parts: Any) -> bytes:
    return json.dumps(["fedward", *parts]).encode()


def _check_peers(trust: Trust, run_id: str, round: int, me: str, peers: Mapping[str, Advertisement]) -> None:
    """Share secrets only with peers the hospital's own roster names and, in cross-site mode, its
    own authority vouches for, each advertisement signed by the peer it names."""
    where = f"round {round}, {me}: refuses to share its secrets"
    if trust.roster is not None and (strangers := sorted(set(peers) - trust.roster)):
        raise AggregationError(f"{where}: the share request names {strangers}, who are not in its policy's roster {sorted(trust.roster)}")
    for name, advert in sorted(peers.items()):
        if not (isinstance(advert, Advertisement) and all(isinstance(b, bytes) for b in (advert.cipher_key, advert.mask_key, advert.commitment,
                                                                                           advert.certificate, advert.signature))):
            raise AggregationError(f"{where}: {name}'s advertisement is not one (keys, commitment, certificate and signature as bytes)")
        if not (isinstance(advert.weight, float) and math.isfinite(advert.weight) and advert.weight > 0):
            raise AggregationError(f"{where}: {name} advertises weight {advert.weight!r}, expected a positive number")
        if trust.identity is not None:
            try:
                trust.identity.check_signature(advert.certificate, advert.signature, _advert_message(run_id, round, name, advert), name)
            except PeerRefused as e:
                raise AggregationError(f"{where}: {name}'s advertisement is refused: {e}") from None


def _check_threshold(trust: Trust, round: int, me: str, threshold: int, holders: int) -> None:
    """A threshold two stories about who dropped cannot both reach, with the colluders its policy
    assumes signing both, and no lower than its policy's fewest hospitals."""
    least = max(2, (holders + trust.colluders) // 2 + 1, trust.fewest or 0)
    if not least <= threshold <= holders:
        raise AggregationError(
            f"round {round}, {me}: refuses threshold {threshold} among {holders} hospitals: it must be at least {least} (at least 2"
            f"{f', its policy fewest_hospitals {trust.fewest}' if trust.fewest else ''}, and more than half of {holders} hospitals "
            f"plus the {trust.colluders} colluder(s) its policy assumes) and at most {holders}"
        )


def _agreed_scale(round: int, me: str, peers: Mapping[str, Advertisement], participants: Sequence[str], claimed: float) -> float:
    """Its own weight over the participants' signed weights; a set-up that says otherwise is refused."""
    own = peers[me].weight / math.fsum(peers[v].weight for v in sorted(participants))
    if not math.isclose(claimed, own, rel_tol=1e-12):
        raise AggregationError(
            f"round {round}, {me}: refuses the set-up's scale {claimed!r}: its weight over the participants' signed weights is {own!r}"
        )
    return own


def _confirmation_problem(trust: Trust, run_id: str, round: int, state: _HospitalRound, survivors: tuple[str, ...],
                          confirmations: Mapping[str, bytes]) -> str | None:
    """Why the survivors' signatures on `survivors` do not show that t of them were told this same
    set (cross-site mode only: in one trust domain the driver's word is taken)."""
    if trust.identity is None:
        return None
    valid = []
    for name, signature in sorted(confirmations.items()):
        if name in survivors and name in state.peers:
            advert = state.peers[name]
            try:
                trust.identity.check_signature(advert.certificate, signature, _survivors_message(run_id, round, state.peers, survivors), name)
            except PeerRefused:
                continue
            valid.append(name)
    if len(valid) < state.threshold:
        return (f"holds {len(valid)} valid survivor signatures on {list(survivors)} ({valid}), fewer than the threshold {state.threshold}: "
                "the survivors may have been told different sets")
    return None


class UnmaskRecord:
    """Which survivor set a hospital helped unmask from each starting weights' digest, kept in its
    own area across restarts and runs (JSON lines), so no two sums from the same weights differ."""

    def __init__(self, path: Path | None):
        self.path = path
        self._sets: dict[str, list[str]] | None = None

    def survivors(self, start: str) -> list[str] | None:
        return self._read().get(start)

    def add(self, start: str, survivors: list[str], run_id: str, round: int) -> None:
        if self._read().get(start) == survivors:
            return
        if self.path is not None:
            append_lines(self.path, [json.dumps({"start": start, "survivors": survivors, "run": run_id, "round": round})])
        self._sets[start] = survivors

    def _read(self) -> dict[str, list[str]]:
        if self._sets is None:
            self._sets = {}
            lines = self.path.read_text().splitlines() if self.path is not None and self.path.exists() else []
            for n, line in enumerate(lines, 1):
                try:
                    entry = json.loads(line)
                    self._sets.setdefault(entry["start"], entry["survivors"])
                except (ValueError, KeyError, TypeError):
                    if n == len(lines):  # torn by a crash while appended, before anything was revealed
                        continue
                    raise AggregationError(f"{self.path}, line {n}: unreadable record of an unmasking; "
                                           "the hospital refuses to unmask until it is mended") from None
        return self._sets


def _need_quorum(round: int, what: str, answered: Mapping[str, Any], planned: Sequence[str], threshold: int) -> None:
    if len(answered) < threshold:
        missing = sorted(set(planned) - set(answered))
        raise AggregationError(f"round {round}: {len(answered)} hospitals {what}, masking needs {threshold}; missing: {missing}")


def _commitment(run_id: str, round: int, hospital: str, seed: bytes) -> bytes:
    return hashlib.sha256(f"fedward|masking-seed|{run_id}|{round}|{hospital}|".encode() + seed).digest()


def _seed_key(seed: bytes, run_id: str, round: int, hospital: str) -> bytes:
    return derive_key(seed, purpose="self-mask", run_id=run_id, round=round, parties=(hospital,))


def _split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares 1..count of a secret of whole 16-byte blocks, each block shared on its own
    with the same indices, so share i is the concatenation of the blocks' shares i."""
    blocks = [Shamir.split(threshold, count, secret[k : k + SHAMIR_BLOCK]) for k in range(0, len(secret), SHAMIR_BLOCK)]
    return [b"".join(block[i][1] for block in blocks) for i in range(count)]


def _combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret from shares (index -> share). All of them, not just `threshold`: consistent
    extra shares interpolate the same polynomial, and any altered one spoils the result, which
    the caller's check then catches."""
    size = len(next(iter(shares.values())))
    return b"".join(Shamir.combine([(i, s[k : k + SHAMIR_BLOCK]) for i, s in shares.items()]) for k in range(0, size, SHAMIR_BLOCK))
