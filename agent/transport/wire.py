"""Wire messages: the JSON payloads on the MQTT topics, as versioned pydantic models.

Requests are validated once on arrival. Replies on the hot path (stream chunks) are built as plain
dicts by :func:`chunk_payload` so no per-token validation runs; the models below still define their
shape and generate the JSON Schemas in docs/schemas/.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import BadRequestError, TooLargeError
from agent.transport.limits import check_payload, check_unicode, top_level_strings

PROTOCOL_VERSION = 1

RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextPart(WireModel):
    """One part of an OpenAI-style content list; only text parts exist for these models."""

    type: Literal["text"] = Field(description="Only 'text' (the models served here read no images or audio).")
    text: str


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who said it ('developer' is OpenAI's newer name for 'system' and is rendered as one)."
    )
    content: str | list[TextPart] = Field(description="The message text, or OpenAI-style text parts (joined).")
    name: str | None = Field(None, max_length=64, description="Accepted for OpenAI compatibility; not rendered.")

    def rendered(self) -> dict[str, str]:
        """The message as the chat template takes it."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class JsonSchemaFormat(WireModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the reply must match.")
    strict: bool | None = Field(None, description="Accepted; the reply always matches (a grammar enforces it).")


class ResponseFormat(WireModel):
    """What the reply text must be: free text, any JSON object, or JSON matching a schema (enforced by a
    llama.cpp grammar, so the text parses unless generation stopped at ``max_tokens``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}")
        return self


#: OpenAI request fields we cannot honour: accepted only when they ask for nothing (null, false, empty).
_UNSUPPORTED_OPENAI = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
                       "logit_bias", "audio", "modalities", "prediction", "web_search_options")


class InferRequest(WireModel):
    """An inference request on ``{prefix}/{device_id}/infer`` (OpenAI-chat shaped)."""

    v: Literal[1] = Field(1, description="Protocol version.")
    id: RequestId | None = Field(
        None, description="Caller's request id, echoed on every reply; generated when absent."
    )
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        description="Chat messages (needs a model with a chat template); at most inference.max_messages (64).",
    )
    prompt: str | None = Field(None, description="Plain text prompt, completed as is.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    temperature: float | None = Field(
        None, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy. Unset: the model's default."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass. Unset: the model's default.")
    top_k: int | None = Field(None, ge=0, description="Top-k sampling; 0 = off. Unset: the model's default.")
    min_p: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Drop tokens below this fraction of the best one's probability; 0 = off. Unset: the model's "
        "default.",
    )
    repeat_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="Repetition penalty; 1 = off. Unset: the model's default."
    )
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI frequency penalty; 0 = off.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI presence penalty; 0 = off.")
    seed: int | None = Field(None, description="Sampling seed for reproducible output.")
    response_format: ResponseFormat | None = Field(
        None, description="{'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'schema': ...}}: "
        "the reply text is JSON (grammar-enforced)."
    )
    reply_format: Literal["edge", "openai"] = Field(
        "edge", description="'openai': replies shaped as chat.completion / chat.completion.chunk objects."
    )
    n: int | None = Field(None, description="Accepted only as 1 (one answer per request).")
    user: str | None = Field(None, max_length=256, description="Accepted for OpenAI compatibility; not used.")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted for OpenAI compatibility.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted for OpenAI compatibility (no tools).")
    store: bool | None = Field(None, description="Accepted only as false: nothing is stored.")
    metadata: dict[str, Any] | None = Field(None, description="Accepted for OpenAI compatibility; not used.")
    service_tier: str | None = Field(None, description="Accepted for OpenAI compatibility; not used.")
    stop: list[str] | str | None = Field(
        None,
        description="Stop sequences (not included in the text); at most inference.max_stop_sequences (8) of at "
        "most inference.max_stop_chars (64) characters each.",
    )
    stream: bool = Field(False, description="Send chunk messages as tokens are generated.")
    reply_to: str | None = Field(
        None, min_length=1, description="Reply topic for MQTT 3.1.1 clients (MQTT 5: use Response Topic)."
    )
    deadline_ms: int | None = Field(
        None, ge=1, description="Give up unless generation can start within this many ms of arrival."
    )
    model: str | None = Field(None, description="Informational (OpenAI compatibility); not used for routing.")
    tools: Any = Field(None, description="Refused unless empty: these models are served without tool calling.")
    tool_choice: Any = Field(None, description="Refused unless 'none' or 'auto' without tools.")
    functions: Any = Field(None, description="Refused unless empty.")
    function_call: Any = Field(None, description="Refused unless 'none'.")
    logprobs: Any = Field(None, description="Refused unless false.")
    top_logprobs: Any = Field(None, description="Refused unless 0.")
    logit_bias: Any = Field(None, description="Refused unless empty.")
    audio: Any = Field(None, description="Refused unless empty.")
    modalities: Any = Field(None, description="Refused unless ['text'].")
    prediction: Any = Field(None, description="Refused unless empty.")
    web_search_options: Any = Field(None, description="Refused unless empty.")

    @model_validator(mode="after")
    def _one_input(self) -> InferRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if any(not s for s in self.stop_list()):
            raise ValueError("stop sequences must not be empty")
        if self.n is not None and self.n != 1:
            raise ValueError("n must be 1: a device gives one answer per request (send several requests)")
        if self.store:
            raise ValueError("store must be false: a device stores no completions")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: give one")
        for name in _UNSUPPORTED_OPENAI:
            if _asks_for_something(name, getattr(self, name)):
                raise ValueError(f"{name} is not supported by this device (it serves plain text/JSON generation)")
        return self

    def token_limit(self) -> int | None:
        """max_tokens, or OpenAI's max_completion_tokens."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them ('developer' as 'system', text parts joined)."""
        return [m.rendered() for m in self.messages or ()]

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CancelRequest(WireModel):
    """Published to ``{prefix}/{device_id}/infer/cancel`` to stop a queued or running request."""

    id: RequestId = Field(description="The id of the request to cancel.")


