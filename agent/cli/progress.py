"""A download progress bar for the operator's terminal: bytes, percent, rate and ETA, on stderr.

:class:`TransferBar` is a ``progress(bytes_done, bytes_total)`` callback (what ``HubStore.pull`` and
``Planner.ensure_present`` call from the pull's thread) drawn with tqdm, which huggingface_hub already
depends on. One bar per pull: huggingface_hub's own bars never show, because the store transfers the bytes
itself and ``hf_hub_download`` finds the blob already there. The bar starts at the first callback (a
cache hit draws nothing), starts where a resumed download stands (so the rate counts this run's bytes),
and ends its line when the last byte arrives or on :meth:`close` — or, with ``end_line=False``, leaves the
cursor after it for a caller that writes the newline itself (what ``pull`` does today).
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm


class TransferBar:
    """``progress(done, total)`` drawn as one tqdm bar on ``stream`` (default stderr); a context manager."""

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool = True,
                 mininterval: float = 0.2, end_line: bool = True) -> None:
        self.label = label
        self.end_line = end_line
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.mininterval = mininterval
        self._bar: Any = None  # tqdm is untyped
        self._lock = threading.Lock()
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._finished and done >= total:
                return  # the last byte reported again: the bar has already ended
            self._finished = False
            if self._bar is None or (total and self._bar.total != total) or done < self._bar.n:
                # First call, a new file, or a download that started over (a corrupt partial was dropped).
                self._close_bar()
                shape = _fixed_shape(self.stream)
                self._bar = tqdm(total=total or None, initial=done, desc=self.label, unit="B", unit_scale=True,
                                 unit_divisor=1024, file=self.stream, mininterval=self.mininterval,
                                 ncols=shape and shape[0], nrows=shape and shape[1], dynamic_ncols=shape is None,
                                 leave=True)
            else:
                self._bar.update(done - self._bar.n)
            if total and done >= total:
                self._close_bar()
                self._finished = True

    def close(self) -> None:
        """End the bar's line (it stays on screen as it was); nothing when no byte was transferred."""
        with self._lock:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            if self.end_line:
                self._bar.close()  # draws the final state (overall rate) and ends the line
            else:
                self._bar.refresh()
                self._bar.disable = True  # tqdm's close (also at garbage collection) then writes nothing
            self._bar = None

    def __enter__(self) -> TransferBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _fixed_shape(stream: TextIO) -> tuple[int, int] | None:
    """None to follow the terminal's size; 80x24 for a terminal that reports none (a fresh pty, a serial
    console): tqdm would take its rows as -1 and draw nothing."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # not a terminal, or no file descriptor (io.StringIO)
        return None
    return None if size.columns > 0 and size.lines > 0 else (80, 24)


def transfer_bar(label: str, *, json_mode: bool = False, stream: TextIO | None = None) -> TransferBar:
    """The bar ``pull`` shows: drawn only on a terminal and never in ``--json`` mode."""
    out = stream if stream is not None else sys.stderr
    return TransferBar(label, stream=out, enabled=not json_mode and out.isatty())
