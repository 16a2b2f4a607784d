"""Cross-site identities: each hospital makes its own key, the consortium's authority signs and
revokes, and a hospital's service over mutual TLS admits only callers the authority vouches for."""

from __future__ import annotations

import datetime as dt
import shutil
import stat

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedward.certificates import Identity, PeerRefused, create_authority, revoke, sign_request, verify_peer, write_request
from fedward.channel import call, connect, serve
from fedward.errors import ConfigError
from tests.consortium import consortium as enrolled, enrol, publish

TIMEOUT_S = 10


@pytest.fixture
def consortium(tmp_path):
    return enrolled(tmp_path, ["hospital_a", "hospital_b"])


def test_a_hospitals_key_never_leaves_it_and_its_certificate_names_it(consortium, tmp_path):
    authority, sites = consortium
    assert not list(authority.rglob("*hospital_a.key"))
    key = sites["hospital_a"].key_file
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(sites["hospital_a"].certificate_file.read_bytes())
    assert cert.public_key().public_numbers() == serialization.load_pem_private_key(key.read_bytes(), None).public_key().public_numbers()
    assert verify_peer(sites["hospital_a"].certificate_file.read_bytes(), sites["hospital_b"].authority, sites["hospital_b"].revocations()) == "hospital_a"
    with pytest.raises(ConfigError, match="an authority is there already"):
        create_authority(authority)
    with pytest.raises(ConfigError, match="--rotate"):
        write_request(tmp_path / "hospital_a", "hospital_a", ["127.0.0.1"])


def test_a_certificate_of_another_authority_an_expired_or_revoked_one_or_a_stale_list_is_refused(consortium, tmp_path):
    authority, sites = consortium
    b = sites["hospital_b"]
    a_pem = sites["hospital_a"].certificate_file.read_bytes()

    other = tmp_path / "other"
    create_authority(other)
    stranger = enrol(other, tmp_path / "stranger", "hospital_a")  # the same name, another authority
    with pytest.raises(PeerRefused, match="not one this consortium's authority vouches for"):
        verify_peer(stranger.certificate_file.read_bytes(), b.authority, b.revocations())
    with pytest.raises(PeerRefused, match="not one this consortium's authority vouches for"):
        verify_peer(a_pem, b.authority, b.revocations(), now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400))
    with pytest.raises(PeerRefused, match="revocation list expired"):
        verify_peer(a_pem, b.authority, b.revocations(), now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=40))
    with pytest.raises(PeerRefused, match="not this authority's"):
        verify_peer(a_pem, b.authority, x509.load_pem_x509_crl((other / "crl.pem").read_bytes()))

    revoke(authority, sites["hospital_a"].certificate_file)
    publish(authority, b.folder)
    with pytest.raises(PeerRefused, match="revoked on"):
        verify_peer(a_pem, b.authority, b.revocations())
    with pytest.raises(ConfigError, match="did not issue it"):
        revoke(authority, stranger.certificate_file)


def test_a_rotated_key_gets_a_new_certificate_and_the_old_one_is_revoked(consortium, tmp_path):
    authority, sites = consortium
    site = tmp_path / "hospital_a"
    old = site.joinpath("hospital_a.crt").read_bytes()
    _, request = write_request(site, "hospital_a", ["127.0.0.1"], rotate=True)
    assert (site / "hospital_a.old.key").is_file() and (site / "hospital_a.old.crt").read_bytes() == old
    assert sign_request(authority, request) == site / "hospital_a.crt"  # written beside the request
    revoke(authority, site / "hospital_a.old.crt")
    b = sites["hospital_b"]
    publish(authority, b.folder)
    assert verify_peer((site / "hospital_a.crt").read_bytes(), b.authority, b.revocations()) == "hospital_a"
    with pytest.raises(PeerRefused, match="revoked"):
        verify_peer(old, b.authority, b.revocations())


def test_the_service_admits_only_callers_the_authority_vouches_for(consortium, tmp_path):
    authority, sites = consortium
    a, b = sites["hospital_a"], sites["hospital_b"]
    server, port = serve(a, "127.0.0.1:0", {"Describe": lambda message, caller: {"hospital": a.name, "caller": caller, "echo": message}})
    target = f"127.0.0.1:{port}"
    try:
        with connect(b, target, "127.0.0.1") as channel:
            assert call(channel, "Describe", {"x": 1}, TIMEOUT_S) == {"hospital": "hospital_a", "caller": "hospital_b", "echo": {"x": 1}}

        # No certificate at all: the handshake fails.
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(a.authority_file.read_bytes()),
                                 options=[("grpc.ssl_target_name_override", "127.0.0.1")]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, "Describe", {}, TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # Another authority's certificate: the handshake fails.
        other = tmp_path / "other"
        create_authority(other)
        stranger = enrol(other, tmp_path / "stranger", "hospital_b")
        shutil.copy(a.authority_file, stranger.authority_file)  # it trusts our authority, we do not trust its
        with connect(Identity(stranger.folder, "hospital_b"), target, "127.0.0.1") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, "Describe", {}, TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # Revoked: the handshake passes, the call is refused with the reason.
        revoke(authority, b.certificate_file)
        publish(authority, a.folder)
        with connect(b, target, "127.0.0.1") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, "Describe", {}, TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in refused.value.details()
    finally:
        server.stop(None)


def test_the_commands_enrol_and_revoke_a_hospital(tmp_path, capsys):
    from fedward.pipelines.cli import main

    authority, site = tmp_path / "authority", tmp_path / "site"
    assert main(["authority", "init", str(authority)]) == 0
    assert main(["request", "--name", "hospital_c", "--address", "127.0.0.1,c.example.org", "--out", str(site)]) == 0
    assert main(["authority", "sign", str(authority), str(site / "hospital_c.csr"), "--days", "30"]) == 0
    cert = x509.load_pem_x509_certificate((site / "hospital_c.crt").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < dt.timedelta(days=31)
    assert "c.example.org" in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert main(["authority", "revoke", str(authority), str(site / "hospital_c.crt")]) == 0
    crl = x509.load_pem_x509_crl((authority / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert main(["authority", "sign", str(authority)]) == 2
    assert "name the request" in capsys.readouterr().err
