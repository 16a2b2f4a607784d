"""Keys between two hospitals whose every message passes through the driver.

X25519 agreement gives a pair of hospitals a shared secret the driver cannot compute; HKDF-SHA256
turns it into one 256-bit key per purpose, run, round and pair, so no key (and no ChaCha20
keystream under it) is ever used for two things.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedward.errors import AggregationError

NONCE_BYTES = 12


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_key_from(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def derive_key(secret: bytes, *, purpose: str, run_id: str, round: int, parties: tuple[str, ...]) -> bytes:
    """A 256-bit key bound to what it is for; `parties` in a canonical (sorted) order."""
    info = "|".join(("fedward", purpose, run_id, str(round), *parties)).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(own: X25519PrivateKey, peer_public: bytes, *, purpose: str, run_id: str, round: int, pair: tuple[str, str]) -> bytes:
    """The key two hospitals derive from their X25519 keys; both sides get the same one."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return derive_key(shared, purpose=purpose, run_id=run_id, round=round, parties=tuple(sorted(pair)))


def keystream(key: bytes, nbytes: int) -> bytes:
    """`nbytes` of ChaCha20 output. The nonce is fixed: every key is derived for one use only."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """Authenticated encryption for one hospital's eyes; the driver only relays it."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes, what: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise AggregationError(f"{what}: failed authentication (altered in transit or sent to the wrong hospital)") from None
