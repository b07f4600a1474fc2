"""Config ``[cloud]``: the second broker that takes requests this device should not serve itself."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from agent.config.mqtt import MqttSettings
from agent.settings_base import Section


class CloudSettings(Section):
    """Where overflow goes, how long to wait for it, and when to enter/leave offload."""

    enabled: bool = Field(False, description="Forward requests to a cloud broker when this device cannot serve them.")
    host: str = Field("127.0.0.1", description="Cloud broker host name or address.")
    port: int = Field(8883, ge=1, le=65535, description="Cloud broker TCP port.")
    tls: bool = Field(True, description="Connect to the cloud broker with TLS.")
    ca_file: Path | None = Field(None, description="CA bundle to verify the cloud broker (TLS).")
    cert_file: Path | None = Field(None, description="Client certificate (TLS client auth).")
    key_file: Path | None = Field(None, description="Client private key (TLS client auth).")
    username: str | None = Field(None, description="Cloud broker user name.")
    password: SecretStr | None = Field(None, description="Cloud broker password (prefer a systemd credential).")
    client_id: str | None = Field(
        None, description="MQTT client id on the cloud broker; default 'edge-agent-<device_id>-relay'."
    )
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keepalive on the cloud link, seconds.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay to the cloud broker.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest delay between cloud reconnect attempts.")
    infer_topic: str = Field(
        "{prefix}/cloud/infer",
        description="Where forwarded requests go ({prefix} = mqtt.topic_prefix). Cloud workers subscribe "
        "to it as $share/<share_group>/<topic>.",
    )
    reply_topic: str = Field(
        "{prefix}/cloud/reply/{device_id}",
        description="This device's own reply topic on the cloud broker (the relay's Response Topic).",
    )
    share_group: str = Field("edge-cloud", description="Shared-subscription group of the cloud workers.")
    request_timeout_s: float = Field(
        120.0, gt=0, description="A forwarded request without a final reply after this long fails with 'timeout'."
    )
    retry_after_ms: int = Field(
        5000, ge=0, description="retry_after_ms in 'overloaded' answers when the cloud cannot take a request either."
    )
    failover_after_s: float = Field(
        30.0, gt=0, description="Serve and report through the cloud broker after the local one is down this long."
    )
    offload_queue_high: int = Field(
        4, ge=1, description="Start sending overflow to the cloud when this many requests are waiting."
    )
    offload_queue_low: int = Field(
        1, ge=0, description="Stop sending overflow to the cloud once the queue is down to this (hysteresis)."
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> CloudSettings:
        if self.offload_queue_low >= self.offload_queue_high:
            raise ValueError("offload_queue_low must be below offload_queue_high (otherwise it would flap)")
        return self

    def infer_topic_for(self, prefix: str) -> str:
        return self.infer_topic.format(prefix=prefix)

    def shared_infer_topic(self, prefix: str) -> str:
        """What a cloud worker (role = "cloud") subscribes to: a shared subscription over the infer topic."""
        return f"$share/{self.share_group}/{self.infer_topic_for(prefix)}"

    def reply_topic_for(self, prefix: str, device_id: str) -> str:
        return self.reply_topic.format(prefix=prefix, device_id=device_id)

    def mqtt(self, device_id: str) -> MqttSettings:
        """The cloud link as MqttSettings for :class:`agent.transport.mqtt.MqttLink` (always MQTT 5)."""
        return MqttSettings.model_validate(
            {
                "host": self.host,
                "port": self.port,
                "protocol": "5",
                "username": self.username,
                "password": self.password,
                "tls": self.tls,
                "ca_file": self.ca_file,
                "cert_file": self.cert_file,
                "key_file": self.key_file,
                "keepalive_s": self.keepalive_s,
                "reconnect_min_s": self.reconnect_min_s,
                "reconnect_max_s": self.reconnect_max_s,
                "client_id": self.client_id or f"edge-agent-{device_id}-relay",
            }
        )
