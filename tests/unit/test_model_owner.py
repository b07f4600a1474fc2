"""The model owner (agent.services.model) and the adaptation state on top of it, in process.

A fake engine factory counts the engines that are loaded at each instant; a fake planner hands out
plans and can hold a pull open, so requests from the adaptation policy and from fleet commands can be
made to overlap. The inference service is the real one (its worker runs every switch).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.adapt.policy import Action, CapQuant, Observation, SetThreads
from agent.adapt.settings import AdaptSettings
from agent.catalog.fit import Budget, Candidate, FitDecision, make_budget
from agent.control import DaemonControl
from agent.engine.llama import LoadedModel
from agent.errors import CancelledError, ModelUnavailableError
from agent.hardware.conditions import Conditions, Memory, make_conditions
from agent.services.adaptation import Adaptation
from agent.services.inference import InferenceService
from agent.services.model import ModelOwner
from agent.settings import InferenceSettings, ModelSettings

MiB = 2**20
LADDER = ("F16", "Q8_0", "Q4_0")  # the fit decision's rungs: extra_cap_steps moves down this list
ESTIMATE = {"F16": 400 * MiB, "Q8_0": 220 * MiB, "Q4_0": 130 * MiB}
TIMEOUT = 10.0


# -- fakes -----------------------------------------------------------------------------------------


class Engines:
    """The fake engine factory: every engine it built, and the most that were ever loaded at once."""

    def __init__(self) -> None:
        self.built: list[FakeEngine] = []
        self.live = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.fail_load: set[str] = set()  # file stems whose load raises
        self.load_delay_s = 0.0

    def __call__(self, path: Path, *, n_ctx: int, threads: int, n_batch: int, chat_template: str | None,
                 seed: int, parallel: int = 1, use_mmap: bool | None = None, kv_type: str = "f16",
                 prefill_chunk: int = 128) -> FakeEngine:
        engine = FakeEngine(self, path, n_ctx, threads or 4)
        self.built.append(engine)
        return engine

    def loaded(self) -> list[FakeEngine]:
        return [e for e in self.built if e.loaded]


@dataclass(eq=False)
class FakeEngine:
    factory: Engines
    path: Path
    n_ctx: int
    threads: int
    loaded: bool = False
    info: LoadedModel | None = None
    fail_threads: bool = False

    def load(self) -> LoadedModel:
        time.sleep(self.factory.load_delay_s)
        if self.path.stem in self.factory.fail_load:
            raise ModelUnavailableError(f"llama.cpp could not load {self.path}")
        with self.factory.lock:
            self.factory.live += 1
            self.factory.peak = max(self.factory.peak, self.factory.live)
        self.loaded = True
        self.info = LoadedModel(path=self.path, name=self.path.stem, n_ctx=self.n_ctx, threads=self.threads,
                                has_chat_template=True, load_s=0.0)
        return self.info

    def set_threads(self, threads: int) -> None:
        if self.fail_threads:
            raise RuntimeError("llama.cpp refused the thread count")
        self.threads = threads
        assert self.info is not None
        self.info = LoadedModel(path=self.path, name=self.info.name, n_ctx=self.n_ctx, threads=threads,
                                has_chat_template=True, load_s=0.0)

    def close(self) -> None:
        if self.loaded:
            with self.factory.lock:
                self.factory.live -= 1
        self.loaded = False


@dataclass
class FakePlan:
    model: str
    n_ctx: int
    decision: FitDecision
    entry: Any = field(default_factory=lambda: SimpleNamespace(defaults=None))  # only its defaults are read
    parallel: int = 1

    def as_dict(self) -> dict[str, object]:
        chosen = self.decision.chosen
        return {"model": self.model, "quant": chosen.quant if chosen else None}


@dataclass
class Pulled:
    path: Path
    size: int


@dataclass
class FakePlanner:
    """Plans the ladder rung ``extra_cap_steps`` down (or the pinned quant); ``gate`` holds pulls open."""

    gate: threading.Event = field(default_factory=threading.Event)
    pulls_running: int = 0
    pulls_peak: int = 0
    pulled: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gate.set()

    def plan(self, name: str, conditions: Conditions, *, n_ctx: int | None, n_batch: int, quant: str | None,
             extra_cap_steps: int) -> FakePlan:
        tag = quant or LADDER[min(extra_cap_steps, len(LADDER) - 1)]
        candidate = Candidate(model=name, quant=tag, estimate_bytes=ESTIMATE[tag], file=f"{tag}.gguf")
        budget: Budget = make_budget(conditions.memory.available_bytes)
        return FakePlan(name, n_ctx or 2048, FitDecision(chosen=candidate, budget=budget, verdicts=()))

    def ensure_present(self, plan: FakePlan) -> Pulled:
        self.pulls_running += 1
        self.pulls_peak = max(self.pulls_peak, self.pulls_running)
        try:
            assert self.gate.wait(TIMEOUT)
            chosen = plan.decision.require()
            self.pulled.append(chosen.quant)
            return Pulled(Path(f"/models/{chosen.quant}.gguf"), chosen.estimate_bytes)
        finally:
            self.pulls_running -= 1


class FakeLink:
    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def ack(self, message: object) -> None:
        return None


@dataclass
class Harness:
    owner: ModelOwner
    engines: Engines
    planner: FakePlanner
    service: InferenceService
    events: list[tuple[str, str]]
    memory: dict[str, int]  # "available": what the next probe reports beside the loaded model

    def request(self, quant: str | None = None, *, steps: int = 0) -> Future[dict[str, Any]]:
        return self.owner.request_switch("tiny", quant, extra_cap_steps=steps)

    def serving(self) -> tuple[str | None, str | None]:
        info = self.owner.info
        return (info.name if info else None), self.owner.serving.quant


@pytest.fixture
def harness() -> Iterator[Harness]:
    engines, planner, events = Engines(), FakePlanner(), []
    memory = {"available": 8 * 1024 * MiB}
    owner = ModelOwner(
        ModelSettings(name="tiny"),
        planner=lambda: planner,  # type: ignore[arg-type,return-value]
        conditions=lambda: make_conditions(
            temperature_c=None, flags=frozenset(), battery=None, memory=Memory(available_bytes=memory["available"]),
            soft_limit_c=80.0, hard_limit_c=85.0, cfg=AdaptSettings(),
        ),
        emit=lambda kind, reason, numbers: events.append((kind, reason)),
        engine_factory=engines,
    )
    owner.chosen("tiny", "F16", ESTIMATE["F16"])
    owner.load_first(Path("/models/F16.gguf"), 2048)
    service = InferenceService(owner.engine, FakeLink(), InferenceSettings(), "dev1", "F16")  # type: ignore[arg-type]
    owner.attach(service)
    service.start()
    yield Harness(owner, engines, planner, service, events, memory)
    planner.gate.set()
    owner.close()
    service.shutdown(1.0)


def outcome(future: Future[Any]) -> Any:
    """The result, or the exception, of a future within the test timeout."""
    try:
        return future.result(TIMEOUT)
    except Exception as exc:  # the outcome under test
        return exc


# -- the model owner -------------------------------------------------------------------------------


def test_concurrent_requests_from_adaptation_and_fleet_swap_one_at_a_time(harness: Harness) -> None:
    """Adaptation and fleet requests arriving together swap one at a time, never two new models beside the old."""
    h = harness
    h.planner.gate.clear()  # hold the first pull open while the others arrive
    h.engines.load_delay_s = 0.05
    first = h.request(steps=1)  # the policy: cap one rung (Q8_0)
    deadline = time.monotonic() + TIMEOUT
    while h.planner.pulls_running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    results: dict[str, Future[dict[str, Any]]] = {}
    threads = [
        threading.Thread(target=lambda: results.__setitem__("fleet", h.request("Q4_0"))),
        threading.Thread(target=lambda: results.__setitem__("reload", h.request("F16"))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h.planner.gate.set()
    told = {"adapt": outcome(first), **{k: outcome(f) for k, f in results.items()}}
    assert told["adapt"]["quant"] == "Q8_0" and told["adapt"]["changed"] is True
    # Of the two that waited behind it, the older was superseded and told so; the newer ran.
    ran, superseded = sorted(results, key=lambda k: isinstance(told[k], CancelledError))
    assert isinstance(told[superseded], CancelledError), told
    assert "superseded" in str(told[superseded])
    assert told[ran]["changed"] is True
    assert h.planner.pulls_peak == 1
    assert h.engines.peak <= 2, "a second new model was loaded beside the old one"
    assert len(h.engines.loaded()) == 1
    assert h.serving() == (told[ran]["quant"], told[ran]["quant"])
    assert [k for k, _ in h.events].count("swap_finished") == 2


def test_racing_set_model_commands_never_stack_models(harness: Harness) -> None:
    """Many fleet threads asking at once: each is told an outcome, at most one new model is ever beside the old."""
    h = harness
    control = DaemonControl(h.owner, lifecycle=None)  # type: ignore[arg-type]  # model commands only
    h.engines.load_delay_s = 0.02
    told: list[object] = []
    lock = threading.Lock()

    def ask(quant: str) -> None:
        try:
            result: object = control.set_model("tiny", quant)
        except CancelledError as exc:
            result = exc
        with lock:
            told.append(result)

    threads = [threading.Thread(target=ask, args=(LADDER[i % 3],)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len(told) == 9
    assert h.engines.peak <= 2
    assert len(h.engines.loaded()) == 1
    assert h.planner.pulls_peak == 1


def test_no_room_beside_the_old_model_closes_it_first(harness: Harness) -> None:
    """When the fresh probe after the pull leaves no room for both, the old model is closed before the new loads."""
    h = harness
    h.memory["available"] = 8 * 1024 * MiB  # the plan sees room ...
    original = h.planner.ensure_present

    def pull_then_memory_shrinks(plan: FakePlan) -> Pulled:
        pulled = original(plan)
        h.memory["available"] = ESTIMATE["Q8_0"]  # ... but by the time the pull is done, it is gone
        return pulled

    h.planner.ensure_present = pull_then_memory_shrinks  # type: ignore[method-assign]
    result = h.request("Q8_0").result(TIMEOUT)
    assert result["side_by_side"] is False
    assert h.engines.peak == 1
    assert h.serving() == ("Q8_0", "Q8_0")


def test_a_failed_swap_keeps_serving_the_old_model_and_says_why(harness: Harness) -> None:
    """A new model llama.cpp refuses: the requester gets the error, the old model serves, nothing else stays loaded."""
    h = harness
    h.engines.fail_load.add("Q4_0")
    failed = outcome(h.request("Q4_0"))
    assert isinstance(failed, ModelUnavailableError)
    assert h.serving() == ("F16", "F16")
    assert [e.path.stem for e in h.engines.loaded()] == ["F16"]
    assert ("swap_failed", "ModelUnavailableError") in h.events


def test_the_same_choice_again_changes_nothing(harness: Harness) -> None:
    """A request whose plan picks what already serves is answered unchanged, without pulling."""
    h = harness
    assert h.request().result(TIMEOUT) == {"model": "tiny", "quant": "F16", "changed": False}
    assert h.planner.pulled == []


def test_threads_changed_while_a_model_loads_apply_to_the_new_one(harness: Harness) -> None:
    """A thread change that lands during a swap is carried over to the new engine."""
    h = harness
    h.planner.gate.clear()
    swap = h.request("Q8_0")
    h.owner.set_threads(2).result(TIMEOUT)
    h.planner.gate.set()
    swap.result(TIMEOUT)
    info = h.owner.info
    assert info is not None and (info.name, info.threads) == ("Q8_0", 2)


# -- the adaptation state on top of it ---------------------------------------------------------------


CFG = AdaptSettings(down_dwell_s=0.0)


def memory_tight(ts: float) -> Observation:
    """Memory pressure: the policy caps the quant at once (threads free no memory)."""
    return Observation(ts=ts, temperature_c=50.0, soft_limit_c=80.0, hard_limit_c=85.0,
                       memory_budget_bytes=ESTIMATE["F16"] // 2, model_estimate_bytes=ESTIMATE["F16"])


def hot(ts: float) -> Observation:
    """Near the soft limit: the policy takes threads away first."""
    return Observation(ts=ts, temperature_c=78.0, soft_limit_c=80.0, hard_limit_c=85.0)


@dataclass
class Policy:
    adaptation: Adaptation
    reported: list[tuple[Action, bool]]
    posted: list[Any]

    def run_posted(self) -> None:
        """What the daemon's main loop does with the callables other threads hand it."""
        while self.posted:
            self.posted.pop(0)()

    def settle(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.adaptation.changing is not None and time.monotonic() < deadline:
            self.run_posted()
            time.sleep(0.01)
        assert self.adaptation.changing is None


@pytest.fixture
def policy(harness: Harness) -> Policy:
    reported: list[tuple[Action, bool]] = []
    posted: list[Any] = []
    adaptation = Adaptation(4, harness.owner, catalog_name=lambda: "tiny",
                            report=lambda a, changed: reported.append((a, changed)), post=posted.append)
    return Policy(adaptation, reported, posted)


def test_a_cap_advances_only_once_the_swap_is_done(harness: Harness, policy: Policy) -> None:
    """While the capped quant is pulled and loaded, the policy still reports the uncapped level; then it advances."""
    harness.planner.gate.clear()
    policy.adaptation.step(memory_tight(0.0), CFG)
    assert isinstance(policy.adaptation.changing, CapQuant)
    assert (policy.adaptation.state.level.cap_steps, policy.adaptation.mode) == (0, "local")
    assert policy.reported == []
    harness.planner.gate.set()
    policy.settle()
    assert (policy.adaptation.state.level.cap_steps, policy.adaptation.mode) == (1, "degraded")
    assert [(type(a), changed) for a, changed in policy.reported] == [(CapQuant, True)]
    assert harness.serving() == ("Q8_0", "Q8_0")


def test_a_failed_swap_leaves_policy_and_telemetry_telling_the_truth(harness: Harness, policy: Policy) -> None:
    """The capped quant fails to load: no 'degraded', no downgrade event, and the quant reported is the one served."""
    harness.engines.fail_load.add("Q8_0")
    policy.adaptation.step(memory_tight(0.0), CFG)
    policy.settle()
    assert policy.adaptation.state.level.cap_steps == 0
    assert policy.adaptation.mode == "local"
    assert policy.reported == []
    # What the daemon's telemetry reads: the owner's quant and the live engine's name.
    assert harness.serving() == ("F16", "F16")
    # The next decision asks again from the real level, rather than believing it is already capped.
    harness.engines.fail_load.clear()
    policy.adaptation.step(memory_tight(1.0), CFG)
    policy.settle()
    assert policy.adaptation.state.level.cap_steps == 1
    assert harness.serving() == ("Q8_0", "Q8_0")


def test_a_cap_superseded_by_a_fleet_command_does_not_count(harness: Harness, policy: Policy) -> None:
    """A policy cap still waiting when a fleet set-model arrives is superseded: the policy keeps its level."""
    h = harness
    h.planner.gate.clear()
    holder = h.request("Q4_0")  # a fleet command holding the swap worker in its pull
    deadline = time.monotonic() + TIMEOUT
    while h.planner.pulls_running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    policy.adaptation.step(memory_tight(0.0), CFG)  # the cap waits behind it ...
    fleet = h.request("Q8_0")  # ... and is superseded by a newer fleet command
    h.planner.gate.set()
    assert outcome(holder)["quant"] == "Q4_0"
    assert outcome(fleet)["quant"] == "Q8_0"
    policy.settle()
    assert policy.adaptation.state.level.cap_steps == 0
    assert policy.reported == []
    assert h.serving() == ("Q8_0", "Q8_0")


def test_thread_changes_count_only_when_the_engine_took_them(harness: Harness, policy: Policy) -> None:
    """SetThreads results are read: a refused change leaves the level at the threads really used."""
    harness.owner.engine.fail_threads = True  # type: ignore[attr-defined]
    policy.adaptation.step(hot(0.0), CFG)
    assert isinstance(policy.adaptation.changing, SetThreads)
    policy.settle()
    assert policy.adaptation.state.level.threads == 4
    assert policy.reported == []
    harness.owner.engine.fail_threads = False  # type: ignore[attr-defined]
    policy.adaptation.step(hot(1.0), CFG)
    policy.settle()
    assert policy.adaptation.state.level.threads < 4
    info = harness.owner.info
    assert info is not None and info.threads == policy.adaptation.state.level.threads
    assert [type(a) for a, _ in policy.reported] == [SetThreads]
