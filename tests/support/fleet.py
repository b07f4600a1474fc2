"""Fleet test doubles: settings with [fleet] and groups, a recording DeviceControl, simulated devices.

The simulated device is real on the wire (its own MQTT client id, retained status with a will,
telemetry, command subscriptions and FleetService); only the model behind it is fake.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from agent.config.fleet import FleetSettings
from agent.errors import ModelUnavailableError
from agent.fleet.service import FleetService
from agent.settings import Settings
from agent.transport.mqtt import Connected, Incoming, LinkEvent, MqttLink
from agent.transport.telemetry import Telemetry
from tests.support.daemon import REPO

if "fleet" in Settings.model_fields and "groups" in Settings.model_fields:
    FleetTestSettings: type[Settings] = Settings
else:  # until the lead adds [fleet] and groups to Settings

    class _FleetTestSettings(Settings):
        groups: list[str] = Field(default_factory=list, description="Groups this device belongs to.")
        fleet: FleetSettings = Field(default_factory=FleetSettings)  # type: ignore[arg-type]

    FleetTestSettings = _FleetTestSettings


def make_settings(device_id: str = "dev1", groups: list[str] | None = None, port: int = 1883,
                  **fleet: Any) -> Settings:
    """Settings for one device, with explicit fleet options.

    Without a ``public_key`` the device runs unsigned commands (``allow_unsigned``), so tests that are
    not about signing need no key; pass ``allow_unsigned=False`` to get the production default.
    """
    if "public_key" not in fleet:
        fleet.setdefault("allow_unsigned", True)
    return FleetTestSettings(
        device_id=device_id,
        groups=groups or [],
        mqtt={"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        fleet=fleet,
    )


class FakeControl:
    """A DeviceControl that records every call; ``fail`` names methods that raise, ``delay_s`` slows pull."""

    def __init__(self, device_id: str = "dev1", *, delay_s: float = 0.0) -> None:
        self.device_id = device_id
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.model = "tiny"
        self.draining = False
        self.delay_s = delay_s
        self.fail: set[str] = set()
        self._lock = threading.Lock()

    def _record(self, name: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((name, args))
        if name in self.fail:
            raise ModelUnavailableError(f"{name} failed on purpose")

    def names(self) -> list[str]:
        with self._lock:
            return [c[0] for c in self.calls]

    def status(self) -> dict[str, Any]:
        self._record("status")
        return {"state": "draining" if self.draining else "online", "model": self.model}

    def plan(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("plan", args)
        return {"model": args.get("model", self.model), "quant": "Q4_K_M", "fits": True}

    def set_model(self, name: str, quant: str | None) -> dict[str, Any]:
        self._record("set_model", name, quant)
        self.model = name
        return {"model": name, "quant": quant}

    def pull(self, name: str, quant: str | None) -> dict[str, Any]:
        self._record("pull", name, quant)
        time.sleep(self.delay_s)
        return {"pulled": name, "quant": quant}

    def reload(self) -> dict[str, Any]:
        self._record("reload")
        return {"reloaded": self.model}

    def drain(self) -> dict[str, Any]:
        self._record("drain")
        self.draining = True
        return {"state": "draining"}

    def resume(self) -> dict[str, Any]:
        self._record("resume")
        self.draining = False
        return {"state": "online"}

    def restart(self) -> dict[str, Any]:
        self._record("restart")
        return {"restarting": True}

    def apply_settings(self, new: Settings, changed_keys: list[str]) -> dict[str, Any]:
        self._record("apply_settings", changed_keys)
        live = [k for k in changed_keys if k.startswith("inference.")]
        return {"applied": live, "restart_required": [k for k in changed_keys if k not in live]}


class SimDevice:
    """One simulated device on a real broker: retained status (+ will), telemetry, fleet commands."""

    def __init__(self, settings: Settings, state_dir: Path, *, config_path: Path | None = None,
                 control: FakeControl | None = None) -> None:
        self.settings = settings
        self.control = control or FakeControl(settings.device_id)
        prefix, device = settings.mqtt.topic_prefix, settings.device_id
        self.status_topic = f"{prefix}/{device}/status"
        self.telemetry_topic = f"{prefix}/{device}/telemetry"
        self.link = MqttLink(
            settings.mqtt,
            f"sim-{device}",
            self._on_event,
            will=(self.status_topic, self._status("offline")),
            manual_ack=True,
        )
        self.fleet = FleetService(settings, self.control, self.link.publish, config_path, state_dir,
                                  ack=self.link.ack)
        self.link.subscribe(self.fleet.subscriptions())

    def _status(self, state: str) -> bytes:
        groups = list(getattr(self.settings, "groups", []))
        return json.dumps({"state": state, "device_id": self.settings.device_id, "groups": groups,
                           "model": self.control.model, "since": round(time.time(), 3)}).encode()

    def _on_event(self, event: LinkEvent) -> None:
        # Handled on paho's thread: the simulator has no main loop, and FleetService never blocks.
        if isinstance(event, Connected):
            self.link.publish(self.status_topic, self._status("online"), retain=True)  # on every (re)connect
        elif isinstance(event, Incoming):
            self.fleet.handle(event)

    def start(self) -> SimDevice:
        self.link.start()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        if not (self.link.wait_connected(timeout) and self.link.wait_subscribed(timeout)):
            raise TimeoutError(f"{self.settings.device_id} did not connect and subscribe")

    def publish_telemetry(self, **values: Any) -> None:
        """Retain a telemetry payload of the real model (``values`` override its fields)."""
        reading = Telemetry(
            ts=round(time.time(), 3), temperature_c=48.5, zones=[], throttled=None, battery_percent=None,
            battery_status=None, power_w=None, cpu_percent=None, load_1m=None, ram_available_bytes=None,
            cgroup_memory_bytes=None, disk_free_bytes=None, model=None, quant=None, threads=None, queue_depth=0,
            tokens_per_second=None, requests_served=0, requests_failed=0, requests_offloaded=0, mode="local",
            uptime_s=0.0,
        )
        body = {**reading.model_dump(mode="json"), **values}
        self.link.publish(self.telemetry_topic, json.dumps(body).encode(), qos=0, retain=True)

    def stop(self) -> None:
        """Publish 'offline' and disconnect; calling it again does nothing."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        self.fleet.close(2.0)
        self.link.stop(final=(self.status_topic, self._status("offline")), timeout=2.0)
        release_paho_sockets(self.link)


def release_paho_sockets(link: MqttLink) -> None:
    """Close paho's wake-up socket pair after ``stop()``.

    paho only closes it in ``Client.__del__``; the link and its callbacks form a reference cycle, so
    the gc may finalise the sockets first and pytest (-W error) reports a ResourceWarning at random.
    Belongs in MqttLink.stop (reported to the lead); done here until then.
    """
    link._client._reset_sockets(sockpair_only=True)


# The fleet CLI as a subprocess, registered even before agent.cli lists it (tests only).
def run_fleet_cli(*args: str, config: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``edge-agent fleet ARGS --config CONFIG`` in a fresh interpreter and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )


def write_operator_config(path: Path, port: int) -> Path:
    path.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopic_prefix = "edge"\n')
    return path
