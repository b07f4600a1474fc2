"""Operators on the device: the CLI run by an unprivileged user against the deployed layout's permissions.

The layout is the real one in miniature: ``etc/edge-agent`` (root:OPERATORS 0750) holding ``agent.toml``
(root:OPERATORS 0640), and a 0700 state directory the operator cannot enter (fleet overrides and the HF
cache inside it). The CLI runs as ``nobody`` through ``setpriv``, once with the operator group as a
supplementary group and once without; the daemon it talks to runs as the test's root. Needs root.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.settings import OVERRIDES_FILE_NAME
from tests.support.broker import Broker
from tests.support.daemon import REPO, DaemonProcess, write_config
from tests.support.fake_hub import FakeHub

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

HUB_REPO = "edge-test/tiny-llama-GGUF"
FILES = {"Q8_0": "tiny-llama-Q8_0.gguf", "Q4_0": "tiny-llama-Q4_0.gguf"}


def _operator() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def _free_gid() -> int:
    """A group id no group uses: the operator group, without touching /etc/group."""
    gid = 42_000
    while True:
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
        gid += 1


def _operator_env(home: Path, pythonpath: str | None) -> dict[str, str]:
    drop = ("EDGE_AGENT_", "HF_", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_", "PYTHON")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


@pytest.fixture(scope="module")
def interpreter() -> tuple[str, str | None]:
    """A Python the unprivileged user can run with the agent importable: the venv's, or the system's same version.

    A venv made from an interpreter under /root (pyenv) is out of reach of other users; the system
    interpreter of the same minor version loads the same site-packages.
    """
    paths = sysconfig.get_paths()
    site = os.pathsep.join(dict.fromkeys([str(REPO), paths["purelib"], paths["platlib"]]))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [(sys.executable, None), (f"/usr/bin/python{version}", site)]
    user = _operator()
    for python, pythonpath in candidates:
        probe = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", python, "-c",
             "import agent.__main__, pydantic, structlog, paho.mqtt.client"],
            capture_output=True, cwd="/", env=_operator_env(Path("/"), pythonpath), timeout=60, check=False,
        )
        if probe.returncode == 0:
            return python, pythonpath
    pytest.skip("no Python interpreter with the agent's packages is reachable by an unprivileged user")


@dataclass
class Device:
    root: Path
    config: Path
    state: Path
    gid: int
    catalog: Path
    python: str
    pythonpath: str | None

    def cli(self, *args: str, member: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``edge-agent ARGS --config CONFIG`` as the unprivileged operator, in the operator group or not."""
        user = _operator()
        groups = [f"--groups={self.gid}"] if member else ["--clear-groups"]
        return subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", *groups,
             self.python, "-m", "agent", *args, "--config", str(self.config)],
            capture_output=True, text=True, cwd="/", env=_operator_env(self.root / "home", self.pythonpath),
            timeout=timeout, check=False,
        )


