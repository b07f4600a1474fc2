"""A watching MQTT 5 client for integration tests: records everything on its subscriptions (with arrival time,
retain flag and correlation data) and sends requests; optionally with a persistent session, to see what a
daemon publishes right after a broker restart."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True, slots=True)
class Seen:
    at: float  # time.monotonic() on arrival
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Watcher:
    """A paho MQTT 5 client that records everything on its subscriptions and sends requests.

    ``persistent`` keeps its session on the broker (QoS 1 messages published while it is away are
    queued for it) and reconnects quickly, so it sees what a daemon replays right after a broker restart.
    """

    port: int
    topics: tuple[str, ...] = ()
    persistent: bool = False
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed: queue.Queue[int] = queue.Queue()
        self.client_id = f"watch-{uuid.uuid4().hex[:8]}"
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, rc, p: self._subscribed.put(mid)
        self.c.on_socket_open = lambda c, u, s: s.setsockopt(6, 1, 1)  # TCP_NODELAY
        self.c.reconnect_delay_set(0.1, 0.5)
        props = None
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", self.port, clean_start=not self.persistent, properties=props)
        self.c.loop_start()
        for topic in (*self.topics, "test/reply/#"):
            self.subscribe(topic)

    def subscribe(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, 1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if self._subscribed.get(timeout=0.1) == mid:
                    return
            except queue.Empty:
                continue
        raise AssertionError(f"no SUBACK for {topic}")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        with self._lock:
            self.seen.append(Seen(time.monotonic(), msg.topic, bytes(msg.payload), bool(msg.retain), corr))

    def on(self, topic: str, since: float = 0.0) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.topic == topic and s.at >= since]

    def wait_for(
        self, topic: str, match: Callable[[Any], bool] = lambda _: True, *, since: float = 0.0, timeout: float = 15.0
    ) -> Any:
        """The first JSON message on ``topic`` (arrived after ``since``) that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.on(topic, since):
                if s.payload and match(s.json()):
                    return s.json()
            time.sleep(0.02)
        got = [s.payload for s in self.on(topic)]
        raise AssertionError(f"nothing matching on {topic} within {timeout}s; got {got}")

    def request(self, topic: str, body: dict[str, Any], reply: str | None = None) -> str:
        """Publish an inference request with a Response Topic; returns the reply topic."""
        reply = reply or f"test/reply/{uuid.uuid4().hex[:10]}"
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = b"corr:" + reply.encode()
        self.c.publish(topic, json.dumps(body), qos=1, properties=props).wait_for_publish(5)
        return reply

    def finals(self, reply: str) -> list[dict[str, Any]]:
        return [s.json() for s in self.on(reply) if s.json().get("done")]

    def wait_final(self, reply: str, timeout: float = 60.0) -> dict[str, Any]:
        final: dict[str, Any] = self.wait_for(reply, lambda d: bool(d.get("done")), timeout=timeout)
        return final

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        # paho closes its wake-up socket pair only in __del__; a client collected as part of a reference
        # cycle may have those sockets finalized first (a ResourceWarning, an error under -W error).
        self.c._reset_sockets()
