"""Fuzz the real daemon over a real Mosquitto: hostile messages on every topic it consumes, for a budget.

    python bench/fuzz.py [--messages N] [--seconds S] [--seed N] [--valid-every 50] [--window 256]
                         [--burst-every 2000] [--out DIR] [--log-level error]

Starts a private Mosquitto and the real daemon (``python -m agent run``) serving a tiny random-weight
GGUF (tests/support/tiny_gguf.py) on one thread, then publishes until ``--messages`` or ``--seconds``
runs out: mutations of valid requests, cancels and commands (tests/fuzz/payloads.py: bit flips,
truncation, deep nesting, huge strings, wrong types, unicode edge cases, invalid UTF-8, lone surrogates,
numbers past every limit, random bytes) on the infer, infer/cancel, device/group/fleet command and
fleet-share topics and on topics nobody serves; MQTT 5 Response Topics (valid, empty, wildcard, 60 KB),
Correlation Data (none, empty, 4 KB), Message Expiry (0, 1, 2^32-1) and User Properties, or MQTT 3.1.1
with ``reply_to`` in the payload; QoS 0 and 1; bursts of valid requests past the queue. One message in
``--valid-every`` is a valid request (small ``max_tokens``) whose answer is checked.

Every message gets its own reply address (``fuzz/<run>/r/<n>``), so replies are counted per message.
Checks, each a non-zero exit when violated:

* the daemon never crashed or restarted (same PID, alive, no crash events in its log);
* every message that must be answered (a concrete Response Topic on infer, a malformed cancel, a
  command for this device) got exactly one final reply, and nothing else more than one; no chunk
  after a final; no ``internal`` error (a handler failed: a bug);
* every valid request got a correct final answer (its id, ``max_tokens`` tokens, the streamed chunks
  adding up to the text) or ``overloaded`` (counted apart: the queue's answer to a burst);
* every command for this device was reported once on its result topic;
* the daemon's RSS grew less than ``--max-drift`` % over the second half of the run. A leak grows
  steadily; the daemon's bounded caches (10,000 request ids for deduplication, 1,000 command results)
  fill during the first ~70,000 messages of this mix, so the check means something from ~150,000
  messages on. The curve goes to ``rss.csv`` (a PNG too when matplotlib is installed).

Where an answer may legitimately be missing it is only checked to be at most one: the fleet share
(the daemon leaves it while saturated), Message Expiry 1 s (the broker may expire it first), and a
``reply_to`` inside a payload that the mutation may have broken.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from tests.fuzz.payloads import mutate, valid_cancel, valid_command, valid_request  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.daemon import Client, DaemonProcess, write_config  # noqa: E402
from tests.support.tiny_gguf import write_tiny_llama  # noqa: E402

DEVICE, PREFIX, GROUP = "dev1", "edge", "fuzz"
RESULT = f"{PREFIX}/{DEVICE}/cmd/result"
STATUS = f"{PREFIX}/{DEVICE}/status"
CRASH_EVENTS = ("handler_crashed", "request_crashed", "fleet_command_crashed", "relay_crashed", "refuse_failed",
                "message_dropped", "telemetry_tick_failed", "quarantine_charge_failed")
MAX_TOKENS_LIMIT = 8

# What a message must get on its own reply address.
NONE, ONE, AT_MOST_ONE = 0, 1, 2
# Kinds of message, for the summary.
KINDS = ("infer", "infer_valid", "fleet_share", "cancel", "cmd", "unserved_topic")


@dataclass
class Checked:
    """A valid request whose answer is verified."""

    rid: str
    max_tokens: int
    stream: bool
    deltas: list[str] = field(default_factory=list)


class Tracker:
    """Counts replies per message (paho's thread) and keeps the send window (main thread)."""

    def __init__(self, namespace: str, capacity: int) -> None:
        self.ns = namespace
        self.expect = bytearray(capacity)
        self.finals = bytearray(capacity)
        self.is_cmd = bytearray(capacity)
        self.tags: dict[int, str] = {}  # reply_to-in-payload addresses carry a tag the mutation may break
        self.checked: dict[int, Checked] = {}
        self.lock = threading.Condition()
        self.outstanding: dict[int, str] = {}  # ONE messages not answered yet -> what was sent
        self.violations: list[str] = []
        self.violation_counts: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()  # final replies of fuzz messages by error code ('answer' = served)
        self.valid: Counter[str] = Counter()  # checked valid requests: served / overloaded / failed
        self.results_got = 0
        self.result_ids: Counter[Any] = Counter()
        self.status_msgs = 0
        self.stray = 0  # replies on an address a mutation made up (a broken reply_to tag)
        self.replies = 0

    def violation(self, kind: str, detail: str) -> None:
        self.violation_counts[kind] += 1
        if len(self.violations) < 40:
            self.violations.append(f"{kind}: {detail}")

    # -- paho's network thread ---------------------------------------------------------------------

    def on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._on_message(msg.topic, msg.payload)
        except Exception as exc:  # never let the tracker kill paho's thread; a violation is a finding
            self.violation("tracker_error", f"{type(exc).__name__}: {exc}")

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == RESULT:
            with self.lock:
                self.results_got += 1
                # Our own hostile messages land here too (the "result" command name): parse defensively.
                with contextlib.suppress(ValueError, AttributeError, TypeError, RecursionError):
                    self.result_ids[json.loads(payload).get("id")] += 1
            return
        if topic == STATUS:
            with self.lock:
                self.status_msgs += 1
            return
        levels = topic[len(self.ns) + 1:].split("/")
        if len(levels) < 2 or levels[0] not in ("r", "p") or not levels[1].isdigit():
            with self.lock:
                self.stray += 1
            return
        n = int(levels[1])
        if levels[0] == "p" and (len(levels) < 3 or self.tags.get(n) != levels[2]):
            with self.lock:
                self.stray += 1
            return
        self._reply(n, payload)

    def _reply(self, n: int, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            self.violation("reply_not_json", f"#{n}: {payload[:120]!r}")
            return
        with self.lock:
            self.replies += 1
            final = bool(self.is_cmd[n]) or bool(body.get("done"))
            if not final:
                if self.finals[n]:
                    self.violation("chunk_after_final", f"#{n}")
                elif n in self.checked:
                    self.checked[n].deltas.append(body.get("delta", ""))
                return
            self.finals[n] = min(255, self.finals[n] + 1)
            if self.finals[n] > 1:
                self.violation("answered_twice", f"#{n}: {payload[:160]!r}")
                return
            if self.expect[n] == NONE:
                self.violation("answered_unasked", f"#{n}: {payload[:160]!r}")
            self.outstanding.pop(n, None)
            self.lock.notify_all()
            error = body.get("error") if isinstance(body, dict) else None
            code = (error or {}).get("code", "?") if error is not None else "answer"
            if n in self.checked:
                self._check_valid(n, body, code)
            else:
                self.codes[code] += 1
                if code == "internal":
                    self.violation("internal_error", f"#{n}: {payload[:200]!r}")

    def _check_valid(self, n: int, body: dict[str, Any], code: str) -> None:
        want = self.checked.pop(n)
        if code == "overloaded":
            self.valid["overloaded"] += 1
            return
        ok = (code == "answer" and body.get("id") == want.rid and body.get("finish_reason") == "length"
              and body.get("usage", {}).get("completion_tokens") == want.max_tokens
              and isinstance(body.get("text"), str) and body["text"]
              and (not want.stream or "".join(want.deltas) == body["text"]))
        self.valid["served" if ok else "wrong"] += 1
        if not ok:
            self.violation("valid_request_wrong", f"#{n} {want}: {json.dumps(body)[:200]}")

    # -- main thread -------------------------------------------------------------------------------

    def sent(self, n: int, expect: int, what: str, *, cmd: bool = False, checked: Checked | None = None) -> None:
        with self.lock:
            self.expect[n] = expect
            self.is_cmd[n] = cmd
            if checked is not None:
                self.checked[n] = checked
            if expect == ONE and not self.finals[n]:
                self.outstanding[n] = what

    def wait_window(self, window: int, stall_s: float) -> bool:
        """Block while ``window`` or more must-answer messages are unanswered; False after ``stall_s``
        without a single answer (the daemon stopped answering)."""
        with self.lock:
            while len(self.outstanding) >= window:
                before = self.replies
                self.lock.wait(stall_s)
                if self.replies == before and len(self.outstanding) >= window:
                    return False
        return True


@dataclass
class Plan:
    """How one message is sent."""

    topic: str
    payload: bytes
    v5: bool
    qos: int
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry: int | None = None
    user_props: list[tuple[str, str]] | None = None


class Fuzzer:
    def __init__(self, args: argparse.Namespace, port: int, tracker: Tracker, rng: random.Random) -> None:
        self.args = args
        self.rng = rng
        self.t = tracker
        self.ns = tracker.ns
        self.recent_ids: deque[str] = deque(maxlen=16)
        self.kinds: Counter[str] = Counter()
        self.mutations: Counter[str] = Counter()
        self.results_expected = 0
        self.results_maybe = 0
        self.disconnects: list[str] = []
        self.closing = False
        self.own_results = 0
        self.all_cmds: dict[str, str] = {}
        self.cmd_ids: dict[str, str] = {}  # id -> topic, for commands whose result must come
        self.pub5 = self._client(port, paho.MQTTv5, "fuzz-pub5")
        self.pub3 = self._client(port, paho.MQTTv311, "fuzz-pub3")

    def _client(self, port: int, protocol: int, name: str) -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}",
                        protocol=protocol)
        c.max_inflight_messages_set(200)
        c.max_queued_messages_set(0)
        c.on_disconnect = lambda *a: None if self.closing else self.disconnects.append(f"{name}: {a[3]}")
        c.on_socket_open = lambda c_, u, s: s.setsockopt(6, 1, 1)  # TCP_NODELAY
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c

    def close(self) -> None:
        self.closing = True
        for c in (self.pub5, self.pub3):
            c.disconnect()
            c.loop_stop()

    # -- one message -------------------------------------------------------------------------------

    def send(self, n: int) -> None:
        rng = self.rng
        if n % self.args.valid_every == self.args.valid_every - 1:
            self.valid(n)
            return
        roll = rng.random()
        if roll < 0.62:
            self._infer(n, f"{PREFIX}/{DEVICE}/infer", "infer")
        elif roll < 0.70:
            self._infer(n, f"{PREFIX}/fleet/infer", "fleet_share")
        elif roll < 0.82:
            self._cancel(n)
        elif roll < 0.97:
            self._command(n)
        else:
            self._unserved(n)

    def _address(self, n: int, v5: bool) -> tuple[str | None, str | None, int]:
        """(response topic, reply_to for the payload, expectation if the payload stays valid)."""
        if not v5:
            tag = uuid.uuid4().hex[:6]
            self.t.tags[n] = tag
            return None, f"{self.ns}/p/{n}/{tag}", AT_MOST_ONE
        roll = self.rng.random()
        if roll < 0.86:
            return f"{self.ns}/r/{n}", None, ONE
        if roll < 0.90:
            return f"{self.ns}/r/{n}/" + "x" * self.rng.choice((1000, 30_000, 60_000)), None, ONE
        if roll < 0.94:
            return f"{self.ns}/r/{n}/+", None, NONE  # wildcard: not an address; nothing may come
        if roll < 0.97:
            return "", None, NONE  # empty: as if none
        return None, None, NONE

    def _props(self, plan: Plan) -> Plan:
        rng = self.rng
        if not plan.v5:
            return plan
        r = rng.random()
        if r < 0.3:
            plan.correlation = None
        else:
            plan.correlation = b"" if r < 0.35 else rng.randbytes(4096 if r < 0.38 else rng.randrange(1, 33))
        r = rng.random()
        plan.expiry = None if r < 0.85 else 0 if r < 0.9 else 1 if r < 0.95 else (1 << 32) - 1
        if rng.random() < 0.1:
            plan.user_props = [("k", "v"), ("", ""), ("\U0001f600" * 10, "x" * rng.choice((1, 1000)))]
        return plan

    def _infer(self, n: int, topic: str, kind: str) -> None:
        rng = self.rng
        v5 = rng.random() < 0.85
        response_topic, reply_to, expect = self._address(n, v5)
        if response_topic == "" and rng.random() < 0.5:  # empty Response Topic, reply_to in the payload
            tag = uuid.uuid4().hex[:6]
            self.t.tags[n] = tag
            reply_to, expect = f"{self.ns}/p/{n}/{tag}", AT_MOST_ONE
        rid = uuid.uuid4().hex
        self.recent_ids.append(rid)
        body = valid_request(rng, rid, max_tokens=rng.randint(1, 4), reply_to=reply_to)
        r = rng.random()
        if r < 0.85:
            mutation, payload = mutate(rng, body)
        elif r < 0.93:
            mutation, payload = "random_bytes", rng.randbytes(rng.choice((0, 1, 16, 300, 5000)))
        else:
            mutation, payload = "none", json.dumps(body).encode()
        self.mutations[mutation] += 1
        plan = self._props(Plan(topic, payload, v5, rng.choice((0, 1)), response_topic))
        if plan.expiry == 1 and expect == ONE:
            expect = AT_MOST_ONE  # the broker may expire it before the daemon gets it
        if kind == "fleet_share" and expect == ONE:
            expect = AT_MOST_ONE  # the daemon leaves the share while its queue is full
        self.kinds[kind] += 1
        self.t.sent(n, expect, self._what(plan, mutation))
        self._publish(plan)

    def valid(self, n: int) -> None:
        rng = self.rng
        rid = f"v{n}-{uuid.uuid4().hex[:8]}"
        max_tokens = rng.randint(1, 3)
        body = valid_request(rng, rid, max_tokens=max_tokens)
        body.pop("stop", None)  # a stop sequence could end the text early; the check wants max_tokens
        v5 = rng.random() < 0.8
        if v5:
            plan = Plan(f"{PREFIX}/{DEVICE}/infer", json.dumps(body).encode(), True, 1, f"{self.ns}/r/{n}",
                        rng.randbytes(8))
        else:
            tag = uuid.uuid4().hex[:6]
            self.t.tags[n] = tag
            body["reply_to"] = f"{self.ns}/p/{n}/{tag}"
            plan = Plan(f"{PREFIX}/{DEVICE}/infer", json.dumps(body).encode(), False, 1)
        self.kinds["infer_valid"] += 1
        self.t.sent(n, ONE, self._what(plan, "valid"), checked=Checked(rid, max_tokens, bool(body.get("stream"))))
        self._publish(plan)

    def _cancel(self, n: int) -> None:
        rng = self.rng
        rid = rng.choice((*self.recent_ids, "nope", uuid.uuid4().hex)) if self.recent_ids else "nope"
        body = valid_cancel(rid)
        if rng.random() < 0.75:
            mutation, payload = mutate(rng, body)
        else:
            mutation, payload = "none", json.dumps(body).encode()
        self.mutations[f"cancel:{mutation}"] += 1
        v5 = rng.random() < 0.9
        response_topic, _, expect = self._address(n, v5) if v5 else (None, None, NONE)
        plan = self._props(Plan(f"{PREFIX}/{DEVICE}/infer/cancel", payload, v5, rng.choice((0, 1)), response_topic))
        # A valid cancel is acknowledged without a reply; a malformed one is answered on the Response Topic.
        if expect != NONE:
            expect = NONE if cancel_is_valid(payload) else expect
            if plan.expiry == 1 and expect == ONE:
                expect = AT_MOST_ONE
        self.kinds["cancel"] += 1
        self.t.sent(n, expect, self._what(plan, mutation))
        self._publish(plan)

    def _command(self, n: int) -> None:
        rng = self.rng
        name = rng.choice(("ping", "ping", "status", "config-get", "nosuch", "result", ""))
        scope = rng.choice((f"{PREFIX}/{DEVICE}/cmd", f"{PREFIX}/group/{GROUP}/cmd", f"{PREFIX}/fleet/cmd",
                            f"{PREFIX}/group/other/cmd"))
        ours = name not in ("result", "") and not scope.endswith("/other/cmd")
        v5 = rng.random() < 0.85
        response_topic, reply_to, expect = self._address(n, v5)
        cid = uuid.uuid4().hex
        body = valid_command(rng, cid, reply_to=reply_to)
        if rng.random() < 0.7:
            mutation, payload = mutate(rng, body)
        else:
            mutation, payload = "none", json.dumps(body).encode()
        self.mutations[f"cmd:{mutation}"] += 1
        plan = self._props(Plan(f"{scope}/{name}", payload, v5, rng.choice((0, 1)), response_topic))
        if not ours:
            expect = NONE
        elif plan.expiry == 1:  # the broker may expire it before the daemon gets it
            expect = AT_MOST_ONE if expect else NONE
            self.results_maybe += 1
        else:
            self.results_expected += 1
            self.cmd_ids[cid] = f"{scope}/{name} {mutation}"
        self.all_cmds[cid] = f"#{n} {scope}/{name} {mutation} ours={ours} expiry={plan.expiry} qos={plan.qos}"
        if plan.topic == RESULT:
            self.own_results += 1  # our own message on the daemon's result topic: the listener hears it too
        self.kinds["cmd"] += 1
        self.t.sent(n, expect, self._what(plan, mutation), cmd=True)
        self._publish(plan)

    def _unserved(self, n: int) -> None:
        rng = self.rng
        topic = rng.choice((f"{PREFIX}/{DEVICE}/infer/x", f"{PREFIX}/dev2/infer", f"{PREFIX}/{DEVICE}/cmd/ping/x",
                            f"{PREFIX}/group/{GROUP}/infer", f"{PREFIX}/{DEVICE}"))
        payload = json.dumps(valid_request(rng, uuid.uuid4().hex)).encode()
        self.kinds["unserved_topic"] += 1
        self.t.sent(n, NONE, "")
        self._publish(self._props(Plan(topic, payload, True, rng.choice((0, 1)), f"{self.ns}/r/{n}")))

    @staticmethod
    def _what(plan: Plan, mutation: str) -> str:
        """One line saying what was sent (kept only while an answer is awaited)."""
        rt = None if plan.response_topic is None else len(plan.response_topic)
        return (f"{plan.topic} {mutation} qos={plan.qos} v5={plan.v5} rt_len={rt} expiry={plan.expiry} "
                f"corr={None if plan.correlation is None else len(plan.correlation)} bytes={len(plan.payload)} "
                f"payload={plan.payload[:100]!r}")

    def _publish(self, plan: Plan) -> None:
        props = None
        if plan.v5 and (plan.response_topic is not None or plan.correlation is not None or plan.expiry is not None
                        or plan.user_props):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if plan.response_topic is not None:
                props.ResponseTopic = plan.response_topic
            if plan.correlation is not None:
                props.CorrelationData = plan.correlation
            if plan.expiry is not None:
                props.MessageExpiryInterval = plan.expiry
            if plan.user_props:
                props.UserProperty = plan.user_props
        client = self.pub5 if plan.v5 else self.pub3
        info = client.publish(plan.topic, plan.payload, qos=plan.qos, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.t.violation("publish_failed", f"rc={info.rc} topic={plan.topic[:80]}")


def cancel_is_valid(payload: bytes) -> bool:
    """An oracle written apart from the daemon's parser: a JSON object whose only member is a string 'id'
    of 1-128 characters without control characters, all of it UTF-8 Unicode text."""
    try:
        data = json.loads(payload.decode("utf-8"))
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or set(data) != {"id"}:
        return False
    rid = data["id"]
    return isinstance(rid, str) and 0 < len(rid) <= 128 and not any(ord(c) < 0x20 for c in rid)


# -- the daemon ----------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds the process used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Sampler(threading.Thread):
    """RSS (and liveness) of the daemon every ``every_s`` seconds, with how many messages were sent by then."""

    def __init__(self, pid: int, sent: list[int], every_s: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.sent, self.every = pid, sent, every_s
        self.rows: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.cpu_start = cpu_s(pid)
        self.cpu_end: float | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            kb = rss_kb(self.pid)
            if kb is not None:
                self.rows.append((time.monotonic() - self.started, self.sent[0], kb))
                self.cpu_end = cpu_s(self.pid)
            self.stop.wait(self.every)


def crash_events(daemon: DaemonProcess) -> Counter[str]:
    found: Counter[str] = Counter()
    text = daemon.log_text()
    for line in text.splitlines():
        if "Traceback" in line or "Fatal Python error" in line:
            found["traceback"] += 1
        if line.startswith("{"):
            try:
                event = json.loads(line).get("event")
            except ValueError:
                continue
            if event in CRASH_EVENTS or event == "agent_started":
                found[event] += 1
    return found


def telemetry(port: int) -> dict[str, Any]:
    probe = Client(port)
    try:
        return probe.retained(f"{PREFIX}/{DEVICE}/telemetry", timeout=15)
    except AssertionError:
        return {}
    finally:
        probe.close()


def final_check(port: int, ns: str) -> bool:
    """The daemon still serves: a plain request after the run gets its answer."""
    probe = Client(port)
    try:
        reply = f"{ns}/final"
        probe.subscribe(reply)
        probe.publish(f"{PREFIX}/{DEVICE}/infer", {"id": "final", "prompt": "Hello", "max_tokens": 2},
                      response_topic=reply)
        body = json.loads(probe.collect(reply, timeout=60)[-1].payload)
        return body.get("id") == "final" and body.get("usage", {}).get("completion_tokens") == 2
    except AssertionError:
        return False
    finally:
        probe.close()


def rss_table(rows: list[tuple[float, int, int]], points: int = 11) -> list[tuple[float, int, float]]:
    if not rows:
        return []
    picks = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)})
    return [(rows[i][0], rows[i][1], rows[i][2] / 1024) for i in picks]


