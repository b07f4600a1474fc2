"""structlog set-up: JSON lines under systemd/journald, a readable console on a TTY.

Under journald each line starts with a ``<N>`` syslog priority (journald strips it; the unit's
``SyslogLevelPrefix=`` defaults to yes), so ``journalctl -p warning -u edge-agent`` shows warnings
and errors. Nothing changes on a TTY or in a plain pipe.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

SYSLOG_PRIORITIES = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}
"""structlog method name → syslog priority (sd-daemon(3): <3> error, <4> warning, <6> info, <7> debug)."""


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd announced in ``$JOURNAL_STREAM`` (``dev:inode``).

    Comparing the device and inode (as systemd.exec(5) advises) keeps a child whose output was
    redirected to a file or pipe from writing priority prefixes there.
    """
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    dev, sep, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(sep) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # No file descriptor (a StringIO) or a malformed variable: not the journal.
        return False


def syslog_prefix(logger: Any, method_name: str, rendered: Any) -> Any:
    """Last in the chain under journald: prefix every rendered line with its ``<N>`` priority."""
    if not isinstance(rendered, str):
        return rendered
    prefix = f"<{SYSLOG_PRIORITIES.get(method_name, 6)}>"
    return "\n".join(prefix + line for line in rendered.split("\n"))


def configure_logging(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Configure structlog once per process (the CLI calls it; library code only gets loggers).

    The daemon logs to stdout (journald); one-shot commands pass ``stream=sys.stderr`` so their
    stdout stays the command's output. ``environ`` (default ``os.environ``) is where
    ``JOURNAL_STREAM`` is looked up.
    """
    out = stream or sys.stdout
    json_lines = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.dict_tracebacks if json_lines else structlog.dev.set_exc_info,
        renderer,
    ]
    if under_journald(out, os.environ if environ is None else environ):
        processors.append(syslog_prefix)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,  # tests and `run` reconfigure after modules first log
    )


def _is_tty(stream: TextIO) -> bool:
    """Colour only on a terminal: escape codes in a captured log (bootstrap, Ansible, journald) are noise."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without a descriptor
        return False
