"""Fleet control against real daemons (tiny models) on a real Mosquitto: targets, idempotency, expiry,
live config, hot model swap under load, shared-subscription inference with drain, restart and signatures.

The three-daemon fleet is started once for the module (daemon start-up dominates the runtime); tests
that change a daemon's lifecycle (restart, model swap, signature keys) start their own.
"""

from __future__ import annotations

import json
import queue
import time
import tomllib
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cli.fleet import CommandRun, Operator
from agent.fleet.signing import load_private_key
from agent.fleet.wire import build_command
from agent.settings import OVERRIDES_FILE_NAME
from agent.transport.topics import parse_target
from tests.support.broker import Broker
from tests.support.daemon import Client, DaemonProcess, write_config
from tests.support.fake_hub import FakeHub
from tests.support.fleet import make_settings, release_paho_sockets, run_fleet_cli, write_operator_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GROUPS = {"dev-a": ["blue"], "dev-b": ["blue"], "dev-c": ["red"]}
RESTART_EXIT_CODE = 75  # agent.daemon.RESTART_EXIT_CODE; spelled out: it is the contract with systemd


@dataclass
class Fleet:
    broker: Broker
    daemons: dict[str, DaemonProcess]
    operator_config: Path

    def done_events(self, device: str, command_id: str) -> list[dict[str, Any]]:
        """The device's ``fleet_command_done`` log events for one command id (one per execution)."""
        return [e for e in self.daemons[device].events()
                if e.get("event") == "fleet_command_done" and e.get("id") == command_id]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Fleet]:
    """Three real daemons: dev-a and dev-b in group blue, dev-c in group red; all online."""
    root = tmp_path_factory.mktemp("fleet")
    broker = Broker(root / "broker").start()
    daemons: dict[str, DaemonProcess] = {}
    try:
        for device, groups in GROUPS.items():
            workdir = root / device
            workdir.mkdir()
            # One thread each: three llama.cpp processes spinning two threads each on two cores slow
            # every token ~100x. A queue deep enough for a 30-request burst spread over three devices.
            config = write_config(workdir / "agent.toml", port=broker.port, model_file=tiny_models["Q8_0"],
                                  device_id=device, top={"groups": groups}, model={"threads": 1},
                                  inference={"max_queue": 16})
            daemons[device] = DaemonProcess(config=config, workdir=workdir).start()
        watcher = Client(broker.port)
        try:
            for device in daemons:
                # Subscriptions are made before the retained 'online' status is published, on one connection.
                watcher.retained(f"edge/{device}/status", timeout=60, state="online")
        finally:
            watcher.close()
        yield Fleet(broker, daemons, write_operator_config(root / "op.toml", broker.port))
    finally:
        for daemon in daemons.values():
            daemon.stop()
        broker.stop()


@contextmanager
def operator_on(port: int) -> Iterator[Operator]:
    """An in-process operator (what `fleet cmd` runs) watching statuses and every device's results."""
    op = Operator(make_settings("operator", port=port))
    op.start([op.status_filter, "edge/+/cmd/result"])
    op.settle()
    try:
        yield op
    finally:
        op.stop()
        release_paho_sockets(op.link)


def fleet_cmd(fleet: Fleet, *args: str) -> tuple[int, dict[str, Any]]:
    """`edge-agent fleet cmd ARGS --json` as a subprocess: exit code and parsed output."""
    done = run_fleet_cli("cmd", *args, "--json", "--timeout", "10", config=fleet.operator_config)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def by_device(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["device_id"]: r for r in out["results"]}


