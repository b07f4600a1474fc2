"""One error tree for the whole agent.

Every error carries a stable machine ``code`` (it is what an MQTT error reply carries, so clients can
branch on it) and a message written for the operator. Errors also inherit from the closest standard
library category where one exists, so callers can catch by category (``except FileNotFoundError``)
without knowing our names.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code = "internal"


class ConfigError(AgentError, ValueError):
    """The configuration (file, environment or a live change) is invalid; the message names the key path."""

    code = "bad_config"


class PermissionDeniedError(AgentError, PermissionError):
    """A file or directory the agent must read or write is not accessible to this user.

    The message names the path and the fix (which group to join, which user to run as); ``path`` is
    the file that was refused. Not a wire error code: it stops a command or the daemon's start.
    """

    code = "permission_denied"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class BadRequestError(AgentError, ValueError):
    """A request payload is malformed or asks for something impossible."""

    code = "bad_request"


class TooLargeError(BadRequestError):
    """A payload or prompt does not fit (message size limit or the model's context)."""

    code = "too_large"


class OverloadedError(AgentError):
    """The queue is full or the request cannot be served before its deadline."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class RateLimitedError(OverloadedError):
    """One caller (one reply address) sent more requests than ``inference.rate_per_client_per_s`` allows.

    An :class:`OverloadedError` by category (both mean "try again later"); ``retry_after_ms`` says when
    the caller's next request will be admitted.
    """

    code = "rate_limited"


class NotFoundError(AgentError, LookupError):
    """What an operator's command names does not exist (no retained status for a device, nothing cached
    matches). Not a wire error code: it ends a one-shot command (exit 66)."""

    code = "not_found"


class ModelUnavailableError(AgentError):
    """No model is loaded (loading, swapping, failed or missing)."""

    code = "model_unavailable"


class ModelFileError(ModelUnavailableError, FileNotFoundError):
    """The GGUF file is missing or unreadable."""

    code = "model_unavailable"


class CancelledError(AgentError):
    """The caller cancelled the request, or the daemon is shutting down."""

    code = "cancelled"


class DeadlineExceededError(AgentError, TimeoutError):
    """The request's deadline (payload ``deadline_ms`` or MQTT message expiry) passed."""

    code = "timeout"


class TransportError(AgentError, ConnectionError):
    """The MQTT broker could not be reached or refused us."""

    code = "transport"


ERROR_CODES: tuple[str, ...] = (
    "bad_request",
    "too_large",
    "overloaded",
    "rate_limited",
    "model_unavailable",
    "cancelled",
    "timeout",
    "internal",
)
"""Codes that can appear in an inference error reply (the wire contract in docs/protocol.md)."""
