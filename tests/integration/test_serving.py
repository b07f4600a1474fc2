"""The daemon answers inference requests over a real Mosquitto, as a subprocess, with real tiny models."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import paho.mqtt.client as paho
import pytest

from tests.support.daemon import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0}


def final(messages: list[paho.MQTTMessage]) -> dict:
    return json.loads(messages[-1].payload)


def test_mqtt5_request_gets_final_reply_with_correlation_data(start_daemon, client: Client) -> None:
    """An MQTT 5 request is answered on its Response Topic, echoing Correlation Data, with usage and timings."""
    start_daemon()
    reply = client.request("dev1", {**CHAT, "id": "r1", "max_tokens": 16}, correlation=b"\x00corr")
    msgs = client.collect(reply)
    body = final(msgs)
    assert body["id"] == "r1"
    assert body["done"] is True
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16
    assert body["usage"]["prompt_tokens"] > 0
    assert body["text"]
    assert body["served_by"] == "dev1"
    assert body["device_id"] == "dev1"
    assert set(body["timings"]) >= {"ttft_ms", "tokens_per_second", "queue_ms", "total_ms"}
    assert msgs[-1].properties.CorrelationData == b"\x00corr"


def test_mqtt311_client_uses_reply_to_in_payload(start_daemon, broker) -> None:
    """A 3.1.1 client (no properties) gets its answer on the payload's reply_to topic."""
    start_daemon()
    c = Client(broker.port, protocol=paho.MQTTv311)
    try:
        reply = c.request("dev1", {**CHAT, "id": "old", "max_tokens": 4})
        body = final(c.collect(reply))
        assert body["id"] == "old"
        assert body["usage"]["completion_tokens"] == 4
    finally:
        c.close()


def test_stream_chunks_arrive_in_order_and_add_up_to_the_text(start_daemon, client: Client) -> None:
    """Streamed chunks carry seq 0..n-1, each echoes the correlation data, and they concatenate to the text."""
    start_daemon()
    reply = client.request("dev1", {**CHAT, "id": "s1", "max_tokens": 24, "stream": True}, correlation=b"c")
    msgs = client.collect(reply)
    chunks = [json.loads(m.payload) for m in msgs[:-1]]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) >= 2
    assert "".join(c["delta"] for c in chunks) == final(msgs)["text"]
    assert all(m.properties.CorrelationData == b"c" for m in msgs)


def test_fast_streams_are_combined_and_interval_zero_sends_every_token(start_daemon, client: Client) -> None:
    """Text faster than stream_interval_ms is sent in fewer chunks; with 0, one chunk per token."""
    start_daemon(inference={"stream_interval_ms": 0})
    msgs = client.collect(client.request("dev1", {**CHAT, "max_tokens": 40, "stream": True}))
    assert len(msgs) - 1 == final(msgs)["usage"]["completion_tokens"] == 40


def test_default_stream_interval_combines_fast_tokens(start_daemon, client: Client) -> None:
    """The tiny model makes thousands of tokens/s: at the default 30 ms far fewer chunks than tokens go out."""
    start_daemon()
    msgs = client.collect(client.request("dev1", {**CHAT, "max_tokens": 200, "stream": True}))
    chunks = [json.loads(m.payload) for m in msgs[:-1]]
    assert 2 <= len(chunks) < 200
    assert "".join(c["delta"] for c in chunks) == final(msgs)["text"]


def test_plain_prompt_form_is_completed(start_daemon, client: Client) -> None:
    """The 'prompt' form is completed as is."""
    start_daemon()
    body = final(client.collect(client.request("dev1", {"prompt": "Once upon", "max_tokens": 8})))
    assert body["usage"]["completion_tokens"] == 8
    assert len(body["id"]) >= 16  # generated when absent


