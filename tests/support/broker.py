"""A real Mosquitto broker on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, *, open_: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if open_:
                    return
        except OSError:
            if not open_:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not {'open' if open_ else 'closed'} after {timeout}s")


@dataclass(frozen=True)
class ListenerTls:
    """TLS on the broker's listener: its certificate and key, and the CA it checks client certificates with."""

    cert: Path
    key: Path
    ca: Path
    require_certificate: bool = False  # mTLS: refuse clients without a certificate from ``ca``
    use_identity_as_username: bool = False  # the client certificate's CN becomes the MQTT user name


@dataclass
class Broker:
    """One mosquitto process; ``restart()`` keeps the port (and, with persistence, the sessions).

    ``tls`` makes the one listener a TLS listener; ``allow_anonymous`` and ``extra`` (further
    mosquitto.conf lines, e.g. ``acl_file``/``password_file``) shape who may connect and do what.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    persistence: bool = False
    proc: subprocess.Popen[bytes] | None = None
    tls: ListenerTls | None = None
    allow_anonymous: bool = True
    extra: tuple[str, ...] = ()

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1"]
        if self.tls is not None:
            lines += [
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                f"cafile {self.tls.ca}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
                f"use_identity_as_username {'true' if self.tls.use_identity_as_username else 'false'}",
            ]
        lines += [
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "set_tcp_nodelay true",
            "max_queued_messages 10000",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            # Started as root, mosquitto drops to the 'mosquitto' user, which cannot write its
            # persistence file into pytest's private tmp dir; stay the current user (ignored otherwise).
            f"user {getpass.getuser()}",
            *self.extra,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        self.write_config()
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)], stdout=log, stderr=log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        with contextlib.suppress(TimeoutError):
            wait_port(self.port, 5.0, open_=False)
        time.sleep(down_s)
        self.start()
