"""Building blocks for config sections, importable by any module without import cycles.

Each capability defines its own section model next to its code (``TelemetrySettings`` in the
telemetry module, and so on); ``agent.settings`` assembles them into the file's top level.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

_TOPIC_FORBIDDEN = ("+", "#", "\x00")


def validate_topic_level(value: str, what: str = "value") -> str:
    """Reject anything that is not exactly one concrete MQTT topic level."""
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "/" in value or any(c in value for c in _TOPIC_FORBIDDEN):
        raise ValueError(f"{what} must be a single MQTT topic level without '/', '+', '#' or NUL: {value!r}")
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
