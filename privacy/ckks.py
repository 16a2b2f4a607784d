"""Homomorphic encryption of updates (CKKS, TenSEAL): the driver adds ciphertexts it cannot read.

Key set-up, once per run: every hospital offers an X25519 public key; the dealer (the first
hospital, by name, that answered) creates the CKKS keys and seals the full context, secret key
included, for each other hospital under a key from `fedward.keys.agree`; the driver relays the
sealed copies and keeps only the public parameters. Each round a hospital scales its delta by its
share of the planned weight, encrypts it (or the configured layers of it) and sends the
ciphertexts; the driver sums them one hospital at a time and asks one key holder to decrypt the
sum, which that hospital rounds before it leaves (an exact CKKS decryption leaks about the key).

Trust: the driver follows the protocol (honest but curious) and colludes with no key holder.
Every key holder can decrypt any ciphertext, and a driver that asked for one hospital's
ciphertext to be decrypted would learn that update; a driver that dealt a target a key of its own
would read everything the target sends; and rounding a decrypted sum is not noise flooding. Only
threshold CKKS, which nothing installable here offers (OpenFHE's wheels are for other Pythons,
TenSEAL has no threshold mode), would remove that trust, so a hospital in cross-site mode refuses
CKKS (`refuse_across_sites`): there pairwise masking gives the driver only sums under keys no party
holds alone, trusting only X25519, ChaCha20 and the hospitals' signatures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.config import FedwardConfig
from fedward.declarations import EVERY_LAYER_SUMMED, LAYERS_APART, Declaration
from fedward.errors import AggregationError, ConfigError
from fedward.types import Layout, SealedUpdate, Update
from fedward.privacy.hooks import AGGREGATE, AggregationHook, Ask, Trust
from fedward.keys import agree, new_private_key, open_sealed, public_bytes, seal

KEY_PURPOSE = "ckks-key"


# Requests from the driver, answered by `CkksHook.respond` at a hospital.
@dataclass(frozen=True)
class KeyOffer:
    """Send an X25519 public key (answer: its 32 raw bytes)."""


@dataclass(frozen=True)
class Deal:
    """Create the run's CKKS keys and seal them for `peers` (hospital -> X25519 public key)."""

    peers: dict[str, bytes]


@dataclass(frozen=True)
class Dealt:
    """The dealer's answer: the parameters without any key, and one sealed full context per peer."""

    public_context: bytes
    sealed: dict[str, bytes]


@dataclass(frozen=True)
class KeyDelivery:
    """Open the dealer's sealed context and keep it (answer: True)."""

    dealer: str
    dealer_public: bytes
    sealed: bytes


@dataclass(frozen=True)
class Decrypt:
    """Decrypt the summed ciphertexts (answer: their values, rounded to release_decimals)."""

    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class EncryptedPayload:
    """A hospital's scaled update: the encrypted entries in chunks of one ciphertext's slots,
    the others in the clear."""

    ciphertexts: tuple[bytes, ...]
    clear: np.ndarray  # float32, the entries outside `layers`, already scaled


@dataclass
class _Sum:
    """What `combine` has added so far in a round."""

    layout: Layout
    ciphertexts: list[ts.CKKSVector]
    clear: np.ndarray  # float64
    scale: float  # sum of the contributors' scales
    num_examples: int
    weight: float
    hospitals: list[str]


