"""The sysfs/procfs readers against small trees built in tmp_path: fallbacks, limits and odd files."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.hardware.probe import (
    CpuPercentSampler,
    parse_throttle_mask,
    probe_device,
    read_cgroup_memory,
    read_cpu,
    read_disk,
    read_hwmon,
    read_loadavg,
    read_memory,
    read_power,
    read_thermal_zones,
    read_throttle,
)
from tests.support.hardware import write_tree

MIB = 1024 * 1024
SERVICE = "/system.slice/edge-agent.service"


def _roots(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "sys", tmp_path / "proc"


def test_empty_roots_give_a_snapshot_of_unknowns(tmp_path: Path) -> None:
    """Nothing readable is not an error: every field is None or empty, and the misses are logged at debug."""
    sys_root, proc_root = _roots(tmp_path)
    with capture_logs() as logs:
        snapshot = probe_device(sys_root, proc_root, use_vcgencmd=False)
    assert snapshot.board is None
    assert (snapshot.cpu.physical_cores, snapshot.cpu.logical_cores, snapshot.cpu.model_name) == (None, None, None)
    assert snapshot.memory.total_bytes is None
    assert snapshot.memory.cgroup is None
    assert snapshot.memory.budget_bytes is None
    assert snapshot.load is None
    assert snapshot.thermal.zones == ()
    assert snapshot.thermal.throttle is None
    assert snapshot.power.batteries == ()
    missing = {e["path"] for e in logs if e["event"] == "hardware_file_missing"}
    assert str(proc_root / "meminfo") in missing
    assert {e["log_level"] for e in logs} == {"debug"}


def test_unreadable_and_garbled_files_become_none(tmp_path: Path) -> None:
    """A directory where a file should be, or text where a number should be, gives None for that field."""
    sys_root, proc_root = _roots(tmp_path)
    write_tree(
        tmp_path,
        {
            "sys/class/thermal/thermal_zone0/type": "cpu-thermal",
            "sys/class/thermal/thermal_zone1/type": "gpu-thermal",
            "sys/class/thermal/thermal_zone1/temp": "not a number",
            "proc/loadavg": "garbage",
        },
    )
    (sys_root / "class/thermal/thermal_zone0/temp").mkdir()
    zones = read_thermal_zones(sys_root)
    assert [(z.type, z.temp_c) for z in zones] == [("cpu-thermal", None), ("gpu-thermal", None)]
    assert read_loadavg(proc_root) is None


def test_thermal_zones_sort_numerically(tmp_path: Path) -> None:
    """thermal_zone10 comes after thermal_zone9, not after thermal_zone1."""
    sys_root, _ = _roots(tmp_path)
    write_tree(tmp_path, {f"sys/class/thermal/thermal_zone{n}/temp": str(n * 1000) for n in (1, 10, 9)})
    assert [z.name for z in read_thermal_zones(sys_root)] == ["thermal_zone1", "thermal_zone9", "thermal_zone10"]


def _cgroup_tree(tmp_path: Path, files: dict[str, str], own: str = SERVICE) -> tuple[Path, Path]:
    write_tree(tmp_path, {"proc/self/cgroup": f"0::{own}", **files})
    return _roots(tmp_path)


def test_a_parent_slice_limit_binds_the_service(tmp_path: Path) -> None:
    """MemoryMax on system.slice limits the service too when it leaves less room than the service's own."""
    sys_root, proc_root = _cgroup_tree(
        tmp_path,
        {
            f"sys/fs/cgroup{SERVICE}/memory.max": str(2048 * MIB),
            f"sys/fs/cgroup{SERVICE}/memory.current": str(100 * MIB),
            "sys/fs/cgroup/system.slice/memory.max": str(1024 * MIB),
            "sys/fs/cgroup/system.slice/memory.current": str(900 * MIB),
        },
    )
    cgroup = read_cgroup_memory(sys_root, proc_root)
    assert cgroup is not None
    assert cgroup.max_bytes == 2048 * MIB
    assert (cgroup.headroom_bytes, cgroup.limited_by, cgroup.limiting_path) == (
        124 * MIB,
        "memory.max",
        "/system.slice",
    )


