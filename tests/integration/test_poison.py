"""No single message may stop the daemon (issue 9, item 5): poison on every topic, real Mosquitto, real daemon.

Each poison message is answered with exactly one error where it has a reply address, acknowledged
(so it is not redelivered after a restart), and the daemon keeps serving. A message that crashes the
process natively (simulated by the EDGE_TEST_HOOKS marker, which exits with 70 where its work starts)
is quarantined after a bounded number of restarts, without blaming the requests queued behind it.
"""

from __future__ import annotations

import json
import queue
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from agent.services.bulkhead import TEST_CRASH_EXIT, TEST_CRASH_MARKER, TEST_RAISE_MARKER
from agent.services.quarantine import QUARANTINE_AFTER
from tests.support.broker import Broker
from tests.support.daemon import Client, DaemonProcess, Daemons, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0}
DEEP = b"[" * 3000 + b"]" * 3000
TOPICS = {
    "infer": "edge/dev1/infer",
    "fleet": "edge/fleet/infer",  # the fleet share: $share/edge-workers/edge/fleet/infer
    "cancel": "edge/dev1/infer/cancel",
    "cmd": "edge/dev1/cmd/ping",
}
RESULT_TOPIC = "edge/dev1/cmd/result"


POISONS = {
    "deep": lambda tail: b'{"id": "p-deep", "prompt": ' + DEEP + tail + b"}",
    "huge": lambda tail: b'{"id": "p-huge", "prompt": "' + b"x" * 70_000 + b'"' + tail + b"}",
    "utf8": lambda tail: b'{"id": "p-utf8", "prompt": "\xff\xfe\xc3("' + tail + b"}",
    "list": lambda tail: b'[1, 2, {"reply_to": "nested/not/an/address"}]',
    "number": lambda tail: b"42",
    # Valid JSON with wrong types for every topic (and unknown fields).
    "types": lambda tail: b'{"id": 5, "prompt": 5, "args": 5' + tail + b"}",
    # Valid everywhere, but its handler raises (EDGE_TEST_HOOKS).
    "raise": lambda tail: b'{"id": "p-raise", "prompt": "' + TEST_RAISE_MARKER + b'", "args": {}' + tail + b"}",
}


def poison(kind: str, reply_to: str | None) -> bytes:
    """One poison payload; ``reply_to`` goes in the payload wherever the kind has a top level to hold it."""
    return POISONS[kind](b', "reply_to": ' + json.dumps(reply_to).encode() if reply_to else b"")


CODES = {"deep": "bad_request", "huge": "too_large", "utf8": "bad_request", "list": "bad_request",
         "number": "bad_request", "types": "bad_request", "raise": "internal"}
KINDS = list(CODES)


@dataclass(frozen=True)
class Case:
    topic: str
    kind: str
    addressed: bool

    @property
    def reply_topic(self) -> str:
        return f"test/poison/{self.topic}/{self.kind}"

    def expects_reply(self, protocol: int) -> bool:
        """MQTT 5: the Response Topic always works. 3.1.1: only a top-level reply_to, never on cancel."""
        if not self.addressed:
            return False
        if protocol == paho.MQTTv5:
            return True
        return self.topic != "cancel" and self.kind not in ("list", "number")


def error_code(body: dict[str, Any]) -> str:
    """The error code of an inference error reply or of a failed command result."""
    if "ok" in body:
        assert body["ok"] is False, body
    return str(body["error"]["code"])