def test_cancel_stops_the_running_generation(start_daemon, client: Client) -> None:
    """Publishing the id to infer/cancel stops a running generation early with finish_reason 'cancelled'."""
    start_daemon(model="slow")
    reply = client.request("dev1", {**CHAT, "id": "long", "max_tokens": 900, "stream": True})
    first = client.messages.get(timeout=30)
    client.messages.put(first)
    client.publish("edge/dev1/infer/cancel", {"id": "long"})
    body = final(client.collect(reply))
    assert body["finish_reason"] == "cancelled"
    assert body["usage"]["completion_tokens"] < 400


def test_cancel_of_a_queued_request_answers_cancelled(start_daemon, client: Client) -> None:
    """A request cancelled while waiting in the queue is answered with the 'cancelled' error at once."""
    start_daemon(model="slow")
    busy = client.request("dev1", {**CHAT, "id": "busy", "max_tokens": 300})
    queued = client.request("dev1", {**CHAT, "id": "queued", "max_tokens": 4})
    client.publish("edge/dev1/infer/cancel", {"id": "queued"})
    assert final(client.collect(queued))["error"]["code"] == "cancelled"
    client.publish("edge/dev1/infer/cancel", {"id": "busy"})
    client.collect(busy)


def test_full_queue_answers_overloaded_at_once(start_daemon, client: Client) -> None:
    """With max_queue = 1, a third concurrent request gets 'overloaded' with retry_after_ms, without waiting."""
    start_daemon(model="slow", inference={"max_queue": 1})
    replies = [client.request("dev1", {**CHAT, "id": f"q{i}", "max_tokens": 200}) for i in range(3)]
    third = final(client.collect(replies[2], timeout=10))
    assert third["error"]["code"] == "overloaded"
    assert third["error"]["retry_after_ms"] > 0
    client.publish("edge/dev1/infer/cancel", {"id": "q0"})
    client.publish("edge/dev1/infer/cancel", {"id": "q1"})
    assert "text" in final(client.collect(replies[0]))


def test_deadline_passed_in_queue_is_not_started(start_daemon, client: Client) -> None:
    """A request whose deadline_ms passes while it waits is answered 'timeout' and never generated."""
    start_daemon(model="slow")
    busy = client.request("dev1", {**CHAT, "id": "busy", "max_tokens": 900})
    late = client.request("dev1", {**CHAT, "id": "late", "max_tokens": 4, "deadline_ms": 50})
    body = final(client.collect(late))
    assert body["error"]["code"] == "timeout"
    client.collect(busy)


def test_mqtt5_message_expiry_counts_as_a_deadline(start_daemon, client: Client) -> None:
    """The MQTT 5 Message Expiry Interval bounds how long a request may wait."""
    start_daemon(model="slow", model_cfg={"n_ctx": 4096}, inference={"max_tokens_limit": 4000})
    busy = client.request("dev1", {**CHAT, "id": "busy", "max_tokens": 4000})
    late = client.request("dev1", {**CHAT, "id": "exp", "max_tokens": 4}, expiry_s=1)
    t0 = time.monotonic()
    body = final(client.collect(late))
    assert body.get("error", {}).get("code") == "timeout", body
    # Answered when the deadline passes, not when the long generation ahead of it ends.
    assert time.monotonic() - t0 < 5
    client.publish("edge/dev1/infer/cancel", {"id": "busy"})
    client.collect(busy)


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (b"{not json", "bad_request", "not valid JSON"),
        (b"[1, 2]", "bad_request", "JSON object"),
        (b"\xff\xfe", "bad_request", "UTF-8"),
        (json.dumps({"id": "t", "prompt": 5}).encode(), "bad_request", "prompt"),
        (json.dumps({"id": "t", "prompt": "x", "max_tokens": "many"}).encode(), "bad_request", "max_tokens"),
        (json.dumps({"id": "t", "prompt": "x", "bogus": 1}).encode(), "bad_request", "unknown field"),
        (json.dumps({"id": "t", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}).encode(),
         "bad_request", "exactly one"),
        (json.dumps({"id": "t"}).encode(), "bad_request", "exactly one"),
        (json.dumps({"id": "t", "prompt": "x" * 70_000}).encode(), "too_large", "limit"),
        (json.dumps({"id": "t", "prompt": "word " * 3000}).encode(), "too_large", "context"),
    ],
    ids=["json", "array", "utf8", "type", "max_tokens", "unknown", "both", "neither", "oversize", "context"],
)
def test_malformed_requests_get_an_error_reply_and_the_daemon_keeps_serving(
    start_daemon, client: Client, payload: bytes, code: str, fragment: str
) -> None:
    """Every class of bad input is answered with a stable error code, and the next request is served."""
    d = start_daemon(inference={"max_payload_bytes": 65536})
    reply = "test/reply/bad"
    client.subscribe(reply)
    client.publish("edge/dev1/infer", payload, response_topic=reply, correlation=b"k")
    body = final(client.collect(reply))
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]
    assert body["done"] is True
    assert "code" in d.wait_event("request_rejected" if code != "too_large" or fragment != "context"
                                  else "request_failed")
    ok = final(client.collect(client.request("dev1", {**CHAT, "max_tokens": 2})))
    assert ok["usage"]["completion_tokens"] == 2


