"""A bounded, crash-safe on-disk buffer for telemetry produced while the broker is unreachable.

One JSON-lines file, append-only: each record is written whole and fsync'ed, so after a power cut the
file holds every record that was appended before it, plus at most one torn last line, which is
skipped on read (and a fresh newline keeps the next record separate). When the file would grow past
``max_bytes`` it is compacted -- records older than ``max_age_s`` and then the oldest ones dropped --
into a temporary file that atomically replaces the old one, so a crash mid-compaction leaves either
the old or the new file, never a mix.

Replay is at-least-once: records are removed only after every one of them was handed to ``publish``;
a crash in between republishes them (each carries its original ``ts``, so consumers can deduplicate).
Where a replayed record is published is the caller's choice (the status service sends telemetry to
``{prefix}/{device_id}/telemetry/replay``, so a reading of the past is never taken for the current one).

A full or failing disk never reaches the caller: a record that cannot be written is dropped (logged once
per episode, not per record, and once more with the count when writing works again), and a write cut
short is cut back off the file, so what is on disk stays whole records only.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.line_files import append_lines, write_error_fields

log = structlog.get_logger("agent.telemetry")

BUFFER_FILE = "telemetry.jsonl"


@dataclass(frozen=True, slots=True)
class Buffered:
    """One kept message: its topic, payload and the time it was produced (unix seconds)."""

    ts: float
    topic: str
    payload: bytes


def _line(record: Buffered) -> bytes:
    return (
        json.dumps(
            {"ts": record.ts, "topic": record.topic, "payload": record.payload.decode("utf-8")},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        + "\n"
    ).encode()


def _parse(line: bytes) -> Buffered | None:
    try:
        data = json.loads(line)
        return Buffered(ts=float(data["ts"]), topic=str(data["topic"]), payload=str(data["payload"]).encode())
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):  # a damaged line: skipped
        return None


class TelemetryBuffer:
    """Keep messages on disk while offline; hand them back in order, oldest first."""

    def __init__(self, directory: Path, *, max_bytes: int, max_age_s: float) -> None:
        self._dir = directory
        self._path = directory / BUFFER_FILE
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._failing: OSError | None = None  # the write error of the current episode, if any
        self._dropped = 0  # records dropped in that episode
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self._path

    def size_bytes(self) -> int:
        try:
            return self._path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, topic: str, payload: bytes, ts: float) -> bool:
        """Keep one message (payload must be UTF-8 text, as every JSON payload is).

        False when it was not kept: too large, or the disk refused it (full, read-only, I/O error).
        """
        line = _line(Buffered(ts, topic, payload))
        if len(line) > self._max_bytes:
            log.warning("telemetry_buffer_record_too_large", bytes=len(line), max_bytes=self._max_bytes)
            return False
        with self._lock:
            try:
                if self.size_bytes() + len(line) + 1 > self._max_bytes:
                    self._compact(now=ts, room_for=len(line) + 1)
                append_lines(self._path, line)
            except OSError as exc:
                self._write_failed(exc)
                return False
            if self._failing is not None:
                log.info("telemetry_buffer_write_recovered", dropped=self._dropped, path=str(self._path))
                self._failing, self._dropped = None, 0
        return True

    def pending(self, now: float) -> list[Buffered]:
        """Every kept message not older than max_age_s, oldest first; torn or corrupt lines are skipped."""
        with self._lock:
            return self._read(now)

    def drain(self, publish: Callable[[str, bytes], None], now: float) -> int:
        """Hand every pending message to ``publish`` in order, then forget them; returns how many.

        If ``publish`` raises, the messages not yet handed over are kept for the next drain.
        """
        with self._lock:
            records = self._read(now)
            for i, record in enumerate(records):
                try:
                    publish(record.topic, record.payload)
                except Exception:
                    with contextlib.suppress(OSError):  # kept whole if the rewrite fails: republished later
                        self._rewrite(records[i:])
                    raise
            if records or self._path.exists():
                self._forget_all()
        if records:
            log.info("telemetry_buffer_replayed", records=len(records))
        return len(records)

    def send(
        self,
        topic: str,
        payload: bytes,
        ts: float,
        *,
        connected: bool,
        publish: Callable[[str, bytes], None],
        replay: Callable[[str, bytes], None] | None = None,
    ) -> None:
        """Publish now (after replaying anything older, to keep the order) when connected, else keep it.

        The older records go to ``replay`` (default ``publish``): they are the past, and the caller may want
        them published differently from the message of now (another topic, not retained).
        """
        if not connected:
            self.append(topic, payload, ts)
            return
        if self.size_bytes():
            self.drain(replay or publish, now=ts)
        publish(topic, payload)

    # -- internals (lock held) ---------------------------------------------------------------------

    def _write_failed(self, exc: OSError) -> None:
        self._dropped += 1
        if self._failing is None:
            # Once per episode: the daemon appends every telemetry tick, and a full disk stays full.
            self._failing = exc
            log.warning(
                "telemetry_buffer_write_failed",
                path=str(self._path),
                **write_error_fields(exc),
                effect="telemetry produced while the broker is unreachable is dropped until the disk accepts "
                "writes again (free space where telemetry.buffer_dir is)",
            )

    def _forget_all(self) -> None:
        try:
            self._rewrite([])
        except OSError:
            # An empty replacement could not be made (no inode left, read-only): truncating in place
            # needs no space. If even that fails the records stay and are replayed again (at-least-once).
            with contextlib.suppress(OSError):
                os.truncate(self._path, 0)

    def _read(self, now: float) -> list[Buffered]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return []
        records = []
        skipped = 0
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                skipped += 1
            elif now - record.ts <= self._max_age_s:
                records.append(record)
        if skipped:
            log.warning("telemetry_buffer_lines_skipped", lines=skipped, path=str(self._path))
        return records

    def _compact(self, now: float, room_for: int) -> None:
        records = self._read(now)
        sizes = [len(_line(r)) for r in records]
        total, start = sum(sizes), 0
        while start < len(records) and total + room_for > self._max_bytes:
            total -= sizes[start]
            start += 1
        if start:
            log.warning("telemetry_buffer_dropped_oldest", records=start, max_bytes=self._max_bytes)
        self._rewrite(records[start:])

    def _rewrite(self, records: list[Buffered]) -> None:
        tmp = self._path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as f:
                for record in records:
                    f.write(_line(record))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # the old file is untouched; do not leave a half copy taking space
            raise
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
