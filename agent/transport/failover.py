"""Broker failover: keep serving through the cloud broker while the local one is unreachable.

The local (primary) link keeps reconnecting on its own; after ``failover_after_s`` without it, a
secondary link to the cloud broker is opened with the same subscriptions and will, and everything
the daemon publishes goes there. When the primary is back, the secondary is closed (failback).
Acknowledgements always go back through the link a request came in on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from agent.transport.mqtt import Incoming, MqttLink

log = structlog.get_logger("agent.transport.failover")


@dataclass(frozen=True, slots=True)
class FailoverState:
    active: bool = False  # serving through the secondary
    down_since: float | None = None  # when the primary was first seen down (monotonic)


def failover_step(
    state: FailoverState, *, primary_connected: bool, now: float, after_s: float
) -> tuple[FailoverState, str | None]:
    """Pure: the next state and the transition ("failover", "failback" or None)."""
    if primary_connected:
        if state.active:
            return FailoverState(), "failback"
        return FailoverState(), None
    down_since = state.down_since if state.down_since is not None else now
    if not state.active and now - down_since >= after_s:
        return FailoverState(active=True, down_since=down_since), "failover"
    return FailoverState(active=state.active, down_since=down_since), None


class FailoverLink:
    """The publish/ack/subscribe surface of :class:`MqttLink`, over a primary and an optional secondary."""

    def __init__(
        self,
        primary: MqttLink,
        make_secondary: Callable[[], MqttLink] | None,
        *,
        failover_after_s: float,
    ) -> None:
        self.primary = primary
        self._make_secondary = make_secondary
        self._after = failover_after_s
        self._secondary: MqttLink | None = None
        self._subscriptions: dict[str, int] = {}
        self._ack_listeners: list[Callable[[Incoming], None]] = []
        self.state = FailoverState()

    # -- the MqttLink surface the services use ---------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.primary.connected or (self._secondary is not None and self._secondary.connected)

    @property
    def active_link(self) -> MqttLink:
        secondary = self._secondary
        if secondary is not None and not self.primary.connected:
            return secondary
        return self.primary

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
        self.active_link.publish(
            topic,
            payload,
            qos=qos,
            retain=retain,
            correlation_data=correlation_data,
            response_topic=response_topic,
            message_expiry_s=message_expiry_s,
        )

    def ack(self, message: Incoming) -> None:
        secondary = self._secondary
        if message.via == "secondary" and secondary is not None:
            secondary.ack(message)
        elif message.via == "primary":
            self.primary.ack(message)
        for listener in self._ack_listeners:
            listener(message)

    def add_ack_listener(self, listener: Callable[[Incoming], None]) -> None:
        """Call ``listener(message)`` after every acknowledgement (from the thread that acknowledges)."""
        self._ack_listeners.append(listener)

    def subscribe(self, topics: Iterable[tuple[str, int]]) -> None:
        items = list(topics)
        self._subscriptions.update(items)
        self.primary.subscribe(items)
        if self._secondary is not None:
            self._secondary.subscribe(items)

    def unsubscribe(self, topics: Iterable[str]) -> None:
        names = list(topics)
        for name in names:
            self._subscriptions.pop(name, None)
        self.primary.unsubscribe(names)
        if self._secondary is not None:
            self._secondary.unsubscribe(names)

    # -- lifecycle -----------------------------------------------------------------------------------

    def tick(self, now: float) -> str | None:
        """Advance the failover state machine; opens/closes the secondary. Returns the transition."""
        if self._make_secondary is None:
            return None
        self.state, transition = failover_step(
            self.state, primary_connected=self.primary.connected, now=now, after_s=self._after
        )
        if transition == "failover":
            secondary = self._make_secondary()
            secondary.subscribe(self._subscriptions.items())
            self._secondary = secondary  # before start(): its on-connect publishes go through us
            secondary.start()
            log.warning("broker_failover", after_s=self._after)
        elif transition == "failback":
            self._close_secondary(None)
            log.info("broker_failback")
        return transition

    def start(self) -> None:
        self.primary.start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        self._close_secondary(final, timeout)
        self.primary.stop(final=final, timeout=timeout)

    def _close_secondary(self, final: tuple[str, bytes] | None, timeout: float = 2.0) -> None:
        secondary, self._secondary = self._secondary, None
        if secondary is not None:
            secondary.stop(final=final, timeout=timeout)
