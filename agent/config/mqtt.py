"""Config ``[mqtt]``: the local broker link (also the shape of the cloud link, :meth:`CloudSettings.mqtt`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from agent.settings_base import Section, validate_topic_level


class MqttSettings(Section):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version the agent speaks to the broker (5 recommended)."
    )
    topic_prefix: str = Field("edge", description="All topics live under this prefix.")
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(
        None,
        description="Broker password. Prefer the systemd credential 'mqtt_password' "
        "($CREDENTIALS_DIRECTORY) over putting it here.",
    )
    tls: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker (TLS).")
    cert_file: Path | None = Field(None, description="Client certificate (TLS client auth).")
    key_file: Path | None = Field(None, description="Client private key (TLS client auth).")
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keepalive interval in seconds.")
    session_expiry_s: int = Field(
        3600,
        ge=0,
        description="How long the broker keeps our session (and undelivered requests) while we are away.",
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles up to the maximum.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest delay between reconnect attempts.")
    client_id: str | None = Field(None, description="MQTT client id; default 'edge-agent-<device_id>'.")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_concrete(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/"):
            raise ValueError("topic_prefix must be non-empty and must not start or end with '/'")
        for level in value.split("/"):
            validate_topic_level(level, "each level of topic_prefix")
        return value
