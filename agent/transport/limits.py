"""Bounds on an arrived payload, checked before anything parses it.

``json.loads`` recurses once per nested array or object: a 6 KB payload nested 3,000 deep raises
RecursionError, deeper ones can exhaust the C stack. Every consumer of an MQTT payload calls
:func:`check_payload` first, so a parser only ever sees input of bounded size and depth. The check is
linear and recursion-free, and on the common path (fewer brackets than the depth limit) it is two
``bytes.count`` calls.

It also bounds the number of elements (:func:`json_elements`: commas and opening brackets outside
strings), so a 64 KB payload cannot make the parser and validator build tens of thousands of objects
(``[{},{},...]``). Normal payloads are mostly string bodies: a walk over their few quotes (memchr-speed
``find``) shows that little lies outside strings; one with many quotes is bounded by its commas (one
``bytes.count``), and only payloads with that many commas, or many brackets, pay for the full scan.
Measured before/after adding it (timeit, best of 9, the shared 2-core box under load): a 170 B chat
request 0.45 → 0.49 us; a 64 KB prompt 2.3 → 6.8 us (``json.loads`` of it: ~55 us); a 60 KB prompt
with 2,600 escaped quotes 2.0 → 69 us (``json.loads``: ~126 us).

:func:`top_level_strings` reads the caller's ``id``/``reply_to`` out of a payload that must not be
parsed (too deep, too large, invalid), so even a refused request can be answered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from itertools import accumulate, islice

from agent.errors import BadRequestError, TooLargeError


class PayloadTooLargeError(TooLargeError):
    """The payload has more bytes than the limit."""

    limit = "payload_bytes"


class TooDeepError(BadRequestError):
    """The payload nests arrays/objects deeper than the limit."""

    limit = "json_depth"


class TooManyElementsError(TooLargeError):
    """The payload holds more JSON elements than the limit."""

    limit = "json_elements"


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects accepted. A request needs 3 (object, messages, message) and a
command's arguments a few more; CPython's parser recurses ~1,000 deep before it fails."""

MAX_JSON_ELEMENTS = 4096
"""Default bound of :func:`json_elements` (config ``inference.max_json_elements``). A request with 64
messages counts about 200."""

PEEK_MAX_BYTES = 4 << 20
PEEK_MAX_TOKENS = 16_384
"""How far :func:`top_level_strings` looks: it loops in Python (~1 us per token on the dev box), so a
refused payload costs a few ms at most. A ``reply_to`` beyond that is not found; only the MQTT 5
Response Topic can then address the error reply."""

# A JSON string from its opening quote to its closing one (or to the end, when unterminated: a
# parser stops there, so nothing after it is ever reached), or one structural character.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}:,]', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
# Brackets → signed bytes +1 / -1, so the running depth is an accumulate over a memoryview.
_SIGN = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_SMALL = 2048  # below this, bytes.count beats a loop of find() calls
# The quote walk of _outside_at_most gives up (and the full scan decides) past this many quotes, or at
# a run of backslashes longer than this: its Python loop must stay cheaper than the scan (~0.2 us a quote).
_WALK_QUOTES = 128
_WALK_BACKSLASHES = 8
_BACKSLASH = 0x5C


def json_depth(payload: bytes) -> int:
    """The deepest nesting of arrays/objects outside strings: what a parser would recurse at most.

    Linear and recursion-free. Not a validator: for invalid JSON the number is an upper bound of the
    depth a parser reaches before it fails.
    """
    return _max_depth(_outside_strings(payload))


def _outside_strings(payload: bytes) -> bytes:
    """``payload`` without its JSON strings: brackets inside them are text, not nesting.

    All in C-speed bytes operations (a regex over string bodies costs 10x more). Escaped backslashes
    go first, so that ``\\\\"`` still ends a string and ``\\"`` does not; then the text between
    quotes is dropped. An unterminated string runs to the end: a parser stops there too.
    """
    # replace() returns the same object when there is nothing to replace: one pass either way.
    payload = payload.replace(b"\\\\", b"").replace(b'\\"', b"")
    if b'"' in payload:
        payload = b"".join(payload.split(b'"')[0::2])
    return payload


