"""Properties of the relay's parsing of cloud replies: whatever the cloud (or anyone publishing on the
relay's reply topic) sends, each forwarded request ends in exactly one final message to its caller and
exactly one ``on_done`` (where the daemon acknowledges the caller's PUBLISH), by its timeout at the latest.
"""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.config.cloud import CloudSettings
from agent.services.offload import CloudRelay, RelayOutcome
from agent.transport.mqtt import Incoming
from tests.fuzz.payloads import BAD_UTF8, SURROGATE_ESCAPES


class Relay(CloudRelay):
    """The real relay with the cloud link up and its publishes dropped; nothing connects."""

    up = property(lambda self: True)  # type: ignore[assignment]


class Reply:
    topic = "caller/reply"
    correlation_data = b"caller"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
reply_bodies = st.fixed_dictionaries({}, optional={
    "id": json_values, "done": st.sampled_from((True, False, 1, 0, None, "yes")),
    "seq": st.integers(-2, 5) | json_values, "delta": json_values, "text": json_values, "error": json_values,
    "finish_reason": json_values,
})
raw_replies = (
    reply_bodies.map(lambda b: json.dumps(b).encode())
    | st.binary(max_size=200)
    | st.sampled_from([b"", b"[]", b"null", b"[" * 5000, b'{"done": true, "x": ' + b"[" * 40 + b"}",
                       *(b'{"done": true, "text": "' + e + b'"}' for e in SURROGATE_ESCAPES),
                       *(b'{"done": true, "text": "' + e + b'"}' for e in BAD_UTF8),
                       b'{"done": true, "text": "' + b"x" * (4 << 20) + b'"}'])
)
# Each reply goes to the pending relay (its token), to an unknown token, or carries no token at all.
replies = st.lists(st.tuples(raw_replies, st.sampled_from(("mine", "other", "none"))), max_size=6)


@given(replies)
@example([(b'{"done": true, "text": "\\ud800"}', "mine")])
@example([(b'{"seq": 0, "delta": "a"}', "mine"), (b'{"done": true}', "mine"), (b'{"done": true}', "mine")])
def test_every_forwarded_request_ends_once_whatever_the_cloud_sends(items: list[tuple[bytes, str]]) -> None:
    """Chunks, finals, errors, garbage, over-deep, oversize, invalid UTF-8, lone surrogates, replies for other
    relays: the caller gets exactly one final message, on_done runs exactly once, no chunk follows the final."""
    now = [1000.0]
    relay = Relay(CloudSettings(enabled=True, request_timeout_s=30), prefix="edge", device_id="dev1",
                  clock=lambda: now[0])
    relay._link.publish = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        _exercise(relay, items, now)
    finally:
        relay._link.stop(timeout=0)  # paho made a wake-up socket pair in its constructor: close it now


def _exercise(relay: Relay, items: list[tuple[bytes, str]], now: list[float]) -> None:
    sent: list[tuple[str, bytes]] = []
    outcomes: list[RelayOutcome] = []
    assert relay.forward(b'{"prompt": "hi", "id": "x", "reply_to": "a/b"}', Reply(), "req-1",
                         lambda topic, payload, **k: sent.append((topic, payload)), on_done=outcomes.append)
    [token] = list(relay._pending)
    tokens = {"mine": token, "other": b"someone-else", "none": None}
    for payload, whose in items:
        relay._events.put(Incoming(topic=relay.reply_topic, payload=payload, qos=1, mid=1, dup=False,
                                   response_topic=None, correlation_data=tokens[whose], message_expiry_s=None,
                                   received_at=time.monotonic()))
    relay._events.put(None)  # a tick with no event: the loop never waits on an empty queue
    _run_until_drained(relay)
    now[0] += 31  # past request_timeout_s: whatever is still pending is answered 'timeout'
    relay._expire()

    assert len(outcomes) == 1, outcomes
    assert relay.pending == 0
    finals = [i for i, (_, p) in enumerate(sent) if _final(p)]
    assert len(finals) == 1, sent
    assert finals[0] == len(sent) - 1, "a message was relayed after the final one"
    assert all(topic == "caller/reply" for topic, _ in sent)
    final = json.loads(sent[-1][1])
    if "error" not in final:
        assert final["served_by"] == "cloud"


def _final(payload: bytes) -> bool:
    try:
        body: Any = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and bool(body.get("done"))


def _run_until_drained(relay: CloudRelay) -> None:
    """The relay's own thread loop, run here until every queued event was handled."""
    expire = relay._expire

    def expire_then_stop_when_drained() -> None:
        expire()
        if relay._events.empty():
            relay._stopping.set()

    relay._expire = expire_then_stop_when_drained  # type: ignore[method-assign]
    try:
        relay._run()
    finally:
        relay._expire = expire  # type: ignore[method-assign]
        relay._stopping.clear()
