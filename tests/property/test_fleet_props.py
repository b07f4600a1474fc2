"""Properties of fleet command handling (parsing, validation, signatures), through the bulkhead as the
daemon runs it: any payload on any command topic is acknowledged exactly once and reported exactly once
on the device's result topic; the caller is answered at most once; a signed command runs only as signed.
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.fleet.service import FleetService
from agent.fleet.signing import load_private_key, write_keypair
from agent.fleet.wire import build_command
from agent.services.bulkhead import Bulkhead
from agent.transport.mqtt import Incoming
from agent.transport.topics import is_concrete_topic
from tests.fuzz.payloads import MUTATORS, mutate, valid_command
from tests.property.conftest import asked_reply_topics
from tests.support.fake_link import RecordingLink
from tests.support.fleet import FakeControl, make_settings

NOW = 1_750_000_000.0
RESULT = "edge/dev1/cmd/result"
FAST = ("ping", "status", "config-get", "drain", "resume", "restart", "nosuch", "")
SLOW = ("plan", "set-model", "pull", "reload", "config-set")
SCOPES = ("edge/dev1/cmd/{}", "edge/group/blue/cmd/{}", "edge/fleet/cmd/{}")
_mids = itertools.count(1)


def _unique_id(prefix: str) -> str:
    """Unique, and of one length: a payload's length steers the mutators' draws, which replays must repeat."""
    return f"{prefix}-{uuid.uuid4().hex}"


class Harness:
    def __init__(self, state: Path, **fleet: Any) -> None:
        self.link = RecordingLink()
        self.control = FakeControl()
        self.service = FleetService(make_settings("dev1", ["blue"], **fleet), self.control, self.link.publish,
                                    state / "absent.toml", state / "fleet", ack=self.link.ack, clock=lambda: NOW)
        self.bulkhead = Bulkhead(self.link, max_bytes=lambda: 65_536, state_dir=state / "q")

    def deliver(self, topic: str, payload: bytes, response_topic: str | None) -> tuple[Incoming, list[Any]]:
        """Run one message as the daemon does; wait for a slow command; return it and what it caused."""
        mark = len(self.link.sent)
        message = Incoming(topic=topic, payload=payload, qos=1, mid=next(_mids), dup=False,
                           response_topic=response_topic, correlation_data=b"c", message_expiry_s=None,
                           received_at=time.monotonic())
        self.bulkhead.run(message, self.service.handle, self.service.refuse)
        deadline = time.monotonic() + 10
        while message.mid not in self.link.acked and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.001)  # a wrong second publish after the ack would land here
        return message, self.link.sent[mark:]


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def unsigned(state: Path) -> Iterator[Harness]:
    harness = Harness(state / "unsigned")
    yield harness
    harness.service.close(5)


@pytest.fixture(scope="module")
def signer(state: Path) -> tuple[Path, Path]:
    return write_keypair(state / "keys")


@pytest.fixture(scope="module")
def signed(state: Path, signer: tuple[Path, Path]) -> Iterator[Harness]:
    harness = Harness(state / "signed", public_key=signer[1])
    assert harness.service.signature_required
    yield harness
    harness.service.close(5)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
CONFIG_KEYS = ("inference.max_queue", "inference", "log.level", "mqtt.port", "fleet.state_dir", "x.y", "", ".",
               "model.n_ctx", "groups", "device_id")
args = st.fixed_dictionaries({}, optional={
    "key": st.sampled_from(CONFIG_KEYS) | st.text(max_size=10),
    "value": json_values,
    "values": st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=3) | json_values,
    "model": st.sampled_from(("auto", "tiny", "")) | json_values,
    "quant": st.sampled_from(("Q4_0", None)) | json_values,
})
command_bodies = st.fixed_dictionaries(
    {"id": st.text(max_size=130) | json_values},
    optional={"v": st.sampled_from((1, 2, "1", None)), "args": args | json_values, "issued_at": json_values,
              "expires_at": st.sampled_from((NOW - 1, NOW + 60, float("nan"), float("inf"))) | json_values,
              "nonce": st.text(max_size=20) | json_values, "cmd": st.sampled_from((*FAST, *SLOW)) | json_values,
              "target": st.sampled_from(("all", "device:dev1", "group:blue", "group:red")) | json_values,
              "reply_to": st.sampled_from(("caller/other", "", "a/#", "edge/dev1/cmd/result")) | json_values,
              "sig": st.text(max_size=20) | json_values, "zz": json_values},
)
response_topics = st.sampled_from((None, "caller/r", "caller/+", RESULT, "caller/" + "x" * 70_000))


def _check_once(harness: Harness, topic: str, message: Incoming, caused: list[tuple[str, dict[str, Any]]]) -> None:
    assert harness.link.acked.count(message.mid) == 1, "acknowledged exactly once"
    mine = topic.rsplit("/", 1)[-1] not in ("result", "")
    own = [body for t, body in caused if t == RESULT]
    assert len(own) == (1 if mine else 0), own
    for body in own:
        assert body["device_id"] == "dev1"
        assert body["ok"] is True or body["error"]["code"]
    others = [t for t, _ in caused if t != RESULT]
    assert len(others) == len(set(others)), f"a caller was answered twice: {others}"
    asked = asked_reply_topics(message)
    for t in others:
        assert is_concrete_topic(t)
        assert t in asked, f"answered on {t!r}, which nobody asked for"


@given(st.sampled_from(SCOPES), st.sampled_from((*FAST, *SLOW, "result")), command_bodies, response_topics)
def test_any_command_payload_is_acked_once_and_reported_once(
    unsigned: Harness, scope: str, name: str, body: dict[str, Any], response_topic: str | None
) -> None:
    """Any JSON object on any command topic (wrong types, bad args, expired, mismatched cmd/target):
    acknowledged once, one result on the device's result topic, at most one answer to the caller."""
    topic = scope.format(name)
    message, caused = unsigned.deliver(topic, json.dumps(body).encode(), response_topic)
    _check_once(unsigned, topic, message, caused)


