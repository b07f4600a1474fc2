"""Telemetry and event wire models: what a device publishes about its health, versioned.

Published on ``{prefix}/{device_id}/telemetry`` (:class:`Telemetry`, every ``telemetry.interval_s``) and
``{prefix}/{device_id}/events`` (:class:`Event`, one per transition). Built by
:mod:`agent.services.telemetry`; read back by the operator CLI. Their JSON Schemas are in docs/schemas/
(``python -m agent.transport.schemas``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

TELEMETRY_VERSION: Final = 1

Mode = Literal["local", "degraded", "offloading"]
"""How the device serves requests: all locally, with a capped quant, or forwarding to the cloud."""

Number = float | int | str | bool | None
"""A value in an event's ``numbers``."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZoneReading(_Wire):
    """One temperature sensor: a thermal zone (by its type) or a hwmon sensor (chip/label)."""

    name: str = Field(description="thermal_zone type (e.g. cpu-thermal) or hwmon 'chip/label'.")
    temp_c: float | None


class ThrottleReport(_Wire):
    """The Raspberry Pi firmware throttle mask, decoded into the names of the flags that are set."""

    raw_hex: str = Field(description="As vcgencmd prints it, e.g. 0x50005.")
    now: list[str] = Field(description="Set now: under_voltage, arm_freq_capped, throttled, soft_temp_limit.")
    since_boot: list[str] = Field(description="Have occurred since boot.")


class LimitCounts(_Wire):
    """Messages refused (or clamped) by each request limit since the daemon started.

    Keys name the limit, not the error code: several limits answer ``too_large``. See docs/protocol.md,
    "Limits and quarantine".
    """

    payload_bytes: int = Field(0, description="Over inference.max_payload_bytes, any topic ('too_large').")
    json_depth: int = Field(0, description="Nested deeper than 32, any topic ('bad_request').")
    json_elements: int = Field(0, description="Over inference.max_json_elements, any topic ('too_large').")
    messages: int = Field(0, description="Over inference.max_messages ('too_large').")
    stop: int = Field(0, description="Over inference.max_stop_sequences or max_stop_chars ('bad_request').")
    prompt_tokens: int = Field(
        0, description="Over inference.max_prompt_tokens or the context ('too_large'), before evaluation."
    )
    rate_limited: int = Field(0, description="Over inference.rate_per_client_per_s for one reply address.")
    queue_full: int = Field(0, description="Refused 'overloaded' with inference.max_queue requests waiting.")
    max_tokens_clamped: int = Field(0, description="Requests whose max_tokens was lowered to max_tokens_limit.")


class Telemetry(_Wire):
    """Published every ``telemetry.interval_s`` on ``{prefix}/{device_id}/telemetry``."""

    v: Literal[1] = Field(1, description="Payload version (TELEMETRY_VERSION).")
    ts: float = Field(description="Unix time of the reading (kept when replayed from the offline buffer).")
    temperature_c: float | None = Field(description="Hottest SoC zone/sensor.")
    zones: list[ZoneReading] = Field(description="Every temperature reading.")
    throttled: ThrottleReport | None = Field(description="Pi firmware throttle flags; null off a Pi.")
    battery_percent: float | None = Field(description="Null when there is no battery.")
    battery_status: str | None = Field(description="charging, discharging, full, not_charging, unknown; null = none.")
    power_w: float | None = Field(description="Battery power draw when the device reports it.")
    cpu_percent: float | None = Field(description="CPU busy percent since the previous reading.")
    load_1m: float | None
    ram_available_bytes: int | None = Field(description="MemAvailable.")
    cgroup_memory_bytes: int | None = Field(description="memory.current of the agent's cgroup.")
    disk_free_bytes: int | None = Field(description="Free space where models are stored.")
    model: str | None
    quant: str | None
    threads: int | None
    queue_depth: int
    slots: int | None = Field(None, description="Requests the loaded model decodes together (continuous batching).")
    slots_busy: int = Field(0, description="Requests decoding now (the rest of the queue waits in queue_depth).")
    tokens_per_second: float | None = Field(description="Decode rate of the last finished request (per request).")
    requests_served: int
    requests_failed: int
    requests_offloaded: int
    mode: Mode
    uptime_s: float
    messages_rejected: int = Field(
        0, description="Messages refused before or instead of handling (over the size or nesting limit, or their "
        "handler failed) and answered with an error."
    )
    messages_dropped: int = Field(0, description="Such messages with no reply address: acknowledged and dropped.")
    messages_quarantined: int = Field(
        0, description="Redelivered messages that were running during repeated crashes: refused, not run again."
    )
    limits: LimitCounts = Field(
        default_factory=LimitCounts,  # type: ignore[arg-type]
        description="Refusals by request limit since start (counters only grow).",
    )


EventKind = Literal[
    "downgrade",
    "upgrade",
    "offload_on",
    "offload_off",
    "pull_started",
    "pull_finished",
    "pull_failed",
    "failover",
    "failback",
    "swap_started",
    "swap_finished",
    "swap_failed",
    "message_quarantined",
    "cloud_tls_failed",
]


class Event(_Wire):
    """One transition on ``{prefix}/{device_id}/events``, with the reason and the numbers behind it."""

    v: Literal[1] = Field(1, description="Payload version (TELEMETRY_VERSION).")
    kind: EventKind
    reason: str = Field(description="Stable snake_case reason(s), comma-separated, e.g. soc_near_soft_limit.")
    numbers: dict[str, Number] = Field(default_factory=dict, description="The readings that triggered it.")
    ts: float = Field(description="Unix time.")
    device_id: str


def read_telemetry(data: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`Telemetry` fields of a received payload, each validated on its own (strictly: no strings
    for numbers, no booleans for counts); keys the model does not have and values of the wrong type are left
    out. Field by field rather than the whole model so an operator still sees what a device of another
    version sends that this version understands."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in Telemetry.model_fields:
            try:
                out[name] = _field_adapter(name).validate_python(value, strict=True)
            except ValidationError:
                continue
    return out


@cache
def _field_adapter(name: str) -> TypeAdapter[Any]:
    annotation = Telemetry.model_fields[name].annotation
    return TypeAdapter(Any if annotation is None else annotation)


SCHEMA_MODELS: dict[str, type[BaseModel]] = {"telemetry": Telemetry, "event": Event}
"""Models whose JSON Schemas are published in docs/schemas/ (``python -m agent.transport.schemas``)."""
