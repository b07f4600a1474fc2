"""The status service (agent.services.status) in process: the retained status, STATUS=, events, the buffer.

A fake link records what is published and can be connected or not; the model owner is a stand-in with
what the status reads (what is served, the last plan); the telemetry buffer is the real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.adapt.policy import SetThreads
from agent.engine.llama import LoadedModel
from agent.services.model import ServingModel
from agent.services.status import StatusService
from agent.services.telemetry_buffer import TelemetryBuffer
from agent.settings import Settings
from agent.transport.topics import DeviceTopics
from agent.transport.wire import PullProgress

TOPICS = DeviceTopics("edge", "dev1")
INFO = LoadedModel(path=Path("m.gguf"), name="tiny", n_ctx=512, threads=2, has_chat_template=True, load_s=0.1)


@dataclass
class FakeLink:
    connected: bool = True
    published: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, **kwargs: Any) -> None:
        self.published.append((topic, payload, retain))

    def ack(self, message: Any) -> None:
        return None

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.published]

    def statuses(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.published if t == TOPICS.status]


@dataclass
class FakeModel:
    info: LoadedModel | None = None
    serving: ServingModel = field(default_factory=ServingModel)
    last_plan: dict[str, Any] | None = None


class Notifier:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def status(self, text: str) -> None:
        self.lines.append(text)


@dataclass
class Parts:
    status: StatusService
    link: FakeLink
    model: FakeModel
    notifier: Notifier
    flags: dict[str, Any]


def make(*, connected: bool = True, buffer: TelemetryBuffer | None = None, **settings: Any) -> Parts:
    link, model, notifier = FakeLink(connected=connected), FakeModel(), Notifier()
    flags: dict[str, Any] = {"mode": "local", "draining": False, "commands": None}
    cfg = Settings(device_id="dev1", groups=["lab"], **settings)
    status = StatusService(lambda: cfg, TOPICS, model, notifier,  # type: ignore[arg-type]
                           mode=lambda: flags["mode"], draining=lambda: flags["draining"],
                           commands=lambda: flags["commands"])
    status.attach(link, buffer=buffer)  # type: ignore[arg-type]
    return Parts(status, link, model, notifier, flags)


# -- the retained status ------------------------------------------------------------------------------


def test_a_state_is_published_retained_and_told_to_systemd() -> None:
    """set_state publishes the retained status and sets the STATUS= line."""
    p = make()
    p.status.set_state("loading", note="loading model tiny.gguf")
    assert p.notifier.lines == ["loading model tiny.gguf"]
    [(topic, payload, retain)] = p.link.published
    body = json.loads(payload)
    assert (topic, retain) == (TOPICS.status, True)
    assert (body["state"], body["device_id"], body["groups"], body["role"]) == ("loading", "dev1", ["lab"], "edge")


def test_nothing_is_queued_while_disconnected() -> None:
    """A status is not queued while the link is down: the on-connect publish sends the state current by then."""
    p = make(connected=False)
    p.status.set_state("starting", note="planning")
    assert p.link.published == []
    assert p.notifier.lines == ["planning"]


def test_offline_is_never_published_by_set_state_but_left_as_the_final_message() -> None:
    """'offline' goes out as the link's final message (and will), with the reason when there is one."""
    p = make()
    p.status.set_state("offline", note="no such model")
    assert p.link.published == []
    topic, payload = p.status.final(detail="no such model")
    assert (topic, json.loads(payload)["state"], json.loads(payload)["detail"]) == (TOPICS.status, "offline",
                                                                                    "no such model")
    assert "detail" not in json.loads(p.status.final()[1])


def test_the_pull_progress_is_in_the_status_only_while_pulling() -> None:
    """Progress rides on 'pulling' statuses and is dropped from the next state."""
    p = make()
    p.status.set_state("pulling", note="pulling", progress=PullProgress(bytes_done=5, bytes_total=10, percent=50.0))
    p.status.set_state("loading", note="loading")
    first, second = p.link.statuses()
    assert first["progress"]["bytes_done"] == 5
    assert "progress" not in second


def test_online_reads_draining_mode_and_the_model_when_published() -> None:
    """publish() sends the serving state: 'draining' while draining, with the mode and the model served now."""
    p = make()
    p.status.set_state("online", note="serving")
    p.model.info, p.model.serving = INFO, ServingModel(key="tiny", quant="Q8_0", info=INFO)
    p.flags.update(draining=True, mode="offloading", commands="signed")
    p.status.publish()
    body = p.link.statuses()[-1]
    assert (body["state"], body["mode"], body["model"], body["quant"], body["n_ctx"], body["threads"],
            body["commands"]) == ("draining", "offloading", "tiny", "Q8_0", 512, 2, "signed")


def test_a_state_before_online_is_not_turned_into_draining() -> None:
    """The serving state is the start-up state until the device is online."""
    p = make()
    p.flags["draining"] = True
    p.status.set_state("pulling", note="pulling")
    assert p.status.serving_state() == "pulling"


# -- on connect -----------------------------------------------------------------------------------------


