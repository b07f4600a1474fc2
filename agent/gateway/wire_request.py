"""The native request the gateway publishes: built from what an HTTP API asked, checked by the wire model itself.

The device's :class:`agent.transport.wire.InferRequest` is the one definition of what a request may carry (it
refuses unknown fields). Translators add each field through :class:`WireBody`, which sends a field only when the
running InferRequest has it: a value this protocol version cannot carry is refused (HTTP 400) when it would change
the answer, and dropped when it would not (a penalty of 0, a ``user`` label). The finished body is validated by
InferRequest before it leaves, so a bad value is a 400 from the gateway rather than an error reply later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from agent.gateway.errors import bad_request
from agent.transport.wire import InferRequest, describe_error

ROLES: Mapping[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Chat roles of both HTTP APIs → wire roles (a developer message is the system instruction of newer models)."""


def wire_accepts(name: str) -> bool:
    """True when the devices' request model (this build's InferRequest) has field ``name``."""
    return name in InferRequest.model_fields


class WireBody:
    """A request body under construction, field by field."""

    def __init__(self, request_id: str) -> None:
        self.fields: dict[str, Any] = {"id": request_id}

    def put(self, name: str, value: Any, *, asked_as: str | None = None, neutral: Any = None) -> None:
        """Set wire field ``name`` unless ``value`` is None.

        When the wire has no such field: drop a ``value`` equal to ``neutral`` (it changes nothing), else raise a
        400 naming ``asked_as`` (the client's own name for it).
        """
        if value is None:
            return
        if wire_accepts(name):
            self.fields[name] = value
        elif neutral is not None and value == neutral:
            return
        else:
            raise bad_request(f"{asked_as or name} is not supported by this gateway's request protocol")

    def finish(self) -> dict[str, Any]:
        """The payload to publish (only the fields that were set), after InferRequest accepted it."""
        try:
            request = InferRequest.model_validate(self.fields)
        except ValidationError as exc:
            raise bad_request(describe_error(exc, "request")) from exc
        return request.model_dump(mode="json", exclude_unset=True, by_alias=True)


def text_of(content: Any, where: str) -> str:
    """Message content as text: a string, or a list of text parts (joined); anything else is a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise bad_request(f"{where}: only text content parts are supported (got {kind!r})")
        return "".join(texts)
    raise bad_request(f"{where}: content must be a string or a list of text parts")


def wire_message(i: int, role: str, content: Any, *, tool_calls: list[Any] | None,
                 images: list[Any] | None = None) -> dict[str, str]:
    """Chat message ``i`` as the wire's ``{role, content}``; a 400 naming the field for a role the devices do not
    have (tool results), images or tool calls."""
    wire_role = ROLES.get(role)
    if wire_role is None:
        raise bad_request(f"messages.{i}.role: {role!r} is not supported (tools are not)")
    if images:
        raise bad_request(f"messages.{i}.images: images are not supported")
    if tool_calls:
        raise bad_request(f"messages.{i}: tool calls are not supported")
    return {"role": wire_role, "content": text_of(content, f"messages.{i}.content")}
