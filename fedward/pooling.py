"""Pooled figures from statistics the driver never reads: the hospitals' evaluation key.

A hospital's exact evaluation statistics (per-class counts of scores in 0.01 slices, sums over its
patients) tell anyone who can score its held-out patients which of them has which outcome, and so
does their sum over every hospital. So they leave a hospital only under a one-time pad drawn from
a key the hospitals share and the driver does not; the driver adds the padded vectors, and one of
the hospitals that contributed removes the pads and returns only the figures the task computes
from the sum (AUROC, AUPRC, accuracy, loss, ...), rounded to `POOLED_DIGITS`. What the driver
holds of a hospital's evaluation in the clear is what fedward/release.py lets leave.

The key: at the start of every driver session each hospital makes an X25519 key pair; the first
hospital by name draws the evaluation key and seals it to each other hospital under the key the
two derive, so the driver relays only public keys and sealed bytes. Each hospital keeps the key in
its run area, where a hospital process restarted mid-run finds it again.

Trust: in cross-site mode each hospital signs its public key with its certified key, bound to the
run and its name, and seals the evaluation key only to, or takes it only from, a hospital of its
own roster whose offer its own authority vouches for: a driver that swapped a public key for its
own gets nothing it can open. In one trust domain (no identity) the driver relays public keys
faithfully. Either way no hospital colludes with the driver, since a hospital with the key could
read another's padded statistics the driver showed it. A hospital opens only a sum of at least
`MIN_CONTRIBUTORS` hospitals, itself among them, and each pad is used once: a fresh nonce per
padded message, so no two messages' pads cancel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedward.certificates import Identity, PeerRefused
from fedward.errors import AggregationError
from fedward.files import atomic_write
from fedward.keys import agree, derive_key, keystream, new_private_key, open_sealed, public_bytes, seal

FRACTION_BITS = 24  # fixed point: counts are exact, sums of floats kept to 6e-8
MIN_CONTRIBUTORS = 2
POOLED_DIGITS = 3
PURPOSE = "evaluation key"
NONCE_BYTES = 16
KEY_FILE = "evaluation.key"

Layout = tuple[tuple[str, tuple[int, ...]], ...]  # each statistic's name and shape, in order


@dataclass(frozen=True)
class EvaluationKeyOffer:
    """A hospital's public key for the set-up; in cross-site mode with its certificate, and signed."""

    hospital: str
    public: bytes
    certificate: bytes = b""  # PEM
    signature: bytes = b""


@dataclass(frozen=True)
class PaddedStatistics:
    """One hospital's evaluation statistics in fixed point under its one-time pad."""

    hospital: str
    key_id: bytes  # which evaluation key drew the pad: sums under different keys cannot be opened
    nonce: bytes
    layout: Layout
    values: np.ndarray  # uint64


@dataclass(frozen=True)
class PaddedSum:
    """The driver's sum of padded statistics, and whose pads it holds."""

    contributors: tuple[tuple[str, bytes], ...]  # (hospital, nonce)
    key_id: bytes
    layout: Layout
    values: np.ndarray  # uint64


def add(padded: Sequence[PaddedStatistics]) -> PaddedSum:
    """The driver's half: add padded statistics of the same layout (wrapping, as the pads do)."""
    layouts, keys = {p.layout for p in padded}, {p.key_id for p in padded}
    if len(layouts) != 1:
        raise AggregationError(f"hospitals padded statistics of different layouts: {sorted(p.hospital for p in padded)}")
    if len(keys) != 1:
        by_key = {k.hex(): sorted(p.hospital for p in padded if p.key_id == k) for k in keys}
        raise AggregationError(f"hospitals padded statistics under different evaluation keys (a set-up one of them missed): {by_key}")
    return PaddedSum(tuple((p.hospital, p.nonce) for p in padded), keys.pop(), layouts.pop(), sum(p.values for p in padded[1:]) + padded[0].values)


# method, arguments per hospital -> the answers of those that answered, and why each other did not
Call = Callable[[str, Mapping[str, tuple]], tuple[Mapping[str, Any], Mapping[str, str]]]


