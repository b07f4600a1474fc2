"""provisioning/: lint, syntax, the bootstrap script, and real runs against a throwaway Debian target.

The throwaway target is a minimal Debian bookworm made by ``debootstrap`` once and cached under
``/var/cache/edge-agent-tests`` (about 2-3 minutes the first time). Each test mounts it with an
overlay (the cache stays pristine; writes land in ``tmp_path``) inside a private mount namespace,
so nothing is left mounted however the test ends. Ansible reaches it with the
``community.general.chroot`` connection; no systemd runs there, so the role installs and enables
the unit but does not start it (``edge_agent_start_service`` is false when PID 1 is not systemd).

The wheelhouse is built on the controller from this checkout; llama-cpp-python comes from pip's
wheel cache (filled when the project was installed), because compiling it takes ~20 minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "provisioning"
BOOTSTRAP = PROVISIONING / "bootstrap.sh"
VENV_BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-tests"))
MIRROR = os.environ.get("EDGE_AGENT_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = "python3,systemd,ca-certificates"
BASE_STAMP = f"bookworm minbase {BASE_PACKAGES} v1"


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["ANSIBLE_CONFIG"] = str(PROVISIONING / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env.pop("PYTHONPATH", None)
    return env


needs_ansible = pytest.mark.skipif(
    _tool("ansible-playbook") is None, reason="ansible-core missing: pip install -r provisioning/requirements.txt"
)


class TestStaticChecks:
    @needs_ansible
    def test_playbook_syntax(self) -> None:
        """ansible-playbook --syntax-check accepts site.yml with the example inventory."""
        result = subprocess.run(
            [_tool("ansible-playbook"), "--syntax-check", "-i", "inventory.example.ini", "site.yml"],
            cwd=PROVISIONING,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.skipif(_tool("ansible-lint") is None, reason="ansible-lint missing: pip install ansible-lint")
    def test_ansible_lint_production_profile(self) -> None:
        """ansible-lint passes on the production profile with no warning."""
        result = subprocess.run(
            [_tool("ansible-lint"), "--profile", "production", "--nocolor"],
            cwd=PROVISIONING,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 failure(s), 0 warning(s)" in result.stdout + result.stderr

    def test_bootstrap_parses(self) -> None:
        """bash -n finds no syntax error in bootstrap.sh."""
        subprocess.run(["bash", "-n", str(BOOTSTRAP)], check=True, timeout=30)

    @pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing: apt-get install shellcheck")
    def test_bootstrap_shellcheck(self) -> None:
        """shellcheck reports nothing for bootstrap.sh."""
        result = subprocess.run(
            ["shellcheck", "--severity=style", str(BOOTSTRAP)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout

    def test_bootstrap_dry_run_changes_nothing(self, tmp_path: Path) -> None:
        """--dry-run against an empty root prints every step it would take and writes nothing."""
        wheel = tmp_path / "edge_agent-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"")
        root = tmp_path / "root"
        root.mkdir()
        result = subprocess.run(
            [
                "bash",
                str(BOOTSTRAP),
                "--dry-run",
                "--root",
                str(root),
                "--wheelhouse",
                str(tmp_path),
                "--device-id",
                "bench-1",
                "--mqtt-host",
                "broker.test",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "would" in result.stdout
        assert "agent.toml" in result.stdout
        assert list(root.iterdir()) == []


# --- the throwaway Debian target -------------------------------------------------------------------


def _target_unavailable() -> str | None:
    """Why a chroot target cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mounts)"
    if platform.system() != "Linux":
        return "needs Linux"
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install debootstrap util-linux coreutils"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False)
    if probe.returncode != 0:
        return f"cannot create a mount namespace: {probe.stderr.decode().strip()}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


