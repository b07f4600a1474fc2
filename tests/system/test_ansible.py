"""A second fresh device provisioned by the Ansible role (site.yml), from the host as the controller.

The play reaches the booted device through ``community.docker.nsenter`` (into the container's PID 1),
so it provisions a real systemd system: the role starts the unit and its handlers restart it. Fake
secrets (an MQTT password and an HF token) go in as extra vars, as Vault values would; no run may
print them, ``--check --diff`` included.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.ansible_output import changed_tasks
from tests.support.broker import Broker
from tests.support.fake_hub import FakeHub
from tests.system.device import NOT_SOURCE, REPO, Device, DeviceError
from tests.system.observer import fleet_cmd, write_operator_config
from tests.system.provision import Play, ansible_tool, nsenter_connection_available, playbook, write_inventory
from tests.system.report import record
from tests.system.serving import MAX_EXPOSURE, exposure, serving

pytestmark = [
    pytest.mark.system,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(ansible_tool("ansible-playbook") is None,
                       reason="ansible-core missing: pip install -e '.[provisioning]'"),
    pytest.mark.skipif(not nsenter_connection_available(),
                       reason="community.docker (nsenter connection) missing: pip install 'ansible>=12,<13'"),
]

FAKE_MQTT_PASSWORD = "vault-mqtt-pw-SYSTEST-51be"  # noqa: S105 - fake secrets that must never be printed
FAKE_HF_TOKEN = "hf_SYSTESTvaultToken0d4e"  # noqa: S105


def rebuilt_wheelhouse(house: Path, into: Path, marker: str) -> Path:
    """A copy of HOUSE whose edge-agent wheel has the same name and version but other code (MARKER appended to
    agent/__init__.py, its RECORD line updated): what rebuilding a changed checkout gives."""
    into.mkdir()
    for wheel in house.glob("*.whl"):
        if not wheel.name.startswith("edge_agent-"):
            shutil.copy2(wheel, into / wheel.name)
            continue
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(into / wheel.name, "w", zipfile.ZIP_DEFLATED) as dst:
            files = {info.filename: src.read(info) for info in src.infolist()}
            files["agent/__init__.py"] += f"\n{marker}\n".encode()
            record = next(name for name in files if name.endswith(".dist-info/RECORD"))
            rows = list(csv.reader(io.StringIO(files[record].decode())))
            for row in rows:
                if row and row[0] == "agent/__init__.py":
                    digest = base64.urlsafe_b64encode(hashlib.sha256(files[row[0]]).digest()).rstrip(b"=").decode()
                    row[1:] = [f"sha256={digest}", str(len(files[row[0]]))]
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(rows)
            files[record] = out.getvalue().encode()
            for info in src.infolist():
                dst.writestr(info, files[info.filename])
    return into


@dataclass
class Fleet:
    """The provisioned device and every play run against it so far."""

    device: Device
    device_id: str
    port: int
    inventory: Path
    extra: dict[str, object]
    work: Path
    plays: list[Play] = field(default_factory=list)

    def play(self, *flags: str) -> Play:
        # The container's PID 1 changes with every boot: rewrite the inventory each time.
        write_inventory(self.inventory, self.device, self.device_id)
        run = playbook(self.inventory, self.extra, self.work, *flags)
        self.plays.append(run)
        return run


@pytest.fixture(scope="module")
def fleet(make_device: Callable[[str], Device], device_wheels: Path, hub: FakeHub, host_broker: Broker,
          tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A fresh device (with login user alice) after one run of site.yml."""
    device = make_device("b")
    device.run(["useradd", "--create-home", "--shell", "/bin/bash", "alice"])
    work = tmp_path_factory.mktemp("ansible")
    # A snapshot of the checkout: what the role copies (the unit) must not change between runs.
    source = work / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    extra: dict[str, object] = {
        "edge_agent_source_dir": str(source),
        # The controller's wheelhouse already holds this checkout's wheel (built and cached by the suite).
        "edge_agent_wheelhouse": str(device_wheels),
        "edge_agent_build_wheel": False,
        "edge_agent_pip_offline": True,
        "edge_agent_build_from_source": False,
        "edge_agent_model": "smollm2-135m-instruct",
        "edge_agent_hub_endpoint": hub.endpoint,
        "edge_agent_prepull": True,
        "edge_agent_operators": ["alice"],
        "edge_agent_mqtt_host": "127.0.0.1",
        "edge_agent_mqtt_port": host_broker.port,
        "edge_agent_mqtt_username": "edge",
        "edge_agent_mqtt_password": FAKE_MQTT_PASSWORD,
        "edge_agent_hf_token": FAKE_HF_TOKEN,
    }
    state = Fleet(device, device.name, host_broker.port, work / "inventory.ini", extra, work)
    first = state.play()
    record("ansible first run (s)", first.seconds)
    record("ansible first run recap", first.recap)
    if first.result.returncode != 0:
        raise DeviceError(f"site.yml failed (exit {first.result.returncode}):\n{first.output[-8000:]}")
    return state


