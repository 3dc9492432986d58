"""Certificates for the edge-cloud link, made by us (`sqs-cloud gen-certs DIR`), never committed.

    paths = gen_certs(Path("certs"))        # ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem, client-key.pem
    creds = ServerTLS(paths.server, paths.server_key, client_ca=paths.ca).credentials()

What gen_certs writes in DIR (PEM, keys mode 0600):
  ca.pem / ca-key.pem          a self-signed CA (basic constraints CA, path length 0); reused when DIR
                               already holds one, so new leaf certificates join the same trust
  server.pem / server-key.pem  the cloud's certificate, serverAuth, with the names an edge may dial:
                               SERVER_NAMES (loopback, the compose and Kubernetes service names) + extra
  client.pem / client-key.pem  an edge's certificate, clientAuth; its subject CN is the edge's identity
                               under mutual TLS (cloud/auth.py); client-NAME.pem for more edges

Keys are ECDSA P-256: a small certificate chain and cheap signatures keep the handshake short (its
bytes are part of the wire cost that sqs-bench tls measures). `issue` also makes what the tests need
and no deployment should: expired certificates, and certificates of another CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names an edge dials the cloud by: loopback, the docker-compose services (cloud, Envoy, the
# link emulator the edge connects through) and the Kubernetes Services in namespace sqs-sd.
SERVER_NAMES = (
    "localhost", "127.0.0.1", "::1",
    "cloud", "envoy", "link",
    *(f"{svc}.sqs-sd{suffix}" for svc in ("cloud", "envoy") for suffix in ("", ".svc", ".svc.cluster.local")),
)
DEFAULT_DAYS = 365
DEFAULT_CLIENT = "sqs-edge"  # the subject CN (identity) of client.pem


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, cert_path: Path, key_path: Path) -> None:
        write_private(key_path, self.key_pem())
        cert_path.write_bytes(self.cert_pem())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SQS-SD"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):  # unique, in order
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def _validity(days: float, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # clock skew
    return start, start + dt.timedelta(days=days)


def new_ca(cn: str = "SQS-SD dev CA", days: float = DEFAULT_DAYS, not_before: dt.datetime | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, not_before)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(ca: Issued, cn: str, *, server: bool = False, names: Iterable[str] = (), days: float = DEFAULT_DAYS,
          not_before: dt.datetime | None = None) -> Issued:
    """A leaf certificate signed by `ca`: serverAuth with SANs `names` (server=True), else clientAuth
    with subject CN `cn` (the edge's identity). not_before/days in the past make an expired one."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, not_before)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    names = tuple(names)
    if names:
        b = b.add_extension(_san(names), critical=False)
    return Issued(key, b.sign(ca.key, hashes.SHA256()))


def write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only (created 0600, never world-readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_TRUNC


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an ECDSA key of ours")
    return Issued(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))


@dataclass(frozen=True)
class CertPaths:
    """The files gen_certs wrote."""

    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    extra_clients: tuple[tuple[Path, Path], ...] = ()  # (cert, key) of client-NAME

    @classmethod
    def of(cls, out: Path) -> CertPaths:
        return cls(out / "ca.pem", out / "ca-key.pem", out / "server.pem", out / "server-key.pem",
                   out / "client.pem", out / "client-key.pem")


def gen_certs(out: Path, *, client_cn: str = DEFAULT_CLIENT, more_clients: Iterable[str] = (),
              names: Iterable[str] = (), days: float = DEFAULT_DAYS) -> CertPaths:
    """Write the CA (or reuse DIR's), the server certificate (SERVER_NAMES + `names`) and client
    certificates (client.pem with CN `client_cn`, client-NAME.pem for each of `more_clients`)."""
    out.mkdir(parents=True, exist_ok=True)
    p = CertPaths.of(out)
    if p.ca.exists() and p.ca_key.exists():
        ca = load_issued(p.ca, p.ca_key)
    else:
        ca = new_ca(days=max(days, DEFAULT_DAYS))
        ca.write(p.ca, p.ca_key)
    issue(ca, "sqs-cloud", server=True, names=(*SERVER_NAMES, *names), days=days).write(p.server, p.server_key)
    issue(ca, client_cn, days=days).write(p.client, p.client_key)
    extra = []
    for cn in more_clients:
        if not cn or "/" in cn or cn.startswith("."):
            raise ValueError(f"client name {cn!r} cannot name a file")
        pair = (out / f"client-{cn}.pem", out / f"client-{cn}-key.pem")
        issue(ca, cn, days=days).write(*pair)
        extra.append(pair)
    return CertPaths(p.ca, p.ca_key, p.server, p.server_key, p.client, p.client_key, tuple(extra))


@dataclass(frozen=True)
class ServerTLS:
    """sqs-cloud --tls-cert/--tls-key [--tls-client-ca]: with a client CA, mutual TLS (an edge
    without a certificate of that CA fails the handshake; its certificate's CN is its identity)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self):
        import grpc

        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)


def main_gen_certs(argv: list[str]) -> int:
    """sqs-cloud gen-certs DIR [--client CN] [--more-clients NAME ...] [--san NAME ...] [--days D]"""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="sqs-cloud gen-certs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", metavar="DIR", type=Path)
    ap.add_argument("--client", default=DEFAULT_CLIENT, metavar="CN", help="subject CN (identity) of client.pem")
    ap.add_argument("--more-clients", nargs="*", default=[], metavar="NAME", help="also client-NAME.pem, CN NAME")
    ap.add_argument("--san", nargs="*", default=[], metavar="NAME", help="more DNS names / IPs of the server")
    ap.add_argument("--days", type=float, default=DEFAULT_DAYS, help="validity of the leaf certificates")
    a = ap.parse_args(argv)
    if not a.days > 0:
        ap.error("--days must be > 0")
    try:
        paths = gen_certs(a.dir, client_cn=a.client, more_clients=a.more_clients, names=a.san, days=a.days)
    except (OSError, ValueError) as exc:
        print(f"sqs-cloud gen-certs: error: {exc}", file=sys.stderr)
        return 2
    for path in (paths.ca, paths.server, paths.server_key, paths.client, paths.client_key,
                 *(p for pair in paths.extra_clients for p in pair)):
        print(path)
    return 0
