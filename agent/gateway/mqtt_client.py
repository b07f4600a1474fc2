"""The gateway's one MQTT connection, shared by every HTTP request.

One :class:`agent.transport.mqtt.MqttLink` (the paho owner) with a client id of its own. Replies come back on
``{prefix}/{device}/reply/{client id}`` for a request to one device and ``{prefix}/fleet/reply/{client id}``
for the fleet share (the broker ACL's reply-topic convention, docs/security.md), both under one subscription,
``{prefix}/+/reply/{client id}``. Each request is told apart by its MQTT 5 Correlation Data (its id; MQTT 3.1.1:
the ``id`` the device echoes). Retained ``status``/``telemetry`` feed the :class:`Directory`.

paho's callbacks only hand events to the asyncio loop (``call_soon_threadsafe``); everything else (the
directory, the pending requests) is touched on the loop alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from typing import Any

import structlog

from agent.errors import AgentError, TooLargeError, TransportError
from agent.gateway.errors import GatewayError, from_wire, timed_out
from agent.gateway.targets import Directory, Target
from agent.settings import Settings
from agent.transport.mqtt import Connected, Disconnected, Incoming, LinkEvent, MqttLink
from agent.transport.topics import DeviceTopics, FleetWideTopics
from agent.transport.wire import decode_object

log = structlog.get_logger("agent.gateway")


class ClientGone(Exception):  # noqa: N818 - an event, not a failure of ours
    """The HTTP client disconnected before its answer was complete."""


class Exchange:
    """One request in flight: the device's replies to it, in order, until the final one."""

    def __init__(self, owner: GatewayClient, target: Target, request_id: str, timeout_s: float) -> None:
        self.owner = owner
        self.target = target
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.finished = False  # the final reply (or an error reply) arrived
        self.closed = False
        self.cancelled = False  # a cancel was published for it
        self._queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()

    def deliver(self, message: dict[str, Any]) -> None:
        self._queue.put_nowait(message)

    def abort(self, reason: BaseException) -> None:
        """Make the next :meth:`next` raise ``reason`` (the client left, the broker link dropped)."""
        self._queue.put_nowait(reason)

    async def next(self) -> dict[str, Any]:
        """The next reply message: a chunk (``delta``) or the final reply (``done``).

        Raises :class:`GatewayError` for an error reply (mapped to its HTTP status) and 504 when the deadline
        passes, :class:`ClientGone` after :meth:`abort`.
        """
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise timed_out(self.timeout_s)
        try:
            item = await asyncio.wait_for(self._queue.get(), remaining)
        except TimeoutError:
            raise timed_out(self.timeout_s) from None
        if isinstance(item, BaseException):
            raise item
        if item.get("done"):
            self.finished = True
            error = item.get("error")
            if isinstance(error, dict):
                draining = self.owner.directory.is_draining(item.get("device_id") or self.target.device_id)
                raise from_wire(error, draining=draining, top_level_retry_ms=item.get("retry_after_ms"))
        return item

    async def final(self) -> dict[str, Any]:
        """Skip chunks until the final reply."""
        while True:
            message = await self.next()
            if message.get("done"):
                return message

    def close(self) -> None:
        """Forget the request; cancel it on the device unless its final reply arrived. Idempotent."""
        self.owner.close(self)


