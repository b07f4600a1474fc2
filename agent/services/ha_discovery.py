"""Home Assistant MQTT discovery: retained entity configs so a device shows up in HA by itself.

Three kinds of entity (docs/home-assistant.md lists them):

- **sensors** over one telemetry field each (``state_topic`` = the retained telemetry topic, with a
  ``value_template``); those about the board rather than the serving (temperature, battery, memory, disk,
  model, quant, slots) are ``entity_category: diagnostic``;
- **binary sensors**: throttling and under-voltage from the telemetry's firmware flags (diagnostic; removed
  on boards without them), and "serving" from the retained status (on = ``online``, off = ``draining``);
- **buttons** for the fleet commands ``restart``, ``drain`` and ``resume``, published only when the device
  runs unsigned commands (policy ``unsigned``: no fleet key and ``[fleet] allow_unsigned``). HA cannot sign
  a command, so on a device that requires signatures (or refuses every command) a button would only ever be
  refused; their configs are then empty payloads, which also delete buttons left from an earlier config.

Every entity is available while the retained status says ``online`` or ``draining`` (the availability
template maps every other state, and the ``offline`` will, to ``offline``). Configs are published retained
on ``<ha_prefix>/<component>/<node_id>/<object_id>/config``; an empty retained payload on the same topic
removes an entity.

Field rules follow HA's MQTT schemas (homeassistant/components/mqtt/sensor.py, binary_sensor.py,
button.py and the entity/availability base schemas): a numeric device class comes with its unit and
``state_class: measurement``; the ``enum`` device class takes ``options`` and neither a unit nor a state
class; sensors accept no ``entity_category`` but ``diagnostic``. A template that renders ``None`` (a JSON
null through ``{{ value_json.x }}``) makes a sensor or binary sensor "unknown".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from agent.transport.topics import DeviceTopics, command_topic, ha_config_topic, ha_node_id

ORIGIN = {"name": "edge-agent"}
EXPIRE_AFTER_INTERVALS = 3  # a telemetry entity goes 'unavailable' after three missed telemetry ticks
BUTTON_TTL_S = 120
"""A button press expires this long after HA sent it: a press the device gets late (it was away while HA
still showed it available) is refused ``expired`` instead of restarting it minutes later."""

AVAILABILITY_TEMPLATE = (
    "{{ 'online' if value_json is defined and value_json.state in ('online', 'draining') else 'offline' }}"
)
"""The retained status → HA availability. HA compares the rendered value with ``payload_available`` /
``payload_not_available`` and ignores anything else, so every status must map to one of the two:
``starting``/``pulling``/``loading`` (not serving yet) and the ``offline`` status (clean stop or the
broker-published will) are 'offline'; a payload that is not JSON (``value_json`` undefined) too."""

Category = Literal["diagnostic", "config"] | None
Source = Literal["telemetry", "status"]


def _field(name: str) -> str:
    return f"{{{{ value_json.{name} }}}}"


def _bytes_as(field: str, divisor: int) -> str:
    # HA's MQTT sensor cannot convert units itself (no suggested_unit_of_measurement): convert here.
    return (f"{{{{ (value_json.{field} / {divisor}) | round(1) if value_json.{field} is number "
            f"else None }}}}")


def _flags_now(flags: tuple[str, ...]) -> str:
    names = ", ".join(f"'{f}'" for f in flags)
    return ("{% set t = value_json.throttled %}"
            "{{ 'None' if t is none or t is not defined else "
            f"('ON' if t.now | select('in', [{names}]) | list else 'OFF') }}}}")


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """One HA sensor over one telemetry field (``template`` when the field needs converting)."""

    object_id: str
    name: str
    field: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    icon: str | None = None
    options: tuple[str, ...] | None = None
    precision: int | None = None
    category: Category = None
    template: str | None = None

    @property
    def value_template(self) -> str:
        return self.template or _field(self.field)


@dataclass(frozen=True, slots=True)
class BinarySensorSpec:
    """One HA binary sensor: a template rendering 'ON', 'OFF' or 'None' from the telemetry or the status."""

    object_id: str
    name: str
    source: Source
    template: str
    device_class: str | None = None
    icon: str | None = None
    category: Category = None


@dataclass(frozen=True, slots=True)
class ButtonSpec:
    """One HA button that publishes fleet command ``command`` to this device's command topic."""

    object_id: str
    name: str
    command: str
    device_class: str | None = None
    icon: str | None = None


