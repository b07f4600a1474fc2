"""Config ``[gateway]``: the operator-side HTTP gateway (``edge-agent gateway``, docs/gateway.md)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from agent.settings_base import Section, validate_topic_level


class GatewaySettings(Section):
    """Config ``[gateway]``: where the OpenAI/Ollama-compatible HTTP gateway listens and who may use it."""

    token: SecretStr | None = Field(
        None,
        description="Bearer token HTTP clients must send (Authorization: Bearer ...). Without one the gateway "
        "only binds to a loopback address. Prefer EDGE_AGENT_GATEWAY__TOKEN over the file.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address the gateway listens on (edge-agent gateway --host wins). Anything but loopback "
        "needs a token.",
    )
    port: int = Field(
        11434,
        ge=1,
        le=65535,
        description="TCP port (edge-agent gateway --port wins); 11434 is Ollama's, so Ollama clients find it "
        "without configuration.",
    )
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A request without its final reply after this long is cancelled on the device and answered "
        "HTTP 504.",
    )
    client_id: str | None = Field(
        None,
        description="MQTT client id of the gateway; default 'edge-gateway-<random>'. Its replies arrive on "
        "{prefix}/<target>/reply/<client id>.",
    )

    @field_validator("client_id")
    @classmethod
    def _client_id_is_topic_level(cls, value: str | None) -> str | None:
        # The client id is the last level of the gateway's reply topics.
        return None if value is None else validate_topic_level(value, "gateway.client_id")
