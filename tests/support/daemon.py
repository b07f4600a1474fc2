"""Run the real daemon as a subprocess, the way systemd would, and talk to it with paho."""

from __future__ import annotations

import json
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[2]


def write_config(
    path: Path,
    *,
    port: int,
    model_file: Path,
    device_id: str = "dev1",
    top: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Path:
    """A TOML config for the daemon under test (small, explicit); ``top`` = extra top-level keys (e.g. role).

    Sections are merged key by key into the defaults; the default ``[fleet]`` allows unsigned commands.
    """
    data: dict[str, dict[str, Any]] = {
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "edge", "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0},
        "model": {"path": str(model_file), "n_ctx": 1024, "threads": 2},
        # One slot unless a test asks for more: most daemon tests pin queueing (cancel a queued request,
        # a full queue, a deadline passed while waiting), which needs requests to wait behind one another.
        "inference": {"max_queue": 4, "shutdown_grace_s": 10.0, "parallel": 1},
        "log": {"level": "debug", "format": "json"},
        # Keep every daemon's state (fleet results journal, telemetry buffer) inside the test's tmp dir.
        "telemetry": {"buffer_dir": str(path.parent / f"state-{device_id}" / "telemetry")},
        # Unsigned commands run, so tests that are not about signing need no key; a test that gives
        # fleet={"public_key": ...} gets signatures required anyway, one about the default passes
        # fleet={"allow_unsigned": False}.
        "fleet": {"state_dir": str(path.parent / f"state-{device_id}" / "fleet"), "allow_unsigned": True},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines = [f'device_id = "{device_id}"']
    lines.extend(f"{k} = {json.dumps(v)}" for k, v in (top or {}).items())
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonProcess:
    config: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> DaemonProcess:
        self.log_path = self.workdir / f"daemon-{int(time.time() * 1000)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        return self

    def events(self) -> list[dict[str, Any]]:
        """Parsed JSON log lines so far."""
        out = []
        if self.log_path and self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name} event {match}; log:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Daemons:
    """The daemons one test started: each started and (by default) waited for until it serves; all
    stopped at the end of the test. The fixtures' factories share this bookkeeping."""

    def __init__(self) -> None:
        self.started: list[DaemonProcess] = []

    def start(self, daemon: DaemonProcess, *, wait: bool = True, timeout: float = 60.0) -> DaemonProcess:
        self.started.append(daemon.start())
        if wait:
            daemon.wait_event("agent_started", timeout=timeout)
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


class Client:
    """A real paho client for tests: MQTT 5 with Response Topic, or 3.1.1 with ``reply_to``."""

    def __init__(self, port: int, *, protocol: int = paho.MQTTv5, client_id: str | None = None,
                 tls: ssl.SSLContext | None = None, username: str | None = None, password: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.protocol = protocol
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:8]}"
        self._subscribed = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = lambda *a: self._subscribed.set()
        self.c.on_socket_open = lambda c, u, s: s.setsockopt(6, 1, 1)  # TCP_NODELAY
        if tls is not None:
            self.c.tls_set_context(tls)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.c.connect(host, port)
        self.c.loop_start()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.c.subscribe(topic, qos)
        assert self._subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], *, qos: int = 1,
                response_topic: str | None = None, correlation: bytes | None = None,
                expiry_s: int | None = None, retain: bool = False) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if self.protocol == paho.MQTTv5 and (response_topic or correlation or expiry_s):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry_s:
                props.MessageExpiryInterval = expiry_s
        self.c.publish(topic, payload, qos=qos, properties=props, retain=retain).wait_for_publish(5)

    def request(self, device: str, body: dict[str, Any], *, prefix: str = "edge",
                correlation: bytes | None = None, expiry_s: int | None = None) -> str:
        """Publish an inference request; returns the reply topic (already subscribed)."""
        reply = f"test/reply/{self.client_id}/{uuid.uuid4().hex[:6]}"
        self.subscribe(reply)
        if self.protocol == paho.MQTTv5:
            self.publish(f"{prefix}/{device}/infer", body, response_topic=reply,
                         correlation=correlation if correlation is not None else b"corr-" + reply.encode()[-6:],
                         expiry_s=expiry_s)
        else:
            self.publish(f"{prefix}/{device}/infer", {**body, "reply_to": reply})
        return reply

    def collect(self, reply_topic: str, timeout: float = 60.0) -> list[paho.MQTTMessage]:
        """Every message on ``reply_topic`` up to and including the final (``done``) one."""
        got = self.until_finals(reply_topic, 1, timeout)
        if not got or not json.loads(got[-1].payload).get("done"):
            raise AssertionError(f"no final reply on {reply_topic} within {timeout}s; got {[x.payload for x in got]}")
        return got

    def until_finals(self, reply_topic: str, n: int, timeout: float = 60.0) -> list[paho.MQTTMessage]:
        """Messages on ``reply_topic`` in arrival order until ``n`` finals (``done``) arrived or ``timeout``
        passed; messages on other topics are put back for later."""
        got: list[paho.MQTTMessage] = []
        finals = 0
        deadline = time.monotonic() + timeout
        while finals < n and time.monotonic() < deadline:
            try:
                m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if m.topic != reply_topic:
                self.messages.put(m)
                time.sleep(0.01)
                continue
            got.append(m)
            finals += bool(json.loads(m.payload).get("done"))
        return got

    def retained(self, topic: str, timeout: float = 10.0, *, state: str | None = None) -> dict[str, Any]:
        """Wait for a (retained) message on ``topic``, optionally with a given ``state``."""
        sub = Client.__new__(Client)
        Client.__init__(sub, self.c._port, protocol=self.protocol)
        try:
            sub.subscribe(topic)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    m = sub.messages.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    break
                data = json.loads(m.payload)
                if state is None or data.get("state") == state:
                    return data
            raise AssertionError(f"no message on {topic} with state={state}")
        finally:
            sub.close()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
