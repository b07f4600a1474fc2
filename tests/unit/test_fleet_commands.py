"""FleetService without a broker: topic matching, signatures, idempotency, expiry, arguments, config-set."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import line_files
from agent.errors import ConfigError
from agent.fleet.service import FleetService
from agent.fleet.signing import load_private_key, sign_payload, write_keypair
from agent.fleet.store import JsonLru, NonceCache
from agent.fleet.wire import build_command
from agent.settings import OVERRIDES_FILE_NAME, load_config
from agent.transport.mqtt import Incoming
from agent.transport.topics import FleetTopics, FleetWideTopics, command_topic, is_result_topic, parse_target
from tests.support.fleet import FakeControl, make_settings

NOW = 1_700_000_000.0


class Sink:
    """Records what FleetService publishes and acknowledges."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.acked: list[int] = []
        self.changed = threading.Condition()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None, response_topic: str | None = None,
                message_expiry_s: int | None = None) -> None:
        with self.changed:
            self.sent.append((topic, json.loads(payload), correlation_data))
            self.changed.notify_all()

    def ack(self, message: Incoming) -> None:
        self.acked.append(message.mid)

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [body for t, body, _ in self.sent if t == topic]

    def wait_for(self, topic: str, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.on(topic)) >= count, timeout)
        return self.on(topic)


def incoming(topic: str, payload: dict[str, Any] | bytes, *, mid: int = 1, response_topic: str | None = None,
             correlation: bytes | None = None) -> Incoming:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Incoming(topic=topic, payload=raw, qos=1, mid=mid, dup=False, response_topic=response_topic,
                    correlation_data=correlation, message_expiry_s=None, received_at=time.monotonic())


RESULT = "edge/dev1/cmd/result"


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., tuple[FleetService, FakeControl, Sink]]:
    def _make(clock: float | Callable[[], float] = NOW, config_path: Path | None = None,
              control: FakeControl | None = None, **fleet: Any) -> tuple[FleetService, FakeControl, Sink]:
        settings = make_settings("dev1", ["blue", "kitchen"], **fleet)
        control = control or FakeControl()
        sink = Sink()
        service = FleetService(settings, control, sink.publish, config_path, tmp_path / "state", ack=sink.ack,
                               clock=clock if callable(clock) else lambda: clock)
        return service, control, sink
    return _make


@pytest.fixture
def signer(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys")


# -- topics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("edge/dev1/cmd/ping", ("device", "ping")),
        ("edge/group/blue/cmd/drain", ("group", "drain")),
        ("edge/group/kitchen/cmd/status", ("group", "status")),
        ("edge/fleet/cmd/reload", ("all", "reload")),
        ("edge/dev2/cmd/ping", None),
        ("edge/group/red/cmd/ping", None),
        ("edge/dev1/cmd/result", None),
        ("edge/dev1/infer", None),
        ("other/dev1/cmd/ping", None),
        ("edge/dev1/cmd/ping/extra", None),
        ("edge/fleet/infer", None),
    ],
)
def test_topic_matching_selects_exactly_this_devices_commands(topic: str, expected: tuple[str, str] | None) -> None:
    """Only this device's, its groups' and the fleet-wide command topics match; its own results do not."""
    topics = FleetTopics("edge", "dev1", ("blue", "kitchen"))
    target = topics.match(topic)
    assert (None if target is None else (target.scope, target.name)) == expected


def test_subscriptions_cover_device_groups_and_fleet() -> None:
    """One filter per scope, QoS 1."""
    topics = FleetTopics("edge", "dev1", ("blue",))
    assert topics.filters() == ["edge/dev1/cmd/+", "edge/group/blue/cmd/+", "edge/fleet/cmd/+"]


@pytest.mark.parametrize("device_id", ["group", "fleet", "cloud"])
def test_device_ids_that_collide_with_fleet_topics_are_refused(device_id: str) -> None:
    """A device named 'group', 'fleet' or 'cloud' would share other scopes' topics, so it is a config error."""
    with pytest.raises(ConfigError, match="collides"):
        FleetTopics("edge", device_id)


@pytest.mark.parametrize(("spec", "topic"), [("all", "edge/fleet/cmd/ping"), ("group:blue", "edge/group/blue/cmd/ping"),
                                             ("dev7", "edge/dev7/cmd/ping"), ("device:all", "edge/all/cmd/ping")])
