"""What the world outside a device sees: its MQTT topics on the host's Mosquitto, through real clients.

:class:`StatusWatch` records every message on a device's retained status topic with its arrival
time (so a test can read the whole ``starting → pulling → online`` story afterwards), and
:func:`mosquitto_rr` asks the device a question the way the protocol docs show, with the
``mosquitto_rr`` command-line client (MQTT 5 Response Topic). :func:`fleet_cmd` runs the operator CLI
(``edge-agent fleet cmd``) from the test venv, as an operator's workstation would.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[2]
PREFIX = "edge"


@dataclass(frozen=True)
class Seen:
    """One message on a watched topic."""

    at: float  # time.monotonic() on arrival
    topic: str
    payload: bytes
    retained: bool

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError:
            return None


class MqttClient:
    """A paho MQTT 5 client on the host broker that keeps every message it receives, in order."""

    def __init__(self, port: int, topics: list[str] | None = None) -> None:
        self.port = port
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._new = threading.Condition(self._lock)
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"systest-{uuid.uuid4().hex[:10]}",
                             protocol=paho.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda client, userdata, mid, codes, props: self._acks.put(mid)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        for topic in topics or []:
            self.subscribe(topic)

    def _on_message(self, client: object, userdata: object, message: paho.MQTTMessage) -> None:
        with self._new:
            self.seen.append(Seen(time.monotonic(), message.topic, bytes(message.payload), bool(message.retain)))
            self._new.notify_all()

    def subscribe(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, qos=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self._acks.get(timeout=0.5) == mid:
                    return
            except queue.Empty:
                continue
        raise TimeoutError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes | str, *, response_topic: str | None = None,
                correlation: bytes | None = None, qos: int = 1) -> None:
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        self.c.publish(topic, payload, qos=qos, properties=props).wait_for_publish(30)

    def wait(self, topic: str, predicate: Any = None, *, after: int = 0, timeout: float = 60.0) -> Seen:
        """The first message on ``topic`` at index >= ``after`` whose JSON satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for seen in self.seen[after:]:
                    if seen.topic == topic and (predicate is None or _safe(predicate, seen.json())):
                        return seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = [s.payload[:300] for s in self.seen[after:] if s.topic == topic][-8:]
                    raise AssertionError(f"nothing matching on {topic} within {timeout}s; last: {tail}")
                self._new.wait(min(remaining, 0.5))

    def mark(self) -> int:
        """An index to pass as ``after``: only messages from now on."""
        with self._lock:
            return len(self.seen)

    def on(self, topic: str, *, after: int = 0) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen[after:] if s.topic == topic]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _safe(predicate: Any, value: Any) -> bool:
    try:
        return bool(predicate(value))
    except (KeyError, TypeError, AttributeError):
        return False


class StatusWatch(MqttClient):
    """Every status message of one device (retained ones included), from now on."""

    def __init__(self, port: int, device_id: str) -> None:
        self.topic = f"{PREFIX}/{device_id}/status"
        super().__init__(port, [self.topic])

    def wait_state(self, state: str, *, after: int = 0, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait(self.topic, lambda s: s["state"] == state, after=after, timeout=timeout).json()

    def states(self, *, after: int = 0) -> list[dict[str, Any]]:
        return [s.json() for s in self.on(self.topic, after=after) if isinstance(s.json(), dict)]


def current_status(port: int, device_id: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The retained status the broker holds for ``device_id`` now (None if there is none)."""
    watch = StatusWatch(port, device_id)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            retained = [s for s in watch.on(watch.topic) if s.retained]
            if retained:
                return retained[-1].json()
            time.sleep(0.05)
        return None
    finally:
        watch.close()


def mosquitto_rr(port: int, device_id: str, request: dict[str, Any], *, timeout: float = 60.0,
                 topic: str | None = None) -> dict[str, Any]:
    """One MQTT 5 request/response with ``mosquitto_rr`` (docs/protocol.md); returns the final reply."""
    tool = shutil.which("mosquitto_rr")
    if tool is None:
        raise RuntimeError("mosquitto_rr missing: apt-get install mosquitto-clients")
    reply = f"systest/reply/{uuid.uuid4().hex[:10]}"
    result = subprocess.run(
        [tool, "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
         "-t", topic or f"{PREFIX}/{device_id}/infer", "-e", reply, "-m", json.dumps(request),
         "-W", str(int(timeout))],
        capture_output=True, text=True, timeout=timeout + 15, check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise AssertionError(f"mosquitto_rr got no answer (exit {result.returncode}): {result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_operator_config(path: Path, port: int, private_key: Path | None = None) -> Path:
    """The operator's own config for ``edge-agent fleet``: [mqtt], and the fleet's private key that
    ``fleet cmd`` signs with (none: unsigned commands, which a keyed device refuses)."""
    text = f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopic_prefix = "{PREFIX}"\n'
    if private_key is not None:
        text += f'[fleet]\nprivate_key = "{private_key}"\n'
    path.write_text(text)
    return path


def fleet_cmd(ops_config: Path, target: str, name: str, *args: str, timeout: float = 30.0
              ) -> subprocess.CompletedProcess[str]:
    """``edge-agent fleet --config OPS cmd TARGET NAME [--arg k=v ...] --json --timeout S`` from the test venv."""
    argv = [sys.executable, "-m", "agent", "fleet", "--config", str(ops_config), "cmd", target, name]
    for arg in args:
        argv += ["--arg", arg]
    argv += ["--json", "--timeout", str(timeout)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False, cwd=REPO)