class CkksHook(AggregationHook):
    name = "encryption"
    form = "encrypted"
    reveals_individual_updates = False

    def __init__(self, config: FedwardConfig, hospital: str | None, run_id: str, trust: Trust | None = None):
        super().__init__(config, hospital, run_id, trust)
        self.encryption = config.privacy.encryption
        self.slots = self.encryption.poly_modulus_degree // 2
        # The parameters only at the driver; the full context, secret key included, at a key holder.
        self._context: ts.Context | None = None
        self._agreement_key: X25519PrivateKey | None = None  # a hospital's, until the CKKS key is dealt
        self._key_holders: list[str] = []
        self._dealer: str | None = None
        self._plan: tuple[int, dict[str, float], dict[str, float]] | None = None  # round, scales, weights
        self._layout: Layout | None = None
        self._decrypter: str | None = None

    def declaration(self) -> Declaration:
        whole = super().declaration()
        if self.encryption.layers is None:
            return whole
        return Declaration(
            whole.setting + ".layers",
            needs={**whole.needs, LAYERS_APART: "hides only the listed layers, which the others must not reveal"},
            breaks={**whole.breaks, EVERY_LAYER_SUMMED: "sends the layers outside encryption.layers in the clear"},
        )

    # -- driver ---------------------------------------------------------------------------------

    def start(self, hospitals: Sequence[str], ask: Ask) -> None:
        offers = ask({h: KeyOffer() for h in hospitals})
        dealt = None
        for dealer in sorted(offers):  # the next in line deals if the first fails
            peers = {h: key for h, key in offers.items() if h != dealer}
            dealt = ask({dealer: Deal(peers)}).get(dealer)
            if dealt is not None:
                break
        if dealt is None:
            raise AggregationError(f"CKKS key set-up: no hospital could create the keys; offers came from {sorted(offers)}")
        context = ts.context_from(dealt.public_context)
        if context.is_private():
            raise AggregationError(f"CKKS key set-up: dealer {dealer} sent the driver a secret key; the run's keys are compromised")
        deliveries = {h: KeyDelivery(dealer, offers[dealer], sealed) for h, sealed in dealt.sealed.items() if h in peers}
        received = ask(deliveries)
        holders = sorted({dealer} | {h for h, ok in received.items() if ok is True})
        if len(holders) < self.config.run.min_hospitals:
            raise AggregationError(
                f"CKKS key set-up: only {holders} hold the key, run.min_hospitals is {self.config.run.min_hospitals}; "
                f"left out: {sorted(set(hospitals) - set(holders))}"
            )
        self._context, self._dealer, self._key_holders = context, dealer, holders

    def setup(self, round: int, weights: Mapping[str, float], ask: Ask) -> Mapping[str, float]:
        if self._context is None:
            raise AggregationError(f"round {round}: the encryption hook's key set-up (start) has not run")
        planned = {h: float(w) for h, w in weights.items() if h in self._key_holders}
        total = sum(planned.values())
        if total <= 0:
            raise AggregationError(f"round {round}: no key holder with a positive weight among {sorted(weights)}")
        # Scaling before encryption makes the decrypted sum already the weighted sum.
        scales = {h: w / total for h, w in planned.items()}
        self._plan = (round, scales, planned)
        return scales

    def combine(self, round: int, received: Iterable[SealedUpdate]) -> _Sum | None:
        if self._plan is None or self._plan[0] != round:
            raise AggregationError(f"round {round}: updates arrived for a round the encryption hook did not set up")
        _, scales, weights = self._plan
        total = None
        for sealed in received:
            where = f"round {round}, {sealed.hospital}"
            form = getattr(sealed, "form", "plain")  # a plain Update has no form
            if form != self.form or not isinstance(sealed.payload, EncryptedPayload):
                raise AggregationError(f"{where}: expected an encrypted update, got form {form!r}")
            if sealed.round != round:
                raise AggregationError(f"{where}: sent an update for round {sealed.round}")
            if sealed.hospital not in scales:
                raise AggregationError(f"{where}: sent an update without this round's set-up")
            if total is not None and sealed.hospital in total.hospitals:
                raise AggregationError(f"{where}: sent a second update")
            if total is not None and sealed.layout != total.layout:
                raise AggregationError(f"{where}: layout differs from {total.hospitals[0]}'s")
            vectors = self._vectors(sealed, where)
            clear = sealed.payload.clear.astype(np.float64)
            if total is None:
                total = _Sum(sealed.layout, list(vectors), clear, scale=0.0, num_examples=0, weight=0.0, hospitals=[])
            else:
                # One chunk at a time: the driver never holds more than the sum and one ciphertext.
                for acc, vector in zip(total.ciphertexts, vectors):
                    acc.add_(vector)
                total.clear += clear
            total.scale += scales[sealed.hospital]
            total.num_examples += sealed.num_examples
            total.weight += weights[sealed.hospital]
            total.hospitals.append(sealed.hospital)
        if total is not None:
            self._layout = total.layout
        return total

    def _vectors(self, sealed: SealedUpdate, where: str):
        """The update's ciphertexts, deserialized one by one, after checking they fit its layout."""
        encrypted, clear = _split(sealed.layout, self.encryption.layers)
        chunks = sealed.payload.ciphertexts
        if len(chunks) != ceil(len(encrypted) / self.slots) or sealed.payload.clear.shape != clear.shape:
            raise AggregationError(
                f"{where}: expected {ceil(len(encrypted) / self.slots)} ciphertexts and {len(clear)} clear values, "
                f"got {len(chunks)} and {sealed.payload.clear.size}"
            )
        for k, chunk in enumerate(chunks):
            vector = ts.ckks_vector_from(self._context, chunk)
            if vector.size() != min(self.slots, len(encrypted) - k * self.slots):
                raise AggregationError(f"{where}: ciphertext {k} holds {vector.size()} values, not the layout's")
            yield vector

    def finish(self, round: int, combined: _Sum | None, dropped: Mapping[str, str], ask: Ask) -> Sequence[Update]:
        if combined is None:
            raise AggregationError(f"round {round}: no encrypted update arrived to aggregate")
        encrypted, clear = _split(combined.layout, self.encryption.layers)
        values = self._decrypt(round, Decrypt(tuple(c.serialize() for c in combined.ciphertexts)), dropped, ask)
        if values.shape != encrypted.shape:
            raise AggregationError(f"round {round}: {self._decrypter} returned {values.size} values, expected {encrypted.size}")
        total = np.empty(combined.layout.size)
        total[encrypted], total[clear] = values, combined.clear
        delta = (total / combined.scale).astype(np.float32)
        return [Update(round, AGGREGATE, delta, combined.layout, combined.num_examples, combined.weight, {})]

    def _decrypt(self, round: int, request: Decrypt, dropped: Mapping[str, str], ask: Ask) -> np.ndarray:
        """Ask one key holder, rotating by round so no hospital does every decryption."""
        holders = [h for h in self._key_holders if h not in dropped]
        if not holders:
            raise AggregationError(f"round {round}: every key holder {self._key_holders} dropped out; nobody can decrypt")
        first = round % len(holders)
        for hospital in holders[first:] + holders[:first]:
            answer = ask({hospital: request}).get(hospital)
            if answer is not None:
                self._decrypter = hospital
                return np.asarray(answer, dtype=np.float64)
        raise AggregationError(f"round {round}: no key holder decrypted the sum; asked {holders}")

    def describe(self) -> dict[str, Any]:
        e = self.encryption
        if self._layout is None:  # before the first round the model's entries are unknown
            encrypted_layers, clear_layers, per_update = "all" if e.layers is None else list(e.layers), None, None
        else:
            encrypted_layers = [n for n in self._layout.names if e.layers is None or n in e.layers]
            clear_layers = [n for n in self._layout.names if n not in encrypted_layers]
            per_update = ceil(len(_split(self._layout, e.layers)[0]) / self.slots)
        return {
            **super().describe(),
            "scheme": "CKKS",
            "library": f"tenseal {ts.__version__}",
            "poly_modulus_degree": e.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(e.coeff_mod_bit_sizes),
            "scale_bits": e.scale_bits,
            "security_level": 128,
            "encrypted_layers": encrypted_layers,
            "clear_layers": clear_layers,
            "release_decimals": e.release_decimals,
            "dealer": self._dealer,
            "key_holders": list(self._key_holders),
            "decrypting_hospital": self._decrypter,
            "ciphertexts_per_update": per_update,
        }

    # -- hospital -------------------------------------------------------------------------------

    def respond(self, round: int, request: Any) -> Any:
        refuse_across_sites(self.trust, self.hospital)
        match request:
            case KeyOffer():
                self._context, self._agreement_key = None, new_private_key()
                return public_bytes(self._agreement_key)
            case Deal(peers):
                return self._deal(peers)
            case KeyDelivery():
                return self._receive(request)
            case Decrypt(ciphertexts):
                return self._decrypt_sum(ciphertexts)
        raise AggregationError(f"{self.hospital}: the encryption hook cannot answer a {type(request).__name__}")

    def _deal(self, peers: Mapping[str, bytes]) -> Dealt:
        e = self.encryption
        # TenSEAL keeps SEAL's 128-bit security check: parameters weaker than that are refused.
        context = ts.context(ts.SCHEME_TYPE.CKKS, e.poly_modulus_degree, coeff_mod_bit_sizes=list(e.coeff_mod_bit_sizes))
        context.global_scale = 2.0**e.scale_bits
        # Only additions are computed: no relinearization or Galois keys travel.
        full = context.serialize(save_secret_key=True, save_relin_keys=False, save_galois_keys=False)
        public = context.serialize(save_public_key=False, save_secret_key=False, save_relin_keys=False, save_galois_keys=False)
        sealed = {peer: seal(self._pair_key(peer, key), full, self._associated(self.hospital, peer)) for peer, key in peers.items()}
        self._context, self._agreement_key = context, None
        return Dealt(public, sealed)

    def _receive(self, delivery: KeyDelivery) -> bool:
        if self._agreement_key is None:
            raise AggregationError(f"{self.hospital}: received a CKKS key without having offered an agreement key")
        key = self._pair_key(delivery.dealer, delivery.dealer_public)
        what = f"CKKS key from {delivery.dealer} for {self.hospital}"
        context = ts.context_from(open_sealed(key, delivery.sealed, self._associated(delivery.dealer, self.hospital), what))
        if not context.is_private():
            raise AggregationError(f"{what}: holds no secret key")
        self._context, self._agreement_key = context, None
        return True

    def _pair_key(self, peer: str, peer_public: bytes) -> bytes:
        return agree(self._agreement_key, peer_public, purpose=KEY_PURPOSE, run_id=self.run_id, round=0, pair=(self.hospital, peer))

    def _associated(self, dealer: str, recipient: str) -> bytes:
        return f"{self.run_id}|{dealer}->{recipient}".encode()

    def _decrypt_sum(self, ciphertexts: Sequence[bytes]) -> np.ndarray:
        if self._context is None or not self._context.is_private():
            raise AggregationError(f"{self.hospital}: holds no CKKS secret key for run {self.run_id}; refuses to decrypt")
        values = np.concatenate([ts.ckks_vector_from(self._context, c).decrypt() for c in ciphertexts])
        return np.round(values, self.encryption.release_decimals)

    def encode(self, update: Update, setup: float, start: str) -> SealedUpdate:
        refuse_across_sites(self.trust, self.hospital)
        if self._context is None or not self._context.is_private():
            raise AggregationError(f"round {update.round}, {update.hospital}: holds no CKKS key; it was left out of key set-up")
        encrypted, clear = _split(update.layout, self.encryption.layers)
        scaled = update.delta.astype(np.float64) * setup
        values = scaled[encrypted]
        ciphertexts = tuple(
            ts.ckks_vector(self._context, values[i : i + self.slots]).serialize() for i in range(0, len(values), self.slots)
        )
        payload = EncryptedPayload(ciphertexts, scaled[clear].astype(np.float32))
        return SealedUpdate(update.round, update.hospital, self.form, payload, update.layout, update.num_examples, update.metrics)


def refuse_across_sites(trust: Trust, hospital: str | None) -> None:
    if trust.cross_site:
        raise AggregationError(
            f"{hospital}: refuses CKKS in cross-site mode: without threshold decryption every key holder can decrypt any "
            "hospital's ciphertext the driver hands it, and a driver that deals a key of its own reads everything sent under it; "
            "use privacy.masking, whose sums no single party can unmask"
        )


def _split(layout: Layout, layers: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the flat buffer of the encrypted entries and of the entries sent in the clear."""
    unknown = sorted(set(layers or ()) - set(layout.names))
    if unknown:
        raise ConfigError(f"privacy.encryption.layers: {unknown} are not entries of the model; its entries are {list(layout.names)}")
    encrypt = np.zeros(layout.size, dtype=bool)
    for name, where in layout.slices().items():
        encrypt[where] = layers is None or name in layers
    return np.flatnonzero(encrypt), np.flatnonzero(~encrypt)