def test_operator_targets_map_to_topics(spec: str, topic: str) -> None:
    """'all', 'group:NAME', a bare id and 'device:ID' address the matching topic."""
    assert command_topic("edge", *parse_target(spec), "ping") == topic


def test_fleet_wide_topics_are_the_documented_strings() -> None:
    """The fleet infer topic, its shared subscription, the ask reply topic and the operator's filters."""
    topics = FleetWideTopics("edge")
    assert (topics.infer, topics.shared_infer, topics.reply("op1")) == (
        "edge/fleet/infer", "$share/edge-workers/edge/fleet/infer", "edge/fleet/reply/op1")
    assert (topics.all_status, topics.all_telemetry, topics.all_results) == (
        "edge/+/status", "edge/+/telemetry", "edge/+/cmd/result")
    assert is_result_topic("edge/dev1/cmd/result") and not is_result_topic("edge/dev1/cmd/ping")


def test_fleet_wide_topics_read_back_a_device_report() -> None:
    """report() names the device and kind of a topic the status/telemetry filters match, and nothing else."""
    topics = FleetWideTopics("site/edge")
    assert topics.report("site/edge/dev1/status") == ("dev1", "status")
    assert topics.report("site/edge/dev1/telemetry") == ("dev1", "telemetry")
    for other in ("site/edge/dev1/telemetry/replay", "site/edge/dev1/cmd/result", "site/edge/fleet/reply/op1",
                  "other/edge/dev1/status", "site/dev1/status", "site/edge/dev1/events"):
        assert topics.report(other) is None, other


# -- execution and results --------------------------------------------------------------------------


def test_ping_answers_on_the_response_topic_and_the_result_topic(make: Callable[..., Any]) -> None:
    """The result goes to the Response Topic with correlation data echoed, and to the device's result topic."""
    service, _, sink = make()
    assert service.handle(incoming("edge/dev1/cmd/ping", {"id": "p1"}, response_topic="op/r", correlation=b"c"))
    assert sink.sent[0] == ("edge/dev1/cmd/result", sink.sent[0][1], None)
    topic, body, corr = sink.sent[1]
    assert (topic, corr) == ("op/r", b"c")
    assert body["id"] == "p1"
    assert body["ok"] is True
    assert body["device_id"] == "dev1"
    assert body["result"]["pong"] is True
    assert sink.acked == [1]


def test_reply_to_in_the_payload_is_used_without_a_response_topic(make: Callable[..., Any]) -> None:
    """An MQTT 3.1.1 caller's reply_to receives the result."""
    service, _, sink = make()
    service.handle(incoming("edge/fleet/cmd/ping", {"id": "p2", "reply_to": "op/old"}))
    assert sink.on("op/old")[0]["ok"] is True


def test_other_topics_are_not_handled(make: Callable[..., Any]) -> None:
    """handle() returns False and publishes nothing for a topic that is not a command for this device."""
    service, _, sink = make()
    assert not service.handle(incoming("edge/dev1/infer", {"id": "x"}))
    assert not service.handle(incoming("edge/dev1/cmd/result", {"id": "x"}))
    assert sink.sent == []


def test_duplicate_id_returns_the_stored_result_without_running_again(make: Callable[..., Any]) -> None:
    """A second delivery of the same id is answered from the store, marked duplicate, and not executed."""
    service, control, sink = make()
    service.handle(incoming("edge/dev1/cmd/drain", {"id": "d1"}))
    service.handle(incoming("edge/group/blue/cmd/drain", {"id": "d1"}, mid=2))
    assert control.names() == ["drain"]
    first, second = sink.on(RESULT)
    assert second == {**first, "duplicate": True}
    assert sink.acked == [1, 2]


def test_stored_results_survive_a_restart(make: Callable[..., Any]) -> None:
    """A new FleetService on the same state_dir still recognises an executed id."""
    service, _, _ = make()
    service.handle(incoming("edge/dev1/cmd/resume", {"id": "r1"}))
    again, control2, sink2 = make()
    again.handle(incoming("edge/dev1/cmd/resume", {"id": "r1"}))
    assert control2.names() == []
    assert sink2.on(RESULT)[0]["duplicate"] is True


