"""The one reading of heat, battery and memory (agent.hardware.conditions), over the boards in device-profiles.toml.

Fit, the live policy, telemetry and ``edge-agent plan`` all take their heat band, battery and memory
budget from here, so the tables below pin every threshold from both sides.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.adapt.policy import Observation, assess
from agent.adapt.settings import board_limits
from agent.catalog.fit import condition_steps
from agent.config.adapt import AdaptSettings
from agent.hardware.conditions import (
    THROTTLE_FLAGS,
    BatteryReading,
    Memory,
    battery_band,
    device_conditions,
    heat_band,
    make_conditions,
    read_battery,
    read_memory,
    throttle_now,
)
from agent.hardware.snapshot import Battery, CgroupMemory, MemoryInfo, PowerInfo, ThrottleState
from tests.support.hardware import probe_case

PROFILES = Path(__file__).resolve().parents[2].parent / "shared" / "device-profiles.toml"
CFG = AdaptSettings()
EPS = 0.1


def _boards() -> list[Any]:
    if not PROFILES.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason="../shared/device-profiles.toml not present"))]
    boards = tomllib.loads(PROFILES.read_text(encoding="utf-8"))["board"]
    return [pytest.param(b, id=b["name"]) for b in boards]


def _heat_table(soft: float, hard: float) -> list[tuple[float, bool, str]]:
    """(temperature, offloading, band) just below and at each threshold of one board."""
    margin, recover, critical = CFG.thermal_margin_c, CFG.thermal_recover_c, CFG.critical_margin_c
    critical_at = hard - critical
    width = recover - margin
    return [
        (soft - recover - EPS, False, "clear"),
        (soft - recover, False, "band"),
        (soft - margin - EPS, False, "band"),
        (soft - margin, False, "high"),
        (critical_at - EPS, False, "high"),
        (critical_at, False, "critical"),
        (hard, False, "critical"),
        (hard + 10, False, "critical"),
        # Once offloading, critical holds until below critical_at - width (the exit hysteresis).
        (critical_at - width, True, "critical"),
        (critical_at - width - EPS, True, "high" if critical_at - width - EPS >= soft - margin else "band"),
    ]


@pytest.mark.parametrize("board", _boards())
def test_heat_band_around_every_threshold_of_every_board(board: dict[str, Any]) -> None:
    """Each board's soft/hard limits: clear, band, high, critical switch exactly at the [adapt] margins."""
    soft, hard = float(board["soft_temp_c"]), float(board["hard_temp_c"])
    for temp, offloading, band in _heat_table(soft, hard):
        got, _ = heat_band(temp, frozenset(), soft, hard, CFG, offloading=offloading)
        assert got == band, f"{board['name']} at {temp} °C (offloading={offloading})"


@pytest.mark.parametrize("board", _boards())
def test_fit_steps_follow_the_heat_band_on_every_board(board: dict[str, Any]) -> None:
    """The fit decision's rungs come from the same band: high 1, critical 2, clear and band 0."""
    soft, hard = float(board["soft_temp_c"]), float(board["hard_temp_c"])
    for temp, offloading, band in _heat_table(soft, hard):
        if offloading:
            continue  # the fit decision never looks at the offload hysteresis
        cond = make_conditions(temperature_c=temp, flags=frozenset(), battery=None, memory=Memory(available_bytes=0),
                               soft_limit_c=soft, hard_limit_c=hard, cfg=CFG)
        assert cond.heat.band == band
        assert condition_steps(cond)[0] == {"clear": 0, "band": 0, "high": 1, "critical": 2}[band]


@pytest.mark.parametrize("flag", THROTTLE_FLAGS)
@pytest.mark.parametrize(("temp", "band"), [(None, "high"), (40.0, "high"), (77.0, "high"), (83.0, "critical")])
def test_any_throttle_bit_now_is_high_unless_already_critical(flag: str, temp: float | None, band: str) -> None:
    """Every one of the four firmware bits set *now* makes heat high; a critical temperature stays critical."""
    assert heat_band(temp, frozenset({flag}), 80.0, 85.0, CFG)[0] == band


