"""One board installed with ``provisioning/bootstrap.sh``, then run through the scenarios a fleet meets.

The board gets the fleet's public key (``--fleet-pubkey-file``, made on the host with ``fleet keygen``),
so every fleet command below is signed by the operator's key, as in production.

The device is booted once for the module and installed once (in the ``board`` fixture); the tests
run in file order and each leaves it serving: install and rerun (scenario 1), a non-root operator
(9), poison messages (7) and their warnings in the journal, fleet commands (5), the watchdog (6),
and last the config errors (8), which restore the config afterwards. Each test re-arms the unit
first (``systemctl reset-failed``: start rate limit and NRestarts back to 0).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.signing import write_keypair
from tests.support.broker import Broker
from tests.support.fake_hub import FakeHub
from tests.system.device import Device, DeviceError
from tests.system.hub_catalog import SMOLLM_135M, SMOLLM_360M
from tests.system.observer import MqttClient, StatusWatch, fleet_cmd, mosquitto_rr, write_operator_config
from tests.system.provision import bootstrap, changes, place_checkout, write_secret
from tests.system.report import record
from tests.system.serving import (
    MAX_EXPOSURE,
    ask,
    exposure,
    reset_failed,
    restart,
    serving,
    wait_active,
    wait_online,
)

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(1800)]

FAKE_MQTT_PASSWORD = "mqtt-pw-SYSTEST-9f3a"  # noqa: S105 - a fake secret that must never be printed
FAKE_HF_TOKEN = "hf_SYSTESTfakeToken7c21"  # noqa: S105
CONFIG = "/etc/edge-agent/agent.toml"
OVERRIDES = "/var/lib/edge-agent/fleet/config-overrides.toml"


@dataclass
class Board:
    """The installed device and what its first bootstrap run printed."""

    device: Device
    device_id: str
    port: int
    args: list[str]
    first_output: str
    install_s: float
    fleet_key: Path
    """The operator's private key (on the host); the board has its public half as a credential."""

    def host_path(self, path: str) -> Path:
        return self.device.root / path.lstrip("/")


@pytest.fixture(scope="module")
def board(make_device: Callable[[str], Device], device_wheels: Path, hub: FakeHub, host_broker: Broker,
          tmp_path_factory: pytest.TempPathFactory) -> Board:
    """A fresh device with a login user ``alice``, installed by bootstrap.sh from the board's checkout."""
    device = make_device("a")
    device.run(["useradd", "--create-home", "--shell", "/bin/bash", "alice"])
    place_checkout(device, device_wheels)
    fleet_key, fleet_pubkey = write_keypair(tmp_path_factory.mktemp("operator-keys"))
    device.copy_in(fleet_pubkey, "/root/fleet_pubkey.pem")
    args = [
        "--model", "smollm2-135m-instruct",
        "--hub-endpoint", hub.endpoint,
        "--prepull",
        "--device-id", device.name,
        "--mqtt-host", "127.0.0.1", "--mqtt-port", str(host_broker.port),
        "--mqtt-user", "edge", "--mqtt-password-file", write_secret(device, "mqtt_password", FAKE_MQTT_PASSWORD),
        "--hf-token-file", write_secret(device, "hf_token", FAKE_HF_TOKEN),
        "--operator", "alice",
        "--fleet-pubkey-file", "/root/fleet_pubkey.pem",
    ]
    started = time.monotonic()
    first = bootstrap(device, *args)
    install_s = round(time.monotonic() - started, 1)
    record("bootstrap.sh first run (s)", install_s)
    if first.returncode != 0:
        raise DeviceError(f"bootstrap.sh failed (exit {first.returncode}):\n{first.stdout[-5000:]}\n"
                          f"{first.stderr[-3000:]}\n{device.journal(lines=30)}")
    return Board(device, device.name, host_broker.port, args, first.stdout + first.stderr, install_s, fleet_key)


# --- scenario 1: install, serve, rerun --------------------------------------------------------------


