"""Read the device's state from sysfs and procfs under a given root.

Every reader takes its roots as parameters (``sys_root`` = what is normally ``/sys``, ``proc_root`` =
``/proc``) so tests run them against fixture trees, the way Telegraf's ``HOST_SYS`` works. A missing or
unreadable file is not an error: the field becomes ``None`` and the miss is logged at debug level,
because every board exposes a different subset (a Pi has no battery, a VM has no thermal zone).

Fallbacks that cannot take a root (psutil, ``vcgencmd``) are used only when probing the real ``/sys``
and ``/proc``, so a fixture tree never mixes in the test machine's own values.

The whole probe reads a few dozen small files and is meant to be called every telemetry tick.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import psutil
import structlog

from agent.hardware.cpu_features import features_from_cpuinfo
from agent.hardware.snapshot import (
    Battery,
    CgroupMemory,
    CpuInfo,
    CpuTimes,
    DeviceSnapshot,
    DiskInfo,
    HwmonSensor,
    LoadAverage,
    MemoryInfo,
    MemoryPressure,
    PowerInfo,
    PsiLine,
    ThermalInfo,
    ThermalZone,
    ThrottleState,
    TripPoint,
    ZramDevice,
    cpu_percent,
    derive_budget,
)

log = structlog.get_logger(__name__)

REAL_SYS_ROOT = Path("/sys")
REAL_PROC_ROOT = Path("/proc")

# cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712); anything this
# large is not a limit anyone set.
_V1_UNLIMITED_FROM = 1 << 62
_VCGENCMD_TIMEOUT_S = 2.0
_THROTTLE_FILE = Path("devices/platform/soc/soc:firmware/get_throttled")

# ARM's "CPU part" numbers (implementer 0x41) for the cores found on the boards we support.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77",
    "0xd41": "Cortex-A78",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd4d": "Cortex-A715",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
    "0xc07": "Cortex-A7",
    "0xc08": "Cortex-A8",
    "0xc09": "Cortex-A9",
    "0xc0f": "Cortex-A15",
}


# --- small readers ----------------------------------------------------------------------------------


def _read_text(path: Path, *, optional: bool = False) -> str | None:
    """The stripped content of a sysfs/procfs file, or None (logged at debug) if it cannot be read.

    ``optional`` attributes (a sensor label, a battery's scope) are often simply absent; their absence
    is not worth a log line on every telemetry tick.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except FileNotFoundError:
        if not optional:
            log.debug("hardware_file_missing", path=str(path))
        return None
    except OSError as exc:
        # Some sysfs attributes exist but fail on read (EINVAL, ENODATA on a sleeping sensor).
        log.debug("hardware_file_unreadable", path=str(path), error=exc.strerror or str(exc))
        return None


def _parse_int(text: str | None, path: Path, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        log.debug("hardware_file_unparsable", path=str(path), content=text[:80])
        return None


def _read_int(path: Path, *, optional: bool = False) -> int | None:
    return _parse_int(_read_text(path, optional=optional), path)


def _milli(value: int | None) -> float | None:
    """Millidegrees (or milli-anything) to a float rounded to what the sensors can resolve."""
    return None if value is None else round(value / 1000, 3)


def _micro(value: int | None) -> float | None:
    return None if value is None else round(value / 1_000_000, 3)


def _numbered(paths: Iterable[Path], prefix: str) -> list[tuple[int, Path]]:
    """Entries named <prefix><N>, sorted by N numerically (thermal_zone10 after thermal_zone9)."""
    out = []
    for p in paths:
        suffix = p.name[len(prefix) :]
        if p.name.startswith(prefix) and suffix.isdigit():
            out.append((int(suffix), p))
    return sorted(out)


def _listdir(path: Path) -> list[Path]:
    try:
        return [path / name for name in os.listdir(path)]
    except OSError as exc:
        log.debug("hardware_dir_unreadable", path=str(path), error=exc.strerror or str(exc))
        return []


def _is_real(sys_root: Path, proc_root: Path) -> bool:
    return sys_root == REAL_SYS_ROOT and proc_root == REAL_PROC_ROOT


# --- memory -----------------------------------------------------------------------------------------


def read_meminfo(proc_root: Path = REAL_PROC_ROOT) -> dict[str, int]:
    """``/proc/meminfo`` as {key: bytes} (values without a kB unit, like HugePages_Total, kept as is)."""
    text = _read_text(proc_root / "meminfo")
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        value = int(parts[0])
        out[key.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


def read_zram(sys_root: Path = REAL_SYS_ROOT) -> tuple[ZramDevice, ...]:
    """Configured zram devices (disksize > 0) with their compressed RAM use from ``mm_stat``."""
    devices = []
    for _, path in _numbered(_listdir(sys_root / "block"), "zram"):
        disksize = _read_int(path / "disksize")
        if not disksize:
            continue
        stat = (_read_text(path / "mm_stat") or "").split()
        fields = [int(v) if v.isdigit() else None for v in stat[:3]]
        fields += [None] * (3 - len(fields))
        devices.append(
            ZramDevice(
                name=path.name,
                disksize_bytes=disksize,
                orig_data_bytes=fields[0],
                compr_data_bytes=fields[1],
                mem_used_bytes=fields[2],
            )
        )
    return tuple(devices)


def read_memory_pressure(proc_root: Path = REAL_PROC_ROOT) -> MemoryPressure | None:
    """``/proc/pressure/memory`` (kernel >= 4.20 with PSI enabled), else None."""
    text = _read_text(proc_root / "pressure" / "memory")
    if text is None:
        return None
    lines: dict[str, PsiLine] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        try:
            lines[kind] = PsiLine(
                avg10=float(values["avg10"]),
                avg60=float(values["avg60"]),
                avg300=float(values["avg300"]),
                total_us=int(values["total"]),
            )
        except (KeyError, ValueError):
            log.debug("hardware_file_unparsable", path=str(proc_root / "pressure" / "memory"), content=line)
    return MemoryPressure(some=lines.get("some"), full=lines.get("full"))


def _own_cgroup_paths(proc_root: Path) -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 memory-controller path) of this process from ``/proc/self/cgroup``."""
    text = _read_text(proc_root / "self" / "cgroup")
    v2 = v1 = None
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(path: str) -> list[str]:
    """'/a/b' -> ['/a/b', '/a', '/']: a limit on any enclosing slice binds us too."""
    levels = [path]
    while path not in ("", "/"):
        path = path.rsplit("/", 1)[0] or "/"
        levels.append(path)
    return levels


def _cgroup_dir(base: Path, path: str) -> Path:
    return base / path.lstrip("/") if path.strip("/") else base


def _limit(text: str | None, path: Path, version: int) -> int | None:
    """A limit file's value in bytes; None for unlimited ('max' in v2, ~LONG_MAX in v1) or unreadable."""
    if text is None or text == "max":
        return None
    value = _parse_int(text, path)
    if value is not None and version == 1 and value >= _V1_UNLIMITED_FROM:
        return None
    return value


def _stat_value(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def read_cgroup_memory(sys_root: Path = REAL_SYS_ROOT, proc_root: Path = REAL_PROC_ROOT) -> CgroupMemory | None:
    """The memory limits of this process's cgroup (v2 preferred, v1 memory controller as fallback).

    Returns None when the process's cgroup has no memory accounting files under ``<sys_root>/fs/cgroup``.
    """
    v2_path, v1_path = _own_cgroup_paths(proc_root)
    cgroup_fs = sys_root / "fs" / "cgroup"
    if v2_path is not None:
        # Pure v2 mounts at /sys/fs/cgroup; hybrid systems put the v2 tree at /sys/fs/cgroup/unified.
        for base in (cgroup_fs, cgroup_fs / "unified"):
            own = _cgroup_dir(base, v2_path)
            if (own / "memory.current").exists() or (own / "memory.max").exists():
                return _read_cgroup_levels(base, v2_path, version=2)
    if v1_path is not None:
        base = cgroup_fs / "memory"
        if (_cgroup_dir(base, v1_path) / "memory.limit_in_bytes").exists():
            return _read_cgroup_levels(base, v1_path, version=1)
    log.debug("hardware_cgroup_memory_not_found", v2_path=v2_path, v1_path=v1_path)
    return None


def _read_cgroup_levels(base: Path, own_path: str, version: int) -> CgroupMemory:
    if version == 2:
        max_name, high_name, current_name, inactive_key = (
            "memory.max",
            "memory.high",
            "memory.current",
            "inactive_file",
        )
    else:
        max_name, high_name, current_name, inactive_key = (
            "memory.limit_in_bytes",
            "",
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
    own: dict[str, int | None] = {}
    best: tuple[int, str, str] | None = None  # (headroom, limiting file, limiting path)
    for level in _ancestors(own_path):
        directory = _cgroup_dir(base, level)
        if level != own_path and not (directory / max_name).exists():
            continue  # the root cgroup has no limit files; nothing binds there
        max_path, current_path = directory / max_name, directory / current_name
        max_bytes = _limit(_read_text(max_path), max_path, version)
        high_path = directory / high_name if high_name else None
        high_bytes = _limit(_read_text(high_path), high_path, version) if high_path else None
        current = _read_int(current_path)
        if level == own_path:
            own = {"max": max_bytes, "high": high_bytes, "current": current}
        if current is None:
            continue
        for limit, name in ((max_bytes, "memory.max"), (high_bytes, "memory.high")):
            if limit is not None and (best is None or limit - current < best[0]):
                best = (limit - current, name, level)
    inactive = _stat_value(_read_text(_cgroup_dir(base, own_path) / "memory.stat"), inactive_key)
    return CgroupMemory(
        version=2 if version == 2 else 1,
        path=own_path,
        max_bytes=own.get("max"),
        high_bytes=own.get("high"),
        current_bytes=own.get("current"),
        inactive_file_bytes=inactive,
        headroom_bytes=best[0] if best else None,
        limited_by="memory.high" if best and best[1] == "memory.high" else ("memory.max" if best else None),
        limiting_path=best[2] if best else None,
    )


def read_memory(sys_root: Path = REAL_SYS_ROOT, proc_root: Path = REAL_PROC_ROOT) -> MemoryInfo:
    """RAM, swap, zram, our cgroup's limits, memory pressure and the derived budget."""
    meminfo = read_meminfo(proc_root)
    cgroup = read_cgroup_memory(sys_root, proc_root)
    available = meminfo.get("MemAvailable")
    budget, source = derive_budget(available, cgroup)
    return MemoryInfo(
        total_bytes=meminfo.get("MemTotal"),
        available_bytes=available,
        swap_total_bytes=meminfo.get("SwapTotal"),
        swap_free_bytes=meminfo.get("SwapFree"),
        zram=read_zram(sys_root),
        cgroup=cgroup,
        pressure=read_memory_pressure(proc_root),
        budget_bytes=budget,
        budget_source=source,
    )


# --- CPU and board ----------------------------------------------------------------------------------


def _count_cpu_list(text: str | None) -> int | None:
    """'0-3,6' -> 5 (the kernel's cpulist format)."""
    if not text:
        return None
    count = 0
    for chunk in text.split(","):
        start, _, end = chunk.partition("-")
        if not start.isdigit() or (end and not end.isdigit()):
            return None
        count += int(end) - int(start) + 1 if end else 1
    return count


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            blocks.append({})
            continue
        key, _, value = line.partition(":")
        blocks[-1][key.strip()] = value.strip()
    return [b for b in blocks if b]


def _arch_from_cpuinfo(first: dict[str, str]) -> str | None:
    """Best guess of ``uname -m`` from a cpuinfo block, for trees that are not the running machine."""
    architecture = first.get("CPU architecture")
    if architecture == "8":
        return "aarch64"
    if architecture == "7":
        return "armv7l"
    flags = first.get("flags", "").split()
    if "lm" in flags:
        return "x86_64"
    if flags:
        return "i686"
    return None


def read_cpu(sys_root: Path = REAL_SYS_ROOT, proc_root: Path = REAL_PROC_ROOT, *, arch: str | None = None) -> CpuInfo:
    """Architecture, core counts (from the topology in sysfs, else cpuinfo) and the core model name."""
    blocks = _cpuinfo_blocks(_read_text(proc_root / "cpuinfo") or "")
    processors = [b for b in blocks if "processor" in b]
    cpu_dir = sys_root / "devices" / "system" / "cpu"

    logical = _count_cpu_list(_read_text(cpu_dir / "online")) or (len(processors) or None)

    cores: set[tuple[str | None, str | None]] = set()
    for _, path in _numbered(_listdir(cpu_dir), "cpu"):
        core_id = _read_text(path / "topology" / "core_id")
        if core_id is not None:
            cores.add((_read_text(path / "topology" / "physical_package_id"), core_id))
    physical: int | None = len(cores) or None
    if physical is None:
        pairs = {(b.get("physical id"), b.get("core id")) for b in processors if "core id" in b}
        physical = len(pairs) or None

    model = None
    first = processors[0] if processors else {}
    if first.get("CPU implementer") == "0x41" and first.get("CPU part") in _ARM_PARTS:
        model = _ARM_PARTS[first["CPU part"]]
    else:
        model = first.get("model name") or next((b["Hardware"] for b in blocks if "Hardware" in b), None)

    if _is_real(sys_root, proc_root):
        logical = logical or psutil.cpu_count(logical=True)
        physical = physical or psutil.cpu_count(logical=False)
        arch = arch or platform.machine()
    return CpuInfo(
        # A tree that is not this machine's describes its own architecture in cpuinfo.
        arch=arch or _arch_from_cpuinfo(first) or platform.machine(),
        model_name=model,
        physical_cores=physical,
        logical_cores=logical,
    )


def read_cpu_features(proc_root: Path = REAL_PROC_ROOT) -> frozenset[str]:
    """SIMD features of this CPU from ``/proc/cpuinfo`` (names of :mod:`agent.hardware.cpu_features`);
    empty when the file is missing. A llama.cpp build may use fewer (its system info says which)."""
    return features_from_cpuinfo(_read_text(proc_root / "cpuinfo", optional=True) or "")


def physical_cores() -> int:
    """Physical cores of this machine (llama.cpp is fastest with one thread per core), falling back to logical."""
    try:
        n = psutil.cpu_count(logical=False)
    except OSError:
        n = None
    return n or os.cpu_count() or 1


def read_board(sys_root: Path = REAL_SYS_ROOT, proc_root: Path = REAL_PROC_ROOT) -> str | None:
    """The board's name: the device-tree model on ARM boards, else DMI vendor + product on PCs."""
    try:
        raw = (proc_root / "device-tree" / "model").read_bytes()
    except OSError:
        pass  # PCs have no device tree; DMI below names them
    else:
        model = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
        if model:
            return model
    dmi = sys_root / "class" / "dmi" / "id"
    parts = [_read_text(dmi / "sys_vendor"), _read_text(dmi / "product_name")]
    name = " ".join(p for p in parts if p)
    return name or None


def read_loadavg(proc_root: Path = REAL_PROC_ROOT) -> LoadAverage | None:
    """``/proc/loadavg``'s 1/5/15-minute averages."""
    fields = (_read_text(proc_root / "loadavg") or "").split()
    try:
        return LoadAverage(load1=float(fields[0]), load5=float(fields[1]), load15=float(fields[2]))
    except (IndexError, ValueError):
        return None


def read_cpu_times(proc_root: Path = REAL_PROC_ROOT) -> CpuTimes | None:
    """The aggregate CPU counters from ``/proc/stat`` (idle and iowait count as not busy)."""
    text = _read_text(proc_root / "stat") or ""
    first = text.split("\n", 1)[0].split()
    if len(first) < 5 or first[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal; guest time is already inside user/nice.
    values = [int(v) for v in first[1:9] if v.isdigit()]
    total = sum(values)
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return CpuTimes(busy=total - idle, total=total)


class CpuPercentSampler:
    """CPU busy percent between successive :meth:`sample` calls (the telemetry tick's interval).

    The first call only primes the counters and returns None: a percentage needs two readings.
    """

    def __init__(self, proc_root: Path = REAL_PROC_ROOT) -> None:
        self._proc_root = proc_root
        self._last: CpuTimes | None = None

    def sample(self) -> float | None:
        """Busy percent (0-100) since the previous call, or None on the first call or an unreadable file."""
        now = read_cpu_times(self._proc_root)
        before, self._last = self._last, now
        if before is None or now is None:
            return None
        return cpu_percent(before, now)


# --- disk -------------------------------------------------------------------------------------------


def read_disk(models_dir: Path | None) -> DiskInfo | None:
    """Free space where models are stored; measured at the nearest existing parent if it is not created yet."""
    if models_dir is None:
        return None
    path = models_dir.absolute()
    try:
        # Inside the loop too: exists() raises for a directory this user may not search (an operator
        # probing a device whose models live in the service's 0700 state directory).
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = shutil.disk_usage(path)
    except OSError as exc:
        log.debug("hardware_disk_unreadable", path=str(path), error=exc.strerror)
        return None
    return DiskInfo(path=str(path), total_bytes=usage.total, free_bytes=usage.free)


# --- thermal ----------------------------------------------------------------------------------------


def read_thermal_zones(sys_root: Path = REAL_SYS_ROOT) -> tuple[ThermalZone, ...]:
    """Every ``class/thermal/thermal_zone*`` with its temperature and trip points."""
    zones = []
    for _, path in _numbered(_listdir(sys_root / "class" / "thermal"), "thermal_zone"):
        trips = []
        for entry in _listdir(path):
            match = re.fullmatch(r"trip_point_(\d+)_temp", entry.name)
            if match:
                index = int(match.group(1))
                trips.append(
                    TripPoint(
                        index=index,
                        type=_read_text(path / f"trip_point_{index}_type"),
                        temp_c=_milli(_read_int(entry)),
                    )
                )
        zones.append(
            ThermalZone(
                name=path.name,
                type=_read_text(path / "type"),
                temp_c=_milli(_read_int(path / "temp")),
                trip_points=tuple(sorted(trips, key=lambda t: t.index)),
            )
        )
    return tuple(zones)


def read_hwmon(sys_root: Path = REAL_SYS_ROOT) -> tuple[HwmonSensor, ...]:
    """Every ``tempN_input`` of every ``class/hwmon/hwmon*`` chip, with its label and max/crit limits."""
    sensors = []
    for _, chip_dir in _numbered(_listdir(sys_root / "class" / "hwmon"), "hwmon"):
        chip = _read_text(chip_dir / "name") or chip_dir.name
        entries = _listdir(chip_dir)
        # Old drivers keep the attributes one level down, in device/.
        if not any(e.name.startswith("temp") for e in entries):
            chip_dir = chip_dir / "device"  # noqa: PLW2901 - the chip's attribute directory from here on
            entries = _listdir(chip_dir)
        numbers = sorted(int(m.group(1)) for e in entries if (m := re.fullmatch(r"temp(\d+)_input", e.name)))
        for n in numbers:
            sensors.append(
                HwmonSensor(
                    chip=chip,
                    sensor=f"temp{n}",
                    label=_read_text(chip_dir / f"temp{n}_label", optional=True),
                    temp_c=_milli(_read_int(chip_dir / f"temp{n}_input")),
                    max_c=_milli(_read_int(chip_dir / f"temp{n}_max", optional=True)),
                    crit_c=_milli(_read_int(chip_dir / f"temp{n}_crit", optional=True)),
                )
            )
    return tuple(sensors)


def parse_throttle_mask(text: str) -> int | None:
    """Parse '50005', '0x50005' or vcgencmd's 'throttled=0x50005' into the mask."""
    value = text.strip().rpartition("=")[2].strip().lower().removeprefix("0x")
    try:
        return int(value, 16)
    except ValueError:
        return None


def read_throttle(sys_root: Path = REAL_SYS_ROOT, *, use_vcgencmd: bool = True) -> ThrottleState | None:
    """The Raspberry Pi throttle mask from sysfs, else from ``vcgencmd`` (only on the real /sys)."""
    text = _read_text(sys_root / _THROTTLE_FILE, optional=True)
    if text is not None:
        mask = parse_throttle_mask(text)
        if mask is not None:
            return ThrottleState.from_mask(mask, "sysfs")
    if not (use_vcgencmd and sys_root == REAL_SYS_ROOT):
        return None
    vcgencmd = shutil.which("vcgencmd")
    if vcgencmd is None:
        return None
    try:
        done = subprocess.run(
            [vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=_VCGENCMD_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("hardware_vcgencmd_failed", error=str(exc))
        return None
    mask = parse_throttle_mask(done.stdout)
    return ThrottleState.from_mask(mask, "vcgencmd") if mask is not None else None


def read_thermal(sys_root: Path = REAL_SYS_ROOT, *, use_vcgencmd: bool = True) -> ThermalInfo:
    """Thermal zones, hwmon temperature sensors and the Pi throttle state."""
    return ThermalInfo(
        zones=read_thermal_zones(sys_root),
        hwmon=read_hwmon(sys_root),
        throttle=read_throttle(sys_root, use_vcgencmd=use_vcgencmd),
    )


# --- power ------------------------------------------------------------------------------------------

_AC_TYPES = frozenset({"Mains", "USB", "USB_C", "USB_PD", "USB_PD_DRP", "USB_DCP", "USB_CDP", "USB_ACA"})


def _battery(path: Path) -> Battery:
    # A battery exposes either power_now (energy-based fuel gauges) or current_now (charge-based).
    power_uw = _read_int(path / "power_now", optional=True)
    current_ua = _read_int(path / "current_now", optional=True)
    voltage_uv = _read_int(path / "voltage_now", optional=True)
    power_w: float | None
    if power_uw is not None:
        power_w = round(abs(power_uw) / 1e6, 3)
    elif current_ua is not None and voltage_uv is not None:
        # Some drivers report the current negative while discharging; the power drawn is what matters.
        power_w = round(abs(current_ua) * voltage_uv / 1e12, 3)
    else:
        power_w = None
    return Battery(
        name=path.name,
        capacity_pct=_read_int(path / "capacity"),
        status=_read_text(path / "status"),
        power_w=power_w,
        voltage_v=_micro(voltage_uv),
    )


def read_power(sys_root: Path = REAL_SYS_ROOT, *, allow_psutil: bool | None = None) -> PowerInfo:
    """System batteries and AC state from ``class/power_supply`` (psutil only as a real-root fallback)."""
    batteries = []
    ac_states: list[bool] = []
    for path in sorted(_listdir(sys_root / "class" / "power_supply")):
        kind = _read_text(path / "type")
        if kind == "Battery":
            # A wireless mouse or keyboard battery says scope=Device; it does not power us.
            if _read_text(path / "scope", optional=True) == "Device":
                continue
            batteries.append(_battery(path))
        elif kind in _AC_TYPES:
            online = _read_int(path / "online")
            if online is not None:
                ac_states.append(online == 1)
    ac_online = any(ac_states) if ac_states else None
    if allow_psutil is None:
        allow_psutil = sys_root == REAL_SYS_ROOT
    if not batteries and allow_psutil:
        fallback = psutil.sensors_battery()
        if fallback is not None:
            batteries.append(
                Battery(
                    name="psutil",
                    capacity_pct=round(fallback.percent),
                    status="Charging" if fallback.power_plugged else "Discharging",
                    power_w=None,
                    voltage_v=None,
                )
            )
            ac_online = bool(fallback.power_plugged) if fallback.power_plugged is not None else ac_online
    return PowerInfo(batteries=tuple(batteries), ac_online=ac_online)


# --- the whole device -------------------------------------------------------------------------------


def probe_device(
    sys_root: Path = REAL_SYS_ROOT,
    proc_root: Path = REAL_PROC_ROOT,
    models_dir: Path | None = None,
    *,
    use_vcgencmd: bool = True,
    arch: str | None = None,
) -> DeviceSnapshot:
    """Read everything once. Never raises for a missing file: absent data is None in the snapshot.

    ``use_vcgencmd`` lets tests forbid the subprocess; it is only ever run on the real ``/sys``.
    ``arch`` overrides the architecture (default: ``platform.machine()`` on the real roots, else a
    guess from the tree's cpuinfo).
    """
    return DeviceSnapshot(
        ts=datetime.now(UTC),
        board=read_board(sys_root, proc_root),
        cpu=read_cpu(sys_root, proc_root, arch=arch),
        memory=read_memory(sys_root, proc_root),
        load=read_loadavg(proc_root),
        disk=read_disk(models_dir),
        thermal=read_thermal(sys_root, use_vcgencmd=use_vcgencmd),
        power=read_power(sys_root),
    )
