"""The daemon's lifecycle in one place: signals → startup → main loop → graceful shutdown.

The main thread owns every decision; paho's thread only enqueues events and the inference worker
only generates. A first SIGTERM/SIGINT starts a graceful shutdown (finish the running generation
within the grace period, answer queued requests 'cancelled', publish 'offline'); a second one exits
at once. The daemon only runs the lifecycle; the jobs are services it wires together and calls:
:class:`~agent.services.router.Router` (where each message goes, the fleet share, offload),
:class:`~agent.services.status.StatusService` (retained status, STATUS=, events),
:class:`~agent.services.telemetry_tick.TelemetryTick` (probe, adaptation, telemetry), wired together by
:func:`~agent.services.serving.build_serving`; the model owner (start-up's first model:
:func:`~agent.services.model_start.resolve_start_model`) and :class:`~agent.fleet.service.FleetService`.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent import __version__
from agent.control import DaemonControl, run_logged
from agent.engine.llama import LoadedModel
from agent.errors import AgentError, ConfigError
from agent.fleet.service import FleetService
from agent.logs import configure_logging
from agent.services.device import DeviceReader
from agent.services.inference import InferenceService
from agent.services.model import ModelOwner, planner_for
from agent.services.model_start import resolve_start_model
from agent.services.serving import Serving, build_serving
from agent.services.status import StatusService
from agent.services.telemetry_buffer import TelemetryBuffer
from agent.settings import Settings, fleet_overrides_path
from agent.transport.failover import FailoverLink
from agent.transport.mqtt import Connected, Disconnected, Incoming, LinkEvent, MqttLink
from agent.transport.topics import DeviceTopics

if TYPE_CHECKING:
    from agent.config.telemetry import TelemetrySettings

log = structlog.get_logger("agent.daemon")

TICK_S = 1.0
CONNECT_WAIT_S = 1.0  # start-up waits this long at most for the broker, so the device shows 'starting' at once
RESTART_EXIT_CODE = 75  # EX_TEMPFAIL; the unit has RestartForceExitStatus=75


class _StartInterruptedError(BaseException):
    """SIGTERM/SIGINT arrived while the daemon was still planning, pulling or loading (not an error)."""


class Notifier(Protocol):
    """What the daemon needs from sd_notify (agent/sdnotify.py); a no-op outside systemd."""

    def ready(self, status: str | None = None) -> object: ...
    def status(self, text: str) -> object: ...
    def watchdog(self) -> object: ...
    def stopping(self, status: str | None = None) -> object: ...
    def watchdog_interval_s(self) -> float | None: ...


class _NoNotifier:
    def ready(self, status: str | None = None) -> None:
        return None

    def status(self, text: str) -> None:
        return None

    def watchdog(self) -> None:
        return None

    def stopping(self, status: str | None = None) -> None:
        return None

    def watchdog_interval_s(self) -> float | None:
        return None


def _writable_dir(preferred: Path, name: str) -> Path | None:
    """``preferred`` if it can be created; else a per-user state dir (a daemon run by hand, not by systemd)."""
    user_state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state"))
    for candidate in (preferred, user_state / "edge-agent" / name):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            probe = candidate / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            continue
        if candidate != preferred:
            log.warning("state_dir_fallback", wanted=str(preferred), using=str(candidate))
        return candidate
    return None


def _telemetry_buffer(t: TelemetrySettings) -> TelemetryBuffer | None:
    """The on-disk buffer for telemetry and events sent while disconnected; None without a writable directory."""
    directory = _writable_dir(t.buffer_dir, "telemetry")
    if directory is None:
        log.warning("telemetry_buffer_disabled", reason="no writable directory", wanted=str(t.buffer_dir))
        return None
    return TelemetryBuffer(directory, max_bytes=t.buffer_max_bytes, max_age_s=t.buffer_max_age_s)


class Daemon:
    def __init__(self, settings: Settings, notifier: Notifier | None = None, config_path: Path | None = None) -> None:
        self.settings = settings
        self._config_path = config_path
        self._notifier: Notifier = notifier or _NoNotifier()
        self._topics = DeviceTopics(settings.mqtt.topic_prefix, settings.device_id)
        # Link events, "stop", and callables other threads hand to the main loop (a model change's outcome).
        self._events: queue.SimpleQueue[LinkEvent | str | Callable[[], None]] = queue.SimpleQueue()
        self._held: list[Incoming] = []  # arrived during start-up: dispatched first once serving
        self._stop = threading.Event()
        self._signals = 0
        self._link_up = False  # the latest link event handled was Connected
        self._ready_sent = False
        # Reconnected while serving: publish a reading now, so the retained telemetry is newer than the
        # buffered readings just replayed (on their own topic) instead of the one from before the outage.
        self._telemetry_now = False
        self._hang = False
        self._interruptible = False  # True while start-up (plan, pull, load) runs on the main thread
        self._exit_code = 0
        self._serving: Serving | None = None  # once the model is loaded
        self._link: FailoverLink | None = None
        self._test_hooks = False
        self._fleet: FleetService | None = None
        self.device = DeviceReader(lambda: self.settings)
        # Lambdas: the status service is made next, with the owner (the owner reports through it).
        self.model = ModelOwner(settings.model, inference=lambda: self.settings.inference,
                                planner=planner_for(lambda: self.settings),
                                conditions=self.device.conditions,
                                emit=lambda kind, reason, numbers: self.status.emit_event(kind, reason, numbers),  # noqa: PLW0108
                                on_switched=lambda: self.status.publish())  # noqa: PLW0108
        self.status = StatusService(
            lambda: self.settings, self._topics, self.model, self._notifier,
            mode=lambda: self._serving.router.mode if self._serving is not None else "local",
            draining=lambda: self._serving is not None and self._serving.router.draining,
            commands=lambda: self._fleet.policy if self._fleet is not None else None,
        )
        self.control = DaemonControl(self.model, self)

    # -- signals -----------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Second signal: the operator wants out now.
            os._exit(1)
        self._stop.set()
        self._events.put("stop")
        if self._interruptible:
            # Still on the main thread's start-up path (a pull can take minutes): stop it now rather
            # than after the download; a partial download stays in the cache and resumes next time.
            raise _StartInterruptedError

    def install_signal_handlers(self, *, test_hooks: bool = False) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._test_hooks = test_hooks
        if test_hooks:
            # EDGE_TEST_HOOKS=1 only: SIGUSR2 wedges the main loop, so tests can watch the
            # systemd watchdog pings stop (a hung loop must get the service restarted).
            signal.signal(signal.SIGUSR2, self._on_hang_signal)

    def _on_hang_signal(self, signum: int, frame: FrameType | None) -> None:
        self._hang = True

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a signal, shut down cleanly; returns the process exit code.

        The broker connection comes first, so a device is visible (retained ``starting`` →
        ``pulling`` with progress → ``loading`` → ``online``) during a first pull that may take
        minutes; requests and commands that arrive meanwhile wait in the event queue.
        """
        self.status.snapshot = self.device.first_probe()
        link = self._connect()
        model = self._load_model(link)
        if model is None:
            return 0
        service = self._start_serving(model, link)
        try:
            self._main_loop(service)
        finally:
            self._shut_down(service, link)
        return self._exit_code

    def _load_model(self, link: FailoverLink) -> LoadedModel | None:
        """Plan, pull and load; None when a signal stopped the start. A failure is told on the status topic."""
        self._interruptible = True
        try:
            model_path, n_ctx = resolve_start_model(
                self.model, self.settings.model, self.status, on_block=self._pump,
                extend_timeout=getattr(self._notifier, "extend_timeout", None))
            self._pump()
            self.status.set_state("loading", note=f"loading model {model_path.name}")
            loaded = self.model.load_first(model_path, n_ctx)
            self._interruptible = False
        except _StartInterruptedError:
            log.info("agent_stopped", during="start", exit_code=0)
            self.status.set_state("offline", note="stopped while starting")
            link.stop(final=self.status.final())
            return None
        except BaseException as exc:
            self._interruptible = False
            # Say why on the device's status topic before going: an operator watching the fleet sees
            # "offline: <reason>" instead of a device that silently never came up.
            detail = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            self.status.set_state("offline", note=detail)
            link.stop(final=self.status.final(detail=detail))
            raise
        return loaded

    def _start_serving(self, model: LoadedModel, link: FailoverLink) -> InferenceService:
        settings, status = self.settings, self.status
        assert self._fleet is not None
        serving = self._serving = build_serving(
            settings=lambda: self.settings, model=model, owner=self.model, link=link, topics=self._topics,
            commands=self._fleet, status=status, device=self.device, post=self._events.put,
            state_dir=_writable_dir(settings.fleet.state_dir, "fleet"), test_hooks=self._test_hooks,
        )
        serving.start()
        self._pump()
        status.set_state("online", note=f"serving on {self._topics.infer}")
        if self._link_up:
            self._serving_connected()  # connected during start-up: READY now
        log.info(
            "agent_started",
            device_id=settings.device_id,
            version=__version__,
            role=settings.role,
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
            infer_topic=self._topics.infer,
            start_s=round(time.monotonic() - status.started_mono, 2),
        )
        return serving.service

    def _shut_down(self, service: InferenceService, link: FailoverLink) -> None:
        settings = self.settings
        self._notifier.stopping("shutting down")
        log.info("agent_stopping", grace_s=settings.inference.shutdown_grace_s)
        # Leave the shared subscriptions first: the persistent session would otherwise keep its
        # share of fleet requests queued for us until we come back (or the session expires).
        if self._serving is not None:
            self._serving.router.leave()
        service.shutdown(settings.inference.shutdown_grace_s)
        if self._fleet is not None:
            self._fleet.close(5.0)
        if self._serving is not None and self._serving.relay is not None:
            self._serving.relay.stop(5.0)
        link.stop(final=self.status.final())
        self.model.close()
        log.info("agent_stopped", served=service.counters.served, failed=service.counters.failed,
                 exit_code=self._exit_code)

    def _connect(self) -> FailoverLink:
        """Connect before anything slow: the device's own request, cancel, command and status topics.

        The fleet's shared subscriptions wait until the model is loaded (the broker would otherwise
        route fleet work to a device that cannot serve it for minutes); this device's own requests
        are subscribed at once and wait in the event queue, each with its deadline.
        """
        settings = self.settings
        primary = MqttLink(
            settings.mqtt,
            settings.mqtt.client_id or f"edge-agent-{settings.device_id}",
            self._events.put,
            will=self.status.final(),
            manual_ack=True,
            persistent_session=True,
        )
        cloud_failover = settings.cloud.enabled and settings.role == "edge"
        link = FailoverLink(
            primary,
            self._make_failover_link if cloud_failover else None,
            failover_after_s=settings.cloud.failover_after_s,
        )
        self._link = link
        self.status.attach(link, buffer=_telemetry_buffer(settings.telemetry))
        fleet_state = _writable_dir(settings.fleet.state_dir, "fleet") or settings.fleet.state_dir
        # config-set persists where load_config reads it, even when the journals fell back elsewhere.
        self._fleet = FleetService(settings, self.control, link.publish, self._config_path, fleet_state, ack=link.ack,
                                   overrides_path=fleet_overrides_path(settings))
        # Commands sent while the model is pulled wait in the session and are handled once it serves.
        link.subscribe([(self._topics.infer, 1), (self._topics.infer_cancel, 1), *self._fleet.subscriptions()])
        self.status.set_state("starting", note=f"connecting to {settings.mqtt.host}:{settings.mqtt.port}")
        link.start()
        self._pump(wait_s=CONNECT_WAIT_S)
        return link

    def _pump(self, *, wait_s: float = 0.0) -> None:
        """Start-up (main thread, before the main loop): handle the link events that arrived so far, waiting
        up to ``wait_s`` for the first; messages are held for the main loop, in order."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic())) if wait_s else \
                    self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, Incoming):
                self._held.append(event)
                continue
            if isinstance(event, str):  # "stop": the start-up path sees self._stop
                return
            self._on_event(event)
            if isinstance(event, Connected | Disconnected):
                wait_s = 0.0  # the first outcome of connecting is in: take only what is queued

    def _main_loop(self, service: InferenceService) -> None:
        interval = self._notifier.watchdog_interval_s()
        tick = min(TICK_S, interval) if interval else TICK_S
        last_ping = 0.0
        next_telemetry = time.monotonic() + 1.0
        next_expiry = 0.0
        assert self._serving is not None
        router, tick_telemetry = self._serving.router, self._serving.tick
        held, self._held = self._held, []
        for message in held:  # arrived while starting, in order, before anything newer
            router.dispatch(message)
        while not self._stop.is_set():
            try:
                # Wake for the next telemetry tick too: a full `tick` after every event would stretch
                # the interval by up to `tick` whenever requests arrive (1.8 s instead of 1 s, measured).
                # And for the next deadline sweep while requests wait: otherwise an idle loop answers a
                # request past its deadline up to `tick` late (1-2 s for a 0.5 s deadline, measured).
                wake = next_telemetry if not service.queue_depth else min(next_telemetry, next_expiry)
                event = self._events.get(timeout=min(tick, max(0.01, wake - time.monotonic())))
            except queue.Empty:
                event = None
            while self._hang and not self._stop.is_set():
                time.sleep(0.1)
            now = time.monotonic()
            if interval and now - last_ping >= interval:
                # From the main loop on purpose: if this loop wedges, systemd restarts us.
                self._notifier.watchdog()
                last_ping = now
            self._check_failover(now)
            if now >= next_expiry:
                # A queued request past its deadline is answered now, not when it reaches the head.
                next_expiry = now + 0.5
                run_logged(partial(service.expire_queued, now), "expire_queued_failed")
            if isinstance(event, Incoming):
                router.dispatch(event)
            elif event is not None and not isinstance(event, str):
                self._on_event(event)
            if now >= next_telemetry or self._telemetry_now:
                self._telemetry_now = False
                next_telemetry = now + self.settings.telemetry.interval_s
                run_logged(tick_telemetry, "telemetry_tick_failed")
                router.update_share()

    def _make_failover_link(self) -> MqttLink:
        """The device's own topics on the cloud broker, while the local broker is unreachable."""
        cloud = self.settings.cloud.mqtt(self.settings.device_id)
        return MqttLink(
            cloud,
            f"{cloud.client_id}-failover",
            self._events.put,
            will=self.status.final(),
            manual_ack=True,
            password_credential="cloud_mqtt_password",  # noqa: S106 - a credential file name
            name="secondary",
        )

    def _check_failover(self, now: float) -> None:
        link = self._link
        if link is None:
            return
        transition = link.tick(now)
        if transition is None:
            return
        numbers = {"failover_after_s": self.settings.cloud.failover_after_s}
        reason = "local_broker_unreachable" if transition == "failover" else "local_broker_back"
        self.status.emit_event(transition, reason, numbers)
        self._notifier.status("serving through the cloud broker" if transition == "failover"
                              else f"serving on {self._topics.infer}")

    def _on_event(self, event: LinkEvent | Callable[[], None]) -> None:
        """Main thread: a link event (paho's thread only queued it), or a callable another thread handed over."""
        if isinstance(event, Connected):
            self._link_up = True
            self.status.connected()  # the status current now, HA discovery, then what was buffered offline
            if self._serving is not None:
                self._telemetry_now = True
                self._serving_connected()
        elif isinstance(event, Disconnected):
            self._link_up = False
            self._notifier.status(event.status_line)  # a TLS failure says which and how to fix it
        elif callable(event):
            run_logged(event, "main_loop_call_failed")  # a model change's outcome, handed back by its thread

    def _serving_connected(self) -> None:
        infer = self._topics.infer
        if not self._ready_sent:
            info = self.model.info
            self._notifier.ready(f"serving {info.name if info else '?'} on {infer}")
            self._ready_sent = True
        else:
            self._notifier.status(f"serving on {infer} (reconnected)")

    def service_or_raise(self) -> InferenceService:
        if self._serving is None:
            raise ConfigError("the daemon is not serving yet")
        return self._serving.service

    # -- fleet control hooks -----------------------------------------------------------------------

    def set_draining(self, draining: bool) -> None:
        self.service_or_raise()
        assert self._serving is not None
        self._serving.router.set_draining(draining)  # leaves or rejoins the fleet's shared subscription
        self.status.publish()

    def request_restart(self) -> None:
        self._exit_code = RESTART_EXIT_CODE
        # Give the command result a moment to be published before shutting down.
        threading.Timer(0.5, self._request_stop).start()

    def _request_stop(self) -> None:
        self._stop.set()
        self._events.put("stop")

    def apply_live_settings(self, new: Settings) -> None:
        service = self.service_or_raise()
        service.apply_settings(new.inference)
        if new.log != self.settings.log:
            configure_logging(new.log.level, new.log.format)
        self.settings = self.settings.model_copy(
            update={"inference": new.inference, "telemetry": new.telemetry, "adapt": new.adapt, "log": new.log}
        )

    def status_dict(self) -> dict[str, Any]:
        service = self.service_or_raise()
        assert self._serving is not None
        return self.status.describe(service, offloaded=self._serving.router.offloaded)
