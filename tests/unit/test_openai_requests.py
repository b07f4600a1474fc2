"""OpenAI Chat Completions bodies as common clients send them are requests too; what we cannot honour
is refused by name."""

from __future__ import annotations

import json

import pytest

from agent.config.generation import GenerationDefaults, GenerationSettings, effective_defaults
from agent.errors import BadRequestError
from agent.services.generation import chat_for, sampling_for
from agent.transport.wire import FinalReply, Timings, Usage, openai_chunk_payload, openai_final_payload, parse_request

#: What the official openai client sends for client.chat.completions.create(...) with common arguments.
OPENAI_BODY = {
    "model": "dev1",
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Japan?", "name": "ann"},
    ],
    "max_completion_tokens": 32, "n": 1, "stop": ["\n\n"], "seed": 7, "temperature": 0.3, "top_p": 0.9,
    "frequency_penalty": 0.5, "presence_penalty": 0.25, "stream": True, "stream_options": {"include_usage": True},
    "user": "ann", "response_format": {"type": "text"}, "logprobs": False, "tools": [], "tool_choice": "none",
    "parallel_tool_calls": True, "store": False, "metadata": {}, "service_tier": "auto",
}


def parse(body: dict) -> object:
    return parse_request(json.dumps(body).encode(), 1 << 20)


def test_an_openai_body_is_a_request() -> None:
    req = parse(OPENAI_BODY)
    assert req.chat() == [  # type: ignore[attr-defined]
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Japan?"},
    ]
    assert req.token_limit() == 32  # type: ignore[attr-defined]


@pytest.mark.parametrize(("field", "value"), [
    ("n", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"50256": -100}), ("modalities", ["text", "audio"]),
    ("store", True),
])
def test_what_a_device_cannot_honour_is_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(BadRequestError, match=field):
        parse({**OPENAI_BODY, field: value})


def test_differing_token_limits_are_refused() -> None:
    with pytest.raises(BadRequestError, match="max_completion_tokens"):
        parse({**OPENAI_BODY, "max_tokens": 10})


def test_a_json_schema_format_needs_its_schema() -> None:
    with pytest.raises(BadRequestError, match="json_schema"):
        parse({**OPENAI_BODY, "response_format": {"type": "json_schema"}})


AGENT = GenerationSettings.model_validate({"system": "You are a helpful assistant on a Raspberry Pi."})
MODEL = GenerationDefaults.model_validate({"temperature": 0.2, "repeat_penalty": 1.2, "stop": ["<end>"]})


def test_the_request_wins_over_the_model_which_wins_over_the_agent() -> None:
    defaults = effective_defaults(AGENT, MODEL)
    own = sampling_for(parse({"prompt": "x", "temperature": 0.9}), defaults, 16)  # type: ignore[arg-type]
    assert (own.temperature, own.repeat_penalty, own.min_p, own.top_k) == (0.9, 1.2, AGENT.min_p, AGENT.top_k)
    assert own.stop == ("<end>",)
    given = sampling_for(parse({"prompt": "x", "stop": "STOP", "min_p": 0}), defaults, 16)  # type: ignore[arg-type]
    assert given.stop == ("STOP",) and given.min_p == 0.0


def test_bare_defaults_are_not_the_bare_sampler() -> None:
    """What made small models loop: min_p 0 and no repeat penalty. The agent-wide defaults have both."""
    params = sampling_for(parse({"prompt": "x"}), AGENT, 16)  # type: ignore[arg-type]
    assert params.min_p > 0 and params.repeat_penalty > 1


def test_the_default_system_prompt_goes_first_only_when_the_request_has_none() -> None:
    bare = parse({"messages": [{"role": "user", "content": "hi"}]})
    assert chat_for(bare, AGENT)[0] == {"role": "system", "content": AGENT.system}  # type: ignore[arg-type]
    own = parse({"messages": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "hi"}]})
    assert [m["content"] for m in chat_for(own, AGENT)] == ["Be terse.", "hi"]  # type: ignore[arg-type]


def test_a_json_format_becomes_a_grammar_and_a_bad_schema_a_clear_error() -> None:
    json_object = sampling_for(parse({"prompt": "x", "response_format": {"type": "json_object"}}), AGENT, 8)  # type: ignore[arg-type]
    assert json_object.grammar is not None and "root" in json_object.grammar
    schema = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "light", "schema": schema, "strict": True}}
    assert "on" in (sampling_for(parse({"prompt": "x", "response_format": fmt}), AGENT, 8).grammar or "")  # type: ignore[arg-type]
    bad = {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/missing"}}}
    with pytest.raises(BadRequestError, match="cannot be enforced"):
        sampling_for(parse({"prompt": "x", "response_format": bad}), AGENT, 8)  # type: ignore[arg-type]


def test_openai_shaped_replies() -> None:
    first = json.loads(openai_chunk_payload("r1", 0, "Hel", model="m", created=1))
    later = json.loads(openai_chunk_payload("r1", 1, "lo", model="m", created=1))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                            "content": "Hel"}
    assert later["choices"][0]["delta"] == {"content": "lo"} and later["seq"] == 1
    reply = FinalReply(id="r1", text="Hello", finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2),
                       timings=Timings(queue_ms=0, ttft_ms=1, tokens_per_second=9, total_ms=5), model="m",
                       device_id="d", served_by="d")
    final = json.loads(openai_final_payload(reply, 1))
    assert final["done"] is True and final["object"] == "chat.completion"
    assert final["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert final["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
