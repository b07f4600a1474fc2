"""provisioning/mosquitto/acl.template on a real Mosquitto 2.0, with users from ``mosquitto_passwd -b``.

One broker (password file + the template as ``acl_file``, no anonymous access) and one real daemon
(``dev-a``, logged in as user ``dev-a`` with its password as the systemd credential mqtt_password) for
the module. Other identities are plain paho MQTT 5 clients: ``dev-b`` (another device), ``operator``,
``caller`` (an account with no rules of its own), ``fleet`` (a name no device may have). A refused
PUBLISH is seen as PUBACK reason "Not authorized" (Mosquitto answers MQTT 5 clients with 0x87).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import Broker
from tests.support.daemon import REPO, DaemonProcess, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEMPLATE = REPO / "provisioning" / "mosquitto" / "acl.template"
PASSWORDS = {"dev-a": "pw-a", "dev-b": "pw-b", "operator": "pw-operator", "caller": "pw-caller", "fleet": "pw-fleet"}
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 4}
DENIED = "Not authorized"
ALLOWED = ("Success", "No matching subscribers")  # MQTT 5 PUBACK reasons of an accepted PUBLISH


class Peer:
    """A paho MQTT 5 client logged in as one broker user; keeps what it receives and each PUBACK's reason."""

    def __init__(self, port: int, user: str, *, will: tuple[str, bytes] | None = None) -> None:
        self.id = f"{user}-test-{uuid.uuid4().hex[:6]}"
        self.inbox: list[paho.MQTTMessage] = []
        self._acks: dict[int, str] = {}
        self._cond = threading.Condition()
        self._subscribed: queue.Queue[list[str]] = queue.Queue()
        self._connected = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=paho.MQTTv5)
        self.c.username_pw_set(user, PASSWORDS[user])
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.c.on_connect = lambda c, u, f, rc, p: rc.is_failure or self._connected.set()
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.put([str(rc) for rc in rcs])
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self._connected.wait(5), f"{user} could not log in"

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.inbox.append(message)
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = str(reason)
            self._cond.notify_all()

    def subscribe(self, *filters: str) -> list[str]:
        """Subscribe (QoS 1); the granted reason codes (Mosquitto 2.0's acl_file grants every filter)."""
        self.c.subscribe([(f, 1) for f in filters])
        return self._subscribed.get(timeout=5)

    def publish(self, topic: str, payload: bytes | dict[str, Any], *, retain: bool = False,
                response_topic: str | None = None, correlation: bytes | None = None) -> str:
        """Publish at QoS 1 and return the broker's PUBACK reason ("Success" or "Not authorized")."""
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.c.publish(topic, data, qos=1, retain=retain, properties=props)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._acks, 5), f"no PUBACK for {topic}"
            return self._acks.pop(info.mid)

    def received(self, within: float) -> list[paho.MQTTMessage]:
        """Everything received by ``within`` seconds from now."""
        time.sleep(within)
        with self._cond:
            return list(self.inbox)

    def wait_for(self, topic: str, timeout: float = 30.0, *, done: bool = False, **fields: Any
                 ) -> list[paho.MQTTMessage]:
        """Messages on ``topic`` up to the first one (with ``done``: the final reply) whose JSON has ``fields``."""

        def wanted(message: paho.MQTTMessage) -> bool:
            data = json.loads(message.payload)
            return (not done or data.get("done") is True) and all(data.get(k) == v for k, v in fields.items())

        def upto() -> list[paho.MQTTMessage] | None:
            got = [m for m in self.inbox if m.topic == topic]
            for n, message in enumerate(got):
                if wanted(message):
                    return got[: n + 1]
            return None

        with self._cond:
            found = self._cond.wait_for(upto, timeout)
        if not found:
            raise AssertionError(f"{self.id}: nothing (final) on {topic} within {timeout}s")
        return found

    def drop(self) -> None:
        """Vanish without DISCONNECT (as a crashed device does), so the broker sends the will."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    for i, (user, password) in enumerate(users.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(path), user, password],
                       check=True, capture_output=True)
    return path


def acl_broker_in(directory: Path, acl_text: str) -> Broker:
    passwords = make_password_file(directory / "passwords", PASSWORDS)
    acl = directory / "acl"
    acl.write_text(acl_text)
    return Broker(directory / "broker", allow_anonymous=False,
                  extra=(f"password_file {passwords}", f"acl_file {acl}")).start()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = acl_broker_in(tmp_path_factory.mktemp("acl"), TEMPLATE.read_text())
    yield b
    b.stop()


@pytest.fixture(scope="module")
def device_a(broker: Broker, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[DaemonProcess]:
    """The real daemon as device dev-a (user dev-a; the password as the systemd credential mqtt_password)."""
    directory = tmp_path_factory.mktemp("dev-a")
    credentials = directory / "credentials"
    credentials.mkdir()
    (credentials / "mqtt_password").write_text(PASSWORDS["dev-a"])
    config = write_config(directory / "dev-a.toml", port=broker.port, model_file=tiny_models["Q8_0"],
                          device_id="dev-a", mqtt={"username": "dev-a"}, telemetry={"interval_s": 1.0})
    daemon = DaemonProcess(config=config, workdir=directory,
                           env={"CREDENTIALS_DIRECTORY": str(credentials)}).start()
    daemon.wait_event("agent_started", 60)
    yield daemon
    daemon.stop()


@pytest.fixture
def peers(broker: Broker) -> Iterator[Any]:
    """Factory: a Peer logged in as ``user``; all closed at teardown."""
    made: list[Peer] = []

    def _peer(user: str, **kwargs: Any) -> Peer:
        peer = Peer(broker.port, user, **kwargs)
        made.append(peer)
        return peer

    yield _peer
    for peer in made:
        peer.close()


def refusals(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") in ("mqtt_publish_refused", "mqtt_subscribe_refused")]


# --- what a device may do ---------------------------------------------------------------------------


def test_device_serves_its_own_and_fleet_requests_under_the_acl(device_a, peers) -> None:
    """Under the ACL dev-a answers on its own reply tree and the fleet's, reports status and telemetry, and
    the broker refuses none of its publishes."""
    op = peers("operator")
    own, fleet = f"edge/dev-a/reply/{op.id}", f"edge/fleet/reply/{op.id}"
    op.subscribe(own, fleet, "edge/dev-a/status", "edge/dev-a/telemetry")
    assert op.publish("edge/dev-a/infer", {**CHAT, "id": "own-1"}, response_topic=own, correlation=b"c1") in ALLOWED
    answer = op.wait_for(own, done=True)[-1]
    assert json.loads(answer.payload)["usage"]["completion_tokens"] == 4
    assert answer.properties.CorrelationData == b"c1"
    assert op.publish("edge/fleet/infer", {**CHAT, "id": "fleet-1"}, response_topic=fleet) in ALLOWED
    assert json.loads(op.wait_for(fleet, done=True)[-1].payload)["served_by"] == "dev-a"
    assert json.loads(op.wait_for("edge/dev-a/status").pop().payload)["state"] == "online"
    assert json.loads(op.wait_for("edge/dev-a/telemetry").pop().payload)["model"]
    assert refusals(device_a) == []


def test_operator_commands_reach_the_device_and_results_come_back(device_a, peers) -> None:
    """An operator's device and fleet-wide commands run on dev-a; results reach the operator."""
    op = peers("operator")
    op.subscribe("edge/+/cmd/result")
    for topic, command_id in (("edge/dev-a/cmd/ping", "p-device"), ("edge/fleet/cmd/ping", "p-fleet")):
        assert op.publish(topic, {"id": command_id}) in ALLOWED
        result = json.loads(op.wait_for("edge/dev-a/cmd/result", id=command_id).pop().payload)
        assert (result["id"], result["ok"], result["device_id"]) == (command_id, True, "dev-a")


