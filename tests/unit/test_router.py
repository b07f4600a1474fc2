"""The router (agent.services.router) in process: dispatch by topic, the fleet-share membership, offload.

Fakes stand in for the link, the inference service, the fleet commands, the adaptation policy and the
cloud relay; the bulkhead is the real one (without a quarantine store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.config.cloud import CloudSettings
from agent.errors import AgentError
from agent.services.bulkhead import Bulkhead
from agent.services.inference import ReplyAddress
from agent.services.router import Router
from agent.transport.mqtt import Incoming
from agent.transport.topics import DeviceTopics
from agent.transport.wire import InferRequest

TOPICS = DeviceTopics("edge", "dev1")
FLEET_SHARE = "$share/edge-workers/edge/fleet/infer"
CLOUD_SHARE = "$share/edge-cloud/edge/cloud/infer"


def incoming(topic: str, payload: bytes = b'{"id": "r1", "prompt": "hi"}', mid: int = 1) -> Incoming:
    return Incoming(topic=topic, payload=payload, qos=1, mid=mid, dup=False, response_topic="caller/r",
                    correlation_data=None, message_expiry_s=None, received_at=time.monotonic())


class FakeLink:
    """Subscriptions, acknowledgements and publishes, recorded; ack listeners called like FailoverLink's."""

    def __init__(self) -> None:
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self._listeners: list[Callable[[Incoming], None]] = []

    def subscribe(self, topics: Any) -> None:
        self.subscribed += [t for t, _ in topics]

    def unsubscribe(self, topics: Any) -> None:
        self.unsubscribed += list(topics)

    def ack(self, message: Incoming) -> None:
        self.acked.append(message.mid)
        for listener in self._listeners:
            listener(message)

    def add_ack_listener(self, listener: Callable[[Incoming], None]) -> None:
        self._listeners.append(listener)

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        self.published.append((topic, payload))


@dataclass
class FakeCounters:
    avg_request_ms: float | None = None


class FakeService:
    """The inference service's surface the router uses; every call recorded by name."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.saturated = False
        self.queue_depth = 0
        self.busy = False
        self.running = 0
        self.slots = 1
        self.draining = False
        self.counters = FakeCounters()
        self.router: Any = None
        self.before_run: Any = None
        self.unmetered_topics: frozenset[str] = frozenset()
        self.overloaded: list[tuple[str, str]] = []

    def submit(self, message: Incoming) -> None:
        self.calls.append(("submit", message.topic))

    def refuse(self, message: Incoming, error: AgentError) -> bool:
        self.calls.append(("refuse", message.topic))
        return False

    def cancel(self, message: Incoming) -> None:
        self.calls.append(("cancel", message.topic))

    def refuse_cancel(self, message: Incoming, error: AgentError) -> bool:
        self.calls.append(("refuse_cancel", message.topic))
        return False

    def refuse_overloaded(self, message: Incoming, reply: ReplyAddress, request_id: str, retry_after_ms: int | None,
                          reason: str) -> None:
        self.overloaded.append((request_id, reason))


class FakeCommands:
    def __init__(self) -> None:
        self.handled: list[str] = []

    def handle(self, message: Incoming) -> bool:
        self.handled.append(message.topic)
        return True

    def refuse(self, message: Incoming, error: AgentError) -> bool:
        return False


@dataclass
class FakePolicy:
    offload: bool = False
    mode: str = "local"


@dataclass
class FakeRelay:
    up: bool = True
    forwarded: list[str] = field(default_factory=list)
    on_done: list[Callable[[Any], None]] = field(default_factory=list)

    def forward(self, payload: bytes, reply: Any, request_id: str, publish: Any, *, on_done: Any) -> bool:
        self.forwarded.append(request_id)
        self.on_done.append(on_done)
        return True


@dataclass
class Outcome:
    result: str


@dataclass
class Parts:
    router: Router
    link: FakeLink
    service: FakeService
    commands: FakeCommands
    policy: FakePolicy
    relay: FakeRelay | None
    events: list[tuple[str, str]]
    mode_changes: list[str]


def make(*, relay: FakeRelay | None = None, cloud_infer: str | None = None,
         cloud: CloudSettings | None = None) -> Parts:
    link, service, commands, policy = FakeLink(), FakeService(), FakeCommands(), FakePolicy()
    events: list[tuple[str, str]] = []
    mode_changes: list[str] = []
    router = Router(
        topics=TOPICS, link=link, service=service, commands=commands,  # type: ignore[arg-type]
        bulkhead=Bulkhead(link, max_bytes=lambda: 65_536, state_dir=None), policy=policy,  # type: ignore[arg-type]
        cloud=cloud or CloudSettings(enabled=True), relay=relay, cloud_infer=cloud_infer,  # type: ignore[arg-type]
        emit=lambda kind, reason, numbers: events.append((kind, reason)),
        on_mode_change=lambda: mode_changes.append(router.mode),
    )
    return Parts(router, link, service, commands, policy, relay, events, mode_changes)


def request(mid: int = 1, deadline_ms: int | None = None) -> tuple[InferRequest, ReplyAddress, Incoming]:
    return (InferRequest.model_validate({"id": f"r{mid}", "prompt": "hi", "deadline_ms": deadline_ms}),
            ReplyAddress("caller/r", None), incoming(TOPICS.infer, mid=mid))


# -- dispatch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("topic", "handler"), [
    (TOPICS.infer, ("submit", TOPICS.infer)),
    ("edge/fleet/infer", ("submit", "edge/fleet/infer")),
    (TOPICS.infer_cancel, ("cancel", TOPICS.infer_cancel)),
])
def test_inference_topics_go_to_the_inference_service(topic: str, handler: tuple[str, str]) -> None:
    """The device's own infer topic and the fleet share go to submit, the cancel topic to cancel."""
    p = make()
    p.router.dispatch(incoming(topic))
    assert p.service.calls == [handler]
    assert p.commands.handled == []


