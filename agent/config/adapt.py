"""Config ``[adapt]``: thresholds, margins and timings of live adaptation (used by :mod:`agent.adapt`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from agent.settings_base import Section


class AdaptSettings(Section):
    """Thresholds, margins and timings of the adaptation policy (agent/adapt/policy.py)."""

    enabled: bool = Field(True, description="Adapt threads, quant and offload to heat, battery and memory.")
    soft_limit_c: float | None = Field(
        None, description="Override the board's soft temperature limit (°C); default: from the board table."
    )
    hard_limit_c: float | None = Field(
        None, description="Override the board's hard temperature limit (°C); default: from the board table."
    )
    thermal_margin_c: float = Field(
        5.0, ge=0, description="Step down when the SoC is this close to the soft limit (or any throttle bit is set)."
    )
    thermal_recover_c: float = Field(
        10.0,
        ge=0,
        description="Step back up only below soft limit minus this; must exceed thermal_margin_c "
        "(the gap is the hysteresis band).",
    )
    critical_margin_c: float = Field(
        2.0, ge=0, description="Offload when the SoC is within this of the hard limit, before firmware throttles hard."
    )
    battery_low_percent: float = Field(
        20.0, ge=0, le=100, description="Discharging below this: fewer threads, then a smaller quant."
    )
    battery_critical_percent: float = Field(
        8.0, ge=0, le=100, description="Discharging below this: offload requests to the cloud."
    )
    battery_recover_percent: float = Field(
        5.0, ge=0, description="Still discharging, recover only above the threshold plus this many points."
    )
    psi_some_avg10: float = Field(
        10.0, ge=0, le=100, description="Memory PSI 'some avg10' (% stalled) at or above this is memory pressure."
    )
    memory_margin: float = Field(
        1.10,
        ge=1.0,
        description="Memory pressure when the budget (counting the loaded model) < model estimate x this factor.",
    )
    min_threads: int = Field(1, ge=1, description="Never go below this many generation threads.")
    thread_step: int = Field(1, ge=1, description="Threads removed or restored per step.")
    max_cap_steps: int = Field(2, ge=0, description="At most this many quant rungs below the fit decision.")
    down_dwell_s: float = Field(
        15.0, ge=0, description="Minimum time between two step-downs, so one step can take effect first."
    )
    hold_s: float = Field(
        60.0, ge=0, description="Conditions must stay clear this long before each single step back up."
    )

    @model_validator(mode="after")
    def _bands_make_sense(self) -> AdaptSettings:
        if self.thermal_recover_c <= self.thermal_margin_c:
            raise ValueError("thermal_recover_c must be larger than thermal_margin_c (otherwise it would flap)")
        if self.battery_critical_percent > self.battery_low_percent:
            raise ValueError("battery_critical_percent must not exceed battery_low_percent")
        if self.soft_limit_c is not None and self.hard_limit_c is not None and self.hard_limit_c < self.soft_limit_c:
            raise ValueError("hard_limit_c must not be below soft_limit_c")
        return self
