"""A tiny sd_notify client: tells systemd (``Type=notify``) that we are ready, alive, or stopping.

Why our own: the protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract namespace), so a library would add a
dependency for twenty lines. Notifying is best effort by design: the daemon must serve the same
whether or not systemd listens, so nothing here raises into the caller; failures are logged at
debug level and the message is dropped.

The environment is read once, in :meth:`Notifier.from_environ`, and passed in (no module-level
state), so tests point a notifier at a socket they own.
"""

from __future__ import annotations

import array
import os
import select
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


def _socket_address(value: str) -> str | bytes:
    """Translate ``$NOTIFY_SOCKET`` into what ``socket.sendto`` takes (abstract names start with NUL)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def _one_line(text: str) -> str:
    """STATUS= is one line of the datagram: newlines in it would start bogus assignments."""
    return " ".join(text.splitlines()).strip()


@dataclass(frozen=True)
class Notifier:
    """Sends sd_notify messages; a no-op when ``address`` is None (not started by systemd).

    ``watchdog_usec`` is systemd's ``WatchdogSec=`` as passed in ``$WATCHDOG_USEC`` (None when the
    watchdog is off or meant for another process).
    """

    address: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, pid: int | None = None) -> Notifier:
        """Build from a process environment (``os.environ`` in the daemon, a dict in tests).

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or names this process (``pid``,
        default ``os.getpid()``): systemd sets it for the main process, and a child that inherited
        the variables must not think the watchdog is its job.
        """
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not (address.startswith(("/", "@"))):
            log.debug("sd_notify_socket_ignored", notify_socket=address, reason="not a path or @name")
            address = None
        return cls(address=address, watchdog_usec=_watchdog_usec(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to."""
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when it was handed to the socket."""
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, _socket_address(self.address))
        except OSError as exc:
            # systemd gone (shutdown), socket full, permission: dropping the message is the contract.
            log.debug("sd_notify_failed", notify_socket=self.address, error=str(exc), message=assignments[0])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup finished (connected and a model loaded, or serving with a reason)."""
        extra = (f"STATUS={_one_line(status)}",) if status else ()
        return self.notify("READY=1", *extra)

    def status(self, text: str) -> bool:
        """``STATUS=``: one human-readable line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the main loop is alive; send every :meth:`watchdog_interval_s` seconds."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown began (systemd then waits up to ``TimeoutStopSec=``)."""
        extra = (f"STATUS={_one_line(status)}",) if status else ()
        return self.notify("STOPPING=1", *extra)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1``: a config reload or model swap began; send :meth:`ready` when it is done."""
        extra = (f"STATUS={_one_line(status)}",) if status else ()
        return self.notify("RELOADING=1", *extra)

    def failed(self, status: str, errno: int | None = None) -> bool:
        """``STATUS=`` (+ ``ERRNO=``) just before exiting on an error: ``systemctl status`` shows why it stopped."""
        extra = (f"ERRNO={errno}",) if errno is not None else ()
        return self.notify(f"STATUS={_one_line(status)}", *extra)

    def barrier(self, timeout_s: float = 3.0) -> bool:
        """``BARRIER=1`` (sd_notify_barrier(3)): wait until systemd has processed every earlier message.

        Sent right before exiting: otherwise systemd may reap the process before it reads the last
        STATUS= and, no longer knowing the sender as the main process, drop it. systemd closes the
        passed pipe end once it got here; an older systemd closes unexpected fds too.
        """
        if self.address is None:
            return False
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                fds = array.array("i", [write_end])
                sock.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0,
                               _socket_address(self.address))
            os.close(write_end)
            write_end = -1
            poller = select.poll()
            poller.register(read_end, select.POLLHUP)
            return bool(poller.poll(timeout_s * 1000))
        except OSError as exc:
            log.debug("sd_notify_barrier_failed", notify_socket=self.address, error=str(exc))
            return False
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for more start/stop time (a long first model pull)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                return None
        except ValueError:
            return None
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.debug("sd_watchdog_usec_invalid", watchdog_usec=raw)
        return None
    return usec if usec > 0 else None