def drain(client: Client, seconds: float) -> list[paho.MQTTMessage]:
    got: list[paho.MQTTMessage] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(client.messages.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
    return got


def collect_until(client: Client, wanted: set[str], timeout: float, quiet: float = 1.5) -> list[paho.MQTTMessage]:
    """Messages until every topic in ``wanted`` was seen, then ``quiet`` seconds more (to catch extras)."""
    got: list[paho.MQTTMessage] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not wanted <= {m.topic for m in got}:
        got.extend(drain(client, 0.2))
    got.extend(drain(client, quiet))
    return got


@pytest.fixture
def hooked_daemon(tmp_path: Path, broker: Broker, tiny_models: dict[str, Path]) -> Iterator[Any]:
    """Factory: the real daemon with EDGE_TEST_HOOKS=1, started and waited for until it serves."""
    daemons = Daemons()
    config = write_config(tmp_path / "dev1.toml", port=broker.port, model_file=tiny_models["Q8_0"],
                          telemetry={"interval_s": 1.0})

    def _start(*, wait: bool = True) -> DaemonProcess:
        return daemons.start(DaemonProcess(config=config, workdir=tmp_path, env={"EDGE_TEST_HOOKS": "1"}),
                             wait=wait, timeout=90)

    yield _start
    daemons.stop_all()


def wait_telemetry(client: Client, check: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> None:
    """Poll the retained telemetry (interval 1 s in these tests) until ``check`` holds."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = client.retained("edge/dev1/telemetry")
        if check(seen):
            return
        time.sleep(0.5)
    raise AssertionError(f"telemetry never matched; last: {seen}")


def assert_serves(client: Client, request_id: str) -> None:
    reply = client.request("dev1", {**CHAT, "id": request_id, "max_tokens": 2})
    body = json.loads(client.collect(reply, timeout=60)[-1].payload)
    assert body["id"] == request_id
    assert body["usage"]["completion_tokens"] == 2, body


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_poison_on_every_topic_is_answered_once_and_the_daemon_keeps_serving(
    hooked_daemon: Any, broker: Broker, protocol: int
) -> None:
    """3,000-deep, oversize, invalid UTF-8, list, number, wrong types and a crashing handler, on the
    infer, fleet-share, cancel and command topics, with and without a reply address: one error reply
    each where there is an address, nothing otherwise, the daemon alive and serving, and nothing
    redelivered after a restart."""
    d = hooked_daemon()
    client = Client(broker.port, protocol=protocol)
    try:
        client.subscribe("test/poison/#")
        client.subscribe(RESULT_TOPIC)
        cases = [Case(t, k, a) for t in TOPICS for k in KINDS for a in (True, False)]
        for case in cases:
            in_payload = case.addressed and protocol == paho.MQTTv311
            payload = poison(case.kind, case.reply_topic if in_payload else None)
            if case.addressed and protocol == paho.MQTTv5:
                client.publish(TOPICS[case.topic], payload, response_topic=case.reply_topic, correlation=b"poison")
            else:
                client.publish(TOPICS[case.topic], payload)
        expected = {c.reply_topic: c for c in cases if c.expects_reply(protocol)}
        got = collect_until(client, set(expected), timeout=60)
        assert d.proc is not None and d.proc.poll() is None, d.log_text()[-3000:]

        replies: dict[str, list[dict[str, Any]]] = {}
        for m in got:
            replies.setdefault(m.topic, []).append(json.loads(m.payload))
        for topic, case in expected.items():
            bodies = replies.get(topic, [])
            assert len(bodies) == 1, (case, bodies)
            assert error_code(bodies[0]) == CODES[case.kind], (case, bodies[0])
            assert bodies[0].get("done", True) is True
        assert set(replies) - {RESULT_TOPIC} == set(expected), "a reply went where none was asked for"
        # Every command poison is also reported once on the device's own result topic.
        assert len(replies.get(RESULT_TOPIC, [])) == 2 * len(KINDS)
        if protocol == paho.MQTTv5:
            assert all(m.properties.CorrelationData == b"poison" for m in got if m.topic in expected)

        assert_serves(client, "after-poison")
        events = d.events()
        assert sum(1 for e in events if e.get("event") == "handler_crashed") == 2 * len(TOPICS)  # 'raise' x2
        assert not [e for e in events if e.get("event") == "mqtt_disconnected"]
        # Refused by the bulkhead itself (deep, huge, raise; on four topics, twice): counted in telemetry.
        wait_telemetry(client, lambda t: t["messages_rejected"] + t["messages_dropped"] == 3 * 2 * len(TOPICS))

        # Everything was acknowledged: a restarted daemon gets nothing of it again.
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
        d2 = hooked_daemon()
        assert_serves(client, "after-restart")
        late = [m for m in drain(client, 2.0) if m.topic.startswith("test/poison/") or m.topic == RESULT_TOPIC]
        assert late == [], [(m.topic, m.payload[:100]) for m in late]
        assert not [e for e in d2.events() if e.get("event") in ("message_rejected", "request_rejected",
                                                                 "fleet_command_refused", "message_redelivered")]
    finally:
        client.close()


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_a_request_that_crashes_the_process_is_quarantined_after_bounded_restarts(
    hooked_daemon: Any, broker: Broker, protocol: int
) -> None:
    """A request that kills the process where its work starts is redelivered (DUP) after each restart,
    charged, and quarantined: answered 'bad_request' once, never run again; the request queued behind
    it is answered normally, and the daemon serves."""
    client = Client(broker.port, protocol=protocol)
    try:
        d = hooked_daemon()
        reply = "test/quarantine/poison"
        innocent_reply = "test/quarantine/innocent"
        client.subscribe(reply)
        client.subscribe(innocent_reply)
        body = {"id": "killer", "prompt": TEST_CRASH_MARKER.decode(), "max_tokens": 2}
        innocent = {**CHAT, "id": "innocent", "max_tokens": 2}
        if protocol == paho.MQTTv5:
            client.publish("edge/dev1/infer", body, response_topic=reply)
            client.publish("edge/dev1/infer", innocent, response_topic=innocent_reply)
        else:
            client.publish("edge/dev1/infer", {**body, "reply_to": reply})
            client.publish("edge/dev1/infer", {**innocent, "reply_to": innocent_reply})
        # The first delivery and QUARANTINE_AFTER redeliveries each kill the process.
        for attempt in range(1 + QUARANTINE_AFTER):
            assert d.wait(60) == TEST_CRASH_EXIT, d.log_text()[-3000:]
            crash = [e for e in d.events() if e.get("event") == "test_native_crash"]
            assert len(crash) == 1 and crash[0]["dup"] is (attempt > 0), crash
            d = hooked_daemon(wait=False)
        d.wait_event("agent_started", timeout=90)
        got = collect_until(client, {reply, innocent_reply}, timeout=60)
        poisoned = [json.loads(m.payload) for m in got if m.topic == reply]
        served = [json.loads(m.payload) for m in got if m.topic == innocent_reply]
        assert len(poisoned) == 1, poisoned
        assert poisoned[0]["id"] == "killer"
        assert poisoned[0]["error"]["code"] == "bad_request"
        assert "quarantined" in poisoned[0]["error"]["message"]
        assert [s.get("usage", {}).get("completion_tokens") for s in served] == [2], served
        quarantined = d.wait_event("message_quarantined")
        assert quarantined["attempts"] == QUARANTINE_AFTER
        assert d.proc is not None and d.proc.poll() is None
        assert_serves(client, "after-quarantine")
        wait_telemetry(client, lambda t: t["messages_quarantined"] == 1)

        # Acknowledged: the next run sees neither message again.
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
        d3 = hooked_daemon()
        assert_serves(client, "after-restart")
        assert [m for m in drain(client, 2.0) if m.topic in (reply, innocent_reply)] == []
        assert not [e for e in d3.events() if e.get("event") in ("message_quarantined", "test_native_crash")]
    finally:
        client.close()


def test_own_command_results_are_acked_so_the_device_never_goes_deaf(hooked_daemon: Any, client: Client) -> None:
    """The device hears its own QoS 1 cmd/result echoes (it subscribes to cmd/+). They are acknowledged as
    not-ours: past Mosquitto's 20-message inflight window it still answers (before, it went deaf at 20)."""
    hooked_daemon()
    client.subscribe("test/ops")
    for i in range(30):
        client.publish("edge/dev1/cmd/ping", {"id": f"ping-{i}"}, response_topic="test/ops")
        body = json.loads(client.messages.get(timeout=10).payload)
        assert (body["id"], body["ok"]) == (f"ping-{i}", True)
    assert_serves(client, "after-pings")
