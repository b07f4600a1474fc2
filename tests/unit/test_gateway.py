"""The gateway's pure parts: OpenAI and Ollama bodies → wire requests, wire replies → each API's shapes, the wire
error codes → HTTP statuses, and model name → target from retained status and telemetry."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from agent.cli.gateway import check_bind
from agent.errors import ConfigError
from agent.gateway import ollama_api, openai_api
from agent.gateway.errors import GatewayError, from_wire
from agent.gateway.mqtt_client import Exchange
from agent.gateway.targets import Directory, Target
from agent.gateway.wire_request import wire_accepts
from agent.transport.wire import InferRequest

FINAL = {"id": "r1", "done": True, "text": "Paris.", "finish_reason": "stop",
         "usage": {"prompt_tokens": 12, "completion_tokens": 3},
         "timings": {"queue_ms": 1.0, "ttft_ms": 20.0, "tokens_per_second": 50.0, "total_ms": 81.0},
         "model": "SmolLM2", "device_id": "pi-1", "served_by": "pi-1"}


def _openai(**body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "pi-1", "messages": [{"role": "user", "content": "Hi"}]}
    return openai_api.to_wire(openai_api.parse_request({**base, **body}), "r1")


def _status(code: str, fn: Any, *args: Any) -> int:
    with pytest.raises(GatewayError) as info:
        fn(*args)
    assert info.value.code == code
    return info.value.status


# -- OpenAI → wire -------------------------------------------------------------------------------------


class TestOpenAIRequest:
    def test_minimal_chat(self) -> None:
        """A bare chat body becomes a wire chat request with our id, the model name and stream off."""
        assert _openai() == {"id": "r1", "messages": [{"role": "user", "content": "Hi"}], "model": "pi-1",
                             "stream": False}

    def test_every_request_is_valid_for_the_wire_model(self) -> None:
        """What the translator produces is accepted by InferRequest as is."""
        InferRequest.model_validate(_openai(temperature=0.2, top_p=0.9, seed=3, stop=["\n"], max_tokens=5))

    def test_sampling_fields_map(self) -> None:
        """temperature, top_p, seed, stop and max_tokens go through under the wire's names."""
        wire = _openai(temperature=0.2, top_p=0.9, seed=3, stop="END", max_tokens=7)
        assert (wire["temperature"], wire["top_p"], wire["seed"], wire["stop"], wire["max_tokens"]) == (
            0.2, 0.9, 3, "END", 7)

    def test_max_completion_tokens_wins(self) -> None:
        """max_completion_tokens (the newer name) wins over max_tokens."""
        assert _openai(max_tokens=50, max_completion_tokens=9)["max_tokens"] == 9

    def test_developer_role_and_text_parts(self) -> None:
        """A developer message is the system message; text content parts are joined."""
        wire = _openai(messages=[{"role": "developer", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                              {"type": "text", "text": "lo"}]}])
        assert wire["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]

    @pytest.mark.parametrize(("body", "needle"), [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
        ({"messages": []}, "messages"),
        ({"temperature": 9}, "temperature"),
    ])
    def test_refused_with_400(self, body: dict[str, Any], needle: str) -> None:
        """What the devices cannot honour, or the wire refuses, is a 400 that names it."""
        with pytest.raises(GatewayError) as info:
            _openai(**body)
        assert info.value.status == 400
        assert needle in info.value.message

    def test_unknown_fields_are_ignored(self) -> None:
        """Fields clients commonly send that change nothing here (metadata, store) do not fail the request."""
        assert "metadata" not in _openai(metadata={"a": "b"}, store=False)

    @pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
    def test_zero_penalty_is_dropped_when_the_wire_lacks_it(self, field: str) -> None:
        """A penalty of 0 changes nothing: sent where the wire has it, dropped (not refused) where not."""
        wire = _openai(**{field: 0.0})
        assert (field in wire) == wire_accepts(field)

    @pytest.mark.parametrize(("field", "value"), [
        ("frequency_penalty", 0.5), ("min_p", 0.05), ("response_format", {"type": "json_object"}),
    ])
    def test_fields_the_wire_may_lack(self, field: str, value: Any) -> None:
        """Sent when this build's InferRequest has the field, refused with a 400 naming it when not."""
        if wire_accepts(field):
            assert _openai(**{field: value})[field] == value
        else:
            with pytest.raises(GatewayError, match=field):
                _openai(**{field: value})

    def test_text_response_format_is_the_default(self) -> None:
        """response_format {"type": "text"} asks for nothing and sends nothing."""
        assert "response_format" not in _openai(response_format={"type": "text"})


# -- wire → OpenAI -------------------------------------------------------------------------------------


class TestOpenAIReplies:
    def test_completion(self) -> None:
        """The final reply becomes a chat.completion with usage totals and the serving device as fingerprint."""
        out = openai_api.completion("r1", "pi-1", FINAL, created=5)
        assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-r1" and out["created"] == 5
        assert out["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        assert out["system_fingerprint"] == "edge-agent:pi-1"

    @pytest.mark.parametrize(("wire", "api"), [("stop", "stop"), ("length", "length"), ("cancelled", "stop")])
    def test_finish_reasons(self, wire: str, api: str) -> None:
        """OpenAI has no 'cancelled': an answer cut short by a cancel ends like one at a stop."""
        assert openai_api.completion("r1", "m", {**FINAL, "finish_reason": wire})["choices"][0]["finish_reason"] == api

    def test_final_chunks_with_usage(self) -> None:
        """A stream ends with a finish chunk, then (include_usage) a chunk with no choices and the usage."""
        finish, usage = openai_api.final_chunks("r1", "pi-1", 5, FINAL, include_usage=True)
        assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["delta"] == {}
        assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 15
        assert len(openai_api.final_chunks("r1", "pi-1", 5, FINAL, include_usage=False)) == 1

    def test_error_shape(self) -> None:
        """Errors use OpenAI's shape, with a type clients branch on."""
        body = openai_api.error_body(GatewayError(429, "overloaded", "queue full"))
        assert body == {"error": {"message": "queue full", "type": "rate_limit_error", "param": None,
                                  "code": "overloaded"}}
        assert openai_api.error_body(GatewayError(504, "timeout", "t"))["error"]["type"] == "server_error"


# -- Ollama ------------------------------------------------------------------------------------------


def _chat(**body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "pi-1", "messages": [{"role": "user", "content": "Hi"}]}
    return ollama_api.chat_to_wire(ollama_api.parse(ollama_api.ChatRequest, {**base, **body}), "r1")


def _generate(**body: Any) -> dict[str, Any]:
    return ollama_api.generate_to_wire(ollama_api.parse(ollama_api.GenerateRequest, {"model": "pi-1", **body}), "r1")


class TestOllamaRequest:
    def test_chat_streams_by_default(self) -> None:
        """Ollama streams unless told not to."""
        assert _chat()["stream"] is True
        assert _chat(stream=False)["stream"] is False

    def test_options_map(self) -> None:
        """Sampling options and num_predict go to the wire; model settings (num_ctx, num_thread) are ignored."""
        wire = _chat(options={"temperature": 0.1, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.1, "seed": 7,
                              "num_predict": 16, "stop": ["\n"], "num_ctx": 8192, "num_thread": 4})
        assert {k: wire[k] for k in ("temperature", "top_p", "top_k", "repeat_penalty", "seed", "max_tokens",
                                     "stop")} == {"temperature": 0.1, "top_p": 0.8, "top_k": 20,
                                                  "repeat_penalty": 1.1, "seed": 7, "max_tokens": 16,
                                                  "stop": ["\n"]}
        assert "num_ctx" not in wire

    @pytest.mark.parametrize("num_predict", [-1, -2, 0])
    def test_unlimited_num_predict_leaves_the_device_default(self, num_predict: int) -> None:
        """num_predict -1/-2 (no limit, fill the context) sends no max_tokens: the device's default applies."""
        assert "max_tokens" not in _chat(options={"num_predict": num_predict})

    @pytest.mark.parametrize(("fmt", "expected"), [
        ("json", {"type": "json_object"}),
        ({"type": "object"}, {"type": "json_schema", "json_schema": {"name": "format", "schema": {"type": "object"}}}),
        ("", None),
        (None, None),
    ])
    def test_format_becomes_response_format(self, fmt: Any, expected: Any) -> None:
        """format "json" asks for a JSON object, a schema for that schema."""
        assert ollama_api.response_format(fmt) == expected

    def test_format_on_the_wire(self) -> None:
        """format is sent as response_format where the wire has it, refused (400) where not."""
        if wire_accepts("response_format"):
            assert _chat(format="json")["response_format"] == {"type": "json_object"}
        else:
            with pytest.raises(GatewayError, match="format"):
                _chat(format="json")

    @pytest.mark.parametrize(("body", "needle"), [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"think": True}, "think"),
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"format": "yaml"}, "format"),
    ])
    def test_chat_refusals(self, body: dict[str, Any], needle: str) -> None:
        """Tools, images, thinking and unknown formats are 400s naming them."""
        with pytest.raises(GatewayError) as info:
            _chat(**body)
        assert info.value.status == 400 and needle in info.value.message

    def test_generate_uses_the_template(self) -> None:
        """generate (not raw) is a chat: the system text, then the prompt as the user's message."""
        assert _generate(prompt="Why?", system="Be brief.")["messages"] == [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]

    def test_generate_raw_is_a_plain_prompt(self) -> None:
        """raw = true completes the prompt as plain text."""
        wire = _generate(prompt="Once upon", raw=True)
        assert wire["prompt"] == "Once upon" and "messages" not in wire

    @pytest.mark.parametrize("body", [{"suffix": "x"}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]},
                                      {"images": ["aGk="]}, {"raw": True, "system": "s"}])
    def test_generate_refusals(self, body: dict[str, Any]) -> None:
        """Fill-in-the-middle, custom templates, token context and images are refused."""
        with pytest.raises(GatewayError) as info:
            _generate(prompt="p", **body)
        assert info.value.status == 400

    def test_load_requests(self) -> None:
        """A chat without messages or a generate without prompt is Ollama's 'load the model' call."""
        assert ollama_api.is_load_request(ollama_api.ChatRequest(model="m"))
        assert ollama_api.is_load_request(ollama_api.GenerateRequest(model="m"))
        assert not ollama_api.is_load_request(ollama_api.GenerateRequest(model="m", prompt="p"))
        assert ollama_api.load_reply("m", chat=True)["done_reason"] == "load"


