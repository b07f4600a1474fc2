"""The one module that talks to paho-mqtt.

paho callbacks run on paho's network thread and do nothing but convert what arrived into our own
frozen types and hand them to ``on_event`` (which must not block: the daemon passes ``queue.put``).
Reconnect with backoff is paho's; re-subscribing after every (re)connect is ours, because a broker
that lost our session (restart without persistence, expired session) would otherwise leave us deaf.

With ``tls = true`` every attempt is a verified TLS handshake (agent/transport/tls.py); a failed one
is logged as ``mqtt_tls_failed`` with a reason and handed on as :class:`Disconnected` with ``tls``
set, then retried with the same backoff. Nothing here ever connects without TLS instead.

A QoS 1 message the broker refuses by closing the connection would be resent after every reconnect
(paho keeps unacknowledged messages and resends them, session or not): the link would never stay up.
Two guards keep that from happening: a message larger than the Maximum Packet Size the broker
announced is refused at :meth:`MqttLink.publish` (``TooLargeError``, so the caller can answer with an
error instead), and a message that is the oldest unacknowledged one at two disconnects in a row for
which an MQTT 5 broker blamed a packet (malformed, protocol error, invalid topic, too large) is dropped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.mqtt import MqttSettings
from agent.errors import TooLargeError, TransportError
from agent.settings_base import credentials_dir
from agent.transport.tls import (
    TlsContext,
    TlsFailure,
    classify,
    client_context,
    credential_key,
    is_loopback,
    probe_client_certificate,
)

log = structlog.get_logger("agent.transport")

_TLS_LOG_EVERY_S = 300.0  # a TLS failure that persists is logged again at error level this often

# MQTT 5 DISCONNECT reason codes with which a broker refuses a packet we sent (Mosquitto: 0x81 for a
# topic holding a control character, 0x95 over max_packet_size). Resending that packet cannot succeed.
_REFUSED_PACKET = frozenset({0x81, 0x82, 0x90, 0x95, 0x99})
_STRIKES = 2  # a message blamed this many times in a row is dropped


@dataclass(frozen=True, slots=True)
class Incoming:
    """A received PUBLISH, reduced to what the agent uses."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    response_topic: str | None
    correlation_data: bytes | None
    message_expiry_s: int | None
    received_at: float  # time.monotonic() on arrival
    via: str = "primary"  # which link it came through (acks must go back the same way)


