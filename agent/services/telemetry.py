"""Telemetry and events: what the device publishes about its health, as versioned wire models.

:func:`build_telemetry` is pure: the daemon probes the hardware (``probe_device``), gathers its own
numbers into a :class:`RuntimeView`, and gets the payload for ``{prefix}/{device_id}/telemetry``.
Transitions (downgrade, offload, pulls, failover) go to ``{prefix}/{device_id}/events`` as
:class:`Event`; :func:`event_from_action` turns an adaptation action into one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.adapt.policy import THROTTLE_FLAGS, Action, CapQuant, Number, SetThreads
from agent.hardware.snapshot import DeviceSnapshot, ThrottleFlags

TELEMETRY_VERSION: Final = 1

Mode = Literal["local", "degraded", "offloading"]


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
    tokens_per_second: float | None = Field(description="Recent average decode rate.")
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


@dataclass(frozen=True, slots=True)
class RuntimeView:
    """The daemon's own numbers at the moment telemetry is built."""

    model: str | None
    quant: str | None
    threads: int | None
    queue_depth: int
    tokens_per_second: float | None
    requests_served: int
    requests_failed: int
    requests_offloaded: int
    mode: Mode
    uptime_s: float
    cpu_percent: float | None = None  # from agent.hardware.probe.CpuSampler, sampled once per tick
    messages_rejected: int = 0  # agent.services.bulkhead.BulkheadCounters
    messages_dropped: int = 0
    messages_quarantined: int = 0
    limits: LimitCounts = field(default_factory=LimitCounts)  # type: ignore[arg-type]  # bulkhead + service


def _flag_names(flags: ThrottleFlags) -> list[str]:
    return [name for name in THROTTLE_FLAGS if getattr(flags, name)]


def build_telemetry(snapshot: DeviceSnapshot, runtime: RuntimeView) -> Telemetry:
    """The telemetry payload for one tick (pure)."""
    thermal, memory, power = snapshot.thermal, snapshot.memory, snapshot.power
    zones = [ZoneReading(name=z.type or z.name, temp_c=z.temp_c) for z in thermal.zones]
    zones += [ZoneReading(name=f"{s.chip}/{s.label or s.sensor}", temp_c=s.temp_c) for s in thermal.hwmon]
    throttle = thermal.throttle
    # The first battery that reports a charge level; a second one (a UPS HAT's) rarely does.
    battery = next((b for b in power.batteries if b.capacity_pct is not None), None)
    if battery is None and power.batteries:
        battery = power.batteries[0]
    report = None
    if throttle is not None:
        report = ThrottleReport(
            raw_hex=throttle.raw_hex, now=_flag_names(throttle.now), since_boot=_flag_names(throttle.since_boot)
        )
    return Telemetry(
        v=TELEMETRY_VERSION,
        ts=round(snapshot.ts.timestamp(), 3),
        temperature_c=thermal.max_temp_c,
        zones=zones,
        throttled=report,
        battery_percent=float(battery.capacity_pct) if battery and battery.capacity_pct is not None else None,
        battery_status=_status(battery.status) if battery else None,
        power_w=battery.power_w if battery else None,
        cpu_percent=runtime.cpu_percent,
        load_1m=snapshot.load.load1 if snapshot.load else None,
        ram_available_bytes=memory.available_bytes,
        cgroup_memory_bytes=memory.cgroup.current_bytes if memory.cgroup else None,
        disk_free_bytes=snapshot.disk.free_bytes if snapshot.disk else None,
        model=runtime.model,
        quant=runtime.quant,
        threads=runtime.threads,
        queue_depth=runtime.queue_depth,
        tokens_per_second=None if runtime.tokens_per_second is None else round(runtime.tokens_per_second, 2),
        requests_served=runtime.requests_served,
        requests_failed=runtime.requests_failed,
        requests_offloaded=runtime.requests_offloaded,
        mode=runtime.mode,
        uptime_s=round(runtime.uptime_s, 1),
        messages_rejected=runtime.messages_rejected,
        messages_dropped=runtime.messages_dropped,
        messages_quarantined=runtime.messages_quarantined,
        limits=runtime.limits,
    )


def _status(status: str | None) -> str:
    # The kernel's "Not charging" etc. become stable snake_case values for dashboards.
    return (status or "unknown").strip().lower().replace(" ", "_")


def event_from_action(action: Action, *, device_id: str, ts: float) -> Event:
    """The event announcing an adaptation step, with what it changed added to the numbers."""
    numbers: dict[str, Number] = dict(action.numbers)
    if isinstance(action, SetThreads):
        numbers.update(threads=action.threads, previous_threads=action.previous)
    elif isinstance(action, CapQuant):
        numbers.update(cap_steps=action.steps, previous_cap_steps=action.previous)
    return Event.model_validate(
        {"kind": action.kind, "reason": action.reason or "unspecified", "numbers": numbers,
         "ts": round(ts, 3), "device_id": device_id}
    )


SCHEMA_MODELS: dict[str, type[BaseModel]] = {"telemetry": Telemetry, "event": Event}
"""Schemas the lead may add to docs/schemas/ (agent.transport.schemas)."""
