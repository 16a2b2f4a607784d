"""TLS certificates for a consortium's Ray cluster: one certificate authority, a key pair per machine.

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
import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedward.errors import ConfigError

CA_DAYS = 5 * 365
NODE_DAYS = 365  # renewed yearly: a node whose certificate lapses drops out of the cluster's TLS
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
        if not name or not name.replace("_", "").replace("-", "").isalnum() or name == "ca":
            raise ConfigError(f"--node: {name!r} is not a usable machine name; use letters, digits, '-' or '_' (not 'ca')")
        if not addresses:
            raise ConfigError(f"--node {name}: give the addresses other machines reach it at")
        for address in addresses:
            if not _is_ip(address) and not HOST_NAME.match(address):
                raise ConfigError(f"--node {name}: {address!r} is neither an IP address nor a host name (no ports, no spaces)")
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
        cert = _node_certificate(name, _names_for(addresses), key, ca_key, ca_cert)
        written += [_write_key(out / f"{name}.key", key), _write_cert(out / f"{name}.crt", cert)]
    return written


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


def _node_certificate(name: str, alt_names, key, ca_key, ca_cert: x509.Certificate) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    ends = min(now + dt.timedelta(days=NODE_DAYS), ca_cert.not_valid_after_utc)  # never past its authority
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(ends)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
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