def deal(hospitals: Sequence[str], call: Call) -> dict[str, str]:
    """The driver's half of the key set-up; returns each hospital left without the key, and why.
    Such a hospital's evaluations add nothing to the pooled figures, whose `pooled_over` leaves it
    out, until the next driver session deals again."""
    offers, missing = call("evaluation_public_key", {h: () for h in hospitals})
    if len(offers) < MIN_CONTRIBUTORS:
        return {**missing, **{h: f"fewer than {MIN_CONTRIBUTORS} hospitals answered the evaluation key's set-up" for h in offers}}
    dealer = min(offers)
    dealt, failed = call("evaluation_deal", {dealer: (dict(offers),)})
    if dealer not in dealt:
        raise AggregationError(f"{dealer}: failed to deal the evaluation key, so no pooled figures can be computed: "
                               f"{failed.get(dealer, 'no answer')}")
    _, refused = call("evaluation_accept", {h: (offers[dealer], sealed) for h, sealed in dealt[dealer].items()})
    return {**missing, **refused}


def in_process(keys: Sequence[EvaluationKey]) -> Call:
    """`deal`'s calls to hospitals' keys in this process (the demo's baselines, tests): a refusal raises."""
    by_name = {k.hospital: k for k in keys}
    methods = {"evaluation_public_key": "public", "evaluation_deal": "deal", "evaluation_accept": "accept"}
    return lambda method, arguments: ({h: getattr(by_name[h], methods[method])(*a) for h, a in arguments.items()}, {})


def pooled(padded: Sequence[PaddedStatistics | None], open_at: Callable[[str, PaddedSum], dict]) -> dict:
    """The driver's half of pooling: add the padded statistics and have a contributor open the
    sum, the next one where one fails; the figures name the hospitals pooled over. Fewer than
    MIN_CONTRIBUTORS hospitals with a key give no pooled figures."""
    padded = [p for p in padded if p is not None]
    if len({p.hospital for p in padded}) < MIN_CONTRIBUTORS:
        return {}
    summed = add(padded)
    over = {"pooled_over": sorted(p.hospital for p in padded)}
    reasons = []
    for hospital in sorted(p.hospital for p in padded):
        try:
            return {**open_at(hospital, summed), **over}
        except Exception as e:  # a hospital lost since it evaluated: another contributor opens the sum
            reasons.append(f"{hospital}: {e}")
    raise AggregationError("no contributing hospital opened the pooled statistics: " + "; ".join(reasons))


