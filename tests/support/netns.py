"""A network namespace joined to the root namespace by a veth pair, for partition tests (root only).

The daemon runs inside the namespace (``ip netns exec``, which execs, so the PID is the daemon's);
the broker listens on the root side of the pair. A partition is then either the root side of the link
going down (:meth:`NetNs.cut`) or an nftables table inside the namespace dropping everything on the
link both ways (:meth:`NetNs.drop`): the sockets stay open and nothing arrives, as when a Wi-Fi link
dies without a reset. Loopback inside the namespace is left alone (paho's wake-up socket pair uses it).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.daemon import REPO, DaemonProcess

_TABLE = "edgefault"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why partition tests cannot run here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"ef-probe-{uuid.uuid4().hex[:6]}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class NetNs:
    """One namespace ``name`` with link ``host_if`` (root side, ``host_addr``) ↔ ``ns_if`` (inside, ``ns_addr``)."""

    name: str = field(default_factory=lambda: f"edgefault-{uuid.uuid4().hex[:8]}")
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    host_addr: str = ""
    ns_addr: str = ""

    def __post_init__(self) -> None:
        # A random /30 out of 10.213.0.0/16 (a private range nothing here uses): .1 root side, .2 inside.
        if not self.host_addr:
            base = random.randrange(0, 1 << 14) * 4
            third, fourth = divmod(base, 256)
            self.host_addr = f"10.213.{third}.{fourth + 1}"
            self.ns_addr = f"10.213.{third}.{fourth + 2}"

    @property
    def host_if(self) -> str:
        return f"efh{self.tag}"  # interface names are at most 15 bytes

    @property
    def ns_if(self) -> str:
        return f"efn{self.tag}"

    def create(self) -> NetNs:
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run("ip", "-n", self.name, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
            _run("ip", "-n", self.name, "link", "set", self.ns_if, "up")
        except BaseException:
            self.delete()
            raise
        self.wait_reachable()
        return self

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Until the namespace reaches the root side (the link is up and has an address both ways)."""
        # A TCP connect to a closed port: refused means the other side answered (no ping installed here).
        probe = ("import socket, sys\ns = socket.socket(); s.settimeout(1)\n"
                 f"try: s.connect(({self.host_addr!r}, 9))\nexcept ConnectionRefusedError: sys.exit(0)\n"
                 "except OSError: sys.exit(1)\n")  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exec(sys.executable, "-c", probe).returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.ns_addr} cannot reach {self.host_addr}")

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.name, *args, check=False)

    # -- faults ------------------------------------------------------------------------------------

    def cut(self) -> None:
        """The link goes down (root side): the namespace's end loses carrier."""
        _run("ip", "link", "set", self.host_if, "down")

    def heal(self) -> None:
        _run("ip", "link", "set", self.host_if, "up")

    def drop(self) -> None:
        """Every packet on the link is dropped, both ways, inside the namespace; links and sockets stay up."""
        rules = (
            f"table inet {_TABLE} {{\n"
            f"  chain in {{ type filter hook input priority -300; policy accept; iifname {self.ns_if} drop; }}\n"
            f"  chain out {{ type filter hook output priority -300; policy accept; oifname {self.ns_if} drop; }}\n"
            "}\n"
        )
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True, timeout=30)  # fmt: skip

    def undrop(self) -> None:
        _run("ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", _TABLE)

    def delete(self) -> None:
        """Remove the namespace and both ends of the link (idempotent)."""
        _run("ip", "netns", "del", self.name, check=False)  # takes ns_if and with it the pair
        _run("ip", "link", "del", self.host_if, check=False)


@dataclass
class NetNsDaemon(DaemonProcess):
    """:class:`DaemonProcess` started inside ``netns`` (same command and log handling)."""

    netns: str = ""

    def start(self) -> NetNsDaemon:
        self.log_path = self.workdir / f"daemon-{int(time.time() * 1000)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "agent", "run", "--config",
                 str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def process_netns(pid: int) -> str:
    """The network namespace a process is in (its /proc link), to check where the daemon runs."""
    return os.readlink(Path("/proc") / str(pid) / "ns" / "net")
