"""The ``[fleet]`` config section: command signing, replay protection, idempotency and operator defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from agent.settings_base import Section, credentials_dir

PUBKEY_CREDENTIAL = "fleet_pubkey"
"""Name of the systemd credential (``LoadCredential=fleet_pubkey:...``) holding the fleet's public key."""


CommandPolicy = Literal["signed", "unsigned", "refused"]
"""What a device does with fleet commands: require a valid signature, run them unsigned, or refuse them all."""

REMOVED_REQUIRE_SIGNATURE = (
    "fleet.require_signature was removed: a device with a fleet public key (fleet.public_key or the "
    "'fleet_pubkey' credential) always requires signatures, and one without a key refuses every fleet "
    "command. Delete this key; to run unsigned commands on a device without a key, set "
    "fleet.allow_unsigned = true"
)


class FleetSettings(Section):
    public_key: Path | None = Field(
        None,
        description="PEM file with the fleet's Ed25519 public key; commands must be signed by its private key. "
        "Default: the systemd credential 'fleet_pubkey' ($CREDENTIALS_DIRECTORY) when present.",
    )
    allow_unsigned: bool = Field(
        False,
        description="Run unsigned fleet commands on a device without a fleet public key. Off by default: such a "
        "device refuses every fleet command. With a key, signatures are required whatever this says. Anyone who "
        "can publish to the command topics controls a device that allows unsigned commands.",
    )
    signature_window_s: float = Field(
        300.0,
        gt=0,
        description="A signed command's issued_at must be within this many seconds of the device's clock.",
    )
    nonce_cache_size: int = Field(
        10_000,
        ge=16,
        description="Signed-command nonces remembered (persisted) against replay: the newest this many, "
        "forgotten by count only (never by the clock, which may step back).",
    )
    result_cache_size: int = Field(
        1_000,
        ge=16,
        description="Executed command ids whose results are kept (persisted) so a redelivery is answered, not re-run.",
    )
    state_dir: Path = Field(
        Path("/var/lib/edge-agent/fleet"),
        description="The daemon's persistent state (survives restarts): executed command ids, seen nonces, the "
        "fleet config overrides (config-overrides.toml) and the attempt counts of redelivered messages "
        "(quarantine.json).",
    )
    private_key: Path | None = Field(
        None,
        description="Operator side: PEM Ed25519 private key that 'edge-agent fleet cmd' signs commands with.",
    )
    stale_after_s: float = Field(
        120.0,
        gt=0,
        description="Operator side: 'fleet ls' marks a device stale when nothing was heard from it for this long.",
    )
    command_timeout_s: float = Field(
        10.0, gt=0, description="Operator side: how long 'fleet cmd' waits for results by default."
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        # A removed security setting must not be silently ignored nor reinterpreted: stop at start,
        # naming the key and what replaces it.
        if isinstance(data, dict) and "require_signature" in data:
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=PydanticCustomError("removed_key", REMOVED_REQUIRE_SIGNATURE),
                loc=("require_signature",),
                input=data["require_signature"],
            )])
        return data

    def resolved_public_key(self) -> Path | None:
        """The configured key file, else the systemd credential if it exists, else None."""
        if self.public_key is not None:
            return self.public_key
        creds = credentials_dir()
        if creds is not None and (creds / PUBKEY_CREDENTIAL).is_file():
            return creds / PUBKEY_CREDENTIAL
        return None

    def command_policy(self) -> CommandPolicy:
        """``signed`` when a key is present, else ``unsigned`` with ``allow_unsigned``, else ``refused``."""
        if self.resolved_public_key() is not None:
            return "signed"
        return "unsigned" if self.allow_unsigned else "refused"
