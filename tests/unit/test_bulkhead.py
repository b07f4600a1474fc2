"""The bulkhead around message handlers and the quarantine store, without a broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.errors import AgentError
from agent.services.bulkhead import Bulkhead, QuarantinedError
from agent.services.quarantine import FILE_NAME, QUARANTINE_AFTER, QuarantineStore, fingerprint
from agent.transport.mqtt import Incoming
from tests.support.fake_link import RecordingLink

DEEP = b'{"id": "d", "prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"


def incoming(payload: bytes = b'{"id": "ok"}', *, topic: str = "edge/dev1/infer", mid: int = 1,
             dup: bool = False) -> Incoming:
    return Incoming(topic=topic, payload=payload, qos=1, mid=mid, dup=dup, response_topic="caller/r",
                    correlation_data=None, message_expiry_s=None, received_at=time.monotonic())


class Refusals:
    """A handler's refuse(): records the error, acknowledges, says whether it could answer."""

    def __init__(self, link: RecordingLink, *, answers: bool = True) -> None:
        self.link = link
        self.answers = answers
        self.errors: list[AgentError] = []

    def __call__(self, message: Incoming, error: AgentError) -> bool:
        self.errors.append(error)
        self.link.ack(message)
        return self.answers


Parts = tuple[Bulkhead, RecordingLink, Refusals]


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    link = RecordingLink()
    return Bulkhead(link, max_bytes=lambda: 65_536, state_dir=tmp_path), link, Refusals(link)


# -- limits and the catch-all ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [(DEEP, "bad_request", "too_deep"), (b"x" * 70_000, "too_large", "too_large")],
    ids=["3000-deep", "oversize"],
)
def test_payloads_over_the_limits_are_refused_before_the_handler(
    parts: Parts, payload: bytes, code: str, reason: str
) -> None:
    """Over-deep or oversize: the handler never runs, the sender is answered, the message acked once."""
    bulkhead, link, refuse = parts
    ran: list[Incoming] = []
    with capture_logs() as logs:
        bulkhead.run(incoming(payload), ran.append, refuse)
    assert ran == []
    assert [e.code for e in refuse.errors] == [code]
    assert link.acked == [1]
    assert bulkhead.counters.rejected == 1
    event = next(e for e in logs if e["event"] == "message_rejected")
    assert (event["reason"], event["bytes"], event["topic"], event["replied"]) == (
        reason, len(payload), "edge/dev1/infer", True)


def test_each_limit_is_counted_and_the_element_limit_is_read_per_message(tmp_path: Path) -> None:
    """Oversize, over-deep and over-many-elements payloads each move their own counter (answered or not),
    log their own reason, and a live change of max_elements applies to the next message."""
    link, elements = RecordingLink(), [4096]
    bulkhead = Bulkhead(link, max_bytes=lambda: 65_536, max_elements=lambda: elements[0], state_dir=tmp_path)
    refuse = Refusals(link)
    many = b'{"prompt": "x", "stop": [' + b"0," * 5000 + b"0]}"
    ran: list[Incoming] = []
    with capture_logs() as logs:
        bulkhead.run(incoming(many, mid=1), ran.append, refuse)
        bulkhead.run(incoming(DEEP, mid=2), ran.append, Refusals(link, answers=False))
        bulkhead.run(incoming(b"x" * 70_000, mid=3), ran.append, refuse)
        elements[0] = 6000
        bulkhead.run(incoming(many, mid=4), ran.append, refuse)
    assert [m.mid for m in ran] == [4]
    assert [e.code for e in refuse.errors] == ["too_large", "too_large"]
    counts = bulkhead.counters
    assert (counts.json_elements, counts.json_depth, counts.payload_bytes) == (1, 1, 1)
    assert (counts.rejected, counts.dropped) == (2, 1)
    assert [e["reason"] for e in logs if e["event"] == "message_rejected"] == [
        "too_many_elements", "too_deep", "too_large"]


def test_without_a_reply_address_a_refusal_is_a_counted_drop(tmp_path: Path) -> None:
    """When refuse() finds nobody to answer, the message is still acked and counted as dropped."""
    link = RecordingLink()
    bulkhead = Bulkhead(link, max_bytes=lambda: 100, state_dir=tmp_path)
    bulkhead.run(incoming(b"x" * 101), lambda m: None, Refusals(link, answers=False))
    assert link.acked == [1]
    assert (bulkhead.counters.rejected, bulkhead.counters.dropped) == (0, 1)


def test_the_size_limit_is_read_per_message(tmp_path: Path) -> None:
    """A live config change of the payload limit applies to the next message."""
    link, limit = RecordingLink(), [1000]
    bulkhead = Bulkhead(link, max_bytes=lambda: limit[0], state_dir=tmp_path)
    refuse = Refusals(link)
    bulkhead.run(incoming(b"x" * 500), lambda m: None, refuse)
    limit[0] = 400
    bulkhead.run(incoming(b"x" * 500, mid=2), lambda m: None, refuse)
    assert [e.code for e in refuse.errors] == ["too_large"]


