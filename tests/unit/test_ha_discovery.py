"""Home Assistant discovery configs are valid for HA's MQTT schemas (sensor, binary_sensor, button), read the
right telemetry and status, and offer command buttons only where HA's unsigned commands would run."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jinja2
import pytest

from agent.fleet.wire import CommandRequest
from agent.services.ha_discovery import (
    BINARY_SENSORS,
    BUTTON_TTL_S,
    BUTTONS,
    SENSORS,
    discovery_messages,
)
from agent.services.telemetry import RuntimeView, build_telemetry
from agent.transport.topics import DeviceTopics, FleetTopics, ha_node_id
from tests.support.hardware import probe_case

# HA's MQTT entity base schemas (homeassistant/components/mqtt/schemas.py: MQTT_ENTITY_COMMON_SCHEMA with the
# availability schema; MQTT_BASE_SCHEMA's qos/encoding), written out as key -> accepted type(s). The
# platform schemas below extend them; HA rejects unknown keys.
COMMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "availability": list,
    "availability_mode": str,
    "availability_template": str,
    "availability_topic": str,
    "default_entity_id": str,
    "device": dict,
    "enabled_by_default": bool,
    "encoding": str,
    "entity_category": str,
    "entity_picture": str,
    "icon": str,
    "json_attributes_template": str,
    "json_attributes_topic": str,
    "name": (str, type(None)),
    "object_id": str,
    "origin": dict,
    "payload_available": str,
    "payload_not_available": str,
    "platform": str,
    "qos": int,
    "unique_id": str,
}
SENSOR_KEYS: dict[str, type | tuple[type, ...]] = {  # homeassistant/components/mqtt/sensor.py
    **COMMON_KEYS,
    "device_class": str,
    "expire_after": int,
    "force_update": bool,
    "last_reset_value_template": str,
    "options": list,
    "state_class": str,
    "state_topic": str,
    "suggested_display_precision": int,
    "unit_of_measurement": str,
    "value_template": str,
}
BINARY_SENSOR_KEYS: dict[str, type | tuple[type, ...]] = {  # homeassistant/components/mqtt/binary_sensor.py
    **COMMON_KEYS,
    "device_class": str,
    "expire_after": int,
    "force_update": bool,
    "off_delay": int,
    "payload_off": str,
    "payload_on": str,
    "state_topic": str,
    "value_template": str,
}
BUTTON_KEYS: dict[str, type | tuple[type, ...]] = {  # homeassistant/components/mqtt/button.py
    **COMMON_KEYS,
    "command_template": str,
    "command_topic": str,
    "device_class": str,
    "payload_press": str,
    "retain": bool,
}
KEYS = {"sensor": SENSOR_KEYS, "binary_sensor": BINARY_SENSOR_KEYS, "button": BUTTON_KEYS}
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}, "button": {"command_topic"}}
DEVICE_KEYS: dict[str, type | tuple[type, ...]] = {
    "configuration_url": str, "connections": list, "hw_version": str, "identifiers": (list, str),
    "manufacturer": str, "model": str, "model_id": str, "name": str, "serial_number": str,
    "suggested_area": str, "sw_version": str, "via_device": str,
}  # fmt: skip
ORIGIN_KEYS: dict[str, type] = {"name": str, "sw_version": str, "support_url": str}
STATE_CLASSES = {"measurement", "total", "total_increasing", "measurement_angle"}
# Device classes we use, with the units HA accepts for each (homeassistant/components/sensor/const.py).
DEVICE_CLASS_UNITS: dict[str, set[str | None]] = {
    "temperature": {"°C", "°F", "K"}, "battery": {"%"}, "enum": {None},
    "data_size": {"bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"},
}  # fmt: skip
BINARY_DEVICE_CLASSES = {"problem", "running", "connectivity", "power"}  # a subset of HA's, the ones that fit
BUTTON_DEVICE_CLASSES = {"identify", "restart", "update"}

TOPICS = DeviceTopics("edge", "kitchen-pi")
NODE = ha_node_id("kitchen-pi")
NOW = datetime(2026, 12, 1, 21, 0, 0, 123456, tzinfo=UTC)


def configs(**kw: Any) -> dict[str, dict[str, Any]]:
    """topic → config (an empty dict for an empty, entity-deleting payload)."""
    out = {}
    for topic, payload in discovery_messages(TOPICS, version="0.1.0", board="Raspberry Pi 5", **kw):
        out[topic] = json.loads(payload) if payload else {}
    return out


def by_entity(**kw: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(component, object_id) → config, for the entities actually published (empty payloads left out)."""
    return {(t.split("/")[1], t.split("/")[3]): c for t, c in configs(**kw).items() if c}


