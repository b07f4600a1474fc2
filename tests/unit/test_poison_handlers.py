"""The handlers' side of 'no single message may stop the daemon': fleet commands, the cloud relay, paho's callbacks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from structlog.testing import capture_logs

from agent.config.cloud import CloudSettings
from agent.config.mqtt import MqttSettings
from agent.errors import BadRequestError
from agent.fleet.service import FleetService
from agent.services.offload import CloudRelay, RelayOutcome
from agent.transport.mqtt import Incoming, MqttLink
from tests.support.fake_link import RecordingLink
from tests.support.fleet import FakeControl, make_settings

DEEP = b"[" * 3000 + b"]" * 3000
RESULT = "edge/dev1/cmd/result"


def incoming(topic: str, payload: bytes, *, mid: int = 1, response_topic: str | None = None,
             correlation: bytes | None = None) -> Incoming:
    return Incoming(topic=topic, payload=payload, qos=1, mid=mid, dup=False, response_topic=response_topic,
                    correlation_data=correlation, message_expiry_s=None, received_at=time.monotonic())


FleetParts = tuple[FleetService, FakeControl, RecordingLink]


@pytest.fixture
def fleet(tmp_path: Path) -> FleetParts:
    control, sink = FakeControl(), RecordingLink()
    service = FleetService(make_settings("dev1"), control, sink.publish, None, tmp_path / "state", ack=sink.ack)
    return service, control, sink


# -- fleet commands --------------------------------------------------------------------------------


def test_a_deep_command_is_refused_with_its_reply_to_read_safely(fleet: FleetParts) -> None:
    """A 3,000-deep command is 'bad_request' on the result topic and at its reply_to, acked once."""
    service, _, sink = fleet
    payload = b'{"id": "c1", "args": ' + DEEP + b', "reply_to": "op/r"}'
    assert service.handle(incoming("edge/dev1/cmd/ping", payload))
    for topic in (RESULT, "op/r"):
        [body] = sink.on(topic)
        assert (body["id"], body["ok"], body["error"]["code"]) == ("c1", False, "bad_request")
    assert sink.acked == [1]


def test_refuse_answers_in_the_command_format_without_parsing(fleet: FleetParts) -> None:
    """The bulkhead's refuse() for commands: result topic plus the caller's address, and one ack."""
    service, _, sink = fleet
    payload = b'{"id": "big", "args": {"x": "' + b"y" * 100 + b'"}, "reply_to": "op/big"}'
    assert service.refuse(incoming("edge/fleet/cmd/status", payload), BadRequestError("too big"))
    assert [b["error"]["code"] for b in sink.on("op/big")] == ["bad_request"]
    assert len(sink.on(RESULT)) == 1
    assert sink.acked == [1]


def test_refuse_never_answers_a_sender_chosen_topic_when_signatures_are_required(tmp_path: Path) -> None:
    """With signatures required, an unauthenticated payload's reply_to is ignored: own result topic only."""
    from agent.fleet.signing import write_keypair

    _, public = write_keypair(tmp_path / "keys")
    sink = RecordingLink()
    service = FleetService(make_settings("dev1", public_key=str(public)), FakeControl(), sink.publish, None,
                           tmp_path / "state", ack=sink.ack)
    service.refuse(incoming("edge/dev1/cmd/ping", b'{"id": "x", "reply_to": "evil/t"}'), BadRequestError("no"))
    assert sink.on("evil/t") == []
    assert len(sink.on(RESULT)) == 1
    assert sink.acked == [1]


def test_undecodable_command_still_answers_its_reply_to(fleet: FleetParts) -> None:
    """Invalid UTF-8 elsewhere in the payload: the top-level reply_to is still found (3.1.1 callers)."""
    service, _, sink = fleet
    service.handle(incoming("edge/dev1/cmd/ping", b'{"id": "u", "args": "\xff\xfe", "reply_to": "op/u"}'))
    [body] = sink.on("op/u")
    assert (body["id"], body["error"]["code"]) == ("u", "bad_request")