def test_chat_to_a_model_without_template_is_a_clear_error(start_daemon, client: Client) -> None:
    """A model without a chat template refuses 'messages' with a message saying to send a prompt."""
    start_daemon(model="no_template")
    body = final(client.collect(client.request("dev1", {**CHAT, "max_tokens": 2})))
    assert body["error"]["code"] == "bad_request"
    assert "no chat template" in body["error"]["message"]
    ok = final(client.collect(client.request("dev1", {"prompt": "hi", "max_tokens": 2})))
    assert ok["usage"]["completion_tokens"] == 2


def test_request_without_reply_address_is_logged_and_dropped(start_daemon, client: Client) -> None:
    """No Response Topic and no reply_to: nothing to answer, a log event, and serving continues."""
    d = start_daemon()
    client.publish("edge/dev1/infer", {**CHAT, "id": "lost"})
    d.wait_event("request_dropped", reason="no_reply_address")
    assert final(client.collect(client.request("dev1", {**CHAT, "max_tokens": 2})))["done"]


def test_duplicate_request_id_is_served_once(start_daemon, client: Client) -> None:
    """The same id delivered twice (a QoS 1 resend) produces one answer."""
    d = start_daemon()
    reply = "test/reply/dup"
    client.subscribe(reply)
    for _ in range(2):
        client.publish("edge/dev1/infer", {**CHAT, "id": "same", "max_tokens": 8}, response_topic=reply)
    client.collect(reply)
    d.wait_event("request_duplicate", id="same")
    time.sleep(0.5)
    assert client.messages.empty()
    assert sum(1 for e in d.events() if e.get("event") == "request_done" and e.get("id") == "same") == 1


def test_sigkill_mid_generation_then_restart_answers_once(start_daemon, client: Client) -> None:
    """A request in flight when the daemon is killed is redelivered by the broker and answered after restart."""
    d = start_daemon(model="slow")
    reply = client.request("dev1", {**CHAT, "id": "crash", "max_tokens": 900, "stream": True})
    client.messages.get(timeout=30)  # generation has started
    d.kill()
    client.messages.queue.clear()
    d2 = start_daemon()
    msgs = client.collect(reply, timeout=90)
    body = final(msgs)
    assert body["id"] == "crash"
    assert body["usage"]["completion_tokens"] == 900
    time.sleep(0.5)
    extra = [m for m in list(client.messages.queue) if json.loads(m.payload).get("done")]
    assert extra == []
    assert d2.wait_event("request_done", id="crash")


