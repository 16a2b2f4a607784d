"""The consortium's certificate authority: TLS for one Ray cluster, and identities for cross-site mode.

For one Ray cluster (one trust domain) the operator makes every machine's key and certificate;
for cross-site mode each hospital makes its own key and a request, the authority signs it and
revokes certificates in a revocation list every hospital checks its peers against (the second
half of this module; docs/deploy.md).

Ray encrypts its gRPC traffic between nodes when every process has RAY_USE_TLS=1 with
RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY and RAY_TLS_CA_CERT, and then accepts only peers whose
certificate the consortium's authority signed. A certificate must name every address its node is
reached at. Ray binds to the machine's interface address even when told 127.0.0.1, so a machine
given as a loopback address also gets its interface addresses and host name.

    fedward certs --out certs --node head=10.0.0.10 --node hospital_a=10.0.0.11,a.example.org

writes certs/ca.crt and certs/ca.key (the authority: keep the key off the cluster), and
certs/head.crt, certs/head.key, ... for each machine. Run again with the same --out (holding the
authority's key) to add a machine, or to renew one whose certificate nears its end (NODE_DAYS):
remove its two files first. A loopback address brings in the interfaces of the machine this runs
on, so give a remote machine its real addresses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedward.errors import ConfigError
from fedward.files import atomic_write, atomic_write_json

CA_DAYS = 5 * 365
NODE_DAYS = 365  # renewed yearly: a node whose certificate lapses drops out of the cluster's TLS
CRL_DAYS = 30  # a hospital refuses peers once the revocation list is older: the authority reissues it
ISSUED = "issued.json"  # the authority's record of what it signed: serial -> name, end, revocation
CA_NAME = "fedward consortium CA"
# A host name: dot-separated labels of letters, digits and inner hyphens.
HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")


def write_certificates(out: Path, nodes: Mapping[str, Sequence[str]]) -> list[Path]:
    """Sign a certificate for each node (name -> its addresses) under the authority in `out`,
    created there first if absent. Returns the files written; never overwrites a node's files."""
    out = Path(out)
    if not nodes:
        raise ConfigError("--node: name at least one machine, as NAME=ADDRESS[,ADDRESS...]")
    for name, addresses in nodes.items():
        _check_node(name, addresses, "--node")
        taken = [p for p in (out / f"{name}.crt", out / f"{name}.key") if p.exists()]
        if taken:
            raise ConfigError(f"--node {name}: {taken[0]} exists; remove it to issue a new certificate")
    if (out / "ca.crt").exists() and not (out / "ca.key").exists():
        raise ConfigError(f"{out}: ca.crt is there without ca.key; bring the authority's key back to sign with it (a new authority would not be trusted by the cluster)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if (out / "ca.key").exists():
        ca_key, ca_cert = _load_authority(out)
    else:
        ca_key, ca_cert = _new_authority()
        written += [_write_key(out / "ca.key", ca_key), _write_cert(out / "ca.crt", ca_cert)]
    for name, addresses in nodes.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _node_certificate(name, _names_for(addresses), key.public_key(), ca_key, ca_cert)
        written += [_write_key(out / f"{name}.key", key), _write_cert(out / f"{name}.crt", cert)]
    return written


def _check_node(name: str, addresses: Sequence[str], option: str) -> None:
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name == "ca":
        raise ConfigError(f"{option}: {name!r} is not a usable machine name; use letters, digits, '-' or '_' (not 'ca')")
    if not addresses:
        raise ConfigError(f"{option} {name}: give the addresses other machines reach it at")
    for address in addresses:
        if not _is_ip(address) and not HOST_NAME.match(address):
            raise ConfigError(f"{option} {name}: {address!r} is neither an IP address nor a host name (no ports, no spaces)")


def interface_addresses() -> list[str]:
    """The addresses Ray binds on this machine: the one it picks for its node, and the host name's."""
    from ray.util import get_node_ip_address

    found = {get_node_ip_address()}
    try:
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    except OSError:
        pass
    return sorted(found)


def _names_for(addresses: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names for a node's addresses (IPs or DNS names)."""
    wanted = list(dict.fromkeys(addresses))
    if any(_is_loopback(a) for a in wanted):
        wanted += ["localhost", socket.gethostname(), *interface_addresses()]
    names: list[x509.GeneralName] = []
    for address in dict.fromkeys(wanted):
        names.append(x509.IPAddress(ipaddress.ip_address(address)) if _is_ip(address) else x509.DNSName(address))
    return names


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _new_authority() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _load_authority(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{out}: ca.key and ca.crt must be the authority this command wrote ({e})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(f"{out}: ca.key does not belong to ca.crt")
    try:
        is_authority = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_authority = False
    if not is_authority:
        raise ConfigError(f"{out}: ca.crt is not a certificate authority's")
    return key, cert


def _node_certificate(name: str, alt_names, public_key, ca_key, ca_cert: x509.Certificate, days: int = NODE_DAYS) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    ends = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)  # never past its authority
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(ends)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # Every Ray process is both a gRPC server and a client of the others.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _write_key(path: Path, key) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(descriptor, "wb") as f:
        f.write(pem)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# --- cross-site identities: each hospital makes its own key; the authority signs and revokes ---


class PeerRefused(Exception):
    """A peer's certificate is not one this consortium's authority vouches for now; says why."""


def create_authority(out: Path) -> list[Path]:
    """The consortium's authority for cross-site mode: ca.key (keep it off every hospital's
    machines), ca.crt and an empty revocation list (crl.pem) for the hospitals, issued.json."""
    out = Path(out)
    if (out / "ca.key").exists() or (out / "ca.crt").exists():
        raise ConfigError(f"{out}: an authority is there already; a new one would not be trusted by the hospitals")
    out.mkdir(parents=True, exist_ok=True)
    key, cert = _new_authority()
    written = [_write_key(out / "ca.key", key), _write_cert(out / "ca.crt", cert)]
    atomic_write_json(out / ISSUED, {})
    return [*written, out / ISSUED, write_revocation_list(out, key, cert, {})]


def write_request(out: Path, name: str, addresses: Sequence[str], rotate: bool = False) -> tuple[Path, Path]:
    """At a hospital: its own private key, which never leaves `out`, and a certificate request
    naming it and the addresses it is reached at (NAME.key, NAME.csr). With `rotate`, a key and
    certificate already there are kept as NAME.old.key and NAME.old.crt until the new certificate
    is in place; the authority then revokes the old one."""
    out = Path(out)
    _check_node(name, addresses, "--name")
    key_path, request_path = out / f"{name}.key", out / f"{name}.csr"
    if key_path.exists():
        if not rotate:
            raise ConfigError(f"{key_path} exists: this hospital has a key; pass --rotate for a new one (the old is kept as {name}.old.key)")
        for suffix in (".key", ".crt"):
            if (out / f"{name}{suffix}").exists():
                os.replace(out / f"{name}{suffix}", out / f"{name}.old{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName(_names_for(addresses)), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    request_path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return key_path, request_path


def sign_request(authority: Path, request_path: Path, days: int = NODE_DAYS) -> Path:
    """At the authority: the certificate for a hospital's request (NAME.crt beside it), its key
    never seen, and a record of it in the authority's `issued.json`."""
    authority, request_path = Path(authority), Path(request_path)
    ca_key, ca_cert = _load_authority(authority)
    try:
        request = x509.load_pem_x509_csr(request_path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{request_path}: not a certificate request ({e})") from None
    if not request.is_signature_valid:
        raise ConfigError(f"{request_path}: the request is not signed by the key it names")
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        alt_names = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ConfigError(f"{request_path}: the request names no addresses (subjectAltName)") from None
    if len(names) != 1:
        raise ConfigError(f"{request_path}: the request must name one hospital (commonName)")
    name = names[0].value
    _check_node(name, [str(getattr(n, "value", "")) for n in alt_names], "the request's name")
    cert = _node_certificate(name, list(alt_names), request.public_key(), ca_key, ca_cert, days)
    issued = _issued(authority)
    issued[format(cert.serial_number, "x")] = {
        "name": name, "not_after": cert.not_valid_after_utc.isoformat(), "revoked": None,
    }
    atomic_write_json(authority / ISSUED, issued)
    return _write_cert(request_path.with_suffix(".crt"), cert)


def revoke(authority: Path, certificate: Path) -> Path:
    """At the authority: revoke a certificate it issued and write the revocation list every
    hospital checks its peers against (crl.pem); returns its path."""
    authority = Path(authority)
    ca_key, ca_cert = _load_authority(authority)
    try:
        cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{certificate}: not a certificate ({e})") from None
    issued, serial = _issued(authority), format(cert.serial_number, "x")
    if serial not in issued:
        raise ConfigError(f"{certificate}: this authority did not issue it (serial {serial})")
    issued[serial]["revoked"] = issued[serial]["revoked"] or dt.datetime.now(dt.timezone.utc).isoformat()
    atomic_write_json(authority / ISSUED, issued)
    return write_revocation_list(authority, ca_key, ca_cert, issued)


def write_revocation_list(authority: Path, ca_key, ca_cert: x509.Certificate, issued: Mapping[str, dict]) -> Path:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=CRL_DAYS))
    )
    for serial, record in sorted(issued.items()):
        if record["revoked"]:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(dt.datetime.fromisoformat(record["revoked"])).build()
            )
    crl = builder.sign(ca_key, hashes.SHA256())
    path = authority / "crl.pem"
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def verify_peer(pem: bytes, authority: x509.Certificate, revoked: x509.CertificateRevocationList, now: dt.datetime | None = None) -> str:
    """The name of the hospital a peer's certificate vouches for, or PeerRefused naming why: not
    issued by this consortium's authority, outside its validity, or revoked."""
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise PeerRefused("the peer's certificate cannot be read") from None
    verifier = PolicyBuilder().store(Store([authority])).time(now).build_client_verifier()
    try:
        verifier.verify(cert, [])
    except VerificationError as e:
        raise PeerRefused(f"the peer's certificate is not one this consortium's authority vouches for now: {e}") from None
    if not revoked.is_signature_valid(authority.public_key()) or revoked.issuer != authority.subject:
        raise PeerRefused("the revocation list is not this authority's")
    if revoked.next_update_utc is not None and revoked.next_update_utc < now:
        raise PeerRefused(f"the revocation list expired on {revoked.next_update_utc:%Y-%m-%d}: ask the authority for a new crl.pem")
    if (entry := revoked.get_revoked_certificate_by_serial_number(cert.serial_number)) is not None:
        raise PeerRefused(f"the peer's certificate (serial {cert.serial_number:x}) was revoked on {entry.revocation_date_utc:%Y-%m-%d}")
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@dataclass
class Identity:
    """A party's own credentials in a folder: NAME.key (made there, never sent), NAME.crt (signed
    by the authority), and the authority's ca.crt and crl.pem. It signs what the party says, and
    vouches for a peer's certificate and signatures under its own authority and revocation list."""

    folder: Path
    name: str
    _revocations: tuple[int, x509.CertificateRevocationList] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        for path in (self.key_file, self.certificate_file, self.authority_file, self.revocations_file):
            if not path.is_file():
                raise ConfigError(f"{path} is missing: cross-site mode needs {self.name}'s key and certificate, and the authority's ca.crt and crl.pem")
        self.authority = x509.load_pem_x509_certificate(self.authority_file.read_bytes())
        self.certificate = self.certificate_file.read_bytes()

    def __getstate__(self) -> dict:
        # Keys and certificates do not pickle: a hospital put to sleep reads them again on waking.
        return {"folder": self.folder, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.folder, self.name, self._revocations = state["folder"], state["name"], None
        self.__post_init__()

    @property
    def key_file(self) -> Path:
        return self.folder / f"{self.name}.key"

    @property
    def certificate_file(self) -> Path:
        return self.folder / f"{self.name}.crt"

    @property
    def authority_file(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def revocations_file(self) -> Path:
        return self.folder / "crl.pem"

    @cached_property
    def _key(self) -> ec.EllipticCurvePrivateKey:
        return serialization.load_pem_private_key(self.key_file.read_bytes(), None)

    def revocations(self) -> x509.CertificateRevocationList:
        """The revocation list on disk, re-read whenever the authority's new one replaces it."""
        changed = os.stat(self.revocations_file).st_mtime_ns
        if self._revocations is None or self._revocations[0] != changed:
            self._revocations = changed, x509.load_pem_x509_crl(self.revocations_file.read_bytes())
        return self._revocations[1]

    def vouch(self, pem: bytes) -> str:
        """The name a peer's certificate vouches for now, or PeerRefused naming why not."""
        return verify_peer(pem, self.authority, self.revocations())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))

    def check_signature(self, pem: bytes, signature: bytes, message: bytes, signer: str) -> None:
        """PeerRefused unless `signer`'s certificate `pem` is vouched for and signed `message`."""
        if (named := self.vouch(pem)) != signer:
            raise PeerRefused(f"the certificate sent as {signer}'s names {named!r}")
        try:
            x509.load_pem_x509_certificate(pem).public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            raise PeerRefused(f"{signer}'s signature does not match what it is said to have signed") from None


def _issued(authority: Path) -> dict[str, dict]:
    path = authority / ISSUED
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); it lists what this authority issued") from None
