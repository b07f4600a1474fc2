"""Request parsing and reply shapes of the MQTT wire protocol."""

from __future__ import annotations

import json

import pytest

from agent.errors import BadRequestError, TooLargeError
from agent.transport.schemas import render_schemas
from agent.transport.wire import chunk_payload, error_payload, parse_cancel, parse_request, peek_reply_fields
from tests.support.daemon import REPO


def test_chat_request_parses_with_defaults() -> None:
    """A minimal chat request validates; sampling it does not set is left to the model's defaults."""
    req = parse_request(b'{"messages": [{"role": "user", "content": "hi"}]}', 1000)
    assert req.id is None
    assert (req.temperature, req.top_p, req.top_k, req.min_p, req.repeat_penalty) == (None,) * 5
    assert req.stream is False
    assert req.stop_list() == []


def test_single_stop_string_becomes_a_list() -> None:
    """'stop' may be one string or a list."""
    assert parse_request(b'{"prompt": "x", "stop": "END"}', 1000).stop_list() == ["END"]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"prompt": "x", "stop": [""]}',
        b'{"prompt": "x", "temperature": -1}',
        b'{"prompt": "x", "max_tokens": 0}',
        b'{"prompt": "x", "id": ""}',
        b'{"messages": []}',
        b'{"messages": [{"role": "robot", "content": "x"}]}',
        b'{"prompt": "x", "v": 2}',
    ],
)
def test_invalid_values_are_bad_requests(payload: bytes) -> None:
    """Out-of-range or wrongly typed values raise BadRequestError with the field named."""
    with pytest.raises(BadRequestError):
        parse_request(payload, 1000)


def test_oversize_payload_is_too_large_before_parsing() -> None:
    """The size limit is checked before JSON decoding."""
    with pytest.raises(TooLargeError, match="limit is 10"):
        parse_request(b"x" * 11, 10)


def test_peek_reply_fields_rescues_id_and_reply_to_from_an_invalid_request() -> None:
    """An invalid request can still be answered if its id and reply_to are readable."""
    assert peek_reply_fields(b'{"id": "a", "reply_to": "r/t", "prompt": 1}') == ("a", "r/t")
    assert peek_reply_fields(b"nonsense") == (None, None)
    assert peek_reply_fields(b'{"id": 5}') == (None, None)


def test_cancel_needs_an_id() -> None:
    """A cancel message must name the request."""
    assert parse_cancel(b'{"id": "x"}').id == "x"
    with pytest.raises(BadRequestError):
        parse_cancel(b"{}")


def test_hot_path_payloads_match_the_schema_shapes() -> None:
    """Chunk and error payloads built without pydantic have the documented keys."""
    assert json.loads(chunk_payload("i", 3, "é")) == {"id": "i", "seq": 3, "delta": "é"}
    err = json.loads(error_payload("i", "overloaded", "full", "dev", 500))
    assert err == {"id": "i", "done": True, "device_id": "dev",
                   "error": {"code": "overloaded", "message": "full", "retry_after_ms": 500}}


def test_committed_json_schemas_are_current() -> None:
    """docs/schemas/ holds exactly the schemas of the wire models, telemetry and events included, and they are
    current (regenerate: python -m agent.transport.schemas)."""
    rendered = render_schemas()
    assert {"telemetry.json", "event.json", "infer-request.json", "status.json"} <= set(rendered)
    assert {p.name for p in (REPO / "docs" / "schemas").glob("*.json")} == set(rendered)
    for name, text in rendered.items():
        path = REPO / "docs" / "schemas" / name
        assert path.read_text() == text, f"{path} is stale"
