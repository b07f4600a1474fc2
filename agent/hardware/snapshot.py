"""Frozen snapshots of what the device has right now, and the pure decisions taken from them.

Everything here is data: :mod:`agent.hardware.probe` fills these types from sysfs/procfs, and the
fit/offload/telemetry logic reads them without doing any I/O. A field is ``None`` when the device
does not expose it (a Pi has no battery, a VM has no thermal zones) -- never a guessed value.

Units are in the field names (``_bytes``, ``_c``, ``_w``) so that the JSON form explains itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field


class Frozen(BaseModel):
    """Base of every snapshot type: immutable and hashable.

    Unknown keys are ignored when parsing one back, because the JSON form also carries the computed
    fields (``max_temp_c``, ``raw_hex``, ``on_battery``) that are derived again on load.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")


# --- memory -----------------------------------------------------------------------------------------


class PsiLine(Frozen):
    """One line of a PSI file: the share of wall time tasks were stalled waiting for memory."""

    avg10: float = Field(description="Percent of the last 10 s.")
    avg60: float = Field(description="Percent of the last 60 s.")
    avg300: float = Field(description="Percent of the last 300 s.")
    total_us: int = Field(description="Total stall time since boot, microseconds.")


class MemoryPressure(Frozen):
    """``/proc/pressure/memory``: 'some' = at least one task stalled, 'full' = all non-idle tasks stalled."""

    some: PsiLine | None
    full: PsiLine | None


class ZramDevice(Frozen):
    """A configured compressed RAM block device (usually swap); its RAM use competes with the model's."""

    name: str
    disksize_bytes: int = Field(description="Uncompressed capacity.")
    orig_data_bytes: int | None = Field(None, description="Data stored, before compression.")
    compr_data_bytes: int | None = Field(None, description="Data stored, after compression.")
    mem_used_bytes: int | None = Field(None, description="RAM the device really uses now.")


class CgroupMemory(Frozen):
    """The memory limits of the cgroup this process runs in (systemd's MemoryMax=/MemoryHigh=).

    ``max_bytes``/``high_bytes``/``current_bytes`` are the process's own cgroup; a limit set on a parent
    slice also binds us, so ``headroom_bytes`` is the smallest ``min(max, high) - current`` over the own
    cgroup and all its ancestors, and ``limiting_path`` names the level that gives it.
    """

    version: Literal[1, 2]
    path: str = Field(description="The cgroup path from /proc/self/cgroup, e.g. /system.slice/x.service.")
    max_bytes: int | None = Field(description="memory.max (v1: limit_in_bytes); None = unlimited.")
    high_bytes: int | None = Field(description="memory.high, the throttling threshold; None = unlimited.")
    current_bytes: int | None = Field(description="memory.current (v1: usage_in_bytes).")
    inactive_file_bytes: int | None = Field(
        None, description="Reclaimable page cache charged to the cgroup (memory.stat inactive_file)."
    )
    headroom_bytes: int | None = Field(
        description="Smallest (limit - current) over this cgroup and its ancestors; None = no limit anywhere."
    )
    limited_by: Literal["memory.max", "memory.high"] | None = Field(description="Which file gives headroom_bytes.")
    limiting_path: str | None = Field(description="The cgroup whose limit gives headroom_bytes.")


BudgetSource = Literal["mem_available", "cgroup_max", "cgroup_high"]


class MemoryInfo(Frozen):
    """RAM, swap and the budget the agent may really use for a model."""

    total_bytes: int | None = Field(description="MemTotal: RAM the kernel manages.")
    available_bytes: int | None = Field(
        description="MemAvailable: what can be allocated without swapping (free + reclaimable cache)."
    )
    swap_total_bytes: int | None
    swap_free_bytes: int | None
    zram: tuple[ZramDevice, ...] = ()
    cgroup: CgroupMemory | None = None
    pressure: MemoryPressure | None = None
    budget_bytes: int | None = Field(
        description="min(MemAvailable, cgroup headroom): the memory the agent can really take. "
        "None when neither is known."
    )
    budget_source: BudgetSource | None = Field(description="Which bound gives budget_bytes.")


def derive_budget(available_bytes: int | None, cgroup: CgroupMemory | None) -> tuple[int | None, BudgetSource | None]:
    """The memory the agent can really use: the smaller of the host's MemAvailable and cgroup headroom.

    MemAvailable alone over-promises inside a systemd unit with ``MemoryMax=``: the board may have 7 GB
    free while the kernel OOM-kills the service past 1 GB. The cgroup headroom alone ignores other
    processes on the board. A negative headroom (usage above memory.high) is reported as 0.
    """
    candidates: list[tuple[int, BudgetSource]] = []
    if available_bytes is not None:
        candidates.append((available_bytes, "mem_available"))
    if cgroup is not None and cgroup.headroom_bytes is not None:
        source: BudgetSource = "cgroup_high" if cgroup.limited_by == "memory.high" else "cgroup_max"
        candidates.append((max(cgroup.headroom_bytes, 0), source))
    if not candidates:
        return None, None
    # On a tie the host bound wins: it is listed first and min() keeps the first minimum.
    value, source = min(candidates, key=lambda c: c[0])
    return value, source


# --- CPU --------------------------------------------------------------------------------------------


class CpuInfo(Frozen):
    """What the CPU can run: thread count for llama.cpp is the physical core count."""

    arch: str = Field(description="Machine architecture, e.g. aarch64, x86_64.")
    model_name: str | None = Field(description="e.g. 'Cortex-A72' or the x86 'model name'.")
    physical_cores: int | None
    logical_cores: int | None


