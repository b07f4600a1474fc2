"""A Debian bookworm "device" booted with systemd as PID 1 in ``systemd-nspawn``, for the system tests.

Three cached artefacts make a device cheap (all under ``/var/cache/edge-agent-tests``, rebuilt only
when their recipe stamp changes; a lock file keeps two sessions from building the same one):

* **the root file system** (:func:`device_rootfs`): ``debootstrap --variant=minbase`` with what a
  fresh Raspberry Pi OS Lite has (systemd, dbus, python3, python3-venv, ca-certificates, sudo,
  iproute2) and nothing the provisioning must install itself (libgomp1 above all). Apt lists are
  emptied, as on a fresh image.
* **a local apt mirror** beside it: the .deb files provisioning installs on top of that root, as a
  flat repository the device reads at ``file:/srv/edge-test-apt`` (bound read-only). Devices thus need
  no Internet; their network is the host's loopback (Mosquitto and the fake Hub run on the host).
* **the wheelhouse** (:func:`wheelhouse`): the edge-agent wheel built from this checkout (keyed by a
  hash of its sources) and a wheel for every runtime dependency at the version installed in the test
  venv (keyed by those versions), llama-cpp-python included (from pip's wheel cache, compiled once
  otherwise). Devices install from it with ``pip --no-index``, as docs/deploy.md describes for
  offline fleets.

Each :class:`Device` mounts an overlay over the cached root (writes go to its own upper directory;
the cache stays pristine; measured: mounting 0.01 s vs 1.4 s for a ``cp -a`` of the 317 MB root) and
boots it with ``systemd-nspawn -b --register=no --keep-unit`` (the host has no systemd). Commands run
inside with ``nsenter`` into the container's PID 1. Killing nspawn would leave the container running,
so power is cut by SIGKILL to the container's PID 1; the overlay stays mounted across reboots.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-tests"))
MIRROR = os.environ.get("EDGE_AGENT_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# What a fresh Raspberry Pi OS Lite has that a minbase debootstrap lacks.
DEVICE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates", "sudo", "iproute2")
# What provisioning may install on top (bootstrap.sh, the role, and python3-apt that Ansible's apt
# module installs for itself): served by the local apt mirror. Build tools are left out on purpose:
# the wheelhouse has a llama-cpp-python wheel, so nothing compiles on a device.
MIRROR_PACKAGES = ("libgomp1", "libstdc++6", "libgcc-s1", "python3-packaging", "python3-apt", "acl", "mosquitto")
ROOTFS_STAMP = f"{SUITE} minbase {','.join(DEVICE_PACKAGES)} v2"
MIRROR_STAMP = f"{ROOTFS_STAMP} | mirror {','.join(MIRROR_PACKAGES)} v1"
APT_IN_DEVICE = "/srv/edge-test-apt"
DEVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Files of the checkout that a source snapshot (what `git clone` gives a board) leaves out.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", ".cache", ".mypy_cache", ".pytest_cache", ".ruff_cache", "__pycache__",
    "build", "dist", "*.egg-info", "wheelhouse",
)


class DeviceError(RuntimeError):
    """The device could not be built, booted or reached; the message carries the evidence."""


# --- prerequisites -----------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why devices cannot be booted on this machine, or None."""
    if platform.system() != "Linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (debootstrap, overlay mounts, systemd-nspawn)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                          ("nsenter", "util-linux"), ("unshare", "util-linux"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install {package}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


# --- small process helpers -------------------------------------------------------------------------