MIB, GIB = 1 << 20, 1 << 30

SENSORS: tuple[SensorSpec, ...] = (
    SensorSpec("temperature", "SoC temperature", "temperature_c", "°C", "temperature", precision=1,
               category="diagnostic"),
    SensorSpec("battery", "Battery", "battery_percent", "%", "battery", precision=0, category="diagnostic"),
    SensorSpec(
        "mode", "Mode", "mode", device_class="enum", state_class=None, icon="mdi:cloud-sync",
        options=("local", "degraded", "offloading"),
    ),
    SensorSpec("tokens_per_second", "Tokens per second", "tokens_per_second", "tok/s", icon="mdi:speedometer",
               precision=1),
    SensorSpec("queue_depth", "Queue depth", "queue_depth", icon="mdi:tray-full"),
    SensorSpec("slots_busy", "Busy slots", "slots_busy", icon="mdi:view-parallel"),
    SensorSpec("requests_served", "Requests served", "requests_served", state_class="total_increasing",
               icon="mdi:counter"),
    SensorSpec("model", "Model", "model", state_class=None, icon="mdi:brain", category="diagnostic"),
    SensorSpec("quant", "Quantization", "quant", state_class=None, icon="mdi:tune-variant", category="diagnostic"),
    SensorSpec("slots", "Slots", "slots", state_class=None, icon="mdi:view-parallel-outline", category="diagnostic"),
    SensorSpec("ram_available", "RAM available", "ram_available_bytes", "MiB", "data_size", precision=0,
               category="diagnostic", template=_bytes_as("ram_available_bytes", MIB)),
    SensorSpec("disk_free", "Disk free", "disk_free_bytes", "GiB", "data_size", precision=1,
               category="diagnostic", template=_bytes_as("disk_free_bytes", GIB)),
)  # fmt: skip

BINARY_SENSORS: tuple[BinarySensorSpec, ...] = (
    BinarySensorSpec("serving", "Serving", "status",
                     "{{ 'ON' if value_json.state == 'online' else 'OFF' }}", device_class="running"),
    BinarySensorSpec("throttled", "Throttled", "telemetry",
                     _flags_now(("arm_freq_capped", "throttled", "soft_temp_limit")), device_class="problem",
                     category="diagnostic"),
    BinarySensorSpec("under_voltage", "Under-voltage", "telemetry", _flags_now(("under_voltage",)),
                     device_class="problem", category="diagnostic"),
)  # fmt: skip

BUTTONS: tuple[ButtonSpec, ...] = (
    ButtonSpec("restart", "Restart", "restart", device_class="restart"),
    ButtonSpec("drain", "Drain", "drain", icon="mdi:pause-circle-outline"),
    ButtonSpec("resume", "Resume", "resume", icon="mdi:play-circle-outline"),
)

THROTTLE_ENTITIES = frozenset({"throttled", "under_voltage"})
"""Binary sensors that read the Raspberry Pi firmware flags: removed on boards that have none."""