def ask_fleet(client: Client, count: int, tag: str, *, max_tokens: int = 2,
              timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Publish ``count`` requests to ``edge/fleet/infer`` (Response Topic) and gather every final reply by id.

    Keeps listening briefly after the last expected reply, so a request answered twice would show.
    """
    reply = f"test/fleet-replies/{tag}"
    client.subscribe(reply)
    for i in range(count):
        client.publish("edge/fleet/infer", {"id": f"{tag}-{i}", "prompt": "hi", "max_tokens": max_tokens},
                       response_topic=reply, correlation=f"{tag}-{i}".encode())
    finals: dict[str, list[dict[str, Any]]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = client.messages.get(timeout=0.5 if len(finals) >= count else 1.0)
        except queue.Empty:
            if len(finals) >= count:
                break
            continue
        body = json.loads(message.payload)
        if message.topic == reply and body.get("done"):
            finals[body["id"]].append(body)
    return dict(finals)


# -- targets, duplicates, expiry -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reached"),
    [("dev-c", {"dev-c"}), ("group:blue", {"dev-a", "dev-b"}), ("group:red", {"dev-c"}),
     ("all", {"dev-a", "dev-b", "dev-c"})],
)
def test_ping_reaches_exactly_the_addressed_daemons(fleet: Fleet, target: str, reached: set[str]) -> None:
    """`fleet cmd TARGET ping` is executed by exactly the addressed daemons, and every one of them answers."""
    code, out = fleet_cmd(fleet, target, "ping")
    assert code == 0, out
    assert set(by_device(out)) == reached
    assert out["summary"]["no_answer"] == 0
    assert all(r["ok"] and r["result"]["pong"] for r in out["results"])
    executed = {d for d in fleet.daemons if fleet.done_events(d, out["id"])}
    assert executed == reached


def test_duplicate_command_id_is_answered_from_the_store_not_run_again(fleet: Fleet) -> None:
    """Re-sending a command id to all gets each daemon's stored result, marked duplicate, and runs nothing twice."""
    command_id = f"ping-{uuid.uuid4().hex[:8]}"
    code, first = fleet_cmd(fleet, "all", "ping", "--id", command_id)
    code_again, again = fleet_cmd(fleet, "all", "ping", "--id", command_id)
    assert (code, code_again) == (0, 0)
    assert {d: r["duplicate"] for d, r in by_device(again).items()} == dict.fromkeys(GROUPS, True)
    # The stored result, not a new one: the pong carries the first execution's clock.
    stored = {d: r["result"] for d, r in by_device(first).items()}
    assert {d: r["result"] for d, r in by_device(again).items()} == stored
    assert {d: len(fleet.done_events(d, command_id)) for d in GROUPS} == dict.fromkeys(GROUPS, 1)


def test_expired_restart_is_refused_and_no_daemon_restarts(fleet: Fleet) -> None:
    """A `restart` past its expires_at is answered 'expired' by every daemon, and every daemon keeps running."""
    code, out = fleet_cmd(fleet, "all", "restart", "--ttl=-1")
    assert code == 1
    assert {d: r["error"]["code"] for d, r in by_device(out).items()} == dict.fromkeys(GROUPS, "expired")
    time.sleep(1.0)  # a restart would have exited 0.5 s after its result
    assert all(d.proc is not None and d.proc.poll() is None for d in fleet.daemons.values())


def test_fleet_ls_lists_the_running_daemons_with_groups_and_model(fleet: Fleet) -> None:
    """`fleet ls --json` shows each daemon online, in its groups, with its model and its telemetry."""
    watcher = Client(fleet.broker.port)
    try:
        for device in GROUPS:  # the first telemetry goes out about a second after start-up
            watcher.retained(f"edge/{device}/telemetry")
    finally:
        watcher.close()
    done = run_fleet_cli("ls", "--json", "--wait", "2", config=fleet.operator_config)
    assert done.returncode == 0, done.stderr
    rows = {r["device_id"]: r for r in json.loads(done.stdout)}
    assert {d: (r["state"], r["groups"]) for d, r in rows.items()} == {d: ("online", g) for d, g in GROUPS.items()}
    assert {(r["model"], r["queue"], r["stale"]) for r in rows.values()} == {("tiny-llama", 0, False)}


# -- fleet-wide inference (shared subscription) --------------------------------------------------------


def test_fleet_requests_are_shared_and_a_draining_daemon_gets_none(fleet: Fleet) -> None:
    """30 requests to edge/fleet/infer are each answered once, by all three; a drained daemon gets none till resumed."""
    client = Client(fleet.broker.port)
    try:
        spread = ask_fleet(client, 30, "burst")
        assert sorted(spread) == sorted(f"burst-{i}" for i in range(30))
        assert all(len(replies) == 1 and "error" not in replies[0] for replies in spread.values())
        assert {r[0]["served_by"] for r in spread.values()} == set(GROUPS)

        with operator_on(fleet.broker.port) as op:
            drained = op.command("device", "dev-b", "drain", {}, timeout=10)
            assert drained.succeeded, drained.results
            assert client.retained("edge/dev-b/status", state="draining")["device_id"] == "dev-b"
            try:
                during = ask_fleet(client, 12, "drained")
            finally:
                resumed = op.command("device", "dev-b", "resume", {}, timeout=10)
            assert resumed.succeeded, resumed.results
        assert len(during) == 12
        assert all(len(replies) == 1 and "error" not in replies[0] for replies in during.values())
        assert {r[0]["served_by"] for r in during.values()} == {"dev-a", "dev-c"}

        after = ask_fleet(client, 12, "resumed")
        assert all(len(replies) == 1 and "error" not in replies[0] for replies in after.values())
        assert "dev-b" in {r[0]["served_by"] for r in after.values()}
    finally:
        client.close()


def test_fleet_ask_cli_gets_one_answer_from_some_device(fleet: Fleet) -> None:
    """`fleet ask` sends to the shared fleet topic; exactly one of the devices answers, and says which."""
    done = run_fleet_cli("ask", "Hello", "--max-tokens", "3", "--json", "--timeout", "30", config=fleet.operator_config)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["served_by"] in GROUPS


def test_a_stopped_daemon_leaves_the_fleet_requests_to_the_others(start_daemon, broker: Broker) -> None:
    """After one of two daemons shuts down cleanly, every fleet request is answered promptly by the other."""
    start_daemon("dev1", model_cfg={"threads": 1}, inference={"max_queue": 8})
    leaving = start_daemon("dev2", model_cfg={"threads": 1}, inference={"max_queue": 8})
    client = Client(broker.port)
    try:
        for device in ("dev1", "dev2"):
            client.retained(f"edge/{device}/status", state="online")
        leaving.stop()
        assert client.retained("edge/dev2/status")["state"] == "offline"
        answered = ask_fleet(client, 6, "after-stop", timeout=8.0)
    finally:
        client.close()
    assert sorted(answered) == sorted(f"after-stop-{i}" for i in range(6))
    assert all(len(r) == 1 and "error" not in r[0] for r in answered.values()), answered
    assert {r[0]["served_by"] for r in answered.values()} == {"dev1"}


# -- live config, persistence and restart --------------------------------------------------------------


def command(op: Operator, device: str, name: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """Run one command on one device and return its result body."""
    run: CommandRun = op.command("device", device, name, args or {}, timeout=15, **kw)
    assert device in run.results, f"{device} did not answer {name}"
    return run.results[device]


def test_config_set_validates_persists_and_survives_a_restart_command(start_daemon, broker: Broker) -> None:
    """A bad value is refused naming its key path; a good one is live, in the fleet override layer (the
    provisioned file untouched), and still there after `restart` (result first, then exit 75) and a new
    start; the restart id is not run again afterwards."""
    daemon = start_daemon("dev1", inference={"max_queue": 4})
    daemon.wait_event("agent_started", timeout=60)  # fleet topics are subscribed once the model is loaded
    provisioned = daemon.config.read_text()
    with operator_on(broker.port) as op:
        bad = command(op, "dev1", "config-set", {"key": "inference.max_queue", "value": -1})
        typo = command(op, "dev1", "config-set", {"key": "inference.max_qeue", "value": 3})
        good = command(op, "dev1", "config-set", {"key": "inference.max_queue", "value": 7})
        live = command(op, "dev1", "config-get", {"key": "inference.max_queue"})
        restart = command(op, "dev1", "restart", command_id="restart-1")
        exit_code = daemon.wait(20)
    assert (bad["ok"], bad["error"]["code"]) == (False, "bad_config")
    assert "inference.max_queue" in bad["error"]["message"]
    assert (typo["ok"], typo["error"]["code"]) == (False, "bad_config")
    assert "inference.max_qeue" in typo["error"]["message"]
    assert good["ok"], good
    assert good["result"]["applied"] == ["inference.max_queue"]
    layer = daemon.config.parent / "state-dev1" / "fleet" / OVERRIDES_FILE_NAME
    assert good["result"]["persisted"] == str(layer)
    assert tomllib.loads(layer.read_text()) == {"inference": {"max_queue": 7}}
    assert daemon.config.read_text() == provisioned
    assert live["result"]["value"] == 7
    assert restart == {**restart, "ok": True, "result": {"restarting": True}}
    assert exit_code == RESTART_EXIT_CODE

    again = DaemonProcess(config=daemon.config, workdir=daemon.workdir).start()
    try:
        again.wait_event("agent_started", timeout=60)
        # allow_unsigned is announced at every start, not once per state directory.
        assert again.wait_event("fleet_unsigned_commands_allowed", timeout=1)["level"] == "warning"
        with operator_on(broker.port) as op:
            after = command(op, "dev1", "config-get", {"key": "inference.max_queue"})
            redelivered = command(op, "dev1", "restart", command_id="restart-1")
        assert after["result"]["value"] == 7
        assert after["result"]["source"] == f"fleet-override:{layer}"
        assert redelivered["duplicate"] is True
        time.sleep(1.0)
        assert again.proc is not None and again.proc.poll() is None
    finally:
        again.stop()


# -- hot model swap under load ------------------------------------------------------------------------

HUB_REPO = "edge-test/tiny-llama-GGUF"
# The slow model is the catalog's Q4_0 (what the daemon starts on), the fast one its Q8_0 (what it swaps to).
HUB_FILES = {"Q4_0": "tiny-llama-Q4_0.gguf", "Q8_0": "tiny-llama-Q8_0.gguf"}


@pytest.fixture
def hub(tiny_models: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, {HUB_FILES["Q4_0"]: tiny_models["slow"], HUB_FILES["Q8_0"]: tiny_models["Q8_0"]})
        yield fake


def catalog_daemon(tmp_path: Path, broker: Broker, hub: FakeHub) -> DaemonProcess:
    catalog = tmp_path / "models.toml"
    files = ", ".join(f'{tag} = "{name}"' for tag, name in HUB_FILES.items())
    catalog.write_text(f'[models.tiny]\nrepo = "{HUB_REPO}"\nn_ctx = 512\nfiles = {{ {files} }}\n')
    config = write_config(tmp_path / "agent.toml", port=broker.port, model_file=Path("unused"),
                          inference={"max_queue": 16},
                          hub={"endpoint": hub.endpoint, "cache_dir": str(tmp_path / "hf-cache")})
    config.write_text(config.read_text().replace(
        'path = "unused"', f'name = "tiny"\nquant = "Q4_0"\ncatalog = "{catalog}"'))
    return DaemonProcess(config=config, workdir=tmp_path).start()


def test_set_model_swaps_between_requests_without_dropping_queued_ones(tmp_path: Path, broker: Broker,
                                                                       hub: FakeHub) -> None:
    """With requests queued on the slow quant, `set-model tiny Q8_0` swaps mid-queue: every request gets
    exactly one final reply (old model before, new model after), and status shows the new quant."""
    daemon = catalog_daemon(tmp_path, broker, hub)
    client = Client(broker.port)
    try:
        daemon.wait_event("agent_started", timeout=60)
        assert client.retained("edge/dev1/status", state="online")["quant"] == "Q4_0"
        client.subscribe("edge/dev1/events")
        reply = "test/swap-replies"
        client.subscribe(reply)
        count = 8  # ~0.5 s each on the slow model: the queue lasts seconds, the swap takes a fraction
        with operator_on(broker.port) as op:
            for i in range(count):
                client.publish("edge/dev1/infer", {"id": f"q-{i}", "prompt": "hi", "max_tokens": 200},
                               response_topic=reply, correlation=str(i).encode())
            swap = command(op, "dev1", "set-model", {"model": "tiny", "quant": "Q8_0"})
            status = command(op, "dev1", "status")
        finals: dict[str, list[dict[str, Any]]] = defaultdict(list)
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                message = client.messages.get(timeout=1.0)
            except queue.Empty:
                if len(finals) >= count:
                    break
                continue
            body = json.loads(message.payload)
            if message.topic == "edge/dev1/events":
                events.append(body)
            elif message.topic == reply and body.get("done"):
                finals[body["id"]].append(body)
        retained = client.retained("edge/dev1/status", state="online")
    finally:
        client.close()
        daemon.stop()
    assert swap["ok"], swap
    assert swap["result"]["quant"] == "Q8_0"
    assert swap["result"]["changed"] is True
    assert sorted(finals) == sorted(f"q-{i}" for i in range(count))
    assert all(len(r) == 1 and "error" not in r[0] for r in finals.values()), finals
    served = [finals[f"q-{i}"][0]["model"] for i in range(count)]
    switched_at = served.index("tiny-llama")  # raises if every request finished before the swap
    assert served == ["tiny-slow"] * switched_at + ["tiny-llama"] * (count - switched_at)
    assert switched_at >= 1  # the swap happened while requests were queued behind a running one
    assert (status["result"]["quant"], retained["quant"]) == ("Q8_0", "Q8_0")
    finished = [e for e in events if e["kind"] == "swap_finished"]
    assert len(finished) == 1
    pause_ms = finished[0]["numbers"]["pause_ms"]
    print(f"swap: side_by_side={swap['result']['side_by_side']} pause_ms={pause_ms} "
          f"total_ms={finished[0]['numbers']['total_ms']} served={served}")
    assert pause_ms < 1000


# -- signed commands -----------------------------------------------------------------------------------


def test_a_daemon_without_a_key_refuses_every_command_naming_the_fix(start_daemon, broker: Broker,
                                                                     tmp_path: Path) -> None:
    """No fleet key and no allow_unsigned (the default): unsigned and signed commands are both refused
    'no_fleet_key' with a message naming the credential and fleet.allow_unsigned, nothing runs, the start
    log says so, and the daemon keeps serving."""
    operator_config = write_operator_config(tmp_path / "op.toml", broker.port)
    keys = tmp_path / "keys"
    assert run_fleet_cli("keygen", "--out", str(keys), config=operator_config).returncode == 0
    daemon = start_daemon("dev1", fleet={"allow_unsigned": False})
    assert daemon.wait_event("fleet_commands_refused_no_key")["level"] == "warning"
    unsigned = run_fleet_cli("cmd", "dev1", "drain", "--json", "--timeout", "5", config=operator_config)
    signed = run_fleet_cli("cmd", "dev1", "drain", "--json", "--timeout", "5", "--key",
                           str(keys / "fleet_key.pem"), config=operator_config)
    assert (unsigned.returncode, signed.returncode) == (1, 1)
    for run in (unsigned, signed):
        error = by_device(json.loads(run.stdout))["dev1"]["error"]
        assert error["code"] == "no_fleet_key", error
        assert "'fleet_pubkey' credential" in error["message"]
        assert "fleet.allow_unsigned = true" in error["message"]
    client = Client(broker.port)
    try:
        status = client.retained("edge/dev1/status")
        assert (status["state"], status["commands"]) == ("online", "refused")  # the drains did not run
        reply = client.collect(client.request("dev1", {"id": "still-serving", "prompt": "hi", "max_tokens": 2}))
    finally:
        client.close()
    assert "error" not in json.loads(reply[-1].payload)
    assert not [e for e in daemon.events() if e.get("event") == "fleet_command_done"]


def test_allow_unsigned_daemons_say_so_loudly_at_start(fleet: Fleet) -> None:
    """The module's daemons (fleet.allow_unsigned = true, no key) each logged fleet_unsigned_commands_allowed
    as a warning when they started, and ran the unsigned commands of the tests above."""
    watcher = Client(fleet.broker.port)
    try:
        for device, daemon in fleet.daemons.items():
            event = daemon.wait_event("fleet_unsigned_commands_allowed", timeout=1)
            assert event["level"] == "warning", (device, event)
            assert "anyone who can publish" in event["risk"]
            assert watcher.retained(f"edge/{device}/status")["commands"] == "unsigned"
    finally:
        watcher.close()
    code, out = fleet_cmd(fleet, "all", "ping")
    assert code == 0, out


class ResultReader:
    """Publishes crafted command payloads and reads their results off ``edge/dev1/cmd/result`` by id."""

    def __init__(self, client: Client) -> None:
        self.client = client
        client.subscribe("edge/dev1/cmd/result")
        client.subscribe("test/sender-chosen")

    def send(self, topic: str, payload: dict[str, Any], *, sender_topic: bool = True) -> dict[str, Any]:
        """The result for ``payload['id']``; refusals must not reach the sender's Response Topic."""
        self.client.publish(topic, payload, response_topic="test/sender-chosen" if sender_topic else None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                message = self.client.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            body = json.loads(message.payload)
            if message.topic == "edge/dev1/cmd/result" and body.get("id") == payload["id"]:
                return body
            assert message.topic != "test/sender-chosen" or body.get("ok"), f"a refusal reached the sender: {body}"
        raise AssertionError(f"no result for {payload['id']} on {topic}")


def test_signed_daemon_runs_only_commands_signed_by_the_fleet_key(start_daemon, broker: Broker,
                                                                  tmp_path: Path) -> None:
    """With [fleet] public_key from `fleet keygen`, one daemon refuses every forgery and keeps answering good
    commands: unsigned → 'unsigned'; another key, a tampered payload, a command signed for another device or
    another command → 'bad_signature'; issued_at an hour old or ahead → 'stale'; the same signed message
    again → its stored result (duplicate, not run again), and once that fell out of the result store →
    'replayed'. None is answered on the sender's Response Topic, and a good signed command still runs."""
    operator_config = write_operator_config(tmp_path / "op.toml", broker.port)
    keys = tmp_path / "keys"
    assert run_fleet_cli("keygen", "--out", str(keys), config=operator_config).returncode == 0
    assert run_fleet_cli("keygen", "--out", str(tmp_path / "intruder"), config=operator_config).returncode == 0
    daemon = start_daemon("dev1", fleet={"public_key": str(keys / "fleet_pubkey.pem"), "allow_unsigned": False,
                                         "result_cache_size": 16})
    assert daemon.wait_event("fleet_signed_commands_required")["public_key"] == str(keys / "fleet_pubkey.pem")
    watcher = Client(broker.port)
    try:
        # Subscribed by now (same connection, earlier); the status says signatures are required.
        assert watcher.retained("edge/dev1/status", state="online")["commands"] == "signed"
    finally:
        watcher.close()

    unsigned = run_fleet_cli("cmd", "dev1", "drain", "--json", "--timeout", "5", config=operator_config)
    signed = run_fleet_cli("cmd", "dev1", "drain", "--json", "--timeout", "5", "--key",
                           str(keys / "fleet_key.pem"), config=operator_config)
    assert unsigned.returncode == 1
    assert by_device(json.loads(unsigned.stdout))["dev1"]["error"]["code"] == "unsigned"
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert by_device(json.loads(signed.stdout))["dev1"]["result"]["draining"] is True

    key, intruder = load_private_key(keys / "fleet_key.pem"), load_private_key(tmp_path / "intruder" / "fleet_key.pem")
    dev1 = parse_target("dev1")

    def resume(**kw: Any) -> dict[str, Any]:
        return build_command("resume", {}, *dev1, **{"key": key, **kw})

    client = Client(broker.port)
    try:
        reader = ResultReader(client)
        first = build_command("ping", {}, *dev1, key=key)
        assert reader.send("edge/dev1/cmd/ping", first, sender_topic=False)["ok"] is True
        forged = {
            "unsigned": ("edge/dev1/cmd/resume", build_command("resume", {}, *dev1)),
            "other key": ("edge/dev1/cmd/resume", resume(key=intruder)),
            "tampered": ("edge/dev1/cmd/resume", {**resume(), "args": {"extra": 1}}),
            "for dev2": ("edge/dev1/cmd/resume", build_command("resume", {}, "device", "dev2", key=key)),
            "for ping": ("edge/dev1/cmd/resume", {**build_command("ping", {}, *dev1, key=key)}),
            "hour old": ("edge/dev1/cmd/resume", resume(now=time.time() - 3600)),
            "hour ahead": ("edge/dev1/cmd/resume", resume(now=time.time() + 3600)),
        }
        codes = {case: reader.send(topic, payload)["error"]["code"] for case, (topic, payload) in forged.items()}
        again = reader.send("edge/dev1/cmd/ping", first)
        for i in range(16):  # push the first ping's result out of the store (result_cache_size 16)
            assert reader.send("edge/dev1/cmd/ping", build_command("ping", {}, *dev1, key=key,
                                                                   command_id=f"fill-{i}"))["ok"]
        replayed = reader.send("edge/dev1/cmd/ping", first)
        assert client.retained("edge/dev1/status")["state"] == "draining"  # no forged resume ran
        good = reader.send("edge/dev1/cmd/resume", resume())
        assert client.retained("edge/dev1/status", state="online")["state"] == "online"
    finally:
        client.close()
    assert codes == {"unsigned": "unsigned", "other key": "bad_signature", "tampered": "bad_signature",
                     "for dev2": "bad_signature", "for ping": "bad_signature", "hour old": "stale",
                     "hour ahead": "stale"}
    assert (again["ok"], again["duplicate"]) == (True, True)
    assert (replayed["ok"], replayed["error"]["code"]) == (False, "replayed")
    assert (good["ok"], good["result"]) == (True, {"draining": False})
    runs = [e for e in daemon.events() if e.get("event") == "fleet_command_done" and e.get("id") == first["id"]]
    assert len(runs) == 1
