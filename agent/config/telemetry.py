"""Config ``[telemetry]``: how often the device reports, and where reports wait while the broker is away."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from agent.settings_base import Section


class TelemetrySettings(Section):
    """Config ``[telemetry]``."""

    interval_s: float = Field(10.0, ge=1.0, description="Publish telemetry this often (and at once on a mode change).")
    buffer_dir: Path = Field(
        Path("/var/lib/edge-agent/telemetry"),
        description="Where telemetry is kept while the broker is unreachable (survives restarts).",
    )
    buffer_max_bytes: int = Field(
        2 * 1024 * 1024, ge=4096, description="Largest size of the offline buffer; the oldest records go first."
    )
    buffer_max_age_s: float = Field(
        24 * 3600.0, gt=0, description="Buffered records older than this are dropped, not replayed."
    )
    ha_discovery: bool = Field(False, description="Publish Home Assistant MQTT discovery configs (retained).")
    ha_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix.")
