"""The telemetry tick: once per ``[telemetry] interval_s``, probe the device, let the adaptation policy
decide, and publish the retained telemetry (main loop only).

The probe and the CPU sampler are handed in (the daemon passes :func:`agent.hardware.probe.probe_device`
under its configured roots), so this module reads no file itself; the payload is built by the pure
:func:`agent.services.telemetry.build_telemetry`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.adapt.policy import observe
from agent.services.telemetry import RuntimeView, build_telemetry
from agent.transport.telemetry import LimitCounts

if TYPE_CHECKING:
    from agent.adapt.settings import ThermalLimits
    from agent.hardware.snapshot import DeviceSnapshot
    from agent.services.adaptation import Adaptation
    from agent.services.inference import InferenceService
    from agent.services.model import ModelOwner
    from agent.services.router import Router
    from agent.services.status import StatusService
    from agent.settings import Settings


class TelemetryTick:
    """One call per interval: probe → adaptation step → telemetry (through the status service's buffered send)."""

    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        probe: Callable[[], DeviceSnapshot],
        cpu_percent: Callable[[], float | None],
        limits: ThermalLimits,
        adaptation: Adaptation,
        model: ModelOwner,
        service: InferenceService,
        router: Router,
        status: StatusService,
    ) -> None:
        self._settings = settings
        self._probe = probe
        self._cpu_percent = cpu_percent
        self._limits = limits
        self._adaptation = adaptation
        self._model = model
        self._service = service
        self._router = router
        self._status = status

    def __call__(self) -> None:
        snap = self._probe()
        self._status.snapshot = snap
        obs = observe(snap, self._limits, ts=time.monotonic(), model_estimate_bytes=self._model.serving.estimate_bytes)
        settings = self._settings()
        adapt = settings.adapt
        if catalog_target(settings) is None:
            # A fixed model file has no smaller quant: capping would only publish no-op downgrades and
            # then delay recovery by one hold per phantom rung.
            adapt = adapt.model_copy(update={"max_cap_steps": 0})
        self._adaptation.step(obs, adapt)
        topic = self._status.topics.telemetry
        self._status.send(topic, build_telemetry(snap, self.runtime()).model_dump_json().encode(), retain=True)

    def runtime(self) -> RuntimeView:
        """The daemon's own numbers for this tick."""
        service, counts = self._service, self._router.counters
        return RuntimeView(
            model=self._model.info.name if self._model.info else None,
            quant=self._model.serving.quant,
            threads=service.engine.info.threads if service.engine.info else None,
            queue_depth=service.queue_depth,
            slots=service.slots if service.engine.info else None,
            slots_busy=service.running,
            tokens_per_second=service.counters.last_tokens_per_second or None,
            requests_served=service.counters.served,
            requests_failed=service.counters.failed,
            requests_offloaded=self._router.offloaded,
            mode=self._router.mode,
            uptime_s=self._status.uptime_s(),
            cpu_percent=self._cpu_percent(),
            messages_rejected=counts.rejected,
            messages_dropped=counts.dropped,
            messages_quarantined=counts.quarantined,
            limits=LimitCounts(payload_bytes=counts.payload_bytes, json_depth=counts.json_depth,
                               json_elements=counts.json_elements, **service.limits.as_dict()),
        )


def catalog_target(settings: Settings) -> str | None:
    """The catalog model a quant cap re-plans; None when serving a fixed file."""
    model = settings.model
    return None if model.path is not None or not model.name else model.name