def test_bootstrap_installs_a_hardened_service_that_answers_and_reruns_clean(board: Board, hub: FakeHub) -> None:
    """bootstrap.sh on a fresh device: active, READY with a STATUS= text, online, answers; a rerun changes nothing."""
    d = board.device
    up = serving(d, board.port, board.device_id)
    record("scenario 1: StatusText", up["show"]["StatusText"])
    assert up["status"]["device_id"] == board.device_id
    # Provisioning installed what llama.cpp links against; the fresh image did not have it.
    assert not (d.base / "usr/lib/x86_64-linux-gnu/libgomp.so.1").exists()
    assert d.run(["dpkg-query", "-W", "-f=${Status}", "libgomp1"], check=False).stdout == "install ok installed"
    assert d.run(["readlink", "/usr/local/bin/edge-agent"]).stdout.strip() == "/opt/edge-agent/venv/bin/edge-agent"
    # The pull used the hf_token credential on the Hub endpoint (the CDN never sees it).
    assert any(r.authorization == f"Bearer {FAKE_HF_TOKEN}" for r in hub.log if r.server == "hub")
    assert not any(r.authorization for r in hub.log if r.server == "cdn")

    started = time.monotonic()
    second = bootstrap(d, *board.args)
    record("bootstrap.sh second run (s)", round(time.monotonic() - started, 1))
    assert second.returncode == 0, second.stdout + second.stderr
    record("bootstrap.sh changes: first, second", (changes(board.first_output), changes(second.stdout)))
    assert changes(second.stdout) == 0, second.stdout

    level = exposure(d)
    record("scenario 1: systemd-analyze security exposure", level)
    assert level <= MAX_EXPOSURE

    for text in (board.first_output, second.stdout + second.stderr, d.journal(),
                 board.host_path(CONFIG).read_text()):
        assert FAKE_MQTT_PASSWORD not in text
        assert FAKE_HF_TOKEN not in text
    modes = d.run(["stat", "-c", "%U:%G %a %n", "/etc/edge-agent/credentials/mqtt_password",
                   "/etc/edge-agent/credentials/hf_token", CONFIG]).stdout
    assert "root:root 600 /etc/edge-agent/credentials/mqtt_password" in modes
    assert "root:root 600 /etc/edge-agent/credentials/hf_token" in modes
    assert f"root:edge-agent 640 {CONFIG}" in modes
    # Keyed for signed fleet commands: no warning that commands would be refused.
    assert "refuse every fleet command" not in board.first_output
    assert "LoadCredential=fleet_pubkey:/etc/edge-agent/credentials/fleet_pubkey" in d.run(
        ["cat", "/etc/systemd/system/edge-agent.service.d/10-credentials.conf"]).stdout


# --- scenario 9: a non-root operator ----------------------------------------------------------------


