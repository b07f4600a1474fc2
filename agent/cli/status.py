"""``edge-agent status``: this device's retained status (and latest telemetry) as the broker holds them.

It asks the broker, not the process: what an operator on the device sees is what the fleet sees.
The MQTT side is the fleet operator's connection (:class:`agent.cli.fleet.Operator`) subscribed
to this device's two retained topics.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from agent.cli.config_cmd import add_config_argument
from agent.cli.fleet import DeviceView, Operator, fleet_settings
from agent.errors import NotFoundError
from agent.settings import load_settings
from agent.transport.topics import DeviceTopics
from agent.transport.wire import LIVE_STATES

QUIET_S = 1.0
"""Retained messages arrive right after the subscription; this long with nothing more means none are left."""


COMMAND_POLICIES = {
    "signed": "fleet commands signed by the fleet key only",
    "unsigned": "UNSIGNED fleet commands run (fleet.allow_unsigned, no fleet key)",
    "refused": "fleet commands refused (no fleet key)",
}
"""How the retained status's ``commands`` reads to an operator."""


class NoStatusError(NotFoundError):
    """The broker holds no retained status for the device."""

    code = "no_status"


def add_parser(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status",
        help="show this device's state from its retained status on the broker",
        description="Read the device's retained status (and latest retained telemetry) from the broker in the "
        "config and print state, model, quant, mode, queue and uptime. Exits 68 when the broker cannot be "
        "reached, 66 when it holds no status for the device.",
    )
    add_config_argument(status)
    status.add_argument("--device", help="device id (default: device_id from the config)")
    status.add_argument("--json", action="store_true", help="print JSON: status, telemetry and a summary")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)")
    status.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, required=args.config is not None)
    topics = DeviceTopics(settings.mqtt.topic_prefix, args.device or settings.device_id)
    view = read_view(Operator(settings), topics, args.timeout)
    if not view.status:
        raise NoStatusError(
            f"no retained status for {topics.device_id} on {settings.mqtt.host}:{settings.mqtt.port} "
            f"({topics.status}): the agent has not connected to this broker yet, or device_id/topic_prefix differ"
        )
    now = time.time()
    summary = {**view.row(now, fleet_settings(settings).stale_after_s), **_extra(view, now)}
    if args.json:
        print(json.dumps({"device_id": topics.device_id, "summary": summary, "status": view.status,
                          "telemetry": view.telemetry or None}, indent=2, ensure_ascii=False))
    else:
        print(render_status(summary, view, now))
    return 0


def read_view(op: Operator, topics: DeviceTopics, timeout: float) -> DeviceView:
    """Subscribe to the device's status and telemetry and collect the retained copies (raises TransportError)."""
    op.start([topics.status, topics.telemetry], timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = op.devices.get(topics.device_id)
            if view is not None and view.status and view.telemetry:
                break
            if op.next_message(min(QUIET_S, max(0.0, deadline - time.monotonic()))) is None:
                break
    finally:
        op.stop()
    return op.devices.get(topics.device_id) or DeviceView(topics.device_id)


def _extra(view: DeviceView, now: float) -> dict[str, Any]:
    s, t = view.status, view.reading
    ts, uptime = t.get("ts"), t.get("uptime_s")
    age = now - ts if isinstance(ts, int | float) else None
    if age is not None and isinstance(uptime, int | float) and view.state in LIVE_STATES:
        uptime += age  # still running since that reading
    return {
        "telemetry_age_s": round(age, 1) if age is not None else None,
        "uptime_s": round(uptime, 1) if isinstance(uptime, int | float) else None,
        "since": s.get("since"),
        "detail": s.get("detail"),
        "version": s.get("version"),
        "n_ctx": s.get("n_ctx"),
        "threads": t.get("threads") if t.get("threads") is not None else s.get("threads"),
        "requests_served": t.get("requests_served"),
        "requests_failed": t.get("requests_failed"),
        "commands": s.get("commands"),
    }


def render_status(summary: dict[str, Any], view: DeviceView, now: float) -> str:
    """A few aligned lines: state, model, mode, queue, uptime (telemetry ones only when there is telemetry)."""
    state = str(summary["state"])
    if summary.get("stale"):
        state += " (stale: no telemetry lately)"
    if isinstance(summary.get("since"), int | float):
        state += f", since {_duration(now - summary['since'])} ago"
    rows = [("device", str(summary["device_id"]) + (f" (groups: {', '.join(view.groups)})" if view.groups else "")),
            ("state", state)]
    if summary.get("detail"):
        rows.append(("detail", str(summary["detail"])))
    model = " ".join(str(v) for v in (summary.get("model"), summary.get("quant")) if v) or "-"
    if summary.get("n_ctx"):
        model += f", n_ctx {summary['n_ctx']}"
    if summary.get("threads"):
        model += f", {summary['threads']} threads"
    rows += [("model", model), ("mode", str(summary.get("mode") or "-"))]
    if summary.get("commands"):
        rows.append(("commands", COMMAND_POLICIES.get(str(summary["commands"]), str(summary["commands"]))))
    if view.telemetry:
        queue = summary.get("queue")
        rows.append(("queue", "-" if queue is None else f"{queue:.0f}"))
        uptime = summary.get("uptime_s")
        rows.append(("uptime", "-" if uptime is None else _duration(float(uptime))))
        if summary.get("requests_served") is not None:
            served, failed = summary["requests_served"], summary.get("requests_failed") or 0
            rows.append(("requests", f"{served} served, {failed} failed"))
        if summary.get("telemetry_age_s") is not None:
            rows.append(("telemetry", f"{_duration(float(summary['telemetry_age_s']))} ago"))
    else:
        rows.append(("telemetry", "none retained"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"
