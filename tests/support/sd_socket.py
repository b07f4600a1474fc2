"""A real sd_notify listener for tests: plays systemd's side of ``$NOTIFY_SOCKET``.

Binds an AF_UNIX datagram socket (a file path, or an abstract ``@name``), collects every datagram in
a background thread and lets a test wait for a message. Used by the sdnotify unit tests and by the
daemon integration tests (pass ``receiver.environ(...)`` as the daemon's environment).

    with NotifyReceiver(tmp_path) as receiver:
        env = {**os.environ, **receiver.environ(watchdog_usec=2_000_000)}
        ...start the daemon with env...
        receiver.wait_for("READY=1", timeout=30)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass(frozen=True)
class NotifyMessage:
    """One datagram as received: its assignments in order, and when it arrived (monotonic seconds)."""

    raw: str
    at: float

    @property
    def fields(self) -> dict[str, str]:
        """``KEY=VALUE`` lines as a dict (a later duplicate key wins, as in systemd)."""
        out: dict[str, str] = {}
        for line in self.raw.split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                out[key] = value
        return out

    def has(self, assignment: str) -> bool:
        """True when the datagram contains exactly this ``KEY=VALUE`` line."""
        return assignment in self.raw.split("\n")


class NotifyReceiver:
    """Listens on a datagram socket like systemd does; thread-safe accessors for what arrived.

    ``directory`` given: a socket file ``<directory>/notify.sock``. Not given: an abstract-namespace
    name (``@edge-agent-test-<random>``), which exercises the ``@`` form of ``$NOTIFY_SOCKET``.
    """

    def __init__(self, directory: Path | None = None) -> None:
        if directory is not None:
            self.address = str(Path(directory) / "notify.sock")
            bind_to: str | bytes = self.address
        else:
            name = f"edge-agent-test-{secrets.token_hex(6)}"
            self.address = "@" + name
            bind_to = b"\0" + name.encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(bind_to)
        self._sock.settimeout(0.1)
        self._messages: list[NotifyMessage] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-receiver", daemon=True)
        self._thread.start()

    def environ(self, *, watchdog_usec: int | None = None, watchdog_pid: int | None = None) -> dict[str, str]:
        """The variables systemd would set for the service (merge them into the child's environment)."""
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        if watchdog_pid is not None:
            env["WATCHDOG_PID"] = str(watchdog_pid)
        return env

    @property
    def messages(self) -> list[NotifyMessage]:
        """A snapshot of every datagram received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def assignments(self) -> list[str]:
        """Every ``KEY=VALUE`` line received so far, flattened in arrival order."""
        return [line for m in self.messages for line in m.raw.split("\n") if line]

    def count(self, assignment: str) -> int:
        """How many datagrams contained this exact ``KEY=VALUE`` line."""
        return sum(1 for m in self.messages if m.has(assignment))

    def wait_for(self, assignment: str, timeout: float, *, after: int = 0) -> NotifyMessage:
        """Block until a datagram (index >= ``after``) contains ``assignment``; TimeoutError otherwise.

        A prefix such as ``"STATUS="`` matches any line starting with it when it ends with ``=``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self._messages[after:]:
                    if _matches(message, assignment):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [m.raw for m in self._messages]
                    raise TimeoutError(f"no {assignment!r} within {timeout}s; received {got!r}")
                self._cond.wait(remaining)

    def close(self) -> None:
        """Stop the thread, close the socket and remove its file."""
        self._closed.set()
        self._thread.join(timeout=2)
        self._sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    def __enter__(self) -> NotifyReceiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self._messages.append(NotifyMessage(data.decode(errors="replace"), time.monotonic()))
                self._cond.notify_all()


def _matches(message: NotifyMessage, assignment: str) -> bool:
    if assignment.endswith("="):
        return any(line.startswith(assignment) for line in message.raw.split("\n"))
    return message.has(assignment)
