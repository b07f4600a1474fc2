"""A link for in-process tests: records what the code under test publishes and acknowledges.

Replies are decoded on arrival, so a reply that is not JSON fails the test where it was sent. Ack listeners
are called like :class:`agent.transport.failover.FailoverLink` calls them (the bulkhead forgets a
redelivery's charge there). Thread-safe: the inference worker and the test thread both use it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from agent.transport.mqtt import Incoming


class RecordingLink:
    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.acked: list[int] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Incoming], None]] = []

    def publish(self, topic: str, payload: bytes, **_: Any) -> None:
        body = json.loads(payload)  # every reply must be JSON (and so encodable)
        with self._lock:
            self.sent.append((topic, body))

    def ack(self, message: Incoming) -> None:
        with self._lock:
            self.acked.append(message.mid)
        for listener in self._listeners:
            listener(message)

    def add_ack_listener(self, listener: Callable[[Incoming], None]) -> None:
        self._listeners.append(listener)

    def on(self, topic: str) -> list[dict[str, Any]]:
        """Every message published to ``topic``, in order."""
        with self._lock:
            return [body for t, body in self.sent if t == topic]

    def finals(self, topic: str) -> list[dict[str, Any]]:
        """The final replies (``done``) published to ``topic``."""
        return [body for body in self.on(topic) if body.get("done")]