def test_memory_high_below_max_gives_the_budget(tmp_path: Path) -> None:
    """MemoryHigh= throttles before MemoryMax= kills, so the lower memory.high sets the budget."""
    sys_root, proc_root = _cgroup_tree(
        tmp_path,
        {
            "proc/meminfo": "MemTotal: 8000000 kB\nMemAvailable: 7000000 kB",
            f"sys/fs/cgroup{SERVICE}/memory.max": str(1024 * MIB),
            f"sys/fs/cgroup{SERVICE}/memory.high": str(800 * MIB),
            f"sys/fs/cgroup{SERVICE}/memory.current": str(300 * MIB),
        },
    )
    memory = read_memory(sys_root, proc_root)
    assert (memory.budget_bytes, memory.budget_source) == (500 * MIB, "cgroup_high")


def test_container_root_cgroup_limit_is_read(tmp_path: Path) -> None:
    """In a container, /proc/self/cgroup says '0::/' and the limit sits at the cgroup mount's root."""
    sys_root, proc_root = _cgroup_tree(
        tmp_path,
        {"sys/fs/cgroup/memory.max": str(512 * MIB), "sys/fs/cgroup/memory.current": str(12 * MIB)},
        own="/",
    )
    cgroup = read_cgroup_memory(sys_root, proc_root)
    assert cgroup is not None
    assert (cgroup.path, cgroup.headroom_bytes) == ("/", 500 * MIB)


def test_cgroup_v1_memory_controller_on_a_hybrid_host(tmp_path: Path) -> None:
    """Hybrid hosts keep memory in v1: limit_in_bytes is read, and ~LONG_MAX there means unlimited."""
    write_tree(
        tmp_path,
        {
            "proc/self/cgroup": "4:memory:/svc\n1:name=systemd:/svc\n0::/svc",
            "sys/fs/cgroup/unified/svc/cgroup.procs": "1",
            "sys/fs/cgroup/memory/svc/memory.limit_in_bytes": "9223372036854771712",
            "sys/fs/cgroup/memory/svc/memory.usage_in_bytes": str(30 * MIB),
            "sys/fs/cgroup/memory/svc/memory.stat": f"cache 0\ntotal_inactive_file {MIB}",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": str(256 * MIB),
            "sys/fs/cgroup/memory/memory.usage_in_bytes": str(56 * MIB),
        },
    )
    cgroup = read_cgroup_memory(*_roots(tmp_path))
    assert cgroup is not None
    assert (cgroup.version, cgroup.max_bytes, cgroup.current_bytes) == (1, None, 30 * MIB)
    assert cgroup.inactive_file_bytes == MIB
    assert (cgroup.headroom_bytes, cgroup.limiting_path) == (200 * MIB, "/")


def test_no_cgroup_files_means_no_cgroup(tmp_path: Path) -> None:
    """A process whose cgroup has no memory accounting reports cgroup None and budgets on MemAvailable."""
    sys_root, proc_root = _cgroup_tree(tmp_path, {"proc/meminfo": "MemAvailable: 1000 kB"})
    memory = read_memory(sys_root, proc_root)
    assert memory.cgroup is None
    assert (memory.budget_bytes, memory.budget_source) == (1000 * 1024, "mem_available")


def test_cores_from_cpuinfo_when_sysfs_has_no_topology(tmp_path: Path) -> None:
    """Without topology files, physical cores are the distinct (physical id, core id) pairs in cpuinfo."""
    blocks = [f"processor\t: {i}\nmodel name\t: Some CPU\nphysical id\t: 0\ncore id\t: {i % 2}\n" for i in range(4)]
    write_tree(tmp_path, {"proc/cpuinfo": "\n".join(blocks), "sys/devices/system/cpu/online": "0-2,3"})
    cpu = read_cpu(*_roots(tmp_path), arch="x86_64")
    assert (cpu.physical_cores, cpu.logical_cores, cpu.model_name, cpu.arch) == (2, 4, "Some CPU", "x86_64")


