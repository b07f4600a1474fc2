"""The exit code table: what ``edge-agent`` returns for each way a command or the daemon can end.

One table for the daemon and the one-shot commands (also printed at the end of ``edge-agent --help`` and in
docs/operations.md). The daemon's codes are a contract with systemd (the unit restarts on 1, 69 and 75 and
has ``RestartPreventExitStatus=2 77 78``), so the codes that only one-shot commands use (a timeout, an
unreachable broker, an overloaded device, a refused request, something not found) are values the unit
never sees: ``run`` maps those errors to 1 as before (:func:`exit_code_for` with ``one_shot=False``).
They follow sysexits(3) where it has a fitting value that is still free (65, 66, 68); the two it cannot
give without colliding (EX_TEMPFAIL 75 is the daemon's restart) are 79, the next value after sysexits'
last, and 124, what ``timeout(1)`` returns when the time ran out.
"""

from __future__ import annotations

import sys

from agent.cli.device_client import AnswerError
from agent.errors import (
    BadRequestError,
    ConfigError,
    DeadlineExceededError,
    ModelUnavailableError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    TooLargeError,
    TransportError,
)
from agent.permissions import is_denied

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # argparse's own
EXIT_BAD_REQUEST = 65  # EX_DATAERR: the device refused the request (bad_request, too_large)
EXIT_NOT_FOUND = 66  # EX_NOINPUT: no retained status for the device, nothing cached matches
EXIT_BROKER_UNREACHABLE = 68  # EX_NOHOST: the broker cannot be reached or refused us
EXIT_MODEL_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_RESTART = 75  # EX_TEMPFAIL; agent.daemon.RESTART_EXIT_CODE
EXIT_PERMISSION = 77  # EX_NOPERM
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_OVERLOADED = 79  # the device is overloaded or rate-limits us: try again later (retry_after_ms)
EXIT_TIMEOUT = 124  # as timeout(1): no answer within --timeout, or the device answered 'timeout'
EXIT_INTERRUPTED = 130

ONE_SHOT_ONLY = frozenset({EXIT_BAD_REQUEST, EXIT_NOT_FOUND, EXIT_BROKER_UNREACHABLE, EXIT_OVERLOADED, EXIT_TIMEOUT})
"""Codes the daemon (``run``) never returns: systemd's restart rules do not mention them."""

REPLY_EXIT_CODES: dict[str, int] = {
    "bad_request": EXIT_BAD_REQUEST,
    "too_large": EXIT_BAD_REQUEST,
    "overloaded": EXIT_OVERLOADED,
    "rate_limited": EXIT_OVERLOADED,
    "timeout": EXIT_TIMEOUT,
    "model_unavailable": EXIT_MODEL_UNAVAILABLE,
}
"""An error reply's wire code (docs/protocol.md) → the exit code; others (cancelled, internal) are 1."""

EXIT_CODES_HELP = """exit codes (the unit restarts on 1, 69, 75; RestartPreventExitStatus=2 77 78):
  0    stopped cleanly / the command succeeded
  1    unexpected internal error (restarted); for one-shot commands also: the operation failed
       (an error reply not listed below, plan: nothing fits, fleet cmd: a device failed or was silent)
  2    command-line usage error
  65   bad request: the device refused the request (bad_request, too_large)
  66   not found: no retained status for the device; nothing cached matches (models rm)
  68   broker unreachable (or it refused the connection or subscription)
  69   model unavailable: pull failed, Hub unreachable and nothing cached, load failed (restarted);
       ask/chat: the device has no model loaded
  75   restart requested by the fleet 'restart' command (restarted)
  77   permission denied on a file it must read or write (not restarted)
  78   configuration error: invalid config, no model configured, nothing in the catalog fits (not restarted)
  79   overloaded: the device's queue is full or it rate-limits us; try again later
  124  timeout: no answer within --timeout, or the device answered 'timeout'
  130  interrupted (Ctrl-C)
65, 66, 68, 79 and 124 come from one-shot commands only; the daemon ends with 1 for those errors."""

# Errors of modules a command may never have imported (the Hub client costs about a second to import):
# an exception of a class whose module is not loaded cannot be in hand, so only loaded ones are checked.
_MODEL_UNAVAILABLE_ELSEWHERE = (("agent.catalog.hub", "HubError"), ("agent.catalog.gguf_header", "GgufFormatError"))
_CONFIG_ELSEWHERE = (("agent.catalog.fit", "NothingFitsError"),)


def exit_code_for(exc: BaseException, *, one_shot: bool = True) -> int:  # noqa: PLR0911 - one return per row
    """The documented exit code for an exception that ended a command (see :data:`EXIT_CODES_HELP`).

    ``one_shot=False`` is the daemon: the one-shot-only codes (:data:`ONE_SHOT_ONLY`) become 1.
    """
    if isinstance(exc, PermissionDeniedError):
        return EXIT_PERMISSION
    if isinstance(exc, ConfigError) or _is_any(exc, _CONFIG_ELSEWHERE):
        return EXIT_CONFIG
    if denied_file(exc) is not None:
        return EXIT_PERMISSION
    if isinstance(exc, ModelUnavailableError) or _is_any(exc, _MODEL_UNAVAILABLE_ELSEWHERE):
        return EXIT_MODEL_UNAVAILABLE
    code = _one_shot_code(exc)
    if code is not None:
        return code if one_shot or code not in ONE_SHOT_ONLY else EXIT_INTERNAL
    if isinstance(exc, BadRequestError):
        return EXIT_USAGE
    return EXIT_INTERNAL


_ONE_SHOT_ERRORS: tuple[tuple[type[BaseException], int], ...] = (
    (TooLargeError, EXIT_BAD_REQUEST),  # a request larger than the broker or the device takes
    (TransportError, EXIT_BROKER_UNREACHABLE),
    (DeadlineExceededError, EXIT_TIMEOUT),
    (OverloadedError, EXIT_OVERLOADED),
    (NotFoundError, EXIT_NOT_FOUND),
)


def _one_shot_code(exc: BaseException) -> int | None:
    if isinstance(exc, AnswerError):
        return REPLY_EXIT_CODES.get(exc.code, EXIT_INTERNAL)
    return next((code for cls, code in _ONE_SHOT_ERRORS if isinstance(exc, cls)), None)


def denied_file(exc: BaseException) -> OSError | None:
    """The OS error that refused a named file (EACCES, EPERM, EROFS): ``exc`` itself or an explicit cause.

    Only ``raise ... from`` links count: an implicit context may be an unrelated error handled earlier.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and is_denied(current) and current.filename is not None:
            return current
        current = current.__cause__
    return None


def _is_any(exc: BaseException, names: tuple[tuple[str, str], ...]) -> bool:
    for module_name, class_name in names:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False
