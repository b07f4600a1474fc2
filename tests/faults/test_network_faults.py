"""Network faults against the real daemon and real Mosquitto brokers (issue 10, "Faults", network half).

For every fault: each request sent is answered exactly once (a final result or an explicit error; none
lost, no final reply twice, counted by request id), and the daemon serves again afterwards without
having restarted (same PID), unless the fault is the kill. Each test prints one ``FAULT`` line with what
it measured (run with ``-s`` to see them): requests sent / answered / errors by code / duplicate finals,
and the seconds from the end of the fault until a fresh request was answered.

Callers hold a persistent MQTT 5 session, so replies published while they are away (broker restarting)
are kept for them, and their own QoS 1 requests published during an outage are sent when it ends.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.mqtt import MqttSettings
from agent.transport.mqtt import Connected, LinkEvent, MqttLink
from tests.support.broker import Broker, free_port
from tests.support.daemon import DaemonProcess
from tests.support.hardware import FIXTURES
from tests.support.netns import NetNs, NetNsDaemon, process_netns
from tests.support.sd_socket import NotifyReceiver
from tests.support.stall_proxy import StallProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

PREFIX = "edge"
INFER = f"{PREFIX}/dev1/infer"
STATUS = f"{PREFIX}/dev1/status"
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0}
LONG = 900  # tokens: about a second of the "slow" tiny model here, so a fault injected after chunk 0 lands mid-stream


# --- a caller with a persistent session -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    at: float  # time.monotonic() on arrival
    topic: str
    data: Any


@dataclass
class Caller:
    """An MQTT 5 client with a persistent session that sends requests and records every reply by id."""

    port: int
    topics: tuple[str, ...] = ()
    seen: list[Seen] = field(default_factory=list)
    sent: dict[str, float] = field(default_factory=dict)  # request id -> time sent (monotonic)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client_id = f"caller-{uuid.uuid4().hex[:8]}"
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._subscribed.set()
        self.c.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.c.loop_start()
        for topic in ("test/reply/#", *self.topics):
            self._subscribed.clear()
            self.c.subscribe(topic, 1)
            assert self._subscribed.wait(5), f"no SUBACK for {topic}"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            data = None
        with self._lock:
            self.seen.append(Seen(time.monotonic(), msg.topic, data))

    def request(self, rid: str, max_tokens: int, *, stream: bool = False, wait: bool = True) -> None:
        """Publish request ``rid`` (QoS 1); ``wait=False`` while the broker is away (paho sends it later)."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"test/reply/{rid}"
        props.CorrelationData = rid.encode()
        body = {**CHAT, "id": rid, "max_tokens": max_tokens, "stream": stream}
        self.sent[rid] = time.monotonic()
        info = self.c.publish(INFER, json.dumps(body), qos=1, properties=props)
        if wait:
            info.wait_for_publish(5)

    def on(self, topic: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.topic == topic]

    def finals(self, rid: str) -> list[Seen]:
        return [s for s in self.on(f"test/reply/{rid}") if isinstance(s.data, dict) and s.data.get("done")]

    def chunks(self, rid: str) -> list[dict[str, Any]]:
        return [s.data for s in self.on(f"test/reply/{rid}") if isinstance(s.data, dict) and not s.data.get("done")]

    def wait_chunk(self, rid: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.chunks(rid):
            assert time.monotonic() < deadline, f"no chunk of {rid} within {timeout}s"
            time.sleep(0.01)

    def wait_final(self, rid: str, timeout: float = 60.0) -> Seen:
        deadline = time.monotonic() + timeout
        while not self.finals(rid):
            assert time.monotonic() < deadline, f"no final reply to {rid} within {timeout}s"
            time.sleep(0.02)
        return self.finals(rid)[0]

    def states(self) -> list[str]:
        """The states seen on the device's status topic, in order (retained ones included)."""
        return [s.data["state"] for s in self.on(STATUS) if isinstance(s.data, dict)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
        self.c._reset_sockets()  # the wake-up socket pair; see tests/integration/test_edge_cloud.py


@pytest.fixture
def callers() -> Iterator[Callable[..., Caller]]:
    made: list[Caller] = []

    def _make(port: int, *topics: str) -> Caller:
        c = Caller(port, topics)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.close()


# --- accounting -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    sent: int
    answered: int
    errors: dict[str, int]
    duplicates: int  # final replies beyond the first, over all requests
    missing: list[str]
    restreamed: int  # chunks whose seq was seen before (a generation streamed again)

    def line(self, fault: str, **measured: Any) -> str:
        extra = " ".join(f"{k}={v}" for k, v in measured.items())
        return (f"\nFAULT {fault}: sent={self.sent} answered={self.answered} errors={self.errors or '{}'} "
                f"duplicates={self.duplicates} restreamed_chunks={self.restreamed} {extra}")  # fmt: skip


def account(caller: Caller, settle_s: float = 1.5) -> Outcome:
    """Every request the caller sent, by id: answered?, with which error, how many finals, chunks resent."""
    time.sleep(settle_s)  # a duplicate would have arrived by now
    errors: collections.Counter[str] = collections.Counter()
    duplicates = restreamed = 0
    missing = []
    for rid in caller.sent:
        finals = caller.finals(rid)
        if not finals:
            missing.append(rid)
            continue
        duplicates += len(finals) - 1
        if "error" in finals[0].data:
            errors[finals[0].data["error"]["code"]] += 1
        seqs = [c["seq"] for c in caller.chunks(rid)]
        restreamed += len(seqs) - len(set(seqs))
    return Outcome(len(caller.sent), len(caller.sent) - len(missing), dict(errors), duplicates, missing, restreamed)


def serve_again(caller: Caller, since: float, rid: str = "fresh", timeout: float = 90.0) -> float:
    """Send a fresh short request now; seconds from ``since`` until it was answered with a result."""
    caller.request(rid, 2, wait=False)
    final = caller.wait_final(rid, timeout)
    assert "error" not in final.data, final.data
    assert final.data["usage"]["completion_tokens"] == 2
    return round(final.at - since, 2)


def pid_of(d: DaemonProcess) -> int:
    assert d.proc is not None
    return d.proc.pid


def count(d: DaemonProcess, event: str, **match: Any) -> int:
    return sum(1 for e in d.events() if e.get("event") == event and all(e.get(k) == v for k, v in match.items()))


def assert_alive_same(d: DaemonProcess, pid: int) -> None:
    """Still running, the same process, started once, and nothing logged at error level."""
    assert d.proc is not None and d.proc.poll() is None, d.log_text()[-3000:]
    assert pid_of(d) == pid
    assert count(d, "agent_started") == 1  # one start in this log: no restart inside the process either
    assert [e for e in d.events() if e.get("level") in ("error", "critical")] == []


# --- 1. broker restart mid-stream -----------------------------------------------------------------


def test_broker_restart_mid_stream_answers_each_request_once(fault_broker: Broker, daemons, callers) -> None:
    """The broker restarts (same port, persistent sessions) while a reply streams: every request is answered
    once, the daemon reconnects by itself and serves a fresh request, same PID."""
    # 3,000 tokens (~4 s here): the generation runs before, through and after the outage.
    d = daemons(fault_broker.port, model={"n_ctx": 4096}, inference={"max_tokens_limit": 3000})
    pid = pid_of(d)
    c = callers(fault_broker.port, STATUS)
    c.request("mid", 3000, stream=True)
    c.request("queued-1", 8)
    c.request("queued-2", 8, stream=True)
    c.wait_chunk("mid")
    stopped = time.monotonic()
    fault_broker.restart(down_s=1.0)
    back = time.monotonic()
    again_s = serve_again(c, back)
    for rid in c.sent:
        c.wait_final(rid)
    out = account(c)
    mid = c.finals("mid")[0]
    resumed = next(x.at for x in c.on("test/reply/mid") if x.at > back)
    print(out.line("broker_restart", serve_again_s=again_s, outage_s=round(back - stopped, 2),
                   stream_resumed_after_s=round(resumed - back, 2),
                   mid_done_after_restart_s=round(mid.at - back, 2),
                   redelivered_while_running=count(d, "request_duplicate", id="mid", in_progress=True)))  # fmt: skip
    assert out.missing == [] and out.duplicates == 0
    assert out.errors == {}  # nothing had to fail: replies wait in paho's queue and the broker's sessions
    assert mid.data["usage"]["completion_tokens"] == 3000
    assert_alive_same(d, pid)
    assert count(d, "mqtt_disconnected") == 1
    assert c.states()[-1] == "online"


# --- 2. broker down for 60 s ----------------------------------------------------------------------


def test_broker_down_60s_requests_from_before_and_during_are_answered_after(
    tmp_path: Path, fault_broker: Broker, daemons, callers
) -> None:
    """A 60 s outage: requests in the daemon when it starts and requests a caller queued (QoS 1) during it
    are all answered once after the broker is back; the daemon kept retrying (reconnect_max_s 2) in the
    same process, told systemd so (STATUS=), and serves again within seconds."""
    sd = NotifyReceiver(tmp_path)
    try:
        _broker_down_60s(fault_broker, daemons, callers, sd)
    finally:
        sd.close()


def _broker_down_60s(fault_broker: Broker, daemons, callers, sd: NotifyReceiver) -> None:
    d = daemons(fault_broker.port, mqtt={"reconnect_min_s": 0.5, "reconnect_max_s": 2.0}, env=sd.environ())
    pid = pid_of(d)
    c = callers(fault_broker.port, STATUS)
    c.request("before-stream", 600, stream=True)
    c.request("before-1", 8)
    c.request("before-2", 8)
    c.wait_chunk("before-stream")
    down = time.monotonic()
    fault_broker.stop()
    d.wait_event("mqtt_disconnected", timeout=10)
    for i in range(3):
        c.request(f"during-{i}", 8, wait=False)  # paho keeps them (QoS 1) until its session is back
    while time.monotonic() - down < 60.0:
        assert d.proc is not None and d.proc.poll() is None, "the daemon exited during the outage"
        time.sleep(1.0)
    fault_broker.start()
    back = time.monotonic()
    # What a dashboard subscribing right after the restart sees: the retained status as persisted.
    look = callers(fault_broker.port, STATUS)
    deadline = time.monotonic() + 5
    while not look.states() and time.monotonic() < deadline:
        time.sleep(0.01)
    first_seen = look.states()[:1]
    again_s = serve_again(c, back)
    for rid in c.sent:
        c.wait_final(rid)
    out = account(c)
    systemd = [(round(m.at - down, 1), m.fields["STATUS"]) for m in sd.messages
               if "STATUS" in m.fields and m.at > down]  # fmt: skip
    print(out.line("broker_down_60s", serve_again_s=again_s, outage_s=round(back - down, 1),
                   status_after_restart=first_seen, status_then=look.states()[-1:],
                   systemd_status=systemd))  # fmt: skip
    assert out.missing == [] and out.duplicates == 0
    assert [text for _, text in systemd] == ["broker unreachable; reconnecting",
                                             f"serving on {INFER} (reconnected)"]  # fmt: skip
    assert out.errors == {}
    assert_alive_same(d, pid)
    assert count(d, "mqtt_disconnected") == 1 and count(d, "mqtt_connected") == 2
    assert again_s < 15
    assert look.states()[-1] == "online"


# --- 3. partition between the daemon and the broker -----------------------------------------------


@pytest.fixture
def ns_broker(tmp_path: Path, netns: NetNs) -> Iterator[Broker]:
    """A persistent broker on loopback (callers) and on the root side of the namespace's link (the daemon)."""
    port = free_port()
    b = Broker(tmp_path / "ns-broker", port=port, persistence=True,
               extra=(f"listener {port} {netns.host_addr}",)).start()  # fmt: skip
    yield b
    b.stop()


@pytest.mark.parametrize("how", ["link_down", "nft_drop"])
def test_partition_longer_than_keepalive_answers_each_request_once(
    how: str, netns: NetNs, ns_broker: Broker, daemons, callers
) -> None:
    """The daemon (in its own network namespace) loses its broker for 12 s, beyond the 5 s keepalive, by the
    link going down or by every packet being dropped: the broker publishes its will ('offline'); after the
    partition it reconnects to its session and each request, also one sent during the partition, is
    answered once; same PID."""
    d = daemons(ns_broker.port, host=netns.host_addr, netns=netns, mqtt={"keepalive_s": 5})
    assert isinstance(d, NetNsDaemon)
    pid = pid_of(d)
    assert process_netns(pid) != process_netns(os.getpid())  # it really runs in the namespace
    c = callers(ns_broker.port, STATUS)
    c.request("mid", LONG, stream=True)
    c.wait_chunk("mid")
    start, end = (netns.cut, netns.heal) if how == "link_down" else (netns.drop, netns.undrop)
    start()
    cut_at = time.monotonic()
    c.request("during", 8)  # the broker still thinks the daemon is there: sent into the partition
    d.wait_event("mqtt_disconnected", timeout=20)
    detected_s = round(time.monotonic() - cut_at, 1)
    while time.monotonic() - cut_at < 12.0:
        time.sleep(0.1)
    assert "offline" in c.states(), c.states()  # the broker gave up on it: its will
    end()
    healed = time.monotonic()
    again_s = serve_again(c, healed)
    for rid in c.sent:
        c.wait_final(rid)
    out = account(c)
    reason = next(e["reason"] for e in d.events() if e.get("event") == "mqtt_disconnected")
    print(out.line(f"partition_{how}", serve_again_s=again_s, detected_after_s=detected_s,
                   disconnect_reason=repr(reason), status=c.states()))  # fmt: skip
    assert out.missing == [] and out.duplicates == 0
    assert out.errors == {}
    assert_alive_same(d, pid)
    assert c.states()[-1] == "online"
    assert again_s < 20


# --- 4. SIGKILL mid-generation --------------------------------------------------------------------


def test_sigkill_mid_generation_is_redelivered_and_answered_once(fault_broker: Broker, daemons, callers) -> None:
    """The daemon is killed while streaming; restarted, it gets the unacknowledged requests again from its
    session and answers each once (the stream starts over: chunks 0.. are sent a second time)."""
    d = daemons(fault_broker.port)
    c = callers(fault_broker.port, STATUS)
    c.request("killed", LONG, stream=True)
    c.request("behind", 8)
    c.wait_chunk("killed")
    first_pid = pid_of(d)
    d.kill()
    killed = time.monotonic()
    chunks_before = len(c.chunks("killed"))
    d2 = daemons(fault_broker.port)
    again_s = serve_again(c, killed)
    for rid in c.sent:
        c.wait_final(rid)
    out = account(c)
    done = [e.get("id") for e in d2.events() if e.get("event") == "request_done"]
    print(out.line("sigkill", serve_again_s=again_s, chunks_before_kill=chunks_before, done_by_restarted=done))
    assert out.missing == [] and out.duplicates == 0
    assert out.errors == {}
    assert c.finals("killed")[0].data["usage"]["completion_tokens"] == LONG
    assert pid_of(d2) != first_pid
    assert count(d2, "request_done", id="killed") == 1
    assert "offline" in c.states() and c.states()[-1] == "online"  # the will, then the new process


# --- 5. the cloud broker accepts, then stalls -----------------------------------------------------


def _set_temp(hw: Path, celsius: float) -> None:
    path = hw / "sys" / "class/thermal/thermal_zone0/temp"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{int(celsius * 1000)}\n")
    tmp.replace(path)


def _offloading_edge(tmp_path: Path, edge_port: int, cloud_port: int, daemons, c: Caller, *,
                     timeout_s: float) -> tuple[DaemonProcess, Path]:  # fmt: skip
    """An edge daemon whose cloud broker is at ``cloud_port``, offloading everything (critical heat), proven by
    a request ``c`` sent that the cloud answered. Returns the daemon and its fixture hardware tree."""
    hw = tmp_path / "hw"
    shutil.copytree(FIXTURES / "pi5-8gb", hw)
    _set_temp(hw, 84.0)  # within critical_margin_c of the hard limit (85): offload everything
    edge = daemons(
        edge_port, gguf="Q8_0",
        hardware={"sys_root": str(hw / "sys"), "proc_root": str(hw / "proc")},
        telemetry={"interval_s": 1.0},
        adapt={"down_dwell_s": 0.5, "hold_s": 1.0, "max_cap_steps": 0},
        cloud={"enabled": True, "host": "127.0.0.1", "port": cloud_port, "tls": False, "keepalive_s": 5,
               "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "retry_after_ms": 2500,
               "request_timeout_s": timeout_s},
    )  # fmt: skip
    edge.wait_event("relay_connected", timeout=15)
    deadline = time.monotonic() + 20
    while True:  # the first tick offloads; until then a request is served here
        rid = f"probe-{uuid.uuid4().hex[:4]}"
        c.request(rid, 4)
        if c.wait_final(rid, 30).data.get("served_by") == "cloud":
            return edge, hw
        assert time.monotonic() < deadline, "never offloaded"
        time.sleep(0.5)


def _resume_and_offload_again(proxy: StallProxy, edge: DaemonProcess, worker: DaemonProcess, c: Caller, *,
                              hw: Path, in_flight: list[str]) -> None:  # fmt: skip
    """The stall ends: the relay reconnects, the forwards it failed are not sent again (the cloud would generate
    answers nobody relays), nothing reaches a caller twice, and offloading works again."""
    proxy.resume()
    deadline = time.monotonic() + 20
    while count(edge, "relay_connected") < 2:
        assert time.monotonic() < deadline, "the relay did not reconnect after the stall"
        time.sleep(0.1)
    assert account(c, settle_s=2.0).duplicates == 0
    assert [e["id"] for e in worker.events() if e.get("event") == "request_done" and e["id"] in in_flight] == []
    _set_temp(hw, 84.0)
    deadline = time.monotonic() + 20
    while True:
        rid = f"cloud-after-{uuid.uuid4().hex[:4]}"
        c.request(rid, 4)
        if c.wait_final(rid, 30).data.get("served_by") == "cloud":
            return
        assert time.monotonic() < deadline, "never offloaded again"
        time.sleep(0.5)


def test_stalled_cloud_broker_answers_offloaded_requests_once_in_bounded_time(
    tmp_path: Path, fault_broker: Broker, daemons, callers
) -> None:
    """A TCP proxy in front of the cloud broker forwards, then holds its sockets open and moves nothing:
    requests already sent to the cloud are answered 'timeout' or 'overloaded' within request_timeout_s,
    new ones 'overloaded' at once once the link is seen dead, the device serves locally when heat clears, and
    after the stall the failed forwards are not replayed to the cloud."""
    cloud = Broker(tmp_path / "cloud-broker").start()
    proxy = StallProxy(cloud.port).start()
    try:
        worker = daemons(cloud.port, device_id="cloud1", gguf="Q8_0", top={"role": "cloud"},
                         inference={"max_queue": 16})  # fmt: skip
        c = callers(fault_broker.port, f"{PREFIX}/dev1/events")
        timeout_s = 6.0
        edge, hw = _offloading_edge(tmp_path, fault_broker.port, proxy.port, daemons, c, timeout_s=timeout_s)
        pid = pid_of(edge)

        proxy.stall()
        stalled = time.monotonic()
        in_flight = ["cloud-stream", "cloud-1", "cloud-2"]
        c.request(in_flight[0], 200, stream=True)
        for rid in in_flight[1:]:
            c.request(rid, 8)
        waited = {rid: round(c.wait_final(rid, 30).at - c.sent[rid], 2) for rid in in_flight}
        edge.wait_event("mqtt_disconnected", timeout=30, link="cloud")
        seen_dead_s = round(time.monotonic() - stalled, 1)
        later = {}
        for i in range(2):
            rid = f"after-{i}"
            c.request(rid, 8)
            later[rid] = round(c.wait_final(rid, 10).at - c.sent[rid], 2)

        _set_temp(hw, 50.0)
        cooled = time.monotonic()
        deadline = time.monotonic() + 20
        while not any(s.data.get("kind") == "offload_off" for s in c.on(f"{PREFIX}/dev1/events")):
            assert time.monotonic() < deadline, "offload never cleared"
            time.sleep(0.1)
        again_s = serve_again(c, cooled, "local")
        assert c.finals("local")[0].data["served_by"] == "dev1"
        out = account(c)
        codes = {rid: c.finals(rid)[0].data.get("error", {}).get("code", "served") for rid in [*in_flight, *later]}
        print(out.line("cloud_stall", in_flight_answered_s=waited, link_seen_dead_s=seen_dead_s,
                       new_answered_s=later, codes=codes, local_again_after_cooling_s=again_s))  # fmt: skip
        assert out.missing == [] and out.duplicates == 0
        assert all(codes[rid] in ("timeout", "overloaded") for rid in in_flight), codes
        assert all(codes[rid] == "overloaded" for rid in later), codes
        assert max(waited.values()) < timeout_s + 2.0
        assert max(later.values()) < 1.0
        assert_alive_same(edge, pid)
        _resume_and_offload_again(proxy, edge, worker, c, hw=hw, in_flight=in_flight)
    finally:
        proxy.close()
        cloud.stop()


# --- a message the broker refuses is not resent forever -------------------------------------------


def test_reply_over_the_brokers_packet_limit_is_an_error_reply_not_a_reconnect_loop(
    tmp_path: Path, daemons, callers
) -> None:
    """A final reply larger than the broker's max_packet_size (announced in CONNACK) is answered 'too_large'
    instead; the daemon is never disconnected and serves the next request."""
    b = Broker(tmp_path / "small-broker", persistence=True, extra=("max_packet_size 2048",)).start()
    try:
        d = daemons(b.port, gguf="Q8_0", model={"n_ctx": 4096}, inference={"max_tokens_limit": 3000})
        pid = pid_of(d)
        c = callers(b.port)
        c.request("big", 3000)
        final = c.wait_final("big", 60)
        again_s = serve_again(c, final.at)
        out = account(c)
        print(out.line("reply_over_packet_limit", serve_again_s=again_s, disconnects=count(d, "mqtt_disconnected")))
        assert final.data["error"]["code"] == "too_large", final.data
        assert out.missing == [] and out.duplicates == 0
        assert count(d, "mqtt_disconnected") == 0
        assert count(d, "mqtt_publish_too_large", topic="test/reply/big") == 1
        assert_alive_same(d, pid)
    finally:
        b.stop()


def test_a_message_the_broker_refuses_is_dropped_after_two_refusals_and_the_link_stays_up(
    tmp_path: Path, callers
) -> None:
    """A QoS 1 publish the broker answers with a disconnect (malformed topic) is resent once, then dropped:
    the link stays up and the message queued after it is delivered once."""
    b = Broker(tmp_path / "broker").start()
    events: list[LinkEvent] = []
    link = MqttLink(MqttSettings(host="127.0.0.1", port=b.port, reconnect_min_s=0.2, reconnect_max_s=1.0),
                    f"guard-{uuid.uuid4().hex[:6]}", events.append)  # fmt: skip
    try:
        watcher = callers(b.port, "guard/#")
        link.start()
        assert link.wait_connected(10)
        link.publish("guard/bad\x01topic", b"refused")  # bypassing is_concrete_topic on purpose
        link.publish("guard/good", b"after it")
        deadline = time.monotonic() + 20
        while not watcher.on("guard/good"):
            assert time.monotonic() < deadline, "the message after the refused one never arrived"
            time.sleep(0.05)
        time.sleep(3.0)  # no further disconnects
        connects = sum(isinstance(e, Connected) for e in events)
        print(f"\nFAULT refused_publish: connects={connects} delivered={len(watcher.on('guard/good'))}")
        assert connects == 3  # first connect, one resend, then the link stays up without it
        assert link.connected
        assert len(watcher.on("guard/good")) == 1
        assert not link._client._out_messages
    finally:
        link.stop(timeout=2)
        b.stop()