def test_result_store_is_bounded(make: Callable[..., Any]) -> None:
    """Only the newest result_cache_size ids are kept; the oldest is forgotten."""
    service, control, _ = make(result_cache_size=16)
    for i in range(20):
        service.handle(incoming("edge/dev1/cmd/drain", {"id": f"d{i}"}))
    service.handle(incoming("edge/dev1/cmd/drain", {"id": "d0"}))
    service.handle(incoming("edge/dev1/cmd/drain", {"id": "d19"}))
    assert control.names().count("drain") == 21


def test_expired_command_is_refused_and_not_run(make: Callable[..., Any]) -> None:
    """A command past its expires_at gets the 'expired' error and nothing runs."""
    service, control, sink = make()
    service.handle(incoming("edge/dev1/cmd/restart", {"id": "e1", "expires_at": NOW - 1}))
    body = sink.on(RESULT)[0]
    assert (body["ok"], body["error"]["code"]) == (False, "expired")
    assert control.names() == []


@pytest.mark.parametrize(
    ("topic", "payload", "code", "fragment"),
    [
        ("edge/dev1/cmd/fly", {"id": "u1"}, "unknown_command", "fly"),
        ("edge/dev1/cmd/set-model", {"id": "b1", "args": {}}, "bad_request", "model"),
        ("edge/dev1/cmd/ping", {"id": "b2", "args": {"x": 1}}, "bad_request", "unknown field"),
        ("edge/dev1/cmd/ping", b"{nope", "bad_request", "JSON"),
        ("edge/dev1/cmd/ping", {"args": {}}, "bad_request", "id"),
        ("edge/dev1/cmd/ping", {"id": "b3", "cmd": "drain"}, "bad_request", "does not match"),
    ],
)
def test_unknown_commands_and_bad_args_get_an_error_and_the_device_carries_on(
    make: Callable[..., Any], topic: str, payload: Any, code: str, fragment: str
) -> None:
    """Each bad command is answered with an error result; a ping afterwards still works."""
    service, _, sink = make()
    service.handle(incoming(topic, payload))
    error = sink.on(RESULT)[0]["error"]
    assert error["code"] == code
    assert fragment in error["message"]
    service.handle(incoming("edge/dev1/cmd/ping", {"id": "after"}, mid=2))
    assert sink.on(RESULT)[-1]["ok"] is True


def test_failing_control_method_is_an_error_result(make: Callable[..., Any]) -> None:
    """An AgentError from the daemon becomes the result's error code."""
    control = FakeControl()
    control.fail.add("drain")
    service, _, sink = make(control=control)
    service.handle(incoming("edge/dev1/cmd/drain", {"id": "f1"}))
    assert sink.on(RESULT)[0]["error"]["code"] == "model_unavailable"


def test_slow_command_runs_on_the_worker_and_handle_returns_at_once(make: Callable[..., Any]) -> None:
    """pull does not block handle(); its result (and the ack) arrive when it finishes, and run once."""
    service, control, sink = make(control=FakeControl(delay_s=0.3))
    started = time.monotonic()
    service.handle(incoming("edge/dev1/cmd/pull", {"id": "s1", "args": {"model": "qwen"}}, response_topic="op/a"))
    service.handle(incoming("edge/dev1/cmd/pull", {"id": "s1", "args": {"model": "qwen"}}, mid=2,
                            response_topic="op/b"))
    assert time.monotonic() - started < 0.2
    assert sink.wait_for(RESULT, 1)[0]["result"] == {"pulled": "qwen", "quant": None}
    assert sink.wait_for("op/b", 1)[0]["ok"] is True
    assert sink.on("op/a")[0]["ok"] is True
    service.close()
    assert control.names() == ["pull"]
    assert sorted(sink.acked) == [1, 2]


# -- signatures -------------------------------------------------------------------------------------


def signed(name: str, target: str, key_path: Path, **overrides: Any) -> dict[str, Any]:
    payload = build_command(name, {}, *parse_target(target), now=NOW)
    payload.update(overrides)
    payload.pop("sig", None)
    return sign_payload(payload, load_private_key(key_path))