class EvaluationKey:
    """A hospital's half: its key pair for the set-up, then the consortium's evaluation key.

    With an `identity` (cross-site mode) it signs its offer and checks every peer's against its own
    authority; with a `roster` it deals with no hospital outside it."""

    def __init__(self, hospital: str, run_id: str, run_dir: Path, identity: Identity | None = None, roster: frozenset[str] | None = None):
        self.hospital, self.run_id, self.path = hospital, run_id, run_dir / KEY_FILE
        self.identity, self.roster = identity, roster
        self._private = None

    def public(self) -> EvaluationKeyOffer:
        """Its offer for a new set-up: the key of an earlier one is dropped, so a hospital this
        set-up leaves out pads nothing rather than pads under a key the others no longer hold."""
        self.path.unlink(missing_ok=True)
        self._private = new_private_key()
        offer = EvaluationKeyOffer(self.hospital, public_bytes(self._private))
        if self.identity is None:
            return offer
        return EvaluationKeyOffer(offer.hospital, offer.public, self.identity.certificate, self.identity.sign(_offer_message(self.run_id, offer)))

    def deal(self, offers: Mapping[str, EvaluationKeyOffer]) -> dict[str, bytes]:
        """As the dealer: draw the key, keep it, and seal it to every other hospital, each offer checked first."""
        peers = {h: offer for h, offer in offers.items() if h != self.hospital}
        for name, offer in sorted(peers.items()):
            self._check_offer(name, offer, "seal the evaluation key to")
        key = os.urandom(32)
        sealed = {h: seal(self._pair_key(h, offer.public), key, h.encode()) for h, offer in peers.items()}
        self._keep(key)  # only once it is sealed to every peer: a failed deal leaves no key here
        self._private = None  # one set-up per key pair: a replayed request finds none
        return sealed

    def accept(self, dealer: EvaluationKeyOffer, sealed: bytes) -> None:
        """Keep the key `dealer` sealed to this hospital, once its offer is checked: a key the
        driver chose would let it remove this hospital's pads."""
        name = getattr(dealer, "hospital", None)
        self._check_offer(name, dealer, "take the evaluation key from")
        self._keep(open_sealed(self._pair_key(name, dealer.public), sealed, self.hospital.encode(), f"{self.hospital}: the evaluation key"))
        self._private = None

    def _check_offer(self, name: Any, offer: Any, act: str) -> None:
        where = f"{self.hospital}: refuses to {act} {name!r}"
        if not (isinstance(offer, EvaluationKeyOffer) and all(isinstance(b, bytes) for b in (offer.public, offer.certificate, offer.signature))):
            raise AggregationError(f"{where}: what was sent as its offer is not an EvaluationKeyOffer with public key, certificate and signature as bytes")
        if offer.hospital != name:
            raise AggregationError(f"{where}: the offer sent as {name!r}'s names {offer.hospital!r}")
        if self.roster is not None and name not in self.roster:
            raise AggregationError(f"{where}: not in its policy's roster {sorted(self.roster)}")
        if self.identity is not None:
            try:
                self.identity.check_signature(offer.certificate, offer.signature, _offer_message(self.run_id, offer), name)
            except PeerRefused as e:
                raise AggregationError(f"{where}: its key offer is refused: {e}") from None

    @property
    def ready(self) -> bool:
        return self.path.is_file()

    def pad(self, statistics: Mapping[str, np.ndarray]) -> PaddedStatistics:
        layout = tuple((name, tuple(np.shape(statistics[name]))) for name in sorted(statistics))
        fixed = np.concatenate([np.round(np.asarray(statistics[n], np.float64).ravel() * 2.0**FRACTION_BITS) for n, _ in layout])
        nonce = os.urandom(NONCE_BYTES)
        return PaddedStatistics(self.hospital, self._key_id(), nonce, layout,
                                fixed.astype(np.int64).view(np.uint64) + self._pad(self.hospital, nonce, len(fixed)))

    def open(self, summed: PaddedSum) -> dict[str, np.ndarray]:
        """The statistics summed over the contributors, once their pads are removed."""
        names = [h for h, _ in summed.contributors]
        if len(set(names)) < MIN_CONTRIBUTORS or self.hospital not in names or len(set(names)) != len(names):
            raise AggregationError(
                f"{self.hospital}: refuses to open a sum of {sorted(names)}: it opens only sums of {MIN_CONTRIBUTORS} or more different "
                f"hospitals, itself among them"
            )
        if summed.key_id != self._key_id():
            raise AggregationError(f"{self.hospital}: the sum of {sorted(names)} was padded under another evaluation key than its own "
                                   f"(a set-up it missed, or a key it no longer holds): it cannot open it")
        values = summed.values - sum(self._pad(h, nonce, len(summed.values)) for h, nonce in summed.contributors)
        flat = values.view(np.int64) / 2.0**FRACTION_BITS
        out, at = {}, 0
        for name, shape in summed.layout:
            size = int(np.prod(shape))
            out[name] = flat[at : at + size].reshape(shape)
            at += size
        return out

    def _pair_key(self, peer: str, peer_public: bytes) -> bytes:
        if self._private is None:
            raise AggregationError(f"{self.hospital}: asked to exchange the evaluation key before making its key pair")
        return agree(self._private, peer_public, purpose=PURPOSE, run_id=self.run_id, round=0, pair=(self.hospital, peer))

    def _keep(self, key: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, key)

    def _key(self) -> bytes:
        if not self.path.is_file():
            raise AggregationError(f"{self.hospital}: has no evaluation key for this run (the driver sets it up before round 1)")
        return self.path.read_bytes()

    def _key_id(self) -> bytes:
        return derive_key(self._key(), purpose="evaluation key id", run_id=self.run_id, round=0, parties=())[:8]

    def _pad(self, hospital: str, nonce: bytes, size: int) -> np.ndarray:
        key = derive_key(self._key(), purpose="evaluation pad", run_id=self.run_id, round=0, parties=(hospital, nonce.hex()))
        return np.frombuffer(keystream(key, 8 * size), np.uint64)


def _offer_message(run_id: str, offer: EvaluationKeyOffer) -> bytes:
    """What a hospital signs of its offer: bound to the run, the purpose and its name."""
    return "\n".join([PURPOSE, run_id, offer.hospital, offer.public.hex()]).encode()
