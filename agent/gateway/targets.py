"""Which devices and groups are live, from their retained status and telemetry, and where a model name points.

The gateway's MQTT client feeds every ``{prefix}/+/status`` and ``{prefix}/+/telemetry`` message to
:meth:`Directory.observe`; the routes ask :meth:`Directory.resolve` where a request goes and
:meth:`Directory.listing` what to show as models. A model name is a device id, ``group:NAME`` (the live,
non-draining member with the least work) or ``fleet`` (the fleet's shared infer topic). One ``:latest`` tag at the
end is ignored, because Ollama clients add it. Pure apart from the clock the caller passes in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.gateway.errors import not_found, unavailable
from agent.transport.telemetry import read_telemetry
from agent.transport.topics import FleetWideTopics
from agent.transport.wire import LIVE_STATES

FLEET = "fleet"
GROUP_PREFIX = "group:"


def model_name(name: str) -> str:
    """``name`` without the ``:latest`` tag Ollama clients append."""
    return name.removesuffix(":latest") if name.endswith(":latest") else name


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: one device's infer topic, or the fleet's shared one (``device_id`` None)."""

    name: str
    device_id: str | None

    @property
    def is_fleet(self) -> bool:
        return self.device_id is None


@dataclass
class DeviceEntry:
    """One device as its retained messages describe it."""

    device_id: str
    status: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return str(self.status.get("state", "unknown"))

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def draining(self) -> bool:
        return self.state == "draining"

    @property
    def groups(self) -> list[str]:
        groups = self.status.get("groups")
        return [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []

    @property
    def queue_depth(self) -> int:
        """Requests waiting plus decoding on the device at its latest telemetry (0 without telemetry)."""
        reading = read_telemetry(self.telemetry)
        return int(reading.get("queue_depth") or 0) + int(reading.get("slots_busy") or 0)

    def field(self, name: str) -> Any:
        """A status field, else the telemetry's (model, quant, ...)."""
        value = self.status.get(name)
        return value if value is not None else self.telemetry.get(name)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One name the model lists show: a device, a group or the fleet."""

    name: str
    kind: Literal["device", "group", "fleet"]
    devices: tuple[str, ...]
    model: str | None = None
    quant: str | None = None
    n_ctx: int | None = None
    state: str | None = None
    since: float | None = None


class Directory:
    """The live fleet as seen from retained messages under one topic prefix. Owned by one thread (the loop)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._topics = FleetWideTopics(prefix)
        self._devices: dict[str, DeviceEntry] = {}

    def observe(self, topic: str, payload: bytes) -> bool:
        """Fold a status or telemetry message in; False when ``topic`` is neither (or the payload is not an object)."""
        report = self._topics.report(topic)
        if report is None:
            return False
        device_id, kind = report
        if not payload:  # a cleared retained message: the device is gone
            if kind == "status":
                self._devices.pop(device_id, None)
            return True
        try:
            data = json.loads(payload)
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        entry = self._devices.setdefault(device_id, DeviceEntry(device_id))
        if kind == "status":
            entry.status = data
        else:
            entry.telemetry = data
        return True

    def device(self, device_id: str) -> DeviceEntry | None:
        return self._devices.get(device_id)

    def live(self) -> list[DeviceEntry]:
        """Live devices (online or draining), by id."""
        return sorted((d for d in self._devices.values() if d.live), key=lambda d: d.device_id)

    def groups(self) -> dict[str, list[DeviceEntry]]:
        """Each group with at least one live member → its live members."""
        out: dict[str, list[DeviceEntry]] = {}
        for entry in self.live():
            for group in entry.groups:
                out.setdefault(group, []).append(entry)
        return dict(sorted(out.items()))

    def is_draining(self, device_id: str | None) -> bool:
        entry = self._devices.get(device_id) if device_id else None
        return entry is not None and entry.draining

    def resolve(self, name: str, in_flight: Mapping[str, int] | None = None) -> Target:
        """Where a request for model ``name`` goes; :class:`GatewayError` 404 when nothing live has that name, 503
        when a group or the fleet has live members but none takes work.

        A group request goes to its live, non-draining member with the least work: the device's latest
        ``queue_depth`` + ``slots_busy`` plus this gateway's requests to it still in flight (telemetry is seconds
        old; without the second term a burst would all go to one device), ties by device id.
        """
        name = model_name(name)
        if name == FLEET:
            live = self.live()
            if not live:
                raise not_found("no device of the fleet is live")
            if all(d.draining for d in live):
                raise unavailable("every live device of the fleet is draining", retry_after_s=30)
            return Target(name, None)
        if name.startswith(GROUP_PREFIX):
            group = name[len(GROUP_PREFIX):]
            members = self.groups().get(group, [])
            if not members:
                raise not_found(f"no live device in group {group!r}")
            serving = [d for d in members if not d.draining]
            if not serving:
                raise unavailable(f"every live device of group {group!r} is draining", retry_after_s=30)
            load = in_flight or {}
            best = min(serving, key=lambda d: (d.queue_depth + load.get(d.device_id, 0), d.device_id))
            return Target(name, best.device_id)
        entry = self._devices.get(name)
        if entry is None or not entry.live:
            state = f" (it is {entry.state})" if entry is not None else ""
            raise not_found(f"no live device, group or fleet named {name!r}{state}; "
                            "see GET /v1/models or /api/tags")
        return Target(name, name)

    def listing(self) -> list[ModelEntry]:
        """The model lists: every live device, then every group with a live member, then ``fleet`` if any is live."""
        out = [
            ModelEntry(d.device_id, "device", (d.device_id,), _str(d.field("model")), _str(d.field("quant")),
                       _int(d.status.get("n_ctx")), d.state, _float(d.status.get("since")))
            for d in self.live()
        ]
        for group, members in self.groups().items():
            out.append(_aggregate(f"{GROUP_PREFIX}{group}", "group", members))
        live = self.live()
        if live:
            out.append(_aggregate(FLEET, "fleet", live))
        return out

    def entry(self, name: str) -> ModelEntry:
        """The listing entry for ``name`` (GET /v1/models/{name}, /api/show); :class:`GatewayError` 404 if none."""
        wanted = model_name(name)
        for item in self.listing():
            if item.name == wanted:
                return item
        raise not_found(f"no live device, group or fleet named {wanted!r}; see GET /v1/models or /api/tags")


def _aggregate(name: str, kind: Literal["group", "fleet"], members: list[DeviceEntry]) -> ModelEntry:
    """A group's entry: its members; model and quant only when they all serve the same one."""
    models = {_str(d.field("model")) for d in members}
    quants = {_str(d.field("quant")) for d in members}
    n_ctx = [n for n in (_int(d.status.get("n_ctx")) for d in members) if n is not None]
    state = "online" if any(not d.draining for d in members) else "draining"
    since = [s for s in (_float(d.status.get("since")) for d in members) if s is not None]
    return ModelEntry(name, kind, tuple(d.device_id for d in members),
                      models.pop() if len(models) == 1 else None, quants.pop() if len(quants) == 1 else None,
                      min(n_ctx) if n_ctx else None, state, max(since) if since else None)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