def _max_depth(bare: bytes) -> int:
    signs = bare.translate(_SIGN, _NOT_BRACKET)
    if not signs:
        return 0
    return max(accumulate(memoryview(signs).cast("b"), initial=0))


def json_elements(payload: bytes) -> int:
    """Commas plus opening brackets outside strings: what :func:`check_payload` bounds.

    For valid JSON this is the number of values inside containers (each one follows a comma or its
    container's opening bracket) plus the number of empty containers, so a parser builds at most one
    value more than this (the top level). Linear and recursion-free; for invalid JSON it counts the
    same characters.
    """
    return _count_elements(_outside_strings(payload))


def _count_elements(bare: bytes) -> int:
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{")


def check_payload(
    payload: bytes, max_bytes: int | None, max_depth: int = MAX_JSON_DEPTH, max_elements: int | None = None
) -> None:
    """Raise PayloadTooLargeError (over ``max_bytes``), TooDeepError (nested deeper than ``max_depth``,
    a ``bad_request``) or TooManyElementsError (more than ``max_elements`` by :func:`json_elements`, a
    ``too_large``); checked in that order.

    ``max_bytes`` None skips the size check, ``max_elements`` None the element count.
    """
    size = len(payload)
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLargeError(f"payload is {size} bytes; the limit is {max_bytes}")
    bare: bytes | None = None
    # Depth never exceeds the number of opening brackets: most payloads stop here.
    if _more_openers_than(payload, max_depth):
        bare = _outside_strings(payload)
        # Fewer brackets outside strings than the limit: they were text (code in a prompt, say).
        if bare.count(b"[") + bare.count(b"{") > max_depth:
            depth = _max_depth(bare)
            if depth > max_depth:
                raise TooDeepError(f"payload nests {depth} levels deep; the limit is {max_depth}")
    # The count never exceeds the bytes outside strings: a small payload, or one that is nearly all
    # string bodies (a long prompt), stops here without the full scan.
    if max_elements is None or size <= max_elements:
        return
    if bare is None:
        if _outside_at_most(payload, max_elements):
            return
        # Many quotes (dialogue in a prompt): there are at most max_depth brackets here (else the depth
        # check made ``bare``), so commas anywhere, strings included, bound the count in one pass.
        if payload.count(b",") + max_depth <= max_elements:
            return
        bare = _outside_strings(payload)
    count = _count_elements(bare)
    if count > max_elements:
        raise TooManyElementsError(
            f"payload holds {count} JSON elements (commas and brackets outside strings); the limit is {max_elements}"
        )


def _outside_at_most(payload: bytes, limit: int) -> bool:
    """True when at most ``limit`` bytes of ``payload`` lie outside its JSON strings (as
    :func:`_outside_strings` delimits them: a quote after an odd run of backslashes does not count).

    False also when it cannot tell cheaply (many quotes, long backslash runs): the caller scans.
    """
    size = len(payload)
    outside = 0
    opened = -1  # where the current string began; -1 outside strings
    start = 0  # where the current stretch outside strings began
    quotes = 0
    at = payload.find(b'"')
    while at != -1:
        quotes += 1
        if quotes > _WALK_QUOTES:
            return False
        run = 0
        while run < at and payload[at - run - 1] == _BACKSLASH:
            run += 1
            if run > _WALK_BACKSLASHES:
                return False
        if not run & 1:  # an escaped quote (odd run) neither opens nor closes a string
            if opened < 0:
                outside += at - start
                if outside > limit:
                    return False
                opened = at
            else:
                opened, start = -1, at + 1
        at = payload.find(b'"', at + 1)
    if opened < 0:
        outside += size - start
    return outside <= limit


def _more_openers_than(payload: bytes, limit: int) -> bool:
    """True when ``payload`` holds more than ``limit`` '[' and '{' (in strings or not)."""
    if len(payload) <= _SMALL:
        return payload.count(b"[") + payload.count(b"{") > limit
    # Large payloads: memchr-speed find() jumps, at most limit + 1 of them (bytes.count walks every
    # byte: 117 us against 9 us on a 64 KB prompt, measured on the 2-core dev box).
    seen = 0
    for opener in (b"[", b"{"):
        at = payload.find(opener)
        while at != -1:
            seen += 1
            if seen > limit:
                return True
            at = payload.find(opener, at + 1)
    return False


def top_level_strings(payload: bytes, names: Iterable[str]) -> dict[str, str]:
    """String members ``names`` of a payload's top-level JSON object, found without parsing the rest.

    Best effort and safe on any input (no recursion, bounded work: :data:`PEEK_MAX_TOKENS`): nested
    values are skipped however deep they go; a later duplicate key wins, as in ``json.loads``; a
    payload that is not an object, or too large, yields nothing.
    """
    wanted = frozenset(names)
    found: dict[str, str] = {}
    if len(payload) > PEEK_MAX_BYTES or payload.lstrip()[:1] != b"{":
        return found
    walker = _TopLevel()
    for match in islice(_TOKEN.finditer(payload), PEEK_MAX_TOKENS):
        member = walker.feed(match.group())
        if walker.done:
            break
        if member is not None and member[0] in wanted:
            found[member[0]] = member[1]
    return found


class _TopLevel:
    """Walks the tokens of one JSON object, yielding its top-level ``"key": "string"`` members."""

    def __init__(self) -> None:
        self.depth = 0
        self.done = False
        self._key: str | None = None
        self._state = "key"  # at depth 1: "key" → "colon" → "value" → "skip" until "," → "key"

    def feed(self, token: bytes) -> tuple[str, str] | None:
        head = token[:1]
        if head in (b"[", b"{"):
            self.depth += 1
            if self.depth == 1:
                self._state = "key"
            elif self.depth == 2 and self._state == "value":
                self._state = "skip"  # the value is a container: not a string
        elif head in (b"]", b"}"):
            self.depth -= 1
            self.done = self.depth <= 0  # the top-level object ended (or this is not JSON)
        elif self.depth == 1:
            return self._member(head, token)
        return None

    def _member(self, head: bytes, token: bytes) -> tuple[str, str] | None:
        if head == b",":
            self._state, self._key = "key", None
        elif head == b":":
            self._state = "value" if self._state == "colon" else "skip"
        elif self._state == "key":
            self._key, self._state = _decode_string(token), "colon"
        elif self._state == "value":
            self._state = "skip"
            text = _decode_string(token)
            if self._key is not None and text is not None:
                return self._key, text
        return None


def _decode_string(token: bytes) -> str | None:
    try:
        value = json.loads(token)  # one flat string literal: no recursion possible
        if isinstance(value, str):
            value.encode()  # it is echoed in a reply: a lone surrogate ("\ud800") cannot be
    except ValueError:  # unterminated, bad escape, not UTF-8, not Unicode (UnicodeEncodeError)
        return None
    return value if isinstance(value, str) else None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_unicode(payload: bytes, data: object) -> None:
    """Raise BadRequestError when ``data`` (parsed from ``payload``) holds a lone UTF-16 surrogate.

    ``json.loads`` accepts ``"\\ud800"`` escapes that are not Unicode text: such a string passes
    validation and then fails wherever it is encoded (the tokenizer, a reply, a topic). Only payloads
    with a surrogate escape in them pay for the check (a re-serialisation, bounded by the depth limit).
    """
    if b"\\u" not in payload or _SURROGATE_ESCAPE.search(payload) is None:
        return
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise BadRequestError(
            "payload holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): not Unicode text"
        ) from exc