def test_role_installs_a_hardened_service_that_answers(fleet: Fleet, hub: FakeHub) -> None:
    """After site.yml: active, READY with a STATUS= text, retained status online, answers; exposure <= 1.5."""
    d = fleet.device
    assert fleet.plays[0].recap["changed"] > 0, fleet.plays[0].output[-3000:]
    up = serving(d, fleet.port, fleet.device_id)
    record("scenario 2: StatusText", up["show"]["StatusText"])
    level = exposure(d)
    record("scenario 2: systemd-analyze security exposure", level)
    assert level <= MAX_EXPOSURE
    assert d.run(["dpkg-query", "-W", "-f=${Status}", "libgomp1"], check=False).stdout == "install ok installed"
    assert "edge-agent" in d.run(["id", "-nG", "alice"]).stdout.split()
    answer = d.run(["edge-agent", "ask", "--max-tokens", "8", "Hello from alice"], user="alice", timeout=120,
                   check=False)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    # Pre-pulled during the play with the hf_token credential, before the service started.
    assert any(r.authorization == f"Bearer {FAKE_HF_TOKEN}" for r in hub.log if r.server == "hub")


def test_role_keys_the_device_for_signed_fleet_commands(fleet: Fleet) -> None:
    """The role made the fleet key pair on the controller (next to the inventory, private key 0600, never
    copied over) and gave the device the public key: a signed ping runs, an unsigned one is refused."""
    keys = fleet.work / "fleet-key"
    assert (keys / "fleet_key.pem").stat().st_mode & 0o777 == 0o600
    d = fleet.device
    assert d.run(["cat", "/etc/edge-agent/credentials/fleet_pubkey"]).stdout == (keys / "fleet_pubkey.pem").read_text()
    private_line = (keys / "fleet_key.pem").read_text().splitlines()[1]
    leaked = d.run(["grep", "-rlF", "--", private_line, "/etc", "/opt/edge-agent", "/var/lib/edge-agent"],
                   check=False)
    assert leaked.stdout == "", leaked.stdout
    signed = fleet_cmd(write_operator_config(fleet.work / "ops.toml", fleet.port, keys / "fleet_key.pem"),
                       fleet.device_id, "ping")
    unsigned = fleet_cmd(write_operator_config(fleet.work / "ops-unsigned.toml", fleet.port), fleet.device_id, "ping")
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert json.loads(signed.stdout)["results"][0]["result"]["pong"] is True
    assert unsigned.returncode == 1, unsigned.stdout + unsigned.stderr
    assert json.loads(unsigned.stdout)["results"][0]["error"]["code"] == "unsigned"


def test_second_run_changes_nothing(fleet: Fleet) -> None:
    """A second run of site.yml against the provisioned device: changed=0, and the service was not restarted."""
    main_pid = fleet.device.show()["MainPID"]
    second = fleet.play()
    record("ansible second run (s)", second.seconds)
    record("ansible second run recap", second.recap)
    assert second.result.returncode == 0, second.output[-6000:]
    assert second.recap["changed"] == 0, second.output[-6000:]
    assert fleet.device.show()["MainPID"] == main_pid


