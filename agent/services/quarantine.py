"""Messages that were being handled when the agent died, remembered across restarts.

A QoS 1 PUBLISH in flight when the process dies (a segfault in llama.cpp, the OOM killer, anything
that escaped) is redelivered by the broker with the DUP flag once the daemon is back. If that message
is what killed it, the persistent session turns one message into a crash loop until systemd gives up.
So before a *redelivered* message is handled, its fingerprint is charged one attempt here (written
atomically and fsynced, so the count survives the crash it may cause); when it is acknowledged after
normal handling the entry goes. A redelivery already charged :data:`QUARANTINE_AFTER` times is
quarantined (refused, acknowledged, never run again) by :class:`agent.services.bulkhead.Bulkhead`.

First deliveries are never charged: the normal path does no disk I/O. One crash therefore never
quarantines anything; a message is run at most ``1 + QUARANTINE_AFTER`` times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("agent.quarantine")

QUARANTINE_AFTER = 2
"""Charged attempts after which a redelivery is quarantined. With the uncharged first delivery that is
three crashes with the message running: one unlucky crash (or two) never costs a legitimate request,
and the four starts it takes stay under the unit's StartLimitBurst=5 (systemd/edge-agent.service)."""

MAX_ENTRIES = 64
"""Fingerprints kept; the oldest go first. Entries only live between a redelivery and its ack."""

FILE_NAME = "quarantine.json"


def fingerprint(topic: str, payload: bytes) -> str:
    """Identifies one message across restarts: the broker redelivers the same topic and payload."""
    return hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\x00" + payload).hexdigest()


class QuarantineStore:
    """Attempt counts per fingerprint, in memory and in one small JSON file (rewritten atomically).

    Thread-safe: attempts are charged on the thread that starts the work, entries discarded on the
    thread that acknowledges. A write that fails (read-only or full disk) is logged and the count kept
    in memory only: serving goes on, and quarantine then only protects against in-process repeats.
    """

    def __init__(
        self, path: Path, *, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.time
    ) -> None:
        self._path = path
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = self._load()

    @property
    def path(self) -> Path:
        return self._path

    def __len__(self) -> int:
        return len(self._entries)

    def attempts(self, key: str) -> int:
        """How many times this fingerprint was charged (0 when unknown)."""
        with self._lock:
            entry = self._entries.get(key)
            return int(entry["attempts"]) if entry is not None else 0

    def charge(self, key: str, *, topic: str, size: int) -> int:
        """Count one more attempt and persist it before the work starts; returns the new count."""
        with self._lock:
            entry = self._entries.pop(key, None) or {"attempts": 0, "topic": topic, "bytes": size}
            entry["attempts"] = int(entry["attempts"]) + 1
            entry["at"] = round(self._clock(), 3)
            self._entries[key] = entry  # re-inserted last: dict order is age order
            while len(self._entries) > self._max:
                self._entries.pop(next(iter(self._entries)))
            self._save()
            return int(entry["attempts"])

    def discard(self, key: str) -> None:
        """Forget a fingerprint (its message was acknowledged); no I/O when it is not here."""
        with self._lock:
            if self._entries.pop(key, None) is not None:
                self._save()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("quarantine_store_unreadable", path=str(self._path), error=str(exc))
            return {}
        try:
            data = json.loads(raw)
            entries = {
                str(k): {"attempts": int(v["attempts"]), "topic": str(v.get("topic", "")),
                         "bytes": int(v.get("bytes", 0)), "at": float(v.get("at", 0.0))}
                for k, v in sorted(data.items(), key=lambda kv: float(kv[1].get("at", 0.0)))
            }
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
            # Losing the counts only lets a poison message run a few more times; refusing to start
            # over a damaged file would be worse.
            log.warning("quarantine_store_corrupt", path=str(self._path), error=f"{type(exc).__name__}: {exc}")
            return {}
        while len(entries) > self._max:
            entries.pop(next(iter(entries)))
        return entries

    def _save(self) -> None:
        body = json.dumps(self._entries, separators=(",", ":"), sort_keys=False).encode()
        try:
            _atomic_write(self._path, body)
        except OSError as exc:
            log.warning("quarantine_store_write_failed", path=str(self._path), error=str(exc))


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = ""
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
