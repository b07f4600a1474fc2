"""Properties of the pre-parse limits: the linear depth scan against a recursive reference and against
``json.loads`` itself, the size bound, the element count (and its quote-walk shortcut against the full
scan), and the top-level peek against a full parse.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from hypothesis import assume, example, given
from hypothesis import strategies as st

from agent.errors import AgentError, BadRequestError, TooLargeError
from agent.transport.limits import (
    MAX_JSON_DEPTH,
    TooDeepError,
    TooManyElementsError,
    _outside_at_most,
    _outside_strings,
    check_payload,
    json_depth,
    json_elements,
    top_level_strings,
)
from tests.property.conftest import bounded

# Strings full of what confuses a scanner: brackets, quotes, backslashes, escapes of all three.
tricky_text = st.text(alphabet=st.sampled_from('[]{}"\\:,/ aé\u2028\U0001f600'), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=30,
)


def reference_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, the obvious recursive way."""
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


def encodings(value: Any) -> st.SearchStrategy[bytes]:
    """The same JSON value as text in the ways a sender may write it (compact, indented, ASCII-escaped)."""
    return st.sampled_from([
        json.dumps(value).encode(),
        json.dumps(value, ensure_ascii=False).encode(),
        json.dumps(value, separators=(",", ":")).encode(),
        json.dumps(value, indent=1).encode(),
        # '/' may be escaped in JSON; Python never does it itself.
        json.dumps(value).replace("/", "\\/").encode(),
    ])


@given(json_values.flatmap(lambda v: st.tuples(st.just(v), encodings(v))))
def test_depth_scan_equals_the_recursive_reference(case: tuple[Any, bytes]) -> None:
    """For any JSON text, the linear scan reports exactly the nesting a recursive walk finds."""
    value, payload = case
    assert json_depth(payload) == reference_depth(value)


@given(st.integers(min_value=0, max_value=5000), st.sampled_from([("[", "]"), ('{"k":', "}"), ('[{"a":[', "]}]")]),
       tricky_text)
def test_check_payload_refuses_exactly_what_is_too_deep(depth: int, brackets: tuple[str, str], text: str) -> None:
    """Nesting built to any depth (with tricky strings inside): refused iff deeper than the limit."""
    opener, closer = brackets
    payload = (opener * depth + json.dumps(text) + closer * depth).encode()
    per_level = opener.count("[") + opener.count("{")
    expected = reference_depth(json.loads(payload)) if depth < 200 else depth * per_level
    got = bounded(lambda: check_payload(payload, None))
    assert isinstance(got, BadRequestError) == (expected > MAX_JSON_DEPTH)
    assert json_depth(payload) == expected


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
@example(b"[" * (sys.getrecursionlimit() + 10))
@example(b'"\\\\"' + b"[" * 40)
def test_what_passes_the_check_never_makes_json_loads_recurse_too_far(payload: bytes) -> None:
    """Anything check_payload lets through, json.loads parses or refuses with ValueError, never RecursionError;
    and for what json.loads accepts, the scan agrees with the parsed value's depth."""
    got = bounded(lambda: check_payload(payload, None))
    try:
        parsed = json.loads(payload)
    except RecursionError:
        assert isinstance(got, BadRequestError), "a payload that makes json.loads recurse passed the check"
        return
    except ValueError:
        return
    assert json_depth(payload) == reference_depth(parsed)
    assert isinstance(got, BadRequestError) == (reference_depth(parsed) > MAX_JSON_DEPTH)


@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=2500), st.integers(min_value=0, max_value=40))
def test_size_and_depth_limits_on_any_bytes(payload: bytes, max_bytes: int, max_depth: int) -> None:
    """On any bytes: TooLargeError iff over max_bytes, else BadRequestError iff deeper than max_depth."""
    got = bounded(lambda: check_payload(payload, max_bytes, max_depth))
    assert not isinstance(got, AgentError) or isinstance(got, BadRequestError)
    if len(payload) > max_bytes:
        assert isinstance(got, TooLargeError)
    else:
        assert isinstance(got, BadRequestError) == (json_depth(payload) > max_depth)