class StreamChunk(WireModel):
    """One streamed piece of text (``stream: true``)."""

    id: str
    seq: int = Field(ge=0, description="0, 1, 2, ... in generation order.")
    delta: str = Field(description="Text added since the previous chunk.")


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(WireModel):
    queue_ms: float = Field(description="Time waiting in the queue.")
    ttft_ms: float = Field(description="From start of work to the first generated token.")
    tokens_per_second: float = Field(description="Decode rate after the first token.")
    total_ms: float = Field(description="From arrival to the final reply.")


class FinalReply(WireModel):
    """The last message of every successful request."""

    id: str
    done: Literal[True] = True
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timings: Timings
    model: str
    device_id: str
    served_by: str = Field(description="Which device (or 'cloud') produced the answer.")


class ErrorBody(WireModel):
    code: Literal[
        "bad_request", "too_large", "overloaded", "rate_limited", "model_unavailable", "cancelled", "timeout",
        "internal",
    ]
    message: str
    retry_after_ms: int | None = Field(
        None, description="With 'overloaded' and 'rate_limited': when a retry may be admitted, in ms."
    )


class ErrorReply(WireModel):
    """The last message of a request that failed."""

    id: str | None
    done: Literal[True] = True
    error: ErrorBody
    device_id: str


class PullProgress(WireModel):
    """How far the first (or a fleet-requested) model download has come."""

    bytes_done: int = Field(ge=0)
    bytes_total: int = Field(ge=0)
    percent: float = Field(ge=0, le=100)


#: Status states of a device that serves (draining: finishing its work, taking no new fleet requests).
LIVE_STATES: tuple[str, ...] = ("online", "draining")


class Status(WireModel):
    """Retained on ``{prefix}/{device_id}/status``: what this device is now.

    A device is visible from its first second: ``starting`` (connected, planning), ``pulling`` (with
    ``progress``), ``loading``, then ``online``; ``offline`` when it stopped or failed (``detail`` says
    why when it failed at start).
    """

    state: Literal["starting", "pulling", "loading", "online", "offline", "draining"]
    device_id: str
    role: Literal["edge", "cloud"] = "edge"
    groups: list[str] = Field(default_factory=list, description="Fleet groups (targets of group commands).")
    version: str | None = None
    model: str | None = None
    quant: str | None = None
    mode: Literal["local", "degraded", "offloading"] | None = None
    n_ctx: int | None = Field(None, description="Context of each request (tokens).")
    parallel: int | None = Field(None, description="Requests the loaded model decodes together (slots).")
    threads: int | None = None
    since: float | None = Field(None, description="Unix time this state began.")
    progress: PullProgress | None = Field(None, description="While 'pulling': bytes downloaded so far.")
    detail: str | None = Field(None, description="Why the device is 'offline' after a failed start.")
    commands: Literal["signed", "unsigned", "refused"] | None = Field(
        None,
        description="What the device does with fleet commands: runs only signed ones (it has the fleet key), "
        "runs unsigned ones (fleet.allow_unsigned, no key: anyone who can publish to its command topics "
        "controls it), or refuses them all (no key).",
    )