def test_on_connect_the_current_status_goes_first_then_discovery_then_the_buffer(tmp_path: Path) -> None:
    """Every (re)connect publishes the state current then, the HA configs, then replays what was buffered."""
    buffer = TelemetryBuffer(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    p = make(connected=False, buffer=buffer, telemetry={"ha_discovery": True})
    p.status.set_state("loading", note="loading")
    p.status.emit_event("pull_started", "first_start", {"bytes_total": 10})
    assert p.link.published == []
    p.link.connected = True
    p.status.connected()
    topics = p.link.topics()
    assert topics[0] == TOPICS.status
    assert p.link.statuses()[0]["state"] == "loading"
    assert any(t.startswith("homeassistant/") for t in topics[1:-1])
    assert topics[-1] == TOPICS.events
    assert json.loads(p.link.published[-1][1])["kind"] == "pull_started"


def test_on_connect_buffered_telemetry_is_replayed_on_its_own_topic_not_retained(tmp_path: Path) -> None:
    """Readings kept while offline go to telemetry/replay (where HA does not read), events to the events topic,
    in order and never retained: the retained telemetry is not overwritten with a reading of the past."""
    buffer = TelemetryBuffer(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    p = make(connected=False, buffer=buffer)
    p.status.send(TOPICS.telemetry, b'{"ts": 1}', retain=True)
    p.status.emit_event("failover", "local_broker_unreachable", {})
    p.status.send(TOPICS.telemetry, b'{"ts": 2}', retain=True)
    p.link.connected = True
    p.status.connected()
    replayed = [(t, json.loads(b), r) for t, b, r in p.link.published if t != TOPICS.status]
    assert [(t, r) for t, _, r in replayed] == [
        (TOPICS.telemetry_replay, False), (TOPICS.events, False), (TOPICS.telemetry_replay, False)]
    assert [body.get("ts") for t, body, _ in replayed if t == TOPICS.telemetry_replay] == [1, 2]
    assert TOPICS.telemetry not in p.link.topics()
    assert buffer.pending(now=0) == []


def test_a_send_with_records_left_replays_them_elsewhere_then_publishes_the_current_one(tmp_path: Path) -> None:
    """Connected again before the on-connect replay ran (paho reconnected, the main loop has not handled it):
    the kept readings go to the replay topic, not retained, and only the new reading is retained telemetry."""
    buffer = TelemetryBuffer(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    p = make(connected=False, buffer=buffer)
    p.status.send(TOPICS.telemetry, b'{"ts": 1}', retain=True)
    p.status.emit_event("failover", "local_broker_unreachable", {})
    p.link.connected = True
    p.status.send(TOPICS.telemetry, b'{"ts": 3}', retain=True)
    assert [(t, r) for t, _, r in p.link.published] == [
        (TOPICS.telemetry_replay, False), (TOPICS.events, False), (TOPICS.telemetry, True)]
    assert json.loads(p.link.published[-1][1]) == {"ts": 3}


def test_discovery_offers_the_command_buttons_only_to_a_device_running_unsigned_commands() -> None:
    """The fleet command policy decides: buttons for 'unsigned', empty (deleting) configs otherwise."""
    for policy, expected in (("unsigned", True), ("signed", False), ("refused", False)):
        p = make(telemetry={"ha_discovery": True})
        p.flags["commands"] = policy
        p.status.connected()
        buttons = [payload for t, payload, retain in p.link.published if t.startswith("homeassistant/button/")]
        assert len(buttons) == 3
        assert all(bool(b) is expected for b in buttons), policy
        assert all(retain for t, _, retain in p.link.published if t.startswith("homeassistant/"))


def test_without_discovery_on_connect_is_only_the_status() -> None:
    """HA discovery is off by default: a connect publishes the retained status alone."""
    p = make()
    p.status.set_state("online", note="serving")
    p.link.published.clear()
    p.status.connected()
    assert p.link.topics() == [TOPICS.status]


# -- events and telemetry ------------------------------------------------------------------------------


def test_events_carry_the_device_id_and_are_not_retained() -> None:
    """emit_event publishes an Event on the events topic, not retained."""
    p = make()
    p.status.emit_event("swap_started", "side_by_side", {})
    [(topic, payload, retain)] = p.link.published
    body = json.loads(payload)
    assert (topic, retain, body["kind"], body["reason"], body["device_id"]) == (
        TOPICS.events, False, "swap_started", "side_by_side", "dev1")


def test_without_a_buffer_nothing_is_sent_while_disconnected() -> None:
    """No writable buffer directory: telemetry and events sent while disconnected are dropped."""
    p = make(connected=False)
    p.status.send(TOPICS.telemetry, b"{}", retain=True)
    p.link.connected = True
    p.status.connected()
    assert TOPICS.telemetry not in p.link.topics()


def test_an_adaptation_is_an_event_and_a_status_only_when_the_mode_changed() -> None:
    """report_adaptation sends the event; the retained status follows only a mode change."""
    p = make()
    p.status.set_state("online", note="serving")
    p.link.published.clear()
    action = SetThreads(threads=2, previous=4, reason="thermal_soft")
    p.status.report_adaptation(action, False)
    assert p.link.topics() == [TOPICS.events]
    assert json.loads(p.link.published[0][1])["numbers"]["threads"] == 2
    p.status.report_adaptation(action, True)
    assert p.link.topics() == [TOPICS.events, TOPICS.events, TOPICS.status]
