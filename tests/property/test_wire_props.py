"""Properties of the request and cancel parsers and of the safe peek at a refused payload's reply fields.

For any bytes: only our typed errors, quickly; an accepted request is one a reply can be built for
(it survives its own JSON round trip); whatever the peek rescues can be echoed in an error reply.
"""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.errors import AgentError, BadRequestError, TooLargeError
from agent.transport.topics import is_concrete_topic
from agent.transport.wire import (
    CancelRequest,
    InferRequest,
    error_payload,
    parse_cancel,
    parse_request,
    peek_reply_fields,
)
from tests.fuzz.payloads import MUTATORS, SURROGATE_ESCAPES, mutate, valid_cancel, valid_request
from tests.property.conftest import bounded

MAX_BYTES = 65_536

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# Objects with the request's own field names, holding any JSON: the validators see every type.
FIELDS = ("v", "id", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "seed",
          "stop", "stream", "reply_to", "deadline_ms", "model")
request_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


def _check_request(payload: bytes) -> InferRequest | AgentError:
    got = bounded(lambda: parse_request(payload, MAX_BYTES))
    if isinstance(got, InferRequest):
        # A request that was accepted can be answered: its fields serialise, and read back the same.
        assert InferRequest.model_validate_json(got.model_dump_json().encode("utf-8")) == got
    else:
        assert isinstance(got, BadRequestError), got
        assert str(got)
    return got


def _check_peek(payload: bytes) -> None:
    rid, reply_to = bounded(lambda: peek_reply_fields(payload))  # type: ignore[misc]
    if rid is not None:
        assert 0 < len(rid) <= 128
    if reply_to is not None:
        assert reply_to
        is_concrete_topic(reply_to)  # a bool for any string: never raises
    # Whatever was rescued can be echoed: the error reply encodes and reads back with that id.
    body = json.loads(error_payload(rid, "bad_request", "m", "dev1"))
    assert body["id"] == rid


@given(st.binary(max_size=1024))
@example(b"")
@example(b'{"id": "\\ud800", "prompt": 3, "reply_to": "r/\\udfff"}')
@example(b'{"prompt": "\\ud800"}')
def test_any_bytes_are_a_request_or_a_bad_request(payload: bytes) -> None:
    """Arbitrary bytes: an InferRequest or BadRequestError, quickly; the peek never fails."""
    _check_request(payload)
    _check_peek(payload)


@given(request_like)
def test_any_json_object_with_request_fields_validates_without_surprises(body: dict[str, Any]) -> None:
    """Any JSON under the request's field names: accepted (and answerable) or refused 'bad_request'."""
    payload = json.dumps(body).encode()
    _check_request(payload)
    _check_peek(payload)


@given(st.randoms(use_true_random=False), st.sampled_from(sorted(MUTATORS)), st.booleans())
def test_mutated_requests_are_parsed_or_refused_with_a_typed_error(
    rng: random.Random, kind: str, address: bool
) -> None:
    """Every mutation of a valid request (bit flips, truncation, depth, huge strings, types, unicode,
    bad UTF-8, surrogates, numbers...) parses or is refused with our typed error; the peek never fails."""
    body = valid_request(rng, f"req-{rng.randrange(1000)}", reply_to="caller/reply" if address else None)
    _, payload = mutate(rng, body, kind)
    got = _check_request(payload)
    if isinstance(got, TooLargeError):
        assert len(payload) > MAX_BYTES
    _check_peek(payload)


@given(st.randoms(use_true_random=False))
def test_valid_requests_are_accepted_as_sent(rng: random.Random) -> None:
    """The fuzz driver's valid requests are accepted, with the id and reply address they carry."""
    body = valid_request(rng, "ok-1", reply_to="caller/reply")
    got = _check_request(json.dumps(body).encode())
    assert isinstance(got, InferRequest)
    assert (got.id, got.reply_to) == ("ok-1", "caller/reply")
    assert peek_reply_fields(json.dumps(body).encode()) == ("ok-1", "caller/reply")


@given(st.sampled_from(SURROGATE_ESCAPES), st.sampled_from(("prompt", "stop", "model", "id", "reply_to")))
def test_lone_surrogate_escapes_are_bad_requests(escape: bytes, field: str) -> None:
    """Valid JSON but not Unicode text: refused 'bad_request' at parse time, never failing later."""
    payload = b'{"prompt": "x", "' + field.encode() + b'": "' + escape + b'"}'
    got = _check_request(payload)
    assert isinstance(got, BadRequestError)
    _check_peek(payload)


@given(st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()))
def test_cancel_parses_or_is_a_bad_request(payload: bytes) -> None:
    """The cancel parser: a CancelRequest or 'bad_request', never anything else."""
    got = bounded(lambda: parse_cancel(payload))
    assert isinstance(got, CancelRequest | BadRequestError), got
    if isinstance(got, CancelRequest):
        assert 0 < len(got.id) <= 128
        got.model_dump_json()


@given(st.randoms(use_true_random=False), st.sampled_from(sorted(MUTATORS)))
def test_mutated_cancels_parse_or_are_bad_requests(rng: random.Random, kind: str) -> None:
    """Mutations of a valid cancel: a CancelRequest or 'bad_request'."""
    _, payload = mutate(rng, valid_cancel("req-1"), kind)
    got = bounded(lambda: parse_cancel(payload))
    assert isinstance(got, CancelRequest | BadRequestError), got
    _check_peek(payload)


@given(st.integers(min_value=0, max_value=3 * MAX_BYTES))
def test_size_limit_is_exact(size: int) -> None:
    """Over ``max_bytes`` is 'too_large' before parsing; at or under it, never."""
    payload = b'{"prompt": "' + b"x" * max(0, size - 14) + b'"}'
    got = bounded(lambda: parse_request(payload, MAX_BYTES))
    assert isinstance(got, TooLargeError) == (len(payload) > MAX_BYTES)


REFUSED_BY_BROKERS = [*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), *map(chr, range(0xFDD0, 0xFDF0)),
                      *(chr(plane << 16 | low) for plane in range(17) for low in (0xFFFE, 0xFFFF)), "+", "#"]


@given(st.text(max_size=40) | st.sampled_from(REFUSED_BY_BROKERS).map(lambda c: f"caller/{c}/r"))
@example("caller/\x1f\x7f")
@example("caller/\U0010ffff")
def test_a_concrete_topic_is_one_the_broker_accepts(topic: str) -> None:
    """Regression: a reply_to with a control character or a noncharacter passed is_concrete_topic, and the
    reply to it got the daemon disconnected by Mosquitto ('malformed packet'), again after every reconnect
    (its session resends the reply). A topic we publish to holds none of what brokers refuse."""
    concrete = is_concrete_topic(topic)
    refused = any(c in topic for c in REFUSED_BY_BROKERS) or any(0xD800 <= ord(c) <= 0xDFFF for c in topic)
    assert concrete == (bool(topic) and not refused)
