"""Persisted, bounded stores of the fleet service: the result store (an id runs once) and the nonce cache.

Both are :class:`JsonLru` journals under the state directory, best effort on a disk that refuses writes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog

from agent.fleet.config_edit import atomic_write
from agent.line_files import append_lines, write_error_fields

log = structlog.get_logger("agent.fleet")


class JsonLru:
    """A bounded, insertion-ordered map persisted as an append-only JSON-lines journal.

    Each put appends one fsynced line (O(1), no matter how many entries are kept); the journal is
    compacted by an atomic rewrite once it holds twice ``max_entries`` lines. A torn line (power cut
    mid-append) or an unreadable file is skipped and logged, never fatal: losing entries only weakens
    deduplication.

    Persisting is best effort: when the disk refuses a write (full, read-only, I/O error) the entry is
    still kept in memory and the put succeeds, so a device whose disk filled up still runs the commands
    that could repair it. One ``fleet_state_write_failed`` warning is logged per episode (not per put);
    the first write that works again also appends the entries the episode could not save and logs
    ``fleet_state_write_recovered``. A write cut short is truncated off again, so the journal holds
    whole lines only.
    """

    def __init__(self, path: Path, max_entries: int) -> None:
        self._path = path
        self._max = max_entries
        self._lock = threading.Lock()
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lines = 0
        # A write failure episode: whether one is on, and the keys put since that are not on disk yet.
        self._failing = False
        self._unsaved: set[str] = set()
        self._load()

    def _load(self) -> None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("fleet_state_unreadable", path=str(self._path), error=str(exc))
            return
        skipped = 0
        # Split the bytes, not decoded text: a line torn inside a multi-byte character must cost that
        # line only, and str.splitlines() would also split at U+2028 inside a (non-ASCII) JSON string.
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                key, value = json.loads(line)
            except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
                skipped += 1
                continue
            self._data.pop(str(key), None)
            self._data[str(key)] = value
            self._lines += 1
        if skipped:
            log.warning("fleet_state_lines_skipped", path=str(self._path), skipped=skipped)
        self._trim()

    def get(self, key: str) -> Any:
        with self._lock:
            return self._data.get(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def put(self, key: str, value: Any) -> None:
        """Keep ``key`` (newest) and persist it, best effort: a refused write is logged, not raised."""
        with self._lock:
            self._put(key, value)

    def put_new(self, key: str, value: Any) -> bool:
        """Keep ``key`` like :meth:`put` unless it is already kept; False then (check and put are atomic)."""
        with self._lock:
            if key in self._data:
                return False
            self._put(key, value)
            return True

    def _put(self, key: str, value: Any) -> None:
        self._data.pop(key, None)
        self._data[key] = value
        self._trim()
        # After a failed write, the entries the disk refused go out with the next one that works.
        keys = [k for k in self._data if k in self._unsaved or k == key] if self._unsaved else [key]
        try:
            if self._lines + len(keys) > 2 * self._max:
                self._compact()
            else:
                self._append(keys)
        except OSError as exc:
            self._write_failed(key, exc)
            return
        if self._failing:
            log.info("fleet_state_write_recovered", path=str(self._path), saved_late=len(keys) - 1)
            self._failing = False
            self._unsaved.clear()

    def _trim(self) -> None:
        while len(self._data) > self._max:
            key, _ = self._data.popitem(last=False)
            self._unsaved.discard(key)

    def _write_failed(self, key: str, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            # Once per episode: a full disk stays full, and every command would log it again.
            log.warning(
                "fleet_state_write_failed",
                path=str(self._path),
                **write_error_fields(exc),
                effect="commands still run; what they record is kept in memory only, so a restart before "
                "the disk accepts writes again forgets it (free space where fleet.state_dir is)",
            )
        self._unsaved.add(key)

    @staticmethod
    def _line(key: str, value: Any) -> bytes:
        return (json.dumps([key, value], separators=(",", ":"), ensure_ascii=False) + "\n").encode()

    def _append(self, keys: list[str]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        append_lines(self._path, b"".join(self._line(k, self._data[k]) for k in keys))
        self._lines += len(keys)

    def _compact(self) -> None:
        atomic_write(self._path, b"".join(self._line(k, v) for k, v in self._data.items()))
        self._lines = len(self._data)


class NonceCache:
    """Nonces of accepted signed commands: the newest ``max_entries``, however the wall clock moves.

    Entries are forgotten by count only, oldest accepted first, never by comparing their ``issued_at``
    with the clock. Pruning by the clock is unsafe on a device whose clock steps: a command accepted
    while the clock is 1 h ahead would prune every nonce issued before it, and once the clock steps
    back, a command captured before the jump is inside the window again with an unknown nonce, so a
    replay would run (once its id has left the result store). No clock rule can tell that a nonce will
    never be inside the window again, because the clock may step anywhere; a count can. ``issued_at`` is
    still stored (journal format unchanged) for whoever reads the file.
    """

    def __init__(self, path: Path, max_entries: int) -> None:
        self._store = JsonLru(path, max_entries)

    def seen(self, nonce: str) -> bool:
        return nonce in self._store

    def use(self, nonce: str, issued_at: float) -> bool:
        """Record ``nonce`` as used; False if it already was (a replay). Check and record are atomic.

        Recorded in memory before this returns, whether or not the disk accepted it, so the command may
        run and a replay arriving meanwhile is refused.
        """
        return self._store.put_new(nonce, issued_at)