class TestOllamaReplies:
    def test_chat_final_not_streamed(self) -> None:
        """A non-streamed chat carries the whole text and Ollama's counters in nanoseconds."""
        out = ollama_api.chat_final("pi-1", FINAL, streamed=False)
        assert out["message"] == {"role": "assistant", "content": "Paris."}
        assert out["done"] is True and out["done_reason"] == "stop"
        assert out["prompt_eval_count"] == 12 and out["eval_count"] == 3
        assert out["total_duration"] == 81_000_000 and out["eval_duration"] == 60_000_000

    def test_streamed_final_has_no_text(self) -> None:
        """After a stream, the final object's content is empty (the text came in the chunks)."""
        assert ollama_api.generate_final("pi-1", FINAL, streamed=True)["response"] == ""
        assert ollama_api.generate_chunk("pi-1", "Par")["response"] == "Par"

    def test_created_at_is_utc_iso(self) -> None:
        """created_at is ISO 8601 in UTC with a Z, as Ollama writes it."""
        assert ollama_api.chat_chunk("m", "x")["created_at"].endswith("Z")


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "draining", "status", "retry"), [
    ({"code": "bad_request", "message": "m"}, False, 400, None),
    ({"code": "too_large", "message": "m"}, False, 413, None),
    ({"code": "overloaded", "message": "m", "retry_after_ms": 2500}, False, 429, 3),
    ({"code": "overloaded", "message": "m", "retry_after_ms": 2500}, True, 503, 3),
    ({"code": "rate_limited", "message": "m", "retry_after_ms": 100}, False, 429, 1),
    ({"code": "overloaded", "message": "m"}, False, 429, 1),
    ({"code": "timeout", "message": "m"}, False, 504, None),
    ({"code": "model_unavailable", "message": "m"}, False, 503, 1),
    ({"code": "internal", "message": "m"}, False, 502, None),
    ({"code": "something_new", "message": "m"}, False, 502, None),
])
def test_wire_errors_map_to_http(error: dict[str, Any], draining: bool, status: int, retry: int | None) -> None:
    """Each wire error code has one HTTP status; retry_after_ms becomes Retry-After seconds, rounded up."""
    mapped = from_wire(error, draining=draining)
    assert (mapped.status, mapped.retry_after_s, mapped.code) == (status, retry, error["code"])


