"""Telemetry and events: building what the device publishes about its health (models: agent.transport.telemetry).

:func:`build_telemetry` is pure: the daemon probes the hardware (``probe_device``), gathers its own
numbers into a :class:`RuntimeView`, and gets the payload for ``{prefix}/{device_id}/telemetry``.
Transitions (downgrade, offload, pulls, failover) go to ``{prefix}/{device_id}/events`` as
:class:`Event`; :func:`event_from_action` turns an adaptation action into one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.adapt.policy import Action, CapQuant, SetThreads
from agent.hardware.conditions import THROTTLE_FLAGS, read_battery
from agent.hardware.snapshot import DeviceSnapshot, ThrottleFlags
from agent.transport.telemetry import (
    TELEMETRY_VERSION,
    Event,
    LimitCounts,
    Mode,
    Number,
    Telemetry,
    ThrottleReport,
    ZoneReading,
)


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
    slots: int | None = None  # the loaded engine's (None before a model is loaded)
    slots_busy: int = 0
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
    # The battery the adaptation and the fit decision count (agent.hardware.conditions.read_battery).
    battery = read_battery(power)
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
        battery_percent=battery.percent if battery else None,
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
        slots=runtime.slots,
        slots_busy=runtime.slots_busy,
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
