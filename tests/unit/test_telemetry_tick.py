"""The telemetry tick (agent.services.telemetry_tick) in process: probe → adaptation step → retained telemetry.

The probe reads a fixture tree; the adaptation state, the service, the router and the status service are
stand-ins recording what the tick asked of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from agent.adapt.policy import Observation
from agent.adapt.settings import AdaptSettings, board_limits
from agent.engine.llama import LoadedModel
from agent.hardware.snapshot import DeviceSnapshot
from agent.services.bulkhead import BulkheadCounters
from agent.services.model import ServingModel
from agent.services.request_limits import LimitCounters
from agent.services.telemetry_tick import TelemetryTick, catalog_target
from agent.settings import Settings
from agent.transport.topics import DeviceTopics
from tests.support.hardware import probe_case

INFO = LoadedModel(path=Path("m.gguf"), name="tiny", n_ctx=512, threads=2, has_chat_template=True, load_s=0.1)


@dataclass
class FakeAdaptation:
    steps: list[tuple[Observation, AdaptSettings]] = field(default_factory=list)

    def step(self, obs: Observation, cfg: AdaptSettings) -> None:
        self.steps.append((obs, cfg))


@dataclass
class FakeModel:
    info: LoadedModel | None = INFO
    serving: ServingModel = field(default_factory=lambda: ServingModel(key="tiny", quant="Q8_0",
                                                                       estimate_bytes=100, info=INFO))


@dataclass
class FakeCounters:
    served: int = 7
    failed: int = 1
    last_tokens_per_second: float = 12.5


@dataclass
class FakeEngine:
    info: LoadedModel | None = INFO


@dataclass
class FakeService:
    engine: FakeEngine = field(default_factory=FakeEngine)
    queue_depth: int = 3
    slots: int = 4
    running: int = 2
    counters: FakeCounters = field(default_factory=FakeCounters)
    limits: LimitCounters = field(default_factory=LimitCounters)


@dataclass
class FakeRouter:
    counters: BulkheadCounters = field(default_factory=lambda: BulkheadCounters(rejected=2, payload_bytes=2))
    offloaded: int = 4
    mode: str = "offloading"


@dataclass
class FakeStatus:
    topics: DeviceTopics = field(default_factory=lambda: DeviceTopics("edge", "dev1"))
    snapshot: DeviceSnapshot | None = None
    sent: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.sent.append((topic, payload, retain))

    def uptime_s(self) -> float:
        return 42.0


def make(settings: Settings) -> tuple[TelemetryTick, FakeAdaptation, FakeStatus]:
    snapshot = probe_case("pi4-2gb")
    adaptation, status = FakeAdaptation(), FakeStatus()
    tick = TelemetryTick(
        settings=lambda: settings, probe=lambda: snapshot, cpu_percent=lambda: 55.0,
        limits=board_limits(snapshot, settings.adapt), adaptation=adaptation,  # type: ignore[arg-type]
        model=FakeModel(), service=FakeService(), router=FakeRouter(), status=status,  # type: ignore[arg-type]
    )
    return tick, adaptation, status


def test_a_tick_publishes_retained_telemetry_with_the_runtime_numbers() -> None:
    """One tick: the retained telemetry carries the probe, the service's, the router's and the model's numbers."""
    tick, _, status = make(Settings(device_id="dev1", model={"name": "tiny"}))
    tick()
    [(topic, payload, retain)] = status.sent
    body = json.loads(payload)
    assert (topic, retain) == ("edge/dev1/telemetry", True)
    assert (body["model"], body["quant"], body["threads"], body["queue_depth"]) == ("tiny", "Q8_0", 2, 3)
    assert (body["requests_served"], body["requests_failed"], body["requests_offloaded"]) == (7, 1, 4)
    assert (body["mode"], body["uptime_s"], body["cpu_percent"]) == ("offloading", 42.0, 55.0)
    assert (body["messages_rejected"], body["limits"]["payload_bytes"]) == (2, 2)
    assert status.snapshot is not None  # kept for HA discovery


def test_a_tick_steps_the_adaptation_policy_with_the_configured_settings() -> None:
    """A catalog model: the policy decides with [adapt] as configured, on the model's estimate."""
    settings = Settings(device_id="dev1", model={"name": "tiny"})
    tick, adaptation, _ = make(settings)
    tick()
    [(obs, cfg)] = adaptation.steps
    assert cfg == settings.adapt
    assert obs.temperature_c is not None


def test_a_fixed_model_file_is_never_capped() -> None:
    """Serving a fixed file: the policy gets max_cap_steps 0 (there is no smaller quant to swap to)."""
    settings = Settings(device_id="dev1", model={"path": "/models/m.gguf"})
    tick, adaptation, _ = make(settings)
    tick()
    assert adaptation.steps[0][1].max_cap_steps == 0
    assert catalog_target(settings) is None
    assert catalog_target(Settings(device_id="dev1", model={"name": "tiny"})) == "tiny"