def render(template: str, value_json: Any = None, *, now: datetime = NOW) -> str:
    """Render a template the way HA's MQTT integration does: ``value_json`` only when the payload is JSON."""
    env = jinja2.Environment(autoescape=False)  # noqa: S701 - HA templates, not HTML
    variables: dict[str, Any] = {"now": lambda: now}
    if value_json is not None:
        variables["value_json"] = value_json
    return env.from_string(template).render(**variables)


def validate(component: str, config: dict[str, Any]) -> None:
    """Apply HA's MQTT schema rules for ``component`` to one config."""
    keys = KEYS[component]
    assert set(config) >= REQUIRED[component]
    for key, value in config.items():
        assert key in keys, f"HA rejects unknown {component} key {key!r}"
        assert isinstance(value, keys[key]), f"{key}={value!r}"
    for key, value in config["device"].items():
        assert key in DEVICE_KEYS, key
        assert isinstance(value, DEVICE_KEYS[key]), key
    assert config["device"].get("identifiers") or config["device"].get("connections")
    for key, value in config.get("origin", {}).items():
        assert key in ORIGIN_KEYS
        assert isinstance(value, ORIGIN_KEYS[key])
    assert "name" in config["origin"]
    assert config["qos"] in (0, 1, 2)
    # Sensors and binary sensors may only be diagnostic (HA refuses 'config' for them).
    allowed = {"diagnostic", "config"} if component == "button" else {"diagnostic"}
    assert config.get("entity_category", "diagnostic") in allowed
    for key in ("value_template", "availability_template", "command_template"):
        if key in config:
            jinja2.Environment(autoescape=False).parse(config[key])  # noqa: S701 - HA templates, not HTML
    if component == "sensor":
        validate_sensor(config)
    elif component == "binary_sensor":
        assert config.get("device_class") in BINARY_DEVICE_CLASSES | {None}
    else:
        assert config.get("device_class") in BUTTON_DEVICE_CLASSES | {None}


def validate_sensor(config: dict[str, Any]) -> None:
    """The sensor platform's own rules: device class ↔ unit, enum options, state classes."""
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


def telemetry(case: str = "pi4-2gb", **runtime: Any) -> dict[str, Any]:
    """A real telemetry payload (fixture hardware + a runtime view) as HA would parse it."""
    view = RuntimeView(**{"model": "m", "quant": "Q4_K_M", "threads": 4, "queue_depth": 3, "slots": 4,
                          "slots_busy": 2, "tokens_per_second": 11.5, "requests_served": 7, "requests_failed": 0,
                          "requests_offloaded": 0, "mode": "degraded", "uptime_s": 5, **runtime})
    return json.loads(build_telemetry(probe_case(case), view).model_dump_json())


# -- schema ------------------------------------------------------------------------------------------


def test_every_config_is_valid_for_its_ha_mqtt_schema() -> None:
    """Each published config (sensor, binary sensor, button) uses only keys HA knows, with the right types."""
    found = by_entity(commands="unsigned")
    assert len(found) == len(SENSORS) + len(BINARY_SENSORS) + len(BUTTONS)
    for (component, _), config in found.items():
        validate(component, config)


def test_topics_and_unique_ids() -> None:
    """Configs live at homeassistant/<component>/<node>/<object>/config; unique ids are unique and stable."""
    found = configs(commands="unsigned")
    assert NODE == "edge_agent_kitchen-pi"
    assert set(found) == (
        {f"homeassistant/sensor/{NODE}/{s.object_id}/config" for s in SENSORS}
        | {f"homeassistant/binary_sensor/{NODE}/{b.object_id}/config" for b in BINARY_SENSORS}
        | {f"homeassistant/button/{NODE}/{b.object_id}/config" for b in BUTTONS}
    )
    ids = [c["unique_id"] for c in found.values()]
    assert len(set(ids)) == len(ids)
    assert configs(commands="unsigned") == found  # same input, same configs: HA keeps its entities across restarts


def test_state_and_availability_topics_are_the_devices_own() -> None:
    """Entities read the telemetry (serving: the status) and are available according to the retained status."""
    for (component, object_id), config in by_entity(commands="unsigned").items():
        assert config["availability_topic"] == "edge/kitchen-pi/status"
        assert config["device"]["identifiers"] == [NODE]
        if component == "button":
            assert "state_topic" not in config
        elif object_id == "serving":
            assert config["state_topic"] == "edge/kitchen-pi/status"
            assert "expire_after" not in config  # the status changes on transitions only
        else:
            assert config["state_topic"] == "edge/kitchen-pi/telemetry"
            assert config["expire_after"] == 30  # three missed 10 s ticks


