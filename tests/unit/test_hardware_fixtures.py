"""The probe against fake sysfs/procfs trees of real boards (tests/fixtures/sys/<case>), Telegraf-style."""

from __future__ import annotations

import pytest

from agent.hardware.snapshot import DeviceSnapshot
from tests.support.hardware import CASES, expected_data, probe_case, snapshot_data

MIB = 1024 * 1024


@pytest.mark.parametrize("case", CASES)
def test_snapshot_matches_expected_json(case: str) -> None:
    """Each fixture tree produces exactly the snapshot recorded in its expected.json."""
    assert snapshot_data(probe_case(case)) == expected_data(case)


@pytest.mark.parametrize("case", CASES)
def test_snapshot_survives_a_json_round_trip(case: str) -> None:
    """The JSON form (computed fields included) parses back into an equal snapshot."""
    snapshot = probe_case(case)
    assert DeviceSnapshot.model_validate_json(snapshot.model_dump_json()) == snapshot


# The figures below are written by hand from the fixture files, so that expected.json is not the only
# statement of what the probe must read.
@pytest.mark.parametrize(
    ("case", "board", "cpu", "budget"),
    [
        ("pi-zero-2w", "Raspberry Pi Zero 2 W Rev 1.0", ("aarch64", "Cortex-A53", 4, 4), (380, "mem_available")),
        ("pi4-2gb", "Raspberry Pi 4 Model B Rev 1.4", ("aarch64", "Cortex-A72", 4, 4), (1750, "mem_available")),
        ("pi5-8gb", "Raspberry Pi 5 Model B Rev 1.0", ("aarch64", "Cortex-A76", 4, 4), (7500, "mem_available")),
        (
            "laptop-battery",
            "LENOVO 20KHCTO1WW",
            ("x86_64", "Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz", 4, 8),
            (10_656.688, "mem_available"),
        ),
        ("cgroup-limited", "AZW MINI S", ("x86_64", "Intel(R) N100", 4, 4), (1024 - 300, "cgroup_max")),
    ],
)
def test_board_cpu_and_budget(case: str, board: str, cpu: tuple[str, str, int, int], budget: tuple[float, str]) -> None:
    """Board name, (arch, model, cores, threads) and the memory budget in MiB with the bound that gave it."""
    snapshot = probe_case(case)
    assert snapshot.board == board
    c = snapshot.cpu
    assert (c.arch, c.model_name, c.physical_cores, c.logical_cores) == cpu
    assert snapshot.memory.budget_bytes == pytest.approx(budget[0] * MIB, abs=1024)
    assert snapshot.memory.budget_source == budget[1]


def test_pi_zero_is_hot_and_throttled_by_undervoltage() -> None:
    """0x50005 decodes to under-voltage and throttling, both now and since boot; the SoC is at 78.4 °C."""
    thermal = probe_case("pi-zero-2w").thermal
    assert thermal.max_temp_c == 78.388
    assert thermal.throttle is not None
    assert thermal.throttle.raw_hex == "0x50005"
    assert thermal.throttle.now.under_voltage
    assert thermal.throttle.now.throttled
    assert not thermal.throttle.now.arm_freq_capped
    assert not thermal.throttle.now.soft_temp_limit
    assert thermal.throttle.since_boot == thermal.throttle.now


def test_pi_zero_reports_configured_zram_only() -> None:
    """zram0 (256 MiB) is reported with its compressed RAM use; the unconfigured zram1 is not."""
    zram = probe_case("pi-zero-2w").memory.zram
    assert [(d.name, d.disksize_bytes, d.mem_used_bytes) for d in zram] == [("zram0", 256 * MIB, 13 * MIB)]


def test_pi_zero_reports_memory_pressure() -> None:
    """The PSI 'some' and 'full' averages are read from /proc/pressure/memory."""
    pressure = probe_case("pi-zero-2w").memory.pressure
    assert pressure is not None
    assert pressure.some is not None
    assert pressure.full is not None
    assert (pressure.some.avg10, pressure.full.avg300) == (3.12, 0.07)


def test_pi5_reads_fan_trip_points_and_cpu_thermal_hwmon() -> None:
    """Pi 5 trip points come out in index order and hwmon chips without temperatures are skipped."""
    thermal = probe_case("pi5-8gb").thermal
    assert [(t.type, t.temp_c) for t in thermal.zones[0].trip_points] == [
        ("critical", 110.0),
        ("active", 75.0),
        ("active", 67.5),
        ("active", 60.0),
        ("active", 50.0),
    ]
    assert [(s.chip, s.temp_c) for s in thermal.hwmon] == [("cpu_thermal", 41.6)]
    assert thermal.throttle is not None
    assert thermal.throttle.raw == 0


def test_laptop_on_battery_ignores_the_mouse_battery() -> None:
    """BAT0 discharging at 8.45 W with AC offline; a scope=Device HID battery is not a system battery."""
    power = probe_case("laptop-battery").power
    assert [(b.name, b.capacity_pct, b.status, b.power_w) for b in power.batteries] == [
        ("BAT0", 64, "Discharging", 8.45)
    ]
    assert power.ac_online is False
    assert power.on_battery


def test_laptop_reads_coretemp_labels_and_limits() -> None:
    """coretemp sensors keep their labels and max/crit limits; the hottest reading is 58 °C."""
    thermal = probe_case("laptop-battery").thermal
    coretemp = [s for s in thermal.hwmon if s.chip == "coretemp"]
    assert [s.label for s in coretemp] == ["Package id 0", "Core 0", "Core 1", "Core 2", "Core 3"]
    assert {(s.max_c, s.crit_c) for s in coretemp} == {(100.0, 100.0)}
    assert thermal.throttle is None
    assert thermal.max_temp_c == 58.0


def test_cgroup_limit_caps_the_budget_below_mem_available() -> None:
    """With MemoryMax=1G and 300 MiB used, the budget is 724 MiB although the host has 6.8 GiB available."""
    memory = probe_case("cgroup-limited").memory
    assert memory.cgroup is not None
    assert memory.cgroup.max_bytes == 1024 * MIB
    assert memory.cgroup.current_bytes == 300 * MIB
    assert memory.cgroup.high_bytes is None
    assert memory.cgroup.limiting_path == "/system.slice/edge-agent.service"
    assert memory.available_bytes is not None
    assert memory.available_bytes > 6 * 1024 * MIB
    assert memory.budget_bytes == 724 * MIB
