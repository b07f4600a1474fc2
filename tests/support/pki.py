"""A throwaway PKI for TLS tests: CAs, server and client certificates made with ``cryptography``.

Keys are EC P-256 (fast to generate, accepted by Mosquitto 2.0 / OpenSSL 3). Every certificate is
written as PEM next to its key, so a Mosquitto config and an agent config can name the files.

    pki = Pki(tmp_path / "pki")
    server = pki.server("broker", hosts=("127.0.0.1", "localhost"))
    client = pki.client("dev1")
    expired = pki.server("old", not_after=days_ago(1))
    other = Pki(tmp_path / "other", name="Other CA")  # for "signed by a CA the client does not trust"
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = dt.timedelta(days=1)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def days_ago(days: float) -> dt.datetime:
    return now() - days * _DAY


def days_from_now(days: float) -> dt.datetime:
    return now() + days * _DAY


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key on disk (PEM)."""

    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    path.chmod(0o600)


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


class Pki:
    """One self-signed CA in ``directory`` that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "edge-agent test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(days_ago(1))
            .not_valid_after(days_from_now(30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_cert = directory / "ca.crt"
        self.ca_cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        hosts: tuple[str, ...] = (),
        client: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """A leaf certificate with CN ``name`` (and SANs ``hosts``), for a server or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or days_ago(1))
            .not_valid_after(not_after or days_from_now(30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(_san(hosts), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(cert=self.directory / f"{name}.crt", key=self.directory / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        return issued

    def server(self, name: str = "broker", *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
               not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
        """A server certificate valid for ``hosts`` (IP addresses become IP SANs)."""
        return self.issue(name, hosts=hosts, not_before=not_before, not_after=not_after)

    def client(self, name: str, *, not_after: dt.datetime | None = None) -> Issued:
        """A client certificate whose CN is ``name`` (Mosquitto's ``use_identity_as_username`` reads it)."""
        return self.issue(name, client=True, not_after=not_after)