def reference_elements(value: Any) -> int:
    """Values inside containers plus empty containers, the obvious recursive way (what json_elements counts)."""
    if isinstance(value, list):
        children = value
    elif isinstance(value, dict):
        children = list(value.values())
    else:
        return 0
    return max(len(children), 1) + sum(reference_elements(v) for v in children)


@given(json_values.flatmap(lambda v: st.tuples(st.just(v), encodings(v))))
def test_element_count_equals_the_recursive_reference(case: tuple[Any, bytes]) -> None:
    """For any JSON text, the linear count is the number of values inside containers plus empty containers,
    and a parser builds at most one value more than it (the top level)."""
    value, payload = case
    assert json_elements(payload) == reference_elements(value)


# Bytes full of what the quote walk must get right: quotes, backslash runs, separators, long plain text.
scanner_text = st.lists(
    st.sampled_from(['"', "\\", "\\", ",", "[", "{", "]", "}", ":", " ", "a", "x" * 50, '\\"', '"a"']),
    max_size=300,
).map(lambda parts: "".join(parts).encode())


@given(scanner_text | st.binary(max_size=1500), st.integers(min_value=0, max_value=400),
       st.sampled_from([0, 3, 32, 10_000]))
@example(b'"' + b"x" * 100 + b'"' + b"," * 5, 4, 10_000)
@example(b'\\\\\\\\\\"' + b"," * 50, 10, 10_000)
@example(b'"' + b'\\"' * 300 + b',"', 300, 0)  # too many quotes to walk: bounded by its commas
def test_the_shortcuts_never_claim_less_than_the_scan_finds(payload: bytes, limit: int, max_depth: int) -> None:
    """When the quote walk says at most ``limit`` bytes lie outside strings, the full scan agrees; and
    with its shortcuts the element check refuses exactly what the full count puts over the limit."""
    if bounded(lambda: _outside_at_most(payload, limit)):
        assert len(_outside_strings(payload)) <= limit
    got = bounded(lambda: check_payload(payload, None, max_depth=max_depth, max_elements=limit))
    if isinstance(got, TooDeepError):
        assert json_depth(payload) > max_depth
        return
    assert isinstance(got, TooManyElementsError) == (json_elements(payload) > limit)


members = st.lists(st.tuples(st.sampled_from(["id", "reply_to", "prompt", "x", "i\\u0064"]),
                             json_values | tricky_text), max_size=6)


@given(members, st.sampled_from([", ", ",", " ,\n "]))
def test_top_level_strings_agree_with_a_full_parse(items: list[tuple[str, Any]], sep: str) -> None:
    """For a JSON object (duplicate keys allowed, nested values of any kind): every string member the peek
    finds is one the object holds at its top level, and where json.loads ends with a string, the peek
    returns that same string."""
    payload = ("{" + sep.join(f'"{k}": {json.dumps(v)}' for k, v in items) + "}").encode()
    parsed = json.loads(payload)  # the last duplicate wins
    assume(isinstance(parsed, dict))
    found = bounded(lambda: top_level_strings(payload, ("id", "reply_to", "prompt", "x")))
    assert isinstance(found, dict)
    for name, value in found.items():
        assert any(json.loads(f'"{k}"') == name and v == value for k, v in items), (name, value)
    for name in ("id", "reply_to", "prompt", "x"):
        if isinstance(parsed.get(name), str) and not any(k == name and not isinstance(v, str) for k, v in items):
            assert found.get(name) == parsed[name]


@given(st.binary(max_size=600))
def test_top_level_strings_is_safe_on_any_bytes(payload: bytes) -> None:
    """Any bytes: a dict of encodable strings, quickly."""
    found = bounded(lambda: top_level_strings(payload, ("id", "reply_to")))
    assert isinstance(found, dict)
    for value in found.values():
        value.encode()
