"""Telemetry payloads built from fixture snapshots, and adaptation events."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agent.adapt.policy import CapQuant, Offload, SetThreads
from agent.config.telemetry import TelemetrySettings
from agent.hardware.snapshot import ThrottleState
from agent.services.telemetry import RuntimeView, build_telemetry, event_from_action
from agent.transport.telemetry import Event, LimitCounts, Telemetry, read_telemetry
from tests.support.hardware import probe_case

ISSUE_FIELDS = {
    "ts", "temperature_c", "zones", "throttled", "battery_percent", "battery_status", "power_w", "cpu_percent",
    "load_1m", "ram_available_bytes", "cgroup_memory_bytes", "disk_free_bytes", "model", "quant", "threads",
    "queue_depth", "tokens_per_second", "requests_served", "requests_failed", "requests_offloaded", "mode",
    "uptime_s", "messages_rejected", "messages_dropped", "messages_quarantined", "limits", "slots", "slots_busy",
}  # fmt: skip
LIMIT_KEYS = {
    "payload_bytes", "json_depth", "json_elements", "messages", "stop", "prompt_tokens", "rate_limited", "queue_full",
    "max_tokens_clamped",
}  # fmt: skip

RUNTIME = RuntimeView(
    model="qwen2.5-0.5b-instruct",
    quant="Q4_K_M",
    threads=4,
    queue_depth=2,
    tokens_per_second=12.3456,
    requests_served=10,
    requests_failed=1,
    requests_offloaded=3,
    mode="degraded",
    uptime_s=123.45,
    cpu_percent=87.5,
)


def test_telemetry_has_every_field_the_issue_names() -> None:
    """The JSON has exactly the issue's fields plus the payload version 'v'."""
    data = json.loads(build_telemetry(probe_case("pi4-2gb"), RUNTIME).model_dump_json())
    assert set(data) == ISSUE_FIELDS | {"v"}
    assert data["v"] == 1


def test_limit_counters_are_one_integer_per_limit() -> None:
    """'limits' carries one counter per request limit, zero by default and passed through as given."""
    data = json.loads(build_telemetry(probe_case("pi4-2gb"), RUNTIME).model_dump_json())
    assert data["limits"] == dict.fromkeys(LIMIT_KEYS, 0)
    counts = LimitCounts(json_elements=2, rate_limited=5, max_tokens_clamped=1)
    runtime = dataclasses.replace(RUNTIME, limits=counts)
    data = json.loads(build_telemetry(probe_case("pi4-2gb"), runtime).model_dump_json())
    assert data["limits"] == {**dict.fromkeys(LIMIT_KEYS, 0), "json_elements": 2, "rate_limited": 5,
                              "max_tokens_clamped": 1}


def test_pi4_telemetry_reports_soc_temperature_and_decoded_throttle_flags() -> None:
    """On a Pi the hottest zone is temperature_c, throttle flags are named, and there is no battery."""
    snap = probe_case("pi4-2gb")
    snap = snap.model_copy(
        update={"thermal": snap.thermal.model_copy(update={"throttle": ThrottleState.from_mask(0x50005, "sysfs")})}
    )
    t = build_telemetry(snap, RUNTIME)
    assert t.temperature_c == snap.thermal.max_temp_c
    assert t.zones[0].name == "cpu-thermal"
    assert t.throttled is not None
    assert t.throttled.raw_hex == "0x50005"
    assert t.throttled.now == ["under_voltage", "throttled"]
    assert t.throttled.since_boot == ["under_voltage", "throttled"]
    assert t.battery_percent is None
    assert t.battery_status is None
    assert t.power_w is None
    assert t.ram_available_bytes == snap.memory.available_bytes
    assert t.cgroup_memory_bytes == 41943040
    assert t.load_1m == 0.08


def test_laptop_telemetry_reports_the_discharging_battery() -> None:
    """A discharging battery gives percent, a snake_case status and the power draw."""
    t = build_telemetry(probe_case("laptop-battery"), RUNTIME)
    assert (t.battery_percent, t.battery_status, t.power_w) == (64.0, "discharging", 8.45)
    assert t.throttled is None
    assert {z.name for z in t.zones} >= {"acpitz", "x86_pkg_temp", "coretemp/Package id 0"}


