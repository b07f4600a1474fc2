"""Building blocks for config sections, importable by any module without import cycles.

Each capability's section model lives in :mod:`agent.config` (``agent.config.telemetry`` and so on),
which imports nothing but pydantic and this module; ``agent.settings`` assembles them into the file's top
level. Keeping sections out of the capability packages keeps configuration at the bottom of the import
graph: loading the config never imports the hardware probe, psutil or the services.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

NOT_IN_TOPIC_NAME = re.compile(
    "[+#\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)
"""Characters a broker refuses in a topic name besides the wildcards: NUL, lone surrogates (not UTF-8),
and what MQTT says senders should not use and Mosquitto refuses as a malformed packet: the control
characters U+0001-U+001F and U+007F-U+009F and the noncharacters. A publish to such a topic gets the
client disconnected, and a QoS 1 session resends it after every reconnect."""

RESERVED_DEVICE_IDS = frozenset({"group", "fleet", "cloud"})
"""Device ids that would make a device's topics collide with the group, fleet-wide and cloud ones."""


def validate_topic_level(value: str, what: str = "value") -> str:
    """Reject anything that is not exactly one concrete MQTT topic level.

    Device ids and group names become topic levels the daemon subscribes and publishes to: a ``/``
    would let one device own another's topics, a wildcard would subscribe it to theirs, and a control
    character gets every publish refused by the broker.
    """
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "/" in value or NOT_IN_TOPIC_NAME.search(value):
        raise ValueError(
            f"{what} must be a single MQTT topic level without '/', '+', '#', NUL or control characters: {value!r}"
        )
    if len(value.encode()) > 128:
        raise ValueError(f"{what} must be at most 128 bytes")
    return value


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def credentials_dir() -> Path | None:
    """systemd's ``$CREDENTIALS_DIRECTORY`` (LoadCredential=), where secrets live on a device."""
    value = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None