def test_the_cloud_share_goes_to_the_inference_service_unmetered() -> None:
    """A cloud worker serves its shared topic (without the $share prefix) and does not rate-limit it per caller."""
    p = make(cloud_infer=CLOUD_SHARE)
    p.router.dispatch(incoming("edge/cloud/infer"))
    assert p.service.calls == [("submit", "edge/cloud/infer")]
    assert p.service.unmetered_topics == frozenset({"edge/cloud/infer"})


def test_everything_else_goes_to_the_fleet_commands() -> None:
    """Fleet command topics (anything not inference) are the fleet service's."""
    p = make()
    p.router.dispatch(incoming("edge/fleet/cmd/ping"))
    p.router.dispatch(incoming("edge/dev1/cmd/status", mid=2))
    assert p.commands.handled == ["edge/fleet/cmd/ping", "edge/dev1/cmd/status"]
    assert p.service.calls == []


def test_a_message_over_the_size_limit_is_refused_by_its_handler_not_run() -> None:
    """Dispatch goes through the bulkhead: an oversized request is refused by the service's refuse."""
    p = make()
    p.router.dispatch(incoming(TOPICS.infer, payload=b'{"prompt": "' + b"x" * 70_000 + b'"}'))
    assert p.service.calls == [("refuse", TOPICS.infer)]
    assert p.router.counters.payload_bytes == 1


def test_requests_are_charged_by_the_service_when_they_start() -> None:
    """The bulkhead's charge is the service's before_run hook (a crash blames only running work)."""
    p = make()
    assert p.service.before_run is not None


# -- the fleet share ------------------------------------------------------------------------------------


def test_join_takes_the_fleet_share_and_the_cloud_share_leave_drops_both() -> None:
    """Joining subscribes the shared topics; leaving (shutdown) unsubscribes them."""
    p = make(cloud_infer=CLOUD_SHARE)
    p.router.join()
    assert p.link.subscribed == [FLEET_SHARE, CLOUD_SHARE]
    p.router.leave()
    assert p.link.unsubscribed == [FLEET_SHARE, CLOUD_SHARE]


