"""What the device says about itself: the retained status, systemd's STATUS= line, and events.

One owner for the serving state (``starting`` → ``pulling`` → ``loading`` → ``online``/``draining``,
``offline`` on the way out) and for everything published about it. The retained status is published
only while connected; :meth:`StatusService.connected` (called by the daemon's main loop for every
:class:`~agent.transport.mqtt.Connected`, never from paho's thread) publishes the state current by then,
the Home Assistant discovery configs, and replays the telemetry and events buffered on disk meanwhile.
Telemetry and events go out now when connected, else into that buffer (replayed in order, not retained, the
telemetry on ``{prefix}/{device_id}/telemetry/replay``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent import __version__
from agent.services.ha_discovery import discovery_messages
from agent.services.telemetry import event_from_action
from agent.transport.telemetry import Event, Mode
from agent.transport.wire import PullProgress, Status

if TYPE_CHECKING:
    from agent.adapt.policy import Action
    from agent.hardware.snapshot import DeviceSnapshot
    from agent.services.inference import InferenceService
    from agent.services.model import ModelOwner
    from agent.services.telemetry_buffer import TelemetryBuffer
    from agent.settings import Settings
    from agent.transport.mqtt import Link
    from agent.transport.topics import DeviceTopics

log = structlog.get_logger("agent.status")


class StatusLine(Protocol):
    """systemd's STATUS= line (agent/sdnotify.py); a no-op outside systemd."""

    def status(self, text: str) -> object: ...


