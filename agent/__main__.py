"""The ``edge-agent`` command line: the only place in the package that exits the process.

Every failure ends here as one line on stderr (``edge-agent: error: ...``) and an exit code from one
table (:data:`EXIT_CODES_HELP`, also in docs/operations.md); under systemd the line also becomes the
unit's ``STATUS=`` (``systemctl status`` shows it) and carries the journal's error priority.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.cli import COMMAND_MODULES
from agent.errors import AgentError, BadRequestError, ConfigError, ModelUnavailableError, PermissionDeniedError
from agent.logs import configure_logging, under_journald
from agent.permissions import denied, is_denied
from agent.sdnotify import Notifier

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # argparse's own
EXIT_MODEL_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_RESTART = 75  # EX_TEMPFAIL; agent.daemon.RESTART_EXIT_CODE
EXIT_PERMISSION = 77  # EX_NOPERM
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes (the unit restarts on 1, 69, 75; RestartPreventExitStatus=2 77 78):
  0    stopped cleanly / the command succeeded
  1    unexpected internal error (restarted); for one-shot commands also: the operation failed
       (broker unreachable, error reply, no answer in time, nothing retained, plan: nothing fits)
  2    command-line usage error
  69   model unavailable: pull failed, Hub unreachable and nothing cached, load failed (restarted)
  75   restart requested by the fleet 'restart' command (restarted)
  77   permission denied on a file it must read or write (not restarted)
  78   configuration error: invalid config, no model configured, nothing in the catalog fits (not restarted)
  130  interrupted (Ctrl-C)"""

# Errors of modules a command may never have imported (the Hub client costs about a second to import):
# an exception of a class whose module is not loaded cannot be in hand, so only loaded ones are checked.
_MODEL_UNAVAILABLE_ELSEWHERE = (("agent.catalog.hub", "HubError"), ("agent.catalog.gguf_header", "GgufFormatError"))
_CONFIG_ELSEWHERE = (("agent.catalog.fit", "NothingFitsError"),)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Serve small GGUF language models over MQTT from a Linux board.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # One-shot commands log warnings to stderr; `run` reconfigures for the daemon from its settings.
    configure_logging("warning", "console", stream=sys.stderr)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # the process boundary: every failure becomes one line and an exit code
        return _fail(exc)
    return code


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception that ended a command (see :data:`EXIT_CODES_HELP`)."""
    if isinstance(exc, PermissionDeniedError):
        return EXIT_PERMISSION
    if isinstance(exc, ConfigError) or _is_any(exc, _CONFIG_ELSEWHERE):
        return EXIT_CONFIG
    if _denied_file(exc) is not None:
        return EXIT_PERMISSION
    if isinstance(exc, ModelUnavailableError) or _is_any(exc, _MODEL_UNAVAILABLE_ELSEWHERE):
        return EXIT_MODEL_UNAVAILABLE
    if isinstance(exc, BadRequestError):
        return EXIT_USAGE
    return EXIT_INTERNAL


def reason_for(exc: BaseException) -> str:
    """The operator's line for an exception: our message, or a permission problem explained with its fix."""
    if isinstance(exc, PermissionDeniedError):
        return str(exc)
    cause = _denied_file(exc)
    if cause is not None:
        # Say which file and how to fix it, not the wrapping error's general message.
        return str(denied(Path(str(cause.filename)), "access", cause))
    if isinstance(exc, AgentError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def _fail(exc: Exception) -> int:
    code = exit_code_for(exc)
    reason = reason_for(exc)
    journal = under_journald(sys.stderr, os.environ)
    lines: list[str] = []
    if code == EXIT_INTERNAL and not isinstance(exc, AgentError):
        # A bug: the traceback is what a report needs; permission and config problems never get one.
        lines.extend("".join(traceback.format_exception(exc)).rstrip("\n").split("\n"))
    lines.extend(f"edge-agent: error: {reason}".split("\n"))
    prefix = "<3>" if journal else ""
    sys.stderr.write("".join(f"{prefix}{line}\n" for line in lines))
    sys.stderr.flush()
    denied_cause = _denied_file(exc)
    errno_value = None
    if code == EXIT_PERMISSION:
        errno_value = denied_cause.errno if denied_cause is not None else errno.EACCES
    notifier = Notifier.from_environ(os.environ)
    if notifier.failed(f"failed: {reason}"[:1000], errno_value):
        notifier.barrier()  # else systemd may reap us before reading it, and drop it
    return code


def _denied_file(exc: BaseException) -> OSError | None:
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


if __name__ == "__main__":
    sys.exit(main())