def test_runtime_numbers_are_copied_and_rounded() -> None:
    """Model, counters and mode come from the runtime view; rates and uptime are rounded."""
    t = build_telemetry(probe_case("pi5-8gb"), RUNTIME)
    assert (t.model, t.quant, t.threads, t.queue_depth) == ("qwen2.5-0.5b-instruct", "Q4_K_M", 4, 2)
    assert (t.requests_served, t.requests_failed, t.requests_offloaded) == (10, 1, 3)
    assert t.tokens_per_second == 12.35
    assert t.uptime_s == 123.5
    assert t.cpu_percent == 87.5
    assert t.mode == "degraded"
    assert t.ts == pytest.approx(probe_case("pi5-8gb").ts.timestamp(), abs=5)


def test_telemetry_round_trips_through_json() -> None:
    """The payload parses back into the same model (what a consumer or the offline buffer does)."""
    t = build_telemetry(probe_case("cgroup-limited"), RUNTIME)
    assert Telemetry.model_validate_json(t.model_dump_json()) == t


@pytest.mark.parametrize(
    ("action", "kind", "extra"),
    [
        (SetThreads(3, 4, "soc_near_soft_limit", {"temperature_c": 77.0}), "downgrade",
         {"threads": 3, "previous_threads": 4}),
        (CapQuant(0, 1, "recovered", {"clear_for_s": 60.0}), "upgrade", {"cap_steps": 0, "previous_cap_steps": 1}),
        (Offload(True, "battery_critical", {"battery_percent": 6.0}), "offload_on", {}),
        (Offload(False, "critical_cleared", {}), "offload_off", {}),
    ],
)  # fmt: skip
def test_event_from_action_says_what_changed_and_why(action, kind: str, extra: dict) -> None:
    """Every adaptation action becomes an event with its kind, reason, trigger numbers and the change itself."""
    e = event_from_action(action, device_id="pi1", ts=1700000000.1234)
    assert e.kind == kind
    assert e.reason == action.reason
    assert e.numbers == {**action.numbers, **extra}
    assert e.ts == 1700000000.123
    assert Event.model_validate_json(e.model_dump_json()) == e


def test_telemetry_settings_defaults() -> None:
    """Telemetry every 10 s, Home Assistant discovery off, under the 'homeassistant' prefix."""
    s = TelemetrySettings()
    assert s.interval_s == 10.0
    assert not s.ha_discovery
    assert s.ha_prefix == "homeassistant"


def test_read_telemetry_keeps_the_models_fields_with_valid_values_only() -> None:
    """A received payload is read field by field against the model: unknown keys, strings for numbers and
    booleans for counts are left out, the rest is typed."""
    read = read_telemetry({"ts": 5, "temperature_c": "51", "queue_depth": True, "mode": "degraded",
                           "temp_c": 50.0, "requests_served": 3, "limits": {"payload_bytes": 1}})
    assert read == {"ts": 5.0, "mode": "degraded", "requests_served": 3, "limits": LimitCounts(payload_bytes=1)}


def test_fleet_view_reads_the_telemetry_models_names_not_guessed_ones() -> None:
    """The operator's device row takes temperature, battery and queue from the telemetry model's fields."""
    from agent.cli.fleet import DeviceView

    typed = DeviceView("d", telemetry={"ts": 100.0, "temperature_c": 51.0, "battery_percent": 80.0, "queue_depth": 2})
    guessed = DeviceView("d", telemetry={"time": 100.0, "temp_c": 51.0, "battery": 80.0, "queue": 2})
    assert {k: typed.row(100.0, 60.0)[k] for k in ("temp_c", "battery_pct", "queue", "last_seen_s")} == {
        "temp_c": 51.0, "battery_pct": 80.0, "queue": 2.0, "last_seen_s": 0.0}
    assert {k: guessed.row(100.0, 60.0)[k] for k in ("temp_c", "battery_pct", "queue", "last_seen_s")} == {
        "temp_c": None, "battery_pct": None, "queue": None, "last_seen_s": None}
