"""No single message may stop the daemon: the bulkhead every arrived message passes through.

For each message the daemon dispatches (inference requests on its own topic, the fleet share and the
cloud's shared topic; cancels; fleet commands), :meth:`Bulkhead.run`:

1. quarantines a redelivery that was running during :data:`~agent.services.quarantine.QUARANTINE_AFTER`
   earlier crashes (see :mod:`agent.services.quarantine`);
2. checks the payload's size, JSON nesting and element count before any parser sees it
   (:func:`agent.transport.limits.check_payload`);
3. runs the handler, and turns anything it raises (RecursionError, MemoryError, a validation error,
   a bug) into an error reply.

A refused message is answered by the handler's own ``refuse`` (each topic has its reply format and
its rules for where a reply may go), acknowledged exactly once, logged with a stable event
(``message_rejected``, ``handler_crashed``, ``message_quarantined``) and counted; then the next one
is served. Acknowledgements are observed through the link (:meth:`acked`), so a handler that already
acknowledged before it failed is never acknowledged twice (a second PUBACK could hit a reused id).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from agent.errors import AgentError, BadRequestError
from agent.services.quarantine import FILE_NAME, QUARANTINE_AFTER, QuarantineStore, fingerprint
from agent.transport.limits import (
    MAX_JSON_DEPTH,
    PayloadTooLargeError,
    TooDeepError,
    TooManyElementsError,
    check_payload,
)
from agent.transport.mqtt import Incoming

log = structlog.get_logger("agent.bulkhead")

TEST_CRASH_MARKER = b"__edge_test_native_crash__"
"""Tests only (EDGE_TEST_HOOKS=1): a payload holding it exits the process with :data:`TEST_CRASH_EXIT`
where its work starts, after the quarantine charge, as a segfault in llama.cpp would."""
TEST_CRASH_EXIT = 70
TEST_RAISE_MARKER = b"__edge_test_handler_raises__"
"""Tests only (EDGE_TEST_HOOKS=1): a payload holding it makes its handler raise RecursionError."""


class QuarantinedError(BadRequestError):
    """A redelivered message was running each time the agent crashed; it is refused, not run again."""

    code = "bad_request"


class Refuse(Protocol):
    """A handler's way to refuse a message: answer ``error`` where the sender asked (if it can be found
    safely), acknowledge the message; True when an error reply was sent."""

    def __call__(self, message: Incoming, error: AgentError) -> bool: ...


class AckLink(Protocol):
    """What the bulkhead needs from the link: acknowledge, and hear about every acknowledgement."""

    def ack(self, message: Incoming) -> None: ...
    def add_ack_listener(self, listener: Callable[[Incoming], None]) -> None: ...


@dataclass(slots=True)
class BulkheadCounters:
    rejected: int = 0  # refused with an error reply (limits, crashed handler)
    dropped: int = 0  # refused without anyone to answer (no reply address), or not ours
    quarantined: int = 0  # redeliveries refused after repeated crashes
    # The same refusals by limit (answered or not), for telemetry ``limits``.
    payload_bytes: int = 0
    json_depth: int = 0
    json_elements: int = 0


# check_payload's errors → the message_rejected log reason and the counter.
_LIMIT_REASONS: dict[type[BadRequestError], tuple[str, str]] = {
    PayloadTooLargeError: ("too_large", "payload_bytes"),
    TooDeepError: ("too_deep", "json_depth"),
    TooManyElementsError: ("too_many_elements", "json_elements"),
}


class Bulkhead:
    """Runs message handlers on the daemon's main thread so that nothing one message does escapes."""

    def __init__(
        self,
        link: AckLink,
        *,
        max_bytes: Callable[[], int],
        state_dir: Path | None,
        max_depth: int = MAX_JSON_DEPTH,
        max_elements: Callable[[], int | None] = lambda: None,
        on_quarantine: Callable[[Incoming, int], None] | None = None,
        test_hooks: bool = False,
    ) -> None:
        """``max_bytes`` and ``max_elements`` are read per message (a live config change applies to the
        next one); without a writable ``state_dir`` quarantine is off (logged) and the rest still protects
        the daemon."""
        self._link = link
        self._max_bytes = max_bytes
        self._max_depth = max_depth
        self._max_elements = max_elements
        self._on_quarantine = on_quarantine
        self._test_hooks = test_hooks
        self.counters = BulkheadCounters()
        self._store = QuarantineStore(state_dir / FILE_NAME) if state_dir is not None else None
        if self._store is None:
            log.warning("quarantine_disabled", reason="no writable state directory")
        elif len(self._store):
            log.info("quarantine_store_loaded", path=str(self._store.path), entries=len(self._store))
        self._current: Incoming | None = None
        self._current_acked = False
        self._lock = threading.Lock()
        link.add_ack_listener(self.acked)

    # -- the main thread ---------------------------------------------------------------------------

    def run(
        self, message: Incoming, handler: Callable[[Incoming], object], refuse: Refuse, *, charge: bool = True
    ) -> None:
        """Handle ``message`` with ``handler``; whatever happens, it ends answered or dropped, acked once.

        ``charge`` False: the handler only queues the work, and calls :meth:`charge` itself when the
        work starts (so requests merely waiting in the queue during a crash are not blamed for it). A
        handler returning exactly ``False`` did not take the message (not for us): it is acknowledged.
        """
        with self._lock:
            self._current, self._current_acked = message, False
        try:
            self._run(message, handler, refuse, charge=charge)
        finally:
            with self._lock:
                self._current = None

    def charge(self, message: Incoming) -> None:
        """Charge a redelivered message one attempt, just before its work starts (any thread, never raises)."""
        if message.dup and self._store is not None:
            self._charge(message, fingerprint(message.topic, message.payload))
        self._test_crash(message)

    def _run(self, message: Incoming, handler: Callable[[Incoming], object], refuse: Refuse, *, charge: bool) -> None:
        key: str | None = None
        store = self._store
        if message.dup and store is not None:
            key = fingerprint(message.topic, message.payload)
            attempts = store.attempts(key)
            if attempts >= QUARANTINE_AFTER:
                self._quarantine(message, refuse, attempts)
                return
        try:
            check_payload(message.payload, self._max_bytes(), self._max_depth, self._max_elements())
        except BadRequestError as exc:
            reason, limit = _LIMIT_REASONS.get(type(exc), ("too_large", "payload_bytes"))
            setattr(self.counters, limit, getattr(self.counters, limit) + 1)
            self._refuse(message, refuse, exc, reason)
            return
        if charge:
            if key is not None:
                self._charge(message, key)
            self._test_crash(message)
        try:
            taken = self._call(handler, message)
        except Exception as exc:  # the bulkhead: RecursionError, MemoryError, ValidationError, bugs
            self._crashed(message, refuse, exc)
            return
        if taken is False and not self._current_acked:
            log.debug("message_ignored", topic=message.topic)
            self._link.ack(message)

    # -- any thread --------------------------------------------------------------------------------

    def acked(self, message: Incoming) -> None:
        """Ack listener: the message was acknowledged, so it will not come back; forget its attempts."""
        with self._lock:
            if message is self._current:
                self._current_acked = True
        store = self._store
        if message.dup and store is not None and len(store):
            try:
                store.discard(fingerprint(message.topic, message.payload))
            except Exception:  # never let bookkeeping fail an acknowledgement
                log.exception("quarantine_discard_failed", topic=message.topic)

    def _call(self, handler: Callable[[Incoming], object], message: Incoming) -> object:
        if self._test_hooks and TEST_RAISE_MARKER in message.payload:
            raise RecursionError("maximum recursion depth exceeded (EDGE_TEST_HOOKS)")
        return handler(message)

    def _test_crash(self, message: Incoming) -> None:
        if self._test_hooks and TEST_CRASH_MARKER in message.payload:
            log.warning("test_native_crash", topic=message.topic, dup=message.dup)
            os._exit(TEST_CRASH_EXIT)

    # -- outcomes ----------------------------------------------------------------------------------

    def _charge(self, message: Incoming, key: str) -> None:
        assert self._store is not None
        try:
            attempts = self._store.charge(key, topic=message.topic, size=len(message.payload))
        except Exception:  # bookkeeping must never stop the work itself
            log.exception("quarantine_charge_failed", topic=message.topic)
            return
        log.warning("message_redelivered", topic=message.topic, bytes=len(message.payload), attempts=attempts,
                    quarantine_after=QUARANTINE_AFTER)

    def _crashed(self, message: Incoming, refuse: Refuse, exc: Exception) -> None:
        # Guarded: formatting may fail again (MemoryError); the answer and ack below matter more.
        with contextlib.suppress(Exception):
            log.error("handler_crashed", topic=message.topic, reason=type(exc).__name__, bytes=len(message.payload),
                      error=str(exc)[:200], exc_info=exc)
        if self._current_acked:
            # It was answered and acknowledged before the failure: nothing left to do for it.
            return
        self._refuse(message, refuse, AgentError(f"internal error ({type(exc).__name__}); the message was dropped"),
                     "handler_crashed")

    def _quarantine(self, message: Incoming, refuse: Refuse, attempts: int) -> None:
        error = QuarantinedError(
            f"quarantined: the agent crashed {attempts + 1} times while handling this message; it is not run again"
        )
        replied = self._answer(message, refuse, error)
        self.counters.quarantined += 1
        log.error("message_quarantined", topic=message.topic, bytes=len(message.payload), attempts=attempts,
                  replied=replied)
        if self._on_quarantine is not None:
            try:
                self._on_quarantine(message, attempts)
            except Exception:
                log.exception("quarantine_notify_failed", topic=message.topic)

    def _refuse(self, message: Incoming, refuse: Refuse, error: AgentError, reason: str) -> None:
        replied = self._answer(message, refuse, error)
        if replied:
            self.counters.rejected += 1
        else:
            self.counters.dropped += 1
        log.warning("message_rejected", topic=message.topic, reason=reason, bytes=len(message.payload),
                    code=error.code, replied=replied, message=str(error))

    def _answer(self, message: Incoming, refuse: Refuse, error: AgentError) -> bool:
        """``refuse`` answers and acknowledges; if even that fails, acknowledge here (once)."""
        try:
            return bool(refuse(message, error))
        except Exception:
            log.exception("refuse_failed", topic=message.topic)
            if not self._current_acked:
                self._link.ack(message)
            return False