@dataclass(frozen=True, slots=True)
class Connected:
    session_present: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection was lost, or an attempt failed on TLS (``tls`` set: a configuration problem, retried)."""

    reason: str
    tls: TlsFailure | None = None
    broker: str = ""  # host:port of the link
    repeat: bool = False  # the same TLS failure as the previous attempt (already logged)

    @property
    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        if self.tls is None:
            return "broker unreachable; reconnecting"
        return f"TLS to broker {self.broker} failed: {self.tls.reason} ({self.tls.hint}); retrying, never without TLS"


LinkEvent = Incoming | Connected | Disconnected


class Publish(Protocol):
    """The shape of :meth:`MqttLink.publish`, for code that is only handed the publish function."""

    def __call__(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        message_expiry_s: int | None = None,
    ) -> None: ...


class Link(Protocol):
    """What services need from a broker connection (an MqttLink, or the failover pair)."""

    @property
    def connected(self) -> bool: ...

    @property
    def publish(self) -> Publish: ...

    def ack(self, message: Incoming) -> None: ...


def _password(settings: MqttSettings, credential: str) -> str | None:
    if settings.password is not None:
        return settings.password.get_secret_value()
    creds = credentials_dir()
    if creds is not None and (creds / credential).is_file():
        return (creds / credential).read_text(encoding="utf-8").strip()
    return None


class MqttLink:
    """A long-lived MQTT connection with a will, persistent session and remembered subscriptions."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        on_event: Callable[[LinkEvent], None],
        *,
        will: tuple[str, bytes] | None = None,
        manual_ack: bool = False,
        persistent_session: bool = False,
        password_credential: str = "mqtt_password",  # noqa: S107 - a credential file name, not a secret
        name: str = "primary",
        resend_after_reconnect: bool = True,
    ) -> None:
        """``resend_after_reconnect=False``: QoS 1 messages still unacknowledged when the connection drops are
        discarded instead of resent, for a link whose owner gives up on them at the disconnect anyway."""
        self.name = name
        self._resend = resend_after_reconnect
        self._settings = settings
        self._on_event = on_event
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = False
        self._v5 = settings.protocol == "5"
        self._persistent = persistent_session
        self._manual_ack = manual_ack
        self.client_id = client_id
        self._tls: TlsContext | None = None
        self._tls_failure: TlsFailure | None = None  # the latest attempt's, until a connect succeeds
        self._tls_logged_at = 0.0
        self._session_opened = False  # this attempt got through the TLS handshake
        self._connack_seen = False  # ... and the broker answered CONNECT
        self._max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK), if it set one
        self._blamed: tuple[paho.MQTTMessage, int] | None = None  # the message a broker refusal was blamed on
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]  # paho re-exports it untyped
            client_id=client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else not persistent_session,
            manual_ack=manual_ack,
        )
        # An exception escaping any of our callbacks would end paho's network thread (the link goes
        # silent for good); ours catch their own, this is the net under them.
        self._client.suppress_exceptions = True
        # Replies queued while disconnected are sent after reconnect; do not cap the local queue.
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(
            max(1, int(settings.reconnect_min_s)), max(1, int(settings.reconnect_max_s))
        )
        if settings.username:
            # Each broker has its own credential name, so the cloud link never sends the local password.
            self._client.username_pw_set(settings.username, _password(settings, password_credential))
        if settings.tls:
            # The private key may come as the systemd credential tls_key, never from /etc.
            key_file = credential_key(settings.cert_file, settings.key_file, credentials_dir())
            self._tls = client_context(settings.ca_file, settings.cert_file, key_file,
                                       section="mqtt" if name == "primary" else "cloud")
            self._client.tls_set_context(self._tls)
        elif not is_loopback(settings.host):
            log.warning("mqtt_plaintext", link=name, host=settings.host, port=settings.port,
                        password=bool(settings.username), hint="set tls = true to encrypt and verify the broker")
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_socket_open = self._handle_socket_open
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_pre_connect = self._handle_pre_connect
        self._client.on_connect_fail = self._handle_connect_fail
        self._client.on_publish = self._handle_publish

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until it succeeds."""
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self._persistent:
                properties.SessionExpiryInterval = self._settings.session_expiry_s
        try:
            self._client.connect_async(
                self._settings.host,
                self._settings.port,
                keepalive=self._settings.keepalive_s,
                clean_start=(not self._persistent) if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {self._settings.host}:{self._settings.port}: {exc}") from exc
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the broker acknowledged the subscriptions made on the latest connect."""
        return self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (retained, QoS 1) if connected, wait for outgoing messages, disconnect."""
        if final is not None and self.connected:
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            self._wait_published(info, timeout)
        self.flush(timeout)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        # paho closes its wake-up socket pair only when garbage-collected; close it now.
        self._client._reset_sockets(sockpair_only=True)

    def flush(self, timeout: float) -> None:
        """Wait (bounded) until paho has no unacknowledged outgoing messages."""
        deadline = time.monotonic() + timeout
        while self.connected and time.monotonic() < deadline:
            if not self._client._out_messages:
                return
            time.sleep(0.01)

    # -- operations --------------------------------------------------------------------------------

    def subscribe(self, topics: Iterable[tuple[str, int]]) -> None:
        """Remember and subscribe; remembered topics are re-subscribed on every reconnect."""
        with self._lock:
            new = dict(topics)
            self._subscriptions.update(new)
        if self.connected and new:
            self._client.subscribe(list(new.items()))

    def unsubscribe(self, topics: Iterable[str]) -> None:
        names = list(topics)
        with self._lock:
            for name in names:
                self._subscriptions.pop(name, None)
        if self.connected and names:
            self._client.unsubscribe(names)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        message_expiry_s: int | None = None,
    ) -> None:
        """Queue a message; paho sends it now or after reconnect (QoS > 0).

        Raises ``TooLargeError`` (queuing nothing) when the packet would exceed the Maximum Packet Size
        the broker announced: the broker would disconnect us for it, after every reconnect.
        """
        properties = None
        if self._v5 and (correlation_data is not None or response_topic or message_expiry_s):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic:
                properties.ResponseTopic = response_topic
            if message_expiry_s:
                properties.MessageExpiryInterval = message_expiry_s
        limit = self._max_packet
        if limit is not None:
            size = _publish_packet_size(topic, payload, qos, properties, v5=self._v5)
            if size > limit:
                log.warning("mqtt_publish_too_large", link=self.name, topic=topic, bytes=size, limit=limit)
                raise TooLargeError(
                    f"the message ({size} bytes) is larger than the broker accepts ({limit} bytes)"
                )
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publish_failed", topic=topic, rc=int(info.rc))

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS 1 request once its final reply has been queued (manual-ack mode)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    # -- paho callbacks (network thread) -----------------------------------------------------------

    def _handle_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        self._session_opened = self._connack_seen = False
        if self._tls is not None:
            self._tls.take_error()

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # TCP connect or TLS handshake failed (paho passes no exception: the context kept it).
        if self._tls is None or self._stopping:
            return
        error = self._tls.take_error()
        failure = classify(error[0], error[1]) if error is not None else None
        if failure is not None:
            self._report_tls(failure)

    def _handle_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._session_opened = True  # called after the TLS handshake, when there is one
        # Nagle + delayed ACK cost ~90 ms per QoS 1 round trip on loopback; measured in issue 2.
        with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (e.g. websockets)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._connack_seen = True
        if reason_code.is_failure:
            log.warning("mqtt_connect_refused", reason=str(reason_code))
            return
        with self._lock:
            subs = list(self._subscriptions.items())
        self._subscribed.clear()
        if subs:
            client.subscribe(subs)
        else:
            self._subscribed.set()
        # Absent when the broker sets no limit (and always with MQTT 3.1.1).
        self._max_packet = getattr(properties, "MaximumPacketSize", None) if self._v5 else None
        self._connected.set()
        self._tls_failure = None
        session_present = bool(getattr(flags, "session_present", False))
        log.info(
            "mqtt_connected",
            link=self.name,
            host=self._settings.host,
            port=self._settings.port,
            session_present=session_present,
        )
        self._on_event(Connected(session_present=session_present))

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        failed = [str(rc) for rc in reason_codes if getattr(rc, "is_failure", False)]
        if failed:
            log.warning("mqtt_subscribe_refused", reasons=failed)
        self._subscribed.set()

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        # MQTT 5 brokers say when they drop a QoS 1 message (an ACL, a quota); 3.1.1 brokers cannot.
        if getattr(reason_code, "is_failure", False):
            message = client._out_messages.get(mid)  # still there while paho calls us
            log.warning("mqtt_publish_refused", link=self.name, topic=getattr(message, "topic", None),
                        reason=str(reason_code))

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            log.debug("mqtt_closed")
            return
        if was_connected:
            log.warning("mqtt_disconnected", link=self.name, reason=str(reason_code))
            refused = getattr(flags, "is_disconnect_packet_from_server", False) and (
                getattr(reason_code, "value", None) in _REFUSED_PACKET
            )
            if not self._resend:  # now, before paho's reconnect resends everything still unacknowledged
                self._discard_outgoing(client)
            elif refused:
                self._blame_refused(client, str(reason_code))
            else:
                self._forget_blame()
        elif self._tls is not None and self._session_opened and not self._connack_seen:
            # Closed between the handshake and CONNACK: with TLS 1.3, how a refused client certificate looks.
            failure = self._session_failure()
            if failure is not None:
                self._report_tls(failure)
                return
        self._on_event(Disconnected(reason=str(reason_code)))

    def _blame_refused(self, client: paho.Client, reason: str) -> None:
        """The broker refused a packet of ours: blame the oldest unacknowledged message; drop it the second time.

        Mosquitto handles packets in order and closes at the refused one; messages sent before it have
        been acknowledged by then, so the oldest unacknowledged one is the culprit (or, at worst, a message
        whose PUBACK was lost, which is acknowledged after the resend and so is never blamed twice).
        """
        with client._out_message_mutex:
            culprit = next((m for m in client._out_messages.values()
                            if m.qos > 0 and m.state == paho.mqtt_ms_wait_for_puback), None)  # fmt: skip
            if culprit is None:
                self._forget_blame()
                return
            previous = self._blamed
            strikes = previous[1] + 1 if previous is not None and previous[0] is culprit else 1
            if strikes < _STRIKES:
                self._blamed = (culprit, strikes)
                log.warning("mqtt_publish_blamed", link=self.name, topic=culprit.topic, bytes=len(culprit.payload),
                            reason=reason, strikes=strikes)  # fmt: skip
                return
            client._out_messages.pop(culprit.mid, None)
            self._blamed = None
        culprit.info.rc = paho.MQTT_ERR_CONN_REFUSED
        culprit.info._set_as_published()  # nobody waits on it forever
        log.error("mqtt_publish_dropped", link=self.name, topic=culprit.topic, bytes=len(culprit.payload),
                  reason=reason, strikes=strikes,
                  hint="the broker refuses this message; it was dropped so the link can stay up")  # fmt: skip

    def _discard_outgoing(self, client: paho.Client) -> None:
        with client._out_message_mutex:
            dropped = [m for m in client._out_messages.values() if m.qos > 0]
            for m in dropped:
                client._out_messages.pop(m.mid, None)
        for m in dropped:
            m.info.rc = paho.MQTT_ERR_CONN_LOST
            m.info._set_as_published()
        if dropped:
            log.info("mqtt_outgoing_discarded", link=self.name, count=len(dropped))

    def _forget_blame(self) -> None:
        self._blamed = None

    def _session_failure(self) -> TlsFailure | None:
        assert self._tls is not None
        error = self._tls.take_error()
        failure = classify(error[0], error[1]) if error is not None else None
        if failure is None:
            # The broker's alert was lost to its reset (we were sending CONNECT): ask again, sending nothing.
            failure = probe_client_certificate(self._settings.host, self._settings.port, self._tls, timeout=1.0)
        return failure

    def _report_tls(self, failure: TlsFailure) -> None:
        """Log a TLS failure (again only when its reason changes, or every few minutes) and hand it on."""
        now = time.monotonic()
        previous = self._tls_failure
        repeat = previous is not None and previous.reason == failure.reason
        self._tls_failure = failure
        broker = f"{self._settings.host}:{self._settings.port}"
        if not repeat or now - self._tls_logged_at >= _TLS_LOG_EVERY_S:
            self._tls_logged_at = now
            log.error("mqtt_tls_failed", link=self.name, broker=broker, reason=failure.reason, detail=failure.detail,
                      hint=failure.hint)
        else:
            log.debug("mqtt_tls_failed", link=self.name, broker=broker, reason=failure.reason, repeat=True)
        self._on_event(Disconnected(reason=f"tls:{failure.reason}", tls=failure, broker=broker, repeat=repeat))

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._on_event(self._incoming(msg))
        except Exception:
            # Nothing a message carries may end paho's network thread (the link would go silent for
            # good). What cannot be handed over is acknowledged (so it is not redelivered forever) and dropped.
            log.exception("message_dropped", link=self.name, reason="callback_failed", mid=msg.mid)
            if self._manual_ack and msg.qos > 0:
                with contextlib.suppress(Exception):
                    client.ack(msg.mid, msg.qos)

    def _incoming(self, msg: paho.MQTTMessage) -> Incoming:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        return Incoming(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            mid=msg.mid,
            dup=bool(msg.dup),
            response_topic=response_topic or None,
            correlation_data=bytes(correlation) if correlation is not None else None,
            message_expiry_s=int(expiry) if expiry is not None else None,
            received_at=time.monotonic(),
            via=self.name,
        )

    @staticmethod
    def _wait_published(info: paho.MQTTMessageInfo, timeout: float) -> None:
        with contextlib.suppress(RuntimeError, ValueError):  # not queued / connection gone: nothing to wait for
            info.wait_for_publish(timeout)


def _varint_len(n: int) -> int:
    length = 1
    while n >= 128:
        n //= 128
        length += 1
    return length


def _publish_packet_size(topic: str, payload: bytes, qos: int, properties: Properties | None, *, v5: bool) -> int:
    """The size of the PUBLISH packet paho will send, as a broker's Maximum Packet Size counts it."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + len(payload)
    if v5:
        remaining += len(properties.pack()) if properties is not None else 1  # type: ignore[no-untyped-call]
    return 1 + _varint_len(remaining) + remaining
