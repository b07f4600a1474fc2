"""Home Assistant discovery configs are valid for HA's MQTT sensor schema and read the right telemetry."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import pytest

from agent.services.ha_discovery import SENSORS, discovery_messages
from agent.services.telemetry import RuntimeView, build_telemetry
from agent.transport.topics import DeviceTopics, ha_node_id
from tests.support.hardware import probe_case

# HA's MQTT sensor platform schema (homeassistant/components/mqtt/sensor.py + the MQTT entity/availability
# base schemas), written out here as key -> accepted type(s). Unknown keys are rejected by HA.
SENSOR_KEYS: dict[str, type | tuple[type, ...]] = {
    "availability": list,
    "availability_mode": str,
    "availability_template": str,
    "availability_topic": str,
    "default_entity_id": str,
    "device": dict,
    "device_class": str,
    "enabled_by_default": bool,
    "encoding": str,
    "entity_category": str,
    "entity_picture": str,
    "expire_after": int,
    "force_update": bool,
    "icon": str,
    "json_attributes_template": str,
    "json_attributes_topic": str,
    "last_reset_value_template": str,
    "name": (str, type(None)),
    "object_id": str,
    "options": list,
    "origin": dict,
    "payload_available": str,
    "payload_not_available": str,
    "platform": str,
    "qos": int,
    "state_class": str,
    "state_topic": str,
    "suggested_display_precision": int,
    "unique_id": str,
    "unit_of_measurement": str,
    "value_template": str,
}
REQUIRED = {"state_topic"}
DEVICE_KEYS: dict[str, type | tuple[type, ...]] = {
    "configuration_url": str, "connections": list, "hw_version": str, "identifiers": (list, str),
    "manufacturer": str, "model": str, "model_id": str, "name": str, "serial_number": str,
    "suggested_area": str, "sw_version": str, "via_device": str,
}  # fmt: skip
ORIGIN_KEYS: dict[str, type] = {"name": str, "sw_version": str, "support_url": str}
STATE_CLASSES = {"measurement", "total", "total_increasing", "measurement_angle"}
# Device classes we use, with the units HA accepts for each (homeassistant/components/sensor/const.py).
DEVICE_CLASS_UNITS: dict[str, set[str | None]] = {"temperature": {"°C", "°F", "K"}, "battery": {"%"}, "enum": {None}}

TOPICS = DeviceTopics("edge", "kitchen-pi")


def configs(**kw: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for topic, payload in discovery_messages(TOPICS, version="0.1.0", board="Raspberry Pi 5", **kw):
        out[topic] = json.loads(payload) if payload else {}
    return out


def validate_sensor(config: dict[str, Any]) -> None:
    """Apply HA's MQTT sensor schema rules to one config."""
    assert set(config) >= REQUIRED
    for key, value in config.items():
        assert key in SENSOR_KEYS, f"HA rejects unknown key {key!r}"
        assert isinstance(value, SENSOR_KEYS[key]), f"{key}={value!r}"
    for key, value in config["device"].items():
        assert key in DEVICE_KEYS, key
        assert isinstance(value, DEVICE_KEYS[key]), key
    assert config["device"].get("identifiers") or config["device"].get("connections")
    for key, value in config.get("origin", {}).items():
        assert key in ORIGIN_KEYS
        assert isinstance(value, ORIGIN_KEYS[key])
    assert "name" in config["origin"]
    assert config["qos"] in (0, 1, 2)
    assert config["expire_after"] > 0
    if "state_class" in config:
        assert config["state_class"] in STATE_CLASSES
    device_class = config.get("device_class")
    if device_class is not None:
        assert config.get("unit_of_measurement") in DEVICE_CLASS_UNITS[device_class]
    if device_class == "enum":
        assert config["options"], "enum sensors need options"
        assert "state_class" not in config
        assert "unit_of_measurement" not in config
    else:
        assert "options" not in config, "options only with device_class enum"
    assert "last_reset_value_template" not in config or config.get("state_class") == "total"
    for key in ("value_template", "availability_template"):
        jinja2.Environment(autoescape=False).parse(config[key])  # noqa: S701 - HA templates, not HTML


def test_every_config_is_valid_for_ha_mqtt_sensor_schema() -> None:
    """Each published config uses only keys HA knows, with the right types and device-class rules."""
    found = configs()
    assert len(found) == len(SENSORS)
    for config in found.values():
        validate_sensor(config)


def test_topics_and_unique_ids() -> None:
    """Configs live at homeassistant/sensor/<node>/<object>/config, unique ids are unique and stable."""
    found = configs()
    node = ha_node_id("kitchen-pi")
    assert node == "edge_agent_kitchen-pi"
    assert set(found) == {f"homeassistant/sensor/{node}/{s.object_id}/config" for s in SENSORS}
    ids = [c["unique_id"] for c in found.values()]
    assert len(set(ids)) == len(ids)
    assert configs() == found  # same input, same configs: HA keeps the same entities across restarts


def test_state_and_availability_topics_are_the_devices_own() -> None:
    """Sensors read the telemetry topic and are available according to the retained status record."""
    for config in configs().values():
        assert config["state_topic"] == "edge/kitchen-pi/telemetry"
        assert config["availability_topic"] == "edge/kitchen-pi/status"
        assert config["device"]["identifiers"] == ["edge_agent_kitchen-pi"]


def _render(template: str, data: dict[str, Any]) -> str:
    return jinja2.Environment(autoescape=False).from_string(template).render(value_json=data)  # noqa: S701


def test_value_templates_read_real_telemetry() -> None:
    """Rendered against real telemetry, each template yields the field; a missing battery renders 'None' (unknown)."""
    runtime = RuntimeView(model="m", quant="Q4_K_M", threads=4, queue_depth=3, tokens_per_second=11.5,
                          requests_served=1, requests_failed=0, requests_offloaded=0, mode="degraded", uptime_s=5)
    data = json.loads(build_telemetry(probe_case("pi4-2gb"), runtime).model_dump_json())
    by_object = {topic.split("/")[3]: c for topic, c in configs().items()}
    assert float(_render(by_object["temperature"]["value_template"], data)) == pytest.approx(data["temperature_c"])
    assert _render(by_object["battery"]["value_template"], data) == "None"
    assert _render(by_object["mode"]["value_template"], data) == "degraded"
    assert _render(by_object["mode"]["value_template"], data) in by_object["mode"]["options"]
    assert _render(by_object["tokens_per_second"]["value_template"], data) == "11.5"
    assert _render(by_object["queue_depth"]["value_template"], data) == "3"


@pytest.mark.parametrize(("state", "available"), [("online", "online"), ("draining", "online"), ("offline", "offline")])
def test_availability_follows_the_status_record(state: str, available: str) -> None:
    """'online' and 'draining' keep sensors available; 'offline' (LWT or clean stop) makes them unavailable."""
    config = next(iter(configs().values()))
    assert _render(config["availability_template"], {"state": state, "device_id": "kitchen-pi"}) == available


def test_no_battery_removes_the_battery_sensor() -> None:
    """Without a battery its config is an empty retained payload, which deletes the entity in HA."""
    raw = dict(discovery_messages(TOPICS, has_battery=False))
    assert raw[f"homeassistant/sensor/{ha_node_id('kitchen-pi')}/battery/config"] == b""


def test_device_id_with_odd_characters_gives_a_valid_node_id() -> None:
    """A device id with dots or spaces still yields a node id HA accepts ([a-zA-Z0-9_-])."""
    assert ha_node_id("pi.lab 1") == "edge_agent_pi_lab_1"
