"""Overload → cloud fallback: whether to serve a request here, and the relay that sends it to the cloud.

:func:`should_offload` is pure (table-tested). :class:`CloudRelay` owns a second MQTT 5 connection to
the cloud broker (through :class:`agent.transport.mqtt.MqttLink`, the only paho user): it publishes a
request to the cloud infer topic with its *own* Response Topic and Correlation Data, maps the cloud's
replies back to the original caller, and relays every chunk and the final reply to the caller's reply
topic with the caller's correlation data, marking the final ``"served_by": "cloud"``.

Nothing hangs: with the cloud link down a request is answered ``overloaded`` with ``retry_after_ms``
at once; a link that drops fails every pending relay the same way; a relay without a final reply
within ``request_timeout_s`` is answered ``timeout``. Each forwarded request ends in exactly one
final message to the caller and exactly one ``on_done`` call (the daemon acknowledges the caller's
PUBLISH there).

Threads: paho's thread only enqueues link events; the relay's own thread relays replies and expires
pending relays, so the daemon's main loop is never blocked by the cloud.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

from agent.config.cloud import CloudSettings
from agent.errors import BadRequestError, TooLargeError
from agent.transport.limits import check_payload
from agent.transport.mqtt import Connected, Disconnected, Incoming, LinkEvent, MqttLink
from agent.transport.tls import TlsFailure
from agent.transport.wire import error_payload

log = structlog.get_logger("agent.offload")

CLOUD = "cloud"
_TICK_S = 0.1
MAX_REPLY_BYTES = 4 << 20
"""A cloud reply larger than this is refused (a final reply holds at most max_tokens_limit tokens of text)."""

# --- the decision -----------------------------------------------------------------------------------

Route = Literal["local", "cloud", "reject"]
Reason = Literal["local", "model_unavailable", "policy_offload", "deadline", "queue_overflow"]


@dataclass(frozen=True, slots=True)
class OffloadFlags:
    """Device state the decision needs besides the queue."""

    policy_offload: bool = False  # the adaptation policy offloads (critical heat or battery)
    model_available: bool = True  # False while loading, swapping, or after a failed load
    overflowing: bool = False  # hysteresis memory: overflow is currently being sent to the cloud


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes, why, and the overflow state to carry to the next decision."""

    route: Route
    reason: Reason
    overflowing: bool
    retry_after_ms: int | None = None  # for 'reject': tell the caller when to try again