@pytest.mark.parametrize(
    ("mask", "flags"),
    [
        (0x0, frozenset()),
        (0x1, frozenset({"under_voltage"})),
        (0x2, frozenset({"arm_freq_capped"})),
        (0x4, frozenset({"throttled"})),
        (0x8, frozenset({"soft_temp_limit"})),
        (0x50005, frozenset({"under_voltage", "throttled"})),
        (0xF0000, frozenset()),  # only "has occurred since boot": history, not now
        (0x8000F, frozenset(THROTTLE_FLAGS)),
    ],
)
def test_only_the_now_throttle_bits_count(mask: int, flags: frozenset[str]) -> None:
    """Bits 0-3 are read as the flags now; bits 16-19 (since boot) never reach a decision."""
    snap = probe_case("pi4-2gb")
    snap = snap.model_copy(
        update={"thermal": snap.thermal.model_copy(update={"throttle": ThrottleState.from_mask(mask, "sysfs")})}
    )
    assert throttle_now(snap) == flags
    limits = board_limits(snap, CFG)
    cond = device_conditions(snap, soft_limit_c=limits.soft_c, hard_limit_c=limits.hard_c, cfg=CFG)
    assert (cond.heat.band == "high") == bool(flags)


def test_no_temperature_and_no_throttle_bit_is_clear() -> None:
    """A device without sensors is not guessed hot."""
    assert heat_band(None, frozenset(), 80.0, 85.0, CFG) == ("clear", None)


@pytest.mark.parametrize("board", _boards())
def test_the_policy_and_the_conditions_agree_on_heat(board: dict[str, Any]) -> None:
    """For every temperature from 30 °C to past the hard limit, the live policy's band is the conditions' band."""
    soft, hard = float(board["soft_temp_c"]), float(board["hard_temp_c"])
    temp = 30.0
    while temp <= hard + 5:
        for offloading in (False, True):
            obs = Observation(ts=0.0, temperature_c=temp, soft_limit_c=soft, hard_limit_c=hard)
            expected, _ = heat_band(temp, frozenset(), soft, hard, CFG, offloading=offloading)
            assert assess(obs, CFG, offloading=offloading).thermal == expected
        temp += 0.5


# --- battery ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "discharging", "offloading", "band"),
    [
        (None, True, False, "clear"),
        (5.0, False, False, "clear"),  # charging / on mains: never counts
        (100.0, True, False, "clear"),
        (25.0, True, False, "clear"),  # low 20 + recover 5
        (24.9, True, False, "band"),
        (20.1, True, False, "band"),
        (20.0, True, False, "high"),  # at battery_low_percent
        (8.1, True, False, "high"),
        (8.0, True, False, "critical"),  # at battery_critical_percent
        (0.0, True, False, "critical"),
        (12.9, True, True, "critical"),  # offloading: critical until 8 + 5
        (13.0, True, True, "high"),
        (13.0, False, True, "clear"),
    ],
)
def test_battery_band(percent: float | None, discharging: bool, offloading: bool, band: str) -> None:
    """Only a discharging battery counts: low at 20 %, critical at 8 %, recovery 5 points above each."""
    assert battery_band(percent, discharging, CFG, offloading=offloading)[0] == band


def _bat(name: str, pct: int | None, status: str | None = "Discharging") -> Battery:
    return Battery(name=name, capacity_pct=pct, status=status, power_w=None, voltage_v=None)


@pytest.mark.parametrize(
    ("power", "expected"),
    [
        (PowerInfo(), None),
        (PowerInfo(batteries=(_bat("BAT0", 64),)), BatteryReading("BAT0", 64.0, True, "Discharging")),
        (PowerInfo(batteries=(_bat("BAT0", 64, "Charging"),), ac_online=True),
         BatteryReading("BAT0", 64.0, False, "Charging")),
        (PowerInfo(batteries=(_bat("BAT0", 90, "Full"),), ac_online=True), BatteryReading("BAT0", 90.0, False, "Full")),
        # AC reported offline with a battery present: on battery even if the status does not say so.
        (PowerInfo(batteries=(_bat("BAT0", 50, "Unknown"),), ac_online=False),
         BatteryReading("BAT0", 50.0, True, "Unknown")),
        (PowerInfo(batteries=(_bat("BAT0", 50, "Not charging"),), ac_online=None),
         BatteryReading("BAT0", 50.0, False, "Not charging")),
        # Two batteries: the lowest charge counts; one without a charge level is skipped.
        (PowerInfo(batteries=(_bat("BAT0", 70), _bat("BAT1", 30))), BatteryReading("BAT1", 30.0, True, "Discharging")),
        (PowerInfo(batteries=(_bat("ups", None), _bat("BAT0", 40))), BatteryReading("BAT0", 40.0, True, "Discharging")),
        (PowerInfo(batteries=(_bat("ups", None, "Charging"),)), BatteryReading("ups", None, False, "Charging")),
    ],
)
def test_one_battery_rule(power: PowerInfo, expected: BatteryReading | None) -> None:
    """Which battery counts and whether the device runs on it, read one way for fit, policy and telemetry."""
    assert read_battery(power) == expected