class GatewayClient:
    """The MQTT side of the gateway: a live directory of devices and request/reply exchanges over one link."""

    def __init__(self, settings: Settings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.prefix = settings.mqtt.topic_prefix
        self.client_id = client_id or settings.gateway.client_id or f"edge-gateway-{uuid.uuid4().hex[:12]}"
        self.timeout_s = settings.gateway.request_timeout_s
        self.directory = Directory(self.prefix)
        self.fleet_topics = FleetWideTopics(self.prefix)
        self._v5 = settings.mqtt.protocol == "5"
        self._pending: dict[str, Exchange] = {}
        self.in_flight: Counter[str] = Counter()  # requests per device still waiting for their final reply
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observed_at = 0.0
        self._link = MqttLink(settings.mqtt, self.client_id, self._on_link_event)

    @property
    def reply_filter(self) -> str:
        return f"{self.prefix}/+/reply/{self.client_id}"

    def reply_topic(self, target: Target) -> str:
        if target.device_id is None:
            return self.fleet_topics.reply(self.client_id)
        return DeviceTopics(self.prefix, target.device_id).default_reply(self.client_id)

    @property
    def connected(self) -> bool:
        return self._link.connected

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, timeout_s: float = 15.0, settle_s: float = 0.3, settle_max_s: float = 3.0) -> None:
        """Connect, subscribe, and take in the retained status/telemetry until it goes quiet for ``settle_s``.

        Raises :class:`TransportError` when the broker cannot be reached within ``timeout_s``.
        """
        self._loop = asyncio.get_running_loop()
        self._link.subscribe([(self.fleet_topics.all_status, 1), (self.fleet_topics.all_telemetry, 1),
                              (self.reply_filter, 1)])
        self._link.start()
        mqtt = self.settings.mqtt
        if not await asyncio.to_thread(self._link.wait_connected, timeout_s):
            self._link.stop(timeout=0.5)
            raise TransportError(f"no connection to the broker at {mqtt.host}:{mqtt.port} within {timeout_s:g} s")
        if not await asyncio.to_thread(self._link.wait_subscribed, 5.0):
            self._link.stop(timeout=0.5)
            raise TransportError("the broker did not acknowledge the gateway's subscriptions")
        started = self._observed_at = time.monotonic()
        while time.monotonic() - started < settle_max_s and time.monotonic() - self._observed_at < settle_s:
            await asyncio.sleep(0.05)
        log.info("gateway_mqtt_ready", client_id=self.client_id, devices=len(self.directory.live()))

    def stop(self) -> None:
        for exchange in list(self._pending.values()):
            exchange.close()
        self._link.stop(timeout=2.0)

    # -- requests ----------------------------------------------------------------------------------

    def open(self, target: Target, payload: dict[str, Any]) -> Exchange:
        """Publish ``payload`` (a finished wire request with an ``id``) to ``target``; its replies go to the exchange.

        The request carries the gateway's timeout as ``deadline_ms`` and MQTT 5 Message Expiry, so a device does
        not start work the gateway no longer waits for. Raises :class:`GatewayError` 503 while the broker connection
        is down, 413 when the broker's packet size limit refuses the request.
        """
        if not self.connected:
            # A QoS 1 publish would wait in paho's queue for the reconnect; say so instead of hanging until the timeout.
            raise GatewayError(503, "unavailable", "the gateway has no broker connection; try again shortly", 5)
        request_id = str(payload["id"])
        exchange = Exchange(self, target, request_id, self.timeout_s)
        reply = self.reply_topic(target)
        body = {**payload, "deadline_ms": max(1, int(self.timeout_s * 1000))}
        if not self._v5:
            body["reply_to"] = reply
        topic = (self.fleet_topics.infer if target.device_id is None
                 else DeviceTopics(self.prefix, target.device_id).infer)
        self._pending[request_id] = exchange
        if target.device_id is not None:
            self.in_flight[target.device_id] += 1
        try:
            self._link.publish(topic, json.dumps(body, ensure_ascii=False).encode(), qos=1,
                               response_topic=reply if self._v5 else None,
                               correlation_data=request_id.encode() if self._v5 else None,
                               message_expiry_s=max(1, int(self.timeout_s)) if self._v5 else None)
        except TooLargeError as exc:
            exchange.finished = True
            self.close(exchange)
            raise GatewayError(413, "too_large", str(exc)) from exc
        log.debug("gateway_request_sent", id=request_id, topic=topic)
        return exchange

    def close(self, exchange: Exchange) -> None:
        if exchange.closed:
            return
        exchange.closed = True
        self._pending.pop(exchange.request_id, None)
        device = exchange.target.device_id
        if device is not None:
            self.in_flight[device] -= 1
            if self.in_flight[device] <= 0:
                del self.in_flight[device]
        if not exchange.finished:
            self.cancel(exchange)
        log.info("gateway_request_closed", id=exchange.request_id, target=exchange.target.name, device=device,
                 finished=exchange.finished, cancelled=exchange.cancelled,
                 ms=round((time.monotonic() - exchange.started) * 1000, 1))

    def cancel(self, exchange: Exchange) -> None:
        """Publish a cancel for the exchange's request: to its device, or for the fleet share to every live device
        (only the one serving it knows the id; the others log ``cancel_unknown``)."""
        if exchange.cancelled:
            return
        exchange.cancelled = True
        payload = json.dumps({"id": exchange.request_id}).encode()
        devices = ([exchange.target.device_id] if exchange.target.device_id is not None
                   else [d.device_id for d in self.directory.live()])
        for device in devices:
            with contextlib.suppress(TooLargeError):
                self._link.publish(DeviceTopics(self.prefix, device).infer_cancel, payload, qos=1)
        log.info("gateway_request_cancelled", id=exchange.request_id, target=exchange.target.name,
                 devices=len(devices))

    # -- link events (paho's thread → the loop) ----------------------------------------------------

    def _on_link_event(self, event: LinkEvent) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._handle, event)

    def _handle(self, event: LinkEvent) -> None:
        if isinstance(event, Incoming):
            if self.directory.observe(event.topic, event.payload):
                self._observed_at = time.monotonic()
                if event.topic.endswith("/status"):
                    self._fail_if_gone(event.topic.rsplit("/", 2)[-2])
            elif event.topic.endswith(f"/reply/{self.client_id}"):
                self._reply(event)
        elif isinstance(event, Disconnected):
            # The session is not persistent: replies sent while we are away are lost. Fail what waits for them.
            for exchange in list(self._pending.values()):
                exchange.abort(GatewayError(502, "transport", "the gateway lost its broker connection"))
        elif isinstance(event, Connected):
            log.info("gateway_mqtt_connected", session_present=event.session_present)

    def _fail_if_gone(self, device_id: str) -> None:
        """A device that went offline (its will, a clean stop) will not answer: fail its requests now, not at the
        timeout. Its persistent session may still run them after a restart; nobody waits for those answers."""
        entry = self.directory.device(device_id)
        if entry is not None and entry.live:
            return
        state = entry.state if entry is not None else "gone"
        for exchange in list(self._pending.values()):
            if exchange.target.device_id == device_id:
                message = f"device {device_id!r} went {state} before answering"
                exchange.abort(GatewayError(502, "device_offline", message))

    def _reply(self, message: Incoming) -> None:
        try:
            data = decode_object(message.payload)  # nesting checked first: json.loads recursing could raise
        except AgentError:
            return
        key = message.correlation_data.decode(errors="replace") if message.correlation_data else data.get("id")
        exchange = self._pending.get(key) if isinstance(key, str) else None
        if exchange is not None:
            exchange.deliver(data)
