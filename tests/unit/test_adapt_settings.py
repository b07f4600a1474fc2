"""Per-board thermal limits and the reduction of a hardware snapshot to the policy's observation."""

from __future__ import annotations

import pytest

from agent.adapt.policy import observe
from agent.adapt.settings import AdaptSettings, ThermalLimits, board_limits
from agent.hardware.snapshot import ThrottleState
from tests.support.hardware import probe_case


@pytest.mark.parametrize(
    ("board", "soft", "hard"),
    [
        ("Raspberry Pi Zero 2 W Rev 1.0", 80, 85),
        ("Raspberry Pi 3 Model B Plus Rev 1.3", 60, 85),
        ("Raspberry Pi 4 Model B Rev 1.4", 80, 85),
        ("Raspberry Pi 5 Model B Rev 1.0", 80, 85),
        ("Raspberry Pi Compute Module 4 Rev 1.1", 80, 85),
        ("Orange Pi 5", 85, 115),
    ],
)
def test_board_table_follows_device_profiles(board: str, soft: float, hard: float) -> None:
    """Each board in device-profiles.toml gets its published soft and hard limit."""
    snap = probe_case("pi4-2gb").model_copy(update={"board": board})
    limits = board_limits(snap, AdaptSettings())
    assert (limits.soft_c, limits.hard_c) == (soft, hard)
    assert limits.source.startswith("board:")


def test_unknown_x86_board_uses_generic_x86_limits() -> None:
    """A laptop with no usable passive trip point falls back to the generic x86 limits (90/105 °C)."""
    limits = board_limits(probe_case("laptop-battery"), AdaptSettings())
    assert limits == ThermalLimits(soft_c=90.0, hard_c=105.0, source="generic")


def test_config_overrides_the_board_table() -> None:
    """[adapt] soft_limit_c / hard_limit_c win over the table."""
    limits = board_limits(probe_case("pi4-2gb"), AdaptSettings(soft_limit_c=70.0, hard_limit_c=75.0))
    assert limits == ThermalLimits(soft_c=70.0, hard_c=75.0, source="config")


def test_observe_a_pi4_snapshot() -> None:
    """A Pi 4 snapshot gives its SoC temperature, no battery, and the budget with the model's share added back."""
    snap = probe_case("pi4-2gb")
    limits = board_limits(snap, AdaptSettings())
    o = observe(snap, limits, ts=12.0, model_estimate_bytes=500_000_000)
    assert o.ts == 12.0
    assert o.temperature_c == snap.thermal.max_temp_c
    assert (o.soft_limit_c, o.hard_limit_c) == (80.0, 85.0)
    assert o.battery_percent is None
    assert not o.battery_discharging
    assert o.memory_budget_bytes == snap.memory.budget_bytes + 500_000_000
    assert o.psi_some_avg10 == 0.0
    assert o.throttle_now == frozenset()


def test_observe_decodes_throttle_bits_now_only() -> None:
    """Only the 'now' throttle bits reach the policy; 'since boot' history does not."""
    snap = probe_case("pi4-2gb")
    snap = snap.model_copy(
        update={"thermal": snap.thermal.model_copy(update={"throttle": ThrottleState.from_mask(0x50004, "sysfs")})}
    )
    o = observe(snap, board_limits(snap, AdaptSettings()), ts=0.0, model_estimate_bytes=None)
    assert o.throttle_now == frozenset({"throttled"})


def test_observe_a_discharging_laptop_battery() -> None:
    """The laptop fixture is discharging at 64 %."""
    snap = probe_case("laptop-battery")
    o = observe(snap, board_limits(snap, AdaptSettings()), ts=0.0, model_estimate_bytes=None, model_loaded=False)
    assert o.battery_percent == 64.0
    assert o.battery_discharging
    assert o.memory_budget_bytes == snap.memory.budget_bytes
