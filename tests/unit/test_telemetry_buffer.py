"""The offline telemetry buffer: order, limits, and surviving crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.services.telemetry_buffer import Buffered, TelemetryBuffer

T0 = 1_700_000_000.0


def payload(i: int) -> bytes:
    return json.dumps({"ts": T0 + i, "n": i}).encode()


def make(tmp_path: Path, max_bytes: int = 100_000, max_age_s: float = 3600.0) -> TelemetryBuffer:
    return TelemetryBuffer(tmp_path / "buf", max_bytes=max_bytes, max_age_s=max_age_s)


def test_replay_is_in_order_with_original_payloads(tmp_path: Path) -> None:
    """Messages kept while offline come back oldest first, byte for byte, with their original timestamps."""
    buf = make(tmp_path)
    for i in range(5):
        buf.append("edge/d/telemetry", payload(i), T0 + i)
    sent: list[tuple[str, bytes]] = []
    assert buf.drain(lambda t, p: sent.append((t, p)), now=T0 + 10) == 5
    assert sent == [("edge/d/telemetry", payload(i)) for i in range(5)]
    assert buf.pending(T0 + 10) == []


def test_buffer_survives_a_restart(tmp_path: Path) -> None:
    """A new buffer object on the same directory (a restarted daemon) sees what the old one kept."""
    make(tmp_path).append("t", payload(1), T0)
    assert make(tmp_path).pending(T0) == [Buffered(T0, "t", payload(1))]


def test_torn_last_line_is_skipped_and_later_records_stay_separate(tmp_path: Path) -> None:
    """A line cut short by a power loss is ignored, and the next append still starts on its own line."""
    buf = make(tmp_path)
    buf.append("t", payload(1), T0 + 1)
    buf.append("t", payload(2), T0 + 2)
    data = buf.path.read_bytes()
    buf.path.write_bytes(data[:-7])  # crash in the middle of writing record 2
    buf = make(tmp_path)
    assert [r.payload for r in buf.pending(T0 + 3)] == [payload(1)]
    buf.append("t", payload(3), T0 + 3)
    assert [r.payload for r in buf.pending(T0 + 3)] == [payload(1), payload(3)]


def test_over_size_drops_the_oldest(tmp_path: Path) -> None:
    """When the file would exceed max_bytes the oldest records go, the newest stay, and the size holds."""
    buf = make(tmp_path, max_bytes=1000)
    for i in range(100):
        buf.append("edge/d/telemetry", payload(i), T0 + i)
        assert buf.size_bytes() <= 1000
    kept = [json.loads(r.payload)["n"] for r in buf.pending(T0 + 100)]
    assert kept == list(range(100 - len(kept), 100))
    assert 5 < len(kept) < 20


def test_records_older_than_max_age_are_not_replayed(tmp_path: Path) -> None:
    """A record past max_age_s is dropped at replay time."""
    buf = make(tmp_path, max_age_s=60)
    buf.append("t", payload(0), T0)
    buf.append("t", payload(1), T0 + 100)
    assert [r.ts for r in buf.pending(T0 + 120)] == [T0 + 100]


def test_failed_publish_keeps_the_rest_for_next_time(tmp_path: Path) -> None:
    """If publishing fails midway, the messages not yet handed over are kept, in order."""
    buf = make(tmp_path)
    for i in range(4):
        buf.append("t", payload(i), T0 + i)
    sent: list[bytes] = []

    def flaky(topic: str, body: bytes) -> None:
        if len(sent) == 2:
            raise ConnectionError("broker gone")
        sent.append(body)

    with pytest.raises(ConnectionError):
        buf.drain(flaky, now=T0 + 5)
    assert [r.payload for r in buf.pending(T0 + 5)] == [payload(2), payload(3)]


def test_send_buffers_while_offline_and_replays_before_the_new_one(tmp_path: Path) -> None:
    """send() keeps messages while disconnected and, once connected, publishes the backlog first."""
    buf = make(tmp_path)
    out: list[bytes] = []
    for i in range(3):
        buf.send("t", payload(i), T0 + i, connected=False, publish=lambda t, p: out.append(p))
    assert out == []
    buf.send("t", payload(3), T0 + 3, connected=True, publish=lambda t, p: out.append(p))
    assert out == [payload(i) for i in range(4)]
    assert buf.size_bytes() == 0


def test_send_hands_the_backlog_to_replay_and_only_the_new_one_to_publish(tmp_path: Path) -> None:
    """With ``replay`` given, the kept messages go there (in order) and ``publish`` gets only the one of now."""
    buf = make(tmp_path)
    replayed: list[tuple[str, bytes]] = []
    published: list[tuple[str, bytes]] = []
    for i in range(2):
        buf.send("t", payload(i), T0 + i, connected=False, publish=lambda t, p: published.append((t, p)))
    buf.send("t", payload(2), T0 + 2, connected=True, publish=lambda t, p: published.append((t, p)),
             replay=lambda t, p: replayed.append((t, p)))
    assert replayed == [("t", payload(0)), ("t", payload(1))]
    assert published == [("t", payload(2))]


def test_record_larger_than_the_buffer_is_refused(tmp_path: Path) -> None:
    """A single record bigger than max_bytes is not kept (it could never fit)."""
    buf = make(tmp_path, max_bytes=4096)
    buf.append("t", b'"' + b"x" * 5000 + b'"', T0)
    assert buf.pending(T0) == []