def test_the_share_is_left_when_saturated_and_rejoined_when_not() -> None:
    """A saturated device leaves the fleet share after a request, and rejoins once it has room again."""
    p = make()
    p.router.join()
    p.service.saturated = True
    with capture_logs() as logs:
        p.router.dispatch(incoming(TOPICS.infer))
        p.router.update_share()  # no change: nothing more sent
    assert p.link.unsubscribed == [FLEET_SHARE]
    assert not p.router.fleet_subscribed
    assert [e["subscribed"] for e in logs if e["event"] == "fleet_share"] == [False]
    p.service.saturated = False
    p.router.update_share()
    assert p.link.subscribed == [FLEET_SHARE, FLEET_SHARE]
    assert p.router.fleet_subscribed


def test_draining_leaves_the_share_and_resuming_rejoins() -> None:
    """Draining sets the service's draining flag and leaves the share; resuming undoes both."""
    p = make()
    p.router.set_draining(True)
    assert (p.service.draining, p.router.draining, p.link.unsubscribed) == (True, True, [FLEET_SHARE])
    p.router.set_draining(False)
    assert (p.service.draining, p.link.subscribed) == (False, [FLEET_SHARE])


def test_a_policy_offload_leaves_the_share() -> None:
    """While the adaptation policy offloads, the device takes no fleet work."""
    p = make()
    p.policy.offload = True
    p.router.update_share()
    assert p.link.unsubscribed == [FLEET_SHARE]


def test_a_share_left_before_joining_is_not_joined() -> None:
    """Saturated (or draining) before the model served: join does not take the fleet share."""
    p = make()
    p.router.set_draining(True)
    p.router.join()
    assert FLEET_SHARE not in p.link.subscribed


# -- offload -------------------------------------------------------------------------------------------


def test_without_a_relay_every_request_stays_local_and_no_hook_is_installed() -> None:
    """No cloud relay: the service has no offload hook, and route keeps requests local."""
    p = make()
    assert p.service.router is None
    assert p.router.route(*request(), "r1") is False


def test_a_policy_offload_sends_the_request_to_the_cloud_and_counts_it_when_done() -> None:
    """With the policy offloading and the cloud up, the request is forwarded; acknowledged and counted once done."""
    p = make(relay=FakeRelay())
    assert p.service.router == p.router.route
    p.policy.offload = True
    req, reply, message = request()
    assert p.router.route(req, reply, message, "r1") is True
    assert p.relay is not None
    assert p.relay.forwarded == ["r1"]
    assert (p.link.acked, p.router.offloaded) == ([], 0)
    p.relay.on_done[0](Outcome("ok"))
    assert (p.link.acked, p.router.offloaded) == ([1], 1)


def test_an_unreachable_cloud_is_acknowledged_but_not_counted() -> None:
    """The relay answered 'overloaded' itself: the request is acknowledged, not counted as offloaded."""
    p = make(relay=FakeRelay())
    p.policy.offload = True
    p.router.route(*request(), "r1")
    assert p.relay is not None
    p.relay.on_done[0](Outcome("unreachable"))
    assert (p.link.acked, p.router.offloaded) == ([1], 0)


def test_a_policy_offload_with_the_cloud_down_is_refused_overloaded() -> None:
    """Nobody can serve it: the service answers 'overloaded' at once."""
    p = make(relay=FakeRelay(up=False))
    p.policy.offload = True
    assert p.router.route(*request(), "r1") is True
    assert p.service.overloaded == [("r1", "policy_offload")]


def test_queue_overflow_switches_the_mode_to_offloading_and_back() -> None:
    """Overflow starts at offload_queue_high and stops at offload_queue_low, each time an event and a status."""
    p = make(relay=FakeRelay(), cloud=CloudSettings(enabled=True, offload_queue_high=2, offload_queue_low=0))
    p.service.queue_depth = 2
    assert p.router.route(*request(), "r1") is True
    assert (p.router.overflowing, p.router.mode) == (True, "offloading")
    p.service.queue_depth = 0
    assert p.router.route(*request(mid=2), "r2") is False
    assert p.events == [("offload_on", "queue_overflow"), ("offload_off", "local")]
    assert p.mode_changes == ["offloading", "local"]


def test_the_mode_is_the_policys_while_not_overflowing() -> None:
    """Without overflow the router reports the adaptation policy's mode."""
    p = make()
    p.policy.mode = "degraded"
    assert p.router.mode == "degraded"