@pytest.mark.parametrize(
    "exc", [RecursionError("deep"), MemoryError(), ValueError("pydantic-ish"), KeyError("bug")],
    ids=["recursion", "memory", "value", "bug"],
)
def test_a_crashing_handler_becomes_an_internal_error_reply(
    parts: Parts, exc: Exception
) -> None:
    """Any exception from the handler is answered 'internal', acked once, logged, and the next message runs."""
    bulkhead, link, refuse = parts

    def boom(message: Incoming) -> None:
        raise exc

    with capture_logs() as logs:
        bulkhead.run(incoming(), boom, refuse)
    assert [e.code for e in refuse.errors] == ["internal"]
    assert type(exc).__name__ in str(refuse.errors[0])
    assert link.acked == [1]
    crashed = next(e for e in logs if e["event"] == "handler_crashed")
    assert crashed["log_level"] == "error"
    assert (crashed["topic"], crashed["reason"]) == ("edge/dev1/infer", type(exc).__name__)
    ok: list[Incoming] = []
    bulkhead.run(incoming(mid=2), ok.append, refuse)
    assert len(ok) == 1


def test_a_handler_that_acked_before_it_crashed_is_not_acked_twice(parts: Parts) -> None:
    """Exactly once: the bulkhead saw the handler's own ack, so it neither answers nor acks again."""
    bulkhead, link, refuse = parts

    def ack_then_fail(message: Incoming) -> None:
        link.ack(message)
        raise RuntimeError("after the ack")

    bulkhead.run(incoming(), ack_then_fail, refuse)
    assert link.acked == [1]
    assert refuse.errors == []


def test_a_failing_refuse_still_acks_once(parts: Parts) -> None:
    """If even the error reply fails, the message is acknowledged by the bulkhead and counted dropped."""
    bulkhead, link, _ = parts

    def broken_refuse(message: Incoming, error: AgentError) -> bool:
        raise RuntimeError("cannot publish")

    bulkhead.run(incoming(DEEP), lambda m: None, broken_refuse)
    assert link.acked == [1]
    assert bulkhead.counters.dropped == 1


def test_a_message_the_handler_does_not_take_is_acked(parts: Parts) -> None:
    """handle() returning False (not a topic it serves, e.g. our own cmd/result echo) is acknowledged."""
    bulkhead, link, refuse = parts
    bulkhead.run(incoming(topic="edge/dev1/cmd/result"), lambda m: False, refuse)
    bulkhead.run(incoming(mid=2), lambda m: None, refuse)  # took it: its own ack comes later
    assert link.acked == [1]


# -- quarantine ----------------------------------------------------------------------------------


def test_first_deliveries_touch_no_disk(parts: Parts, tmp_path: Path) -> None:
    """The normal path (no DUP flag) neither charges nor writes the store."""
    bulkhead, link, refuse = parts
    for mid in range(5):
        bulkhead.run(incoming(mid=mid), link.ack, refuse)
    bulkhead.charge(incoming())
    assert not (tmp_path / FILE_NAME).exists()


def test_a_redelivery_is_charged_and_forgotten_when_acked(parts: Parts,
                                                          tmp_path: Path) -> None:
    """A DUP message is charged (on disk) before it runs and removed from the store when acked."""
    bulkhead, link, refuse = parts
    message = incoming(b'{"id": "again"}', dup=True)
    seen: list[int] = []

    def handler(m: Incoming) -> None:
        seen.append(QuarantineStore(tmp_path / FILE_NAME).attempts(fingerprint(m.topic, m.payload)))
        link.ack(m)

    bulkhead.run(message, handler, refuse)
    assert seen == [1]
    assert QuarantineStore(tmp_path / FILE_NAME).attempts(fingerprint(message.topic, message.payload)) == 0