class CpuTimes(Frozen):
    """The aggregate ``cpu`` line of ``/proc/stat``, reduced to what a busy percentage needs (in ticks)."""

    busy: int
    total: int


def cpu_percent(before: CpuTimes, after: CpuTimes) -> float | None:
    """Share of CPU time spent busy between two readings, 0-100; None if no time passed or the counters reset."""
    total = after.total - before.total
    busy = after.busy - before.busy
    if total <= 0 or busy < 0:
        return None
    return round(100.0 * min(busy, total) / total, 1)


class LoadAverage(Frozen):
    """``/proc/loadavg``: runnable + uninterruptible tasks, averaged over 1, 5 and 15 minutes."""

    load1: float
    load5: float
    load15: float


# --- disk -------------------------------------------------------------------------------------------


class DiskInfo(Frozen):
    """Free space on the file system that holds the models."""

    path: str = Field(description="The directory measured (the nearest existing parent of models_dir).")
    total_bytes: int
    free_bytes: int = Field(description="Available to an unprivileged user (statvfs f_bavail).")


# --- thermal ----------------------------------------------------------------------------------------


class TripPoint(Frozen):
    """A thermal zone trip point: at ``temp_c`` the kernel acts (passive = slow the clock, critical = halt)."""

    index: int
    type: str | None
    temp_c: float | None


class ThermalZone(Frozen):
    """One ``/sys/class/thermal/thermal_zone*`` (on a Pi, zone 0 'cpu-thermal' is the SoC)."""

    name: str
    type: str | None
    temp_c: float | None
    trip_points: tuple[TripPoint, ...] = ()


class HwmonSensor(Frozen):
    """One ``tempN_*`` group of a hwmon chip (e.g. coretemp 'Package id 0')."""

    chip: str = Field(description="The hwmon 'name' file, e.g. coretemp, cpu_thermal, nvme.")
    sensor: str = Field(description="tempN, as in the file names.")
    label: str | None
    temp_c: float | None
    max_c: float | None = None
    crit_c: float | None = None


class ThrottleFlags(Frozen):
    """The four Raspberry Pi firmware throttle conditions (one nibble of the get_throttled mask)."""

    under_voltage: bool
    arm_freq_capped: bool
    throttled: bool
    soft_temp_limit: bool


_UNDER_VOLTAGE, _FREQ_CAPPED, _THROTTLED, _SOFT_TEMP = 0x1, 0x2, 0x4, 0x8
_SINCE_BOOT_SHIFT = 16


def _flags(nibble: int) -> ThrottleFlags:
    return ThrottleFlags(
        under_voltage=bool(nibble & _UNDER_VOLTAGE),
        arm_freq_capped=bool(nibble & _FREQ_CAPPED),
        throttled=bool(nibble & _THROTTLED),
        soft_temp_limit=bool(nibble & _SOFT_TEMP),
    )


class ThrottleState(Frozen):
    """The Pi firmware throttle bitmask, decoded: bits 0-3 are 'now', bits 16-19 'has occurred since boot'."""

    raw: int
    source: Literal["sysfs", "vcgencmd"]
    now: ThrottleFlags
    since_boot: ThrottleFlags

    @classmethod
    def from_mask(cls, raw: int, source: Literal["sysfs", "vcgencmd"]) -> ThrottleState:
        """Decode a mask such as 0x50005 (under-voltage and throttled, now and since boot)."""
        return cls(
            raw=raw,
            source=source,
            now=_flags(raw & 0xF),
            since_boot=_flags((raw >> _SINCE_BOOT_SHIFT) & 0xF),
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def raw_hex(self) -> str:
        """The mask as vcgencmd prints it (0x50005), for humans comparing with Pi documentation."""
        return f"0x{self.raw:x}"


class ThermalInfo(Frozen):
    """Every temperature the kernel exposes, and the Pi throttle state."""

    zones: tuple[ThermalZone, ...] = ()
    hwmon: tuple[HwmonSensor, ...] = ()
    throttle: ThrottleState | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def max_temp_c(self) -> float | None:
        """The hottest reading of any zone or sensor: the number a thermal back-off decision watches."""
        temps = [z.temp_c for z in self.zones if z.temp_c is not None]
        temps += [s.temp_c for s in self.hwmon if s.temp_c is not None]
        return max(temps) if temps else None


# --- power ------------------------------------------------------------------------------------------


class Battery(Frozen):
    """A system battery from ``/sys/class/power_supply`` (peripherals with scope=Device are skipped)."""

    name: str
    capacity_pct: int | None
    status: str | None = Field(description="Charging, Discharging, Full, Not charging, Unknown.")
    power_w: float | None = Field(description="power_now, or current_now x voltage_now.")
    voltage_v: float | None


class PowerInfo(Frozen):
    """Batteries and whether mains power is connected (None: the device reports no AC adapter)."""

    batteries: tuple[Battery, ...] = ()
    ac_online: bool | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def on_battery(self) -> bool:
        """True when a battery is discharging or AC is reported offline with a battery present."""
        if not self.batteries:
            return False
        if any(b.status == "Discharging" for b in self.batteries):
            return True
        return self.ac_online is False


# --- the whole device -------------------------------------------------------------------------------


class DeviceSnapshot(Frozen):
    """Everything :func:`agent.hardware.probe.probe_device` read at one instant."""

    ts: datetime = Field(description="When the probe ran (UTC).")
    board: str | None = Field(description="/proc/device-tree/model, e.g. 'Raspberry Pi 5 Model B Rev 1.0'.")
    cpu: CpuInfo
    memory: MemoryInfo
    load: LoadAverage | None
    disk: DiskInfo | None
    thermal: ThermalInfo
    power: PowerInfo
