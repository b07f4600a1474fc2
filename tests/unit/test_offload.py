"""The offload decision as a table, the cloud settings, and what the relay sends to the cloud."""

from __future__ import annotations

import json

import pytest

from agent.config.cloud import CloudSettings
from agent.services.offload import Decision, OffloadFlags, _rewrite_request, expected_wait_ms, should_offload

ON = CloudSettings(enabled=True)  # queue high 4, low 1, retry_after_ms 5000
OFF = CloudSettings(enabled=False)


@pytest.mark.parametrize(
    ("depth", "wait", "deadline", "flags", "up", "settings", "expected"),
    [
        # nothing wrong: local
        (0, 0.0, None, OffloadFlags(), True, ON, Decision("local", "local", False)),
        (3, 3000.0, None, OffloadFlags(), True, ON, Decision("local", "local", False)),
        # queue overflow with hysteresis: enter at 4, stay down to 2, leave at 1
        (4, 4000.0, None, OffloadFlags(), True, ON, Decision("cloud", "queue_overflow", True)),
        (2, 2000.0, None, OffloadFlags(overflowing=True), True, ON, Decision("cloud", "queue_overflow", True)),
        (1, 1000.0, None, OffloadFlags(overflowing=True), True, ON, Decision("local", "local", False)),
        # overflow with the cloud down or disabled: stay local, the inference queue admits or refuses
        (4, 4000.0, None, OffloadFlags(), False, ON, Decision("local", "queue_overflow", True)),
        (6, 6000.0, None, OffloadFlags(), True, OFF, Decision("local", "queue_overflow", True)),
        # a deadline the local queue cannot meet
        (2, 2000.0, 1500, OffloadFlags(), True, ON, Decision("cloud", "deadline", False)),
        (2, 2000.0, 2500, OffloadFlags(), True, ON, Decision("local", "local", False)),
        (2, None, 10, OffloadFlags(), True, ON, Decision("local", "local", False)),  # no estimate yet: local
        (2, 9000.0, 1500, OffloadFlags(), False, ON, Decision("reject", "deadline", False, retry_after_ms=9000)),
        # the policy offloads (critical heat / battery)
        (0, 0.0, None, OffloadFlags(policy_offload=True), True, ON, Decision("cloud", "policy_offload", False)),
        (0, 0.0, None, OffloadFlags(policy_offload=True), False, ON,
         Decision("reject", "policy_offload", False, retry_after_ms=5000)),
        # no local model (loading, swapping, failed)
        (0, 0.0, None, OffloadFlags(model_available=False), True, ON, Decision("cloud", "model_unavailable", False)),
        (0, 0.0, None, OffloadFlags(model_available=False), True, OFF,
         Decision("reject", "model_unavailable", False, retry_after_ms=5000)),
    ],
)  # fmt: skip
def test_should_offload_table(depth, wait, deadline, flags, up, settings, expected: Decision) -> None:  # noqa: PLR0917
    """Local first; the cloud takes what this device should not serve; reject only when neither can."""
    got = should_offload(
        queue_depth=depth, expected_wait_ms=wait, deadline_ms=deadline, flags=flags, cloud_up=up, settings=settings
    )
    assert got == expected


def test_overflow_hysteresis_over_a_queue_sequence_does_not_flap() -> None:
    """A queue hovering between 2 and 3 after entering overflow stays offloading until it drains to 1."""
    flags = OffloadFlags()
    routes = []
    for depth in [0, 2, 3, 4, 3, 2, 3, 2, 3, 2, 1, 2, 3, 2]:
        d = should_offload(queue_depth=depth, expected_wait_ms=None, deadline_ms=None, flags=flags, cloud_up=True,
                           settings=ON)  # fmt: skip
        flags = OffloadFlags(overflowing=d.overflowing)
        routes.append(d.route[0])
    assert "".join(routes) == "lllcccccccllll"


def test_expected_wait_counts_the_running_request() -> None:
    """Wait = (queued + running) x average request time; unknown without an average."""
    assert expected_wait_ms(2, 1, 1, 500.0) == 1500.0
    assert expected_wait_ms(0, 0, 1, 500.0) == 0.0
    assert expected_wait_ms(3, 1, 1, None) is None


def test_expected_wait_counts_rounds_of_slots() -> None:
    """With four slots a request waits only when all are taken, then one average request per round ahead."""
    assert expected_wait_ms(0, 3, 4, 800.0) == 0.0  # a slot is free
    assert expected_wait_ms(0, 4, 4, 800.0) == 800.0  # all busy: the next to free is about a request away
    assert expected_wait_ms(3, 4, 4, 800.0) == 800.0
    assert expected_wait_ms(4, 4, 4, 800.0) == 1600.0
    assert expected_wait_ms(8, 4, 4, 800.0) == 2400.0


def test_cloud_settings_topics_and_link() -> None:
    """Topics are formatted from the prefix and device id; the link is always MQTT 5 with the cloud's host."""
    s = CloudSettings(enabled=True, host="cloud.example", port=8883, username="u", password="p")  # noqa: S106
    assert s.infer_topic_for("edge") == "edge/cloud/infer"
    assert s.shared_infer_topic("edge") == "$share/edge-cloud/edge/cloud/infer"
    assert s.reply_topic_for("edge", "pi1") == "edge/cloud/reply/pi1"
    link = s.mqtt("pi1")
    assert (link.host, link.port, link.protocol, link.tls, link.client_id) == (
        "cloud.example", 8883, "5", True, "edge-agent-pi1-relay",
    )  # fmt: skip
    assert link.password is not None
    assert link.password.get_secret_value() == "p"


def test_cloud_settings_refuse_a_flapping_band() -> None:
    """offload_queue_low must be below offload_queue_high."""
    with pytest.raises(ValueError, match="offload_queue_low"):
        CloudSettings(offload_queue_high=2, offload_queue_low=2)


def test_forwarded_request_carries_our_id_and_no_reply_to() -> None:
    """The cloud sees the id the caller will get back, and no 3.1.1 reply_to that would bypass the relay."""
    raw = json.dumps({"prompt": "hi", "reply_to": "caller/topic", "max_tokens": 3}).encode()
    assert json.loads(_rewrite_request(raw, "abc")) == {"prompt": "hi", "max_tokens": 3, "id": "abc"}
    assert _rewrite_request(b"not json", "abc") == b"not json"