def test_nothing_reads_the_replay_topic() -> None:
    """Replayed telemetry is published where no entity listens, so HA never records a past reading as now."""
    for config in configs(commands="unsigned").values():
        assert TOPICS.telemetry_replay not in json.dumps(config)


# -- entity categories ----------------------------------------------------------------------------------


def test_board_health_is_diagnostic_and_serving_is_primary() -> None:
    """Board readings, model and quant are diagnostic; what the device does for its users is not; buttons config."""
    found = by_entity(commands="unsigned")
    categories = {key: c.get("entity_category") for key, c in found.items()}
    assert {k for k, c in categories.items() if c == "diagnostic"} == {
        ("sensor", "temperature"), ("sensor", "battery"), ("sensor", "model"), ("sensor", "quant"),
        ("sensor", "slots"), ("sensor", "ram_available"), ("sensor", "disk_free"),
        ("binary_sensor", "throttled"), ("binary_sensor", "under_voltage"),
    }  # fmt: skip
    assert {k for k, c in categories.items() if c is None} == {
        ("sensor", "mode"), ("sensor", "tokens_per_second"), ("sensor", "queue_depth"), ("sensor", "slots_busy"),
        ("sensor", "requests_served"), ("binary_sensor", "serving"),
    }  # fmt: skip
    assert {k for k, c in categories.items() if c == "config"} == {("button", b.object_id) for b in BUTTONS}


# -- value templates ---------------------------------------------------------------------------------


def test_value_templates_read_real_telemetry() -> None:
    """Rendered against real telemetry, each template yields its field; bytes become MiB/GiB; a missing battery
    renders 'None' (unknown)."""
    data = telemetry()
    found = by_entity()

    def value(object_id: str, payload: dict[str, Any] = data) -> str:
        return render(found["sensor", object_id]["value_template"], payload)

    assert float(value("temperature")) == pytest.approx(data["temperature_c"])
    assert value("battery") == "None"
    assert value("mode") == "degraded"
    assert value("mode") in found["sensor", "mode"]["options"]
    assert value("tokens_per_second") == "11.5"
    assert (value("queue_depth"), value("slots_busy"), value("slots"), value("requests_served")) == ("3", "2", "4", "7")
    assert (value("model"), value("quant")) == ("m", "Q4_K_M")
    assert float(value("ram_available")) == pytest.approx(data["ram_available_bytes"] / 2**20, abs=0.05)
    assert float(value("ram_available")) == 1750.0  # the pi4-2gb fixture's MemAvailable
    assert float(value("disk_free", {**data, "disk_free_bytes": 32 * 2**30 + 2**29})) == 32.5
    assert value("disk_free", {**data, "disk_free_bytes": None}) == "None"
    nothing = telemetry(model=None, quant=None, slots=None)
    assert (value("model", nothing), value("quant", nothing), value("slots", nothing)) == ("None", "None", "None")


@pytest.mark.parametrize(
    ("now", "throttled", "under_voltage"),
    [
        ([], "OFF", "OFF"),
        (["under_voltage"], "OFF", "ON"),
        (["throttled"], "ON", "OFF"),
        (["arm_freq_capped"], "ON", "OFF"),
        (["soft_temp_limit"], "ON", "OFF"),
        (["under_voltage", "throttled"], "ON", "ON"),
    ],
)
def test_throttle_binary_sensors_read_the_firmware_flags_set_now(now: list[str], throttled: str,
                                                                 under_voltage: str) -> None:
    """'Throttled' is on while the firmware slows the CPU (capped, throttled, soft limit); 'Under-voltage' is
    on for the supply's flag; flags only 'since boot' turn neither on."""
    data = {**telemetry(), "throttled": {"raw_hex": "0x0", "now": now, "since_boot": ["under_voltage", "throttled"]}}
    found = by_entity()
    assert render(found["binary_sensor", "throttled"]["value_template"], data) == throttled
    assert render(found["binary_sensor", "under_voltage"]["value_template"], data) == under_voltage


def test_throttle_binary_sensors_read_a_real_throttled_pi() -> None:
    """The Pi Zero 2 W fixture (0x50005: under-voltage and throttled now) turns both on."""
    data, found = telemetry("pi-zero-2w"), by_entity()
    assert render(found["binary_sensor", "throttled"]["value_template"], data) == "ON"
    assert render(found["binary_sensor", "under_voltage"]["value_template"], data) == "ON"


def test_throttle_binary_sensors_are_unknown_without_the_flags() -> None:
    """A telemetry without throttle flags (null) renders 'None', which HA shows as unknown, not as 'off'."""
    data, found = {**telemetry(), "throttled": None}, by_entity()
    assert render(found["binary_sensor", "throttled"]["value_template"], data) == "None"
    assert render(found["binary_sensor", "under_voltage"]["value_template"], data) == "None"