def test_a_message_that_keeps_crashing_the_agent_is_quarantined(tmp_path: Path) -> None:
    """Charged QUARANTINE_AFTER times across restarts, the next redelivery is refused, acked, and not run."""
    message = incoming(b'{"id": "poison"}', dup=True)
    for _ in range(QUARANTINE_AFTER):
        # Each "run" of the daemon: a new Bulkhead over the same state dir, and the handler dies.
        link = RecordingLink()
        Bulkhead(link, max_bytes=lambda: 65_536, state_dir=tmp_path).run(message, lambda m: None, Refusals(link))
        assert link.acked == []
    link = RecordingLink()
    events: list[tuple[Incoming, int]] = []
    bulkhead = Bulkhead(link, max_bytes=lambda: 65_536, state_dir=tmp_path,
                        on_quarantine=lambda m, n: events.append((m, n)))
    refuse, ran = Refusals(link), []
    with capture_logs() as logs:
        bulkhead.run(message, ran.append, refuse)
    assert ran == []
    assert isinstance(refuse.errors[0], QuarantinedError)
    assert refuse.errors[0].code == "bad_request"
    assert "quarantined" in str(refuse.errors[0])
    assert link.acked == [1]
    assert bulkhead.counters.quarantined == 1
    assert events == [(message, QUARANTINE_AFTER)]
    assert any(e["event"] == "message_quarantined" and e["attempts"] == QUARANTINE_AFTER for e in logs)
    # Acknowledged: forgotten, so the store stays small.
    assert QuarantineStore(tmp_path / FILE_NAME).attempts(fingerprint(message.topic, message.payload)) == 0


def test_queued_work_is_charged_only_when_it_starts(parts: Parts,
                                                    tmp_path: Path) -> None:
    """charge=False: a redelivered request waiting in the queue is not blamed until charge() at its start."""
    bulkhead, _, refuse = parts
    message = incoming(b'{"id": "queued"}', dup=True)
    bulkhead.run(message, lambda m: None, refuse, charge=False)
    key = fingerprint(message.topic, message.payload)
    assert QuarantineStore(tmp_path / FILE_NAME).attempts(key) == 0
    bulkhead.charge(message)
    assert QuarantineStore(tmp_path / FILE_NAME).attempts(key) == 1


def test_without_a_state_dir_the_bulkhead_still_protects(tmp_path: Path) -> None:
    """No writable state dir: quarantine is off, limits and the catch-all still work."""
    link = RecordingLink()
    bulkhead = Bulkhead(link, max_bytes=lambda: 65_536, state_dir=None)
    refuse = Refusals(link)
    bulkhead.run(incoming(DEEP, dup=True), lambda m: None, refuse)
    bulkhead.charge(incoming(dup=True))
    assert [e.code for e in refuse.errors] == ["bad_request"]


# -- the store -----------------------------------------------------------------------------------


def test_store_counts_survive_a_restart_and_discard_persists(tmp_path: Path) -> None:
    """Charges are on disk at once (a crash may follow); discard removes them on disk too."""
    path = tmp_path / FILE_NAME
    store = QuarantineStore(path)
    assert store.charge("a", topic="t", size=3) == 1
    assert store.charge("a", topic="t", size=3) == 2
    store.charge("b", topic="t", size=3)
    assert QuarantineStore(path).attempts("a") == 2
    store.discard("a")
    reloaded = QuarantineStore(path)
    assert (reloaded.attempts("a"), reloaded.attempts("b")) == (0, 1)


def test_store_is_bounded_oldest_first(tmp_path: Path) -> None:
    """Past max_entries the oldest fingerprints go, in memory and on disk."""
    store = QuarantineStore(tmp_path / FILE_NAME, max_entries=3)
    for key in "abcde":
        store.charge(key, topic="t", size=1)
    assert len(store) == 3
    assert [QuarantineStore(tmp_path / FILE_NAME).attempts(k) for k in "abcde"] == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"a": 5}', b'{"a": {"attempts": "many"}}', b"[" * 100_000, b"\xff\xfe"],
    ids=["torn", "list", "not-entries", "bad-count", "deep", "binary"],
)
def test_a_corrupt_store_is_empty_with_a_warning(tmp_path: Path, content: bytes) -> None:
    """A damaged file never stops the daemon: it starts empty, says so, and is rewritten on the next charge."""
    path = tmp_path / FILE_NAME
    path.write_bytes(content)
    with capture_logs() as logs:
        store = QuarantineStore(path)
    assert len(store) == 0
    assert any(e["event"] == "quarantine_store_corrupt" and e["log_level"] == "warning" for e in logs)
    store.charge("k", topic="t", size=1)
    assert json.loads(path.read_bytes())["k"]["attempts"] == 1


def test_an_unwritable_store_keeps_counting_in_memory(tmp_path: Path) -> None:
    """A failed write is a warning; the count is still kept for this run."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = QuarantineStore(blocker / FILE_NAME)  # its directory cannot exist
    with capture_logs() as logs:
        assert store.charge("k", topic="t", size=1) == 1
    assert store.attempts("k") == 1
    assert any(e["event"] == "quarantine_store_write_failed" for e in logs)


def test_fingerprints_tell_topic_and_payload_apart() -> None:
    """The same payload on another topic (or the topic/payload boundary moved) is another message."""
    assert fingerprint("a/b", b"c") != fingerprint("a/bc", b"")
    assert fingerprint("a", b"x") != fingerprint("b", b"x")
    assert fingerprint("a", b"x") == fingerprint("a", b"x")
