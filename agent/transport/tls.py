"""TLS to the broker: the client context, and why a TLS connection failed, in an operator's words.

paho connects, handshakes and retries on its own thread and swallows the exception that made an
attempt fail (``on_connect_fail`` gets no argument). So the context built here makes sockets that
remember their last TLS or socket error (:class:`TlsContext`), and :func:`classify` turns that error
into one stable reason with a fix. :func:`classify` is pure and table-tested; the rest is thin.

There is no fallback: with ``tls = true`` every attempt is a verified TLS handshake (CA, expiry,
host name), and a failure is reported and retried with backoff, never downgraded to plaintext.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.errors import ConfigError
from agent.permissions import denied

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

TlsReason = Literal[
    "certificate_expired",
    "certificate_not_yet_valid",
    "unknown_ca",
    "hostname_mismatch",
    "certificate_invalid",
    "not_tls",
    "client_cert_rejected",
    "handshake_failed",
]
Phase = Literal["handshake", "session"]

HINTS: dict[TlsReason, str] = {
    "certificate_expired": "the broker's certificate (or a CA above it) has expired: renew it on the broker; "
    "if it should still be valid, check this device's clock (timedatectl)",
    "certificate_not_yet_valid": "the broker's certificate is not valid yet: this device's clock is probably "
    "wrong (no RTC, NTP not synchronised yet): check timedatectl",
    "unknown_ca": "the broker's certificate is not signed by a CA in ca_file: set ca_file to the CA that signed "
    "the broker's certificate (without ca_file the system's CA store is used)",
    "hostname_mismatch": "the broker's certificate does not name the host this device connects to: set host to "
    "a name or address in the certificate's subjectAltName, or reissue the certificate with it",
    "certificate_invalid": "the broker's certificate was refused (see detail): reissue it as a TLS server "
    "certificate signed by the CA in ca_file",
    "not_tls": "the server did not answer with TLS: this port is probably a plain MQTT listener; use the "
    "broker's TLS port (usually 8883). The agent never falls back to plaintext",
    "client_cert_rejected": "the broker refused this device's client certificate (none sent, expired, or not "
    "signed by a CA the broker's cafile trusts): set cert_file and its key (systemd credential tls_key)",
    "handshake_failed": "the TLS handshake failed (see detail): check that the broker offers TLS 1.2 or newer "
    "and a certificate this device can use",
}

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) that name a cause an operator can act on.
_VERIFY_CODES: dict[int, TlsReason] = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "certificate_not_yet_valid",
    10: "certificate_expired",
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    62: "hostname_mismatch",
    64: "hostname_mismatch",  # IP address mismatch
}

# Alerts the *server* sent about our certificate (OpenSSL reason strings for received alerts).
_CLIENT_CERT_ALERTS = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV1_ALERT_ACCESS_DENIED",
})

# What OpenSSL says when the other side's bytes are not TLS records at all.
_NOT_TLS_REASONS = frozenset({
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "UNKNOWN_PROTOCOL",
    "HTTP_REQUEST",
    "UNEXPECTED_EOF_WHILE_READING",
})


@dataclass(frozen=True, slots=True)
class TlsFailure:
    """Why a TLS connection to a broker could not be set up: a stable ``reason``, OpenSSL's ``detail``."""

    reason: TlsReason
    detail: str

    @property
    def hint(self) -> str:
        """What the operator should do about it."""
        return HINTS[self.reason]


def classify(exc: BaseException, phase: Phase) -> TlsFailure | None:
    """Pure: the TLS reason for an error raised while connecting (``phase`` = where it was raised).

    None when the error says nothing about TLS (refused, unreachable, a dropped session): the
    caller treats those as the broker being unreachable.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verification_failure(exc)
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return _protocol_failure(exc, phase)
    if phase == "handshake":
        return _hangup_failure(exc)
    return None


def _verification_failure(exc: ssl.SSLCertVerificationError) -> TlsFailure:
    """We refused the broker's certificate."""
    code = getattr(exc, "verify_code", None)
    message = getattr(exc, "verify_message", None) or _short(exc)
    reason = _VERIFY_CODES.get(code, "certificate_invalid") if isinstance(code, int) else "certificate_invalid"
    return TlsFailure(reason, f"certificate verify failed: {message}")


