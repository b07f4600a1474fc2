"""The per-board thermal limits live adaptation starts from; its knobs (config ``[adapt]``,
:class:`~agent.config.adapt.AdaptSettings`, re-exported here) live in the configuration layer.

The board table mirrors ``device-profiles.toml`` (the vendors' published soft/hard limits). A board we
do not know falls back to the kernel's own trip points, then to conservative generic limits; an
operator can always pin both limits in the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.adapt import AdaptSettings
from agent.hardware.snapshot import DeviceSnapshot

__all__ = ["AdaptSettings", "ThermalLimits", "board_limits"]


@dataclass(frozen=True, slots=True)
class ThermalLimits:
    """Where the board's firmware starts capping the clock (soft) and throttles hard (hard), in °C."""

    soft_c: float
    hard_c: float
    source: str  # "config", "board:<name>", "trip_points", "generic"


# (substring of /proc/device-tree/model or the DMI product, soft °C, hard °C) from device-profiles.toml.
# More specific names first: "Raspberry Pi 3 Model B Plus" must not match a generic "Raspberry Pi 3".
BOARD_LIMITS: tuple[tuple[str, float, float], ...] = (
    ("Raspberry Pi Zero 2", 80.0, 85.0),
    ("Raspberry Pi 3 Model B Plus", 60.0, 85.0),
    ("Raspberry Pi 3 Model B+", 60.0, 85.0),
    ("Raspberry Pi 4", 80.0, 85.0),
    ("Raspberry Pi 5", 80.0, 85.0),
    ("Raspberry Pi", 80.0, 85.0),
    ("Orange Pi 5", 85.0, 115.0),
)
GENERIC_ARM = (80.0, 85.0)
GENERIC_X86 = (90.0, 105.0)


def board_limits(snapshot: DeviceSnapshot, settings: AdaptSettings) -> ThermalLimits:
    """The thermal limits the policy works against: config override, board table, trip points, generic."""
    soft, hard, source = _table_limits(snapshot)
    if settings.soft_limit_c is not None or settings.hard_limit_c is not None:
        soft = settings.soft_limit_c if settings.soft_limit_c is not None else soft
        hard = settings.hard_limit_c if settings.hard_limit_c is not None else max(hard, soft)
        source = "config"
    return ThermalLimits(soft_c=soft, hard_c=max(hard, soft), source=source)


def _table_limits(snapshot: DeviceSnapshot) -> tuple[float, float, str]:
    board = snapshot.board or ""
    for name, soft, hard in BOARD_LIMITS:
        if name.lower() in board.lower():
            return soft, hard, f"board:{name}"
    passive = [
        tp.temp_c
        for z in snapshot.thermal.zones
        for tp in z.trip_points
        if tp.type == "passive" and tp.temp_c is not None and tp.temp_c > 0
    ]
    critical = [
        tp.temp_c
        for z in snapshot.thermal.zones
        for tp in z.trip_points
        if tp.type in ("critical", "hot") and tp.temp_c is not None and tp.temp_c > 0
    ]
    generic = GENERIC_X86 if snapshot.cpu.arch in ("x86_64", "i686", "amd64") else GENERIC_ARM
    if passive:
        soft = min(passive)
        return soft, max(min(critical) if critical else soft + 10.0, soft), "trip_points"
    return generic[0], generic[1], "generic"
