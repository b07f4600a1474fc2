"""Home Assistant MQTT discovery: retained sensor configs so a device shows up in HA by itself.

Each sensor reads one field of the telemetry JSON (``state_topic`` = the telemetry topic, with a
``value_template``) and is available while the retained status record says the device is not
offline. Configs are published retained on ``<ha_prefix>/sensor/<node_id>/<object_id>/config``; an
empty retained payload on the same topic removes a sensor (used for the battery on boards without one).

Field rules follow HA's MQTT sensor schema (homeassistant/components/mqtt/sensor.py and the sensor
device classes): a numeric device class comes with its unit and ``state_class: measurement``; the
``enum`` device class takes ``options`` and neither a unit nor a state class. HA renders a JSON
``null`` through ``{{ value_json.x }}`` as "None", which the MQTT sensor treats as "unknown".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.transport.topics import DeviceTopics, ha_config_topic, ha_node_id

ORIGIN = {"name": "edge-agent"}
EXPIRE_AFTER_INTERVALS = 3  # a sensor goes 'unavailable' after three missed telemetry ticks


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """One HA sensor over one telemetry field."""

    object_id: str
    name: str
    field: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    icon: str | None = None
    options: tuple[str, ...] | None = None
    precision: int | None = None


SENSORS: tuple[SensorSpec, ...] = (
    SensorSpec("temperature", "SoC temperature", "temperature_c", "°C", "temperature", precision=1),
    SensorSpec("battery", "Battery", "battery_percent", "%", "battery", precision=0),
    SensorSpec(
        "mode", "Mode", "mode", device_class="enum", state_class=None, icon="mdi:cloud-sync",
        options=("local", "degraded", "offloading"),
    ),
    SensorSpec("tokens_per_second", "Tokens per second", "tokens_per_second", "tok/s", icon="mdi:speedometer",
               precision=1),
    SensorSpec("queue_depth", "Queue depth", "queue_depth", icon="mdi:tray-full"),
)  # fmt: skip


def sensor_config(
    spec: SensorSpec,
    topics: DeviceTopics,
    *,
    interval_s: float,
    board: str | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """The discovery config of one sensor (a JSON object per HA's MQTT sensor schema)."""
    node = ha_node_id(topics.device_id)
    config: dict[str, Any] = {
        "name": spec.name,
        "unique_id": f"{node}_{spec.object_id}",
        "state_topic": topics.telemetry,
        "value_template": f"{{{{ value_json.{spec.field} }}}}",
        "availability_topic": topics.status,
        # 'draining' still answers; only the LWT/clean-shutdown 'offline' makes sensors unavailable.
        "availability_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "expire_after": max(1, round(interval_s * EXPIRE_AFTER_INTERVALS)),
        "qos": 1,
        "device": {
            "identifiers": [node],
            "name": f"edge-agent {topics.device_id}",
            "manufacturer": "edge-agent",
            "model": board or "Linux board",
            **({"sw_version": version} if version else {}),
        },
        "origin": {**ORIGIN, **({"sw_version": version} if version else {})},
    }
    if spec.unit is not None:
        config["unit_of_measurement"] = spec.unit
    if spec.device_class is not None:
        config["device_class"] = spec.device_class
    if spec.state_class is not None:
        config["state_class"] = spec.state_class
    if spec.icon is not None:
        config["icon"] = spec.icon
    if spec.options is not None:
        config["options"] = list(spec.options)
    if spec.precision is not None:
        config["suggested_display_precision"] = spec.precision
    return config


def discovery_messages(
    topics: DeviceTopics,
    *,
    ha_prefix: str = "homeassistant",
    interval_s: float = 10.0,
    has_battery: bool = True,
    board: str | None = None,
    version: str | None = None,
) -> list[tuple[str, bytes]]:
    """(topic, payload) pairs to publish retained, QoS 1, after every connect.

    Without a battery the battery sensor's config is an empty payload, which deletes the sensor in HA
    (and clears a config left over from an earlier run).
    """
    out = []
    for spec in SENSORS:
        topic = ha_config_topic(ha_prefix, topics.device_id, spec.object_id)
        if spec.object_id == "battery" and not has_battery:
            out.append((topic, b""))
            continue
        config = sensor_config(spec, topics, interval_s=interval_s, board=board, version=version)
        out.append((topic, json.dumps(config, ensure_ascii=False).encode()))
    return out
