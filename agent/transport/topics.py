"""Topic names as small value types, built once from the prefix and device id.

Keeping every topic string in one place means the wire contract (docs/protocol.md) has one source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from agent.errors import ConfigError
from agent.settings_base import NOT_IN_TOPIC_NAME, RESERVED_DEVICE_IDS, validate_topic_level


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
    def telemetry_replay(self) -> str:
        """Where telemetry kept on disk while the broker was away is replayed (not retained): readings of the
        past stay off :attr:`telemetry`, which Home Assistant and ``fleet ls`` read as the current one."""
        return f"{self.base}/telemetry/replay"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def default_reply(self, client_id: str) -> str:
        """Where ``edge-agent ask`` listens for its answers."""
        return f"{self.base}/reply/{client_id}"


# -- fleet commands --------------------------------------------------------------------------------

RESULT_LEVEL = "result"
"""The last level of ``{prefix}/{device_id}/cmd/result``: never a command name."""

Scope = Literal["device", "group", "all"]


@dataclass(frozen=True, slots=True)
class CommandTarget:
    """Who a command was addressed to, and which command."""

    scope: Scope
    name: str
    group: str | None = None
    device: str | None = None

    @property
    def label(self) -> str:
        """The form a signed payload's ``target`` field must carry: 'all', 'group:NAME', 'device:ID'."""
        if self.scope == "all":
            return "all"
        return f"group:{self.group}" if self.scope == "group" else f"device:{self.device}"


def parse_target(spec: str) -> tuple[Scope, str | None]:
    """Operator notation → (scope, value): 'all', 'group:NAME', 'device:ID' or a bare device id."""
    if spec == "all":
        return "all", None
    kind, sep, value = spec.partition(":")
    if sep and kind in ("group", "device"):
        validate_topic_level(value, f"{kind} name")
        return ("group" if kind == "group" else "device"), value
    validate_topic_level(spec, "device id")
    return "device", spec


def target_label(scope: Scope, value: str | None) -> str:
    return CommandTarget(scope, "", group=value if scope == "group" else None,
                         device=value if scope == "device" else None).label


def command_topic(prefix: str, scope: Scope, value: str | None, name: str) -> str:
    """The topic an operator publishes command ``name`` to."""
    validate_topic_level(name, "command name")
    if scope == "all":
        return f"{prefix}/fleet/cmd/{name}"
    if scope == "group":
        return f"{prefix}/group/{value}/cmd/{name}"
    return f"{prefix}/{value}/cmd/{name}"


def result_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/cmd/{RESULT_LEVEL}"


@dataclass(frozen=True, slots=True)
class FleetTopics:
    """The command topics one device listens to, and the pure matching of an arrived topic."""

    prefix: str
    device_id: str
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_topic_level(self.device_id, "device_id")
        if self.device_id in RESERVED_DEVICE_IDS:
            raise ConfigError(f"device_id {self.device_id!r} collides with fleet topics; choose another name")
        for group in self.groups:
            try:
                validate_topic_level(group, "group name")
            except ValueError as exc:
                raise ConfigError(f"groups: {exc}") from exc

    @property
    def result(self) -> str:
        return result_topic(self.prefix, self.device_id)

    def filters(self) -> list[str]:
        return [
            f"{self.prefix}/{self.device_id}/cmd/+",
            *(f"{self.prefix}/group/{g}/cmd/+" for g in self.groups),
            f"{self.prefix}/fleet/cmd/+",
        ]

    def match(self, topic: str) -> CommandTarget | None:
        """The target if ``topic`` is a command for this device, else None (including our own results)."""
        head = f"{self.prefix}/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head):].split("/")
        if len(levels) == 3 and levels[0] == self.device_id and levels[1] == "cmd":
            target = CommandTarget("device", levels[2], device=self.device_id)
        elif len(levels) == 4 and levels[0] == "group" and levels[1] in self.groups and levels[2] == "cmd":
            target = CommandTarget("group", levels[3], group=levels[1])
        elif len(levels) == 3 and levels[0] == "fleet" and levels[1] == "cmd":
            target = CommandTarget("all", levels[2])
        else:
            return None
        if not target.name or target.name == RESULT_LEVEL:
            return None
        return target


ReportKind = Literal["status", "telemetry"]
"""What a device publishes about itself under ``{prefix}/{device_id}/``: its retained status or its telemetry."""


@dataclass(frozen=True, slots=True)
class FleetWideTopics:
    """Topics shared by every device under one prefix: the fleet's infer topic and the operator's filters."""

    prefix: str

    @property
    def infer(self) -> str:
        """Requests any one device of the fleet may answer."""
        return f"{self.prefix}/fleet/infer"

    @property
    def shared_infer(self) -> str:
        """The shared subscription devices take on :attr:`infer`, so exactly one of them answers."""
        return f"$share/{self.prefix}-workers/{self.infer}"

    def reply(self, client_id: str) -> str:
        """Where ``edge-agent fleet ask`` listens for its answer."""
        return f"{self.prefix}/fleet/reply/{client_id}"

    @property
    def all_status(self) -> str:
        """Every device's retained status."""
        return f"{self.prefix}/+/status"

    @property
    def all_telemetry(self) -> str:
        """Every device's telemetry."""
        return f"{self.prefix}/+/telemetry"

    @property
    def all_results(self) -> str:
        """Every device's fleet command results."""
        return f"{self.prefix}/+/cmd/{RESULT_LEVEL}"

    def report(self, topic: str) -> tuple[str, ReportKind] | None:
        """``(device_id, "status" | "telemetry")`` for a topic :attr:`all_status` or :attr:`all_telemetry`
        matches; None for any other topic (replies, results, replayed telemetry, another prefix)."""
        head = f"{self.prefix}/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head):].split("/")
        if len(levels) != 2:
            return None
        device_id, kind = levels
        if kind == "status":
            return device_id, "status"
        if kind == "telemetry":
            return device_id, "telemetry"
        return None


def is_result_topic(topic: str) -> bool:
    """True for a device's fleet command result topic (``.../cmd/result``)."""
    return topic.endswith(f"/cmd/{RESULT_LEVEL}")


# -- Home Assistant discovery -----------------------------------------------------------------------


def ha_node_id(device_id: str) -> str:
    """The discovery topic's node level: HA accepts only [a-zA-Z0-9_-] there."""
    return "edge_agent_" + re.sub(r"[^a-zA-Z0-9_-]", "_", device_id)


def ha_config_topic(ha_prefix: str, device_id: str, object_id: str, *, component: str = "sensor") -> str:
    """Where one entity's retained discovery config goes (``<ha_prefix>/<component>/<node_id>/<object_id>/config``;
    ``component`` is HA's platform: sensor, binary_sensor, button)."""
    return f"{ha_prefix}/{component}/{ha_node_id(device_id)}/{object_id}/config"