def test_operator_in_the_edge_agent_group_asks_and_reads_status(board: Board) -> None:
    """alice (added by --operator) runs `edge-agent ask` and `edge-agent status` from her login shell."""
    d = board.device
    wait_active(d)
    assert "edge-agent" in d.run(["id", "-nG", "alice"]).stdout.split()
    answer = d.run(["edge-agent", "ask", "--max-tokens", "8", "Hello from alice"], user="alice", timeout=120,
                   check=False)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert answer.stdout.strip(), answer.stderr
    status = d.run(["edge-agent", "status"], user="alice", timeout=60, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "online" in status.stdout, status.stdout
    as_json = d.run(["edge-agent", "status", "--json"], user="alice", timeout=60, check=False)
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    assert json.loads(as_json.stdout)["status"]["state"] == "online"


# --- scenario 7: poison messages --------------------------------------------------------------------

DEEP = b"[" * 3000 + b"]" * 3000  # 6 KB nested 3,000 deep: RecursionError in json.loads
POISONS: dict[str, bytes] = {
    "deep": DEEP,
    "deep-in-object": b'{"id": "poison-deep", "prompt": "hi", "stop": ' + DEEP + b"}",
    "huge": b'{"id": "poison-huge", "prompt": "' + b"A" * (4 * 2**20) + b'"}',
    "bad-utf8": b'{"id": "poison-utf8", "prompt": "\xff\xfe\xc3\x28"}',
    "array": b"[1, 2, 3]",
    "string": b'"just a string"',
}


def test_poison_messages_never_crash_or_loop(board: Board) -> None:
    """Deep, huge, invalid-UTF-8 and non-object payloads on infer, fleet-share and command topics: the daemon
    keeps serving, answers each infer once with an error, nothing is redelivered after a restart, NRestarts 0."""
    d, port, device_id = board.device, board.port, board.device_id
    reset_failed(d)
    wait_active(d)
    wait_online(port, device_id)
    main_pid = d.show()["MainPID"]
    topics = {"infer": f"edge/{device_id}/infer", "fleet-share": "edge/fleet/infer",
              "command": f"edge/{device_id}/cmd/ping"}
    client = MqttClient(port, ["systest/poison/#", f"edge/{device_id}/cmd/result"])
    try:
        for where, topic in topics.items():
            for kind, payload in POISONS.items():
                client.publish(topic, payload, response_topic=f"systest/poison/{where}/{kind}",
                               correlation=f"{where}/{kind}".encode())
        # Still serving, right after the flood.
        ask(port, device_id, "still there?")
        for where in ("infer", "fleet-share"):
            for kind in POISONS:
                reply = client.wait(f"systest/poison/{where}/{kind}", timeout=30).json()
                assert reply["error"]["code"] in ("bad_request", "too_large"), (where, kind, reply)
        show = d.show()
        assert (show["NRestarts"], show["MainPID"]) == ("0", main_pid), show

        # Acknowledged, not just survived: a clean restart gets nothing redelivered by the broker.
        seen = client.mark()
        restart(d)
        wait_active(d)
        wait_online(port, device_id)
        ask(port, device_id, "after the restart")
        time.sleep(3)
        again = [s.topic for s in client.seen[seen:] if s.topic.startswith("systest/poison/")]
        assert again == [], f"poison messages were redelivered and answered again: {again}"
        command_results = client.on(f"edge/{device_id}/cmd/result", after=seen)
        assert command_results == [], [s.payload[:200] for s in command_results]
        record("scenario 7: NRestarts after poison messages", show["NRestarts"])
    finally:
        client.close()


def test_warnings_reach_the_journal_at_warning_priority(board: Board) -> None:
    """A refused request is a warning in the journal: `journalctl -p warning -u edge-agent` shows it."""
    d, port, device_id = board.device, board.port, board.device_id
    wait_active(d)
    cursor = d.cursor()
    reply = mosquitto_rr(port, device_id, {"id": "warn-me", "prompt": "hi", "no_such_field": 1}, timeout=30)
    assert reply["error"]["code"] == "bad_request", reply
    deadline = time.monotonic() + 10
    warnings = ""
    while time.monotonic() < deadline and "warn-me" not in warnings:
        # The whole unit's history, no --after-cursor: journalctl 252 combining --after-cursor with -u and
        # -p answered "-- No entries --" here although the entry had PRIORITY=4 (the id is unique anyway).
        warnings = d.journal(priority="warning")
        time.sleep(0.5)
    if "warn-me" not in warnings:
        lines = [(e["_priority"], e.get("event"), e.get("id")) for e in d.events(cursor=cursor)]
        stream = d.sh("pid=$(systemctl show -p MainPID --value edge-agent); "
                      "tr '\\0' '\\n' < /proc/$pid/environ | grep JOURNAL_STREAM; stat -L -c '%d:%i' /proc/$pid/fd/1",
                      check=False).stdout
        raise AssertionError(f"nothing at warning priority; (PRIORITY, event, id) since: {lines}; "
                             f"the daemon's JOURNAL_STREAM and stdout dev:inode: {stream.split()}")
    events = [e for e in d.events(cursor=cursor) if "warn-me" in json.dumps(e)]
    assert events and all(int(str(e["_priority"])) <= 4 for e in events), events
    record("journal -p warning after a refused request", warnings.strip().splitlines()[-1][:200])


# --- scenario 5: fleet commands ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ops(board: Board, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's config on the host, with the fleet's private key: `fleet cmd` signs every command."""
    return write_operator_config(tmp_path_factory.mktemp("ops") / "ops.toml", board.port, board.fleet_key)


def _one_result(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout)
    assert len(out["results"]) == 1, out
    result = out["results"][0]
    assert result["ok"], result
    return result


def test_config_set_persists_in_the_override_file_across_a_restart(board: Board, ops: Path) -> None:
    """config-set writes the fleet override file (not agent.toml); `restart` exits 75, systemd restarts it,
    and the value is still in force."""
    d, device_id = board.device, board.device_id
    reset_failed(d)
    wait_active(d)
    provisioned = board.host_path(CONFIG).read_text()
    # The same command unsigned is refused by the keyed board (loaded as the fleet_pubkey credential).
    no_key = write_operator_config(ops.parent / "unsigned.toml", board.port)
    refused = fleet_cmd(no_key, device_id, "config-set", "key=inference.max_queue", "value=3")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert json.loads(refused.stdout)["results"][0]["error"]["code"] == "unsigned", refused.stdout
    result = _one_result(fleet_cmd(ops, device_id, "config-set", "key=inference.max_queue", "value=3"))
    assert result["result"]["persisted"], result
    overrides = board.host_path(OVERRIDES)
    assert overrides.is_file(), f"no {OVERRIDES} after config-set"
    assert "max_queue = 3" in overrides.read_text(), overrides.read_text()
    assert board.host_path(CONFIG).read_text() == provisioned

    main_pid = d.show()["MainPID"]
    cursor = d.cursor()
    started = time.monotonic()
    _one_result(fleet_cmd(ops, device_id, "restart"))
    d.wait_for("the restarted service", lambda: (s := d.show())["MainPID"] not in ("0", main_pid)
               and s["SubState"] == "running" and s, timeout=90)
    restart_s = round(time.monotonic() - started, 1)
    show = d.show()
    assert show["NRestarts"] == "1", show  # restarted by systemd (RestartForceExitStatus=75), not by us
    stopped = [e for e in d.events(cursor=cursor) if e.get("event") == "agent_stopped"]
    assert stopped and stopped[-1].get("exit_code") == 75, stopped
    wait_online(board.port, device_id)
    got = _one_result(fleet_cmd(ops, device_id, "config-get", "key=inference.max_queue"))
    assert got["result"]["value"] == 3, got
    record("scenario 5: fleet restart → serving again (s)", restart_s)
    # Leave no override behind (it would win over agent.toml in later tests): null removes the key.
    _one_result(fleet_cmd(ops, device_id, "config-set", "key=inference.max_queue", "value=null"))
    assert "max_queue" not in (overrides.read_text() if overrides.exists() else "")


def test_set_model_switches_to_another_catalog_model(board: Board, ops: Path, hub: FakeHub) -> None:
    """set-model to another catalog entry pulls it from the Hub and serves it."""
    d, port, device_id = board.device, board.port, board.device_id
    wait_active(d)
    before = wait_online(port, device_id)
    started = time.monotonic()
    result = _one_result(fleet_cmd(ops, device_id, "set-model", "model=smollm2-360m-instruct", timeout=180))
    record("scenario 5: set-model (s)", round(time.monotonic() - started, 1))
    assert hub.file_gets(SMOLLM_360M[1]), "the new model was not pulled from the Hub"
    status = wait_online(port, device_id)
    assert status.get("model") != before.get("model") or status.get("quant") != before.get("quant"), (before, status)
    assert "360m" in json.dumps(status).lower(), status
    ask(port, device_id)
    assert hub.file_gets(SMOLLM_135M[1]), "the first model did not come from the same Hub"
    record("scenario 5: set-model result", result["result"])


def test_drain_refuses_new_work_and_resume_takes_it_again(board: Board, ops: Path) -> None:
    """drain → status 'draining', requests answered 'overloaded'; resume → online and answering."""
    d, port, device_id = board.device, board.port, board.device_id
    wait_active(d)
    watch = StatusWatch(port, device_id)
    try:
        mark = watch.mark()
        _one_result(fleet_cmd(ops, device_id, "drain"))
        watch.wait_state("draining", after=mark, timeout=20)
        refused = mosquitto_rr(port, device_id, {"prompt": "drained?", "max_tokens": 4}, timeout=30)
        assert refused.get("error", {}).get("code") == "overloaded", refused
        mark = watch.mark()
        _one_result(fleet_cmd(ops, device_id, "resume"))
        watch.wait_state("online", after=mark, timeout=20)
        ask(port, device_id, "back?")
    finally:
        watch.close()


# --- scenario 6: the watchdog -----------------------------------------------------------------------

WATCHDOG_DROPIN = "/etc/systemd/system/edge-agent.service.d/90-systest-watchdog.conf"


def test_watchdog_kills_and_restarts_a_hung_main_loop(board: Board) -> None:
    """With WatchdogSec=4s, a main loop wedged by SIGUSR2 (EDGE_TEST_HOOKS=1) is killed and restarted by systemd."""
    d, port, device_id = board.device, board.port, board.device_id
    d.sh(f"printf '[Service]\\nWatchdogSec=4s\\nRestartSec=1s\\nEnvironment=EDGE_TEST_HOOKS=1\\n' > {WATCHDOG_DROPIN}"
         " && systemctl daemon-reload")
    try:
        restart(d)
        wait_active(d)
        wait_online(port, device_id)
        reset_failed(d)
        assert d.show(props=("WatchdogUSec",))["WatchdogUSec"] == "4s"
        main_pid = d.show()["MainPID"]
        cursor = d.cursor()
        d.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGUSR2", "edge-agent"])
        wedged = time.monotonic()
        d.wait_for("a restart after the watchdog fired",
                   lambda: (s := d.show())["NRestarts"] == "1" and s["MainPID"] not in ("0", main_pid) and s,
                   timeout=60)
        killed_s = round(time.monotonic() - wedged, 1)
        journal = d.journal(cursor=cursor)
        assert "Watchdog timeout" in journal, journal[-3000:]
        wait_active(d)
        wait_online(port, device_id)
        ask(port, device_id, "awake again?")
        record("scenario 6: wedge → restarted by the watchdog (s; WatchdogSec=4, RestartSec=1)", killed_s)
        assert killed_s <= 4 + 1 + 10, journal[-3000:]
    finally:
        d.sh(f"rm -f {WATCHDOG_DROPIN} && systemctl daemon-reload")
        restart(d)
        reset_failed(d)


# --- scenario 8: config errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        pytest.param(lambda text: text.replace("[inference]\n", "[inference]\nmax_queue = -1\n", 1), "max_queue",
                     id="max_queue=-1"),
        pytest.param(lambda text: "no_such_key = 1\n" + text, "no_such_key", id="unknown-key"),
    ],
)
def test_a_config_error_fails_once_with_the_reason_and_no_restart_storm(
    board: Board, edit: Callable[[str], str], reason: str
) -> None:
    """A bad agent.toml: the unit fails once with exit status 78 (EX_CONFIG), the reason in `systemctl status`,
    and stays failed (NRestarts 0 after 15 s)."""
    d, port, device_id = board.device, board.port, board.device_id
    config = board.host_path(CONFIG)
    original = config.read_text()
    assert reason not in original
    try:
        config.write_text(edit(original))  # in place: owner and mode stay
        reset_failed(d)
        cursor = d.cursor()
        restart(d)
        failed = d.wait_for("the unit to fail", lambda: (s := d.show())["ActiveState"] == "failed" and s,
                            timeout=60)
        time.sleep(15)
        show = d.show()
        status = d.run(["systemctl", "status", "--no-pager", "--lines=20", "edge-agent"], check=False).stdout
        record(f"scenario 8 ({reason}): show after 15 s", {k: show[k] for k in
                                                             ("ActiveState", "NRestarts", "ExecMainStatus")})
        assert show["NRestarts"] == "0", (show, d.journal(cursor=cursor))
        assert show["ActiveState"] == "failed", show
        assert show["ExecMainStatus"] == "78", (failed, d.journal(cursor=cursor)[-3000:])
        assert reason in show["StatusText"] or reason in status, status
    finally:
        config.write_text(original)
        reset_failed(d)
        restart(d)
    wait_active(d)
    wait_online(port, device_id)
