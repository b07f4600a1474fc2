"""Device conditions: the one reading of heat, battery and memory that fit, adaptation, telemetry and the CLI share.

A :class:`~agent.hardware.snapshot.DeviceSnapshot` holds every sensor; decisions need three facts taken
from it the same way everywhere:

* **heat** -- the hottest sensor and the Pi firmware's throttle bits *now*, placed against the board's
  soft/hard limits: ``clear`` / ``band`` (hysteresis) / ``high`` / ``critical`` (:func:`heat_band`);
* **battery** -- which battery counts (the lowest charge among those reporting one), whether it runs the
  device (:attr:`PowerInfo.on_battery`), and its band (:func:`battery_band`);
* **memory** -- MemAvailable, the cgroup headroom (own cgroup and its ancestors) and the budget
  (the smaller of the two).

Pure: no I/O, no clock. The thresholds are ``[adapt]`` (:class:`~agent.config.adapt.AdaptSettings`); the
board's limits come from :func:`agent.adapt.settings.board_limits` and are passed in as numbers.
The fit decision turns the bands into rungs (``high`` heat 1, ``critical`` heat 2, low battery 1); the
live policy turns them into threads, quant caps and offload.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from agent.config.adapt import AdaptSettings
from agent.hardware.snapshot import DeviceSnapshot, MemoryInfo, PowerInfo

Band = Literal["clear", "band", "high", "critical"]
"""clear: nothing to do and recovery may proceed; band: the hysteresis band (no change either way);
high: step down; critical: offload at once."""

THROTTLE_FLAGS = ("under_voltage", "arm_freq_capped", "throttled", "soft_temp_limit")


# --- heat -------------------------------------------------------------------------------------------


def throttle_now(snapshot: DeviceSnapshot) -> frozenset[str]:
    """Names from :data:`THROTTLE_FLAGS` that the firmware reports *now* ('since boot' history is ignored)."""
    throttle = snapshot.thermal.throttle
    if throttle is None:
        return frozenset()
    return frozenset(name for name in THROTTLE_FLAGS if getattr(throttle.now, name))


def heat_band(
    temperature_c: float | None,
    flags: frozenset[str],
    soft_limit_c: float,
    hard_limit_c: float,
    cfg: AdaptSettings,
    *,
    offloading: bool = False,
) -> tuple[Band, str | None]:
    """The one heat rule: the band and its reason code.

    critical: at or above ``hard - critical_margin_c`` (once offloading, until below that minus the
    hysteresis width); high: any throttle bit now, or at or above ``soft - thermal_margin_c``;
    band: at or above ``soft - thermal_recover_c``; else clear. An unknown temperature with no throttle
    bit is clear (never guessed).
    """
    critical_at = hard_limit_c - cfg.critical_margin_c
    width = cfg.thermal_recover_c - cfg.thermal_margin_c
    t = temperature_c
    if t is not None and (t >= critical_at or (offloading and t >= critical_at - width)):
        return "critical", "soc_critical"
    if flags:
        return "high", "firmware_throttling"
    if t is None:
        return "clear", None
    if t >= soft_limit_c - cfg.thermal_margin_c:
        return "high", "soc_near_soft_limit"
    if t >= soft_limit_c - cfg.thermal_recover_c:
        return "band", None
    return "clear", None


@dataclass(frozen=True, slots=True)
class Heat:
    """The SoC's heat against its limits, and the band :func:`heat_band` puts it in."""

    band: Band
    reason: str | None
    temperature_c: float | None
    soft_limit_c: float
    hard_limit_c: float
    throttle_now: frozenset[str] = frozenset()

    def explain(self) -> str:
        """One phrase for humans (the fit decision's note)."""
        t = "unknown" if self.temperature_c is None else f"{self.temperature_c:.0f} °C"
        limits = f"soft {self.soft_limit_c:.0f} °C, hard {self.hard_limit_c:.0f} °C"
        if self.reason == "firmware_throttling":
            return f"firmware throttling now ({', '.join(sorted(self.throttle_now))}); SoC at {t}"
        if self.reason == "soc_critical":
            return f"SoC at {t} is at the critical level ({limits})"
        if self.reason == "soc_near_soft_limit":
            return f"SoC at {t} is near its soft limit ({limits})"
        return f"SoC at {t} ({limits})"


# --- battery ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatteryReading:
    """The battery that counts: its charge, whether the device runs on battery, and what the kernel says."""

    name: str
    percent: float | None
    discharging: bool
    status: str | None = None
    power_w: float | None = None


