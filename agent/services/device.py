"""The device as the daemon's services read it: a probe under the configured sysfs/procfs roots, the board's
thermal limits (fixed at the first probe) and the conditions (heat, battery, memory) the model owner plans with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.adapt.settings import ThermalLimits, board_limits
from agent.hardware.conditions import Conditions, device_conditions
from agent.hardware.probe import probe_device

if TYPE_CHECKING:
    from agent.hardware.snapshot import DeviceSnapshot
    from agent.settings import Settings


class DeviceReader:
    """Probes the device with the current settings; ``limits`` are the board's, from the first probe."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self.limits: ThermalLimits | None = None

    def probe(self) -> DeviceSnapshot:
        settings = self._settings()
        hw = settings.hardware
        models_dir = settings.model.path.parent if settings.model.path else None
        return probe_device(hw.sys_root, hw.proc_root, models_dir)

    def first_probe(self) -> DeviceSnapshot:
        """Probe and fix the thermal limits the policy and the fit decision work against."""
        snapshot = self.probe()
        self.limits = board_limits(snapshot, self._settings().adapt)
        return snapshot

    def conditions(self) -> Conditions:
        """Heat, battery and memory now, through the one rule (``[adapt]`` thresholds)."""
        adapt = self._settings().adapt
        snap = self.probe()
        limits = self.limits or board_limits(snap, adapt)
        return device_conditions(snap, soft_limit_c=limits.soft_c, hard_limit_c=limits.hard_c, cfg=adapt)
