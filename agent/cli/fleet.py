"""``edge-agent fleet ls|cmd|watch|ask|keygen``: see and steer a fleet of devices through the broker.

The operator side of the fleet protocol (docs/fleet.md). The device list comes from the retained
``{prefix}/+/status`` and ``{prefix}/+/telemetry`` messages; command results are collected from
``{prefix}/+/cmd/result`` by command id, so one copy of each result reaches the operator.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cli.config_cmd import add_config_argument
from agent.config.fleet import FleetSettings
from agent.errors import AgentError, BadRequestError, DeadlineExceededError, TransportError
from agent.fleet.signing import load_private_key, write_keypair
from agent.fleet.wire import build_command
from agent.settings import Settings, load_settings
from agent.transport.mqtt import Incoming, LinkEvent, MqttLink
from agent.transport.telemetry import read_telemetry
from agent.transport.topics import (
    FleetWideTopics,
    Scope,
    command_topic,
    is_result_topic,
    parse_target,
    result_topic,
)
from agent.transport.wire import LIVE_STATES, decode_object


def fleet_settings(settings: Settings) -> FleetSettings:
    """The ``[fleet]`` section (defaults when the running build's Settings has none)."""
    section = getattr(settings, "fleet", None)
    return section if isinstance(section, FleetSettings) else FleetSettings.model_validate({})


# -- what the operator sees -----------------------------------------------------------------------


@dataclass
class DeviceView:
    """One device as seen from its retained status and latest telemetry."""

    device_id: str
    status: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        return str(self.status.get("state", "?"))

    @property
    def groups(self) -> list[str]:
        groups = self.status.get("groups")
        return [str(g) for g in groups] if isinstance(groups, list) else []

    @property
    def reading(self) -> dict[str, Any]:
        """The telemetry fields this version knows, typed by the telemetry model (others left out)."""
        return read_telemetry(self.telemetry)

    @property
    def last_seen(self) -> float | None:
        """Newest timestamp the device itself put in its status or telemetry (unix seconds)."""
        stamps = [self.reading.get("ts"), _number(self.status, "since")]
        known = [s for s in stamps if s is not None]
        return max(known) if known else None

    def stale(self, now: float, stale_after_s: float) -> bool:
        """Live but silent: telemetry stopped arriving for ``stale_after_s`` (the will covers dead links)."""
        ts = self.reading.get("ts")
        return self.state in LIVE_STATES and ts is not None and now - ts > stale_after_s

    def row(self, now: float, stale_after_s: float) -> dict[str, Any]:
        t, s = self.reading, self.status
        seen = self.last_seen
        queue = t.get("queue_depth")
        return {
            "device_id": self.device_id,
            "groups": self.groups,
            "state": self.state,
            "model": s.get("model") or t.get("model"),
            "quant": s.get("quant") or t.get("quant"),
            "temp_c": t.get("temperature_c"),
            "battery_pct": t.get("battery_percent"),
            "queue": float(queue) if queue is not None else None,
            "mode": t.get("mode") or s.get("mode"),
            "last_seen_s": round(now - seen, 1) if seen is not None else None,
            "stale": self.stale(now, stale_after_s),
        }


@dataclass
class CommandRun:
    """What came back for one command: results by device, with arrival latency."""

    command_id: str
    topic: str
    expected: set[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    issued_at: float = 0.0

    @property
    def missing(self) -> list[str]:
        return sorted(self.expected - set(self.results))

    @property
    def failed(self) -> list[str]:
        return sorted(d for d, r in self.results.items() if not r.get("ok"))

    @property
    def succeeded(self) -> bool:
        return not self.failed and not self.missing and bool(self.results)

    def summary(self) -> dict[str, Any]:
        return {
            "ok": len(self.results) - len(self.failed),
            "failed": len(self.failed),
            "no_answer": len(self.missing),
            "expected": len(self.expected),
            "elapsed_s": round(self.elapsed_s, 3),
        }


class Operator:
    """An operator's MQTT connection: device list from retained messages, commands and their results."""

    def __init__(self, settings: Settings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.prefix = settings.mqtt.topic_prefix
        self.topics = FleetWideTopics(self.prefix)
        self.client_id = client_id or f"edge-fleet-{uuid.uuid4().hex[:12]}"
        self.events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self.link = MqttLink(settings.mqtt, self.client_id, self.events.put)
        self.devices: dict[str, DeviceView] = {}

    def start(self, subscriptions: Iterable[str], timeout: float = 15.0) -> None:
        """Subscribe (QoS 1) and connect; raises TransportError when the broker is unreachable."""
        self.link.subscribe([(t, 1) for t in subscriptions])
        self.link.start()
        if not self.link.wait_connected(timeout):
            raise TransportError(f"no connection to {self.settings.mqtt.host}:{self.settings.mqtt.port}")
        if not self.link.wait_subscribed(5.0):
            raise TransportError("the broker did not acknowledge the subscriptions")

    def stop(self) -> None:
        self.link.stop(timeout=2.0)

    @property
    def status_filter(self) -> str:
        return self.topics.all_status

    @property
    def telemetry_filter(self) -> str:
        return self.topics.all_telemetry

    def next_message(self, timeout: float) -> Incoming | None:
        """The next PUBLISH (status/telemetry are folded into :attr:`devices` on the way), or None."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if isinstance(event, Incoming):
                self._observe(event)
                return event

    def settle(self, quiet_s: float = 0.3, max_s: float = 3.0) -> dict[str, DeviceView]:
        """Absorb retained messages until the stream is quiet for ``quiet_s`` (bounded by ``max_s``)."""
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            if self.next_message(min(quiet_s, deadline - time.monotonic())) is None:
                break
        return self.devices

    def _observe(self, message: Incoming) -> None:
        report = self.topics.report(message.topic)
        if report is None:
            return
        device_id, kind = report
        try:
            data = decode_object(message.payload)  # nesting checked first: json.loads recursing could raise
        except AgentError:
            return
        view = self.devices.setdefault(device_id, DeviceView(device_id))
        if kind == "status":
            view.status = data
        else:
            view.telemetry = data

    def expected_for(self, scope: Scope, value: str | None) -> set[str]:
        """Devices that should answer: the named one, or the live ones (in the group) by retained status."""
        if scope == "device":
            return {value} if value else set()
        live = [v for v in self.devices.values() if v.state in LIVE_STATES]
        if scope == "group":
            return {v.device_id for v in live if value in v.groups}
        return {v.device_id for v in live}

    def command(
        self,
        scope: Scope,
        value: str | None,
        name: str,
        args: Mapping[str, Any],
        *,
        timeout: float,
        key: Any = None,
        ttl_s: float | None = None,
        expected: set[str] | None = None,
        command_id: str | None = None,
    ) -> CommandRun:
        """Publish one command and collect results until every expected device answered or ``timeout``.

        Needs the result filter (and for group/all targets the status filter) subscribed via :meth:`start`.
        """
        payload = build_command(name, args, scope, value, key=key, ttl_s=ttl_s, command_id=command_id)
        topic = command_topic(self.prefix, scope, value, name)
        run = CommandRun(payload["id"], topic, expected if expected is not None else self.expected_for(scope, value),
                         issued_at=payload["issued_at"])
        started = time.monotonic()
        deadline = started + timeout
        self.link.publish(topic, json.dumps(payload).encode(), qos=1)
        while time.monotonic() < deadline:
            if run.expected and run.expected <= set(run.results):
                break
            message = self.next_message(deadline - time.monotonic())
            if message is None or not is_result_topic(message.topic):
                continue
            try:
                body = json.loads(message.payload)
            except ValueError:
                continue
            if isinstance(body, dict) and body.get("id") == run.command_id and isinstance(body.get("device_id"), str):
                device = body["device_id"]
                if device not in run.results:
                    run.results[device] = body
                    run.latency_s[device] = time.monotonic() - started
        run.elapsed_s = time.monotonic() - started
        return run

    def result_filter(self, scope: Scope, value: str | None) -> str:
        return result_topic(self.prefix, value) if scope == "device" and value else self.topics.all_results


# -- argparse --------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    fleet = subparsers.add_parser(
        "fleet",
        help="see and steer a fleet of devices over MQTT",
        description="Operator commands for many devices sharing one broker (docs/fleet.md).",
    )
    add_config_argument(fleet)
    inner = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")

    ls = inner.add_parser("ls", help="list devices from retained status and telemetry")
    _config_again(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--wait", type=float, default=3.0, help="most seconds to wait for retained messages")
    ls.set_defaults(func=_ls)

    cmd = inner.add_parser("cmd", help="send a command to a device, a group or all devices and collect results")
    _config_again(cmd)
    cmd.add_argument("target", help="device id, 'group:NAME', 'device:ID' or 'all'")
    cmd.add_argument("name", help="command: ping, status, plan, set-model, pull, reload, config-get, config-set, "
                                  "drain, resume, restart")
    cmd.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                     help="command argument; VALUE is parsed as JSON when it can be (4, true, null, [..]), "
                          "else taken as a string. Repeatable.")
    cmd.add_argument("--timeout", type=float, default=None, help="seconds to wait for results "
                                                                 "(default [fleet] command_timeout_s)")
    cmd.add_argument("--ttl", type=float, default=None,
                     help="devices refuse the command this many seconds after it was issued (default: --timeout)")
    cmd.add_argument("--key", type=Path, default=None, help="sign with this Ed25519 private key "
                                                            "(default [fleet] private_key)")
    cmd.add_argument("--id", dest="command_id", default=None, help="command id (default: random); reuse to retry")
    cmd.add_argument("--json", action="store_true", help="print JSON")
    cmd.set_defaults(func=_cmd)

    watch = inner.add_parser("watch", help="live telemetry table (or JSON lines)")
    _config_again(watch)
    watch.add_argument("--json", action="store_true", help="print each status/telemetry message as a JSON line")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between table refreshes")
    watch.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = never)")
    watch.set_defaults(func=_watch)

    ask = inner.add_parser("ask", help="ask the fleet (load-balanced: exactly one device answers)")
    _config_again(ask)
    ask.add_argument("question", help="the question (sent as a chat message)")
    ask.add_argument("--max-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, help="default: the answering model's")
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    ask.add_argument("--json", action="store_true", help="print the final reply as JSON")
    ask.set_defaults(func=_ask)

    keygen = inner.add_parser("keygen", help="create the fleet's Ed25519 key pair for signed commands")
    keygen.add_argument("--out", type=Path, required=True, help="directory for fleet_key.pem and fleet_pubkey.pem")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(func=_keygen)


def _config_again(parser: argparse.ArgumentParser) -> None:
    # Accept --config after the action too; SUPPRESS keeps a value given before the action.
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (broker settings)")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, required=args.config is not None)


def parse_args_list(items: Iterable[str]) -> dict[str, Any]:
    """``["key=inference.max_queue", "value=4"]`` → ``{"key": "inference.max_queue", "value": 4}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BadRequestError(f"--arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


# -- ls / watch ------------------------------------------------------------------------------------

COLUMNS = ("device_id", "groups", "state", "model", "quant", "temp_c", "battery_pct", "queue", "mode", "last_seen_s")
HEADERS = ("DEVICE", "GROUPS", "STATE", "MODEL", "QUANT", "TEMP°C", "BATT%", "QUEUE", "MODE", "SEEN")


def render_devices(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table; stale devices carry '(stale)' after their state."""
    cells = [list(HEADERS)]
    for row in rows:
        line = []
        for col in COLUMNS:
            value = row.get(col)
            if col == "groups":
                value = ",".join(value) if value else "-"
            elif col == "state" and row.get("stale"):
                value = f"{value} (stale)"
            elif col == "last_seen_s" and value is not None:
                value = f"{value:.0f}s ago"
            line.append("-" if value is None else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _rows(op: Operator) -> list[dict[str, Any]]:
    now = time.time()
    stale_after = fleet_settings(op.settings).stale_after_s
    return [op.devices[d].row(now, stale_after) for d in sorted(op.devices)]


def _ls(args: argparse.Namespace) -> int:
    op = Operator(_settings(args))
    op.start([op.status_filter, op.telemetry_filter])
    try:
        op.settle(max_s=args.wait)
    finally:
        op.stop()
    rows = _rows(op)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(render_devices(rows))
        live = sum(1 for r in rows if r["state"] in LIVE_STATES)
        stale = sum(1 for r in rows if r["stale"])
        print(f"{len(rows)} devices: {live} live, {len(rows) - live} offline, {stale} stale")
    return 0


def _watch(args: argparse.Namespace) -> int:
    op = Operator(_settings(args))
    op.start([op.status_filter, op.telemetry_filter])
    end = time.monotonic() + args.duration if args.duration > 0 else float("inf")
    next_draw = time.monotonic()
    tty = sys.stdout.isatty()
    try:
        while time.monotonic() < end:
            message = op.next_message(min(0.2, max(0.0, end - time.monotonic())))
            if args.json and message is not None:
                try:
                    data = json.loads(message.payload)
                except ValueError:
                    continue
                print(json.dumps({"topic": message.topic, "data": data}, ensure_ascii=False), flush=True)
            elif not args.json and time.monotonic() >= next_draw:
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(render_devices(_rows(op)) + "\n", flush=True)
                next_draw = time.monotonic() + args.interval
    except KeyboardInterrupt:
        pass
    finally:
        op.stop()
    return 0


# -- cmd -------------------------------------------------------------------------------------------


def _cmd(args: argparse.Namespace) -> int:
    settings = _settings(args)
    fleet = fleet_settings(settings)
    try:
        scope, value = parse_target(args.target)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc
    command_args = parse_args_list(args.arg)
    key_path = args.key or fleet.private_key
    key = load_private_key(key_path) if key_path else None
    timeout = args.timeout if args.timeout is not None else fleet.command_timeout_s
    op = Operator(settings)
    subscriptions = [op.result_filter(scope, value)]
    if scope != "device":
        subscriptions.append(op.status_filter)
    op.start(subscriptions)
    try:
        if scope != "device":
            op.settle()
        run = op.command(scope, value, args.name, command_args, timeout=timeout, key=key,
                         ttl_s=args.ttl if args.ttl is not None else timeout, command_id=args.command_id)
    finally:
        op.stop()
    if args.json:
        print(json.dumps(_run_json(run, args.target, args.name), indent=2, ensure_ascii=False))
    else:
        print(render_run(run))
    return 0 if run.succeeded else 1


def _run_json(run: CommandRun, target: str, name: str) -> dict[str, Any]:
    return {
        "id": run.command_id,
        "target": target,
        "cmd": name,
        "results": [{**run.results[d], "latency_ms": round(run.latency_s[d] * 1000, 1)} for d in sorted(run.results)],
        "no_answer": run.missing,
        "summary": run.summary(),
    }


def render_run(run: CommandRun) -> str:
    """One line per device (answered or expected), then the summary line."""
    lines = []
    devices = sorted(set(run.results) | run.expected)
    width = max([len(d) for d in devices] + [6])
    lines.append(f"{'DEVICE'.ljust(width)}  {'OK'.ljust(9)}  {'MS'.rjust(7)}  RESULT")
    for device in devices:
        body = run.results.get(device)
        if body is None:
            lines.append(f"{device.ljust(width)}  {'no answer'.ljust(9)}  {'-'.rjust(7)}  -")
            continue
        ms = f"{run.latency_s[device] * 1000:.0f}"
        if body.get("ok"):
            text = json.dumps(body.get("result"), ensure_ascii=False, separators=(",", ":"))
            status = "ok (dup)" if body.get("duplicate") else "ok"
        else:
            error = body.get("error") or {}
            text = f"{error.get('code')}: {error.get('message')}"
            status = "FAILED"
        if len(text) > 100:
            text = text[:97] + "..."
        lines.append(f"{device.ljust(width)}  {status.ljust(9)}  {ms.rjust(7)}  {text}")
    s = run.summary()
    lines.append(f"{s['ok']} ok, {s['failed']} failed, {s['no_answer']} no answer "
                 f"({s['expected']} expected) in {s['elapsed_s']:.2f} s  [id {run.command_id}]")
    return "\n".join(lines)


# -- ask / keygen ----------------------------------------------------------------------------------


def _ask(args: argparse.Namespace) -> int:
    settings = _settings(args)
    op = Operator(settings)
    reply = op.topics.reply(op.client_id)
    op.start([reply])
    request_id = uuid.uuid4().hex
    body: dict[str, Any] = {"id": request_id, "messages": [{"role": "user", "content": args.question}],
                            "max_tokens": args.max_tokens}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    v5 = settings.mqtt.protocol == "5"
    if not v5:
        body["reply_to"] = reply
    try:
        # A message expiry as long as we wait: a device that is down with our request queued in its
        # session answers 'timeout' when it returns instead of working on a question nobody awaits.
        op.link.publish(op.topics.infer, json.dumps(body).encode(), qos=1,
                        response_topic=reply if v5 else None, correlation_data=request_id.encode() if v5 else None,
                        message_expiry_s=max(1, int(args.timeout)) if v5 else None)
        deadline = time.monotonic() + args.timeout
        final: dict[str, Any] | None = None
        while final is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError("no device answered before the timeout")
            message = op.next_message(remaining)
            if message is None or message.topic != reply:
                continue
            try:
                data = json.loads(message.payload)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("id") == request_id and data.get("done"):
                final = data
    finally:
        op.stop()
    if args.json:
        print(json.dumps(final, indent=2, ensure_ascii=False))
        return 0 if "error" not in final else 1
    if "error" in final:
        error = final["error"]
        raise AgentError(f"{error.get('code')}: {error.get('message')} (device {final.get('device_id')})")
    print(final.get("text", ""))
    print(f"(answered by {final.get('served_by') or final.get('device_id')})", file=sys.stderr)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    private, public = write_keypair(args.out, force=args.force)
    print(f"private key: {private} (mode 0600; keep it on the operator's machine)")
    print(f"public key:  {public}")
    print("devices: set [fleet] public_key, or LoadCredential=fleet_pubkey:<path> in the unit")
    return 0


def _number(data: Mapping[str, Any], *names: str) -> float | None:
    for name in names:
        value = data.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None
