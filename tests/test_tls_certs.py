"""cloud/tls.py: the certificates `sqs-cloud gen-certs DIR` makes (no network, no gRPC)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud import tls


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _verify(child: x509.Certificate, parent: x509.Certificate) -> None:
    """Raises unless `parent`'s key signed `child` (ECDSA)."""
    parent.public_key().verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(child.signature_hash_algorithm))


def test_gen_certs_writes_each_role_with_private_keys(tmp_path):
    p = tls.gen_certs(tmp_path, more_clients=["edge-b"])
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["ca-key.pem", "ca.pem", "client-edge-b-key.pem", "client-edge-b.pem", "client-key.pem",
                     "client.pem", "server-key.pem", "server.pem"]
    for f in tmp_path.iterdir():
        mode = stat.S_IMODE(f.stat().st_mode)
        if "key" in f.name:
            assert mode == 0o600, f.name
            assert f.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        else:
            assert f.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    ca = x509.load_pem_x509_certificate(p.ca.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert_path in (p.server, p.client, *(c for c, _ in p.extra_clients)):
        _verify(x509.load_pem_x509_certificate(cert_path.read_bytes()), ca)


def test_server_certificate_names_and_usages(tmp_path):
    p = tls.gen_certs(tmp_path, names=["cloud.example.org", "10.1.2.3"])
    server = x509.load_pem_x509_certificate(p.server.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "cloud", "envoy", "link", "cloud.sqs-sd.svc.cluster.local", "cloud.example.org"} <= dns
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    assert ipaddress.ip_address("::1") in san.get_values_for_type(x509.IPAddress)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    client = x509.load_pem_x509_certificate(p.client.read_bytes())
    assert _cn(client) == tls.DEFAULT_CLIENT
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_second_run_keeps_the_ca(tmp_path):
    first = tls.gen_certs(tmp_path)
    ca_pem = first.ca.read_bytes()
    second = tls.gen_certs(tmp_path, client_cn="edge-2")
    assert second.ca.read_bytes() == ca_pem  # old client certificates stay trusted
    ca = x509.load_pem_x509_certificate(ca_pem)
    client = x509.load_pem_x509_certificate(second.client.read_bytes())
    _verify(client, ca)
    assert _cn(client) == "edge-2"


def test_expired_and_foreign_certificates_for_tests():
    ca, other = tls.new_ca(), tls.new_ca(cn="another CA")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    expired = tls.issue(ca, "late", days=1, not_before=past)
    assert expired.cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc)
    foreign = tls.issue(other, "stranger")
    _verify(foreign.cert, other.cert)
    with pytest.raises(Exception):
        _verify(foreign.cert, ca.cert)


def test_gen_certs_command(tmp_path, capsys):
    assert tls.main_gen_certs([str(tmp_path / "c"), "--client", "edge-a", "--san", "gw.local"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "c" / "ca.pem") in printed and str(tmp_path / "c" / "client-key.pem") in printed
    assert str(tmp_path / "c" / "ca-key.pem") not in printed  # the CA key stays where it is, unannounced
    with pytest.raises(ValueError):
        tls.gen_certs(tmp_path / "d", more_clients=["../x"])
