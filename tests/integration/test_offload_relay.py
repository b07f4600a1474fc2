"""The cloud relay between two real Mosquitto brokers, with a real daemon as the cloud worker.

The 'cloud' broker is the shared ``broker`` fixture; the cloud worker is the real daemon connected to
it (device id ``cloud1``, answering on ``edge/cloud1/infer``, which the relay targets until the daemon
grows ``role = "cloud"`` with a shared subscription). The 'edge' broker is a second Mosquitto; callers
publish there and an :class:`EdgeFrontDoor` forwards through a real :class:`CloudRelay`.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from agent.services.offload import CloudRelay
from tests.support.broker import Broker, free_port
from tests.support.cloud import Collector, EdgeFrontDoor, Reply, cloud_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0}
WORKER_TOPIC = "{prefix}/cloud1/infer"


@pytest.fixture
def edge_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "edge-broker").start()
    yield b
    b.stop()


@pytest.fixture
def relay(broker: Broker) -> Iterator[CloudRelay]:
    r = CloudRelay(cloud_settings(broker.port, infer_topic=WORKER_TOPIC), prefix="edge", device_id="dev1")
    r.start()
    assert r.wait_up(10)
    yield r
    r.stop()


@pytest.fixture
def front(edge_broker: Broker, relay: CloudRelay) -> Iterator[EdgeFrontDoor]:
    f = EdgeFrontDoor(edge_broker.port, relay).start()
    yield f
    f.stop()


@pytest.fixture
def caller(edge_broker: Broker) -> Iterator[Collector]:
    c = Collector(edge_broker.port)
    yield c
    c.close()


def body(msgs: list) -> dict:
    return json.loads(msgs[-1].payload)


def test_every_forwarded_request_is_answered_exactly_once_by_the_cloud(
    start_daemon, front: EdgeFrontDoor, caller: Collector
) -> None:
    """A burst of streamed and plain requests through the relay: one final each, correlation kept, served_by cloud."""
    start_daemon(device_id="cloud1", inference={"max_queue": 32})
    sent = {}
    for i in range(12):
        reply, corr = f"test/reply/{i}", b"\x00corr-" + str(i).encode()
        caller.request("edge/dev1/infer", {**CHAT, "id": f"r{i}", "max_tokens": 6, "stream": i % 2 == 0}, reply, corr)
        sent[reply] = (f"r{i}", corr, i % 2 == 0)
    for reply in sent:
        caller.wait_final(reply)
    time.sleep(1.0)  # anything duplicated would arrive by now
    for reply, (rid, corr, streamed) in sent.items():
        msgs = caller.messages(reply)
        finals = [m for m in msgs if json.loads(m.payload).get("done")]
        assert len(finals) == 1, reply
        final = json.loads(finals[0].payload)
        assert final["id"] == rid
        assert final["served_by"] == "cloud"
        assert final["device_id"] == "cloud1"
        assert all(m.properties.CorrelationData == corr for m in msgs)
        chunks = [json.loads(m.payload) for m in msgs if not json.loads(m.payload).get("done")]
        if streamed:
            assert [c["seq"] for c in chunks] == list(range(len(chunks)))
            assert "".join(c["delta"] for c in chunks) == final["text"]
        else:
            assert chunks == []
    outcomes = [front.outcomes.get(timeout=5) for _ in sent]
    assert sorted(o.request_id for o in outcomes) == sorted(rid for rid, _, _ in sent.values())
    assert {o.result for o in outcomes} == {"served"}
    assert front.relay.pending == 0


def test_cloud_errors_are_relayed_as_they_are(start_daemon, front: EdgeFrontDoor, caller: Collector) -> None:
    """An error final from the cloud worker reaches the caller once, with its code, and is counted as an error."""
    start_daemon(device_id="cloud1")
    caller.request("edge/dev1/infer", {"id": "bad", "prompt": "x", "max_tokens": 0}, "test/reply/bad", b"c")
    msgs = caller.wait_final("test/reply/bad", timeout=30)
    assert body(msgs)["error"]["code"] == "bad_request"
    assert front.outcomes.get(timeout=5).result == "error"


def test_cloud_broker_down_answers_overloaded_at_once(broker: Broker, front: EdgeFrontDoor, caller: Collector) -> None:
    """With the cloud broker gone the caller gets 'overloaded' with retry_after_ms within a second."""
    broker.stop()
    deadline = time.monotonic() + 10
    while front.relay.up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not front.relay.up
    started = time.monotonic()
    caller.request("edge/dev1/infer", {**CHAT, "id": "down", "max_tokens": 4}, "test/reply/down", b"d")
    msgs = caller.wait_final("test/reply/down", timeout=5)
    elapsed = time.monotonic() - started
    error = body(msgs)["error"]
    assert error["code"] == "overloaded"
    assert error["retry_after_ms"] == 3000
    assert elapsed < 1.0
    assert front.outcomes.get(timeout=1).result == "unreachable"


def test_cloud_broker_dying_mid_request_fails_the_pending_relay(
    start_daemon, broker: Broker, front: EdgeFrontDoor, caller: Collector
) -> None:
    """A request in flight when the cloud broker dies is answered 'overloaded' at once, not left hanging."""
    start_daemon(device_id="cloud1", model="slow")
    caller.request("edge/dev1/infer", {**CHAT, "id": "long", "max_tokens": 900, "stream": True}, "test/reply/long",
                   b"l")  # fmt: skip
    deadline = time.monotonic() + 30
    while not caller.messages("test/reply/long") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert caller.messages("test/reply/long"), "the cloud never started streaming"
    killed = time.monotonic()
    broker.stop()
    msgs = caller.wait_final("test/reply/long", timeout=10)
    assert time.monotonic() - killed < 3.0
    assert body(msgs)["error"]["code"] == "overloaded"
    assert body(msgs)["error"]["retry_after_ms"] == 3000
    assert front.outcomes.get(timeout=1).result == "disconnected"


def test_no_cloud_worker_times_out_with_retry_after(broker: Broker, edge_broker: Broker, caller: Collector) -> None:
    """A cloud broker with nobody serving: the relay answers 'timeout' with retry_after_ms after request_timeout_s."""
    relay = CloudRelay(cloud_settings(broker.port, request_timeout_s=1.0), prefix="edge", device_id="dev1")
    relay.start()
    front = EdgeFrontDoor(edge_broker.port, relay).start()
    try:
        assert relay.wait_up(10)
        started = time.monotonic()
        caller.request("edge/dev1/infer", {**CHAT, "id": "lonely"}, "test/reply/lonely", b"x")
        msgs = caller.wait_final("test/reply/lonely", timeout=5)
        assert 0.9 < time.monotonic() - started < 2.5
        assert body(msgs)["error"] == {
            "code": "timeout", "message": "the cloud did not answer in time; try again later", "retry_after_ms": 3000,
        }  # fmt: skip
        assert msgs[-1].properties.CorrelationData == b"x"
    finally:
        front.stop()
        relay.stop()


def test_cloud_broker_never_reachable(caller: Collector, edge_broker: Broker) -> None:
    """A relay pointed at a port with no broker answers every request 'overloaded' immediately."""
    relay = CloudRelay(cloud_settings(free_port()), prefix="edge", device_id="dev1")
    relay.start()
    front = EdgeFrontDoor(edge_broker.port, relay).start()
    try:
        started = time.monotonic()
        caller.request("edge/dev1/infer", {**CHAT, "id": "nowhere"}, "test/reply/nowhere", b"n")
        msgs = caller.wait_final("test/reply/nowhere", timeout=5)
        assert time.monotonic() - started < 1.0
        assert body(msgs)["error"]["code"] == "overloaded"
    finally:
        front.stop()
        relay.stop()


def test_relay_overhead_against_a_direct_cloud_request(
    start_daemon, broker: Broker, front: EdgeFrontDoor, caller: Collector
) -> None:
    """Relaying adds only the extra broker hop: median round trip via the edge is within 50 ms of direct."""
    start_daemon(device_id="cloud1")
    direct = Collector(broker.port)
    rounds = 20
    try:

        def timed(client: Collector, topic: str) -> float:
            reply = f"test/reply/{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            client.request(topic, {**CHAT, "max_tokens": 4, "seed": 1}, reply, b"t")
            client.wait_final(reply, timeout=30)
            return (time.perf_counter() - started) * 1000

        for _ in range(3):  # warm up both paths
            timed(direct, "edge/cloud1/infer")
            timed(caller, "edge/dev1/infer")
        direct_ms, relay_ms = [], []
        for _ in range(rounds):  # interleaved so load on the machine hits both alike
            direct_ms.append(timed(direct, "edge/cloud1/infer"))
            relay_ms.append(timed(caller, "edge/dev1/infer"))
    finally:
        direct.close()
    d, r = statistics.median(direct_ms), statistics.median(relay_ms)
    p90_direct, p90_relay = statistics.quantiles(direct_ms, n=10)[-1], statistics.quantiles(relay_ms, n=10)[-1]
    print(  # the measurement the issue asks for, visible with -s
        f"\nrelay overhead: direct median {d:.1f} ms, via relay {r:.1f} ms, added {r - d:.1f} ms "
        f"(p90 direct {p90_direct:.1f} ms, via relay {p90_relay:.1f} ms; {rounds} rounds)"
    )
    assert r - d < 50.0


def test_forward_with_a_reply_target_object(broker: Broker, start_daemon) -> None:
    """forward() works with any object that has topic and correlation_data, and calls on_done once."""
    start_daemon(device_id="cloud1")
    relay = CloudRelay(cloud_settings(broker.port, infer_topic=WORKER_TOPIC), prefix="edge", device_id="dev1")
    relay.start()
    col = Collector(broker.port)
    done = []
    try:
        assert relay.wait_up(10)
        payload = json.dumps({**CHAT, "max_tokens": 3}).encode()
        assert relay.forward(payload, Reply("test/reply/obj", b"o"), "rid-1", relay_publish(col), on_done=done.append)
        msgs = col.wait_final("test/reply/obj", timeout=30)
        assert body(msgs)["id"] == "rid-1"
        assert body(msgs)["served_by"] == "cloud"
        deadline = time.monotonic() + 2
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [o.result for o in done] == ["served"]
    finally:
        col.close()
        relay.stop()


def relay_publish(col: Collector):
    """A reply_publish that sends through a plain paho client (the caller's broker is the cloud one here)."""

    def publish(topic: str, payload: bytes, *, qos: int = 1, correlation_data: bytes | None = None) -> None:
        props = None
        if correlation_data is not None:
            props = paho.Properties(paho.PacketTypes.PUBLISH)
            props.CorrelationData = correlation_data
        col.c.publish(topic, payload, qos=qos, properties=props)

    return publish
