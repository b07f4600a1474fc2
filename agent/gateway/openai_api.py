"""OpenAI Chat Completions ↔ our wire (pure): request bodies in, ``chat.completion`` / ``.chunk`` out.

What is honoured and what is refused is listed in docs/gateway.md; in short: text chat with the usual sampling
fields, ``response_format``, streaming (with ``stream_options.include_usage``); tools, images, logprobs and
``n`` > 1 are refused with a 400 saying so. Fields the API has and we do not need (``user``, ``metadata``,
``store``, ...) are ignored, as unknown fields are: clients send many.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.gateway.errors import GatewayError, bad_request
from agent.gateway.targets import ModelEntry
from agent.gateway.wire_request import WireBody, wire_message
from agent.transport.wire import describe_error

FINISH_REASONS: Mapping[str, str] = {"stop": "stop", "length": "length", "cancelled": "stop"}
"""Wire finish_reason → OpenAI's (it has no 'cancelled'; a cancelled answer ended early, as at a stop)."""

ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Body):
    role: str
    content: str | list[Any] | None = None
    tool_calls: list[Any] | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """The fields of ``POST /v1/chat/completions`` the gateway reads (the rest are ignored)."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    # Not OpenAI's, but sent by clients of llama-server and vLLM; the devices understand them.
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None


def parse_request(data: Any) -> ChatCompletionRequest:
    """The request body, or a 400 naming the bad fields."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise bad_request(describe_error(exc, "body")) from exc


def to_wire(req: ChatCompletionRequest, request_id: str) -> dict[str, Any]:
    """The native request for ``req``; a 400 for anything the devices cannot honour."""
    _refuse_unsupported(req)
    body = WireBody(request_id)
    messages = [wire_message(i, m.role, m.content, tool_calls=m.tool_calls) for i, m in enumerate(req.messages)]
    body.put("messages", messages)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    body.put("max_tokens", max_tokens)
    body.put("temperature", req.temperature)
    body.put("top_p", req.top_p)
    body.put("top_k", req.top_k)
    body.put("min_p", req.min_p)
    body.put("repeat_penalty", req.repeat_penalty)
    body.put("seed", req.seed)
    body.put("stop", req.stop if req.stop != [] else None)
    body.put("frequency_penalty", req.frequency_penalty, neutral=0.0)
    body.put("presence_penalty", req.presence_penalty, neutral=0.0)
    if req.response_format is not None and req.response_format.type != "text":
        body.put("response_format", req.response_format.model_dump(exclude_none=True))
    body.put("user", req.user, neutral=req.user)  # a label only: dropped when the wire has no field for it
    body.put("model", req.model)
    body.put("stream", req.stream)
    return body.finish()


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.n is not None and req.n != 1:
        raise bad_request("n: only one choice per request is supported (n = 1)")
    if req.tools or req.functions:
        raise bad_request("tools: tool and function calling are not supported")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice: tool calling is not supported")
    if req.logprobs or req.top_logprobs:
        raise bad_request("logprobs: log probabilities are not supported")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported")


# -- replies ----------------------------------------------------------------------------------------


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def usage(final: Mapping[str, Any]) -> dict[str, int]:
    counts = final.get("usage") or {}
    prompt = int(counts.get("prompt_tokens") or 0)
    completion = int(counts.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(request_id: str, model: str, final: Mapping[str, Any], created: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` from the wire's final reply."""
    return {
        "id": completion_id(request_id),
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "system_fingerprint": _fingerprint(final),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": str(final.get("text", ""))},
            "logprobs": None,
            "finish_reason": FINISH_REASONS.get(str(final.get("finish_reason")), "stop"),
        }],
        "usage": usage(final),
    }


def chunk(request_id: str, model: str, created: int, delta: Mapping[str, Any], *, finish_reason: str | None = None,
          fingerprint: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``."""
    return {
        "id": completion_id(request_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}],
    }


def final_chunks(request_id: str, model: str, created: int, final: Mapping[str, Any],
                 include_usage: bool) -> list[dict[str, Any]]:
    """The chunks that end a stream: the finish reason, then (when asked) the usage with no choices."""
    reason = FINISH_REASONS.get(str(final.get("finish_reason")), "stop")
    out = [chunk(request_id, model, created, {}, finish_reason=reason, fingerprint=_fingerprint(final))]
    if include_usage:
        out.append({"id": completion_id(request_id), "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": _fingerprint(final), "choices": [],
                    "usage": usage(final)})
    return out


def _fingerprint(final: Mapping[str, Any]) -> str | None:
    """Which device answered, where OpenAI puts the backend's identity."""
    served = final.get("served_by") or final.get("device_id")
    return f"edge-agent:{served}" if served else None


def error_body(error: GatewayError) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = ERROR_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": None, "code": error.code}}


def model_object(entry: ModelEntry) -> dict[str, Any]:
    return {"id": entry.name, "object": "model", "created": int(entry.since or 0), "owned_by": "edge-agent"}


def model_list(entries: Iterable[ModelEntry]) -> dict[str, Any]:
    """``GET /v1/models``."""
    return {"object": "list", "data": [model_object(e) for e in entries]}