def test_broker_restart_mid_stream_reconnects_and_serves_again(start_daemon, broker, client: Client) -> None:
    """After the broker restarts, the daemon reconnects, re-subscribes and answers new requests."""
    d = start_daemon(model="slow")
    client.request("dev1", {**CHAT, "id": "during", "max_tokens": 200, "stream": True})
    time.sleep(0.3)
    broker.restart(down_s=0.5)
    d.wait_event("mqtt_disconnected")
    client.close()
    c2 = Client(broker.port)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sum(1 for e in d.events() if e.get("event") == "mqtt_connected") >= 2:
                break
            time.sleep(0.1)
        body = final(c2.collect(c2.request("dev1", {**CHAT, "id": "after", "max_tokens": 4}), timeout=60))
        assert body["id"] == "after"
        assert c2.retained("edge/dev1/status")["state"] == "online"
    finally:
        c2.close()


def test_sigterm_publishes_retained_offline_and_exits_zero(start_daemon, client: Client) -> None:
    """A clean SIGTERM leaves a retained 'offline' status and exit code 0."""
    d = start_daemon()
    assert client.retained("edge/dev1/status", state="online")["device_id"] == "dev1"
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    assert client.retained("edge/dev1/status", state="offline")["state"] == "offline"
    d.wait_event("agent_stopped")


def test_sigterm_lets_the_running_generation_finish_and_cancels_queued(start_daemon, client: Client) -> None:
    """On SIGTERM the running request completes within the grace period; queued ones are answered 'cancelled'."""
    # A grace period far beyond the generation's length: on a loaded machine 600 tokens took 11 s.
    d = start_daemon(model="slow", inference={"shutdown_grace_s": 120.0})
    running = client.request("dev1", {**CHAT, "id": "run", "max_tokens": 600})
    queued = client.request("dev1", {**CHAT, "id": "wait", "max_tokens": 4})
    d.wait_event("request_queued", id="wait")
    d.signal(signal.SIGTERM)
    assert final(client.collect(queued))["error"]["code"] == "cancelled"
    assert final(client.collect(running, timeout=120))["usage"]["completion_tokens"] == 600
    assert d.wait(30) == 0


def test_kill_leaves_last_will_offline(start_daemon, client: Client) -> None:
    """If the daemon dies, the broker publishes its Last Will: retained 'offline'."""
    d = start_daemon(mqtt={"keepalive_s": 5})
    d.kill()
    assert client.retained("edge/dev1/status", state="offline", timeout=15)["state"] == "offline"


@pytest.mark.skipif(shutil.which("mosquitto_rr") is None, reason="mosquitto-clients not installed")
def test_mosquitto_rr_can_ask_a_question(start_daemon, broker) -> None:
    """The stock mosquitto_rr tool (MQTT 5 request/response) gets an answer."""
    start_daemon()
    out = subprocess.run(
        ["mosquitto_rr", "-p", str(broker.port), "-t", "edge/dev1/infer", "-e", "test/rr", "-q", "1", "-W", "60",
         "-m", json.dumps({"prompt": "Hi", "max_tokens": 4})],
        capture_output=True, text=True, timeout=90, check=True,
    )
    body = json.loads(out.stdout.strip().splitlines()[-1])
    assert body["usage"]["completion_tokens"] == 4


def test_ask_cli_prints_the_answer(start_daemon, broker, tmp_path) -> None:
    """`edge-agent ask` publishes a request and prints the answer text; a too_large reply exits 65."""
    import sys

    d = start_daemon()
    env_cfg = d.config
    out = subprocess.run([sys.executable, "-m", "agent", "ask", "--config", str(env_cfg), "--json",
                          "--max-tokens", "5", "Hello"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 5
    bad = subprocess.run([sys.executable, "-m", "agent", "ask", "--config", str(env_cfg), "--max-tokens", "5",
                          "--prompt", "word " * 3000], capture_output=True, text=True, timeout=90)
    assert bad.returncode == 65
    assert "too_large" in bad.stderr