def test_valid_signature_is_accepted(make: Callable[..., Any], signer: tuple[Path, Path]) -> None:
    """A command signed by the fleet key, bound to its topic, runs."""
    service, control, sink = make(public_key=signer[1])
    assert service.signature_required
    service.handle(incoming("edge/group/blue/cmd/drain", signed("drain", "group:blue", signer[0])))
    assert sink.on(RESULT)[0]["ok"] is True
    assert control.names() == ["drain"]


@pytest.mark.parametrize("case", ["unsigned", "wrong_key", "tampered", "stale", "future", "rebound", "no_nonce"])
def test_invalid_signed_commands_are_refused_and_not_run(
    make: Callable[..., Any], signer: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    """Unsigned, wrong key, tampered, stale, moved to another topic or nonce-less: refused, nothing executed."""
    service, control, sink = make(public_key=signer[1])
    topic = "edge/dev1/cmd/drain"
    payload = signed("drain", "device:dev1", signer[0])
    expected = "bad_signature"
    if case == "unsigned":
        payload.pop("sig")
        expected = "unsigned"
    elif case == "wrong_key":
        other, _ = write_keypair(tmp_path / "other")
        payload = signed("drain", "device:dev1", other)
    elif case == "tampered":
        payload["args"] = {"force": True}
    elif case == "stale":
        payload = signed("drain", "device:dev1", signer[0], issued_at=NOW - 301)
        expected = "stale"
    elif case == "future":
        payload = signed("drain", "device:dev1", signer[0], issued_at=NOW + 301)
        expected = "stale"
    elif case == "rebound":
        topic = "edge/fleet/cmd/drain"
    elif case == "no_nonce":
        payload = signed("drain", "device:dev1", signer[0], nonce=None)
    service.handle(incoming(topic, payload, response_topic="attacker/topic"))
    assert [body["error"]["code"] for body in sink.on(RESULT)] == [expected]
    assert sink.on("attacker/topic") == []
    assert control.names() == []


def test_replayed_nonce_is_refused(make: Callable[..., Any], signer: tuple[Path, Path]) -> None:
    """A second command with a used nonce (under a new id) is refused as a replay, even after a restart."""
    service, control, _ = make(public_key=signer[1])
    first = signed("drain", "device:dev1", signer[0])
    service.handle(incoming("edge/dev1/cmd/drain", first))
    restarted, control2, sink2 = make(public_key=signer[1])
    replay = sign_payload({**first, "id": "other-id"}, load_private_key(signer[0]))
    restarted.handle(incoming("edge/dev1/cmd/drain", replay))
    assert sink2.on(RESULT)[0]["error"]["code"] == "replayed"
    assert control.names() == ["drain"]
    assert control2.names() == []


def test_redelivered_signed_command_gets_its_stored_result(make: Callable[..., Any], signer: tuple[Path, Path]) -> None:
    """The very same signed message delivered twice is a duplicate (stored result), not a replay error."""
    service, control, sink = make(public_key=signer[1])
    message = signed("drain", "device:dev1", signer[0])
    service.handle(incoming("edge/dev1/cmd/drain", message))
    service.handle(incoming("edge/dev1/cmd/drain", message, mid=2))
    first, second = sink.on(RESULT)
    assert second == {**first, "duplicate": True}
    assert control.names() == ["drain"]


def test_stale_and_future_commands_say_which_side_of_the_device_clock_they_are(
    make: Callable[..., Any], signer: tuple[Path, Path]
) -> None:
    """A refusal 'stale' names how far issued_at is behind or ahead of the device's clock, and the window."""
    service, _, sink = make(public_key=signer[1])
    service.handle(incoming("edge/dev1/cmd/drain", signed("drain", "device:dev1", signer[0], issued_at=NOW + 3600)))
    service.handle(incoming("edge/dev1/cmd/drain", signed("drain", "device:dev1", signer[0], issued_at=NOW - 3600),
                            mid=2))
    assert [r["error"]["message"] for r in sink.on(RESULT)] == [
        "command issued_at is 3600 s ahead of this device's clock (window 300 s); check the clocks",
        "command issued_at is 3600 s behind this device's clock (window 300 s); check the clocks",
    ]


class Clock:
    """A wall clock the test steps, like an NTP correction would."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_replay_after_the_clock_steps_back_is_refused_once_its_id_left_the_result_store(
    make: Callable[..., Any], signer: tuple[Path, Path]
) -> None:
    """A command accepted while the clock is 1 h ahead does not make the device forget the nonces of commands
    issued before: once the clock steps back, a command captured before the jump is refused 'replayed' even
    after its id has left the result store."""
    clock = Clock()
    service, control, sink = make(clock=clock, public_key=signer[1], result_cache_size=16)
    captured = signed("drain", "device:dev1", signer[0])
    service.handle(incoming("edge/dev1/cmd/drain", captured))
    clock.now = NOW + 3600
    service.handle(incoming("edge/dev1/cmd/drain", signed("drain", "device:dev1", signer[0], issued_at=NOW + 3600)))
    clock.now = NOW
    for _ in range(16):  # push the captured id out of the result store
        service.handle(incoming("edge/dev1/cmd/drain", signed("drain", "device:dev1", signer[0])))
    assert control.names().count("drain") == 18
    service.handle(incoming("edge/dev1/cmd/drain", captured))
    assert sink.on(RESULT)[-1]["error"]["code"] == "replayed"
    assert control.names().count("drain") == 18


def test_nonces_are_forgotten_by_count_only_oldest_accepted_first(tmp_path: Path) -> None:
    """The nonce cache keeps the newest nonce_cache_size nonces whatever their issued_at, across a restart."""
    cache = NonceCache(tmp_path / "nonces.jsonl", 16)
    assert cache.use("n-0", NOW)
    for i, issued in enumerate([NOW - 86_400, NOW + 86_400, 0.0] * 5 + [NOW], start=1):
        assert cache.use(f"n-{i}", issued)
    assert not cache.use("n-16", NOW)
    restarted = NonceCache(tmp_path / "nonces.jsonl", 16)
    assert [restarted.seen(f"n-{i}") for i in (0, 1, 16)] == [False, True, True]


def test_a_nonce_journal_from_an_earlier_release_still_refuses_its_nonces(tmp_path: Path) -> None:
    """nonces.jsonl keeps its format ([nonce, issued_at] per line): nonces written before the upgrade are known."""
    path = tmp_path / "nonces.jsonl"
    path.write_text('["old-nonce-1",1700000000.0]\n["old-nonce-2",1699999000.5]\n')
    cache = NonceCache(path, 16)
    assert (cache.seen("old-nonce-1"), cache.seen("old-nonce-2")) == (True, True)
    assert not cache.use("old-nonce-1", NOW)


def test_without_a_key_every_command_is_refused_naming_the_fix(make: Callable[..., Any]) -> None:
    """No key and no allow_unsigned: signed or not, every command is refused 'no_fleet_key' on the device's
    own result topic only (never the sender's), with the two fixes named; nothing runs, the message is acked."""
    service, control, sink = make(allow_unsigned=False)
    assert (service.policy, service.signature_required) == ("refused", True)
    service.handle(incoming("edge/dev1/cmd/drain", {"id": "d-1"}, response_topic="op/replies"))
    service.handle(incoming("edge/fleet/cmd/ping", {"id": "p-1", "sig": "AAAA", "reply_to": "op/r"}, mid=2))
    service.handle(incoming("edge/dev1/cmd/ping", b"\xff not json", mid=3))
    refusals = sink.on(RESULT)
    assert [(r.get("id"), r["error"]["code"]) for r in refusals] == [
        ("d-1", "no_fleet_key"), ("p-1", "no_fleet_key"), (None, "no_fleet_key")]
    message = refusals[0]["error"]["message"]
    assert "fleet_pubkey" in message
    assert "fleet.allow_unsigned = true" in message
    assert sink.on("op/replies") == sink.on("op/r") == []
    assert control.names() == []
    assert sink.acked == [1, 2, 3]


def test_every_start_says_how_commands_are_authenticated(make: Callable[..., Any],
                                                         signer: tuple[Path, Path]) -> None:
    """allow_unsigned without a key logs fleet_unsigned_commands_allowed (warning) at each start; no key logs
    fleet_commands_refused_no_key; a key logs fleet_signed_commands_required, and allow_unsigned beside it
    is reported as ignored."""
    with capture_logs() as logs:
        make(allow_unsigned=True)
        make(allow_unsigned=True)
        make(allow_unsigned=False)
        make(public_key=signer[1], allow_unsigned=True)
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [
        ("fleet_unsigned_commands_allowed", "warning"),
        ("fleet_unsigned_commands_allowed", "warning"),
        ("fleet_commands_refused_no_key", "warning"),
        ("fleet_allow_unsigned_ignored", "warning"),
        ("fleet_signed_commands_required", "info"),
    ]


def test_a_key_requires_signatures_even_with_allow_unsigned(make: Callable[..., Any],
                                                            signer: tuple[Path, Path]) -> None:
    """allow_unsigned only matters without a key: with one, an unsigned command is refused 'unsigned'."""
    service, control, sink = make(public_key=signer[1], allow_unsigned=True)
    assert service.policy == "signed"
    service.handle(incoming("edge/dev1/cmd/drain", {"id": "d-1"}))
    service.handle(incoming("edge/dev1/cmd/drain", signed("drain", "device:dev1", signer[0]), mid=2))
    assert [r["ok"] if r["ok"] else r["error"]["code"] for r in sink.on(RESULT)] == ["unsigned", True]
    assert control.names() == ["drain"]


def test_status_reports_the_command_policy(make: Callable[..., Any]) -> None:
    """The status command says how this device treats fleet commands ('unsigned' here)."""
    service, _, sink = make(allow_unsigned=True)
    service.handle(incoming("edge/dev1/cmd/status", {"id": "s-1"}))
    result = sink.on(RESULT)[0]["result"]
    assert (result["commands"], result["signature_required"]) == ("unsigned", False)


@pytest.mark.parametrize("value", [True, False])
def test_removed_require_signature_stops_the_config_naming_the_replacement(tmp_path: Path, value: bool) -> None:
    """fleet.require_signature (removed) in the file is a config error naming the key path and allow_unsigned."""
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "dev1"\n[fleet]\nrequire_signature = {str(value).lower()}\n'
                      f'state_dir = "{tmp_path / "state"}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, required=True, environ={})
    assert "fleet.require_signature: fleet.require_signature was removed" in str(caught.value)
    assert "fleet.allow_unsigned = true" in str(caught.value)


def test_signatures_default_on_with_the_systemd_credential(
    make: Callable[..., Any], signer: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet_pubkey credential in $CREDENTIALS_DIRECTORY turns signatures on without any config."""
    creds = signer[1].parent / "creds"
    creds.mkdir()
    (creds / "fleet_pubkey").write_bytes(signer[1].read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    service, _, _ = make()
    assert service.signature_required


# -- config -----------------------------------------------------------------------------------------

# The same values make_settings() uses, so the file and the running settings agree before the edit.
CONFIG = (
    'device_id = "dev1"\ngroups = ["blue", "kitchen"]\n[mqtt]\nhost = "127.0.0.1"\n'
    "reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n[fleet]\nallow_unsigned = true\n"
)


def test_config_set_persists_applies_and_reports(make: Callable[..., Any], tmp_path: Path) -> None:
    """A valid config-set goes to the override layer (the file is untouched), is applied, and config-get sees
    it with its source."""
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG)
    layer = tmp_path / "state" / OVERRIDES_FILE_NAME
    service, _, sink = make(config_path=path)
    service.handle(incoming("edge/dev1/cmd/config-set",
                            {"id": "cs1", "args": {"key": "inference.max_queue", "value": 3}}))
    result = sink.wait_for(RESULT, 1)[0]["result"]
    assert result["changed"] == ["inference.max_queue"]
    assert result["applied"] == ["inference.max_queue"]
    assert (result["persisted"], result["layer"]) == (str(layer), "fleet-override")
    assert result["sources"] == {"inference.max_queue": f"fleet-override:{layer}"}
    assert tomllib.loads(layer.read_text()) == {"inference": {"max_queue": 3}}
    assert path.read_text() == CONFIG
    service.handle(incoming("edge/dev1/cmd/config-get", {"id": "cg1", "args": {"key": "inference.max_queue"}}))
    assert sink.on(RESULT)[-1]["result"] == {"key": "inference.max_queue", "value": 3,
                                             "source": f"fleet-override:{layer}"}
    service.handle(incoming("edge/dev1/cmd/config-get", {"id": "cg2", "args": {"key": "mqtt"}}))
    sources = sink.wait_for(RESULT, 3)[-1]["result"]["sources"]
    assert (sources["mqtt.host"], sources["mqtt.keepalive_s"]) == (f"file:{path}", "default")
    service.close()


def test_config_set_null_removes_the_override(make: Callable[..., Any], tmp_path: Path) -> None:
    """value null removes the key from the override layer: the file's value applies again."""
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG + "[inference]\nmax_queue = 6\n")
    service, _, sink = make(config_path=path)
    service.handle(incoming("edge/dev1/cmd/config-set",
                            {"id": "s1", "args": {"key": "inference.max_queue", "value": 2}}))
    service.handle(incoming("edge/dev1/cmd/config-set",
                            {"id": "s2", "args": {"key": "inference.max_queue", "value": None}}))
    result = sink.wait_for(RESULT, 2)[-1]["result"]
    service.close()
    assert result["sources"] == {"inference.max_queue": f"file:{path}"}
    assert not (tmp_path / "state" / OVERRIDES_FILE_NAME).exists()


def test_config_set_bad_value_is_refused_with_the_key_path(make: Callable[..., Any], tmp_path: Path) -> None:
    """A bad value yields 'bad_config' naming the key; the file, the override layer and the daemon are unchanged."""
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG)
    service, control, sink = make(config_path=path)
    service.handle(incoming("edge/dev1/cmd/config-set",
                            {"id": "cs2", "args": {"key": "inference.max_queue", "value": "lots"}}))
    error = sink.wait_for(RESULT, 1)[0]["error"]
    service.close()
    assert error["code"] == "bad_config"
    assert "inference.max_queue" in error["message"]
    assert path.read_text() == CONFIG
    assert not (tmp_path / "state" / OVERRIDES_FILE_NAME).exists()
    assert control.names() == []


# -- the persisted store ----------------------------------------------------------------------------


def test_store_skips_a_torn_last_line_and_keeps_the_rest(tmp_path: Path) -> None:
    """A half-written journal line (power cut) is ignored; complete entries survive."""
    path = tmp_path / "r.jsonl"
    store = JsonLru(path, 16)
    store.put("a", {"ok": True})
    store.put("b", {"ok": False})
    with path.open("ab") as f:
        f.write(b'["c", {"ok"')
    reloaded = JsonLru(path, 16)
    assert (reloaded.get("a"), reloaded.get("b"), reloaded.get("c")) == ({"ok": True}, {"ok": False}, None)


def test_store_compacts_its_journal_and_stays_bounded(tmp_path: Path) -> None:
    """After many puts the file holds at most twice the bound in lines and reloads to the newest entries."""
    path = tmp_path / "r.jsonl"
    store = JsonLru(path, 16)
    for i in range(100):
        store.put(f"k{i}", i)
    assert len(path.read_text().splitlines()) <= 32
    reloaded = JsonLru(path, 16)
    assert len(reloaded) == 16
    assert (reloaded.get("k99"), reloaded.get("k84"), reloaded.get("k83")) == (99, 84, None)


def test_store_appends_after_a_torn_last_line_without_losing_the_new_entry(tmp_path: Path) -> None:
    """A put after a power cut mid-append starts a new line: only the torn one is skipped on the next load."""
    path = tmp_path / "r.jsonl"
    JsonLru(path, 16).put("a", 1)
    with path.open("ab") as f:
        f.write('["b", "ü'.encode()[:-1])  # torn inside a multi-byte character, too
    store = JsonLru(path, 16)
    store.put("c", 3)
    reloaded = JsonLru(path, 16)
    assert (reloaded.get("a"), reloaded.get("b"), reloaded.get("c")) == (1, None, 3)


class DiskFull:
    """Stands in for ``os`` in agent.line_files (the journals' appends): after ``room`` more bytes, writes fail
    with ENOSPC."""

    def __init__(self, room: int = 0) -> None:
        self.room = room

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, bytes(data[: self.room]))
        self.room -= written
        return written


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> DiskFull:
    """The fleet journals' disk, with plenty of room until a test sets ``room``."""
    fake = DiskFull(room=1 << 30)
    monkeypatch.setattr(line_files, "os", fake)
    return fake


