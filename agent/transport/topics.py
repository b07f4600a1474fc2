"""Topic names as small value types, built once from the prefix and device id.

Keeping every topic string in one place means the wire contract (docs/protocol.md) has one source.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.settings_base import NOT_IN_TOPIC_NAME, validate_topic_level


def is_concrete_topic(topic: str) -> bool:
    """True when ``topic`` can be published to: not empty, no wildcards, none of the characters brokers
    refuse, at most 65,535 bytes of UTF-8."""
    return bool(topic) and NOT_IN_TOPIC_NAME.search(topic) is None and len(topic.encode()) <= 65535


@dataclass(frozen=True, slots=True)
class DeviceTopics:
    """Every topic one device publishes or subscribes to."""

    prefix: str
    device_id: str

    def __post_init__(self) -> None:
        validate_topic_level(self.device_id, "device_id")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def infer(self) -> str:
        return f"{self.base}/infer"

    @property
    def infer_cancel(self) -> str:
        return f"{self.base}/infer/cancel"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def default_reply(self, client_id: str) -> str:
        """Where ``edge-agent ask`` listens for its answers."""
        return f"{self.base}/reply/{client_id}"
