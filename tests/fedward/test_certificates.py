"""`fedward certs`: an authority and per-machine certificates that name the addresses Ray binds."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from ray.util import get_node_ip_address

from fedward.certificates import write_certificates
from fedward.errors import ConfigError
from fedward.pipelines.cli import main


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def alt_names(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:
        return False
    return cert.issuer == ca.subject


def test_each_machine_gets_a_certificate_for_its_addresses_signed_by_the_consortium(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--node", "head=10.0.0.10", "--node", "hospital_a=10.0.0.11,a.example.org"]) == 0
    assert "wrote" in capsys.readouterr().out
    ca = load(tmp_path / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    head, site = load(tmp_path / "head.crt"), load(tmp_path / "hospital_a.crt")
    assert alt_names(head) == {"10.0.0.10"} and alt_names(site) == {"10.0.0.11", "a.example.org"}
    assert signed_by(head, ca) and signed_by(site, ca)
    usage = site.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert site.not_valid_after_utc <= ca.not_valid_after_utc
    for key in ("ca.key", "head.key", "hospital_a.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600, key

    # Run again with the same folder: a new hospital under the same authority, nothing overwritten.
    before = (tmp_path / "ca.key").read_bytes()
    write_certificates(tmp_path, {"hospital_b": ["10.0.0.12"]})
    assert (tmp_path / "ca.key").read_bytes() == before and signed_by(load(tmp_path / "hospital_b.crt"), ca)
    with pytest.raises(ConfigError, match="hospital_a.crt exists"):
        write_certificates(tmp_path, {"hospital_a": ["10.0.0.11"]})


def test_a_loopback_machine_is_also_named_by_the_interface_address_ray_binds(tmp_path):
    write_certificates(tmp_path, {"node": ["127.0.0.1"]})
    names = alt_names(load(tmp_path / "node.crt"))
    assert {"127.0.0.1", "localhost", get_node_ip_address()} <= names


@pytest.mark.parametrize(
    ("nodes", "says"),
    [
        ({}, "--node: name at least one"),
        ({"a/b": ["10.0.0.1"]}, "not a usable machine name"),
        ({"ca": ["10.0.0.1"]}, "not a usable machine name"),
        ({"head": []}, "give the addresses"),
        ({"head": ["10.0.0.1:6379"]}, "neither an IP address nor a host name"),
        ({"head": [" head.example.org"]}, "neither an IP address nor a host name"),
    ],
)
def test_bad_node_lists_are_refused_before_anything_is_written(tmp_path, nodes, says):
    with pytest.raises(ConfigError, match=says):
        write_certificates(tmp_path / "out", nodes)
    assert not (tmp_path / "out").exists()


def test_an_authority_whose_key_was_taken_away_is_not_silently_replaced(tmp_path):
    write_certificates(tmp_path, {"head": ["10.0.0.10"]})
    (tmp_path / "ca.key").rename(tmp_path.parent / f"{tmp_path.name}-offline.key")  # kept off the cluster, as advised
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="ca.crt is there without ca.key"):
        write_certificates(tmp_path, {"hospital_a": ["10.0.0.11"]})
    assert (tmp_path / "ca.crt").read_bytes() == before and not (tmp_path / "hospital_a.crt").exists()


def test_a_key_that_is_not_the_authoritys_is_refused(tmp_path):
    write_certificates(tmp_path / "one", {"a": ["10.0.0.1"]})
    write_certificates(tmp_path / "two", {"a": ["10.0.0.1"]})
    (tmp_path / "one" / "ca.key").write_bytes((tmp_path / "two" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="ca.key does not belong to ca.crt"):
        write_certificates(tmp_path / "one", {"b": ["10.0.0.2"]})