def test_a_write_cut_short_by_a_full_disk_leaves_only_whole_lines(tmp_path: Path, disk: DiskFull) -> None:
    """A put that fills the disk mid-line is kept in memory and cut off the file; once there is room again the
    next put also writes it, so a restart reads every entry and skips nothing."""
    path = tmp_path / "r.jsonl"
    store = JsonLru(path, 16)
    store.put("a", {"ok": True})
    disk.room = 5
    store.put("b", {"ok": False})
    assert store.get("b") == {"ok": False}
    assert path.read_bytes() == b'["a",{"ok":true}]\n'
    disk.room = 1 << 30
    store.put("c", {"ok": True})
    with capture_logs() as logs:
        reloaded = JsonLru(path, 16)
    assert [reloaded.get(k) for k in "abc"] == [{"ok": True}, {"ok": False}, {"ok": True}]
    assert logs == []


def test_a_full_state_dir_still_runs_signed_commands_and_refuses_their_replays(
    make: Callable[..., Any], signer: tuple[Path, Path], disk: DiskFull
) -> None:
    """With every journal write refused (ENOSPC), signed commands still run, each journal logs one warning for
    the episode (not one per command), and the nonces and results kept in memory still refuse a replay and
    answer a redelivery; when writes work again each journal logs its recovery and saves what it missed, so a
    restart refuses the replay too."""
    disk.room = 0
    with capture_logs() as logs:
        service, control, sink = make(public_key=signer[1])
        first = signed("drain", "device:dev1", signer[0])
        service.handle(incoming("edge/dev1/cmd/drain", first))
        service.handle(incoming("edge/dev1/cmd/drain", signed("drain", "device:dev1", signer[0]), mid=2))
        service.handle(incoming("edge/dev1/cmd/drain", first, mid=3))
        replay = sign_payload({**first, "id": "other-id"}, load_private_key(signer[0]))
        service.handle(incoming("edge/dev1/cmd/drain", replay, mid=4))
    outcomes = ["duplicate" if r.get("duplicate") else "ok" if r["ok"] else r["error"]["code"]
                for r in sink.on(RESULT)]
    assert outcomes == ["ok", "ok", "duplicate", "replayed"]
    assert control.names() == ["drain", "drain"]
    failed = [e for e in logs if e["event"] == "fleet_state_write_failed"]
    assert sorted(Path(e["path"]).name for e in failed) == ["nonces.jsonl", "results.jsonl"]
    assert {(e["errno"], e["log_level"]) for e in failed} == {("ENOSPC", "warning")}

    disk.room = 1 << 30
    with capture_logs() as logs:
        service.handle(incoming("edge/dev1/cmd/drain", signed("drain", "device:dev1", signer[0]), mid=5))
    recovered = [e for e in logs if e["event"] == "fleet_state_write_recovered"]
    assert sorted((Path(e["path"]).name, e["saved_late"]) for e in recovered) == [
        ("nonces.jsonl", 2), ("results.jsonl", 2)]
    restarted, control2, sink2 = make(public_key=signer[1])
    restarted.handle(incoming("edge/dev1/cmd/drain", replay))
    assert sink2.on(RESULT)[0]["error"]["code"] == "replayed"
    assert control2.names() == []


def test_after_a_restart_on_a_full_disk_an_unsaved_nonce_is_bounded_by_the_window_only(
    make: Callable[..., Any], signer: tuple[Path, Path], disk: DiskFull
) -> None:
    """The documented trade-off: a nonce the full disk never took is forgotten by a restart, so a replay under a
    new id runs while issued_at is inside signature_window_s, and is refused 'stale' after it."""
    disk.room = 0
    service, control, _ = make(public_key=signer[1])
    first = signed("drain", "device:dev1", signer[0])
    service.handle(incoming("edge/dev1/cmd/drain", first))
    replay = sign_payload({**first, "id": "other-id"}, load_private_key(signer[0]))
    inside, control_inside, _ = make(public_key=signer[1])
    inside.handle(incoming("edge/dev1/cmd/drain", replay))
    assert control_inside.names() == ["drain"]
    later, _, sink = make(clock=NOW + 301, public_key=signer[1])
    later.handle(incoming("edge/dev1/cmd/drain", sign_payload({**first, "id": "third-id"},
                                                             load_private_key(signer[0]))))
    assert control.names() == ["drain"]
    assert sink.on(RESULT)[0]["error"]["code"] == "stale"