def expected_wait_ms(queue_depth: int, running: int, slots: int, avg_request_ms: float | None) -> float | None:
    """How long a request arriving now waits before it starts.

    A free slot takes it at once. Otherwise it starts when a slot frees: slots free one average request
    apart in turn, so it waits one average request (measured under the same batching, so per slot) for
    each full round of ``slots`` requests ahead of it, the running ones included."""
    if avg_request_ms is None:
        return None
    ahead = queue_depth + running
    if ahead < slots:
        return 0.0
    return ((ahead - slots) // slots + 1) * avg_request_ms


def should_offload(
    *,
    queue_depth: int,
    expected_wait_ms: float | None,
    deadline_ms: int | None,
    flags: OffloadFlags,
    cloud_up: bool,
    settings: CloudSettings,
) -> Decision:
    """Local first; the cloud takes what this device should not serve; reject only what nobody can.

    Overflow has hysteresis: it starts at ``offload_queue_high`` waiting requests and stops at
    ``offload_queue_low``. Queue overflow with the cloud down stays local (the inference queue still
    admits or refuses it); a deadline the local queue cannot meet, a policy offload or a missing model
    with the cloud down is answered ``overloaded`` at once.
    """
    overflowing = flags.overflowing
    if overflowing and queue_depth <= settings.offload_queue_low:
        overflowing = False
    elif not overflowing and queue_depth >= settings.offload_queue_high:
        overflowing = True
    reason: Reason
    if not flags.model_available:
        reason = "model_unavailable"
    elif flags.policy_offload:
        reason = "policy_offload"
    elif deadline_ms is not None and expected_wait_ms is not None and expected_wait_ms > deadline_ms:
        reason = "deadline"
    elif overflowing:
        reason = "queue_overflow"
    else:
        return Decision("local", "local", overflowing)
    if settings.enabled and cloud_up:
        return Decision("cloud", reason, overflowing)
    if reason == "queue_overflow":
        return Decision("local", reason, overflowing)
    retry = settings.retry_after_ms
    if reason == "deadline" and expected_wait_ms is not None:
        retry = max(retry, int(expected_wait_ms))
    return Decision("reject", reason, overflowing, retry_after_ms=retry)


# --- the relay --------------------------------------------------------------------------------------


class ReplyTarget(Protocol):
    """Where the original caller wants its answer (agent.services.inference.ReplyAddress fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def correlation_data(self) -> bytes | None: ...


class ReplyPublish(Protocol):
    """The local link's publish (MqttLink.publish fits)."""

    def __call__(self, topic: str, payload: bytes, *, qos: int = 1, correlation_data: bytes | None = None) -> None: ...


Result = Literal["served", "error", "timeout", "unreachable", "disconnected", "stopped"]


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    """How one forwarded request ended (handed to ``on_done`` exactly once)."""

    request_id: str
    result: Result
    relay_ms: float  # from forward() to the final message handed to reply_publish
    chunks: int = 0


@dataclass(slots=True)
class _Pending:
    request_id: str
    topic: str
    correlation_data: bytes | None
    publish: ReplyPublish
    on_done: Callable[[RelayOutcome], None] | None
    started: float
    deadline: float
    next_seq: int = 0


class CloudRelay:
    """Forward requests to the cloud broker and relay the answers back to their callers."""

    def __init__(
        self,
        settings: CloudSettings,
        *,
        prefix: str,
        device_id: str,
        clock: Callable[[], float] = time.monotonic,
        on_tls_failed: Callable[[TlsFailure], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_tls_failed = on_tls_failed  # the cloud link's TLS failure, once per new reason (any thread)
        self._device_id = device_id
        self._clock = clock
        self.infer_topic = settings.infer_topic_for(prefix)
        self.reply_topic = settings.reply_topic_for(prefix, device_id)
        self._events: queue.SimpleQueue[LinkEvent | None] = queue.SimpleQueue()
        mqtt = settings.mqtt(device_id)
        self._link = MqttLink(
            mqtt,
            mqtt.client_id or f"edge-agent-{device_id}-relay",
            self._events.put,
            password_credential="cloud_mqtt_password",  # noqa: S106 - a credential file name
            name="cloud",
            # A disconnect fails every pending relay, so a forward paho resent after the reconnect would
            # only have the cloud generate an answer nobody relays (seen after a stalled cloud broker).
            resend_after_reconnect=False,
        )
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloud-relay", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (paho retries with backoff) and start relaying."""
        self._link.subscribe([(self.reply_topic, 1)])
        self._link.start()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Fail what is still pending ('overloaded'), disconnect, stop the relay thread."""
        self._stopping.set()
        self._events.put(None)
        self._thread.join(timeout)
        self._fail_all("stopped", "the device is shutting down; the cloud request was abandoned")
        self._link.stop(timeout=timeout)

    @property
    def up(self) -> bool:
        """Connected to the cloud broker with the reply subscription acknowledged."""
        return self._link.connected and self._link.wait_subscribed(0)

    def wait_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.up:
                return True
            time.sleep(0.02)
        return self.up

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- forwarding (any thread) -------------------------------------------------------------------

    def forward(
        self,
        request_payload: bytes,
        reply: ReplyTarget,
        request_id: str,
        reply_publish: ReplyPublish,
        *,
        on_done: Callable[[RelayOutcome], None] | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        """Send one request to the cloud; False when the cloud is unreachable and 'overloaded' was answered.

        ``request_payload`` is the caller's request as received; its ``id`` is set to ``request_id``
        (so the cloud's replies carry the id the caller knows) and a ``reply_to`` is dropped (the
        relay's Response Topic is the reply address on the cloud side).
        """
        started = self._clock()
        if not self.up:
            log.warning("relay_unreachable", id=request_id, broker=f"{self._settings.host}:{self._settings.port}")
            self._send_error(
                reply.topic, reply.correlation_data, request_id, reply_publish, code="overloaded",
                message="this device is overloaded and the cloud broker is unreachable; try again later",
            )  # fmt: skip
            self._done(on_done, RelayOutcome(request_id, "unreachable", self._ms_since(started)))
            return False
        token = uuid.uuid4().bytes
        timeout = timeout_s if timeout_s is not None else self._settings.request_timeout_s
        with self._lock:
            self._pending[token] = _Pending(
                request_id=request_id,
                topic=reply.topic,
                correlation_data=reply.correlation_data,
                publish=reply_publish,
                on_done=on_done,
                started=started,
                deadline=started + timeout,
            )
        try:
            self._link.publish(
                self.infer_topic,
                _rewrite_request(request_payload, request_id),
                qos=1,
                response_topic=self.reply_topic,
                correlation_data=token,
                message_expiry_s=max(1, math.ceil(timeout)),
            )
        except TooLargeError as exc:  # over the cloud broker's packet limit: answered here, once
            with self._lock:
                self._pending.pop(token, None)
            self._send_error(reply.topic, reply.correlation_data, request_id, reply_publish, code=exc.code,
                             message=f"the cloud broker cannot take this request: {exc}")  # fmt: skip
            self._done(on_done, RelayOutcome(request_id, "error", self._ms_since(started)))
            return True
        log.debug("relay_forwarded", id=request_id, topic=self.infer_topic)
        return True

    # -- relay thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                event = self._events.get(timeout=_TICK_S)
            except queue.Empty:
                event = None
            try:
                if isinstance(event, Incoming):
                    self._relay(event)
                elif isinstance(event, Disconnected):
                    self._fail_all("disconnected", "the cloud broker connection was lost; try again later")
                    if event.tls is not None and not event.repeat and self._on_tls_failed is not None:
                        self._on_tls_failed(event.tls)
                elif isinstance(event, Connected):
                    log.info("relay_connected", broker=f"{self._settings.host}:{self._settings.port}")
                self._expire()
            except Exception as exc:  # the relay thread must survive any one bad message
                log.exception("relay_crashed")
                if isinstance(event, Incoming):
                    # Its caller is answered now rather than at request_timeout_s.
                    self._fail_one(event, f"internal error ({type(exc).__name__}) relaying the cloud's reply")

    def _relay(self, message: Incoming) -> None:
        token = message.correlation_data
        with self._lock:
            pending = self._pending.get(token) if token is not None else None
        if pending is None:
            log.debug("relay_reply_unknown", topic=message.topic)  # late (timed out) or a duplicate
            return
        data = self._decode_reply(message, pending.request_id)
        if data is None:
            return
        if not data.get("done"):
            seq = data.get("seq")
            if isinstance(seq, int) and seq < pending.next_seq:
                return  # a QoS 1 redelivery of a chunk already relayed
            pending.next_seq = (seq if isinstance(seq, int) else pending.next_seq) + 1
            pending.publish(pending.topic, message.payload, qos=1, correlation_data=pending.correlation_data)
            return
        failed = "error" in data
        if not failed:
            data["served_by"] = CLOUD
        # Encoded while the relay is still pending: if this fails (a lone surrogate, "\ud800"), the
        # relay thread's handler fails the relay and so still answers the caller once.
        body = json.dumps(data, ensure_ascii=False).encode()
        with self._lock:
            if self._pending.pop(token, None) is None:  # type: ignore[arg-type]
                return
        pending.publish(pending.topic, body, qos=1, correlation_data=pending.correlation_data)
        outcome = RelayOutcome(pending.request_id, "error" if failed else "served", self._ms_since(pending.started),
                               chunks=pending.next_seq)  # fmt: skip
        log.info("relay_done", id=pending.request_id, result=outcome.result, relay_ms=round(outcome.relay_ms, 1),
                 chunks=outcome.chunks)  # fmt: skip
        self._done(pending.on_done, outcome)

    def _decode_reply(self, message: Incoming, request_id: str) -> dict[str, Any] | None:
        """The cloud's reply as a dict; None if it is not one (a reply over the limits fails its relay)."""
        try:
            check_payload(message.payload, MAX_REPLY_BYTES)
        except BadRequestError as exc:
            log.warning("message_rejected", topic=message.topic, reason=exc.code, bytes=len(message.payload),
                        id=request_id, message=str(exc))
            self._fail_one(message, f"the cloud's reply was refused: {exc}")
            return None
        try:
            data = json.loads(message.payload)
        except ValueError:
            log.warning("relay_reply_invalid", id=request_id)
            return None
        return data if isinstance(data, dict) else None

    def _expire(self) -> None:
        now = self._clock()
        with self._lock:
            expired = [(t, p) for t, p in self._pending.items() if now >= p.deadline]
            for token, _ in expired:
                del self._pending[token]
        for _, p in expired:
            log.warning("relay_timeout", id=p.request_id, waited_ms=round(self._ms_since(p.started), 1))
            self._send_error(p.topic, p.correlation_data, p.request_id, p.publish, code="timeout",
                             message="the cloud did not answer in time; try again later")  # fmt: skip
            self._done(p.on_done, RelayOutcome(p.request_id, "timeout", self._ms_since(p.started), p.next_seq))

    def _fail_one(self, reply: Incoming, message: str) -> None:
        """End the relay a cloud reply belongs to with an ``internal`` error (its caller is answered once)."""
        token = reply.correlation_data
        with self._lock:
            p = self._pending.pop(token, None) if token is not None else None
        if p is None:
            return
        self._send_error(p.topic, p.correlation_data, p.request_id, p.publish, code="internal", message=message)
        self._done(p.on_done, RelayOutcome(p.request_id, "error", self._ms_since(p.started), p.next_seq))

    def _fail_all(self, result: Result, message: str) -> None:
        with self._lock:
            failed = list(self._pending.values())
            self._pending.clear()
        if failed:
            log.warning("relay_failed_pending", result=result, count=len(failed))
        for p in failed:
            self._send_error(p.topic, p.correlation_data, p.request_id, p.publish, code="overloaded", message=message)
            self._done(p.on_done, RelayOutcome(p.request_id, result, self._ms_since(p.started), p.next_seq))

    # -- helpers -----------------------------------------------------------------------------------

    def _send_error(
        self, topic: str, corr: bytes | None, request_id: str, publish: ReplyPublish, *, code: str, message: str
    ) -> None:
        payload = error_payload(request_id, code, message, self._device_id, self._settings.retry_after_ms)
        publish(topic, payload, qos=1, correlation_data=corr)

    def _ms_since(self, started: float) -> float:
        return (self._clock() - started) * 1000.0

    @staticmethod
    def _done(on_done: Callable[[RelayOutcome], None] | None, outcome: RelayOutcome) -> None:
        if on_done is None:
            return
        try:
            on_done(outcome)
        except Exception:  # a failing callback must not take the relay down with it
            log.exception("relay_on_done_failed", id=outcome.request_id)


def _rewrite_request(payload: bytes, request_id: str) -> bytes:
    """The request as the cloud worker should see it: our id, no 3.1.1 reply_to."""
    try:
        data: Any = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(data, dict):
        return payload
    data["id"] = request_id
    data.pop("reply_to", None)
    return json.dumps(data, ensure_ascii=False).encode()