def _asks_for_something(name: str, value: Any) -> bool:
    """Whether an OpenAI field we cannot honour asks for anything (clients often send the 'off' values)."""
    if value is None or value is False or value in ({}, [], 0, ""):
        return False
    if name in ("tool_choice", "function_call") and value in ("none", "auto"):
        return False
    return not (name == "modalities" and value == ["text"])


def parse_request(payload: bytes, max_bytes: int) -> InferRequest:
    """Decode and validate a request payload, raising BadRequestError/TooLargeError with a readable reason."""
    if len(payload) > max_bytes:
        raise TooLargeError(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    data = decode_object(payload)
    try:
        return InferRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(describe_error(exc)) from exc


def parse_cancel(payload: bytes) -> CancelRequest:
    data = decode_object(payload)
    try:
        return CancelRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(describe_error(exc)) from exc


def peek_reply_fields(payload: bytes) -> tuple[str | None, str | None]:
    """Best-effort (id, reply_to) from a payload that failed validation, so the error can be answered.

    Safe on any payload (too deep, too large, not UTF-8): it never parses more than the top level.
    """
    fields = top_level_strings(payload, ("id", "reply_to"))
    rid, reply_to = fields.get("id"), fields.get("reply_to")
    return (
        rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None,
        reply_to if isinstance(reply_to, str) and reply_to else None,
    )


def chunk_payload(request_id: str, seq: int, delta: str) -> bytes:
    """A stream chunk, serialised directly (hot path: once per token)."""
    return json.dumps({"id": request_id, "seq": seq, "delta": delta}, ensure_ascii=False).encode()


def openai_chunk_payload(request_id: str, seq: int, delta: str, model: str, created: int) -> bytes:
    """A stream chunk as OpenAI's ``chat.completion.chunk`` (``reply_format: openai``; hot path like
    :func:`chunk_payload`). ``seq`` is kept, so order and gaps stay visible on MQTT."""
    choice: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": delta} if seq == 0
                              else {"content": delta}, "finish_reason": None}
    return json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "seq": seq, "choices": [choice]}, ensure_ascii=False).encode()


def openai_final_payload(reply: FinalReply, created: int) -> bytes:
    """The final reply as OpenAI's ``chat.completion``, with ``done: true`` (how an MQTT caller tells the last
    message) and the device's ``timings``/``served_by`` beside the OpenAI fields."""
    usage = reply.usage
    return json.dumps({
        "id": reply.id, "object": "chat.completion", "created": created, "model": reply.model, "done": True,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason}],
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens},
        "timings": reply.timings.model_dump(), "device_id": reply.device_id, "served_by": reply.served_by,
    }, ensure_ascii=False).encode()


def error_payload(
    request_id: str | None, code: str, message: str, device_id: str, retry_after_ms: int | None = None
) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message}
    if retry_after_ms is not None:
        body["retry_after_ms"] = retry_after_ms
    return json.dumps(
        {"id": request_id, "done": True, "error": body, "device_id": device_id}, ensure_ascii=False
    ).encode()


def decode_object(payload: bytes) -> dict[str, Any]:
    """``payload`` as a JSON object, its nesting and strings checked; BadRequestError saying why not."""
    check_payload(payload, None)  # bounded nesting before json.loads recurses into it
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError("payload is not UTF-8") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadRequestError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequestError("payload must be a JSON object")
    check_unicode(payload, data)
    return data


def describe_error(exc: ValidationError, whole: str = "payload") -> str:
    """A validation error as one line, ``field: problem; ...``; ``whole`` names an error of the whole object."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or whole
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "infer-request": InferRequest,
    "cancel-request": CancelRequest,
    "stream-chunk": StreamChunk,
    "final-reply": FinalReply,
    "error-reply": ErrorReply,
    "status": Status,
}
"""Models whose JSON Schemas are published in docs/schemas/ (``python -m agent.transport.schemas``)."""
