"""Where each arrived message goes, and whether this device takes the fleet's shared work.

:meth:`Router.dispatch` (the daemon's main loop, one call per :class:`~agent.transport.mqtt.Incoming`)
hands every message to its handler through the bulkhead: inference requests on the device's own
topic, the fleet's shared topic and (role ``cloud``) the cloud's shared topic to the inference
service; cancels to its cancel; everything else to the fleet commands. The router owns the fleet-share
membership: the device stays in ``$share/{prefix}-workers/{prefix}/fleet/infer`` only while it can
take work (not draining, not saturated, not offloading by policy), so the broker routes around it.
:meth:`Router.route` is the inference service's offload hook: local first, the cloud (through the
relay) or an ``overloaded`` answer when :func:`~agent.services.offload.should_offload` says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent.services.offload import OffloadFlags, expected_wait_ms, should_offload
from agent.transport.topics import FleetWideTopics

if TYPE_CHECKING:
    from agent.config.cloud import CloudSettings
    from agent.errors import AgentError
    from agent.services.bulkhead import Bulkhead, BulkheadCounters
    from agent.services.inference import InferenceService, ReplyAddress
    from agent.services.offload import CloudRelay
    from agent.transport.failover import FailoverLink
    from agent.transport.mqtt import Incoming
    from agent.transport.telemetry import Mode
    from agent.transport.topics import DeviceTopics
    from agent.transport.wire import InferRequest

log = structlog.get_logger("agent.router")

Emit = Callable[[str, str, dict[str, Any]], None]


class Commands(Protocol):
    """The fleet commands' side of dispatch (agent.fleet.service.FleetService)."""

    def handle(self, message: Incoming) -> bool: ...
    def refuse(self, message: Incoming, error: AgentError) -> bool: ...


class Policy(Protocol):
    """What routing reads from the adaptation state (agent.services.adaptation.Adaptation)."""

    @property
    def mode(self) -> Mode: ...
    @property
    def offload(self) -> bool: ...


class Router:
    """Dispatches arrived messages, holds the fleet-share membership, and decides offload per request."""

    def __init__(
        self,
        *,
        topics: DeviceTopics,
        link: FailoverLink,
        service: InferenceService,
        commands: Commands,
        bulkhead: Bulkhead,
        policy: Policy,
        cloud: CloudSettings,
        relay: CloudRelay | None = None,
        cloud_infer: str | None = None,
        emit: Emit,
        on_mode_change: Callable[[], None],
    ) -> None:
        """``cloud_infer``: the cloud's shared subscription (role ``cloud`` only); ``relay``: where offloaded
        requests go (edge devices with ``[cloud] enabled``); ``on_mode_change``: the offload mode changed
        (the status says so)."""
        self._topics = topics
        self._link = link
        self._service = service
        self._commands = commands
        self._bulkhead = bulkhead
        self._policy = policy
        self._cloud = cloud
        self._relay = relay
        self._emit = emit
        self._on_mode_change = on_mode_change
        fleet = FleetWideTopics(topics.prefix)
        self.fleet_infer = fleet.shared_infer
        self.cloud_infer = cloud_infer
        # The topics the broker delivers shared-subscription messages on (without the $share/group/).
        self._shared = {fleet.infer, *([cloud_infer.split("/", 2)[2]] if cloud_infer else [])}
        self._share_lock = threading.Lock()  # membership changes come from the main loop and from fleet commands
        self.fleet_subscribed = True
        self.draining = False
        self.overflowing = False
        self.offloaded = 0
        if cloud_infer:  # relayed by edge devices: one relay reply topic speaks for many callers
            service.unmetered_topics = frozenset({cloud_infer.split("/", 2)[2]})
        if relay is not None:
            service.router = self.route
        service.before_run = bulkhead.charge

    @property
    def mode(self) -> Mode:
        """'offloading' also while queue overflow goes to the cloud, not only when the policy says so."""
        return "offloading" if self.overflowing else self._policy.mode

    @property
    def counters(self) -> BulkheadCounters:
        return self._bulkhead.counters

    # -- subscriptions -------------------------------------------------------------------------------

    def join(self) -> None:
        """Take the shared work once the model serves (fleet share unless it was left meanwhile, cloud share)."""
        if self.fleet_subscribed:
            self._link.subscribe([(self.fleet_infer, 1)])
        if self.cloud_infer:
            self._link.subscribe([(self.cloud_infer, 1)])

    def leave(self) -> None:
        """Leave the shared subscriptions (shutdown): a persistent session would keep our share queued."""
        self._link.unsubscribe([t for t in (self.fleet_infer, self.cloud_infer) if t])

    def update_share(self) -> None:
        """Stay in the fleet's shared subscription only while we can take work, so the broker routes around us."""
        with self._share_lock:
            want = not (self.draining or self._service.saturated or self._policy.offload)
            if want == self.fleet_subscribed:
                return
            self.fleet_subscribed = want
            if want:
                self._link.subscribe([(self.fleet_infer, 1)])
            else:
                self._link.unsubscribe([self.fleet_infer])
        log.info("fleet_share", subscribed=want)

    def set_draining(self, draining: bool) -> None:
        """A draining device refuses new requests and leaves the fleet share, so the broker routes to others."""
        self.draining = draining
        self._service.draining = draining
        self.update_share()

    # -- dispatch (main loop) ------------------------------------------------------------------------

    def dispatch(self, message: Incoming) -> None:
        """Hand ``message`` to its handler through the bulkhead (nothing one message does escapes)."""
        service, topic = self._service, message.topic
        if topic == self._topics.infer or topic in self._shared:
            self._bulkhead.run(message, service.submit, service.refuse, charge=False)  # charged when it starts
            self.update_share()
        elif topic == self._topics.infer_cancel:
            self._bulkhead.run(message, service.cancel, service.refuse_cancel)
        else:
            self._bulkhead.run(message, self._commands.handle, self._commands.refuse)

    # -- offload (the inference service's hook, main loop) ---------------------------------------------

    def route(self, request: InferRequest, reply: ReplyAddress, message: Incoming, request_id: str) -> bool:
        """Local first; True when the request went to the cloud or was refused here."""
        relay, service = self._relay, self._service
        if relay is None:
            return False
        waiting = service.queue_depth
        decision = should_offload(
            queue_depth=waiting,
            expected_wait_ms=expected_wait_ms(waiting, service.running, service.slots,
                                              service.counters.avg_request_ms),
            deadline_ms=request.deadline_ms,
            flags=OffloadFlags(policy_offload=self._policy.offload, model_available=True,
                               overflowing=self.overflowing),
            cloud_up=relay.up,
            settings=self._cloud,
        )
        if decision.overflowing != self.overflowing:
            self.overflowing = decision.overflowing
            self._emit("offload_on" if decision.overflowing else "offload_off", decision.reason,
                       {"queue_depth": waiting})
            self._on_mode_change()
        if decision.route == "local":
            return False
        if decision.route == "reject":
            service.refuse_overloaded(message, reply, request_id, decision.retry_after_ms, decision.reason)
            return True
        link = self._link

        def done(outcome: Any) -> None:
            # Called exactly once per forward(), also when the relay found the cloud unreachable and
            # answered 'overloaded' itself: the only place the caller's PUBLISH is acknowledged.
            link.ack(message)
            if outcome.result != "unreachable":
                self.offloaded += 1

        forwarded = relay.forward(message.payload, reply, request_id, link.publish, on_done=done)
        log.info("request_offloaded", id=request_id, reason=decision.reason, forwarded=forwarded)
        return True