def _protocol_failure(exc: ssl.SSLError, phase: Phase) -> TlsFailure | None:
    """An OpenSSL error: an alert from the server, or bytes that are not TLS."""
    code = getattr(exc, "reason", None) or ""
    if code in _CLIENT_CERT_ALERTS:
        return TlsFailure("client_cert_rejected", f"the broker sent: {_short(exc)}")
    if phase != "handshake":
        return None
    if code in _NOT_TLS_REASONS:
        return TlsFailure("not_tls", f"the server's answer is not TLS: {_short(exc)}")
    return TlsFailure("handshake_failed", _short(exc))


def _hangup_failure(exc: BaseException) -> TlsFailure | None:
    """A socket error during the handshake."""
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        # The server hung up on our ClientHello without a TLS alert: a TLS server would have sent one.
        return TlsFailure("not_tls", f"the server closed the connection during the TLS handshake ({_short(exc)})")
    if isinstance(exc, TimeoutError):
        return TlsFailure("handshake_failed", "no answer to the TLS handshake in time")
    return None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)" → drop the C source location.
    return text.split(" (_ssl.c:")[0]


class _ObservedSocket(ssl.SSLSocket):
    """An SSLSocket that tells its :class:`TlsContext` about the errors paho swallows."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            _note(self, exc, "handshake")
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except OSError as exc:
            _note(self, exc, "session")
            raise

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except OSError as exc:
            _note(self, exc, "session")
            raise


def _note(sock: ssl.SSLSocket, exc: OSError, phase: Phase) -> None:
    # Non-blocking reads and writes "fail" all the time; those are not errors.
    if isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError | BlockingIOError):
        return
    context = sock.context
    if isinstance(context, TlsContext):
        context.last_error = (exc, phase)


class TlsContext(ssl.SSLContext):
    """A client context (CERT_REQUIRED, host name checked) whose sockets remember their last error."""

    sslsocket_class = _ObservedSocket
    last_error: tuple[OSError, Phase] | None = None

    def take_error(self) -> tuple[OSError, Phase] | None:
        """The error of the latest attempt (and forget it)."""
        error, self.last_error = self.last_error, None
        return error


def client_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None, *, section: str = "mqtt"
) -> TlsContext:
    """The context for one broker link; local file problems are configuration errors, named by key.

    Raises :class:`ConfigError` (missing file, not PEM, key does not match the certificate) or
    :class:`agent.errors.PermissionDeniedError` (a file this user may not read).
    """
    context = TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname True
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for key, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path is not None:
            _check_readable(path, f"{section}.{key}")
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{section}.ca_file: {ca_file} holds no usable PEM CA certificate ({_short(exc)})"
            ) from exc
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except ssl.SSLError as exc:
            where = f"key {key_file}" if key_file else "no key_file and no credential tls_key"
            raise ConfigError(
                f"{section}.cert_file: cannot use {cert_file} with {where} ({_short(exc)}); the key must be the "
                "certificate's own, PEM, unencrypted"
            ) from exc
    elif key_file is not None:
        raise ConfigError(f"{section}.key_file is set but {section}.cert_file is not: set both (a client certificate)")
    return context


def _check_readable(path: Path, key: str) -> None:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {path} does not exist") from exc
    except PermissionError as exc:
        raise denied(path, "read", exc) from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{key}: {path} is a directory, not a PEM file") from exc


def probe_client_certificate(host: str, port: int, context: ssl.SSLContext, timeout: float) -> TlsFailure | None:
    """Handshake again and wait, sending nothing, for the server's verdict on our certificate.

    With TLS 1.3 the server checks the client certificate after the client has finished its
    handshake; its refusal is an alert that a client busy sending CONNECT may never read (the
    server's reset discards it). MQTT servers never speak first, so any alert here is the verdict.
    None when the server accepted the session (the failure was not about TLS) or is unreachable.
    """
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False) as tls,
        ):
            try:
                tls.do_handshake()
            except OSError as exc:
                return classify(exc, "handshake")
            try:
                tls.recv(1)
            except TimeoutError:
                return None
            except OSError as exc:
                return classify(exc, "session")
    except OSError:
        return None
    return None


def is_loopback(host: str) -> bool:
    """True for addresses and names that never leave this machine (plaintext there is not on a network)."""
    if host in ("localhost", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credential_key(cert_file: Path | None, key_file: Path | None, credentials: Path | None) -> Path | None:
    """The client key: ``key_file``, else the systemd credential ``tls_key`` when a certificate is set."""
    if key_file is not None or cert_file is None or credentials is None:
        return key_file
    candidate = credentials / "tls_key"
    return candidate if candidate.is_file() else None

