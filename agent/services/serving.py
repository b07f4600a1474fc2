"""What serves once the model is loaded, wired together: the inference service, the adaptation state, the cloud
relay, the bulkhead, the router and the telemetry tick. The daemon builds it once, starts it, and runs its
lifecycle around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config.generation import effective_defaults
from agent.hardware.probe import CpuPercentSampler
from agent.services.adaptation import Adaptation
from agent.services.bulkhead import Bulkhead
from agent.services.inference import InferenceService
from agent.services.offload import CloudRelay
from agent.services.router import Commands, Router
from agent.services.telemetry_tick import TelemetryTick, catalog_target

if TYPE_CHECKING:
    from agent.engine.llama import LoadedModel
    from agent.services.device import DeviceReader
    from agent.services.model import ModelOwner
    from agent.services.status import StatusService
    from agent.settings import Settings
    from agent.transport.failover import FailoverLink
    from agent.transport.topics import DeviceTopics


@dataclass(frozen=True, slots=True)
class Serving:
    """The serving services of one daemon run."""

    service: InferenceService
    router: Router
    tick: TelemetryTick
    relay: CloudRelay | None

    def start(self) -> None:
        """Join the fleet share, start the inference worker and the relay."""
        self.router.join()
        self.service.start()
        if self.relay is not None:
            self.relay.start()


def build_serving(
    *,
    settings: Callable[[], Settings],
    model: LoadedModel,
    owner: ModelOwner,
    link: FailoverLink,
    topics: DeviceTopics,
    commands: Commands,
    status: StatusService,
    device: DeviceReader,
    post: Callable[[Callable[[], None]], None],
    state_dir: Path | None,
    test_hooks: bool,
) -> Serving:
    """Wire the serving services over the loaded ``model`` (not started). ``post`` runs a callable on the main
    loop; ``state_dir`` keeps the bulkhead's quarantine (None: in memory only)."""
    cfg = settings()
    assert device.limits is not None  # set by the daemon's first probe
    adaptation = Adaptation(model.threads, owner, catalog_name=lambda: catalog_target(settings()),
                            report=status.report_adaptation, post=post)
    service = InferenceService(owner.engine, link, cfg.inference, cfg.device_id, model.name)  # type: ignore[arg-type]
    owner.attach(service)
    # Read per request: a config-set of [generation] and a swap to a model with other defaults apply at once.
    service.generation_defaults = lambda: effective_defaults(settings().generation, owner.serving.defaults)
    service.served_by = "cloud" if cfg.role == "cloud" else cfg.device_id
    relay = None
    if cfg.cloud.enabled and cfg.role == "edge":
        relay = CloudRelay(cfg.cloud, prefix=topics.prefix, device_id=cfg.device_id,
                           on_tls_failed=lambda f: status.emit_event("cloud_tls_failed", f.reason, {}))
    # Nothing one message does may stop the daemon: size/depth limits, quarantine, a catch-all.
    bulkhead = Bulkhead(
        link,
        max_bytes=lambda: settings().inference.max_payload_bytes,
        max_elements=lambda: settings().inference.max_json_elements,
        state_dir=state_dir,
        on_quarantine=lambda m, n: status.emit_event("message_quarantined", "crashed_while_handling",
                                                     {"attempts": n, "bytes": len(m.payload)}),
        test_hooks=test_hooks,  # EDGE_TEST_HOOKS=1: payload markers simulate crashes
    )
    router = Router(
        topics=topics, link=link, service=service, commands=commands, bulkhead=bulkhead,
        policy=adaptation, cloud=cfg.cloud, relay=relay,
        cloud_infer=cfg.cloud.shared_infer_topic(topics.prefix) if cfg.role == "cloud" else None,
        emit=status.emit_event, on_mode_change=status.publish,
    )
    tick = TelemetryTick(
        settings=settings, probe=device.probe,
        cpu_percent=CpuPercentSampler(cfg.hardware.proc_root).sample, limits=device.limits,
        adaptation=adaptation, model=owner, service=service, router=router, status=status,
    )
    return Serving(service=service, router=router, tick=tick, relay=relay)