# --- what a device may not do -----------------------------------------------------------------------


def test_a_device_cannot_command_or_call_another(device_a, peers) -> None:
    """dev-a's identity may not publish to dev-b's commands or requests, nor to group or fleet commands."""
    a, b = peers("dev-a"), peers("dev-b")
    b.subscribe("edge/dev-b/#")
    for topic in ("edge/dev-b/cmd/ping", "edge/dev-b/infer", "edge/dev-b/infer/cancel", "edge/group/kitchen/cmd/ping",
                  "edge/fleet/cmd/ping"):
        assert a.publish(topic, {"id": "forged"}) == DENIED, topic
    assert b.received(1.0) == []
    assert [e for e in device_a.events() if e.get("id") == "forged"] == []  # dev-a's daemon saw none either


def test_a_device_cannot_read_another_devices_requests_or_replies(device_a, peers) -> None:
    """Requests and replies on dev-b's tree, and answers on the fleet reply tree, never reach dev-a's identity."""
    a, b, op = peers("dev-a"), peers("dev-b"), peers("operator")
    assert a.subscribe("edge/dev-b/#", "edge/fleet/reply/#") == ["Granted QoS 1", "Granted QoS 1"]  # not checked
    b.subscribe("edge/dev-b/infer")
    reply = f"edge/dev-b/reply/{op.id}"
    assert op.publish("edge/dev-b/infer", {**CHAT, "id": "for-b"}, response_topic=reply) in ALLOWED
    assert op.publish(reply, {"id": "for-b", "done": True, "text": "secret"}) in ALLOWED
    assert op.publish(f"edge/fleet/reply/{op.id}", {"id": "fleet-x", "done": True, "text": "secret"}) in ALLOWED
    assert json.loads(b.wait_for("edge/dev-b/infer").pop().payload)["id"] == "for-b"  # delivered to its owner ...
    assert a.received(1.0) == []  # ... and to nobody else