# --- memory -----------------------------------------------------------------------------------------

GiB = 2**30


def _cgroup(headroom: int | None, limit: int | None = GiB) -> CgroupMemory:
    return CgroupMemory(version=2, path="/system.slice/edge-agent.service", max_bytes=limit, high_bytes=None,
                        current_bytes=GiB // 4, headroom_bytes=headroom,
                        limited_by="memory.max" if headroom is not None else None,
                        limiting_path="/system.slice" if headroom is not None else None)


def _mem(available: int | None, cgroup: CgroupMemory | None, budget: int | None) -> MemoryInfo:
    return MemoryInfo(total_bytes=8 * GiB, available_bytes=available, swap_total_bytes=0, swap_free_bytes=0,
                      cgroup=cgroup, budget_bytes=budget, budget_source=None)


@pytest.mark.parametrize(
    ("memory", "available", "headroom", "budget"),
    [
        (_mem(7 * GiB, None, 7 * GiB), 7 * GiB, None, 7 * GiB),  # no cgroup
        (_mem(7 * GiB, _cgroup(None, limit=None), 7 * GiB), 7 * GiB, None, 7 * GiB),  # cgroup, no limit anywhere
        (_mem(7 * GiB, _cgroup(3 * GiB // 4), 3 * GiB // 4), 7 * GiB, 3 * GiB // 4, 3 * GiB // 4),  # MemoryMax=
        (_mem(GiB // 2, _cgroup(3 * GiB // 4), GiB // 2), GiB // 2, 3 * GiB // 4, GiB // 2),  # host tighter
        (_mem(7 * GiB, _cgroup(-GiB // 8), 0), 7 * GiB, 0, 0),  # above memory.high: no headroom, not negative
        (_mem(None, _cgroup(GiB // 2), GiB // 2), GiB // 2, GiB // 2, GiB // 2),  # no MemAvailable: the budget
        (_mem(None, None, None), 0, None, 0),  # nothing known: nothing promised
    ],
)
def test_memory_budget(memory: MemoryInfo, available: int, headroom: int | None, budget: int) -> None:
    """MemAvailable and the cgroup headroom (own cgroup and ancestors); the smaller is the budget."""
    got = read_memory(memory)
    assert (got.available_bytes, got.cgroup_headroom_bytes, got.budget_bytes) == (available, headroom, budget)


def test_freeing_adds_the_loaded_model_to_available() -> None:
    """Planning a replacement counts the loaded model's share as available."""
    cond = make_conditions(temperature_c=None, flags=frozenset(), battery=None, memory=Memory(available_bytes=GiB),
                           soft_limit_c=80.0, hard_limit_c=85.0, cfg=CFG)
    assert cond.freeing(GiB // 2).memory.available_bytes == GiB + GiB // 2
    assert cond.freeing(None) is cond


# --- the fixture devices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "heat", "battery", "budget_source"),
    [
        ("pi-zero-2w", "high", None, "mem_available"),  # under-voltage and throttled now (0x50005)
        ("pi4-2gb", "clear", None, "mem_available"),
        ("pi5-8gb", "clear", None, "mem_available"),
        ("laptop-battery", "clear", ("clear", 64.0, True), "mem_available"),
        ("cgroup-limited", "clear", None, "cgroup_max"),
    ],
)
def test_fixture_devices(case: str, heat: str, battery: tuple[str, float, bool] | None, budget_source: str) -> None:
    """Every fixture tree read end to end: heat band, the battery that counts, and the budget the probe derived."""
    snap = probe_case(case)
    limits = board_limits(snap, CFG)
    cond = device_conditions(snap, soft_limit_c=limits.soft_c, hard_limit_c=limits.hard_c, cfg=CFG)
    assert cond.heat.band == heat
    assert cond.heat.temperature_c == snap.thermal.max_temp_c
    assert (cond.heat.soft_limit_c, cond.heat.hard_limit_c) == (limits.soft_c, limits.hard_c)
    reading = cond.battery.reading
    if battery is None:
        assert reading is None
        assert cond.battery.band == "clear"
    else:
        assert reading is not None
        assert (cond.battery.band, reading.percent, reading.discharging) == battery
    assert cond.memory.budget_bytes == snap.memory.budget_bytes
    assert snap.memory.budget_source == budget_source