def test_top_level_retry_after() -> None:
    """A retry_after_ms at the reply's top level (as the brief's older shape has it) counts too."""
    assert from_wire({"code": "overloaded", "message": "m"}, top_level_retry_ms=4000).retry_after_s == 4


# -- targets -----------------------------------------------------------------------------------------


def _directory(*devices: tuple[str, str, list[str], int | None]) -> Directory:
    d = Directory("edge")
    for device, state, groups, queue in devices:
        d.observe(f"edge/{device}/status", json.dumps({"state": state, "device_id": device, "groups": groups,
                                                        "model": "SmolLM2", "quant": "Q8_0", "n_ctx": 2048}).encode())
        if queue is not None:
            d.observe(f"edge/{device}/telemetry", json.dumps({"queue_depth": queue, "slots_busy": 0}).encode())
    return d


class TestTargets:
    def test_device(self) -> None:
        """A live device's id targets that device; ':latest' (added by Ollama clients) is ignored."""
        d = _directory(("pi-1", "online", [], None))
        assert d.resolve("pi-1") == Target("pi-1", "pi-1")
        assert d.resolve("pi-1:latest") == Target("pi-1", "pi-1")

    @pytest.mark.parametrize("name", ["pi-9", "group:none", "pi-off"])
    def test_unknown_or_offline_is_404(self, name: str) -> None:
        """Unknown devices, groups without live members and offline devices are not found."""
        d = _directory(("pi-off", "offline", ["g"], None))
        assert _status("not_found", d.resolve, name) == 404

    def test_group_picks_least_loaded_serving_member(self) -> None:
        """A group goes to its live, non-draining member with the smallest queue (ties by id)."""
        d = _directory(("a", "online", ["k"], 3), ("b", "online", ["k"], 1), ("c", "draining", ["k"], 0),
                       ("d", "offline", ["k"], 0))
        assert d.resolve("group:k").device_id == "b"

    def test_group_counts_the_gateways_own_requests(self) -> None:
        """Requests this gateway has in flight count as load until telemetry shows them."""
        d = _directory(("a", "online", ["k"], 0), ("b", "online", ["k"], 0))
        assert d.resolve("group:k").device_id == "a"
        assert d.resolve("group:k", {"a": 2}).device_id == "b"

    def test_group_of_draining_devices_is_503(self) -> None:
        """A group whose live members all drain is unavailable, not unknown."""
        d = _directory(("a", "draining", ["k"], 0))
        assert _status("unavailable", d.resolve, "group:k") == 503

    def test_fleet(self) -> None:
        """'fleet' targets the shared topic while some device is live."""
        assert _directory(("a", "online", [], None)).resolve("fleet") == Target("fleet", None)
        assert _status("not_found", Directory("edge").resolve, "fleet") == 404

    def test_listing(self) -> None:
        """The model lists: live devices, groups with live members (and the members), then the fleet."""
        d = _directory(("a", "online", ["k"], None), ("b", "draining", ["k", "x"], None),
                       ("c", "offline", ["y"], None))
        entries = {e.name: e for e in d.listing()}
        assert list(entries) == ["a", "b", "group:k", "group:x", "fleet"]
        assert entries["group:k"].devices == ("a", "b") and entries["group:k"].quant == "Q8_0"
        assert entries["group:x"].state == "draining"

    def test_cleared_status_forgets_the_device(self) -> None:
        """An empty retained status (cleared) removes the device; other topics are not ours."""
        d = _directory(("a", "online", [], None))
        assert d.observe("edge/a/status", b"")
        assert d.listing() == []
        assert not d.observe("edge/a/reply/x", b"{}")
        assert not d.observe("other/a/status", b"{}")


