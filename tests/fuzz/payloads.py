"""Hostile payloads for the fuzz driver (bench/fuzz.py) and the property tests: valid messages and mutations.

Everything takes a :class:`random.Random`, so a run is reproducible from its seed, and the property tests
drive the same mutators through hypothesis' ``st.randoms()`` (which then shrinks the choices).

A mutation starts from a valid request, cancel or command and breaks it in one way that a sender, a
broken bridge or an attacker could: bit flips, truncation, nesting past the depth limit, huge strings,
wrong JSON types, unicode edge cases, bytes that are not UTF-8, JSON escapes that are not Unicode (lone
surrogates), duplicate keys, numbers past every limit, a different JSON type at the top, random bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

UNICODE_EDGES: tuple[str, ...] = (
    "",
    "\x00",
    "\x1f\x7f",
    "\u2028\u2029",  # line/paragraph separators (valid JSON, not valid JavaScript)
    "\ufeff",  # BOM
    "\u202e",  # right-to-left override
    "e\u0301\u0301\u0301",  # combining marks
    "\U0001f600\U0001f9d1\u200d\U0001f4bb",  # emoji, ZWJ sequence
    "\U0010ffff\uffff\ufffe",  # last code point, noncharacters
    "\ufffd",
    "\U0001d54f" * 40,
    '"\\/[{}]:,',
    "ïöü日本語",
    "null",
    " " * 50,
)
"""Strings that are valid Unicode but unusual; every one of them must round-trip through a reply."""

BAD_UTF8: tuple[bytes, ...] = (
    b"\xff",
    b"\xfe\xff",
    b"\xc3(",  # truncated two-byte sequence
    b"\xc0\xaf",  # overlong '/'
    b"\xed\xa0\x80",  # CESU-8 encoded surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xe2\x82",  # truncated three-byte sequence
    b"\x80",  # lone continuation byte
)
"""Byte sequences that are not UTF-8."""

SURROGATE_ESCAPES: tuple[bytes, ...] = (b"\\ud800", b"\\udfff", b"\\udc00\\ud800", b"\\ud83d", b"x\\uDBFFy")
"""JSON string escapes that json.loads accepts but that are not Unicode text (lone UTF-16 surrogates)."""

DEPTHS: tuple[int, ...] = (31, 32, 33, 100, 1000, 3000, 100_000)
"""Nesting depths around and far past the limit (32); 3,000 used to kill the daemon."""

NUMBERS: tuple[bytes, ...] = (
    b"-1", b"0", b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 5000, b"1.5",
    b"9223372036854775808", b"-0", b"1e-400", b"true", b"null",
)
"""Number-ish JSON tokens past every limit (json.loads accepts NaN/Infinity; 5,001 digits it refuses)."""


# -- valid messages --------------------------------------------------------------------------------


def valid_request(rng: random.Random, rid: str | None, *, max_tokens: int = 2,
                  reply_to: str | None = None) -> dict[str, Any]:
    """A request the daemon must answer with a final reply (``max_tokens`` tokens at most)."""
    body: dict[str, Any] = {}
    if rid is not None:
        body["id"] = rid
    if rng.random() < 0.5:
        body["prompt"] = rng.choice(("Hello", "The sky is", "Once upon a time", "ïöü 日本 \U0001f600", "x" * 200))
    else:
        body["messages"] = [{"role": "user", "content": rng.choice(("Hi there", "Why?", "\u2028ok"))}]
        if rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    body["max_tokens"] = max_tokens
    if rng.random() < 0.5:
        body["temperature"] = rng.choice((0, 0.7, 1.0))
    if rng.random() < 0.2:
        body["stream"] = True
    if rng.random() < 0.2:
        body["stop"] = rng.choice(("\n\n", ["###", "END"]))
    if rng.random() < 0.1:
        body["seed"] = rng.randrange(1 << 31)
    if rng.random() < 0.1:
        body["v"] = 1
    if reply_to is not None:
        body["reply_to"] = reply_to
    return body


def valid_cancel(rid: str) -> dict[str, Any]:
    return {"id": rid}


def valid_command(rng: random.Random, rid: str, *, reply_to: str | None = None) -> dict[str, Any]:
    """A command payload (unsigned); its name is the topic's last level."""
    body: dict[str, Any] = {"id": rid, "v": 1}
    if rng.random() < 0.3:
        body["args"] = {}
    if rng.random() < 0.2:
        body["issued_at"] = 1_700_000_000.0
    if reply_to is not None:
        body["reply_to"] = reply_to
    return body


# -- mutations ---------------------------------------------------------------------------------------


def _dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def _bitflip(rng: random.Random, body: dict[str, Any]) -> bytes:
    data = bytearray(_dumps(body))
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _byteset(rng: random.Random, body: dict[str, Any]) -> bytes:
    data = bytearray(_dumps(body))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _truncate(rng: random.Random, body: dict[str, Any]) -> bytes:
    data = _dumps(body)
    return data[: rng.randrange(len(data))]


def _deep(rng: random.Random, body: dict[str, Any]) -> bytes:
    depth = rng.choice(DEPTHS)
    opener, closer = rng.choice(((b"[", b"]"), (b'{"a":', b"}"), (b"[{\"x\":", b"}]")))
    deep = opener * depth + b"1" + closer * depth
    key = rng.choice(("prompt", "messages", "args", "id", "zz"))
    data = _dumps({k: v for k, v in body.items() if k != key})
    return data[:-1] + (b", " if len(data) > 2 else b"") + json.dumps(key).encode() + b": " + deep + b"}"


def _deep_unclosed(rng: random.Random, body: dict[str, Any]) -> bytes:
    return _dumps(body)[:-1] + b', "x": ' + b"[" * rng.choice(DEPTHS)


