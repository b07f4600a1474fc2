"""Failures of a gateway request, each with the HTTP status it is answered with (pure; no HTTP library).

The wire's error codes (docs/protocol.md, "Errors") map to HTTP statuses here, in one table, so the OpenAI
and Ollama routes answer the same failure with the same status, each in its own error shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agent.errors import AgentError

WIRE_STATUS: Mapping[str, int] = {
    "bad_request": 400,
    "too_large": 413,
    "overloaded": 429,  # 503 when the answering device is draining (see from_wire)
    "rate_limited": 429,
    "model_unavailable": 503,
    "cancelled": 503,  # cancelled on the device (shutting down); the client did not ask for it
    "timeout": 504,
    "internal": 502,  # the device failed, not the gateway
}
"""HTTP status for each wire error code."""


class GatewayError(AgentError):
    """A request the gateway answers with an HTTP error; ``code`` is the wire code (or the gateway's own)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def not_found(message: str) -> GatewayError:
    return GatewayError(404, "not_found", message)


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, "bad_request", message)


def unavailable(message: str, retry_after_s: int | None = None) -> GatewayError:
    return GatewayError(503, "unavailable", message, retry_after_s)


def timed_out(timeout_s: float) -> GatewayError:
    return GatewayError(504, "timeout", f"no answer from the device within {timeout_s:g} s")


def from_wire(error: Mapping[str, Any], *, draining: bool = False, top_level_retry_ms: Any = None) -> GatewayError:
    """The HTTP failure for a wire error reply's ``error`` object.

    ``overloaded`` is 429 (try again shortly) unless the device that answered is draining (its retained status
    says so), which is 503: it will not take work for a while. ``retry_after_ms`` (in the error object, or at the
    reply's top level for older devices) becomes a Retry-After in whole seconds, rounded up.
    """
    code = str(error.get("code") or "internal")
    message = str(error.get("message") or code)
    status = WIRE_STATUS.get(code, 502)
    if code == "overloaded" and draining:
        status = 503
    retry_ms = error.get("retry_after_ms", top_level_retry_ms)
    retry_s = None
    if isinstance(retry_ms, int | float) and not isinstance(retry_ms, bool) and retry_ms >= 0:
        retry_s = max(1, math.ceil(retry_ms / 1000))
    elif status in (429, 503):
        retry_s = 1
    return GatewayError(status, code, message, retry_s)
