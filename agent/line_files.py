"""Appending whole lines to a journal file so that a crash or a full disk never leaves half a line behind.

Used by the fleet's result and nonce journals (:mod:`agent.fleet.store`) and the telemetry buffer
(:mod:`agent.services.telemetry_buffer`); each logs its own failures under its own event names.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any


def append_lines(path: Path, data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path`` and fsync it; raises the ``OSError`` of a write that failed.

    A write cut short is truncated off again, so the file holds whole lines only; a torn last line left by a
    crash (or a cut that could not be undone) stays a separate line, which readers skip.
    """
    # Unbuffered, so a failed write leaves no pending bytes that a later close would still try to write.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        torn = start > 0 and os.pread(fd, 1, start - 1) != b"\n"
        view = memoryview(b"\n" * torn + data)
        try:
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            # Truncating never needs space: the next start reads whole lines only, and the next append
            # does not begin in the middle of one.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def write_error_fields(exc: OSError) -> dict[str, Any]:
    """The log fields of a failed append, the same for every journal: ``error`` text and ``errno`` name."""
    return {"error": exc.strerror or str(exc), "errno": errno.errorcode.get(exc.errno or 0, exc.errno)}
