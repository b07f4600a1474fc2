"""What a request is generated with: its own values over the served model's defaults (pure).

The layers (agent.config.generation): ``[generation]`` < the catalog model's ``defaults`` < the request.
Also the default system prompt (only for chat requests that bring no system/developer message) and
default stop sequences (only when the request gives none).
"""

from __future__ import annotations

from typing import TypeVar

from agent.config.generation import GenerationSettings
from agent.engine.grammar import grammar_for
from agent.engine.llama import SamplingParams
from agent.transport.wire import InferRequest

T = TypeVar("T")


def sampling_for(request: InferRequest, defaults: GenerationSettings, max_tokens: int) -> SamplingParams:
    """Sampling parameters for ``request``; raises BadRequestError when its response_format cannot be enforced."""
    fmt = request.response_format
    grammar = None
    if fmt is not None:
        grammar = grammar_for(fmt.type, fmt.json_schema.schema_ if fmt.json_schema is not None else None)
    stop = request.stop_list() or list(defaults.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_pick(request.temperature, defaults.temperature),
        top_p=_pick(request.top_p, defaults.top_p),
        top_k=_pick(request.top_k, defaults.top_k),
        min_p=_pick(request.min_p, defaults.min_p),
        repeat_penalty=_pick(request.repeat_penalty, defaults.repeat_penalty),
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        seed=request.seed,
        stop=tuple(stop),
        grammar=grammar,
    )


def chat_for(request: InferRequest, defaults: GenerationSettings) -> list[dict[str, str]]:
    """The chat messages to render: the default system prompt first when the request has none of its own."""
    messages = request.chat()
    if defaults.system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": defaults.system})
    return messages


def _pick(own: T | None, default: T) -> T:
    return default if own is None else own
