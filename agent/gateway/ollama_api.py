"""Ollama's API ↔ our wire (pure): ``/api/chat``, ``/api/generate`` bodies in, Ollama's replies out.

``options`` map onto the wire's sampling fields (temperature, top_p, top_k, min_p, repeat_penalty, seed,
num_predict → max_tokens, stop, and the penalties when the devices have them); other options (num_ctx,
num_thread, mirostat, ...) are settings of the device's model, not of one request, and are ignored as Ollama
ignores options a model does not use. ``format`` ("json" or a JSON Schema) becomes ``response_format``. Tools,
images, thinking and raw templates are refused with a 400 naming them (docs/gateway.md).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import __version__
from agent.gateway.errors import GatewayError, bad_request
from agent.gateway.targets import ModelEntry
from agent.gateway.wire_request import WireBody, wire_message
from agent.transport.wire import describe_error

API_VERSION = "0.6.0"
"""What ``/api/version`` reports: the Ollama API level whose endpoints and fields the gateway speaks."""

DONE_REASONS: Mapping[str, str] = {"stop": "stop", "length": "length", "cancelled": "stop"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Body):
    role: str
    content: str | list[Any] | None = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class _Common(_Body):
    model: str = Field(min_length=1)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    keep_alive: Any = None  # the device keeps its model loaded anyway


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(_Common):
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[Any] | None = None
    context: list[int] | None = None


class ShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # older clients

    @property
    def target(self) -> str:
        name = self.model or self.name
        if not name:
            raise bad_request("model is required")
        return name


class PullRequest(ShowRequest):
    stream: bool = True


def pulled() -> dict[str, Any]:
    """``/api/pull``'s answer for a live target: nothing to download."""
    return {"status": "success"}


def parse(model: type[_Body], data: Any) -> Any:
    """``data`` as ``model``, or a 400 naming the bad fields."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(describe_error(exc, "body")) from exc


def is_load_request(req: ChatRequest | GenerateRequest) -> bool:
    """Ollama's "load the model" call: a chat with no messages, a generate with no prompt."""
    if isinstance(req, ChatRequest):
        return not req.messages
    return not req.prompt and not req.system


def chat_to_wire(req: ChatRequest, request_id: str) -> dict[str, Any]:
    """The native request for ``POST /api/chat``."""
    if req.tools:
        raise bad_request("tools: tool calling is not supported (in Home Assistant, turn off 'Control Home "
                          "Assistant' for this conversation agent)")
    body = _common(req, request_id)
    messages = [wire_message(i, m.role, m.content, tool_calls=m.tool_calls, images=m.images)
                for i, m in enumerate(req.messages)]
    body.put("messages", messages)
    return body.finish()


def generate_to_wire(req: GenerateRequest, request_id: str) -> dict[str, Any]:
    """The native request for ``POST /api/generate``: the model's chat template applies (as in Ollama) unless
    ``raw``, which sends the prompt as plain text to complete."""
    for name, value in (("suffix", req.suffix), ("template", req.template), ("context", req.context)):
        if value:
            raise bad_request(f"{name} is not supported")
    if req.images:
        raise bad_request("images are not supported")
    body = _common(req, request_id)
    if req.raw:
        if req.system:
            raise bad_request("system cannot be combined with raw (a raw prompt has no template)")
        body.put("prompt", req.prompt)
    else:
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": req.prompt})
        body.put("messages", messages)
    return body.finish()


def _common(req: ChatRequest | GenerateRequest, request_id: str) -> WireBody:
    if req.think:
        raise bad_request("think: separate thinking output is not supported")
    body = WireBody(request_id)
    options = req.options or {}
    num_predict = options.get("num_predict")
    # -1 (no limit) and -2 (fill the context) leave the device's default_max_tokens in force.
    body.put("max_tokens", num_predict if isinstance(num_predict, int) and num_predict > 0 else None,
             asked_as="options.num_predict")
    for option in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
        body.put(option, options.get(option), asked_as=f"options.{option}")
    for option in ("frequency_penalty", "presence_penalty"):
        body.put(option, options.get(option), asked_as=f"options.{option}", neutral=0.0)
    stop = options.get("stop")
    body.put("stop", stop if stop not in ([], "") else None, asked_as="options.stop")
    body.put("response_format", response_format(req.format), asked_as="format")
    body.put("model", req.model)
    body.put("stream", req.stream)
    return body


