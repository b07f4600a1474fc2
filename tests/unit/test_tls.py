"""TLS failures in an operator's words: the pure error → reason table, the hints, the client context's file checks."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import get_args

import pytest

from agent.errors import ConfigError
from agent.transport.mqtt import Disconnected
from agent.transport.tls import HINTS, TlsFailure, TlsReason, classify, client_context, credential_key, is_loopback
from tests.support.pki import Pki


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_code = code
    exc.verify_message = message
    return exc


def ssl_error(reason: str, text: str = "", cls: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    exc = cls(1, f"[SSL: {reason}] {text or reason.lower()} (_ssl.c:1006)")
    exc.reason = reason
    exc.library = "SSL"
    return exc


CASES = [
    # (error, phase, expected reason or None) — codes and reasons as OpenSSL 3 / Python 3.11 report them.
    (verify_error(10, "certificate has expired"), "handshake", "certificate_expired"),
    (verify_error(9, "certificate is not yet valid"), "handshake", "certificate_not_yet_valid"),
    (verify_error(20, "unable to get local issuer certificate"), "handshake", "unknown_ca"),
    (verify_error(18, "self-signed certificate"), "handshake", "unknown_ca"),
    (verify_error(19, "self-signed certificate in certificate chain"), "handshake", "unknown_ca"),
    (verify_error(21, "unable to verify the first certificate"), "handshake", "unknown_ca"),
    (verify_error(62, "Hostname mismatch, certificate is not valid for 'localhost'."), "handshake",
     "hostname_mismatch"),
    (verify_error(64, "IP address mismatch, certificate is not valid for '127.0.0.1'."), "handshake",
     "hostname_mismatch"),
    (verify_error(26, "unsuitable certificate purpose"), "handshake", "certificate_invalid"),
    (verify_error(7, "certificate signature failure"), "handshake", "certificate_invalid"),
    (ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "session", "client_cert_rejected"),
    (ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "session", "client_cert_rejected"),
    (ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), "handshake", "client_cert_rejected"),
    (ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED"), "session", "client_cert_rejected"),
    (ssl_error("WRONG_VERSION_NUMBER"), "handshake", "not_tls"),
    (ssl_error("RECORD_LAYER_FAILURE"), "handshake", "not_tls"),
    (ssl_error("PACKET_LENGTH_TOO_LONG"), "handshake", "not_tls"),
    (ConnectionResetError(104, "Connection reset by peer"), "handshake", "not_tls"),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "handshake", "not_tls"),
    (BrokenPipeError(32, "Broken pipe"), "handshake", "not_tls"),
    (ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), "handshake", "handshake_failed"),
    (ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), "handshake", "handshake_failed"),
    (TimeoutError("_ssl.c:980: The handshake operation timed out"), "handshake", "handshake_failed"),
    # Not about TLS: the broker is unreachable or the session dropped; reported as such, not as TLS.
    (ConnectionRefusedError(111, "Connection refused"), "handshake", None),
    (OSError(113, "No route to host"), "handshake", None),
    (ConnectionResetError(104, "Connection reset by peer"), "session", None),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "session", None),
    (ssl_error("WRONG_VERSION_NUMBER"), "session", None),
    (ssl_error("DECRYPTION_FAILED_OR_BAD_RECORD_MAC"), "session", None),
]


def case_id(exc: BaseException, phase: str) -> str:
    detail = getattr(exc, "verify_code", None) or getattr(exc, "reason", "")
    return f"{type(exc).__name__}-{detail}-{phase}"


@pytest.mark.parametrize(("exc", "phase", "expected"), CASES, ids=[case_id(c[0], c[1]) for c in CASES])
def test_classify(exc: BaseException, phase: str, expected: str | None) -> None:
    """Each OpenSSL verification code, alert and socket error maps to one stable reason (or to none)."""
    failure = classify(exc, phase)  # type: ignore[arg-type]
    assert (failure.reason if failure else None) == expected


def test_detail_keeps_what_openssl_said_without_the_c_source_location() -> None:
    """The detail is OpenSSL's own words (for a search engine), without '(_ssl.c:NNN)'."""
    failure = classify(ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED", "tlsv13 alert certificate required"), "session")
    assert failure == TlsFailure("client_cert_rejected",
                                 "the broker sent: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
                                 "required")
    expired = classify(verify_error(10, "certificate has expired"), "handshake")
    assert expired is not None
    assert expired.detail == "certificate verify failed: certificate has expired"


def test_every_reason_has_a_hint_and_the_status_line_names_it() -> None:
    """Every reason has a fix; the STATUS= line says TLS, the broker, the reason, and that plaintext is never tried."""
    assert set(HINTS) == set(get_args(TlsReason))
    for reason in get_args(TlsReason):
        line = Disconnected("tls", tls=TlsFailure(reason, "x"), broker="b:8883").status_line
        assert line.startswith(f"TLS to broker b:8883 failed: {reason} (")
        assert "never without TLS" in line
    assert Disconnected("connection lost").status_line == "broker unreachable; reconnecting"


def test_client_context_verifies_the_server_and_its_name(tmp_path: Path) -> None:
    """The context requires a certificate chain to the CA and checks the host name; TLS 1.2 at least."""
    pki = Pki(tmp_path)
    context = client_context(pki.ca_cert, None, None)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"ca_file": "missing.crt"}, "mqtt.ca_file: {d}/missing.crt does not exist"),
        ({"ca_file": "not-pem.crt"}, "mqtt.ca_file: {d}/not-pem.crt holds no usable PEM CA certificate"),
        ({"cert_file": "dev1.crt", "key_file": "other.key"}, "mqtt.cert_file: cannot use {d}/dev1.crt with key "
         "{d}/other.key"),
        ({"cert_file": "dev1.crt"}, "mqtt.cert_file: cannot use {d}/dev1.crt with no key_file and no credential "
         "tls_key"),
        ({"key_file": "dev1.key"}, "mqtt.key_file is set but mqtt.cert_file is not"),
        ({"ca_file": "subdir"}, "mqtt.ca_file: {d}/subdir is a directory"),
    ],
    ids=["missing", "not-pem", "wrong-key", "no-key", "key-only", "directory"],
)
def test_local_file_problems_are_config_errors_naming_the_key(tmp_path: Path, files: dict[str, str],
                                                              message: str) -> None:
    """A CA, certificate or key this device cannot use is a configuration error at start (exit 78), not a retry."""
    pki = Pki(tmp_path)
    pki.client("dev1")
    pki.client("other")
    (tmp_path / "not-pem.crt").write_text("hello\n")
    (tmp_path / "subdir").mkdir()
    paths = {k: tmp_path / v for k, v in files.items()}
    with pytest.raises(ConfigError) as info:
        client_context(paths.get("ca_file", pki.ca_cert), paths.get("cert_file"), paths.get("key_file"))
    assert str(info.value).startswith(message.format(d=tmp_path))


def test_the_key_comes_from_the_tls_key_credential_only_with_a_certificate(tmp_path: Path) -> None:
    """key_file wins; else $CREDENTIALS_DIRECTORY/tls_key when a client certificate is configured."""
    creds = tmp_path / "creds"
    creds.mkdir()
    cert, key = tmp_path / "c.crt", tmp_path / "k.key"
    assert credential_key(cert, None, creds) is None  # no credential file
    (creds / "tls_key").write_text("k")
    assert credential_key(cert, None, creds) == creds / "tls_key"
    assert credential_key(cert, key, creds) == key
    assert credential_key(None, None, creds) is None
    assert credential_key(cert, None, None) is None


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                                ("127.9.9.9", True), ("broker.lan", False), ("10.0.0.5", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    """Plaintext is only warned about when it leaves the machine."""
    assert is_loopback(host) is loopback