def run_host(argv: Sequence[str], *, timeout: float, check: bool = True, env: Mapping[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a host command with a timeout; on ``check`` a failure raises with its output."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                            env=dict(env) if env is not None else None, cwd=cwd)
    if check and result.returncode != 0:
        raise DeviceError(f"{' '.join(argv[:6])}... exited {result.returncode}:\n"
                          f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock under the cache, so two sessions never build the same artefact at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stamped(path: Path, stamp: str) -> bool:
    marker = path / ".edge-agent-test-stamp"
    return marker.is_file() and marker.read_text() == stamp


def _in_chroot(root: Path, script: str, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) chrooted into ``root`` with /proc and /dev, in a private mount namespace."""
    wrapper = (
        "set -eu; mount --make-rprivate /; "
        f'mount -t proc proc "{root}/proc"; mount --rbind /dev "{root}/dev"; '
        f'cp /etc/resolv.conf "{root}/etc/resolv.conf"; '
        f'exec chroot "{root}" /usr/bin/env -i PATH={DEVICE_PATH} LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive '
        'sh -c "$0"'
    )
    return run_host(["unshare", "--mount", "sh", "-c", wrapper, script], timeout=timeout)


# --- the root file system and its apt mirror ------------------------------------------------------


def device_rootfs() -> tuple[Path, Path]:
    """The cached pristine device root and its apt mirror directory (built once, ~2-3 minutes)."""
    name = f"{SUITE}-{platform.machine()}-device"
    base = CACHE / name
    if not _stamped(base, ROOTFS_STAMP):
        with _locked(name):
            if not _stamped(base, ROOTFS_STAMP):
                _build_rootfs(base)
    apt = CACHE / f"{name}.apt"
    if not _stamped(apt, MIRROR_STAMP):
        with _locked(f"{name}.apt"):
            if not _stamped(apt, MIRROR_STAMP):
                _build_mirror(base, apt)
    return base, apt


def _build_rootfs(base: Path) -> None:
    building = base.with_name(base.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    run_host(["debootstrap", "--variant=minbase", f"--include={','.join(DEVICE_PACKAGES)}", SUITE,
              str(building), MIRROR], timeout=1200)
    # As on a freshly flashed image: no package lists, no downloaded archives, a generic host name.
    _in_chroot(building, "apt-get clean && rm -rf /var/lib/apt/lists/* && rm -f /etc/resolv.conf", timeout=120)
    (building / "etc/hostname").write_text("edge-device\n")
    (building / ".edge-agent-test-stamp").write_text(ROOTFS_STAMP)
    shutil.rmtree(base, ignore_errors=True)
    building.rename(base)


def _build_mirror(base: Path, apt: Path) -> None:
    """Download exactly what MIRROR_PACKAGES need on top of ``base`` (an overlay keeps ``base`` pristine)."""
    building = apt.with_name(apt.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix="edge-agent-mirror-"))
    try:
        for sub in ("upper", "work", "root"):
            (scratch / sub).mkdir()
        root = scratch / "root"
        script = (
            "set -eu; mount --make-rprivate /; "
            f"mount -t overlay overlay -o lowerdir={base},upperdir={scratch / 'upper'},workdir={scratch / 'work'} "
            f"{root}; "
            f'mount -t proc proc "{root}/proc"; mount --rbind /dev "{root}/dev"; '
            f'cp /etc/resolv.conf "{root}/etc/resolv.conf"; '
            f'exec chroot "{root}" /usr/bin/env -i PATH={DEVICE_PATH} LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive '
            'sh -c "apt-get update -q && apt-get install -y -q --download-only --no-install-recommends $0"'
        )
        run_host(["unshare", "--mount", "sh", "-c", script, " ".join(MIRROR_PACKAGES)], timeout=600)
        building.mkdir(parents=True)
        for deb in (scratch / "upper/var/cache/apt/archives").glob("*.deb"):
            shutil.copy2(deb, building / deb.name)
        _write_flat_repo(building)
        (building / ".edge-agent-test-stamp").write_text(MIRROR_STAMP)
        shutil.rmtree(apt, ignore_errors=True)
        building.rename(apt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_flat_repo(directory: Path) -> None:
    """``Packages`` and ``Release`` for a flat apt repository of the .debs in ``directory``."""
    stanzas = []
    for deb in sorted(directory.glob("*.deb")):
        control = run_host(["dpkg-deb", "-f", str(deb)], timeout=60).stdout.strip()
        data = deb.read_bytes()
        stanzas.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"MD5sum: {hashlib.md5(data, usedforsecurity=False).hexdigest()}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    packages = "\n".join(stanzas).encode()
    (directory / "Packages").write_bytes(packages)
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime())
    (directory / "Release").write_text(
        f"Origin: edge-agent-tests\nLabel: edge-agent-tests\nSuite: {SUITE}\nCodename: {SUITE}\nDate: {date}\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
    )


# --- the wheelhouse --------------------------------------------------------------------------------


def _runtime_closure(dist_name: str) -> list[tuple[str, str]]:
    """(name, installed version) of ``dist_name``'s runtime dependencies, transitively, in this interpreter."""
    env = {"extra": ""}
    seen: dict[str, str] = {}
    todo = [dist_name]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    seen.pop(canonicalize_name(dist_name))
    return sorted(seen.items())


def source_hash() -> str:
    """A hash of what goes into the edge-agent wheel (package sources, metadata, catalog)."""
    digest = hashlib.sha256()
    paths = sorted(p for p in (REPO / "agent").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    paths += [REPO / n for n in ("pyproject.toml", "models.toml", "README.md") if (REPO / n).is_file()]
    for path in paths:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PIP_FIND_LINKS", None)  # only what this build asks for lands in the wheelhouse
    env.setdefault("CMAKE_ARGS", _setup_env_cmake_args())
    return env


def _setup_env_cmake_args() -> str:
    """CMAKE_ARGS exactly as scripts/setup-env.sh sets them (used only if llama-cpp-python must compile)."""
    text = (REPO / "scripts" / "setup-env.sh").read_text()
    arms = re.findall(r'^\s*([^\s()]+)\)\s*\n\s*export CMAKE_ARGS="\$\{CMAKE_ARGS:-(.*?)\}"', text, re.M)
    for patterns, value in arms:
        if platform.machine() in patterns.split("|") or patterns == "*":
            return value
    return ""


def wheelhouse(into: Path) -> Path:
    """Fill ``into`` with every wheel a device needs (hard links to the cache) and return it."""
    pins = _runtime_closure("edge-agent")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"
    deps_key = hashlib.sha256((tag + "\n" + "\n".join(f"{n}=={v}" for n, v in pins)).encode()).hexdigest()[:16]
    deps = CACHE / "wheelhouse" / f"deps-{deps_key}"
    stamp = json.dumps({"tag": tag, "pins": pins})
    if not _stamped(deps, stamp):
        with _locked(f"deps-{deps_key}"):
            if not _stamped(deps, stamp):
                building = deps.with_name(deps.name + ".building")
                shutil.rmtree(building, ignore_errors=True)
                building.mkdir(parents=True)
                # Pinned, no dependency resolution: llama-cpp-python comes from pip's wheel cache (filled
                # when the venv was built); only a cold cache compiles it (several minutes).
                run_host([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--prefer-binary",
                          "--wheel-dir", str(building), *(f"{n}=={v}" for n, v in pins)],
                         timeout=3600, env=_pip_env())
                (building / ".edge-agent-test-stamp").write_text(stamp)
                shutil.rmtree(deps, ignore_errors=True)
                building.rename(deps)
    src = source_hash()
    own = CACHE / "wheelhouse" / f"edge-agent-{src}"
    if not _stamped(own, src):
        with _locked(f"edge-agent-{src}"):
            if not _stamped(own, src):
                building = own.with_name(own.name + ".building")
                shutil.rmtree(building, ignore_errors=True)
                building.mkdir(parents=True)
                snapshot = Path(tempfile.mkdtemp(prefix="edge-agent-src-"))
                try:
                    shutil.copytree(REPO, snapshot / "src", ignore=NOT_SOURCE)
                    run_host([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
                              str(building), str(snapshot / "src")], timeout=600, env=_pip_env())
                finally:
                    shutil.rmtree(snapshot, ignore_errors=True)
                (building / ".edge-agent-test-stamp").write_text(src)
                shutil.rmtree(own, ignore_errors=True)
                building.rename(own)
                _prune(CACHE / "wheelhouse", "edge-agent-", keep=own)
    into.mkdir(parents=True, exist_ok=True)
    for wheel in [*deps.glob("*.whl"), *own.glob("*.whl")]:
        target = into / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copy2(wheel, target)
    return into


def _prune(directory: Path, prefix: str, *, keep: Path, keep_count: int = 4) -> None:
    """Drop all but the newest ``keep_count`` cached builds named ``prefix*`` (each checkout edit makes one)."""
    builds = sorted((p for p in directory.glob(f"{prefix}*") if p.is_dir() and p != keep
                     and not p.name.endswith(".building")), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep_count - 1:]:
        shutil.rmtree(old, ignore_errors=True)


# --- the device ------------------------------------------------------------------------------------


@dataclass
class Boot:
    """One boot of a device: the nspawn process, the container's PID 1 and how long the boot took."""

    nspawn: subprocess.Popen[bytes]
    pid1: int
    seconds: float


@dataclass
class Device:
    """One booted Debian: overlay root, nspawn, nsenter. Use :meth:`create`, then :meth:`boot`."""

    name: str
    base: Path
    apt: Path
    work: Path
    boots: list[Boot] = field(default_factory=list)
    _mounted: bool = False

    # -- life cycle ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, base: Path, apt: Path, work: Path) -> Device:
        """Mount a fresh overlay over ``base`` and make it this device (hostname, machine id, apt source)."""
        device = cls(name=name, base=base, apt=apt, work=work)
        for sub in ("upper", "overlay-work", "root"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        run_host(["mount", "-t", "overlay", "overlay", "-o",
                  f"lowerdir={base},upperdir={work / 'upper'},workdir={work / 'overlay-work'}",
                  str(device.root)], timeout=30)
        device._mounted = True
        root = device.root
        try:
            (root / "etc/hostname").write_text(f"{name}\n")
            (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n::1 localhost\n")
            (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
            (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{APT_IN_DEVICE} ./\n")
            # For a board with Internet access: downloads inside trust what the host trusts.
            shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
        except BaseException:
            device.destroy()
            raise
        return device

    @property
    def root(self) -> Path:
        """The device's root directory as the host sees it (the overlay mount point)."""
        return self.work / "root"

    @property
    def pid1(self) -> int:
        if not self.running:
            raise DeviceError(f"{self.name} is not running")
        return self.boots[-1].pid1

    @property
    def running(self) -> bool:
        return bool(self.boots) and self.boots[-1].nspawn.poll() is None and _alive(self.boots[-1].pid1)

    def boot(self, timeout: float = 90.0, *, until_running: bool = True) -> float:
        """Boot and wait until ``systemctl is-system-running`` says running (or degraded); returns seconds.

        ``until_running=False`` returns as soon as systemd answers (state ``starting``): the boot job
        may still be waiting for a Type=notify unit, e.g. edge-agent pulling its model before READY=1.
        """
        if self.running:
            raise DeviceError(f"{self.name} is already running")
        started = time.monotonic()
        log = (self.work / f"console-{len(self.boots) + 1}.log").open("wb")
        try:
            nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", str(self.root), "--boot", "--register=no", "--keep-unit",
                 f"--machine={self.name}", f"--bind-ro={self.apt}:{APT_IN_DEVICE}", "--console=read-only"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
        pid1 = None
        deadline = started + timeout
        while pid1 is None and time.monotonic() < deadline:
            if nspawn.poll() is not None:
                raise DeviceError(f"systemd-nspawn exited {nspawn.returncode}:\n{self.console()[-3000:]}")
            pid1 = _container_init(nspawn.pid)
            if pid1 is None:
                time.sleep(0.05)
        if pid1 is None:
            _terminate(nspawn)
            raise DeviceError(f"no container init under nspawn after {timeout}s:\n{self.console()[-3000:]}")
        self.boots.append(Boot(nspawn=nspawn, pid1=pid1, seconds=0.0))
        state = ""
        wanted = ("running", "degraded") if until_running else ("starting", "running", "degraded")
        wait = ["--wait"] if until_running else []
        while time.monotonic() < deadline:
            remaining = max(1.0, deadline - time.monotonic())
            # Before systemd has its bus socket up, systemctl fails at once: retry.
            state = self.run(["systemctl", "is-system-running", *wait], timeout=remaining, check=False).stdout.strip()
            if state in wanted:
                break
            time.sleep(0.1)
        else:
            raise DeviceError(f"{self.name} did not finish booting (state {state!r}):\n{self.console()[-3000:]}")
        self.boots[-1].seconds = round(time.monotonic() - started, 2)
        return self.boots[-1].seconds

    def poweroff(self, timeout: float = 60.0) -> None:
        """A clean shutdown (``systemctl poweroff``); cuts the power if it takes longer than ``timeout``."""
        if not self.running:
            return
        self.run(["systemctl", "--no-block", "poweroff"], timeout=30, check=False)
        try:
            self.boots[-1].nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_power()

    def kill_power(self) -> None:
        """A power cut: SIGKILL to the container's PID 1 (its PID namespace dies with it)."""
        if not self.boots:
            return
        boot = self.boots[-1]
        with contextlib.suppress(ProcessLookupError):
            os.kill(boot.pid1, signal.SIGKILL)
        try:
            boot.nspawn.wait(30)
        except subprocess.TimeoutExpired:
            _terminate(boot.nspawn)

    def reboot(self, timeout: float = 90.0) -> float:
        """Clean shutdown, then boot again on the same root; returns the boot seconds."""
        self.poweroff()
        return self.boot(timeout)

    def destroy(self, *, keep_files: bool = False) -> None:
        """Always safe to call: power off hard, unmount, remove the upper directory."""
        try:
            if self.running:
                self.kill_power()
            for boot in self.boots:
                if boot.nspawn.poll() is None:
                    _terminate(boot.nspawn)
        finally:
            if self._mounted:
                run_host(["umount", "--lazy", str(self.root)], timeout=60, check=False)
                self._mounted = False
            if not keep_files:
                shutil.rmtree(self.work / "upper", ignore_errors=True)
                shutil.rmtree(self.work / "overlay-work", ignore_errors=True)

    # -- inside ---------------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float = 120.0, check: bool = True, cwd: str = "/",
            user: str | None = None, env: Mapping[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the device (all its namespaces) with a clean environment.

        ``user`` runs it through a login shell of that user (``runuser -l``), so the user's groups and
        PATH are what a person logging in would get.
        """
        variables = {"PATH": DEVICE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb",
                     "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", **(env or {})}
        if user is not None:
            inner = ["runuser", "-l", user, "-c", " ".join(_quote(a) for a in argv)]
        else:
            inner = ["sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
        command = ["nsenter", "-t", str(self.pid1), "-a", "--", "/usr/bin/env", "-i",
                   *(f"{k}={v}" for k, v in variables.items()), *inner]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, input=input)
        if check and result.returncode != 0:
            raise DeviceError(f"in {self.name}: {' '.join(argv)} exited {result.returncode}:\n"
                              f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the device."""
        return self.run(["sh", "-c", script], **kwargs)  # type: ignore[arg-type]

    def show(self, unit: str = "edge-agent",
             props: Sequence[str] = ("ActiveState", "SubState", "Result", "StatusText", "NRestarts", "MainPID",
                                     "ExecMainStatus", "ExecMainCode")) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.run(["systemctl", "show", "-p", ",".join(props), unit], timeout=30).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str = "edge-agent", *, cursor: str | None = None, priority: str | None = None,
                lines: int | None = None) -> str:
        """The unit's journal (short-precise lines, with systemd's own messages about the unit)."""
        argv = ["journalctl", "--no-pager", "-o", "short-precise", "-u", unit]
        if cursor:
            argv += ["--after-cursor", cursor]
        if priority:
            argv += ["-p", priority]
        if lines:
            argv += ["-n", str(lines)]
        return self.run(argv, timeout=60, check=False).stdout

    def events(self, unit: str = "edge-agent", *, cursor: str | None = None) -> list[dict[str, object]]:
        """The agent's JSON log events from the journal (with the journal's PRIORITY as ``_priority``)."""
        argv = ["journalctl", "--no-pager", "-o", "json", "-u", unit, "--output-fields=MESSAGE,PRIORITY"]
        if cursor:
            argv += ["--after-cursor", cursor]
        out = self.run(argv, timeout=60, check=False).stdout
        events = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError, TypeError):
                entry = json.loads(line)
                message = entry.get("MESSAGE")
                if isinstance(message, list):  # journald sends non-UTF-8 messages as byte arrays
                    message = bytes(message).decode(errors="replace")
                event = json.loads(message)
                if isinstance(event, dict):
                    event["_priority"] = int(entry.get("PRIORITY", 6))
                    events.append(event)
        return events

    def cursor(self) -> str:
        """The journal's current end, to read only what comes after it."""
        out = self.run(["journalctl", "--no-pager", "-n", "0", "--show-cursor"], timeout=30, check=False).stdout
        match = re.search(r"-- cursor: (\S+)", out)
        return match.group(1) if match else ""

    def wait_for(self, what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.25) -> object:
        """Poll ``predicate()`` until it returns something truthy; raise with ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise DeviceError(f"{self.name}: timed out after {timeout}s waiting for {what} (last: {last!r})\n"
                          f"{self.journal(lines=30)}")

    def console(self) -> str:
        logs = sorted(self.work.glob("console-*.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def copy_in(self, source: Path, dest: str, *, ignore: object = None) -> None:
        """Copy a host file or tree into the device (through the overlay mount)."""
        target = self.root / dest.lstrip("/")
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)  # type: ignore[arg-type]
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _container_init(nspawn_pid: int) -> int | None:
    """The container's PID 1: a child of nspawn whose innermost PID is 1."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except FileNotFoundError:
        return None
    for child in children:
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{child}/status").read_text()
            match = re.search(r"^NSpid:\s+(.+)$", status, re.M)
            if match and len(match.group(1).split()) > 1 and match.group(1).split()[-1] == "1":
                return int(child)
    return None


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