def test_ollama_lists_and_show() -> None:
    """tags, ps and show describe each target in Ollama's shapes."""
    entries = _directory(("a", "online", ["k"], None)).listing()
    tags = ollama_api.tags(entries)["models"]
    assert [t["model"] for t in tags] == ["a", "group:k", "fleet"]
    assert tags[0]["details"]["quantization_level"] == "Q8_0"
    assert ollama_api.running(entries)["models"][0]["context_length"] == 2048
    shown = ollama_api.show(entries[1])
    assert shown["model_info"]["edge_agent.devices"] == ["a"] and shown["capabilities"] == ["completion"]
    assert openai_api.model_list(entries)["data"][1]["id"] == "group:k"


# -- the exchange deadline and the bind rule ------------------------------------------------------------


def test_exchange_times_out_with_504() -> None:
    """A request without its final reply by the deadline fails 504."""
    owner = SimpleNamespace(directory=Directory("edge"))

    async def run() -> None:
        exchange = Exchange(owner, Target("a", "a"), "r1", timeout_s=0.05)  # type: ignore[arg-type]
        with pytest.raises(GatewayError) as info:
            await exchange.next()
        assert info.value.status == 504

    asyncio.run(run())


def test_exchange_error_reply_from_a_draining_device_is_503() -> None:
    """An 'overloaded' error reply from a device whose status says draining is 503 with Retry-After."""
    owner = SimpleNamespace(directory=_directory(("a", "draining", [], None)))

    async def run() -> None:
        exchange = Exchange(owner, Target("a", "a"), "r1", timeout_s=5)  # type: ignore[arg-type]
        exchange.deliver({"id": "r1", "done": True, "device_id": "a",
                          "error": {"code": "overloaded", "message": "draining", "retry_after_ms": 1000}})
        with pytest.raises(GatewayError) as info:
            await exchange.next()
        assert (info.value.status, info.value.retry_after_s, exchange.finished) == (503, 1, True)

    asyncio.run(run())


