"""Fleet control over a real Mosquitto: simulated devices (real MQTT clients + FleetService) and the operator."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.fleet import Operator
from agent.fleet.signing import load_private_key, write_keypair
from agent.fleet.wire import build_command
from agent.transport.topics import parse_target
from tests.support.broker import Broker
from tests.support.daemon import Client
from tests.support.fleet import SimDevice, make_settings, release_paho_sockets, run_fleet_cli, write_operator_config

pytestmark = pytest.mark.integration

GROUPS = {"dev1": ["blue"], "dev2": ["blue", "kitchen"], "dev3": ["kitchen"]}


@pytest.fixture
def devices(broker: Broker, tmp_path: Path) -> Iterator[dict[str, SimDevice]]:
    """Three simulated devices in two groups, connected and subscribed."""
    sims = {d: SimDevice(make_settings(d, g, broker.port), tmp_path / "state" / d).start() for d, g in GROUPS.items()}
    for sim in sims.values():
        sim.wait_ready()
    yield sims
    for sim in sims.values():
        sim.stop()


@pytest.fixture
def operator(broker: Broker) -> Iterator[Operator]:
    op = Operator(make_settings("operator", port=broker.port))
    op.start([op.status_filter, "edge/+/cmd/result"])
    op.settle()
    yield op
    op.stop()
    release_paho_sockets(op.link)


def calls(devices: dict[str, SimDevice], name: str) -> dict[str, int]:
    return {d: sim.control.names().count(name) for d, sim in devices.items()}


@pytest.mark.parametrize(
    ("target", "reached"),
    [("dev2", {"dev2"}), ("group:blue", {"dev1", "dev2"}), ("group:kitchen", {"dev2", "dev3"}),
     ("all", {"dev1", "dev2", "dev3"})],
)
def test_targets_reach_exactly_the_right_devices(devices: dict[str, SimDevice], operator: Operator, target: str,
                                                 reached: set[str]) -> None:
    """A device, group or all target runs the command on exactly the addressed devices and collects every result."""
    scope, value = parse_target(target)
    run = operator.command(scope, value, "drain", {}, timeout=10)
    assert set(run.results) == reached
    assert run.expected == reached
    assert run.succeeded
    assert calls(devices, "drain") == {d: int(d in reached) for d in devices}


def test_duplicate_id_is_answered_but_not_executed_again(devices: dict[str, SimDevice], operator: Operator) -> None:
    """Re-sending a command id gets every device's stored result, marked duplicate; nothing runs twice."""
    first = operator.command("all", None, "reload", {}, timeout=10, command_id="reload-1")
    again = operator.command("all", None, "reload", {}, timeout=10, command_id="reload-1")
    assert first.succeeded
    assert again.succeeded
    assert all(body["duplicate"] for body in again.results.values())
    assert calls(devices, "reload") == {"dev1": 1, "dev2": 1, "dev3": 1}


def test_expired_command_is_refused_everywhere(devices: dict[str, SimDevice], operator: Operator) -> None:
    """A command whose expires_at has passed is answered 'expired' by each device and not run."""
    run = operator.command("group", "kitchen", "restart", {}, timeout=10, ttl_s=-1)
    assert {d: b["error"]["code"] for d, b in run.results.items()} == {"dev2": "expired", "dev3": "expired"}
    assert calls(devices, "restart") == {"dev1": 0, "dev2": 0, "dev3": 0}


def test_bad_command_gets_an_error_and_the_device_keeps_answering(devices: dict[str, SimDevice],
                                                                   operator: Operator) -> None:
    """An unknown command is an error result; the next ping still succeeds."""
    bad = operator.command("device", "dev1", "explode", {}, timeout=10)
    assert bad.results["dev1"]["error"]["code"] == "unknown_command"
    assert operator.command("device", "dev1", "ping", {}, timeout=10).succeeded


def test_signed_fleet_accepts_the_operator_key_and_refuses_others(broker: Broker, tmp_path: Path) -> None:
    """With a public key configured, signed commands run; unsigned and wrongly signed ones are refused."""
    private, public = write_keypair(tmp_path / "keys")
    intruder, _ = write_keypair(tmp_path / "intruder")
    sims = [SimDevice(make_settings(d, GROUPS[d], broker.port, public_key=public), tmp_path / "s" / d).start()
            for d in ("dev1", "dev2")]
    op = Operator(make_settings("operator", port=broker.port))
    try:
        for sim in sims:
            sim.wait_ready()
        op.start([op.status_filter, "edge/+/cmd/result"])
        op.settle()
        good = op.command("all", None, "drain", {}, timeout=10, key=load_private_key(private))
        unsigned = op.command("all", None, "resume", {}, timeout=10)
        forged = op.command("all", None, "resume", {}, timeout=10, key=load_private_key(intruder))
    finally:
        op.stop()
        release_paho_sockets(op.link)
        for sim in sims:
            sim.stop()
    assert good.succeeded
    assert {b["error"]["code"] for b in unsigned.results.values()} == {"unsigned"}
    assert {b["error"]["code"] for b in forged.results.values()} == {"bad_signature"}
    assert [sim.control.names() for sim in sims] == [["drain"], ["drain"]]


