"""The operator's inference client: one MQTT connection that sends requests to a device and collects replies.

``edge-agent ask`` and ``edge-agent chat`` both talk through it. It is also the reference client: it uses
the MQTT 5 Response Topic and Correlation Data when the configured protocol is 5, and the payload's
``reply_to`` for 3.1.1; requests carry a Message Expiry as long as the caller waits (MQTT 5), so a device
that was down with the request queued in its session answers ``timeout`` instead of working for nobody.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

from agent.errors import AgentError, DeadlineExceededError, TransportError
from agent.settings import Settings
from agent.transport.mqtt import Incoming, LinkEvent, MqttLink
from agent.transport.topics import DeviceTopics

Reply = dict[str, Any]
"""A reply message as the device sent it: a stream chunk (``delta``), the final reply or an error reply."""


class AnswerError(AgentError):
    """The device answered with an error reply; ``code`` is the reply's wire code (docs/protocol.md)."""

    def __init__(self, reply: Reply) -> None:
        error = reply.get("error")
        if not isinstance(error, dict):
            error = {}
        self.code = str(error.get("code", "internal"))
        self.retry_after_ms = error.get("retry_after_ms")
        message = f"{self.code}: {error.get('message', '')}"
        if isinstance(self.retry_after_ms, int | float):
            message += f" (retry after {self.retry_after_ms / 1000:g} s)"
        super().__init__(message)
        self.reply = reply


class DeviceClient:
    """Requests to one device over one connection (a context manager: connects on enter, leaves on exit).

    ``connect()`` raises :class:`TransportError` when the broker cannot be reached; :meth:`request` returns
    the final reply (an error reply too: the caller decides) or raises :class:`DeadlineExceededError`.
    """

    def __init__(self, settings: Settings, device_id: str | None = None, *, connect_timeout: float = 15.0) -> None:
        self.settings = settings
        self.topics = DeviceTopics(settings.mqtt.topic_prefix, device_id or settings.device_id)
        self.client_id = f"edge-ask-{uuid.uuid4().hex[:12]}"
        self.reply_topic = self.topics.default_reply(self.client_id)
        self._connect_timeout = connect_timeout
        self._events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self._link = MqttLink(settings.mqtt, self.client_id, self._events.put)
        self._v5 = settings.mqtt.protocol == "5"

    def connect(self) -> None:
        self._link.subscribe([(self.reply_topic, 1)])
        self._link.start()
        mqtt = self.settings.mqtt
        if not self._link.wait_connected(self._connect_timeout):
            self._link.stop(timeout=1.0)
            raise TransportError(f"no connection to {mqtt.host}:{mqtt.port}")
        if not self._link.wait_subscribed(5.0):
            self._link.stop(timeout=1.0)
            raise TransportError("the broker did not acknowledge the reply subscription")

    def close(self) -> None:
        self._link.stop(timeout=2.0)

    def __enter__(self) -> DeviceClient:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def send(self, body: dict[str, Any], *, stream: bool, timeout: float) -> str:
        """Publish one request (``body`` without ``id``/``reply_to``/``stream``); returns its id."""
        request_id = uuid.uuid4().hex
        payload = {"id": request_id, **body, "stream": stream}
        if not self._v5:
            payload["reply_to"] = self.reply_topic
        self._link.publish(
            self.topics.infer,
            json.dumps(payload, ensure_ascii=False).encode(),
            qos=1,
            response_topic=self.reply_topic if self._v5 else None,
            correlation_data=request_id.encode() if self._v5 else None,
            message_expiry_s=max(1, int(timeout)) if self._v5 else None,
        )
        return request_id

    def collect(self, request_id: str, *, timeout: float, on_chunk: Callable[[Reply], None] | None = None) -> Reply:
        """Wait for the final reply of ``request_id``, handing each stream chunk to ``on_chunk`` on the way."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"no answer from {self.topics.device_id} within {timeout:g} s")
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if not isinstance(event, Incoming) or event.topic != self.reply_topic:
                continue
            try:
                message = json.loads(event.payload)
            except ValueError:
                continue
            # An error about a payload the device could not parse carries no id: it is ours all the same.
            if not isinstance(message, dict) or message.get("id") not in (request_id, None):
                continue
            if message.get("done"):
                return message
            if on_chunk is not None and "delta" in message:
                on_chunk(message)

    def request(self, body: dict[str, Any], *, timeout: float,
                on_chunk: Callable[[Reply], None] | None = None) -> Reply:
        """Send one request and wait for its final reply; streams when ``on_chunk`` is given."""
        request_id = self.send(body, stream=on_chunk is not None, timeout=timeout)
        return self.collect(request_id, timeout=timeout, on_chunk=on_chunk)

    def cancel(self, request_id: str) -> None:
        """Ask the device to stop ``request_id`` (its final reply then says ``finish_reason: cancelled``)."""
        self._link.publish(self.topics.infer_cancel, json.dumps({"id": request_id}).encode(), qos=1,
                           response_topic=self.reply_topic if self._v5 else None)


def chat_messages(system: str | None, history: list[dict[str, str]], user: str) -> list[dict[str, str]]:
    """The ``messages`` of a chat request: the system message first (when given), the history, the new turn."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *history, {"role": "user", "content": user}]