def test_a_device_cannot_forge_another_devices_retained_status(device_a, peers) -> None:
    """Neither a retained PUBLISH nor a will from dev-a's identity can replace dev-b's retained status."""
    b = peers("dev-b")
    assert b.publish("edge/dev-b/status", {"state": "online", "device_id": "dev-b"}, retain=True) in ALLOWED
    a = peers("dev-a")
    assert a.publish("edge/dev-b/status", {"state": "offline", "device_id": "dev-b"}, retain=True) == DENIED
    ghost = peers("dev-a", will=("edge/dev-b/status", b'{"state": "offline", "device_id": "dev-b"}'))
    ghost.drop()  # the broker checks the will against the ACL when it would send it
    time.sleep(1.0)
    watcher = peers("operator")
    watcher.subscribe("edge/dev-b/status")
    status = json.loads(watcher.wait_for("edge/dev-b/status").pop().payload)
    assert status == {"state": "online", "device_id": "dev-b"}
    assert b.publish("edge/dev-b/status", b"", retain=True) in ALLOWED  # clean up the retained message


def test_a_device_will_not_be_tricked_into_writing_into_another_devices_tree(device_a, peers) -> None:
    """A request whose reply topic is under dev-b gets no answer there: the broker refuses dev-a's reply,
    and dev-a logs mqtt_publish_refused with the topic (the convention is enforced, not just documented)."""
    op = peers("operator")
    forged = f"edge/dev-b/reply/{op.id}"
    op.subscribe(forged)
    assert op.publish("edge/dev-a/infer", {**CHAT, "id": "confused-deputy"}, response_topic=forged) in ALLOWED
    refused = device_a.wait_event("mqtt_publish_refused", 30, topic=forged)
    assert refused["reason"] == DENIED
    assert op.received(0.5) == []


def test_names_reserved_for_shared_trees_get_nothing(broker, peers) -> None:
    """A broker user called 'fleet' (its %u tree would be edge/fleet/#) may not send fleet commands."""
    rogue = peers("fleet")
    assert rogue.publish("edge/fleet/cmd/ping", {"id": "x"}) == DENIED
    assert rogue.publish("edge/fleet/infer", CHAT) == DENIED


def test_known_limit_a_share_member_without_read_access_swallows_its_turn(broker, peers) -> None:
    """Mosquitto 2.0.11 pinned: acl_file does not check SUBSCRIBE, so any user joins a share group; on its
    round-robin turn the broker drops the message instead of passing it on (this is why fleet requests
    should carry a Message Expiry and be retried, and why broker accounts go only to devices and operators)."""
    owner, intruder, op = peers("dev-b"), peers("caller"), peers("operator")
    shared = "$share/edge-workers-test/edge/dev-b/work"
    owner.subscribe(shared)
    assert intruder.subscribe(shared) == ["Granted QoS 1"]
    for n in range(4):
        assert op.publish("edge/dev-b/work", {"n": n}) in ALLOWED
    got = [json.loads(m.payload)["n"] for m in owner.received(1.0)]
    assert len(got) == 2  # every second message went to the intruder's turn ...
    assert intruder.received(0.2) == []  # ... which it may not read: dropped for everyone


def test_the_documented_sed_moves_the_acl_to_another_prefix(tmp_path, peers) -> None:
    """The header's sed line turns every 'edge/' rule into the new prefix and leaves none behind."""
    command = re.search(r"sed '([^']+)' acl\.template", TEMPLATE.read_text())
    assert command is not None
    rewritten = subprocess.run(["sed", command.group(1)], input=TEMPLATE.read_text(), capture_output=True,
                               text=True, check=True).stdout
    rules = [line for line in rewritten.splitlines() if line.startswith(("pattern ", "topic "))]
    assert rules
    assert not [r for r in rules if " edge/" in r]
    broker = acl_broker_in(tmp_path, rewritten)
    try:
        device = Peer(broker.port, "dev-a")
        try:
            assert device.publish("site-7/dev-a/status", b"{}") in ALLOWED
            assert device.publish("edge/dev-a/status", b"{}") == DENIED
        finally:
            device.close()
    finally:
        broker.stop()


def test_template_rules_are_what_docs_security_describes() -> None:
    """Every rule in the template appears in docs/security.md's rule table (one source an operator can read)."""
    doc = (REPO / "docs" / "security.md").read_text()
    rules = [line.strip() for line in TEMPLATE.read_text().splitlines()
             if line.startswith(("pattern ", "topic ", "user "))]
    missing = [rule for rule in rules if f"`{rule}`" not in doc]
    assert missing == []


