"""The daemon's lifecycle in one place: signals → startup → main loop → graceful shutdown.

The main thread owns every decision; paho's thread only enqueues events and the inference worker
only generates. A first SIGTERM/SIGINT starts a graceful shutdown (finish the running generation
within the grace period, answer queued requests 'cancelled', publish 'offline'); a second one exits
at once. Besides serving, the main loop ticks telemetry and the live-adaptation policy, and hands
fleet commands to :class:`agent.fleet.commands.FleetService`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import structlog

from agent import __version__
from agent.adapt.policy import Action, observe
from agent.adapt.settings import ThermalLimits, board_limits
from agent.control import DaemonControl, run_logged
from agent.engine.llama import LoadedModel
from agent.errors import AgentError, ConfigError
from agent.fleet.service import FleetService
from agent.hardware.probe import CpuPercentSampler, probe_device
from agent.hardware.snapshot import DeviceSnapshot
from agent.logs import configure_logging
from agent.services.adaptation import Adaptation
from agent.services.bulkhead import Bulkhead, BulkheadCounters
from agent.services.ha_discovery import discovery_messages
from agent.services.inference import InferenceService, ReplyAddress
from agent.services.model import ModelOwner, planner_for
from agent.services.offload import CloudRelay, OffloadFlags, expected_wait_ms, should_offload
from agent.services.telemetry import RuntimeView, build_telemetry, event_from_action
from agent.services.telemetry_buffer import TelemetryBuffer
from agent.settings import Settings, fleet_overrides_path
from agent.transport.failover import FailoverLink
from agent.transport.mqtt import Connected, Disconnected, Incoming, LinkEvent, MqttLink
from agent.transport.telemetry import Event, LimitCounts, Mode
from agent.transport.topics import DeviceTopics
from agent.transport.wire import InferRequest, PullProgress, Status

log = structlog.get_logger("agent.daemon")

TICK_S = 1.0
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


class Daemon:
    def __init__(self, settings: Settings, notifier: Notifier | None = None, config_path: Path | None = None) -> None:
        self.settings = settings
        self._config_path = config_path
        self._notifier: Notifier = notifier or _NoNotifier()
        self._topics = DeviceTopics(settings.mqtt.topic_prefix, settings.device_id)
        self._prefix = settings.mqtt.topic_prefix
        # Link events, "stop", and callables other threads hand to the main loop (a model change's outcome).
        self._events: queue.SimpleQueue[LinkEvent | str | Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._signals = 0
        self._started = time.time()
        self._started_mono = time.monotonic()
        self._ready_sent = False
        self._hang = False
        self._state = "starting"
        self._interruptible = False  # True while start-up (plan, pull, load) runs on the main thread
        self._progress: PullProgress | None = None
        self._exit_code = 0
        self._service: InferenceService | None = None
        self._link: FailoverLink | None = None
        self._fleet_subscribed = True
        self._relay: CloudRelay | None = None
        self._bulkhead: Bulkhead | None = None
        self._test_hooks = False
        self._fleet: FleetService | None = None
        self._buffer: TelemetryBuffer | None = None
        self._limits: ThermalLimits | None = None
        self._adaptation: Adaptation | None = None
        self._snapshot: DeviceSnapshot | None = None
        self._cpu = CpuPercentSampler(settings.hardware.proc_root)
        self._overflowing = False
        self._offloaded = 0
        self._draining = False
        self.model = ModelOwner(settings.model, planner=planner_for(lambda: self.settings), conditions=self.conditions,
                                emit=self.emit_event, on_switched=self._model_switched)
        self.control = DaemonControl(self.model, self)
        self.fleet_infer = f"$share/{self._prefix}-workers/{self._prefix}/fleet/infer"
        self.cloud_infer = settings.cloud.shared_infer_topic(self._prefix) if settings.role == "cloud" else None

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
        settings = self.settings
        self._snapshot = self._probe()
        self._limits = board_limits(self._snapshot, settings.adapt)
        self._buffer = self._make_buffer()
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
            model_path, n_ctx = self._resolve_model()
            self._set_state("loading", note=f"loading model {model_path.name}")
            loaded = self.model.load_first(model_path, n_ctx)
            self._interruptible = False
        except _StartInterruptedError:
            log.info("agent_stopped", during="start", exit_code=0)
            self._set_state("offline", note="stopped while starting")
            link.stop(final=(self._topics.status, self._status_payload("offline")))
            return None
        except BaseException as exc:
            self._interruptible = False
            # Say why on the device's status topic before going: an operator watching the fleet sees
            # "offline: <reason>" instead of a device that silently never came up.
            detail = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            self._set_state("offline", note=detail)
            link.stop(final=(self._topics.status, self._status_payload("offline", detail=detail)))
            raise
        return loaded

    def _start_serving(self, model: LoadedModel, link: FailoverLink) -> InferenceService:
        settings = self.settings
        self._adaptation = Adaptation(model.threads, self.model, catalog_name=self._cap_target,
                                      report=self._report_adaptation, post=self._events.put)
        service = InferenceService(self.model.engine, link, settings.inference,  # type: ignore[arg-type]
                                   settings.device_id, model.name)
        self.model.attach(service)
        service.served_by = "cloud" if settings.role == "cloud" else settings.device_id
        if self.cloud_infer:  # relayed by edge devices: one relay reply topic speaks for many callers
            service.unmetered_topics = frozenset({self.cloud_infer.split("/", 2)[2]})
        self._service = service
        if settings.cloud.enabled and settings.role == "edge":
            self._relay = CloudRelay(settings.cloud, prefix=self._prefix, device_id=settings.device_id,
                                     on_tls_failed=lambda f: self.emit_event("cloud_tls_failed", f.reason, {}))
            service.router = self._route
        if self._fleet_subscribed:
            link.subscribe([(self.fleet_infer, 1)])
        if self.cloud_infer:
            link.subscribe([(self.cloud_infer, 1)])
        service.start()
        if self._relay is not None:
            self._relay.start()
        self._set_state("online", note=f"serving on {self._topics.infer}")
        log.info(
            "agent_started",
            device_id=settings.device_id,
            version=__version__,
            role=settings.role,
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
            infer_topic=self._topics.infer,
            start_s=round(time.monotonic() - self._started_mono, 2),
        )
        return service

    def _shut_down(self, service: InferenceService, link: FailoverLink) -> None:
        settings = self.settings
        self._notifier.stopping("shutting down")
        log.info("agent_stopping", grace_s=settings.inference.shutdown_grace_s)
        # Leave the shared subscriptions first: the persistent session would otherwise keep its
        # share of fleet requests queued for us until we come back (or the session expires).
        link.unsubscribe([t for t in (self.fleet_infer, self.cloud_infer) if t])
        service.shutdown(settings.inference.shutdown_grace_s)
        if self._fleet is not None:
            self._fleet.close(5.0)
        if self._relay is not None:
            self._relay.stop(5.0)
        link.stop(final=(self._topics.status, self._status_payload("offline")))
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
            will=(self._topics.status, self._status_payload("offline")),
            manual_ack=True,
            persistent_session=True,
            on_connect_publish=self._on_connect_publish,
        )
        cloud_failover = settings.cloud.enabled and settings.role == "edge"
        link = FailoverLink(
            primary,
            self._make_failover_link if cloud_failover else None,
            failover_after_s=settings.cloud.failover_after_s,
        )
        self._link = link
        fleet_state = _writable_dir(settings.fleet.state_dir, "fleet") or settings.fleet.state_dir
        # config-set persists where load_config reads it, even when the journals fell back elsewhere.
        self._fleet = FleetService(settings, self.control, link.publish, self._config_path, fleet_state, ack=link.ack,
                                   overrides_path=fleet_overrides_path(settings))
        # Commands sent while the model is pulled wait in the session and are handled once it serves.
        link.subscribe([(self._topics.infer, 1), (self._topics.infer_cancel, 1), *self._fleet.subscriptions()])
        self._set_state("starting", note=f"connecting to {settings.mqtt.host}:{settings.mqtt.port}")
        link.start()
        return link

    def _set_state(self, state: str, *, note: str, progress: PullProgress | None = None) -> None:
        """One place for the start-up state: retained status on MQTT and STATUS= for systemctl."""
        self._state = state
        self._progress = progress
        self._notifier.status(note)
        if state != "offline":
            self._publish_status(state)

    def _main_loop(self, service: InferenceService) -> None:
        interval = self._notifier.watchdog_interval_s()
        tick = min(TICK_S, interval) if interval else TICK_S
        last_ping = 0.0
        next_telemetry = time.monotonic() + 1.0
        next_expiry = 0.0
        infer, cancel = self._topics.infer, self._topics.infer_cancel
        shared = {f"{self._prefix}/fleet/infer"}
        if self.cloud_infer:
            shared.add(self.cloud_infer.split("/", 2)[2])
        assert self._fleet is not None
        assert self._link is not None
        # Nothing one message does may stop the daemon: size/depth limits, quarantine, a catch-all.
        bulkhead = self._bulkhead = Bulkhead(
            self._link,
            max_bytes=lambda: self.settings.inference.max_payload_bytes,
            max_elements=lambda: self.settings.inference.max_json_elements,
            state_dir=_writable_dir(self.settings.fleet.state_dir, "fleet"),
            on_quarantine=lambda m, n: self.emit_event("message_quarantined", "crashed_while_handling",
                                                       {"attempts": n, "bytes": len(m.payload)}),
            test_hooks=self._test_hooks,  # EDGE_TEST_HOOKS=1: payload markers simulate crashes
        )
        service.before_run = bulkhead.charge
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
                if event.topic == infer or event.topic in shared:
                    bulkhead.run(event, service.submit, service.refuse, charge=False)  # charged when it starts
                    self._update_fleet_share()
                elif event.topic == cancel:
                    bulkhead.run(event, service.cancel, service.refuse_cancel)
                else:
                    bulkhead.run(event, self._fleet.handle, self._fleet.refuse)
            elif event is not None and not isinstance(event, str):
                self._on_event(event)
            if now >= next_telemetry:
                next_telemetry = now + self.settings.telemetry.interval_s
                run_logged(self._tick, "telemetry_tick_failed")
                self._update_fleet_share()

    def _make_failover_link(self) -> MqttLink:
        """The device's own topics on the cloud broker, while the local broker is unreachable."""
        cloud = self.settings.cloud.mqtt(self.settings.device_id)
        return MqttLink(
            cloud,
            f"{cloud.client_id}-failover",
            self._events.put,
            will=(self._topics.status, self._status_payload("offline")),
            manual_ack=True,
            on_connect_publish=self._on_connect_publish,
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
        self.emit_event(transition, "local_broker_unreachable" if transition == "failover" else "local_broker_back",
                        numbers)
        self._notifier.status("serving through the cloud broker" if transition == "failover"
                              else f"serving on {self._topics.infer}")

    def _update_fleet_share(self) -> None:
        """Stay in the fleet's shared subscription only while we can take work, so the broker routes around us."""
        link, service = self._link, self._service
        if link is None or service is None:
            return
        want = not (self._draining or service.saturated or (self._adaptation is not None and self._adaptation.offload))
        if want != self._fleet_subscribed:
            self._fleet_subscribed = want
            if want:
                link.subscribe([(self.fleet_infer, 1)])
            else:
                link.unsubscribe([self.fleet_infer])
            log.info("fleet_share", subscribed=want)

    def _on_event(self, event: LinkEvent | Callable[[], None]) -> None:
        if isinstance(event, Connected | Disconnected):
            self._on_link_event(event)
        elif callable(event):
            run_logged(event, "main_loop_call_failed")  # a model change's outcome, handed back by its thread

    def _on_link_event(self, event: Connected | Disconnected) -> None:
        infer = self._topics.infer
        if isinstance(event, Disconnected):
            self._notifier.status(event.status_line)  # a TLS failure says which and how to fix it
            return
        link = self._link
        if self._buffer is not None and link is not None:
            # Telemetry and events kept on disk while offline go out first, in order, original timestamps.
            self._buffer.drain(lambda t, p: link.publish(t, p, qos=1), time.time())
        if not self._ready_sent:
            info = self.model.info
            self._notifier.ready(f"serving {info.name if info else '?'} on {infer}")
            self._ready_sent = True
        else:
            self._notifier.status(f"serving on {infer} (reconnected)")

    # -- model -------------------------------------------------------------------------------------

    def _resolve_model(self) -> tuple[Path, int]:
        """``[model] path`` as is; else the catalog entry ``[model] name``: probe → plan → pull (verified)."""
        model = self.settings.model
        if model.path is not None:
            self.model.chosen(str(model.path), None, None)
            return model.path, model.n_ctx
        if not model.name:
            raise ConfigError("set [model] path (a local GGUF file) or [model] name (a catalog entry)")
        self._set_state("starting", note=f"planning {model.name}")
        plan = self.model.make_plan(model.name, model.quant)
        chosen = plan.decision.require()
        log.info("model_chosen", model=model.name, quant=chosen.quant, file=chosen.file,
                 estimate_bytes=chosen.estimate_bytes, budget_bytes=plan.decision.budget_bytes,
                 explain=plan.decision.explain())
        self.model.last_plan = plan.as_dict()
        spec = f"{model.name}:{chosen.quant}"
        last = {"status": 0.0, "extend": 0.0, "started": time.monotonic(), "pulled": 0.0}

        def progress(done: int, total: int) -> None:
            # Called per received block from the pull: throttled to one status a second.
            now = time.monotonic()
            if not last["pulled"]:
                last["pulled"] = 1.0
                self.emit_event("pull_started", "first_start", {"bytes_total": total})
            if now - last["status"] < 1.0 and done < total:
                return
            last["status"] = now
            percent = round(100.0 * done / total, 1) if total else 0.0
            self._set_state("pulling", note=f"pulling {spec}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB "
                            f"({percent:.0f}%)", progress=PullProgress(bytes_done=done, bytes_total=total,
                                                                       percent=min(percent, 100.0)))
            if now - last["extend"] >= 5.0:
                # A first pull may take longer than TimeoutStartSec: tell systemd we are progressing.
                last["extend"] = now
                extend = getattr(self._notifier, "extend_timeout", None)
                if extend is not None:
                    extend(60.0)

        try:
            local = self.model.planner().ensure_present(plan, progress=progress)
        except AgentError as exc:
            self.emit_event("pull_failed", exc.code, {})
            raise
        if last["pulled"]:
            self.emit_event("pull_finished", "first_start", {
                "bytes": local.size, "seconds": round(time.monotonic() - last["started"], 1)})
        self.model.chosen(model.name, chosen.quant, chosen.estimate_bytes)
        return local.path, plan.n_ctx

    def _model_switched(self) -> None:
        """The model owner swapped the engine (on its swap thread): the retained status says so."""
        self._publish_status("draining" if self._draining else "online")

    @property
    def mode(self) -> Mode:
        """'offloading' also while queue overflow goes to the cloud, not only when the policy says so."""
        if self._overflowing:
            return "offloading"
        return self._adaptation.mode if self._adaptation else "local"

    def service_or_raise(self) -> InferenceService:
        if self._service is None:
            raise ConfigError("the daemon is not serving yet")
        return self._service

    # -- telemetry and live adaptation ---------------------------------------------------------------

    def _probe(self) -> DeviceSnapshot:
        hw = self.settings.hardware
        models_dir = self.settings.model.path.parent if self.settings.model.path else None
        return probe_device(hw.sys_root, hw.proc_root, models_dir)

    def conditions(self) -> Any:
        from agent.hardware.conditions import device_conditions  # noqa: PLC0415

        snap = self._probe()
        limits = self._limits or board_limits(snap, self.settings.adapt)
        return device_conditions(snap, soft_limit_c=limits.soft_c, hard_limit_c=limits.hard_c, cfg=self.settings.adapt)

    def _tick(self) -> None:
        snap = self._probe()
        self._snapshot = snap
        assert self._limits is not None
        assert self._adaptation is not None
        obs = observe(snap, self._limits, ts=time.monotonic(), model_estimate_bytes=self.model.serving.estimate_bytes)
        adapt = self.settings.adapt
        if self._cap_target() is None:
            # A fixed model file has no smaller quant: capping would only publish no-op downgrades and
            # then delay recovery by one hold per phantom rung.
            adapt = adapt.model_copy(update={"max_cap_steps": 0})
        self._adaptation.step(obs, adapt)
        self._send(self._topics.telemetry, build_telemetry(snap, self._runtime()).model_dump_json().encode(),
                   retain=True)

    def _cap_target(self) -> str | None:
        """The catalog model a quant cap re-plans; None when serving a fixed file."""
        model = self.settings.model
        return None if model.path is not None or not model.name else model.name

    def _report_adaptation(self, action: Action, mode_changed: bool) -> None:
        """An adaptation took effect (a swap or thread change only once the model owner said it is done)."""
        event = event_from_action(action, device_id=self.settings.device_id, ts=time.time())
        self._send(self._topics.events, event.model_dump_json().encode())
        log.info("adaptation", kind=event.kind, reason=event.reason, **{k: v for k, v in event.numbers.items()})
        if mode_changed:
            self._publish_status("draining" if self._draining else "online")

    def _runtime(self) -> RuntimeView:
        service = self.service_or_raise()
        counts = self._bulkhead.counters if self._bulkhead is not None else BulkheadCounters()
        return RuntimeView(
            model=self.model.info.name if self.model.info else None,
            quant=self.model.serving.quant,
            threads=service.engine.info.threads if service.engine.info else None,
            queue_depth=service.queue_depth,
            tokens_per_second=service.counters.last_tokens_per_second or None,
            requests_served=service.counters.served,
            requests_failed=service.counters.failed,
            requests_offloaded=self._offloaded,
            mode=self.mode,
            uptime_s=round(time.monotonic() - self._started_mono, 1),
            cpu_percent=self._cpu.sample(),
            messages_rejected=counts.rejected,
            messages_dropped=counts.dropped,
            messages_quarantined=counts.quarantined,
            limits=LimitCounts(payload_bytes=counts.payload_bytes, json_depth=counts.json_depth,
                               json_elements=counts.json_elements, **service.limits.as_dict()),
        )

    def _make_buffer(self) -> TelemetryBuffer | None:
        t = self.settings.telemetry
        directory = _writable_dir(t.buffer_dir, "telemetry")
        if directory is None:
            log.warning("telemetry_buffer_disabled", reason="no writable directory", wanted=str(t.buffer_dir))
            return None
        return TelemetryBuffer(directory, max_bytes=t.buffer_max_bytes, max_age_s=t.buffer_max_age_s)

    def _send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Telemetry and events: now when connected, else into the on-disk buffer (replayed in order)."""
        link = self._link
        if link is None:
            return
        if self._buffer is None:
            if link.connected:
                link.publish(topic, payload, qos=1, retain=retain)
            return
        self._buffer.send(topic, payload, time.time(), connected=link.connected,
                          publish=lambda t, p: link.publish(t, p, qos=1, retain=retain))

    def emit_event(self, kind: str, reason: str, numbers: dict[str, Any]) -> None:
        event = Event.model_validate(
            {"kind": kind, "reason": reason, "numbers": numbers, "ts": time.time(),
             "device_id": self.settings.device_id}
        )
        self._send(self._topics.events, event.model_dump_json().encode())

    # -- offload -----------------------------------------------------------------------------------

    def _route(self, request: InferRequest, reply: ReplyAddress, message: Incoming, request_id: str) -> bool:
        """Local first; True when the request went to the cloud or was refused here."""
        relay, service = self._relay, self.service_or_raise()
        if relay is None:
            return False
        waiting = service.queue_depth
        decision = should_offload(
            queue_depth=waiting,
            expected_wait_ms=expected_wait_ms(waiting, service.busy, service.counters.avg_request_ms),
            deadline_ms=request.deadline_ms,
            flags=OffloadFlags(
                policy_offload=bool(self._adaptation and self._adaptation.offload),
                model_available=True,
                overflowing=self._overflowing,
            ),
            cloud_up=relay.up,
            settings=self.settings.cloud,
        )
        if decision.overflowing != self._overflowing:
            self._overflowing = decision.overflowing
            self.emit_event("offload_on" if decision.overflowing else "offload_off", decision.reason,
                            {"queue_depth": waiting})
            self._publish_status("draining" if self._draining else "online")
        if decision.route == "local":
            return False
        link = self._link
        assert link is not None
        if decision.route == "reject":
            service.refuse_overloaded(message, reply, request_id, decision.retry_after_ms, decision.reason)
            return True

        def done(outcome: Any) -> None:
            # Called exactly once per forward(), also when the relay found the cloud unreachable and
            # answered 'overloaded' itself: the only place the caller's PUBLISH is acknowledged.
            link.ack(message)
            if outcome.result != "unreachable":
                self._offloaded += 1

        forwarded = relay.forward(message.payload, reply, request_id, link.publish, on_done=done)
        log.info("request_offloaded", id=request_id, reason=decision.reason, forwarded=forwarded)
        return True

    # -- fleet control hooks -----------------------------------------------------------------------

    def set_draining(self, draining: bool) -> None:
        self._draining = draining
        service, link = self.service_or_raise(), self._link
        service.draining = draining
        if link is not None:
            # A draining device leaves the fleet's shared subscription, so the broker routes to others.
            self._update_fleet_share()
        self._publish_status("draining" if draining else "online")

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
        info = service.engine.info
        return {
            "state": "draining" if self._draining else "online",
            "device_id": self.settings.device_id,
            "groups": list(self.settings.groups),
            "role": self.settings.role,
            "version": __version__,
            "model": info.name if info else None,
            "model_key": self.model.serving.key,
            "quant": self.model.serving.quant,
            "n_ctx": info.n_ctx if info else None,
            "threads": info.threads if info else None,
            "estimate_bytes": self.model.serving.estimate_bytes,
            "mode": self.mode,
            "queue_depth": service.queue_depth,
            "busy": service.busy,
            "requests_served": service.counters.served,
            "requests_failed": service.counters.failed,
            "requests_offloaded": self._offloaded,
            "uptime_s": round(time.monotonic() - self._started_mono, 1),
            "plan": self.model.last_plan,
        }

    # -- status ------------------------------------------------------------------------------------

    def _on_connect_publish(self) -> None:
        link = self._link
        if link is None:
            return
        link.publish(self._topics.status, self._status_payload(self._serving_state()), qos=1, retain=True)
        if self.settings.telemetry.ha_discovery:
            snap = self._snapshot
            for topic, payload in discovery_messages(
                self._topics,
                ha_prefix=self.settings.telemetry.ha_prefix,
                interval_s=self.settings.telemetry.interval_s,
                has_battery=bool(snap and snap.power.batteries),
                board=snap.board if snap else None,
                version=__version__,
            ):
                link.publish(topic, payload, qos=1, retain=True)

    def _serving_state(self) -> str:
        if self._state == "online":
            return "draining" if self._draining else "online"
        return self._state

    def _publish_status(self, state: str) -> None:
        link = self._link
        # Not queued while disconnected: the on-connect publish sends the state current by then.
        if link is not None and link.connected:
            link.publish(self._topics.status, self._status_payload(state), qos=1, retain=True)

    def _status_payload(self, state: str, *, detail: str | None = None) -> bytes:
        model = self.model.info
        status = Status(
            state=state,  # type: ignore[arg-type]
            device_id=self.settings.device_id,
            role=self.settings.role,
            groups=list(self.settings.groups),
            version=__version__,
            model=model.name if model else None,
            quant=self.model.serving.quant,
            mode=self.mode,
            n_ctx=model.n_ctx if model else None,
            threads=model.threads if model else None,
            since=round(time.time(), 3),
            progress=self._progress if state == "pulling" else None,
            detail=detail,
            commands=self._fleet.policy if self._fleet is not None else None,
        )
        return json.dumps(status.model_dump(exclude_none=True)).encode()