def test_mqtt5_response_topic_gets_the_result_with_correlation(devices: dict[str, SimDevice], broker: Broker) -> None:
    """A caller's Response Topic receives the result with its Correlation Data echoed."""
    client = Client(broker.port)
    try:
        client.subscribe("op/replies")
        client.publish("edge/dev3/cmd/ping", build_command("ping", {}, *parse_target("dev3")),
                       response_topic="op/replies", correlation=b"\x01c")
        message = client.messages.get(timeout=10)
    finally:
        client.close()
    assert message.topic == "op/replies"
    assert message.properties.CorrelationData == b"\x01c"
    assert json.loads(message.payload)["device_id"] == "dev3"


def test_cli_cmd_all_ping_prints_every_device_and_exits_zero(devices: dict[str, SimDevice], broker: Broker,
                                                             tmp_path: Path) -> None:
    """`fleet cmd all ping --json` lists the three devices as ok and exits 0."""
    config = write_operator_config(tmp_path / "op.toml", broker.port)
    done = run_fleet_cli("cmd", "all", "ping", "--json", "--timeout", "10", config=config)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [r["device_id"] for r in out["results"]] == ["dev1", "dev2", "dev3"]
    assert out["summary"] == {**out["summary"], "ok": 3, "failed": 0, "no_answer": 0, "expected": 3}


def test_cli_cmd_exits_non_zero_on_failure_or_no_answer(devices: dict[str, SimDevice], broker: Broker,
                                                        tmp_path: Path) -> None:
    """An error result or a silent device makes `fleet cmd` exit 1, and the table says why."""
    config = write_operator_config(tmp_path / "op.toml", broker.port)
    failed = run_fleet_cli("cmd", "group:blue", "config-get", "--arg", "key=no.such", "--timeout", "10", config=config)
    assert failed.returncode == 1
    assert "2 failed" in failed.stdout
    assert "bad_config" in failed.stdout
    silent = run_fleet_cli("cmd", "dev9", "ping", "--timeout", "1", config=config)
    assert silent.returncode == 1
    assert "no answer" in silent.stdout


def test_cli_ls_shows_devices_groups_and_offline_state(devices: dict[str, SimDevice], broker: Broker,
                                                       tmp_path: Path) -> None:
    """`fleet ls --json` lists each device with its groups and state; a stopped device shows offline."""
    devices["dev1"].publish_telemetry(temperature_c=51.0, queue_depth=2)
    devices["dev3"].publish_telemetry(ts=time.time() - 3600)
    devices["dev2"].stop()
    config = write_operator_config(tmp_path / "op.toml", broker.port)
    done = run_fleet_cli("ls", "--json", "--wait", "2", config=config)
    assert done.returncode == 0, done.stderr
    rows = {r["device_id"]: r for r in json.loads(done.stdout)}
    assert {d: r["state"] for d, r in rows.items()} == {"dev1": "online", "dev2": "offline", "dev3": "online"}
    assert rows["dev2"]["groups"] == ["blue", "kitchen"]
    assert (rows["dev1"]["temp_c"], rows["dev1"]["queue"], rows["dev1"]["stale"]) == (51.0, 2, False)
    assert rows["dev3"]["stale"] is True
    table = run_fleet_cli("ls", "--wait", "2", config=config)
    assert "online (stale)" in table.stdout
    assert "3 devices: 2 live, 1 offline, 1 stale" in table.stdout


def test_cli_signed_command_with_key(broker: Broker, tmp_path: Path) -> None:
    """`fleet keygen` then `fleet cmd --key` drives a device that requires signatures."""
    config = write_operator_config(tmp_path / "op.toml", broker.port)
    assert run_fleet_cli("keygen", "--out", str(tmp_path / "keys"), config=config).returncode == 0
    sim = SimDevice(make_settings("dev1", [], broker.port, public_key=tmp_path / "keys" / "fleet_pubkey.pem"),
                    tmp_path / "state").start()
    try:
        sim.wait_ready()
        unsigned = run_fleet_cli("cmd", "dev1", "drain", "--timeout", "5", config=config)
        signed = run_fleet_cli("cmd", "dev1", "drain", "--timeout", "5", "--key",
                               str(tmp_path / "keys" / "fleet_key.pem"), config=config)
    finally:
        sim.stop()
    assert unsigned.returncode == 1
    assert "unsigned" in unsigned.stdout
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert sim.control.names() == ["drain"]
