"""Pure derivations over snapshots: memory budget, throttle decoding, CPU percent, rendering."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from agent.hardware.render import format_bytes, render_table
from agent.hardware.snapshot import (
    BudgetSource,
    CgroupMemory,
    CpuInfo,
    CpuTimes,
    DeviceSnapshot,
    MemoryInfo,
    PowerInfo,
    ThermalInfo,
    ThrottleState,
    cpu_percent,
    derive_budget,
)

MIB = 1024 * 1024


def _cgroup(headroom: int | None, limited_by: str | None = "memory.max") -> CgroupMemory:
    return CgroupMemory.model_validate(
        {
            "version": 2,
            "path": "/system.slice/edge-agent.service",
            "max_bytes": None,
            "high_bytes": None,
            "current_bytes": 100 * MIB,
            "headroom_bytes": headroom,
            "limited_by": limited_by if headroom is not None else None,
            "limiting_path": "/system.slice/edge-agent.service" if headroom is not None else None,
        }
    )


@pytest.mark.parametrize(
    ("available", "cgroup", "budget", "source"),
    [
        (1750 * MIB, None, 1750 * MIB, "mem_available"),
        (1750 * MIB, _cgroup(None), 1750 * MIB, "mem_available"),
        (7000 * MIB, _cgroup(724 * MIB), 724 * MIB, "cgroup_max"),
        (380 * MIB, _cgroup(724 * MIB), 380 * MIB, "mem_available"),
        (7000 * MIB, _cgroup(500 * MIB, "memory.high"), 500 * MIB, "cgroup_high"),
        (7000 * MIB, _cgroup(-5 * MIB, "memory.high"), 0, "cgroup_high"),
        (724 * MIB, _cgroup(724 * MIB), 724 * MIB, "mem_available"),
        (None, _cgroup(724 * MIB), 724 * MIB, "cgroup_max"),
        (None, None, None, None),
    ],
)
def test_budget_is_the_smaller_of_host_and_cgroup(
    available: int | None, cgroup: CgroupMemory | None, budget: int | None, source: BudgetSource | None
) -> None:
    """budget = min(MemAvailable, cgroup headroom), naming the bound; over-limit usage gives 0, not < 0."""
    assert derive_budget(available, cgroup) == (budget, source)


@pytest.mark.parametrize(
    ("mask", "now", "since_boot"),
    [
        (0x0, [], []),
        (0x50005, ["under_voltage", "throttled"], ["under_voltage", "throttled"]),
        (0x80000, [], ["soft_temp_limit"]),
        (
            0xF000F,
            ["under_voltage", "arm_freq_capped", "throttled", "soft_temp_limit"],
            ["under_voltage", "arm_freq_capped", "throttled", "soft_temp_limit"],
        ),
        (0x20002, ["arm_freq_capped"], ["arm_freq_capped"]),
        (0x10000, [], ["under_voltage"]),
    ],
)
def test_throttle_mask_decodes_to_named_flags(mask: int, now: list[str], since_boot: list[str]) -> None:
    """Bits 0-3 are the current conditions and bits 16-19 the same conditions since boot."""
    state = ThrottleState.from_mask(mask, "sysfs")
    assert [k for k, v in state.now.model_dump().items() if v] == now
    assert [k for k, v in state.since_boot.model_dump().items() if v] == since_boot
    assert state.raw_hex == f"0x{mask:x}"


@pytest.mark.parametrize(
    ("before", "after", "percent"),
    [
        (CpuTimes(busy=100, total=1000), CpuTimes(busy=150, total=1100), 50.0),
        (CpuTimes(busy=100, total=1000), CpuTimes(busy=100, total=1400), 0.0),
        (CpuTimes(busy=100, total=1000), CpuTimes(busy=400, total=1300), 100.0),
        (CpuTimes(busy=100, total=1000), CpuTimes(busy=100, total=1000), None),
        (CpuTimes(busy=100, total=1000), CpuTimes(busy=10, total=50), None),
    ],
)
def test_cpu_percent_between_two_readings(before: CpuTimes, after: CpuTimes, percent: float | None) -> None:
    """Busy share of the elapsed ticks; None when no time passed or the counters went backwards."""
    assert cpu_percent(before, after) == percent


def test_snapshots_are_frozen() -> None:
    """A snapshot cannot be changed after the probe made it."""
    cpu = CpuInfo(arch="aarch64", model_name=None, physical_cores=4, logical_cores=4)
    with pytest.raises(ValidationError):
        cpu.physical_cores = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (512, "512 B"), (1536, "1.5 KiB"), (724 * MIB, "724.0 MiB"), (8 * 1024 * MIB, "8.0 GiB")],
)
def test_format_bytes_uses_binary_units(value: int | None, text: str) -> None:
    """Sizes print in KiB/MiB/GiB with one decimal; unknown prints as '-'."""
    assert format_bytes(value) == text


def test_table_of_an_empty_device_says_what_is_missing() -> None:
    """A snapshot with nothing readable still renders, with '-' and 'no sensors' rather than failing."""
    snapshot = DeviceSnapshot(
        ts=datetime(2025, 1, 1, tzinfo=UTC),
        board=None,
        cpu=CpuInfo(arch="riscv64", model_name=None, physical_cores=None, logical_cores=None),
        memory=MemoryInfo(
            total_bytes=None,
            available_bytes=None,
            swap_total_bytes=None,
            swap_free_bytes=None,
            budget_bytes=None,
            budget_source=None,
        ),
        load=None,
        disk=None,
        thermal=ThermalInfo(),
        power=PowerInfo(),
    )
    rows = dict(line.split(None, 1) for line in render_table(snapshot).splitlines())
    assert rows["Board"].strip() == "-"
    assert rows["Budget"].strip().startswith("unknown")
    assert rows["Temperature"].strip() == "no sensors"
