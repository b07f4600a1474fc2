"""Fleet command wire models: the request an operator publishes, the result a device answers, and the
arguments of each command; plus :func:`build_command`, which an operator uses to make (and sign) a request.

The JSON Schemas in docs/schemas/ are generated from these models (``python -m agent.transport.schemas``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.fleet.config_edit import UNSET
from agent.fleet.signing import sign_payload
from agent.transport.topics import Scope, target_label

if TYPE_CHECKING:  # cryptography loads only when a key is used (~7 MB RSS)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PROTOCOL_VERSION: Literal[1] = 1


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandRequest(_Wire):
    """The payload published to a command topic."""

    v: Literal[1] = Field(PROTOCOL_VERSION, description="Protocol version.")
    id: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$",
                    description="Command id: executed at most once per device; a redelivery gets the stored result.")
    args: dict[str, Any] = Field(default_factory=dict, description="Command arguments.")
    issued_at: float | None = Field(None, description="Unix time the operator issued it (required when signed).")
    expires_at: float | None = Field(None, description="Unix time after which devices refuse it with 'expired'.")
    nonce: str | None = Field(None, min_length=8, max_length=128, description="Random, unique per command (signed).")
    cmd: str | None = Field(None, description="Command name; must match the topic (required when signed).")
    target: str | None = Field(
        None, description="'all', 'group:NAME' or 'device:ID'; must match the topic (required when signed)."
    )
    reply_to: str | None = Field(None, min_length=1, description="Reply topic for MQTT 3.1.1 clients.")
    sig: str | None = Field(None, description="Base64 Ed25519 signature over the canonical payload.")


class CommandError(_Wire):
    code: str = Field(description="Stable machine code (expired, unsigned, bad_request, ...).")
    message: str = Field(description="What went wrong, for the operator.")


class CommandResult(_Wire):
    """Published to the Response Topic / ``reply_to`` and to ``{prefix}/{device_id}/cmd/result``."""

    v: Literal[1] = PROTOCOL_VERSION
    id: str | None
    device_id: str
    cmd: str
    ok: bool
    result: dict[str, Any] | None = None
    error: CommandError | None = None
    duplicate: bool = Field(False, description="True when this is the stored result of an id already executed.")

    def payload(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False).encode()


class NoArgs(_Wire):
    pass


class PlanArgs(_Wire):
    model: str | None = Field(None, min_length=1, description="Catalog name to plan for (default: configured).")
    quant: str | None = Field(None, min_length=1, description="Pinned quant to plan for.")


class ModelArgs(_Wire):
    model: str = Field(min_length=1, description="Catalog name, or 'auto' to let the fit decision choose.")
    quant: str | None = Field(None, min_length=1, description="Pin a quant (default: best that fits).")


class ConfigGetArgs(_Wire):
    key: str | None = Field(None, description="Dotted key, e.g. 'inference.max_queue'; whole config when absent.")


class ConfigSetArgs(_Wire):
    key: str | None = Field(None, description="Dotted key to set.")
    value: Any = Field(
        None, description="New value (JSON-typed); null removes the key from the fleet override layer."
    )
    values: dict[str, Any] | None = Field(None, description="Several dotted keys at once.")

    @model_validator(mode="after")
    def _one_form(self) -> ConfigSetArgs:
        if (self.key is None) == (self.values is None):
            raise ValueError("give either 'key' and 'value', or 'values'")
        if self.key is not None and "value" not in self.model_fields_set:
            raise ValueError("'value' is required with 'key' (null removes the key)")
        return self

    def changes(self) -> dict[str, Any]:
        items = self.values.items() if self.values is not None else [(self.key, self.value)]
        return {str(k): (UNSET if v is None else v) for k, v in items}


def build_command(
    name: str,
    args: Mapping[str, Any],
    scope: Scope,
    value: str | None,
    *,
    key: Ed25519PrivateKey | None = None,
    ttl_s: float | None = None,
    command_id: str | None = None,
    reply_to: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A command payload ready to publish (signed when ``key`` is given), bound to its name and target."""
    issued = round(time.time() if now is None else now, 3)
    payload: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": command_id or uuid.uuid4().hex,
        "cmd": name,
        "target": target_label(scope, value),
        "args": dict(args),
        "issued_at": issued,
        "nonce": uuid.uuid4().hex,
    }
    if ttl_s is not None:
        payload["expires_at"] = round(issued + ttl_s, 3)
    if reply_to is not None:
        payload["reply_to"] = reply_to
    return sign_payload(payload, key) if key is not None else payload