def test_check_diff_predicts_no_change(fleet: Fleet) -> None:
    """`--check --diff` against the provisioned device exits 0 and predicts changed=0 (nothing would restart)."""
    check = fleet.play("--check", "--diff")
    record("ansible --check --diff (s)", check.seconds)
    record("ansible --check --diff recap", check.recap)
    assert check.result.returncode == 0, check.output[-6000:]
    assert check.recap["changed"] == 0, f"--check reports changes in: {changed_tasks(check.output)}"


def test_no_run_prints_a_secret(fleet: Fleet) -> None:
    """No play output (normal, rerun, --check --diff) holds the MQTT password or the HF token; neither do the
    journal nor agent.toml; the credentials are root-only files."""
    if not any("--check" in run.result.args for run in fleet.plays):
        fleet.play("--check", "--diff")
    for run in fleet.plays:
        assert FAKE_MQTT_PASSWORD not in run.output
        assert FAKE_HF_TOKEN not in run.output
    d = fleet.device
    for text in (d.journal(), (d.root / "etc/edge-agent/agent.toml").read_text()):
        assert FAKE_MQTT_PASSWORD not in text
        assert FAKE_HF_TOKEN not in text
    modes = d.run(["stat", "-c", "%U:%G %a %n", "/etc/edge-agent/credentials/mqtt_password",
                   "/etc/edge-agent/credentials/hf_token"]).stdout
    assert "root:root 600 /etc/edge-agent/credentials/mqtt_password" in modes
    assert "root:root 600 /etc/edge-agent/credentials/hf_token" in modes


def test_a_rebuilt_wheel_is_reinstalled_and_restarts_the_service(fleet: Fleet, tmp_path: Path) -> None:
    """The same edge-agent version with other code (a rebuilt checkout) in the wheelhouse: `--check --diff`
    predicts the reinstall and the restart and changes nothing; the run reinstalls it and restarts the unit;
    the run after that changes nothing."""
    d = fleet.device
    marker = f"# rebuilt {tmp_path.name}"
    installed = "/opt/edge-agent/venv/lib/python3*/site-packages/agent/__init__.py"
    main_pid = d.show()["MainPID"]
    house = Path(str(fleet.extra["edge_agent_wheelhouse"]))
    fleet.extra = {**fleet.extra, "edge_agent_wheelhouse": str(rebuilt_wheelhouse(house, tmp_path / "wh", marker))}

    check = fleet.play("--check", "--diff")
    record("rebuilt wheel: --check --diff (s)", check.seconds)
    assert check.result.returncode == 0, check.output[-6000:]
    predicted = changed_tasks(check.output)
    record("rebuilt wheel: --check predicts", predicted)
    for task in ("Copy the wheelhouse archive to the device", "Reinstall edge-agent from its rebuilt wheel",
                 "Restart edge-agent"):
        assert task in predicted, predicted
    assert d.show()["MainPID"] == main_pid
    assert d.sh(f"grep -c '{marker}' {installed} || true").stdout.strip() == "0"

    run = fleet.play()
    record("rebuilt wheel: run (s)", run.seconds)
    assert run.result.returncode == 0, run.output[-6000:]
    done = changed_tasks(run.output)
    record("rebuilt wheel: run changed", done)
    for task in ("Copy the wheelhouse archive to the device", "Unpack the wheelhouse on the device",
                 "Reinstall edge-agent from its rebuilt wheel", "Restart edge-agent"):
        assert task in done, done
    assert d.sh(f"grep -c '{marker}' {installed}").stdout.strip() == "1"
    assert d.show()["MainPID"] not in (main_pid, "0")
    serving(d, fleet.port, fleet.device_id)

    again = fleet.play()
    record("rebuilt wheel: next run (s)", again.seconds)
    assert again.result.returncode == 0, again.output[-6000:]
    assert again.recap["changed"] == 0, changed_tasks(again.output)