def write_curve(out: Path, rows: list[tuple[float, int, int]]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    written = [str(out / "rss.csv")]
    with (out / "rss.csv").open("w") as f:
        f.write("seconds,messages_sent,rss_kb\n")
        f.writelines(f"{s:.1f},{m},{kb}\n" for s, m, kb in rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([m for _, m, _ in rows], [kb / 1024 for _, _, kb in rows])
    ax.set_xlabel("messages sent")
    ax.set_ylabel("daemon RSS (MiB)")
    fig.tight_layout()
    fig.savefig(out / "rss.png", dpi=100)
    written.append(str(out / "rss.png"))
    return written


@dataclass
class Outcome:
    """Everything a run measured, for the checks and the summary."""

    args: argparse.Namespace
    argv: list[str]
    seed: int
    run: str
    pid: int
    tracker: Tracker
    fuzzer: Fuzzer
    sent: int = 0
    total: int = 0  # sent plus the valid requests of the bursts
    send_s: float = 0.0
    stalled: bool = False
    alive: bool = False
    serving: bool = False
    events: Counter[str] = field(default_factory=Counter)
    telemetry: dict[str, Any] = field(default_factory=dict)
    rss_ready: int = 0
    rows: list[tuple[float, int, int]] = field(default_factory=list)
    cpu_percent: float = float("nan")  # the daemon's CPU over the run, % of one core


def run(args: argparse.Namespace, argv: list[str], work: Path) -> tuple[Outcome, DaemonProcess]:
    """Start Mosquitto and the daemon in ``work``, fuzz for the budget, measure; everything stopped after."""
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    run_id = uuid.uuid4().hex[:8]
    ns = f"fuzz/{run_id}"
    budget = args.messages
    broker = Broker(work / "broker").start()
    model = write_tiny_llama(work / "tiny-q8_0.gguf", tensor_type="Q8_0")
    config = write_config(
        work / "dev1.toml", port=broker.port, model_file=model, device_id=DEVICE, top={"groups": [GROUP]},
        model={"n_ctx": 512, "threads": 1},
        inference={"max_queue": 4, "max_tokens_limit": MAX_TOKENS_LIMIT, "default_max_tokens": 4,
                   "shutdown_grace_s": 5.0},
        log={"level": args.log_level, "format": "json"},
        telemetry={"interval_s": 5.0, "buffer_dir": str(work / "state" / "telemetry")},
        # Unsigned commands run (no fleet key): the fuzzer checks every command is handled and answered
        # once where the caller asked, which a device that refuses them (the default) never does.
        fleet={"state_dir": str(work / "state" / "fleet"), "allow_unsigned": True},
    )
    daemon = DaemonProcess(config=config, workdir=work).start()
    assert daemon.proc is not None
    tracker = Tracker(ns, budget + args.burst_size * (budget // max(1, args.burst_every) + 1) + 16)
    listener = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"fuzz-sub-{run_id}", protocol=paho.MQTTv5)
    listener.on_message = tracker.on_message
    listener.max_inflight_messages_set(1000)
    listener.connect("127.0.0.1", broker.port)
    listener.loop_start()
    sent = [0]
    sampler = Sampler(daemon.proc.pid, sent)
    fuzzer: Fuzzer | None = None
    try:
        ready = Client(broker.port)
        try:
            ready.retained(STATUS, timeout=120, state="online")
        finally:
            ready.close()
        listener.subscribe([(f"{ns}/#", 1), (RESULT, 1), (STATUS, 1)])
        time.sleep(0.5)
        with tracker.lock:
            tracker.status_msgs = 0  # the retained 'online' we just got
        fuzzer = Fuzzer(args, broker.port, tracker, random.Random(seed))
        out = Outcome(args, argv, seed, run_id, daemon.proc.pid, tracker, fuzzer)
        out.rss_ready = rss_kb(out.pid) or 0
        sampler.start()
        print(f"fuzzing pid {out.pid} (seed {seed}, run {run_id}): {budget} messages"
              + (f" or {args.seconds:.0f} s" if args.seconds else ""), flush=True)
        out.total = _send(daemon, sent, out)
        out.sent = sent[0]
        # Let the daemon answer what it has; then a quiet period catches anything answered twice.
        deadline = time.monotonic() + max(60.0, args.stall_s)
        while tracker.outstanding and time.monotonic() < deadline and daemon.proc.poll() is None:
            time.sleep(0.2)
        time.sleep(2.0)
        out.serving = daemon.proc.poll() is None and final_check(broker.port, ns)
        out.telemetry = telemetry(broker.port) if daemon.proc.poll() is None else {}
        sampler.stop.set()
        sampler.join(5)
        out.rows = sampler.rows
        if sampler.cpu_start is not None and sampler.cpu_end is not None and sampler.rows:
            out.cpu_percent = 100.0 * (sampler.cpu_end - sampler.cpu_start) / sampler.rows[-1][0]
        out.alive = daemon.proc.poll() is None
        out.events = crash_events(daemon)
        return out, daemon
    finally:
        sampler.stop.set()
        if fuzzer is not None:
            fuzzer.close()
        listener.disconnect()
        listener.loop_stop()
        daemon.stop()
        broker.stop()


def _send(daemon: DaemonProcess, sent: list[int], out: Outcome) -> int:
    """The sending loop; returns how many messages went out, bursts included."""
    assert daemon.proc is not None
    args, fuzzer, tracker = out.args, out.fuzzer, out.tracker
    started = last_report = time.monotonic()
    stop_at = started + args.seconds if args.seconds else float("inf")
    n = 0
    while sent[0] < args.messages and time.monotonic() < stop_at and daemon.proc.poll() is None:
        if not tracker.wait_window(args.window, args.stall_s):
            out.stalled = True
            break
        if args.burst_every and sent[0] and sent[0] % args.burst_every == 0:
            for _ in range(args.burst_size):
                fuzzer.valid(n)
                n += 1
        fuzzer.send(n)
        n += 1
        sent[0] += 1
        now = time.monotonic()
        if now - last_report > 30:
            last_report = now
            print(f"  {sent[0]:>9} sent, {sent[0] / (now - started):7.0f} msg/s, {len(tracker.outstanding):4} "
                  f"waiting, RSS {(rss_kb(out.pid) or 0) / 1024:.1f} MiB", flush=True)
    out.send_s = time.monotonic() - started
    return n


def _pct(end: int, start: int) -> float:
    return 100.0 * (end - start) / start if start else float("nan")


def report(out: Outcome) -> tuple[str, dict[str, bool]]:
    """The checks (name -> passed) and the summary text: a table, the RSS curve, violations."""
    t, f, args = out.tracker, out.fuzzer, out.args
    rows = out.rows
    early = next((kb for _, m, kb in rows if m >= out.sent * 0.1), rows[0][2] if rows else 0)
    half = next((kb for _, m, kb in rows if m >= out.sent * 0.5), rows[0][2] if rows else 0)
    end = rows[-1][2] if rows else 0
    peak = max((kb for *_, kb in rows), default=0)
    drift = 100.0 * (end - half) / half if half else float("nan")
    missing = sorted(t.outstanding)
    results_got = t.results_got - f.own_results
    count = Counter(t.expect[i] * 2 + bool(t.finals[i]) for i in range(out.total))
    crash_count = sum(out.events[e] for e in (*CRASH_EVENTS, "traceback"))
    checks = {
        "daemon alive, same PID, never restarted": out.alive and out.events["agent_started"] <= 1,
        "no crash events or tracebacks in its log": not crash_count,
        "never stalled (answers kept coming)": not out.stalled,
        "every must-answer message answered exactly once": not missing and not t.violation_counts["answered_twice"],
        "nothing answered where no answer was due": not t.violation_counts["answered_unasked"],
        "no chunk after a final, no reply that is not JSON": not (t.violation_counts["chunk_after_final"]
                                                                  or t.violation_counts["reply_not_json"]),
        "no 'internal' error (a handler failed)": not t.violation_counts["internal_error"],
        "every valid request answered correctly (or overloaded)": not t.valid["wrong"],
        "every command reported once on the result topic": (
            f.results_expected <= results_got <= f.results_expected + f.results_maybe),
        "the daemon serves after the run": out.serving,
        f"RSS drift < {args.max_drift:g} % over the second half": drift < args.max_drift,
        "fuzz clients never disconnected by the broker": not f.disconnects,
        "the driver itself had no error": not (t.violation_counts["publish_failed"] or t.violation_counts[
            "tracker_error"]),
    }
    for i in missing[:10]:
        t.violation("unanswered", f"#{i} {t.outstanding[i]}")
    tele = out.telemetry
    lines = [
        f"edge-agent fuzz run {out.run}, seed {out.seed}: python bench/fuzz.py {' '.join(out.argv)}",
        "",
        "| | |",
        "|---|---|",
        f"| messages sent | {out.sent:,} (+{out.total - out.sent:,} valid requests in bursts) |",
        f"| sending time | {out.send_s:.1f} s |",
        f"| rate | {out.sent / out.send_s:,.0f} msg/s (daemon CPU {out.cpu_percent:.0f} % of one core; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end) |",
        f"| by kind | {', '.join(f'{k} {v:,}' for k, v in sorted(f.kinds.items()))} |",
        f"| crashes / restarts | {0 if out.alive else 1} / {max(0, out.events['agent_started'] - 1)} "
        f"(PID {out.pid} {'alive' if out.alive else 'GONE'}) |",
        f"| crash events in its log | {crash_count} |",
        f"| must-answer messages / answered once | {count[2] + count[3]:,} / {count[3]:,} |",
        f"| at-most-one messages / answered | {count[4] + count[5]:,} / {count[5]:,} |",
        f"| final replies to fuzz messages | {', '.join(f'{k} {v:,}' for k, v in t.codes.most_common())} |",
        f"| valid requests checked | {sum(t.valid.values()):,}: served {t.valid['served']:,}, "
        f"overloaded {t.valid['overloaded']:,}, wrong {t.valid['wrong']:,} |",
        f"| command results expected / got | {f.results_expected:,} (+ up to {f.results_maybe:,} with expiry "
        f"1 s) / {results_got:,} |",
        f"| replies to addresses a mutation made up | {t.stray:,} |",
        f"| daemon status messages during the run | {t.status_msgs} (each reconnect republishes it) |",
        f"| daemon's own counters | rejected {tele.get('messages_rejected', '?')}, dropped "
        f"{tele.get('messages_dropped', '?')}, quarantined {tele.get('messages_quarantined', '?')} |",
        f"| RSS ready / at 10 % / at 50 % / end / max | {out.rss_ready / 1024:.1f} / {early / 1024:.1f} / "
        f"{half / 1024:.1f} / {end / 1024:.1f} / {peak / 1024:.1f} MiB |",
        f"| RSS drift over the second half | {drift:+.2f} % (from 10 %: {_pct(end, early):+.2f} %, "
        f"from ready: {_pct(end, out.rss_ready):+.2f} %) |",
        "",
        "RSS curve:",
        "",
        "| s | messages sent | RSS MiB |",
        "|---:|---:|---:|",
        *(f"| {sec:.0f} | {m:,} | {mib:.1f} |" for sec, m, mib in rss_table(rows)),
        "",
        "Checks:",
        *(f"  [{'ok' if ok else 'FAILED'}] {name}" for name, ok in checks.items()),
    ]
    if t.violations:
        lines += ["", "Violations (first 40):", *(f"  {v}" for v in t.violations)]
    if f.disconnects:
        lines += ["", f"Client disconnects: {f.disconnects[:5]}"]
    if not checks["every command reported once on the result topic"]:
        twice = [(i, c) for i, c in t.result_ids.items() if c > 1][:10]
        unknown = [(i, f.all_cmds.get(i)) for i in t.result_ids if i not in f.cmd_ids][:10]
        absent = [f.cmd_ids[i] for i in f.cmd_ids if i not in t.result_ids][:10]
        lines += ["", f"Command results twice: {twice}; for ids not expected: {unknown}; missing: {absent}"]
    lines += ["", f"Mutations: {', '.join(f'{k} {v:,}' for k, v in sorted(f.mutations.items()))}"]
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="Messages to send (the budget).")
    parser.add_argument("--seconds", type=float, default=None, help="Stop sending after this long.")
    parser.add_argument("--seed", type=int, default=None, help="Random seed (printed; reruns the same messages).")
    parser.add_argument("--valid-every", type=int, default=50, help="One checked valid request per this many.")
    parser.add_argument("--window", type=int, default=256, help="Most must-answer messages unanswered at once.")
    parser.add_argument("--burst-every", type=int, default=2000, help="A burst of valid requests every N messages.")
    parser.add_argument("--burst-size", type=int, default=24, help="Valid requests per burst (queue is 4).")
    parser.add_argument("--max-drift", type=float, default=5.0,
                        help="Largest RSS growth (%%) over the second half of the run.")
    parser.add_argument("--stall-s", type=float, default=60.0, help="No answer for this long = the daemon is stuck.")
    parser.add_argument("--log-level", default="error", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--out", type=Path, default=None, help="Where rss.csv and summary.txt go (default: tmp).")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: where is it stuck?
    with tempfile.TemporaryDirectory(prefix="edge-fuzz-") as tmp:
        work = Path(tmp)
        out_dir = args.out or work / "out"
        outcome, daemon = run(args, argv, work)
        text, checks = report(outcome)
        failed = not all(checks.values())
        if not outcome.alive or any(outcome.events[e] for e in (*CRASH_EVENTS, "traceback")):
            text += "\n\nDaemon log tail:\n" + daemon.log_text()[-3000:]
        print(text)
        files = write_curve(out_dir, outcome.rows)
        (out_dir / "summary.txt").write_text(text + "\n")
        files.append(str(out_dir / "summary.txt"))
        for name, source in (("daemon.log", daemon.log_path), ("mosquitto.log", work / "broker" / "mosquitto.log")):
            if failed and source is not None and source.exists():
                (out_dir / name).write_bytes(source.read_bytes()[-(4 << 20):])  # the evidence outlives the tmp dir
                files.append(str(out_dir / name))
        print(f"\nwritten: {', '.join(files)}")
        return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