def test_a_crash_while_arriving_is_answered_and_acked(fleet: FleetParts,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug before the command runs: 'internal' result, acknowledged (it used to stay unacked forever)."""
    service, _, sink = fleet

    def boom(*a: Any) -> None:
        raise RecursionError("bug")

    monkeypatch.setattr(service, "_authenticate", boom)
    service.handle(incoming("edge/dev1/cmd/ping", b'{"id": "a1"}', response_topic="op/a"))
    [body] = sink.on("op/a")
    assert body["error"]["code"] == "internal"
    assert sink.acked == [1]


def test_a_crash_after_the_ack_is_not_acked_again(fleet: FleetParts,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the command was answered and acknowledged does not answer or ack it twice."""
    service, _, sink = fleet
    real_finish = service._finish

    def finish_then_fail(job: Any, outcome: Any) -> None:
        real_finish(job, outcome)
        raise RuntimeError("after the ack")

    monkeypatch.setattr(service, "_finish", finish_then_fail)
    service.handle(incoming("edge/dev1/cmd/ping", b'{"id": "p1"}', response_topic="op/p"))
    assert sink.acked == [1]
    assert len(sink.on("op/p")) == 1


def test_a_crash_on_the_command_worker_is_answered_and_acked(fleet: FleetParts,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow command whose result cannot even be stored: 'internal' to the caller, acked once, worker alive."""
    service, _, sink = fleet
    real_finish, calls = service._finish, []

    def fail_once(job: Any, outcome: Any) -> None:
        calls.append(job.request.id)
        if len(calls) == 1:
            raise TypeError("not serialisable")
        real_finish(job, outcome)

    monkeypatch.setattr(service, "_finish", fail_once)
    service.handle(incoming("edge/dev1/cmd/reload", b'{"id": "r1"}', mid=1, response_topic="op/r"))
    service.handle(incoming("edge/dev1/cmd/reload", b'{"id": "r2"}', mid=2, response_topic="op/r"))
    deadline = time.monotonic() + 5
    while len(sink.acked) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    service.close(5)
    assert sorted(sink.acked) == [1, 2]
    codes = {b["id"]: (b.get("error") or {}).get("code") for b in sink.on("op/r")}
    assert codes == {"r1": "internal", "r2": None}


# -- the cloud relay ---------------------------------------------------------------------------------


class Reply:
    topic = "caller/reply"
    correlation_data = b"caller"


def test_an_unreadable_cloud_reply_fails_its_relay_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3,000-deep reply from the cloud ends the relayed request with 'internal' now, not at its timeout."""
    relay = CloudRelay(CloudSettings(enabled=True), prefix="edge", device_id="dev1")
    monkeypatch.setattr(CloudRelay, "up", property(lambda self: True))
    monkeypatch.setattr(relay._link, "publish", lambda *a, **k: None)
    sent: list[tuple[str, dict[str, Any]]] = []
    outcomes: list[RelayOutcome] = []
    relay.forward(b'{"prompt": "hi"}', Reply(), "req-1",
                  lambda topic, payload, **k: sent.append((topic, json.loads(payload))), on_done=outcomes.append)
    [token] = list(relay._pending)
    with capture_logs() as logs:
        relay._relay(incoming(relay.reply_topic, b'{"id": "req-1", "x": ' + DEEP + b"}", correlation=token))
    assert [(t, b["error"]["code"]) for t, b in sent] == [("caller/reply", "internal")]
    assert [o.result for o in outcomes] == ["error"]
    assert relay.pending == 0
    assert any(e["event"] == "message_rejected" for e in logs)


# -- paho's network thread -------------------------------------------------------------------------


def test_an_exception_in_the_message_callback_does_not_reach_paho() -> None:
    """If handing a message over fails, paho's thread gets no exception; the message is acked and dropped."""

    def broken(event: object) -> None:
        raise MemoryError

    link = MqttLink(MqttSettings(), "test-client", broken, manual_ack=True)
    acked: list[tuple[int, int]] = []
    link._client.ack = lambda mid, qos: acked.append((mid, qos))  # type: ignore[method-assign]
    msg = paho.MQTTMessage(mid=7, topic=b"edge/dev1/infer")
    msg.qos, msg.payload = 1, b"{}"
    with capture_logs() as logs:
        link._handle_message(link._client, None, msg)
    assert acked == [(7, 1)]
    assert any(e["event"] == "message_dropped" and e["reason"] == "callback_failed" for e in logs)
    assert link._client.suppress_exceptions is True

