"""Home Assistant's view of a device, end to end: a real Mosquitto, real daemons, and a client doing what HA's
MQTT integration does with the discovery configs (subscribe to their state and availability topics, render
their templates, publish a button's command template).

Templates are rendered with jinja2 as HA does (``value_json`` only when the payload is JSON, ``now()`` a
datetime); HA itself is not started.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest

from agent.fleet.signing import write_keypair
from agent.services.ha_discovery import BINARY_SENSORS, BUTTONS, SENSORS
from tests.support.broker import Broker
from tests.support.daemon import Client, DaemonProcess
from tests.support.hardware import FIXTURES
from tests.support.watcher import Watcher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HA = "homeassistant"


def hardware(tmp_path: Path, case: str = "pi-zero-2w") -> dict[str, str]:
    """``[hardware]`` roots on a copy of a fixture board (the Pi Zero 2 W reports under-voltage and throttling)."""
    root = tmp_path / f"hw-{case}"
    if not root.exists():
        shutil.copytree(FIXTURES / case, root)
    return {"sys_root": str(root / "sys"), "proc_root": str(root / "proc")}


def ha_sections(tmp_path: Path, interval_s: float = 1.0, **fleet: Any) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "telemetry": {"interval_s": interval_s, "ha_discovery": True},
        "hardware": hardware(tmp_path),
    }
    if fleet:
        sections["fleet"] = fleet
    return sections


def render(template: str, payload: bytes | None = None) -> str:
    """Render one template as HA's MQTT integration does."""
    variables: dict[str, Any] = {"now": lambda: datetime.now(UTC)}
    if payload is not None:
        with contextlib.suppress(ValueError):  # HA leaves value_json undefined for a payload that is not JSON
            variables["value_json"] = json.loads(payload)
    return jinja2.Environment(autoescape=False).from_string(template).render(**variables)  # noqa: S701


def retained_configs(port: int, node: str, *, settle_s: float = 1.0) -> dict[tuple[str, str], dict[str, Any]]:
    """(component, object_id) → config of every retained discovery config of ``node``, as HA gets them when it
    subscribes to its discovery prefix (only what is retained)."""
    ha = Watcher(port, (f"{HA}/#",))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ha.on(f"{HA}/sensor/{node}/mode/config"):
            time.sleep(0.05)
        time.sleep(settle_s)
        seen = [s for s in ha.seen if s.topic.startswith(f"{HA}/") and f"/{node}/" in s.topic]
    finally:
        ha.close()
    assert seen, f"no retained discovery config for {node}"
    assert all(s.retain for s in seen)
    return {(s.topic.split("/")[1], s.topic.split("/")[3]): s.json() for s in seen}


def test_discovery_configs_are_retained_and_buttons_only_where_unsigned_commands_run(
    broker: Broker, start_daemon: Any, tmp_path: Path
) -> None:
    """Each device leaves its sensors, binary sensors and availability retained; the device that runs unsigned
    commands also has restart/drain/resume buttons, the one that requires signatures has none."""
    keys = tmp_path / "keys"
    _, public = write_keypair(keys)
    start_daemon("open1", **ha_sections(tmp_path))  # the test default: no key, allow_unsigned = true
    start_daemon("signed1", **ha_sections(tmp_path, public_key=str(public), allow_unsigned=False))

    open_configs = retained_configs(broker.port, "edge_agent_open1")
    expected = ({("sensor", s.object_id) for s in SENSORS if s.object_id != "battery"}  # no battery on a Pi
                | {("binary_sensor", b.object_id) for b in BINARY_SENSORS})  # fmt: skip
    assert set(open_configs) == expected | {("button", b.object_id) for b in BUTTONS}
    signed_configs = retained_configs(broker.port, "edge_agent_signed1", settle_s=0.3)
    assert set(signed_configs) == expected  # HA cannot sign: no button it could only see refused

    status = Client(broker.port)
    try:
        for device, configs in (("open1", open_configs), ("signed1", signed_configs)):
            record = status.retained(f"edge/{device}/status", state="online")
            assert record["commands"] == ("unsigned" if device == "open1" else "signed")
            raw = json.dumps(record).encode()
            for config in configs.values():
                assert config["availability_topic"] == f"edge/{device}/status"
                assert render(config["availability_template"], raw) == config["payload_available"]
    finally:
        status.close()

    # Read the way HA reads them: the sensors' state topic holds the current telemetry, retained.
    watcher = Watcher(broker.port, ("edge/open1/telemetry",))
    try:
        reading = watcher.wait_for("edge/open1/telemetry")
        assert watcher.on("edge/open1/telemetry")[0].retain
    finally:
        watcher.close()
    raw = json.dumps(reading).encode()
    values = {key: render(c["value_template"], raw) for key, c in open_configs.items() if "value_template" in c}
    assert values["binary_sensor", "under_voltage"] == "ON"  # the fixture board reports 0x50005
    assert values["binary_sensor", "throttled"] == "ON"
    assert values["sensor", "model"] == reading["model"] and values["sensor", "quant"] != ""
    assert float(values["sensor", "ram_available"]) == pytest.approx(reading["ram_available_bytes"] / 2**20, abs=0.1)
    assert values["sensor", "requests_served"] == "0"