def _base_rootfs() -> Path:
    """The cached pristine Debian root (built once, atomically, with a stamp naming its recipe)."""
    arch = platform.machine()
    base = CACHE / f"bookworm-{arch}-minbase"
    stamp = base / ".edge-agent-test-stamp"
    if stamp.is_file() and stamp.read_text() == BASE_STAMP:
        return base
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f"{base.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(building), MIRROR],
        check=True,
        capture_output=True,
        timeout=900,
    )
    # As in any image build: no daemon may start inside the chroot (mosquitto's postinst would).
    policy = building / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (building / "etc/hostname").write_text("edge-test\n")
    stamp_tmp = building / ".edge-agent-test-stamp"
    stamp_tmp.write_text(BASE_STAMP)
    shutil.rmtree(base, ignore_errors=True)
    building.rename(base)
    return base


class Target:
    """An overlay over the cached root, mounted only inside the private mount namespace of each command."""

    def __init__(self, base: Path, work: Path) -> None:
        self.base = base
        self.root = work / "root"
        self.upper = work / "upper"
        self.workdir = work / "overlay-work"
        for d in (self.root, self.upper, self.workdir):
            d.mkdir(parents=True)

    def run(
        self, argv: list[str], timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a controller-side command while the target is mounted (proc, dev, resolv.conf included)."""
        script = (
            "set -eu; mount --make-rprivate /; "
            f"mount -t overlay overlay -o lowerdir={self.base},upperdir={self.upper},workdir={self.workdir} "
            f"{self.root}; "
            f"mount -t proc proc {self.root}/proc; "
            f"mount --rbind /dev {self.root}/dev; "
            f"cp /etc/resolv.conf {self.root}/etc/resolv.conf 2>/dev/null || true; "
            'exec "$@"'
        )
        return subprocess.run(
            ["unshare", "--mount", "sh", "-c", script, "sh", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env or _env(),
        )

    def chroot(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command inside the target."""
        return self.run(["chroot", str(self.root), *argv], timeout=timeout)


@pytest.fixture(scope="module")
def base_rootfs() -> Path:
    """The cached Debian bookworm root, or a skip naming what this machine lacks."""
    reason = _target_unavailable()
    if reason:
        pytest.skip(reason)
    return _base_rootfs()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels for edge-agent and every dependency, built on the controller like an operator would."""
    cached = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if ".whl" not in cached.stdout:
        pytest.skip(
            "no llama-cpp-python wheel in pip's cache: compiling one takes ~20 min "
            "(install the project with pip's cache enabled first)"
        )
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--prefer-binary", "--wheel-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    ".cache",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    "wheelhouse",
)


def _recap(output: str) -> dict[str, int]:
    match = re.search(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output, re.M)
    assert match, output[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups()), strict=True))


def _has_chroot_connection() -> bool:
    return importlib.util.find_spec("ansible_collections.community.general") is not None


@pytest.mark.slow
@needs_ansible
@pytest.mark.skipif(
    not _has_chroot_connection(),
    reason="community.general (chroot connection) missing: pip install 'ansible>=12,<13'",
)
class TestPlaybookOnAThrowawayDebian:
    def test_installs_configures_enables_and_is_idempotent(
        self, base_rootfs: Path, wheelhouse: Path, tmp_path: Path
    ) -> None:
        """The role installs the agent, a config passing `config check`, the enabled unit; a rerun changes nothing."""
        target = Target(base_rootfs, tmp_path)
        inventory = tmp_path / "inventory.ini"
        inventory.write_text(
            "[edge_devices]\n"
            f"bench ansible_host={target.root} ansible_connection=community.general.chroot "
            "ansible_python_interpreter=/usr/bin/python3 device_id=bench-1\n"
        )
        # A snapshot of the checkout: the wheel the role builds must not change between the two runs.
        source = tmp_path / "source"
        shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
        extra = {
            "edge_agent_source_dir": str(source),
            "edge_agent_wheelhouse": str(wheelhouse),
            "edge_agent_pip_offline": True,
            "edge_agent_build_from_source": False,
            "edge_agent_install_mosquitto": True,
            "edge_agent_mqtt_password": "s3cret-from-vault",
            "edge_agent_memory_max": "900M",
        }
        (tmp_path / "extra.json").write_text(json.dumps(extra))
        playbook = [
            "ansible-playbook",
            "-i",
            str(inventory),
            str(PROVISIONING / "site.yml"),
            "-e",
            f"@{tmp_path / 'extra.json'}",
        ]

        timings = []
        recaps = []
        for _ in range(2):
            started = time.monotonic()
            result = target.run(playbook, timeout=600)
            timings.append(round(time.monotonic() - started, 1))
            assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
            recaps.append(_recap(result.stdout))
        print(f"playbook runs: {timings} s, recaps: {recaps}")
        assert recaps[0]["changed"] > 0
        assert recaps[1]["changed"] == 0, result.stdout[-6000:]

        check = target.chroot(
            "/opt/edge-agent/venv/bin/edge-agent", "config", "check", "--json", "--config", "/etc/edge-agent/agent.toml"
        )
        assert check.returncode == 0, check.stdout + check.stderr
        effective = json.loads(check.stdout)
        assert effective["device_id"] == "bench-1"

        inspect = target.chroot(
            "sh",
            "-c",
            "stat -c '%U:%G %a %n' /etc/edge-agent/agent.toml /etc/edge-agent/credentials/mqtt_password "
            "/var/lib/edge-agent; "
            "readlink /etc/systemd/system/multi-user.target.wants/edge-agent.service; "
            "cat /etc/systemd/system/edge-agent.service.d/*.conf; "
            "grep -h set_tcp_nodelay /etc/mosquitto/conf.d/edge-agent.conf",
        )
        assert inspect.returncode == 0, inspect.stdout + inspect.stderr
        out = inspect.stdout
        assert "root:edge-agent 640 /etc/edge-agent/agent.toml" in out
        assert "root:root 600 /etc/edge-agent/credentials/mqtt_password" in out
        assert "edge-agent:edge-agent 700 /var/lib/edge-agent" in out
        assert "/etc/systemd/system/edge-agent.service" in out
        assert "LoadCredential=mqtt_password:/etc/edge-agent/credentials/mqtt_password" in out
        assert "LoadCredential=hf_token" not in out
        assert "MemoryMax=900M" in out
        assert "set_tcp_nodelay true" in out
        assert "s3cret" not in out

        installed_unit = target.chroot("cat", "/etc/systemd/system/edge-agent.service")
        assert installed_unit.stdout == (ROOT / "systemd" / "edge-agent.service").read_text()

        # Inside the target the ExecStart binary exists: the installed unit verifies as is.
        verify = target.chroot("systemd-analyze", "verify", "/etc/systemd/system/edge-agent.service")
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


@pytest.mark.slow
class TestBootstrapOnAThrowawayDebian:
    def test_installs_then_reports_nothing_to_do(self, base_rootfs: Path, wheelhouse: Path, tmp_path: Path) -> None:
        """bootstrap.sh installs into a fresh root, the result passes `config check`, a rerun changes nothing."""
        target = Target(base_rootfs, tmp_path)
        password = tmp_path / "mqtt_password"
        password.write_text("s3cret-from-a-file")
        command = [
            "bash",
            str(BOOTSTRAP),
            "--root",
            str(target.root),
            "--wheelhouse",
            str(wheelhouse),
            "--offline",
            "--device-id",
            "bench-2",
            "--mqtt-host",
            "broker.test",
            "--mqtt-password-file",
            str(password),
            "--with-mosquitto",
        ]
        first = target.run(command, timeout=600)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        assert "changed  install /etc/edge-agent/agent.toml" in first.stdout
        second = target.run(command, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.rstrip().endswith("done: 0 change(s)"), second.stdout
        check = target.chroot(
            "/opt/edge-agent/venv/bin/edge-agent", "config", "check", "--json", "--config", "/etc/edge-agent/agent.toml"
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert json.loads(check.stdout)["device_id"] == "bench-2"
        enabled = target.chroot("test", "-L", "/etc/systemd/system/multi-user.target.wants/edge-agent.service")
        assert enabled.returncode == 0
        verify = target.chroot("systemd-analyze", "verify", "/etc/systemd/system/edge-agent.service")
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
