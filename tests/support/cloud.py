"""Test helpers for cloud offload: a relay wired to a minimal edge front door, and a reply collector.

``EdgeFrontDoor`` stands in for the edge daemon's routing (which the daemon will do with
``should_offload``): it takes every request on ``{prefix}/{device_id}/infer`` from the edge broker and
forwards it through a real :class:`CloudRelay`, acknowledging nothing by hand (auto-ack link).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from agent.config.cloud import CloudSettings
from agent.config.mqtt import MqttSettings
from agent.services.offload import CloudRelay, RelayOutcome
from agent.transport.mqtt import Incoming, LinkEvent, MqttLink
from agent.transport.topics import DeviceTopics


@dataclass(frozen=True, slots=True)
class Reply:
    topic: str
    correlation_data: bytes | None


def cloud_settings(port: int, **overrides: Any) -> CloudSettings:
    """A plain-TCP cloud link to a local test broker, with fast reconnects."""
    values: dict[str, Any] = {
        "enabled": True, "host": "127.0.0.1", "port": port, "tls": False,
        "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "retry_after_ms": 3000,
    }  # fmt: skip
    values.update(overrides)
    return CloudSettings(**values)


class EdgeFrontDoor:
    """Forwards every request arriving on the edge broker to the cloud through a CloudRelay."""

    def __init__(self, edge_port: int, relay: CloudRelay, *, prefix: str = "edge", device_id: str = "dev1") -> None:
        self.topics = DeviceTopics(prefix, device_id)
        self.relay = relay
        self.outcomes: queue.Queue[RelayOutcome] = queue.Queue()
        self._events: queue.SimpleQueue[LinkEvent | None] = queue.SimpleQueue()
        settings = MqttSettings(host="127.0.0.1", port=edge_port, reconnect_min_s=0.2, reconnect_max_s=1.0)
        self.link = MqttLink(settings, f"front-{uuid.uuid4().hex[:6]}", self._events.put)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, timeout: float = 10.0) -> EdgeFrontDoor:
        self.link.subscribe([(self.topics.infer, 1)])
        self.link.start()
        assert self.link.wait_connected(timeout)
        assert self.link.wait_subscribed(timeout)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._events.put(None)
        self._thread.join(5)
        self.link.stop(timeout=2)

    def _run(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            if isinstance(event, Incoming) and event.topic == self.topics.infer and event.response_topic:
                rid = json.loads(event.payload).get("id") or uuid.uuid4().hex
                self.relay.forward(
                    event.payload, Reply(event.response_topic, event.correlation_data), rid, self.link.publish,
                    on_done=self.outcomes.put,
                )  # fmt: skip


@dataclass
class Collector:
    """A paho client subscribed to ``test/reply/#`` that groups every message by topic."""

    port: int
    by_topic: dict[str, list[paho.MQTTMessage]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"col-{uuid.uuid4().hex[:6]}",
                             protocol=paho.MQTTv5)  # fmt: skip
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._ready.set()
        self.c.on_socket_open = lambda c, u, s: s.setsockopt(6, 1, 1)  # TCP_NODELAY
        self.c.connect("127.0.0.1", self.port)
        self.c.loop_start()
        self.c.subscribe("test/reply/#", 1)
        assert self._ready.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.by_topic.setdefault(msg.topic, []).append(msg)

    def messages(self, topic: str) -> list[paho.MQTTMessage]:
        with self._lock:
            return list(self.by_topic.get(topic, []))

    def wait_final(self, topic: str, timeout: float = 60.0) -> list[paho.MQTTMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.messages(topic)
            if any(json.loads(m.payload).get("done") for m in msgs):
                return msgs
            time.sleep(0.002)
        raise AssertionError(f"no final reply on {topic}; got {[m.payload for m in self.messages(topic)]}")

    def request(self, topic: str, body: dict[str, Any], reply: str, correlation: bytes) -> None:
        props = paho.Properties(paho.PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = correlation
        self.c.publish(topic, json.dumps(body), qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