def test_requests_to_a_device_that_goes_offline_fail_502() -> None:
    """When a device's status turns offline (its will), its requests fail at once with 502, others wait on."""
    from agent.gateway.mqtt_client import GatewayClient
    from agent.settings import Settings
    from agent.transport.mqtt import Incoming

    async def run() -> None:
        client = GatewayClient(Settings(device_id="ops"))  # type: ignore[call-arg]
        for device in ("a", "b"):
            client._handle(_incoming(Incoming, f"edge/{device}/status", {"state": "online", "device_id": device}))
        to_a = Exchange(client, Target("a", "a"), "r1", timeout_s=5)
        to_b = Exchange(client, Target("b", "b"), "r2", timeout_s=0.1)
        client._pending.update({"r1": to_a, "r2": to_b})
        client._handle(_incoming(Incoming, "edge/a/status", {"state": "offline", "device_id": "a"}))
        with pytest.raises(GatewayError) as info:
            await to_a.next()
        assert (info.value.status, info.value.code) == (502, "device_offline")
        with pytest.raises(GatewayError) as waited:
            await to_b.next()
        assert waited.value.status == 504  # b is still online: its request ran into its own timeout

    asyncio.run(run())


def test_a_hostile_reply_is_ignored_not_raised() -> None:
    """A reply nested deeper than any real one (json.loads would recurse past Python's limit) or not an object
    is dropped by the reply handler; the exchange it names keeps waiting for a real answer."""
    from agent.gateway.mqtt_client import GatewayClient
    from agent.settings import Settings
    from agent.transport.mqtt import Incoming

    client = GatewayClient(Settings(device_id="ops"))  # type: ignore[call-arg]
    for payload in (b"[" * 100_000, b"[1, 2]", b"\xff"):
        message = Incoming(topic="edge/ops/reply/gw", payload=payload, qos=1, mid=1, dup=False, response_topic=None,
                           correlation_data=b"r1", message_expiry_s=None, received_at=0.0)
        client._reply(message)  # must not raise


def _incoming(cls: Any, topic: str, body: dict[str, Any]) -> Any:
    return cls(topic=topic, payload=json.dumps(body).encode(), qos=1, mid=1, dup=False, response_topic=None,
               correlation_data=None, message_expiry_s=None, received_at=0.0)


@pytest.mark.parametrize(("host", "token", "ok"), [
    ("127.0.0.1", None, True), ("::1", None, True), ("localhost", None, True),
    ("0.0.0.0", None, False), ("192.0.2.7", None, False), ("0.0.0.0", "t", True),  # noqa: S104
])
def test_bind_needs_a_token_beyond_loopback(host: str, token: str | None, ok: bool) -> None:
    """Without a token the gateway listens on loopback only (a ConfigError, exit 78, otherwise)."""
    if ok:
        check_bind(host, token)
    else:
        with pytest.raises(ConfigError, match="token"):
            check_bind(host, token)