@given(st.builds(str.format, st.sampled_from(SCOPES), st.sampled_from((*FAST, *SLOW))),
       st.randoms(use_true_random=False), st.sampled_from(sorted(MUTATORS)), response_topics)
def test_mutated_commands_are_acked_once_and_reported_once(
    unsigned: Harness, topic: str, rng: random.Random, kind: str, response_topic: str | None
) -> None:
    """Every mutation of a valid command (bytes, depth, unicode, surrogates, numbers...): acked once,
    reported once, the caller answered at most once."""
    _, payload = mutate(rng, valid_command(rng, _unique_id("cmd"), reply_to="caller/other"), kind)
    message, caused = unsigned.deliver(topic, payload, response_topic)
    _check_once(unsigned, topic, message, caused)


@given(st.binary(max_size=300), st.sampled_from(SCOPES), response_topics)
def test_random_bytes_on_command_topics(unsigned: Harness, payload: bytes, scope: str,
                                        response_topic: str | None) -> None:
    """Random bytes on a command topic: refused 'bad_request', acked once, reported once."""
    message, caused = unsigned.deliver(scope.format("ping"), payload, response_topic)
    _check_once(unsigned, scope.format("ping"), message, caused)
    assert [b["ok"] for t, b in caused if t == RESULT] in ([False], [True])


@given(st.builds(str.format, st.sampled_from(SCOPES), st.sampled_from(("drain", "resume", "status", "ping"))),
       st.randoms(use_true_random=False), st.sampled_from([None, *sorted(MUTATORS)]))
def test_a_signed_command_runs_only_as_it_was_signed(
    signed: Harness, signer: tuple[Path, Path], topic: str, rng: random.Random, kind: str | None
) -> None:
    """With signatures required: the signed command runs; a mutation of it runs only if it still parses to
    the very payload that was signed, and a refused one is answered on the result topic only (never on a
    topic the unauthenticated payload chose)."""
    name = topic.rsplit("/", 1)[-1]
    target = {"edge/dev1": ("device", "dev1"), "edge/group/blue": ("group", "blue"), "edge/fleet": ("all", None)}
    scope_name, value = target[topic.rsplit("/cmd/", 1)[0]]
    original = build_command(name, {}, scope_name, value, key=load_private_key(signer[0]),  # type: ignore[arg-type]
                             command_id=_unique_id("signed"), reply_to="caller/other", now=NOW)
    payload = json.dumps(original).encode() if kind is None else mutate(rng, original, kind)[1]
    calls = len(signed.control.calls)
    message, caused = signed.deliver(topic, payload, "caller/r")
    _check_once(signed, topic, message, caused)
    [result] = [body for t, body in caused if t == RESULT]
    try:
        as_signed = json.loads(payload) == original
    except (ValueError, RecursionError):
        as_signed = False
    if kind is None:
        assert result["ok"] is True, result
    if result["ok"]:
        assert as_signed, "a command ran that is not the one that was signed"
    else:
        assert len(signed.control.calls) == calls, "a refused command reached the device"
    if not as_signed:
        assert [t for t, _ in caused] == [RESULT], "an unauthenticated payload chose where to be answered"
