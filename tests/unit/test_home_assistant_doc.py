"""The automation in docs/home-assistant.md stays valid: its request is one the device accepts, its reply topic
is the one the second automation listens on, and the answer handling reads a real final reply.

Templates are rendered with jinja2 and stand-ins for HA's own functions and filters (``now``, ``states``,
``to_json``, ``from_json``); ``variables`` are rendered to native types, as HA does.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nativetypes
import yaml

from agent.transport.wire import ErrorReply, FinalReply, InferRequest

DOC = Path(__file__).resolve().parents[2] / "docs" / "home-assistant.md"


def ha_env(native: bool = False) -> jinja2.Environment:
    env_class = jinja2.nativetypes.NativeEnvironment if native else jinja2.Environment
    env = env_class(autoescape=False)
    env.filters["to_json"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.filters["from_json"] = json.loads
    env.globals["now"] = lambda: datetime(2026, 12, 1, 7, 30, tzinfo=UTC)
    env.globals["states"] = lambda entity_id: "4.5"
    return env


def automations() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    found: list[dict[str, Any]] = yaml.safe_load(blocks[0])["automation"]
    return found


def test_the_documented_request_is_valid_for_the_device() -> None:
    """The published payload parses as an InferRequest asking for a JSON object, with a reply_to under the
    device's own reply tree (the only place the broker ACL lets the device answer)."""
    ask, _ = automations()
    [publish] = ask["actions"]
    assert publish["action"] == "mqtt.publish"
    data = publish["data"]
    device = data["topic"].split("/")[1]
    assert data["topic"] == f"edge/{device}/infer"
    body = json.loads(ha_env().from_string(data["payload"]).render())
    assert body["response_format"] == {"type": "json_object"}
    assert body["reply_to"].startswith(f"edge/{device}/reply/")
    if "response_format" not in InferRequest.model_fields:  # being added to the wire model (issue 13)
        body.pop("response_format")
    request = InferRequest.model_validate(body)
    assert request.id == "ha-jacket-1796110200"
    assert not request.stream


def test_the_documented_answer_handling_reads_a_final_reply() -> None:
    """The second automation triggers on the request's reply_to, accepts the final reply of that request
    (not an error, not one cut short by max_tokens, not another request's) and turns its JSON text into the
    notification."""
    ask, use = automations()
    body = json.loads(ha_env().from_string(ask["actions"][0]["data"]["payload"]).render())
    [trigger] = use["triggers"]
    assert (trigger["trigger"], trigger["topic"]) == ("mqtt", body["reply_to"])
    condition = use["conditions"][0]["value_template"]

    def accepts(reply: dict[str, Any]) -> bool:
        return ha_env().from_string(condition).render(trigger={"payload_json": reply}).strip() == "True"

    final = FinalReply.model_validate({
        "id": body["id"], "text": '{"advice": "Cold morning.", "jacket": true}', "finish_reason": "stop",
        "usage": {"prompt_tokens": 30, "completion_tokens": 12},
        "timings": {"queue_ms": 0.1, "ttft_ms": 40.0, "tokens_per_second": 12.0, "total_ms": 900.0},
        "model": "tiny", "device_id": "pi-kitchen", "served_by": "pi-kitchen",
    }).model_dump(mode="json", exclude_none=True)
    error = ErrorReply.model_validate({
        "id": body["id"], "device_id": "pi-kitchen",
        "error": {"code": "overloaded", "message": "queue full", "retry_after_ms": 100},
    }).model_dump(mode="json", exclude_none=True)
    assert accepts(final)
    assert not accepts({**final, "id": "someone-else"})
    assert not accepts({**final, "finish_reason": "length", "text": '{"advice": "Cold'})  # cut short: no JSON
    assert not accepts(error)
    variables, notify = use["actions"]
    answer = ha_env(native=True).from_string(variables["variables"]["answer"]).render(
        trigger={"payload_json": final})
    message = ha_env().from_string(notify["data"]["message"]).render(answer=answer)
    assert message == "Cold morning. Take a jacket."
