"""A hospital's own audit log: what it released, to whom, under which protection.

One JSON line per release, appended and synced in the hospital's work area (`audit.jsonl`) before
the release leaves: when, the run and round, what left (as fedward/outflows.py names it), to
whom, under which protection, and the digest and size of what left as its protocol message
(`fedward.wire.digest`), which the driver can compute from what it received. Each line holds the
digest of the line before it, so a removed, inserted or altered line breaks the chain; in
cross-site mode each line is also signed with the hospital's certified key. Its operator reads and
checks it alone, with `fedward audit LOG [--certificate CRT]`: nothing of the consortium is needed.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedward import wire
from fedward.certificates import Identity
from fedward.errors import ConfigError
from fedward.files import append_lines

AUDIT_LOG = "audit.jsonl"
GENESIS = "0" * 64  # the "line before" the first one


@dataclass(frozen=True)
class Release:
    run: str
    round: int | None
    what: str
    to: str
    protection: str


class AuditLog:
    def __init__(self, path: Path, hospital: str, identity: Identity | None = None):
        self.path, self.hospital, self.identity = path, hospital, identity
        self._last: str | None = None  # the digest of the last line, once read

    def record(self, release: Release, payload: Any) -> None:
        """Append the entry for `payload`, about to leave as `release`."""
        digest, size = wire.digest(payload)
        entry = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(),
            "hospital": self.hospital,
            "run": release.run,
            "round": release.round,
            "what": release.what,
            "to": release.to,
            "protection": release.protection,
            "bytes": size,
            "blake3": digest,
            "previous": self._previous(),
        }
        if self.identity is not None:
            entry["signature"] = self.identity.sign(_signed(entry)).hex()
        line = json.dumps(entry, sort_keys=True)
        append_lines(self.path, [line])
        self._last = _digest(line)

    def _previous(self) -> str:
        if self._last is None:
            self._last = GENESIS
            for line in _lines(self.path):
                self._last = _digest(line)
        return self._last


def releases(what: str) -> Callable:
    """Marks a hospital method whose result leaves the hospital (`what`, as fedward/outflows.py
    names it): the result is recorded in the hospital's audit log before it is returned."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def audited(hospital, *args, **kwargs):
            result = method(hospital, *args, **kwargs)
            hospital.record_release(what, args, result)
            return result

        return audited

    return wrap


def read(path: Path, certificate: bytes | None = None) -> list[dict]:
    """The log's entries, each checked: the chain unbroken and, given the hospital's certificate,
    every line signed by its key. A broken line is named by its number."""
    key = x509.load_pem_x509_certificate(certificate).public_key() if certificate else None
    previous, entries = GENESIS, []
    for n, line in enumerate(_lines(path), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}, line {n}: not an audit entry") from None
        if entry.get("previous") != previous:
            raise ConfigError(f"{path}, line {n}: the chain is broken: the line before it was removed, altered or inserted")
        if key is not None:
            try:
                key.verify(bytes.fromhex(entry.get("signature", "")), _signed(entry), ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, ValueError):
                raise ConfigError(f"{path}, line {n}: the signature is not the hospital's: the line was altered or written by another") from None
        previous = _digest(line)
        entries.append(entry)
    return entries


def _signed(entry: dict) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != "signature"}, sort_keys=True).encode()


def _digest(line: str) -> str:
    return blake3(line.encode()).hexdigest()


def _lines(path: Path) -> Iterator[str]:
    if path.is_file():
        yield from (line for line in path.read_text().splitlines() if line)
