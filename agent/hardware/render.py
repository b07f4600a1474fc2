"""A device snapshot as a two-column table for an operator at a terminal (``edge-agent probe``)."""

from __future__ import annotations

from agent.hardware.snapshot import (
    CgroupMemory,
    DeviceSnapshot,
    MemoryInfo,
    PowerInfo,
    PsiLine,
    ThermalInfo,
    ThrottleFlags,
)

_UNKNOWN = "-"
_BUDGET_REASON = {
    "mem_available": "MemAvailable",
    "cgroup_max": "cgroup memory.max - memory.current",
    "cgroup_high": "cgroup memory.high - memory.current",
}


def format_bytes(value: int | None) -> str:
    """1536 -> '1.5 KiB'; binary units, because that is how RAM is sold and how the kernel counts it."""
    if value is None:
        return _UNKNOWN
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns at GiB


def _temp(value: float | None) -> str:
    return _UNKNOWN if value is None else f"{value:.1f} °C"


def _psi(line: PsiLine | None) -> str:
    return _UNKNOWN if line is None else f"{line.avg10:.2f}/{line.avg60:.2f}/{line.avg300:.2f}"


def _flag_names(flags: ThrottleFlags) -> str:
    names = [name.replace("_", " ") for name, on in flags.model_dump().items() if on]
    return ", ".join(names) or "none"


def _memory_rows(memory: MemoryInfo) -> list[tuple[str, str]]:
    rows = [
        (
            "Memory",
            f"{format_bytes(memory.available_bytes)} available of {format_bytes(memory.total_bytes)}",
        ),
    ]
    if memory.swap_total_bytes:
        used = memory.swap_total_bytes - (memory.swap_free_bytes or 0)
        rows.append(("Swap", f"{format_bytes(used)} used of {format_bytes(memory.swap_total_bytes)}"))
    else:
        rows.append(("Swap", "none"))
    for dev in memory.zram:
        rows.append(
            (
                "zram",
                f"{dev.name}: {format_bytes(dev.disksize_bytes)} disk, "
                f"{format_bytes(dev.orig_data_bytes)} stored in {format_bytes(dev.mem_used_bytes)} RAM",
            )
        )
    rows.append(("cgroup", _cgroup_text(memory.cgroup)))
    if memory.pressure is not None:
        rows.append(
            (
                "Mem pressure",
                f"some {_psi(memory.pressure.some)}  full {_psi(memory.pressure.full)}  (% avg10/60/300)",
            )
        )
    if memory.budget_source is None:
        rows.append(("Budget", "unknown (neither MemAvailable nor a cgroup limit could be read)"))
    else:
        reason = _BUDGET_REASON[memory.budget_source]
        if memory.cgroup is not None and memory.budget_source != "mem_available":
            reason += f" of {memory.cgroup.limiting_path}"
        rows.append(("Budget", f"{format_bytes(memory.budget_bytes)}  (limited by {reason})"))
    return rows


def _cgroup_text(cgroup: CgroupMemory | None) -> str:
    if cgroup is None:
        return "not found"

    def limit(value: int | None) -> str:
        return "unlimited" if value is None else format_bytes(value)

    text = (
        f"v{cgroup.version} {cgroup.path}: max {limit(cgroup.max_bytes)}, "
        f"high {limit(cgroup.high_bytes)}, current {format_bytes(cgroup.current_bytes)}"
    )
    if cgroup.limiting_path not in (None, cgroup.path):
        text += f"; bound by {cgroup.limited_by} of {cgroup.limiting_path}"
    return text


def _thermal_rows(thermal: ThermalInfo) -> list[tuple[str, str]]:
    rows = []
    for zone in thermal.zones:
        trips = ", ".join(f"{t.type} {_temp(t.temp_c)}" for t in zone.trip_points if t.temp_c)
        rows.append((zone.name, f"{zone.type or '?'} {_temp(zone.temp_c)}" + (f"  (trips: {trips})" if trips else "")))
    for sensor in thermal.hwmon:
        limits = ", ".join(
            f"{name} {_temp(v)}" for name, v in (("max", sensor.max_c), ("crit", sensor.crit_c)) if v is not None
        )
        rows.append(
            (
                f"{sensor.chip}/{sensor.sensor}",
                f"{sensor.label or ''} {_temp(sensor.temp_c)}".strip() + (f"  ({limits})" if limits else ""),
            )
        )
    if not rows:
        rows.append(("Temperature", "no sensors"))
    if thermal.throttle is not None:
        t = thermal.throttle
        rows.append(
            (
                "Throttle",
                f"{t.raw_hex} ({t.source}): now {_flag_names(t.now)}; since boot {_flag_names(t.since_boot)}",
            )
        )
    return rows


def _power_rows(power: PowerInfo) -> list[tuple[str, str]]:
    rows = []
    for battery in power.batteries:
        parts = [
            f"{battery.capacity_pct}%" if battery.capacity_pct is not None else _UNKNOWN,
            battery.status or "",
            f"{battery.power_w:.1f} W" if battery.power_w is not None else "",
        ]
        rows.append((f"Battery {battery.name}", " ".join(p for p in parts if p)))
    if power.ac_online is not None:
        rows.append(("AC", "online" if power.ac_online else "offline"))
    return rows or [("Power", "no battery or AC adapter reported")]


def render_table(snapshot: DeviceSnapshot) -> str:
    """The snapshot as aligned 'Label  value' lines, most decision-relevant first."""
    cpu = snapshot.cpu
    rows: list[tuple[str, str]] = [
        ("Board", snapshot.board or _UNKNOWN),
        (
            "CPU",
            f"{cpu.arch}, {cpu.model_name or 'unknown model'}, "
            f"{cpu.physical_cores or '?'} cores / {cpu.logical_cores or '?'} threads",
        ),
    ]
    if snapshot.load is not None:
        load = snapshot.load
        rows.append(("Load", f"{load.load1:.2f} {load.load5:.2f} {load.load15:.2f}"))
    rows += _memory_rows(snapshot.memory)
    if snapshot.disk is not None:
        disk = snapshot.disk
        rows.append(
            ("Disk", f"{format_bytes(disk.free_bytes)} free of {format_bytes(disk.total_bytes)} at {disk.path}")
        )
    rows += _thermal_rows(snapshot.thermal)
    rows += _power_rows(snapshot.power)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