@pytest.fixture
def hub(tiny_models: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        yield fake


@pytest.fixture
def device(tmp_path: Path, broker: Broker, hub: FakeHub, tiny_models: dict[str, Path],
           interpreter: tuple[str, str | None]) -> Iterator[Device]:
    """The deployed permissions in a fresh directory; the config names the test broker and a fake Hub."""
    root = Path(tempfile.mkdtemp(prefix="edge-agent-operator-", dir="/tmp"))
    try:
        root.chmod(0o755)
        gid = _free_gid()
        etc = root / "etc" / "edge-agent"
        etc.mkdir(parents=True)
        os.chown(etc, 0, gid)
        etc.chmod(0o750)
        state = root / "var" / "lib" / "edge-agent"
        (state / "fleet").mkdir(parents=True)
        state.chmod(0o700)
        (state / "fleet" / OVERRIDES_FILE_NAME).write_text("[inference]\nmax_queue = 3\n")
        home = root / "home"
        home.mkdir()
        os.chown(home, _operator().pw_uid, _operator().pw_gid)
        catalog = root / "models.toml"
        files = ", ".join(f'{tag} = "{name}"' for tag, name in FILES.items())
        catalog.write_text(f'[models.tiny]\nrepo = "{HUB_REPO}"\nn_ctx = 512\nfiles = {{ {files} }}\n')
        catalog.chmod(0o644)
        config = write_config(
            etc / "agent.toml", port=broker.port, model_file=tiny_models["Q8_0"],
            fleet={"state_dir": str(state / "fleet")},
            telemetry={"buffer_dir": str(state / "telemetry")},
            hub={"endpoint": hub.endpoint, "cache_dir": str(state / "hf-cache")},
        )
        os.chown(config, 0, gid)
        config.chmod(0o640)
        yield Device(root, config, state, gid, catalog, *interpreter)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def serving(device: Device, tmp_path: Path) -> Iterator[DaemonProcess]:
    """The agent itself (as root here), reading the same config and its overrides."""
    d = DaemonProcess(config=device.config, workdir=tmp_path).start()
    try:
        d.wait_event("agent_started", timeout=60)
        yield d
    finally:
        d.stop()


def test_an_operator_in_the_group_can_use_every_one_shot_command(device: Device, serving: DaemonProcess) -> None:
    """With the config readable only through the group: status, ask, probe, plan and config check all work;
    what needs the service's state says so in one line (config check) or exits 77 with the fix (pull).
    The daemon itself reads the override layer the operator cannot."""
    assert serving.wait_event("config_overrides_active", timeout=10)["keys"] == ["inference.max_queue"]
    status = device.cli("status")
    assert status.returncode == 0, status.stderr
    rows = dict(line.split(None, 1) for line in status.stdout.splitlines())
    assert rows["device"].startswith("dev1")
    assert rows["state"].startswith("online")

    as_json = json.loads(device.cli("status", "--json").stdout)
    assert as_json["summary"]["state"] == "online"
    assert as_json["status"]["device_id"] == "dev1"

    ask = device.cli("ask", "--json", "--max-tokens", "3", "Hello")
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["usage"]["completion_tokens"] == 3

    probe = device.cli("probe", "--json")
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["memory"]

    plan = device.cli("plan", "--model", "tiny", "--catalog", str(device.catalog), "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["quant"] in FILES

    check = device.cli("config", "check")
    assert check.returncode == 0, check.stderr
    notes = [line for line in check.stdout.splitlines() if "NOT READ" in line]
    assert len(notes) == 1
    assert f"cannot read {device.state / 'fleet' / OVERRIDES_FILE_NAME}: permission denied" in notes[0]
    assert "Traceback" not in check.stderr

    pull = device.cli("pull", "tiny:Q4_0", "--catalog", str(device.catalog))
    assert pull.returncode == 77, pull.stdout + pull.stderr
    assert pull.stderr.count("\n") == 1, pull.stderr
    assert pull.stderr.startswith(f"edge-agent: error: cannot access {device.state}")
    assert f"{device.state} is root:root 0700" in pull.stderr


@pytest.mark.parametrize(
    "args",
    [("status",), ("ask", "Hello"), ("probe",), ("plan", "--model", "tiny"), ("config", "check")],
    ids=["status", "ask", "probe", "plan", "config-check"],
)
def test_outside_the_group_every_command_says_how_to_fix_it_in_one_line(device: Device, args: tuple[str, ...]) -> None:
    """No traceback: exit 77 and one line naming the config file and the group to join."""
    result = device.cli(*args, member=False, timeout=60)
    assert result.returncode == 77, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"edge-agent: error: cannot read {device.config}: permission denied ({device.config.parent} is "
        f"root:{device.gid} 0750; add yourself to group {device.gid}: sudo usermod -aG {device.gid} $USER, "
        "then log in again)\n"
    )


# -- status against the broker, as root -------------------------------------------------------------------


def _status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def test_status_without_a_retained_status_exits_66_with_a_clear_line(tmp_path: Path, broker: Broker) -> None:
    """A device that never connected to this broker: exit 66 (not found), one line naming the device, broker
    and topic."""
    config = write_config(tmp_path / "agent.toml", port=broker.port, model_file=Path("unused"), device_id="ghost")
    result = _status(config, "--timeout", "3")
    assert result.returncode == 66, result.stdout + result.stderr
    assert result.stderr.startswith(f"edge-agent: error: no retained status for ghost on 127.0.0.1:{broker.port}")
    assert result.stderr.count("\n") == 1


def test_status_with_the_broker_down_exits_68_with_a_clear_line(tmp_path: Path) -> None:
    """Nothing listening on the port: exit 68 (broker unreachable) with the broker's address, no traceback."""
    config = write_config(tmp_path / "agent.toml", port=9, model_file=Path("unused"))
    result = _status(config, "--timeout", "2")
    assert result.returncode == 68
    assert result.stderr == "edge-agent: error: no connection to 127.0.0.1:9\n"
