"""Request limits on the real daemon over real Mosquitto (issue 10, "never down because of a message").

Each over-limit request gets its error reply with the right code, the daemon keeps serving, and the
limit's counter in the retained telemetry moves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.support.broker import Broker
from tests.support.daemon import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0}
LIMITS = {
    "max_json_elements": 64,
    "max_messages": 2,
    "max_stop_sequences": 2,
    "max_stop_chars": 8,
    "max_prompt_tokens": 200,  # the chat above is ~30 tokens with its template; the long prompt is 500+
    "max_tokens_limit": 4,
    "rate_per_client_per_s": 0.2,  # one token back every 5 s: the third quick request is refused
    "rate_burst": 2,
}


def final(client: Client, reply: str, timeout: float = 60) -> dict[str, Any]:
    return json.loads(client.collect(reply, timeout=timeout)[-1].payload)


def wait_telemetry(client: Client, check: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
    """Poll the retained telemetry (interval 1 s here) until ``check`` holds."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = client.retained("edge/dev1/telemetry")
        if check(seen):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"telemetry never matched; last: {seen}")


def test_over_limit_requests_are_refused_counted_and_the_daemon_keeps_serving(start_daemon, broker: Broker) -> None:
    """Too many JSON elements, messages, stop sequences or prompt tokens, and a caller over its rate:
    each answered with its code (rate_limited with retry_after_ms, for MQTT 5 and 3.1.1 callers), the
    clamp of max_tokens served and counted, every counter in telemetry 'limits', and requests served after."""
    d = start_daemon(inference=LIMITS, telemetry={"interval_s": 1.0})
    client = Client(broker.port)
    old = Client(broker.port, protocol=paho.MQTTv311)
    try:
        cases = {
            "elements": ({**CHAT, "id": "e", "stop": ["a"] * 70}, "too_large", "JSON elements"),
            "messages": ({**CHAT, "id": "m", "messages": CHAT["messages"] * 3}, "too_large",
                         "3 messages; the limit is 2"),
            "stops": ({**CHAT, "id": "s", "stop": ["a", "b", "c"]}, "bad_request", "3 stop sequences"),
            "stop_chars": ({**CHAT, "id": "sc", "stop": "123456789"}, "bad_request", "9 characters long"),
            "prompt": ({"id": "p", "prompt": "word " * 200}, "too_large", "tokens; the limit is 200"),
        }
        replies = {name: client.request("dev1", body) for name, (body, _, _) in cases.items()}
        for name, (_, code, text) in cases.items():
            body = final(client, replies[name])
            assert body["error"]["code"] == code, (name, body)
            assert text in body["error"]["message"], (name, body)

        # max_tokens over the limit is clamped, not refused.
        clamped = final(client, client.request("dev1", {**CHAT, "id": "big", "max_tokens": 50}))
        assert clamped["usage"]["completion_tokens"] == 4, clamped

        # One reply address, three requests at once: burst 2, the third is rate_limited (MQTT 5).
        same = "test/limits/same"
        client.subscribe(same)
        for i in range(3):
            client.publish("edge/dev1/infer", {**CHAT, "id": f"r{i}", "max_tokens": 2}, response_topic=same)
        bodies = _finals(client, same, 3)
        limited = [b for b in bodies if "error" in b]
        assert [(b["id"], b["error"]["code"]) for b in limited] == [("r2", "rate_limited")], bodies
        assert 0 < limited[0]["error"]["retry_after_ms"] <= 5000
        assert sorted(b["id"] for b in bodies if "text" in b) == ["r0", "r1"]

        # The same for a 3.1.1 caller, keyed by its payload reply_to.
        old_reply = "test/limits/old"
        old.subscribe(old_reply)
        for i in range(3):
            old.publish("edge/dev1/infer", {**CHAT, "id": f"o{i}", "max_tokens": 2, "reply_to": old_reply})
        old_bodies = _finals(old, old_reply, 3)
        assert [b["error"]["code"] for b in old_bodies if "error" in b] == ["rate_limited"], old_bodies

        # Still serving, from a fresh reply address.
        served = final(client, client.request("dev1", {**CHAT, "id": "after", "max_tokens": 2}))
        assert served["usage"]["completion_tokens"] == 2
        assert d.proc is not None and d.proc.poll() is None

        expected = {"json_elements": 1, "messages": 1, "stop": 2, "prompt_tokens": 1, "rate_limited": 2,
                    "max_tokens_clamped": 1, "payload_bytes": 0, "json_depth": 0, "queue_full": 0}
        tele = wait_telemetry(client, lambda t: t.get("limits") == expected)
        assert tele["messages_rejected"] == 1  # the element limit is the bulkhead's (pre-parse) refusal
        events = d.events()
        rejected = [e for e in events if e.get("event") == "message_rejected"]
        assert [e["reason"] for e in rejected] == ["too_many_elements"]
        assert sum(1 for e in events if e.get("event") == "request_rejected" and e.get("code") == "rate_limited") == 2
    finally:
        client.close()
        old.close()


def _finals(client: Client, topic: str, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The first ``n`` final messages on ``topic`` (stream chunks skipped), in arrival order."""
    got = [body for body in (json.loads(m.payload) for m in client.until_finals(topic, n, timeout))
           if body.get("done")]
    assert len(got) == n, (topic, got)
    return got
