"""Ed25519 command signatures: canonical bytes, key files, verification and freshness.

A signature covers the canonical form of the payload: the JSON object without its ``sig`` field,
keys sorted, no whitespace, UTF-8 (``json.dumps(..., sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``). The verifier re-serialises what it parsed, so a signer in another language
must produce the same bytes: prefer integers and plain decimals for numbers. Freshness
(``issued_at`` within a window) and replay (``nonce`` seen before) are checked by the caller with
:func:`check_fresh` and a nonce cache, because they need a clock and state; this module stays pure.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

# cryptography is imported where keys are used, not here: it adds ~7 MB to the resident daemon
# (measured), and a device without a fleet key never needs it.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import AgentError, ConfigError

SIG_FIELD = "sig"
PRIVATE_KEY_FILE = "fleet_key.pem"
PUBLIC_KEY_FILE = "fleet_pubkey.pem"


class SignatureError(AgentError, PermissionError):
    """A command was refused because its signature does not prove it came from the fleet's operator."""

    code = "unauthorized"


class UnsignedCommandError(SignatureError):
    """Signatures are required and the command carries none."""

    code = "unsigned"


class NoFleetKeyError(SignatureError):
    """The device has no fleet public key (and does not allow unsigned commands): nothing can authenticate."""

    code = "no_fleet_key"


class BadSignatureError(SignatureError):
    """The signature does not verify with the fleet's public key (wrong key or tampered payload)."""

    code = "bad_signature"


class StaleCommandError(SignatureError):
    """``issued_at`` is missing or outside the accepted window around the device's clock."""

    code = "stale"


class ReplayedCommandError(SignatureError):
    """The nonce was seen before: someone re-sent a captured command."""

    code = "replayed"


def canonical_bytes(payload: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the payload without ``sig``, sorted keys, no whitespace, UTF-8."""
    body = {k: v for k, v in payload.items() if k != SIG_FIELD}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadSignatureError(f"payload cannot be put in canonical form: {exc}") from exc
    return text.encode("utf-8")


def sign_payload(payload: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``payload`` with ``sig`` = base64 Ed25519 signature over its canonical bytes."""
    signature = key.sign(canonical_bytes(payload))
    return {**{k: v for k, v in payload.items() if k != SIG_FIELD}, SIG_FIELD: base64.b64encode(signature).decode()}


def verify_payload(payload: Mapping[str, Any], key: Ed25519PublicKey) -> None:
    """Raise :class:`UnsignedCommandError` or :class:`BadSignatureError` unless ``sig`` verifies."""
    sig = payload.get(SIG_FIELD)
    if sig is None:
        raise UnsignedCommandError("command is not signed and this device requires signatures")
    if not isinstance(sig, str):
        raise BadSignatureError("'sig' must be a base64 string")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadSignatureError("'sig' is not valid base64") from exc
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - see the module imports

    try:
        key.verify(raw, canonical_bytes(payload))
    except InvalidSignature as exc:
        raise BadSignatureError("signature does not verify with the fleet public key") from exc


def check_fresh(issued_at: float | None, now: float, window_s: float) -> None:
    """Raise :class:`StaleCommandError` unless ``issued_at`` is within ``window_s`` of ``now`` (either side)."""
    if issued_at is None:
        raise StaleCommandError("signed commands must carry 'issued_at' (unix seconds)")
    skew = now - issued_at
    if abs(skew) > window_s:
        side = "behind" if skew > 0 else "ahead of"
        raise StaleCommandError(
            f"command issued_at is {abs(skew):.0f} s {side} this device's clock (window {window_s:.0f} s); "
            "check the clocks"
        )


# -- keys ------------------------------------------------------------------------------------------


def generate_keypair() -> tuple[bytes, bytes]:
    """A new key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def write_keypair(out_dir: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``fleet_key.pem`` (mode 0600) and ``fleet_pubkey.pem`` into ``out_dir``; no overwrite unless ``force``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise ConfigError(f"{path} exists; pass --force to replace the fleet key pair")
    private, public = generate_keypair()
    # Create with 0600 from the start: a chmod after writing leaves a window where the key is readable.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key, raising :class:`ConfigError` naming the file otherwise."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    key = _load(path, private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key, raising :class:`ConfigError` naming the file otherwise."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415

    key = _load(path, private=False)
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def _load(path: Path, *, private: bool) -> object:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read fleet key {path}: {exc.strerror}") from exc
    try:
        if private:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM key: {exc}") from exc