def press(client: Client, config: dict[str, Any]) -> None:
    """What HA does when a button is pressed: render the command template, publish it (not retained)."""
    client.publish(config["command_topic"], render(config["command_template"]), qos=config["qos"],
                   retain=config["retain"])


def test_the_drain_and_resume_buttons_drive_a_device_that_allows_unsigned_commands(
    broker: Broker, start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    """Pressing 'Drain' (the payload HA publishes) drains the device: its status says draining, 'Serving' turns
    off and the entities stay available; 'Resume' brings it back. Each press is its own command, run once."""
    start_daemon("dev1", **ha_sections(tmp_path))
    configs = retained_configs(broker.port, "edge_agent_dev1", settle_s=0.3)
    serving = configs["binary_sensor", "serving"]
    client.subscribe("edge/dev1/cmd/result")

    for button, state, on in (("drain", "draining", "OFF"), ("resume", "online", "ON"),
                              ("drain", "draining", "OFF"), ("resume", "online", "ON")):  # fmt: skip
        press(client, configs["button", button])
        result = json.loads(client.messages.get(timeout=10).payload)
        assert (result["cmd"], result["ok"], result.get("duplicate", False)) == (button, True, False), result
        assert result["id"].startswith(f"ha-{button}-")
        status = client.retained("edge/dev1/status", state=state)
        raw = json.dumps(status).encode()
        assert render(serving["value_template"], raw) == on
        assert render(serving["availability_template"], raw) == "online"

    # The restart button's payload is a valid command too; not pressed here (the test daemon is not under systemd).
    restart = json.loads(render(configs["button", "restart"]["command_template"]))
    assert (restart["cmd"], restart["target"]) == ("restart", "device:dev1")


def test_telemetry_buffered_during_an_outage_is_replayed_where_ha_does_not_read_it(
    broker: Broker, start_daemon: Any, tmp_path: Path
) -> None:
    """Readings kept while the broker was down come back on telemetry/replay, not retained, in order; no topic
    an entity reads gets a reading from the outage; and the retained telemetry right after the replay is newer
    than every replayed reading (the daemon publishes a fresh one at once, not at its next tick)."""
    broker.persistence = True  # the retained telemetry from before the outage survives it, as in production
    broker.restart()
    daemon: DaemonProcess = start_daemon("dev1", **ha_sections(tmp_path, interval_s=2.0))
    configs = retained_configs(broker.port, "edge_agent_dev1", settle_s=0.3)
    read_by_ha = {c["state_topic"] for c in configs.values() if "state_topic" in c}
    read_by_ha |= {c["availability_topic"] for c in configs.values()}
    assert read_by_ha == {"edge/dev1/telemetry", "edge/dev1/status"}
    replay_topic = "edge/dev1/telemetry/replay"

    w = Watcher(broker.port, (*read_by_ha, replay_topic), persistent=True)
    try:
        w.wait_for("edge/dev1/telemetry", since=time.monotonic(), timeout=10)  # a live tick, not only the retained
        down_at = time.time()
        broker.stop()
        time.sleep(5.0)
        up_at = time.time()
        broker.start()
        daemon.wait_event("telemetry_buffer_replayed", timeout=20)
        fresh = w.wait_for("edge/dev1/telemetry", lambda d: d["ts"] > up_at, timeout=10)
        time.sleep(0.3)
        replayed = w.on(replay_topic)
        live = w.on("edge/dev1/telemetry")
    finally:
        w.close()
    # What HA gets when it (re)subscribes now: the retained telemetry, and nothing retained on the replay topic.
    retained = retained_message(broker.port, "edge/dev1/telemetry")
    assert retained_message(broker.port, replay_topic, wait_s=1.0) is None

    ts = [s.json()["ts"] for s in replayed]
    during = [t for t in ts if down_at + 0.5 < t < up_at - 0.5]
    print(f"\noutage of {up_at - down_at:.1f} s: {len(during)} readings replayed on {replay_topic}")
    assert len(during) >= 2, ts
    assert ts == sorted(ts) and len(set(ts)) == len(ts), ts
    assert not [s.json()["ts"] for s in live if down_at + 0.5 < s.json()["ts"] < up_at - 0.5]
    assert retained is not None and retained["ts"] >= fresh["ts"] > max(ts), (retained, fresh["ts"], ts)
    # The fresh reading followed the replay at once, not at the next 2 s tick.
    first_after = next(s for s in live if s.json()["ts"] > up_at)
    assert first_after.at - replayed[-1].at < 1.0, (first_after.at, replayed[-1].at)


def retained_message(port: int, topic: str, *, wait_s: float = 5.0) -> dict[str, Any] | None:
    """The message retained on ``topic`` (what a new subscriber gets at once), or None."""
    w = Watcher(port, (topic,))
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            got = [s for s in w.on(topic) if s.retain]
            if got:
                return dict(got[0].json())
            time.sleep(0.05)
        return None
    finally:
        w.close()