def response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's ``format`` as the wire's ``response_format``: "json" → json_object, a schema → json_schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise bad_request(f"format: expected \"json\" or a JSON Schema object, got {fmt!r}")


# -- replies ----------------------------------------------------------------------------------------


def now_iso() -> str:
    return _iso(time.time())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _stats(final: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's counts and durations (ns) from the wire's usage and timings."""
    counts = final.get("usage") or {}
    timings = final.get("timings") or {}
    ms = 1_000_000
    total = float(timings.get("total_ms") or 0.0)
    queue = float(timings.get("queue_ms") or 0.0)
    ttft = float(timings.get("ttft_ms") or 0.0)
    completion = int(counts.get("completion_tokens") or 0)
    rate = float(timings.get("tokens_per_second") or 0.0)
    decode_ms = completion / rate * 1000 if rate > 0 else max(0.0, total - queue - ttft)
    return {
        "total_duration": int(total * ms),
        "load_duration": int(queue * ms),  # time before work started: Ollama's nearest field is the load
        "prompt_eval_count": int(counts.get("prompt_tokens") or 0),
        "prompt_eval_duration": int(ttft * ms),
        "eval_count": completion,
        "eval_duration": int(decode_ms * ms),
    }


def chat_chunk(model: str, delta: str) -> dict[str, Any]:
    return {"model": model, "created_at": now_iso(), "message": {"role": "assistant", "content": delta},
            "done": False}


def chat_final(model: str, final: Mapping[str, Any], *, streamed: bool) -> dict[str, Any]:
    """The last ``/api/chat`` object: the whole text when not streamed, empty content after a stream."""
    text = "" if streamed else str(final.get("text", ""))
    return {"model": model, "created_at": now_iso(), "message": {"role": "assistant", "content": text},
            "done": True, "done_reason": DONE_REASONS.get(str(final.get("finish_reason")), "stop"), **_stats(final)}


def generate_chunk(model: str, delta: str) -> dict[str, Any]:
    return {"model": model, "created_at": now_iso(), "response": delta, "done": False}


def generate_final(model: str, final: Mapping[str, Any], *, streamed: bool) -> dict[str, Any]:
    text = "" if streamed else str(final.get("text", ""))
    return {"model": model, "created_at": now_iso(), "response": text, "done": True,
            "done_reason": DONE_REASONS.get(str(final.get("finish_reason")), "stop"), **_stats(final)}


def load_reply(model: str, chat: bool) -> dict[str, Any]:
    """The answer to a load request: the device has its model loaded already."""
    body: dict[str, Any] = {"model": model, "created_at": now_iso(), "done": True, "done_reason": "load"}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return body


def error_body(error: GatewayError) -> dict[str, Any]:
    """Ollama's error shape."""
    return {"error": error.message}


def _digest(entry: ModelEntry) -> str:
    return hashlib.sha256(f"{entry.name}\0{entry.model}\0{entry.quant}".encode()).hexdigest()


def _details(entry: ModelEntry) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": entry.model or "", "families": None,
            "parameter_size": "", "quantization_level": entry.quant or ""}


def tag(entry: ModelEntry) -> dict[str, Any]:
    """One model of ``GET /api/tags``."""
    return {"name": entry.name, "model": entry.name, "modified_at": _iso(entry.since or time.time()), "size": 0,
            "digest": _digest(entry), "details": _details(entry)}


def tags(entries: Iterable[ModelEntry]) -> dict[str, Any]:
    return {"models": [tag(e) for e in entries]}


def running(entries: Iterable[ModelEntry]) -> dict[str, Any]:
    """``GET /api/ps``: every live target is loaded, and stays so."""
    models = []
    for entry in entries:
        models.append({**tag(entry), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0,
                       "context_length": entry.n_ctx})
    return {"models": models}


def show(entry: ModelEntry) -> dict[str, Any]:
    """``POST /api/show``: what the devices behind ``entry`` serve."""
    info: dict[str, Any] = {"general.name": entry.model, "edge_agent.kind": entry.kind,
                            "edge_agent.devices": list(entry.devices)}
    if entry.n_ctx is not None:
        info["edge_agent.context_length"] = entry.n_ctx
    served = ", ".join(entry.devices)
    return {
        "modelfile": f"# served by edge-agent ({entry.kind}: {served})\n",
        "parameters": "",
        "template": "",
        "details": _details(entry),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": _iso(entry.since or time.time()),
    }


def version() -> dict[str, Any]:
    return {"version": API_VERSION, "edge_agent": __version__}
