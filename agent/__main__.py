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
from agent.cli import COMMAND_NAMES, command_modules
from agent.cli.exit_codes import (
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PERMISSION,
    denied_file,
    exit_code_for,
)
from agent.errors import AgentError, PermissionDeniedError
from agent.logs import configure_logging, under_journald
from agent.permissions import denied
from agent.sdnotify import Notifier

__all__ = ["EXIT_CODES_HELP", "build_parser", "exit_code_for", "main", "reason_for"]

DAEMON_COMMANDS = frozenset({"run"})
"""Commands that are the daemon: they end with the daemon's codes only (systemd's restart rules)."""


def build_parser(commands: Sequence[str] = COMMAND_NAMES) -> argparse.ArgumentParser:
    """The whole command tree, or only ``commands`` (the daemon's parser holds ``run`` alone, so the resident
    process never imports the client commands)."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Serve small GGUF language models over MQTT from a Linux board.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules(commands):
        module.add_parser(subparsers)
    parser.set_defaults(root_parser=parser)  # `completion` walks the whole tree
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[:1] if argv[:1] and argv[0] in DAEMON_COMMANDS else COMMAND_NAMES)
    args = parser.parse_args(argv)
    # One-shot commands log warnings to stderr; `run` reconfigures for the daemon from its settings.
    configure_logging("warning", "console", stream=sys.stderr)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # the process boundary: every failure becomes one line and an exit code
        return _fail(exc, one_shot=args.command not in DAEMON_COMMANDS)
    return code


def reason_for(exc: BaseException) -> str:
    """The operator's line for an exception: our message, or a permission problem explained with its fix."""
    if isinstance(exc, PermissionDeniedError):
        return str(exc)
    cause = denied_file(exc)
    if cause is not None:
        # Say which file and how to fix it, not the wrapping error's general message.
        return str(denied(Path(str(cause.filename)), "access", cause))
    if isinstance(exc, AgentError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def _fail(exc: Exception, *, one_shot: bool) -> int:
    code = exit_code_for(exc, one_shot=one_shot)
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
    denied_cause = denied_file(exc)
    errno_value = None
    if code == EXIT_PERMISSION:
        errno_value = denied_cause.errno if denied_cause is not None else errno.EACCES
    notifier = Notifier.from_environ(os.environ)
    if notifier.failed(f"failed: {reason}"[:1000], errno_value):
        notifier.barrier()  # else systemd may reap us before reading it, and drop it
    return code


if __name__ == "__main__":
    sys.exit(main())