class StatusService:
    """Builds and publishes the retained status, sets STATUS=, sends events and telemetry (buffered offline)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        topics: DeviceTopics,
        model: ModelOwner,
        notifier: StatusLine,
        *,
        mode: Callable[[], Mode] = lambda: "local",
        draining: Callable[[], bool] = lambda: False,
        commands: Callable[[], Any] = lambda: None,
    ) -> None:
        """``settings`` is read at each use (live settings apply); ``mode``, ``draining`` and ``commands`` (the
        fleet command policy) are asked whenever a status is built."""
        self._settings = settings
        self.topics = topics
        self._model = model
        self._notifier = notifier
        self._buffer: TelemetryBuffer | None = None
        self._mode = mode
        self._draining = draining
        self._commands = commands
        self._link: Link | None = None
        self._lock = threading.Lock()  # one status at a time: a later state is never overtaken by an earlier one
        self.state = "starting"
        self.progress: PullProgress | None = None
        self.snapshot: DeviceSnapshot | None = None  # the latest probe (HA discovery says whether a battery exists)
        self.started_mono = time.monotonic()

    def attach(self, link: Link, *, buffer: TelemetryBuffer | None) -> None:
        """The broker link everything is published on (before it connects), and the on-disk buffer for
        telemetry and events sent while it is down (None: dropped instead)."""
        self._link, self._buffer = link, buffer

    # -- the serving state ---------------------------------------------------------------------------

    def set_state(self, state: str, *, note: str, progress: PullProgress | None = None) -> None:
        """One place for the start-up state: retained status on MQTT and STATUS= for systemctl."""
        self.state = state
        self.progress = progress
        self._notifier.status(note)
        if state != "offline":
            self._publish(state)

    def serving_state(self) -> str:
        if self.state == "online":
            return "draining" if self._draining() else "online"
        return self.state

    def publish(self) -> None:
        """Publish the current serving state (after a drain, a swap, a mode change)."""
        self._publish(self.serving_state())

    def _publish(self, state: str) -> None:
        link = self._link
        # Not queued while disconnected: the on-connect publish sends the state current by then.
        if link is not None and link.connected:
            with self._lock:
                link.publish(self.topics.status, self.payload(state), qos=1, retain=True)

    def final(self, *, detail: str | None = None) -> tuple[str, bytes]:
        """The retained ``offline`` status to leave behind (and the will)."""
        return self.topics.status, self.payload("offline", detail=detail)

    def payload(self, state: str, *, detail: str | None = None) -> bytes:
        settings = self._settings()
        model = self._model.info
        status = Status(
            state=state,  # type: ignore[arg-type]
            device_id=settings.device_id,
            role=settings.role,
            groups=list(settings.groups),
            version=__version__,
            model=model.name if model else None,
            quant=self._model.serving.quant,
            mode=self._mode(),
            n_ctx=model.n_ctx if model else None,
            parallel=model.parallel if model else None,
            threads=model.threads if model else None,
            since=round(time.time(), 3),
            progress=self.progress if state == "pulling" else None,
            detail=detail,
            commands=self._commands(),
        )
        return json.dumps(status.model_dump(exclude_none=True)).encode()

    def connected(self) -> None:
        """Main loop, for every (re)connect: the current status and HA discovery, then what was buffered offline."""
        link = self._link
        if link is None:
            return
        self._publish(self.serving_state())
        settings = self._settings()
        if settings.telemetry.ha_discovery:
            snap = self.snapshot
            for topic, payload in discovery_messages(
                self.topics,
                ha_prefix=settings.telemetry.ha_prefix,
                interval_s=settings.telemetry.interval_s,
                has_battery=bool(snap and snap.power.batteries),
                has_throttle=bool(snap and snap.thermal.throttle is not None),
                commands=self._commands(),
                board=snap.board if snap else None,
                version=__version__,
            ):
                link.publish(topic, payload, qos=1, retain=True)
        if self._buffer is not None:
            # Telemetry and events kept on disk while offline go out, in order, original timestamps; the
            # telemetry on its replay topic (the daemon publishes a fresh reading right after).
            self._buffer.drain(self._replay_on(link), time.time())

    def _replay_on(self, link: Link) -> Callable[[str, bytes], None]:
        """How a record kept on disk while offline is published: never retained, and telemetry on its replay
        topic, so Home Assistant (which ignores ``ts``) and ``fleet ls`` never take a past reading for the
        current one."""

        def replay(topic: str, payload: bytes) -> None:
            link.publish(self.topics.telemetry_replay if topic == self.topics.telemetry else topic, payload, qos=1)

        return replay

    def describe(self, service: InferenceService, *, offloaded: int) -> dict[str, Any]:
        """The fleet ``status`` command's answer."""
        settings = self._settings()
        info = service.engine.info
        return {
            "state": "draining" if self._draining() else "online",
            "device_id": settings.device_id,
            "groups": list(settings.groups),
            "role": settings.role,
            "version": __version__,
            "model": info.name if info else None,
            "model_key": self._model.serving.key,
            "quant": self._model.serving.quant,
            "n_ctx": info.n_ctx if info else None,
            "parallel": info.parallel if info else None,
            "threads": info.threads if info else None,
            "estimate_bytes": self._model.serving.estimate_bytes,
            "mode": self._mode(),
            "queue_depth": service.queue_depth,
            "busy": service.busy,
            "slots_busy": service.running,
            "requests_served": service.counters.served,
            "requests_failed": service.counters.failed,
            "requests_offloaded": offloaded,
            "uptime_s": self.uptime_s(),
            "plan": self._model.last_plan,
        }

    def uptime_s(self) -> float:
        return round(time.monotonic() - self.started_mono, 1)

    # -- events and telemetry ------------------------------------------------------------------------

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Telemetry and events: now when connected, else into the on-disk buffer (replayed in order)."""
        link = self._link
        if link is None:
            return
        if self._buffer is None:
            if link.connected:
                link.publish(topic, payload, qos=1, retain=retain)
            return
        self._buffer.send(topic, payload, time.time(), connected=link.connected,
                          publish=lambda t, p: link.publish(t, p, qos=1, retain=retain), replay=self._replay_on(link))

    def emit_event(self, kind: str, reason: str, numbers: dict[str, Any]) -> None:
        event = Event.model_validate(
            {"kind": kind, "reason": reason, "numbers": numbers, "ts": time.time(),
             "device_id": self._settings().device_id}
        )
        self.send(self.topics.events, event.model_dump_json().encode())

    def report_adaptation(self, action: Action, mode_changed: bool) -> None:
        """An adaptation took effect (a swap or thread change only once the model owner said it is done)."""
        event = event_from_action(action, device_id=self._settings().device_id, ts=time.time())
        self.send(self.topics.events, event.model_dump_json().encode())
        log.info("adaptation", kind=event.kind, reason=event.reason, **{k: v for k, v in event.numbers.items()})
        if mode_changed:
            self.publish()