def _huge_string(rng: random.Random, body: dict[str, Any]) -> bytes:
    size = rng.choice((1000, 30_000, 65_000, 70_000, 200_000))
    fill = rng.choice(("x", "é", "[", '\\"', "\U0001f600"))
    text = (fill * (size // max(1, len(fill.encode()))))[:size]
    key = rng.choice(("prompt", "id", "reply_to", "stop", "model"))
    return _dumps({**body, key: text})


def _unique(rng: random.Random, text: str) -> str:
    """``text`` made unique: an id two messages share makes the second a duplicate (served once, by design)."""
    return f"{text}-{rng.getrandbits(64):016x}"


def _wrong_type(rng: random.Random, body: dict[str, Any]) -> bytes:
    values: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], {}, [1, "a"], {"a": 1}, 2**70]
    key = rng.choice([*body, "messages", "max_tokens", "temperature", "stop", "id", "args", "stream", "v"])
    value = rng.choice(values)
    out = {**body, key: _unique(rng, value) if key == "id" and isinstance(value, str) and value else value}
    if key == "messages" and rng.random() < 0.5:
        out[key] = [{"role": rng.choice(("user", "robot", 1, None)), "content": rng.choice(("hi", 5, None, []))}]
    return _dumps(out)


def _unicode(rng: random.Random, body: dict[str, Any]) -> bytes:
    edge = rng.choice(UNICODE_EDGES)
    key = rng.choice(("prompt", "id", "reply_to", "stop", "model", "content"))
    out = dict(body)
    if key == "content" and isinstance(out.get("messages"), list):
        out["messages"] = [{**m, "content": edge} for m in out["messages"]]
    else:
        out[key] = _unique(rng, edge) if key == "id" else edge
    return json.dumps(out, ensure_ascii=rng.random() < 0.5).encode("utf-8")


def _invalid_utf8(rng: random.Random, body: dict[str, Any]) -> bytes:
    data = _dumps(body)
    # Mostly inside a string value (the parser gets past the structure), sometimes anywhere.
    quotes = [i for i, b in enumerate(data) if b == 0x22]
    at = rng.choice(quotes) + 1 if quotes and rng.random() < 0.8 else rng.randrange(len(data) + 1)
    return data[:at] + rng.choice(BAD_UTF8) + data[at:]


def _surrogate(rng: random.Random, body: dict[str, Any]) -> bytes:
    key = rng.choice(("prompt", "id", "reply_to", "stop", "model", "content", "cmd", "nonce"))
    marker = "\x01SURROGATE\x01"
    out = dict(body)
    if key == "content" and isinstance(out.get("messages"), list):
        out["messages"] = [{**m, "content": marker} for m in out["messages"]]
    else:
        out[key] = marker
    return json.dumps(out).encode().replace(b"\\u0001SURROGATE\\u0001", rng.choice(SURROGATE_ESCAPES))


def _duplicate_key(rng: random.Random, body: dict[str, Any]) -> bytes:
    key = rng.choice([*body, "id", "reply_to"])
    value = rng.choice((json.dumps(_unique(rng, "dup")), "5", "null", "[1]", '"\\ud800"'))
    return _dumps(body)[:-1] + f', "{key}": {value}'.encode() + b"}"


def _extra_field(rng: random.Random, body: dict[str, Any]) -> bytes:
    return _dumps({**body, rng.choice(("extra", "Prompt", "", " id", "id\x00")): 1})


def _number(rng: random.Random, body: dict[str, Any]) -> bytes:
    key = rng.choice(("max_tokens", "temperature", "top_p", "top_k", "seed", "deadline_ms", "v", "id", "expires_at"))
    marker = "\x01NUMBER\x01"
    return json.dumps({**body, key: marker}).encode().replace(b'"\\u0001NUMBER\\u0001"', rng.choice(NUMBERS))


def _not_object(rng: random.Random, body: dict[str, Any]) -> bytes:
    return rng.choice((b"[]", b"null", b"42", b'"text"', b"true", _dumps([body]), b"[" + _dumps(body) + b"]", b""))


def _random_bytes(rng: random.Random, body: dict[str, Any]) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 7, 64, 512, 4096)))


def _whitespace(rng: random.Random, body: dict[str, Any]) -> bytes:
    return rng.choice((b"\xef\xbb\xbf", b" \t\r\n", b"\x00", b"\x0b")) + _dumps(body) + rng.choice((b"", b"\n", b" x"))


def _splice(rng: random.Random, body: dict[str, Any]) -> bytes:
    data = _dumps(body)
    cut = rng.randrange(len(data))
    return data[:cut] + data[rng.randrange(len(data)):]


MUTATORS: dict[str, Callable[[random.Random, dict[str, Any]], bytes]] = {
    "bitflip": _bitflip,
    "byteset": _byteset,
    "truncate": _truncate,
    "deep": _deep,
    "deep_unclosed": _deep_unclosed,
    "huge_string": _huge_string,
    "wrong_type": _wrong_type,
    "unicode": _unicode,
    "invalid_utf8": _invalid_utf8,
    "surrogate": _surrogate,
    "duplicate_key": _duplicate_key,
    "extra_field": _extra_field,
    "number": _number,
    "not_object": _not_object,
    "random_bytes": _random_bytes,
    "whitespace": _whitespace,
    "splice": _splice,
}


def mutate(rng: random.Random, body: dict[str, Any], kind: str | None = None) -> tuple[str, bytes]:
    """One mutation of ``body`` (a random kind unless ``kind`` names one): (kind, payload)."""
    kind = kind or rng.choice(list(MUTATORS))
    return kind, MUTATORS[kind](rng, body)
