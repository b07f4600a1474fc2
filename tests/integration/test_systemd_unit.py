"""The shipped systemd unit: systemd's own checks, the hardening score, and llama.cpp under its sandbox.

``systemd-analyze verify`` insists that ExecStart's binary exists, so it checks a copy of the unit
whose ExecStart points at ``/bin/true`` (everything else byte-identical), together with the
credentials drop-in example installed as a real drop-in next to it.

No systemd runs as PID 1 in CI, so the two settings that could break llama.cpp are reproduced with
the kernel features systemd itself uses: ``MemoryDenyWriteExecute=`` as ``prctl(PR_SET_MDWE)`` and
``PrivateDevices=``/``ProtectKernelTunables=`` as a private mount namespace with a minimal ``/dev``
and a read-only ``/sys``.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.settings import InferenceSettings
from tests.support.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "edge-agent.service"
CREDENTIALS_DROPIN = ROOT / "systemd" / "edge-agent.service.d" / "10-credentials.conf.example"
MAX_EXPOSURE = 1.5
# The credential names the agent reads from $CREDENTIALS_DIRECTORY.
CREDENTIAL_IDS = {"mqtt_password", "tls_key", "hf_token", "fleet_pubkey"}

systemd_analyze = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    systemd_analyze is None, reason="systemd-analyze missing: apt-get install systemd (.ci/run does)"
)


def _service_entries(path: Path) -> list[tuple[str, str]]:
    """``(key, value)`` pairs of the [Service] section in file order (keys repeat in unit files)."""
    entries: list[tuple[str, str]] = []
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            entries.append((key, value))
    return entries


def _service(path: Path) -> dict[str, str]:
    """The [Service] section with the last value of each key winning, as systemd reads plain settings."""
    return dict(_service_entries(path))


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary swapped for /bin/true, plus the credentials drop-in next to it."""
    text = UNIT.read_text(encoding="utf-8")
    copied, count = re.subn(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", text)
    assert count == 1
    unit = tmp_path / "edge-agent.service"
    unit.write_text(copied, encoding="utf-8")
    dropins = tmp_path / "edge-agent.service.d"
    dropins.mkdir()
    shutil.copy(CREDENTIALS_DROPIN, dropins / "10-credentials.conf")
    return unit


@needs_systemd_analyze
class TestSystemdAnalyze:
    def test_verify_is_clean(self, tmp_path: Path) -> None:
        """systemd-analyze verify accepts the unit and its drop-in without a single warning."""
        unit = _verifiable_copy(tmp_path)
        result = subprocess.run(
            [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, "")

    def test_only_execstart_differs_in_the_verified_copy(self, tmp_path: Path) -> None:
        """The verified copy is the shipped unit except for the ExecStart binary path."""
        shipped = UNIT.read_text(encoding="utf-8").splitlines()
        copied = _verifiable_copy(tmp_path).read_text(encoding="utf-8").splitlines()
        differing = [(a, b) for a, b in zip(shipped, copied, strict=True) if a != b]
        assert differing == [
            (
                "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml",
                "ExecStart=/bin/true run --config /etc/edge-agent/agent.toml",
            )
        ]

    def test_exposure_is_at_most_1_5(self) -> None:
        """systemd-analyze security rates the shipped unit's exposure at 1.5 or better."""
        result = subprocess.run(
            [systemd_analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        match = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= MAX_EXPOSURE

    def test_threshold_gate_passes(self) -> None:
        """The CLI gate agrees: --threshold (0-100 scale, 15 = 1.5) exits 0 for the shipped unit."""
        result = subprocess.run(
            [systemd_analyze, "security", "--offline=true", "--threshold=15", str(UNIT)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0


class TestUnitContract:
    def test_notify_service_with_watchdog_and_restart(self) -> None:
        """Type=notify from the main process only, a watchdog, and restart on failure (incl. watchdog kills)."""
        service = _service(UNIT)
        assert service["Type"] == "notify"
        assert service["NotifyAccess"] == "main"
        assert service["WatchdogSec"] == "30s"
        assert service["Restart"] == "on-failure"

    def test_exit_codes_a_restart_cannot_fix_stop_the_unit(self) -> None:
        """Usage (2), permission (77) and config (78) errors are not restarted; the fleet restart (75) always is."""
        service = _service(UNIT)
        assert set(service["RestartPreventExitStatus"].split()) == {"2", "77", "78"}
        assert service["RestartForceExitStatus"] == "75"
        assert service["SuccessExitStatus"] == "75"

    def test_stop_timeout_covers_the_shutdown_grace_period(self) -> None:
        """TimeoutStopSec leaves at least 5 s beyond the default inference.shutdown_grace_s."""
        stop_s = int(_service(UNIT)["TimeoutStopSec"].removesuffix("s"))
        assert stop_s >= InferenceSettings().shutdown_grace_s + 5

    def test_runs_unprivileged_with_required_hardening(self) -> None:
        """The settings the issue requires are present with the required values."""
        service = _service(UNIT)
        expected = {
            "User": "edge-agent",
            "StateDirectory": "edge-agent",
            "ConfigurationDirectory": "edge-agent",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "NoNewPrivileges": "yes",
            "CapabilityBoundingSet": "",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "MemoryDenyWriteExecute": "yes",
            "UMask": "0077",
        }
        assert {key: service.get(key) for key in expected} == expected
        assert ("SystemCallFilter", "@system-service") in _service_entries(UNIT)

    def test_logs_go_to_journald_as_json(self) -> None:
        """stdout goes to the journal and the agent is told to write JSON lines."""
        entries = _service_entries(UNIT)
        assert ("StandardOutput", "journal") in entries
        assert ("Environment", "EDGE_AGENT_LOG__FORMAT=json") in entries

    def test_no_secret_in_the_unit(self) -> None:
        """The unit sets no password, token or key: those arrive only via LoadCredential=."""
        for key, value in _service_entries(UNIT):
            assert not re.search(r"(?i)password|token|secret|_key", value), (key, value)

    def test_credentials_dropin_loads_exactly_the_agent_secrets(self) -> None:
        """The drop-in example loads the four secrets by the names the agent reads, from root-only files."""
        loaded = [v for k, v in _service_entries(CREDENTIALS_DROPIN) if k == "LoadCredential"]
        names = {entry.partition(":")[0] for entry in loaded}
        sources = {entry.partition(":")[2] for entry in loaded}
        assert names == CREDENTIAL_IDS
        assert sources == {f"/etc/edge-agent/credentials/{name}" for name in CREDENTIAL_IDS}

    def test_unit_file_parses_as_ini(self) -> None:
        """The unit is plain INI with [Unit], [Service] and [Install] (the format systemd-analyze reads)."""
        parser = configparser.RawConfigParser(strict=False)
        parser.read_string(UNIT.read_text(encoding="utf-8"))
        assert parser.sections() == ["Unit", "Service", "Install"]
        assert parser.get("Install", "WantedBy") == "multi-user.target"


# Runs in a child process: turn on MDWE the way systemd does for MemoryDenyWriteExecute=yes
# (systemd >= 256 uses this very prctl; older versions an equivalent seccomp filter), prove it is
# enforced, then load a model with llama.cpp and generate.
_SANDBOXED_GENERATION = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print("prctl-unsupported", ctypes.get_errno()); sys.exit(3)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        print("wx-refused")
    else:
        print("wx-allowed"); sys.exit(4)
    import os
    print("dev", sorted(os.listdir("/dev")))
    from llama_cpp import Llama
    llm = Llama(model_path=sys.argv[1], n_ctx=128, n_threads=1, verbose=False)
    out = llm.create_completion("hello", max_tokens=8, temperature=0.0)
    print("tokens", out["usage"]["completion_tokens"])
    """
)

# A private /dev like PrivateDevices=yes (only the pseudo devices), /sys read-only like
# ProtectKernelTunables=yes, then the Python program above.
_PRIVATE_DEVICES_SHELL = textwrap.dedent(
    """
    set -eu
    mount --make-rprivate /
    mount -t tmpfs -o mode=755,nosuid,noexec tmpfs "$NEWDEV"
    for d in null zero full random urandom tty; do
        touch "$NEWDEV/$d"; mount --bind "/dev/$d" "$NEWDEV/$d"
    done
    ln -s /proc/self/fd "$NEWDEV/fd"
    mount --move "$NEWDEV" /dev
    mount -o remount,bind,ro /sys
    exec "$@"
    """
)


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


@pytest.mark.slow
class TestLlamaCppUnderTheSandbox:
    def test_generates_with_memory_deny_write_execute(self, tmp_path: Path) -> None:
        """With W+X mappings refused (MemoryDenyWriteExecute=yes), llama.cpp still loads and generates."""
        model = write_tiny_llama(tmp_path / "tiny.gguf")
        result = subprocess.run(
            [sys.executable, "-c", _SANDBOXED_GENERATION, str(model)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode == 3:
            pytest.skip(f"kernel lacks PR_SET_MDWE (Linux >= 6.3): {result.stdout.strip()}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "wx-refused" in result.stdout
        assert "tokens 8" in result.stdout

    @pytest.mark.skipif(not _unshare_available(), reason="needs root and mount namespaces (unshare --mount)")
    def test_generates_with_private_devices_and_read_only_sys(self, tmp_path: Path) -> None:
        """With only /dev/null, zero, full, random, urandom and tty, and /sys read-only, llama.cpp still works."""
        model = write_tiny_llama(tmp_path / "tiny.gguf")
        newdev = tmp_path / "dev"
        newdev.mkdir()
        result = subprocess.run(
            [
                "unshare",
                "--mount",
                "sh",
                "-c",
                _PRIVATE_DEVICES_SHELL,
                "sh",
                sys.executable,
                "-c",
                _SANDBOXED_GENERATION,
                str(model),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"NEWDEV": str(newdev), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        if result.returncode == 3:
            pytest.skip(f"kernel lacks PR_SET_MDWE (Linux >= 6.3): {result.stdout.strip()}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "dev ['fd', 'full', 'null', 'random', 'tty', 'urandom', 'zero']" in result.stdout
        assert "tokens 8" in result.stdout
