"""A TCP proxy in front of a broker that forwards, then stalls: it keeps every socket open and moves nothing.

That is how a cloud broker behind a hung load balancer looks from the device: the TCP connection stays
up, no RST, no FIN, and not a byte comes back. While stalled, new connections are accepted too and
then held (not forwarded) until :meth:`StallProxy.resume`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class StallProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``target_host``:``target_port``."""

    target_port: int
    target_host: str = "127.0.0.1"
    port: int = 0
    accepted: int = 0  # connections accepted so far
    _stalled: threading.Event = field(default_factory=threading.Event)
    _closed: threading.Event = field(default_factory=threading.Event)
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> StallProxy:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, name="stall-proxy", daemon=True).start()
        return self

    def stall(self) -> None:
        """Stop forwarding in both directions; every socket stays open and unread."""
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _keep(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.accepted += 1
            self._keep(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _wait_flowing(self) -> bool:
        while self._stalled.is_set():
            if self._closed.wait(0.05):
                return False
        return not self._closed.is_set()

    def _serve(self, client: socket.socket) -> None:
        if not self._wait_flowing():  # accepted while stalled: held until resumed
            return
        try:
            upstream = socket.create_connection((self.target_host, self.target_port), timeout=5)
        except OSError:
            with contextlib.suppress(OSError):
                client.close()
            return
        upstream.settimeout(None)
        self._keep(upstream)
        for a, b in ((client, upstream), (upstream, client)):
            a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._wait_flowing():
                readable, _, _ = select.select([src], [], [], 0.05)
                if not readable or self._stalled.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
