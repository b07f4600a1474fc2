"""The ``[fleet]`` config section: command signing, replay protection, idempotency and operator defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from agent.settings_base import Section, credentials_dir

PUBKEY_CREDENTIAL = "fleet_pubkey"
"""Name of the systemd credential (``LoadCredential=fleet_pubkey:...``) holding the fleet's public key."""


class FleetSettings(Section):
    public_key: Path | None = Field(
        None,
        description="PEM file with the fleet's Ed25519 public key; commands must be signed by its private key. "
        "Default: the systemd credential 'fleet_pubkey' ($CREDENTIALS_DIRECTORY) when present.",
    )
    require_signature: bool | None = Field(
        None,
        description="Refuse unsigned commands. Default (unset): on when a public key is configured, off otherwise.",
    )
    signature_window_s: float = Field(
        300.0,
        gt=0,
        description="A signed command's issued_at must be within this many seconds of the device's clock.",
    )
    nonce_cache_size: int = Field(
        10_000,
        ge=16,
        description="Signed-command nonces remembered (persisted) against replay; older ones fall out of the window.",
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

    def resolved_public_key(self) -> Path | None:
        """The configured key file, else the systemd credential if it exists, else None."""
        if self.public_key is not None:
            return self.public_key
        creds = credentials_dir()
        if creds is not None and (creds / PUBKEY_CREDENTIAL).is_file():
            return creds / PUBKEY_CREDENTIAL
        return None

    def signature_required(self) -> bool:
        """Explicit ``require_signature`` wins; otherwise signatures are required exactly when a key is present."""
        if self.require_signature is not None:
            return self.require_signature
        return self.resolved_public_key() is not None
