"""The real daemon decodes several requests together ([inference] parallel) over a real Mosquitto."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.daemon import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = {"prompt": "Once upon a time", "temperature": 0}


def finals(client: Client, replies: list[str], timeout: float = 120.0) -> dict[str, dict]:
    out = {}
    for reply in replies:
        out[reply] = json.loads(client.collect(reply, timeout)[-1].payload)
    return out


def test_four_requests_sent_together_are_decoded_together(start_daemon, client: Client) -> None:
    """With four slots nobody waits for another's whole generation: every queue wait is a fraction of one
    generation, and the status and telemetry show the slots."""
    daemon = start_daemon(inference={"parallel": 4, "max_queue": 4})
    status = client.retained("edge/dev1/status", state="online")
    assert status["parallel"] == 4
    replies = [client.request("dev1", {**PROMPT, "id": f"b{i}", "max_tokens": 600}) for i in range(4)]
    bodies = finals(client, replies)
    assert all(b["finish_reason"] == "length" and b["usage"]["completion_tokens"] == 600 for b in bodies.values())
    generation_ms = min(b["timings"]["total_ms"] - b["timings"]["queue_ms"] for b in bodies.values())
    longest_wait = max(b["timings"]["queue_ms"] for b in bodies.values())
    assert longest_wait < generation_ms / 2, (longest_wait, generation_ms)
    assert len({b["text"] for b in bodies.values()}) == 1 or all(b["text"] for b in bodies.values())
    assert daemon.wait_event("model_loaded")["parallel"] == 4


def test_one_slot_queues_behind_the_running_request(start_daemon, client: Client) -> None:
    """The same load on one slot: the last request waits for the ones before it (the contrast to batching)."""
    start_daemon(inference={"parallel": 1, "max_queue": 4})
    replies = [client.request("dev1", {**PROMPT, "id": f"q{i}", "max_tokens": 600}) for i in range(3)]
    bodies = finals(client, replies)
    generation_ms = min(b["timings"]["total_ms"] - b["timings"]["queue_ms"] for b in bodies.values())
    assert bodies[replies[-1]]["timings"]["queue_ms"] > generation_ms


def test_cancelling_one_of_the_batch_leaves_the_others_running(start_daemon, client: Client) -> None:
    """A cancel ends its own sequence (its slot is free at once); the others finish in full."""
    start_daemon(inference={"parallel": 3, "max_queue": 4}, model_cfg={"n_ctx": 1200, "threads": 2})
    replies = [client.request("dev1", {**PROMPT, "id": f"c{i}", "max_tokens": 1000, "stream": True})
               for i in range(3)]
    streaming, deadline = False, time.monotonic() + 30
    while not streaming and time.monotonic() < deadline:  # c1 is running once its first chunk arrived
        m = client.messages.get(timeout=30)
        streaming = m.topic == replies[1]
        if not streaming:
            client.messages.put(m)
            time.sleep(0.01)
    client.publish("edge/dev1/infer/cancel", {"id": "c1"})
    bodies = finals(client, replies)
    assert bodies[replies[1]]["finish_reason"] == "cancelled"
    assert bodies[replies[1]]["usage"]["completion_tokens"] < 1000
    for reply in (replies[0], replies[2]):
        assert bodies[reply]["finish_reason"] == "length"
        assert bodies[reply]["usage"]["completion_tokens"] == 1000


def test_more_requests_than_slots_are_all_answered_in_order_of_arrival(start_daemon, client: Client) -> None:
    """Six requests on two slots and a queue of four: every one answered, the later ones after waiting."""
    start_daemon(inference={"parallel": 2, "max_queue": 4})
    replies = [client.request("dev1", {**PROMPT, "id": f"m{i}", "max_tokens": 300}) for i in range(6)]
    bodies = finals(client, replies)
    assert [bodies[r]["usage"]["completion_tokens"] for r in replies] == [300] * 6
    waits = [bodies[r]["timings"]["queue_ms"] for r in replies]
    assert max(waits[:2]) < min(waits[4:])
