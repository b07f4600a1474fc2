"""Ed25519 command signatures: canonical form, verification, freshness, key files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.fleet.signing import (
    BadSignatureError,
    StaleCommandError,
    UnsignedCommandError,
    canonical_bytes,
    check_fresh,
    load_private_key,
    load_public_key,
    sign_payload,
    verify_payload,
    write_keypair,
)

PAYLOAD = {"id": "c1", "cmd": "ping", "target": "all", "args": {"b": 1, "a": "ü"}, "issued_at": 1000.5,
           "nonce": "n" * 16}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys")


def test_canonical_form_sorts_keys_drops_sig_and_has_no_whitespace() -> None:
    """The signed bytes are sorted-key compact UTF-8 JSON without the sig field."""
    raw = canonical_bytes({"b": {"z": 1, "y": [1, 2]}, "sig": "x", "a": "ü"})
    assert raw == '{"a":"ü","b":{"y":[1,2],"z":1}}'.encode()


def test_valid_signature_is_accepted(keys: tuple[Path, Path]) -> None:
    """A payload signed with the private key verifies with the matching public key."""
    signed = sign_payload(PAYLOAD, load_private_key(keys[0]))
    verify_payload(signed, load_public_key(keys[1]))


def test_key_order_in_transit_does_not_matter(keys: tuple[Path, Path]) -> None:
    """Reordering the JSON object's keys keeps the signature valid (canonical form is sorted)."""
    signed = sign_payload(PAYLOAD, load_private_key(keys[0]))
    verify_payload(dict(reversed(list(signed.items()))), load_public_key(keys[1]))


def test_unsigned_payload_is_refused(keys: tuple[Path, Path]) -> None:
    """Without a sig field verification fails with the 'unsigned' code."""
    with pytest.raises(UnsignedCommandError) as info:
        verify_payload(PAYLOAD, load_public_key(keys[1]))
    assert info.value.code == "unsigned"


def test_wrong_key_is_refused(keys: tuple[Path, Path], tmp_path: Path) -> None:
    """A signature by another key pair does not verify."""
    other, _ = write_keypair(tmp_path / "other")
    signed = sign_payload(PAYLOAD, load_private_key(other))
    with pytest.raises(BadSignatureError):
        verify_payload(signed, load_public_key(keys[1]))


@pytest.mark.parametrize(("field", "value"), [("cmd", "restart"), ("args", {"b": 2, "a": "ü"}), ("id", "c2"),
                                              ("issued_at", 1000.6), ("extra", True)])
def test_tampered_payload_is_refused(keys: tuple[Path, Path], field: str, value: object) -> None:
    """Changing or adding any field after signing breaks the signature."""
    signed = sign_payload(PAYLOAD, load_private_key(keys[0]))
    with pytest.raises(BadSignatureError):
        verify_payload({**signed, field: value}, load_public_key(keys[1]))


@pytest.mark.parametrize("sig", ["not base64!", 42, "AAAA"])
def test_garbage_signature_is_refused(keys: tuple[Path, Path], sig: object) -> None:
    """A sig that is not base64, not a string or the wrong length is a bad signature, not a crash."""
    with pytest.raises(BadSignatureError):
        verify_payload({**PAYLOAD, "sig": sig}, load_public_key(keys[1]))


@pytest.mark.parametrize(("issued", "ok"), [(1000.0, True), (1000.0 - 300, True), (1000.0 + 300, True),
                                            (1000.0 - 301, False), (1000.0 + 301, False), (None, False)])
def test_freshness_window_is_symmetric(issued: float | None, ok: bool) -> None:
    """issued_at must be within the window either side of the device's clock, and present."""
    if ok:
        check_fresh(issued, 1000.0, 300.0)
    else:
        with pytest.raises(StaleCommandError):
            check_fresh(issued, 1000.0, 300.0)


def test_keygen_writes_private_key_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """The private key is created owner-only, and a second keygen without force is an error."""
    private, public = write_keypair(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigError, match="--force"):
        write_keypair(tmp_path)
    write_keypair(tmp_path, force=True)


def test_loading_the_wrong_kind_of_key_names_the_file(keys: tuple[Path, Path], tmp_path: Path) -> None:
    """A public key given where a private key is expected (or garbage) is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=str(keys[1])):
        load_private_key(keys[1])
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match=r"junk\.pem"):
        load_public_key(junk)
    with pytest.raises(ConfigError, match="cannot read"):
        load_public_key(tmp_path / "missing.pem")