def read_battery(power: PowerInfo) -> BatteryReading | None:
    """The one battery rule: the lowest charge among batteries that report one (else the first battery);
    discharging means the device runs on battery (:attr:`PowerInfo.on_battery`). None: no battery."""
    if not power.batteries:
        return None
    reporting = [b for b in power.batteries if b.capacity_pct is not None]
    battery = min(reporting, key=lambda b: b.capacity_pct or 0) if reporting else power.batteries[0]
    return BatteryReading(
        name=battery.name,
        percent=None if battery.capacity_pct is None else float(battery.capacity_pct),
        discharging=power.on_battery,
        status=battery.status,
        power_w=battery.power_w,
    )


def battery_band(
    percent: float | None, discharging: bool, cfg: AdaptSettings, *, offloading: bool = False
) -> tuple[Band, str | None]:
    """The one battery rule's band: only a discharging battery with a known charge counts.

    critical: at or below ``battery_critical_percent`` (once offloading, until at least that plus
    ``battery_recover_percent``); high: at or below ``battery_low_percent``; band: below low plus recover.
    """
    if percent is None or not discharging:
        return "clear", None
    critical_exit = cfg.battery_critical_percent + cfg.battery_recover_percent
    if percent <= cfg.battery_critical_percent or (offloading and percent < critical_exit):
        return "critical", "battery_critical"
    if percent <= cfg.battery_low_percent:
        return "high", "battery_low"
    if percent < cfg.battery_low_percent + cfg.battery_recover_percent:
        return "band", None
    return "clear", None


@dataclass(frozen=True, slots=True)
class BatteryCondition:
    """The battery that counts (None: the device has none) and its band."""

    band: Band
    reason: str | None
    reading: BatteryReading | None

    def explain(self) -> str:
        r = self.reading
        if r is None or r.percent is None:
            return "no battery charge reported"
        return f"battery at {r.percent:.0f}% and {'discharging' if r.discharging else 'not discharging'}"


# --- memory -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Memory:
    """What a model may take: host MemAvailable, the cgroup headroom, and the smaller of the two."""

    available_bytes: int
    cgroup_headroom_bytes: int | None = None  # None: no limit on this cgroup or any ancestor
    psi_some_avg10: float | None = None

    @property
    def budget_bytes(self) -> int:
        """min(available, cgroup headroom): before reserve and safety margin (agent.catalog.fit.Budget)."""
        if self.cgroup_headroom_bytes is None:
            return self.available_bytes
        return min(self.available_bytes, self.cgroup_headroom_bytes)


def read_memory(memory: MemoryInfo) -> Memory:
    """The memory facts from a snapshot; an unknown MemAvailable falls back to the snapshot's budget (else 0)."""
    available = memory.available_bytes if memory.available_bytes is not None else (memory.budget_bytes or 0)
    cg = memory.cgroup
    headroom = None if cg is None or cg.headroom_bytes is None else max(0, cg.headroom_bytes)
    pressure = memory.pressure
    psi = pressure.some.avg10 if pressure is not None and pressure.some is not None else None
    return Memory(available_bytes=available, cgroup_headroom_bytes=headroom, psi_some_avg10=psi)


# --- all three --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conditions:
    """Heat, battery and memory of the device at one instant, each read and banded by the one rule."""

    heat: Heat
    battery: BatteryCondition
    memory: Memory

    def freeing(self, n_bytes: int | None) -> Conditions:
        """The same conditions with ``n_bytes`` more available (the loaded model's share, when replacing it)."""
        if not n_bytes:
            return self
        return replace(self, memory=replace(self.memory, available_bytes=self.memory.available_bytes + n_bytes))


def make_conditions(
    *,
    temperature_c: float | None,
    flags: frozenset[str],
    battery: BatteryReading | None,
    memory: Memory,
    soft_limit_c: float,
    hard_limit_c: float,
    cfg: AdaptSettings,
) -> Conditions:
    """Conditions from readings (a snapshot's, or an operator's ``plan --temperature ...`` overrides)."""
    h_band, h_reason = heat_band(temperature_c, flags, soft_limit_c, hard_limit_c, cfg)
    b_band, b_reason = (
        ("clear", None) if battery is None else battery_band(battery.percent, battery.discharging, cfg)
    )
    return Conditions(
        heat=Heat(h_band, h_reason, temperature_c, soft_limit_c, hard_limit_c, flags),
        battery=BatteryCondition(b_band, b_reason, battery),
        memory=memory,
    )


def device_conditions(
    snapshot: DeviceSnapshot, *, soft_limit_c: float, hard_limit_c: float, cfg: AdaptSettings
) -> Conditions:
    """The conditions of a probed device against its board's limits (see :func:`agent.adapt.settings.board_limits`)."""
    return make_conditions(
        temperature_c=snapshot.thermal.max_temp_c,
        flags=throttle_now(snapshot),
        battery=read_battery(snapshot.power),
        memory=read_memory(snapshot.memory),
        soft_limit_c=soft_limit_c,
        hard_limit_c=hard_limit_c,
        cfg=cfg,
    )
