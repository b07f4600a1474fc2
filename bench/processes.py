"""Child processes the benchmark starts: reading their output with a deadline and stopping them for sure."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import threading
from typing import IO


class LineReader:
    """Lines of a child's stdout, read on a thread so every wait can have a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def readline(self, timeout: float) -> str:
        """The next line; TimeoutError after ``timeout`` s, EOFError when the child closed its output."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output within {timeout:.0f} s") from None
        if line is None:
            raise EOFError("the process closed its output")
        return line


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; a no-op for a process that has ended."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