@pytest.mark.parametrize(("state", "serving"), [("online", "ON"), ("draining", "OFF")])
def test_serving_follows_the_status(state: str, serving: str) -> None:
    """'Serving' is on while the device takes requests and off while it drains."""
    config = by_entity()["binary_sensor", "serving"]
    assert (config["payload_on"], config["payload_off"]) == ("ON", "OFF")
    assert render(config["value_template"], {"state": state, "device_id": "kitchen-pi"}) == serving


# -- availability ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "available"),
    [("online", "online"), ("draining", "online"), ("starting", "offline"), ("pulling", "offline"),
     ("loading", "offline"), ("offline", "offline")],
)  # fmt: skip
def test_availability_follows_the_status_record(state: str, available: str) -> None:
    """'online' and 'draining' make every entity available; start-up states and 'offline' (the will or a clean
    stop) unavailable. The template always renders one of the two payloads, which HA requires to act on it."""
    for config in by_entity(commands="unsigned").values():
        assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
        assert render(config["availability_template"], {"state": state, "device_id": "kitchen-pi"}) == available


def test_availability_of_a_payload_that_is_not_a_status() -> None:
    """A status payload that is not JSON (HA leaves value_json undefined) or has no state means unavailable."""
    config = next(iter(by_entity().values()))
    assert render(config["availability_template"]) == "offline"
    assert render(config["availability_template"], {"v": 1}) == "offline"


# -- entities a device does not have ---------------------------------------------------------------------


def test_no_battery_removes_the_battery_sensor() -> None:
    """Without a battery its config is an empty retained payload, which deletes the entity in HA."""
    raw = dict(discovery_messages(TOPICS, has_battery=False))
    assert raw[f"homeassistant/sensor/{NODE}/battery/config"] == b""


def test_a_board_without_throttle_flags_has_no_throttle_sensors() -> None:
    """Off a Raspberry Pi there are no firmware flags: the two binary sensors are deleted, 'serving' stays."""
    raw = dict(discovery_messages(TOPICS, has_throttle=False))
    assert raw[f"homeassistant/binary_sensor/{NODE}/throttled/config"] == b""
    assert raw[f"homeassistant/binary_sensor/{NODE}/under_voltage/config"] == b""
    assert raw[f"homeassistant/binary_sensor/{NODE}/serving/config"]


# -- buttons and signing -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["signed", "refused", None])
def test_no_buttons_when_the_device_would_refuse_what_ha_sends(policy: str | None) -> None:
    """HA cannot sign: a device that requires signatures (or refuses every command, or whose policy is not
    known) gets no buttons, and their configs are empty payloads that delete buttons from an earlier run."""
    raw = dict(discovery_messages(TOPICS, commands=policy))
    for button in BUTTONS:
        assert raw[f"homeassistant/button/{NODE}/{button.object_id}/config"] == b""


def test_buttons_when_the_device_runs_unsigned_commands() -> None:
    """A device with the 'unsigned' policy gets restart, drain and resume, each on its own command topic,
    published not retained (a retained command would run again at every reconnect)."""
    found = by_entity(commands="unsigned")
    for button in BUTTONS:
        config = found["button", button.object_id]
        assert config["command_topic"] == f"edge/kitchen-pi/cmd/{button.command}"
        assert config["retain"] is False
        assert FleetTopics("edge", "kitchen-pi").match(config["command_topic"]) is not None
    assert found["button", "restart"]["device_class"] == "restart"


@pytest.mark.parametrize("name", ["restart", "drain", "resume"])
def test_a_press_renders_a_valid_unsigned_command_bound_to_its_topic(name: str) -> None:
    """What HA publishes on a press parses as a fleet command for that name and this device, expires
    BUTTON_TTL_S after the press, and has a new id on every press (an id runs once per device)."""
    config = by_entity(commands="unsigned")["button", name]
    first = json.loads(render(config["command_template"], now=NOW))
    again = json.loads(render(config["command_template"], now=datetime.fromtimestamp(NOW.timestamp() + 0.25, UTC)))
    request = CommandRequest.model_validate(first)
    target = FleetTopics("edge", "kitchen-pi").match(config["command_topic"])
    assert target is not None
    assert (request.cmd, request.target) == (target.name, target.label) == (name, "device:kitchen-pi")
    assert request.sig is None and request.nonce is None
    assert request.expires_at == pytest.approx(NOW.timestamp() + BUTTON_TTL_S)
    assert first["id"] != again["id"]


def test_device_id_with_odd_characters_gives_a_valid_node_id() -> None:
    """A device id with dots or spaces still yields a node id HA accepts ([a-zA-Z0-9_-])."""
    assert ha_node_id("pi.lab 1") == "edge_agent_pi_lab_1"