def test_hwmon_attributes_in_the_device_subdirectory(tmp_path: Path) -> None:
    """Older drivers keep tempN_* under hwmonX/device/; they are found there."""
    write_tree(
        tmp_path,
        {"sys/class/hwmon/hwmon0/name": "k10temp", "sys/class/hwmon/hwmon0/device/temp1_input": "61250"},
    )
    sensors = read_hwmon(tmp_path / "sys")
    assert [(s.chip, s.sensor, s.temp_c, s.label) for s in sensors] == [("k10temp", "temp1", 61.25, None)]


def test_battery_power_from_current_and_voltage(tmp_path: Path) -> None:
    """Without power_now, power is |current_now| x voltage_now; a USB supply that is online counts as AC."""
    write_tree(
        tmp_path,
        {
            "sys/class/power_supply/battery/type": "Battery",
            "sys/class/power_supply/battery/status": "Charging",
            "sys/class/power_supply/battery/capacity": "88",
            "sys/class/power_supply/battery/current_now": "-500000",
            "sys/class/power_supply/battery/voltage_now": "4000000",
            "sys/class/power_supply/usb/type": "USB",
            "sys/class/power_supply/usb/online": "1",
        },
    )
    power = read_power(tmp_path / "sys")
    assert [(b.capacity_pct, b.power_w, b.voltage_v) for b in power.batteries] == [(88, 2.0, 4.0)]
    assert power.ac_online is True
    assert not power.on_battery


@pytest.mark.parametrize(
    ("text", "mask"),
    [("50005", 0x50005), ("0x50005", 0x50005), ("throttled=0x50005", 0x50005), ("0", 0), ("oops", None)],
)
def test_throttle_mask_formats(text: str, mask: int | None) -> None:
    """The sysfs file prints bare hex, vcgencmd prints 'throttled=0x...'; both parse."""
    assert parse_throttle_mask(text) == mask


def test_vcgencmd_is_never_run_for_a_fixture_root(tmp_path: Path) -> None:
    """Without the sysfs file, a tree that is not the real /sys has no throttle state, even if allowed."""
    (tmp_path / "sys").mkdir()
    assert read_throttle(tmp_path / "sys", use_vcgencmd=True) is None


def test_disk_is_measured_at_the_nearest_existing_parent(tmp_path: Path) -> None:
    """A models directory that does not exist yet is measured on the file system that will hold it."""
    disk = read_disk(tmp_path / "models" / "not-yet")
    assert disk is not None
    assert disk.path == str(tmp_path)
    assert 0 < disk.free_bytes <= disk.total_bytes
    assert read_disk(None) is None


def test_cpu_percent_sampler_needs_two_readings(tmp_path: Path) -> None:
    """The first sample only primes the counters; the second is the busy share since the first."""
    stat = tmp_path / "proc" / "stat"
    write_tree(tmp_path, {"proc/stat": "cpu  100 0 100 700 100 0 0 0 0 0"})
    sampler = CpuPercentSampler(tmp_path / "proc")
    assert sampler.sample() is None
    stat.write_text("cpu  150 0 150 750 150 0 0 0 0 0\n")
    assert sampler.sample() == 50.0


def test_probe_of_this_machine_succeeds() -> None:
    """The real /sys and /proc of the test machine give a snapshot with at least RAM and CPU counts."""
    snapshot = probe_device(models_dir=Path.cwd(), use_vcgencmd=False)
    assert snapshot.memory.total_bytes
    assert snapshot.memory.budget_bytes
    assert snapshot.cpu.logical_cores
    assert snapshot.disk is not None
