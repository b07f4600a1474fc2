"""Payload bounds checked before parsing: size, JSON nesting depth, and the safe top-level peek."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pytest

from agent.errors import BadRequestError, TooLargeError
from agent.transport.limits import (
    MAX_JSON_DEPTH,
    MAX_JSON_ELEMENTS,
    PEEK_MAX_TOKENS,
    PayloadTooLargeError,
    TooDeepError,
    TooManyElementsError,
    _outside_at_most,
    check_payload,
    json_depth,
    json_elements,
    top_level_strings,
)
from agent.transport.wire import parse_cancel, parse_request, peek_reply_fields

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def nested(depth: int, *, open_: str = "[", close: str = "]", inner: str = "1") -> bytes:
    return (open_ * depth + inner + close * depth).encode()


@pytest.mark.parametrize(
    ("payload", "depth"),
    [
        (b"", 0),
        (b"42", 0),
        (b'"just a string"', 0),
        (b"{}", 1),
        (b"[]", 1),
        (json.dumps(CHAT).encode(), 3),
        (nested(3000), 3000),
        (nested(40, open_='{"a":', close="}"), 40),
        (b'{"a": [[[[1]]], [2]], "b": {"c": {}}}', 5),
        # Brackets inside strings are text, not nesting.
        (json.dumps({"prompt": "[" * 3000}).encode(), 1),
        (json.dumps({"prompt": "{[" * 500 + "]}" * 10}).encode(), 1),
        # Escaped quotes do not end a string; an escaped backslash before a quote does.
        (b'{"a": "x\\"[[[[[[[[", "b": [1]}', 2),
        (b'{"a": "x\\\\", "b": [[[1]]]}', 4),
        (b'{"a": "\\\\\\"[[[["}', 1),
        # Unicode escapes of a quote are not quotes.
        (b'{"a": "\\u0022[[[[[["}', 1),
        # An unterminated string runs to the end: a parser stops there, so what follows never counts.
        (b'[[["abc [[[[[[[[[[', 3),
        # Closers before openers: a parser fails at the first one and never reaches the rest.
        (b"]]][[[[", 1),
        (b"[" * 3000, 3000),
        (("[" * 3 + "é" * 10 + "]" * 3).encode(), 3),
    ],
    ids=["empty", "number", "string", "object", "array", "chat", "3000-deep", "objects-40", "mixed",
         "brackets-in-string", "mixed-in-string", "escaped-quote", "escaped-backslash", "escapes-run",
         "unicode-quote", "unterminated", "closers-first", "unclosed", "utf8"],
)
def test_json_depth_counts_nesting_outside_strings(payload: bytes, depth: int) -> None:
    """The depth is the deepest nesting of arrays/objects a parser would reach; strings hide brackets."""
    assert json_depth(payload) == depth


@pytest.mark.parametrize(
    "payload",
    [
        nested(3000),
        nested(MAX_JSON_DEPTH + 1),
        b'{"id": "x", "reply_to": "r/t", "prompt": ' + nested(100) + b"}",
        b"[" * 100_000,
        b'{"a":' * 5000,
    ],
    ids=["3000-deep", "limit+1", "deep-value", "unclosed-100k", "objects-unclosed"],
)
def test_over_deep_payloads_are_bad_requests(payload: bytes) -> None:
    """Anything nested deeper than the limit is refused 'bad_request' with the depth in the message."""
    with pytest.raises(BadRequestError, match="levels deep") as info:
        check_payload(payload, None)
    assert not isinstance(info.value, TooLargeError)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps(CHAT).encode(),
        nested(MAX_JSON_DEPTH),
        json.dumps({"prompt": "[" * 60_000}).encode(),
        json.dumps({"stop": [["x"]] * 20, "prompt": "{" * 5000}).encode(),
        b"[" * 20 + b"{" * 12,
        b"\xff\xfe[[[",
        b"",
    ],
    ids=["chat", "at-limit", "brackets-in-long-string", "many-shallow", "exactly-limit-openers", "not-utf8", "empty"],
)
def test_payloads_within_the_depth_limit_pass(payload: bytes) -> None:
    """Normal requests, the limit itself and brackets inside strings are not refused."""
    check_payload(payload, 1 << 20)


def test_size_is_checked_first_and_is_too_large() -> None:
    """Over max_bytes is 'too_large' and names both numbers, whatever the content."""
    with pytest.raises(TooLargeError, match="70000 bytes; the limit is 65536") as info:
        check_payload(b"x" * 70_000, 65_536)
    assert info.value.code == "too_large"
    check_payload(b"x" * 65_536, 65_536)


@pytest.mark.parametrize(
    ("payload", "count"),
    [
        (b"", 0),
        (b"42", 0),
        (b"[]", 1),
        (b"[1]", 1),
        (b"[1,2,3]", 3),
        (b'{"a": 1, "b": [1, 2], "c": {}}', 6),
        (json.dumps(CHAT).encode(), 4),
        # Separators inside strings are text; escaped quotes do not end a string.
        (json.dumps({"prompt": "a, b, [c], {d}" * 1000}).encode(), 1),
        (b'{"a": "x\\"[,,", "b": [1, 2]}', 4),
        (b'{"a": "x\\\\", "b": [1, 2]}', 4),
        (b"[" + b"0," * 5000 + b"0]", 5001),
        (b'[[[",,,', 3),
    ],
    ids=["empty", "number", "empty-array", "one", "three", "object", "chat", "separators-in-string",
         "escaped-quote", "escaped-backslash", "5001-items", "unterminated"],
)
def test_json_elements_counts_separators_and_openers_outside_strings(payload: bytes, count: int) -> None:
    """Commas plus opening brackets outside strings: one per value inside a container, one per empty one."""
    assert json_elements(payload) == count


def test_too_many_elements_is_too_large_and_names_both_numbers() -> None:
    """A 64 KB array of zeros is refused 'too_large' before parsing, with the count and the limit."""
    payload = b'{"prompt": "x", "stop": [' + b"0," * 20_000 + b"0]}"
    with pytest.raises(TooManyElementsError, match=r"20003 JSON elements .*; the limit is 4096") as info:
        check_payload(payload, 65_536, max_elements=MAX_JSON_ELEMENTS)
    assert info.value.code == "too_large"
    assert info.value.limit == "json_elements"
    check_payload(payload, 65_536)  # no element limit given: not checked
    check_payload(payload, 65_536, max_elements=20_003)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"[" * 40 + b"0," * 5000, TooDeepError),  # too deep and too many: depth is checked first
        (b"0," * 40_000, PayloadTooLargeError),  # too large and too many: size first
    ],
    ids=["deep-first", "size-first"],
)
def test_limits_are_checked_size_depth_elements(payload: bytes, error: type[Exception]) -> None:
    """Each refusal names the first limit broken, in the order size, depth, elements."""
    with pytest.raises(error):
        check_payload(payload, 65_536, max_elements=100)


@pytest.mark.parametrize(
    ("payload", "limit", "expected"),
    [
        (json.dumps({"prompt": "x" * 60_000}).encode(), 4, True),  # outside strings: `{`, `: ` and `}`
        (json.dumps({"prompt": "x" * 60_000}).encode(), 3, False),
        (b"[" + b"0," * 100 + b"0]", 1000, True),
        (b"[" + b"0," * 100 + b"0]", 100, False),
        (b'{"a": "' + b'\\"' * 300 + b'"}', 10_000, False),  # 300 escaped quotes: too many to walk
        (b'{"a": "' + b"\\" * 20 + b'"}', 10_000, False),  # a long backslash run: gives up
        (b'{"a": "x\\"' + b"0," * 50 + b'"}', 20, True),  # the escaped quote keeps the string open
        (b'{"a": "unterminated' + b"," * 500, 10, True),
    ],
    ids=["long-prompt", "long-prompt-tiny-limit", "array", "array-over", "many-quotes", "backslash-run",
         "escaped-quote", "unterminated"],
)
def test_the_quote_walk_bounds_what_lies_outside_strings(payload: bytes, limit: int, expected: bool) -> None:
    """True only when at most ``limit`` bytes lie outside strings; False too when it cannot tell cheaply."""
    assert _outside_at_most(payload, limit) is expected


def test_parsers_refuse_deep_payloads_instead_of_recursing() -> None:
    """parse_request and parse_cancel answer 'bad_request' for a 3,000-deep payload (was RecursionError)."""
    deep = b'{"prompt": "x", "stop": ' + nested(3000) + b"}"
    with pytest.raises(BadRequestError, match="levels deep"):
        parse_request(deep, 1 << 20)
    with pytest.raises(BadRequestError, match="levels deep"):
        parse_cancel(b'{"id": ' + nested(3000) + b"}")


def test_deep_nesting_beyond_the_interpreter_limit_is_refused_too() -> None:
    """Deeper than the recursion limit (what used to kill the daemon) is a plain BadRequestError."""
    deep = nested(sys.getrecursionlimit() * 10)
    with pytest.raises(BadRequestError):
        parse_request(deep, 1 << 20)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"id": "a", "reply_to": "r/1", "prompt": "x"}', {"id": "a", "reply_to": "r/1"}),
        (b'{"prompt": ' + nested(3000) + b', "reply_to": "after/deep", "id": "d"}',
         {"reply_to": "after/deep", "id": "d"}),
        (b'{"x": {"reply_to": "nested/no"}, "reply_to": "top/yes"}', {"reply_to": "top/yes"}),
        (b'{"x": [{"reply_to": "nested/no"}]}', {}),
        (b'{"reply_to": "first", "reply_to": "last"}', {"reply_to": "last"}),
        (b'{"reply_to": 5, "id": ["x"]}', {}),
        (b'{"id": "caf\\u00e9", "reply_to": "a\\"b"}', {"id": "café", "reply_to": 'a"b'}),
        (b'[{"reply_to": "in/array"}]', {}),
        (b'  {"reply_to": "lead/space"}', {"reply_to": "lead/space"}),
        (b'{"reply_to": "r/\xff", "id": "ok"}', {"id": "ok"}),
        (b'{"a": "unterminated, "reply_to": "r"}', {}),
        (b'{"reply_to": "r"} {"reply_to": "second/object"}', {"reply_to": "r"}),
        (b"not json", {}),
        (b"", {}),
        (b'{"prompt": "' + b"[" * 5000 + b'", "reply_to": "past/brackets"}', {"reply_to": "past/brackets"}),
    ],
    ids=["flat", "after-3000-deep", "nested-key-ignored", "only-nested", "last-wins", "not-strings", "escapes",
         "array", "whitespace", "bad-utf8-value", "unterminated", "second-object", "not-json", "empty",
         "brackets-in-string"],
)
def test_top_level_strings_reads_only_the_top_level(payload: bytes, expected: dict[str, str]) -> None:
    """Only string members of the top-level object are returned, however deep or broken the rest is."""
    assert top_level_strings(payload, ("id", "reply_to")) == expected


def test_peek_reply_fields_survives_a_3000_deep_payload() -> None:
    """The error path's (id, reply_to) peek no longer parses the payload, so it cannot recurse."""
    payload = b'{"id": "deep-1", "messages": ' + nested(3000) + b', "reply_to": "caller/replies"}'
    assert peek_reply_fields(payload) == ("deep-1", "caller/replies")
    assert peek_reply_fields(b"\xff" + payload) == (None, None)


def test_peek_stops_after_its_token_budget() -> None:
    """A reply_to beyond PEEK_MAX_TOKENS tokens is not looked for: bounded work on a refused payload."""
    far = b'{"a": ' + b"[" * (PEEK_MAX_TOKENS + 10) + b"]" * (PEEK_MAX_TOKENS + 10) + b', "reply_to": "far"}'
    assert top_level_strings(far, ("reply_to",)) == {}


def _best_us(fn: Callable[[bytes], object], payload: bytes, repeat: int = 50) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn(payload)
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def test_common_path_is_cheap_next_to_parsing() -> None:
    """On a 64 KB request the pre-parse check costs a small fraction of json.loads (no per-byte Python)."""
    payload = json.dumps({"id": "q", "messages": [{"role": "user", "content": "word " * 13_000}]}).encode()
    assert 60_000 < len(payload) <= 65_536
    check_us = _best_us(lambda p: check_payload(p, 65_536, max_elements=MAX_JSON_ELEMENTS), payload)
    parse_us = _best_us(json.loads, payload)
    assert check_us < parse_us / 2, (check_us, parse_us)