def _common(topics: DeviceTopics, object_id: str, name: str, *, board: str | None,
            version: str | None) -> dict[str, Any]:
    """What every entity config carries: name, ids, availability, device and origin."""
    node = ha_node_id(topics.device_id)
    return {
        "name": name,
        "unique_id": f"{node}_{object_id}",
        "availability_topic": topics.status,
        "availability_template": AVAILABILITY_TEMPLATE,
        "payload_available": "online",
        "payload_not_available": "offline",
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


def _present(optional: dict[str, Any]) -> dict[str, Any]:
    """The optional fields a spec sets: one it leaves None is not sent, so HA applies its own default."""
    return {k: v for k, v in optional.items() if v is not None}


def _expire_after(interval_s: float) -> int:
    return max(1, round(interval_s * EXPIRE_AFTER_INTERVALS))


def sensor_config(
    spec: SensorSpec,
    topics: DeviceTopics,
    *,
    interval_s: float,
    board: str | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """The discovery config of one sensor (a JSON object per HA's MQTT sensor schema)."""
    config = _common(topics, spec.object_id, spec.name, board=board, version=version)
    config.update({
        "state_topic": topics.telemetry,
        "value_template": spec.value_template,
        "expire_after": _expire_after(interval_s),
    })
    config.update(_present({
        "unit_of_measurement": spec.unit, "device_class": spec.device_class, "state_class": spec.state_class,
        "icon": spec.icon, "options": list(spec.options) if spec.options else None,
        "suggested_display_precision": spec.precision, "entity_category": spec.category,
    }))  # fmt: skip
    return config


def binary_sensor_config(
    spec: BinarySensorSpec,
    topics: DeviceTopics,
    *,
    interval_s: float,
    board: str | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """The discovery config of one binary sensor (HA's MQTT binary_sensor schema; payloads 'ON'/'OFF')."""
    config = _common(topics, spec.object_id, spec.name, board=board, version=version)
    config.update({
        "state_topic": topics.telemetry if spec.source == "telemetry" else topics.status,
        "value_template": spec.template,
        "payload_on": "ON",
        "payload_off": "OFF",
    })
    if spec.source == "telemetry":
        # The status is retained and changes only on transitions; telemetry must keep coming.
        config["expire_after"] = _expire_after(interval_s)
    config.update(_present({"device_class": spec.device_class, "icon": spec.icon, "entity_category": spec.category}))
    return config


def button_command_template(spec: ButtonSpec, device_id: str) -> str:
    """The HA template of a press: an unsigned fleet command with a fresh id (a command id runs at most once
    per device, so a constant payload would run only on the first press) that expires after BUTTON_TTL_S."""
    fixed = json.dumps({"v": 1, "cmd": spec.command, "target": f"device:{device_id}"}, ensure_ascii=False)[1:-1]
    return (
        f'{{{fixed}, "id": "ha-{spec.command}-{{{{ now().timestamp() }}}}", '
        f'"expires_at": {{{{ now().timestamp() + {BUTTON_TTL_S} }}}}}}'
    )


def button_config(
    spec: ButtonSpec,
    topics: DeviceTopics,
    *,
    board: str | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """The discovery config of one fleet-command button (HA's MQTT button schema)."""
    config = _common(topics, spec.object_id, spec.name, board=board, version=version)
    config.update({
        "command_topic": command_topic(topics.prefix, "device", topics.device_id, spec.command),
        "command_template": button_command_template(spec, topics.device_id),
        "retain": False,  # a retained command would run again on every reconnect of the device
        "entity_category": "config",
    })
    config.update(_present({"device_class": spec.device_class, "icon": spec.icon}))
    return config


def discovery_messages(
    topics: DeviceTopics,
    *,
    ha_prefix: str = "homeassistant",
    interval_s: float = 10.0,
    has_battery: bool = True,
    has_throttle: bool = True,
    commands: str | None = None,
    board: str | None = None,
    version: str | None = None,
) -> list[tuple[str, bytes]]:
    """(topic, payload) pairs to publish retained, QoS 1, after every connect.

    ``commands`` is the device's fleet command policy (``signed``, ``unsigned``, ``refused``); the buttons
    are published only for ``unsigned``. An entity the device does not have (the battery without one, the
    throttle flags off a Raspberry Pi, the buttons when HA cannot run commands) gets an empty payload, which
    deletes it in HA (and clears a config left over from an earlier run).
    """

    def config_topic(component: str, object_id: str) -> str:
        return ha_config_topic(ha_prefix, topics.device_id, object_id, component=component)

    def encode(config: dict[str, Any]) -> bytes:
        return json.dumps(config, ensure_ascii=False).encode()

    out: list[tuple[str, bytes]] = []
    for spec in SENSORS:
        topic = config_topic("sensor", spec.object_id)
        if spec.object_id == "battery" and not has_battery:
            out.append((topic, b""))
            continue
        out.append((topic, encode(sensor_config(spec, topics, interval_s=interval_s, board=board,
                                                version=version))))
    for binary in BINARY_SENSORS:
        topic = config_topic("binary_sensor", binary.object_id)
        if binary.object_id in THROTTLE_ENTITIES and not has_throttle:
            out.append((topic, b""))
            continue
        out.append((topic, encode(binary_sensor_config(binary, topics, interval_s=interval_s, board=board,
                                                       version=version))))
    for button in BUTTONS:
        topic = config_topic("button", button.object_id)
        if commands != "unsigned":
            out.append((topic, b""))
            continue
        out.append((topic, encode(button_config(button, topics, board=board, version=version))))
    return out
