"""The daemon's lifecycle in one place: signals → startup → main loop → graceful shutdown.

The main thread owns every decision; paho's thread only enqueues events and the inference worker
only generates. A first SIGTERM/SIGINT starts a graceful shutdown (finish the running generation
within the grace period, answer queued requests 'cancelled', publish 'offline'); a second one exits
at once.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Protocol

import structlog

from agent import __version__
from agent.engine.llama import LlamaEngine, LoadedModel
from agent.errors import ConfigError
from agent.services.inference import InferenceService
from agent.settings import Settings
from agent.transport.mqtt import Connected, Disconnected, Incoming, LinkEvent, MqttLink
from agent.transport.topics import DeviceTopics
from agent.transport.wire import Status

log = structlog.get_logger("agent.daemon")

TICK_S = 1.0


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


class Daemon:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self._settings = settings
        self._notifier: Notifier = notifier or _NoNotifier()
        self._topics = DeviceTopics(settings.mqtt.topic_prefix, settings.device_id)
        self._events: queue.SimpleQueue[LinkEvent | str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._signals = 0
        self._started = time.time()
        self._ready_sent = False
        self._model: LoadedModel | None = None
        self._hang = False
        self._quant: str | None = None

    # -- signals -----------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Second signal: the operator wants out now.
            os._exit(1)
        self._stop.set()
        self._events.put("stop")

    def install_signal_handlers(self, *, test_hooks: bool = False) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if test_hooks:
            # EDGE_TEST_HOOKS=1 only: SIGUSR2 wedges the main loop, so tests can watch the
            # systemd watchdog pings stop (a hung loop must get the service restarted).
            signal.signal(signal.SIGUSR2, self._on_hang_signal)

    def _on_hang_signal(self, signum: int, frame: FrameType | None) -> None:
        self._hang = True

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a signal, shut down cleanly; returns the process exit code."""
        settings = self._settings
        model_path, n_ctx = self._resolve_model()
        self._notifier.status("loading model")
        engine = LlamaEngine(
            model_path,
            n_ctx=n_ctx,
            threads=settings.model.threads,
            n_batch=settings.model.n_batch,
            chat_template=settings.model.chat_template,
            seed=settings.model.seed,
        )
        self._model = engine.load()
        link = MqttLink(
            settings.mqtt,
            settings.mqtt.client_id or f"edge-agent-{settings.device_id}",
            self._events.put,
            will=(self._topics.status, self._status_payload("offline")),
            manual_ack=True,
            persistent_session=True,
            on_connect_publish=lambda: link.publish(
                self._topics.status, self._status_payload("online"), qos=1, retain=True
            ),
        )
        service = InferenceService(engine, link, settings.inference, settings.device_id, self._model.name)
        link.subscribe([(self._topics.infer, 1), (self._topics.infer_cancel, 1)])
        service.start()
        self._notifier.status(f"connecting to {settings.mqtt.host}:{settings.mqtt.port}")
        link.start()
        log.info(
            "agent_started",
            device_id=settings.device_id,
            version=__version__,
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
            infer_topic=self._topics.infer,
        )
        try:
            self._main_loop(service)
        finally:
            self._notifier.stopping("shutting down")
            log.info("agent_stopping", grace_s=settings.inference.shutdown_grace_s)
            service.shutdown(settings.inference.shutdown_grace_s)
            link.stop(final=(self._topics.status, self._status_payload("offline")))
            engine.close()
            log.info("agent_stopped", served=service.counters.served, failed=service.counters.failed)
        return 0

    def _resolve_model(self) -> tuple[Path, int]:
        """``[model] path`` as is; else the catalog entry ``[model] name``: probe → plan → pull (verified)."""
        model = self._settings.model
        if model.path is not None:
            return model.path, model.n_ctx
        if not model.name:
            raise ConfigError("set [model] path (a local GGUF file) or [model] name (a catalog entry)")
        from agent.adapt.settings import board_limits  # noqa: PLC0415 - only for catalog models
        from agent.catalog.planner import DeviceConditions, planner_from_settings  # noqa: PLC0415
        from agent.hardware.probe import probe_device  # noqa: PLC0415

        hw = self._settings.hardware
        snap = probe_device(hw.sys_root, hw.proc_root, None)
        limits = board_limits(snap, self._settings.adapt)
        conditions = DeviceConditions.from_snapshot(snap, soft_limit_c=limits.soft_c, hard_limit_c=limits.hard_c)
        planner = planner_from_settings(self._settings, os.environ)
        self._notifier.status(f"planning {model.name}")
        plan = planner.plan(
            model.name,
            conditions,
            n_ctx=model.n_ctx if "n_ctx" in model.model_fields_set else None,
            n_batch=model.n_batch,
            quant=model.quant,
        )
        chosen = plan.decision.require()
        log.info("model_chosen", model=model.name, quant=chosen.quant, file=chosen.file,
                 estimate_bytes=chosen.estimate_bytes, budget_bytes=plan.decision.budget_bytes,
                 explain=plan.decision.explain())
        self._notifier.status(f"pulling {model.name}:{chosen.quant}")
        last = [0.0]

        def progress(done: int, total: int) -> None:
            # A first pull may take longer than TimeoutStartSec: tell systemd we are progressing.
            now = time.monotonic()
            if now - last[0] >= 5.0:
                last[0] = now
                self._notifier.status(f"pulling {model.name}:{chosen.quant} {100 * done // max(total, 1)}%")
                extend = getattr(self._notifier, "extend_timeout", None)
                if extend is not None:
                    extend(60.0)

        local = planner.ensure_present(plan, progress=progress)
        self._quant = chosen.quant
        return local.path, plan.n_ctx

    def _main_loop(self, service: InferenceService) -> None:
        interval = self._notifier.watchdog_interval_s()
        tick = min(TICK_S, interval) if interval else TICK_S
        last_ping = 0.0
        infer, cancel = self._topics.infer, self._topics.infer_cancel
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=tick)
            except queue.Empty:
                event = None
            while self._hang and not self._stop.is_set():
                time.sleep(0.1)
            now = time.monotonic()
            if interval and now - last_ping >= interval:
                # From the main loop on purpose: if this loop wedges, systemd restarts us.
                self._notifier.watchdog()
                last_ping = now
            if isinstance(event, Incoming):
                if event.topic == infer:
                    service.submit(event)
                elif event.topic == cancel:
                    service.cancel(event)
            elif isinstance(event, Connected):
                if not self._ready_sent:
                    self._notifier.ready(f"serving {self._model.name if self._model else '?'} on {infer}")
                    self._ready_sent = True
                else:
                    self._notifier.status(f"serving on {infer} (reconnected)")
            elif isinstance(event, Disconnected):
                self._notifier.status("broker unreachable; reconnecting")

    def _status_payload(self, state: str) -> bytes:
        model = self._model
        status = Status(
            state=state,  # type: ignore[arg-type]
            device_id=self._settings.device_id,
            version=__version__,
            role=self._settings.role,
            groups=list(self._settings.groups),
            model=model.name if model else None,
            quant=self._quant,
            n_ctx=model.n_ctx if model else None,
            threads=model.threads if model else None,
            since=round(time.time(), 3),
        )
        return json.dumps(status.model_dump(exclude_none=True)).encode()
