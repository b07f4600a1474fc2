"""Inference over MQTT: admit requests, decode them together in the engine's slots, stream and answer,
then acknowledge.

Threads: paho's network thread hands messages to the daemon's main thread, which calls
:meth:`InferenceService.submit` / :meth:`cancel`; one worker thread owns the engine. It fills free
slots from the bounded queue (first come, first served) and steps the batch; each sequence answers
when it ends. A request's PUBLISH is acknowledged only after its final reply has been handed to paho,
so a request that was in flight when the process died is redelivered by the broker (persistent
session) and answered then.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog

from agent.config.generation import GenerationSettings
from agent.engine.llama import GenerationResult, LlamaEngine, Outcome
from agent.errors import (
    ERROR_CODES,
    AgentError,
    BadRequestError,
    CancelledError,
    DeadlineExceededError,
    OverloadedError,
    RateLimitedError,
)
from agent.services.generation import chat_for, sampling_for
from agent.services.queueing import BoundedQueue, RecentKeys, deadline_for
from agent.services.request_limits import LimitCounters, RateLimiter, check_prompt, check_request, clamped_max_tokens
from agent.settings import InferenceSettings
from agent.transport.mqtt import Incoming, Link
from agent.transport.topics import is_concrete_topic
from agent.transport.wire import (
    FinalReply,
    InferRequest,
    Timings,
    Usage,
    chunk_payload,
    error_payload,
    openai_chunk_payload,
    openai_final_payload,
    parse_cancel,
    parse_request,
    peek_reply_fields,
)

log = structlog.get_logger("agent.inference")


@dataclass(frozen=True, slots=True)
class ReplyAddress:
    topic: str
    correlation_data: bytes | None


@dataclass(slots=True)
class Job:
    request_id: str
    dedup_key: str
    request: InferRequest
    reply: ReplyAddress
    message: Incoming
    deadline: float | None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0  # monotonic, when it took a slot
    created: int = 0  # unix seconds, for OpenAI-shaped replies


@dataclass(slots=True)
class Counters:
    served: int = 0
    failed: int = 0
    rejected: int = 0
    tokens: int = 0
    last_tokens_per_second: float = 0.0
    avg_request_ms: float | None = None  # exponentially weighted, for expected-wait estimates


class InferenceService:
    """Admission, the worker that batches, replies, acknowledgements."""

    def __init__(
        self,
        engine: LlamaEngine,
        link: Link,
        settings: InferenceSettings,
        device_id: str,
        model_name: str,
    ) -> None:
        self._engine = engine
        self._link = link
        self._settings = settings
        self._device_id = device_id
        self._model_name = model_name
        self._queue: BoundedQueue[Job] = BoundedQueue(capacity=settings.max_queue + _slots_of(engine))
        self._recent = RecentKeys(settings.dedup_window_s)
        self._rate = RateLimiter(settings.rate_per_client_per_s, settings.rate_burst)
        self._lock = threading.Lock()
        self._in_system = 0
        self._running: dict[str, Job] = {}  # by request id; only the worker adds and removes
        self._pending: dict[str, Job] = {}
        self._controls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any], bool]] = queue.SimpleQueue()
        self._drains_waiting = 0  # swaps waiting for the batch to drain (under _lock): admission pauses
        self._accepting = True
        self.draining = False
        self.served_by = device_id
        # Offload hook (the daemon's): may take a validated request elsewhere; True = handled.
        self.router: Callable[[InferRequest, ReplyAddress, Incoming, str], bool] | None = None
        # Called on the worker just before a request's generation starts (the bulkhead charges
        # redelivered requests there: only work that was running is blamed for a crash). Must not raise.
        self.before_run: Callable[[Incoming], None] | None = None
        # Topics whose requests are not rate-limited per reply address (the daemon's: the cloud's shared
        # topic, where one edge device's relay topic stands for all of that device's callers).
        self.unmetered_topics: frozenset[str] = frozenset()
        # Sampling defaults for the served model ([generation] with its catalog defaults over it): the daemon's.
        self.generation_defaults: Callable[[], GenerationSettings] = _builtin_defaults
        self._worker = threading.Thread(target=self._work, name="inference-worker", daemon=True)
        self.counters = Counters()
        self.limits = LimitCounters()

    # -- main thread -------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def engine(self) -> LlamaEngine:
        return self._engine

    @property
    def model_name(self) -> str:
        return self._model_name

    def between_requests(self, action: Callable[[], Any], *, drain: bool = True) -> Future[Any]:
        """Run ``action`` on the worker thread between two decode steps.

        ``drain`` (a model swap): no new request takes a slot until the running ones have finished, then
        ``action`` runs on an idle engine; queued requests simply wait, none is dropped. Without ``drain``
        (a thread change) it runs before the next step, running sequences pause for it.
        """
        future: Future[Any] = Future()
        if drain:
            with self._lock:
                self._drains_waiting += 1
        self._controls.put((action, future, drain))
        self._queue.wake()
        return future

    def replace_engine(self, new_engine: LlamaEngine, model_name: str) -> None:
        """Worker thread only (inside a between_requests action): point at a new engine.

        The model owner (agent.services.model) is the only caller: it builds, loads and closes engines.
        A new engine may have another number of slots: the admission bound follows.
        """
        with self._lock:
            self._engine, self._model_name = new_engine, model_name
            self._queue.capacity = self._capacity()

    @property
    def saturated(self) -> bool:
        """True when one more request would be refused 'overloaded' (every slot running + max_queue waiting)."""
        return self._in_system >= self._capacity()

    def _capacity(self) -> int:
        return self._settings.max_queue + _slots_of(self._engine)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        """Requests decoding now (at most the engine's slots)."""
        return len(self._running)

    @property
    def slots(self) -> int:
        return _slots_of(self._engine)

    def submit(self, message: Incoming) -> None:
        """Validate and admit one request; anything wrong is answered (if possible) and acknowledged."""
        if not self._accepting:
            # Shutting down: leave it unacknowledged so the broker redelivers it after restart.
            log.info("request_deferred", reason="shutting_down")
            return
        resolved = self._resolve(message)
        if resolved is None:
            return
        request, reply = resolved
        request_id = request.id or uuid.uuid4().hex
        key = self._dedup_key(request, message, reply)
        if self._is_duplicate(key, request, message):
            return
        # Limits after the duplicate check (a redelivery of a running request must not be answered twice),
        # before offload and the queue: a request over a limit, or a caller over its rate, costs neither
        # the cloud nor a slot.
        if self._refused_by_limits(request, reply, message, key) or (
            self.router is not None and self.router(request, reply, message, request_id)
        ):
            return
        job = Job(
            request_id=request_id,
            dedup_key=key,
            request=request,
            reply=reply,
            message=message,
            deadline=deadline_for(message.received_at, message.message_expiry_s, request.deadline_ms),
        )
        if job.deadline is not None and time.monotonic() >= job.deadline:
            self._finish_error(job, DeadlineExceededError("the request expired before it could start"))
            return
        with self._lock:
            admitted = self._in_system < self._capacity() and self._queue.offer(job)
            if admitted:
                self._in_system += 1
                self._pending[key] = job
        if not admitted:
            self._forget(request, key)
            self.limits.queue_full += 1
            self._finish_error(
                job,
                OverloadedError(
                    f"queue full ({self._settings.max_queue} waiting); try again later",
                    retry_after_ms=self._retry_after_ms(),
                ),
            )
            return
        log.debug("request_queued", id=request_id, depth=len(self._queue))

    def _refused_by_limits(self, request: InferRequest, reply: ReplyAddress, message: Incoming, key: str) -> bool:
        """Refuse (answer, count, acknowledge) a request over a request limit or its caller's rate."""
        settings = self._settings
        violation = check_request(request, settings)
        error: AgentError | None = None
        if violation is not None:
            self._count_limit(violation.limit)
            error = violation.error
        elif message.topic not in self.unmetered_topics:
            retry_after_ms = self._rate.take(reply.topic, time.monotonic())
            if retry_after_ms is not None:
                self.limits.rate_limited += 1
                error = RateLimitedError(
                    f"too many requests from this reply address (over {settings.rate_per_client_per_s:g}/s, "
                    f"burst {settings.rate_burst}); try again later",
                    retry_after_ms=retry_after_ms,
                )
        if error is None:
            return False
        self._forget(request, key)
        self._reject(message, reply, request.id, error)
        return True

    def refuse_overloaded(
        self, message: Incoming, reply: ReplyAddress, request_id: str, retry_after_ms: int | None, reason: str
    ) -> None:
        """Answer 'overloaded' now (the offload decision found nobody who can serve it in time).

        The id is forgotten, so the caller's retry after ``retry_after_ms`` is served, not taken for a
        duplicate. (A request without an id has a generated ``request_id`` that was never remembered.)
        """
        self._recent.forget(request_id)
        self._reject(message, reply, request_id,
                     OverloadedError(f"overloaded ({reason}); try again later", retry_after_ms=retry_after_ms))

    def apply_settings(self, settings: InferenceSettings) -> None:
        """Live config change: new limits apply to the next request (the queue bound and rate at once)."""
        with self._lock:
            self._settings = settings
            self._queue.capacity = self._capacity()
        if hasattr(self._engine, "prefill_chunk"):
            self._engine.prefill_chunk = settings.prefill_chunk  # read by the worker at its next step
        self._recent._window = settings.dedup_window_s
        self._rate.configure(settings.rate_per_client_per_s, settings.rate_burst)

    def refuse(self, message: Incoming, error: AgentError) -> bool:
        """Answer ``error`` to a request that is not served, if it has a reply address, and acknowledge it.

        The address is the Response Topic, else the payload's ``reply_to`` read without parsing the
        rest (safe on any payload). True when an error reply was sent.
        """
        reply = self._reply_address(message)
        rid, reply_to = peek_reply_fields(message.payload)
        if reply is None and reply_to and is_concrete_topic(reply_to):
            reply = ReplyAddress(reply_to, message.correlation_data)
        self._reject(message, reply, rid, error)
        return reply is not None

    def refuse_cancel(self, message: Incoming, error: AgentError) -> bool:
        """:meth:`refuse` for the cancel topic, where only an MQTT 5 Response Topic is a reply address."""
        reply = self._reply_address(message)
        self._reject(message, reply, peek_reply_fields(message.payload)[0], error)
        return reply is not None

    def _resolve(self, message: Incoming) -> tuple[InferRequest, ReplyAddress] | None:
        """Parse the payload and find where to answer; rejects (and acknowledges) what cannot be served."""
        reply = self._reply_address(message)
        try:
            request = parse_request(message.payload, self._settings.max_payload_bytes)
        except BadRequestError as exc:
            self.refuse(message, exc)
            return None
        if reply is None and request.reply_to:
            if not is_concrete_topic(request.reply_to):
                self._reject(message, None, request.id, BadRequestError("reply_to must be a topic without wildcards"))
                return None
            reply = ReplyAddress(request.reply_to, message.correlation_data)
        if reply is None:
            log.warning("request_dropped", id=request.id, reason="no_reply_address", topic=message.topic)
            self._link.ack(message)
            return None
        if self.draining:
            self._reject(message, reply, request.id,
                         OverloadedError("this device is draining; ask another", retry_after_ms=self._retry_after_ms()))
            return None
        return request, reply

    @staticmethod
    def _dedup_key(request: InferRequest, message: Incoming, reply: ReplyAddress) -> str:
        if request.id:
            return request.id
        return hashlib.sha1(  # noqa: S324 - a dedup key, not security
            message.payload + (message.correlation_data or b"") + reply.topic.encode()
        ).hexdigest()

    def _forget(self, request: InferRequest, key: str) -> None:
        """A refused request was not served: its id may come back after retry_after_ms and be served then.

        (Without an id the key is only ever a duplicate on a broker resend, so it stays.)
        """
        if request.id:
            self._recent.forget(key)

    def _is_duplicate(self, key: str, request: InferRequest, message: Incoming) -> bool:
        """With an id, a repeat within the window is a duplicate. Without one, identical payloads are
        separate requests: only a broker resend (DUP flag) of a recent one is a duplicate."""
        seen = self._recent.check_and_add(key, time.monotonic())
        if not seen or not (request.id or message.dup):
            return False
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                # Redelivered while still queued/running: the final reply acknowledges this delivery.
                replaced, pending.message = pending.message, message
        log.info("request_duplicate", id=request.id, dup=message.dup, in_progress=pending is not None)
        if pending is None:
            self._link.ack(message)
        elif not (message.dup and (replaced.mid, replaced.via) == (message.mid, message.via)):
            # Not the broker's redelivery of that PUBLISH but another one with the same id (a caller's
            # retry): acknowledged now, or it would hold one of the broker's in-flight slots for good.
            self._link.ack(replaced)
        return True

    def cancel(self, message: Incoming) -> None:
        """Cancel a queued request (answered at once) or the running one (stops within a token).

        An invalid cancel is answered with an error on its Response Topic, if it has one.
        """
        try:
            cancel = parse_cancel(message.payload)
        except BadRequestError as exc:
            log.warning("cancel_invalid", reason=str(exc))
            self.refuse_cancel(message, exc)
            return
        self._link.ack(message)
        queued = self._queue.remove_first(lambda j: j.request_id == cancel.id)
        if queued is not None:
            with self._lock:
                self._in_system -= 1
                self._pending.pop(queued.dedup_key, None)
            self._finish_error(queued, CancelledError("cancelled by the caller"))
            return
        running = self._running.get(cancel.id)
        if running is not None:
            running.cancel.set()  # the worker ends it before its next token
            log.info("cancel_requested", id=cancel.id)
            return
        log.info("cancel_unknown", id=cancel.id)

    def expire_queued(self, now: float) -> int:
        """Answer 'timeout' now to queued requests whose deadline passed, instead of when they reach the
        head of the queue (behind a long generation that could be minutes). Returns how many."""
        expired = self._queue.remove_all(lambda j: j.deadline is not None and now >= j.deadline)
        for job in expired:
            with self._lock:
                self._in_system -= 1
                self._pending.pop(job.dedup_key, None)
            self._finish_error(job, DeadlineExceededError("the request's deadline passed while it waited in the queue"))
        return len(expired)

    def shutdown(self, grace_s: float) -> None:
        """Stop admitting, answer queued requests 'cancelled', give the running ones ``grace_s``."""
        self._accepting = False
        for job in self._queue.close():
            with self._lock:
                self._in_system -= 1
            self._finish_error(job, CancelledError("the device is shutting down"))
        self._worker.join(grace_s)
        for job in list(self._running.values()):
            job.cancel.set()
        self._worker.join(5.0)

    # -- worker thread -----------------------------------------------------------------------------

    def _run_controls(self, *, idle: bool) -> None:
        """Run waiting controls: all of them on an idle engine; only those that need no drain otherwise."""
        deferred: list[tuple[Callable[[], Any], Future[Any], bool]] = []
        while True:
            try:
                control = self._controls.get_nowait()
            except queue.Empty:
                break
            action, future, drain = control
            if drain and not idle:
                deferred.append(control)
                continue
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(action())
                    except BaseException as exc:  # handed to the waiting caller
                        future.set_exception(exc)
            finally:
                if drain:
                    with self._lock:
                        self._drains_waiting -= 1
        for control in deferred:
            self._controls.put(control)

    def _work(self) -> None:
        while True:
            self._run_controls(idle=not self._running)
            engine = self._engine  # a control may have swapped it
            # Fill free slots from the queue (not while a swap waits for the batch to drain).
            while not self._drains_waiting and _free_slots(engine, len(self._running)) > 0:
                job = self._queue.take(timeout=0.0 if self._running else 1.0)
                if job is None:
                    break
                self._begin(engine, job)
            if self._running:
                self._step(engine)
            elif not self._accepting and not len(self._queue):
                return

    def _step(self, engine: LlamaEngine) -> None:
        try:
            engine.step()
        except Exception as exc:  # the worker must survive anything the engine does; the batch is lost
            log.exception("batch_crashed", running=len(self._running))
            for job in list(self._running.values()):
                self._end_job(job)
                self._finish_error(job, AgentError(f"internal error: {type(exc).__name__}"))

    def _begin(self, engine: LlamaEngine, job: Job) -> None:
        """Give ``job`` a slot: check it, render and tokenize its prompt, start its sequence."""
        job.started = time.monotonic()
        self._running[job.request_id] = job
        try:
            if self.before_run is not None:
                self.before_run(job.message)
            self._start(engine, job)
        except AgentError as exc:
            self._end_job(job)
            self._finish_error(job, exc)
        except Exception as exc:  # the worker must survive anything one request does
            log.exception("request_crashed", id=job.request_id)
            self._end_job(job)
            self._finish_error(job, AgentError(f"internal error: {type(exc).__name__}"))

    def _end_job(self, job: Job) -> None:
        if self._running.pop(job.request_id, None) is not None:
            with self._lock:
                self._in_system -= 1

    def _start(self, engine: LlamaEngine, job: Job) -> None:  # noqa: PLR0915 - the request's callbacks close over it
        if job.deadline is not None and job.started >= job.deadline:
            raise DeadlineExceededError("the request's deadline passed while it waited in the queue")
        if job.cancel.is_set():
            raise CancelledError("cancelled by the caller")
        req = job.request
        settings = self._settings
        defaults = self.generation_defaults()
        if req.messages is not None:
            tokens = engine.tokenize_chat(chat_for(req, defaults))
        else:
            tokens = engine.tokenize_prompt(req.prompt or "")
        info = engine.info
        violation = check_prompt(len(tokens), settings, info.n_ctx if info is not None else None)
        if violation is not None:  # before llama.cpp evaluates a single token of it
            self._count_limit(violation.limit)
            raise violation.error
        max_tokens, clamped = clamped_max_tokens(req, settings)
        if clamped:
            self.limits.max_tokens_clamped += 1
        params = sampling_for(req, defaults, max_tokens)
        publish = self._link.publish
        topic, corr, rid = job.reply.topic, job.reply.correlation_data, job.request_id
        make_chunk: Callable[[str, int, str], bytes] = chunk_payload
        if req.reply_format == "openai":
            job.created = int(time.time())
            make_chunk = partial(openai_chunk_payload, model=self._model_name, created=job.created)
        interval = settings.stream_interval_ms / 1000.0
        clock = time.perf_counter
        seq = 0
        last = 0.0
        held: list[str] = []
        failed: list[AgentError] = []  # a chunk the link refused (e.g. over the broker's packet limit)

        def on_text(delta: str) -> None:
            # The first piece goes out at once (time to first token); later pieces that arrive faster
            # than stream_interval_ms are sent together, so a fast model does not spend the CPU it
            # shares with the broker on one message per token.
            nonlocal seq, last
            held.append(delta)
            now = clock()
            if (seq and now - last < interval) or failed:
                return
            try:
                publish(topic, make_chunk(rid, seq, "".join(held)), qos=1, correlation_data=corr)
            except AgentError as exc:  # the sequence stops; its answer is this error
                failed.append(exc)
                job.cancel.set()
                return
            held.clear()
            seq += 1
            last = now

        def on_done(outcome: Outcome) -> None:
            # Called from inside the engine's step: whatever fails here is this request's answer, never the
            # batch's (a final reply over the broker's packet limit is answered 'too_large').
            self._end_job(job)
            if isinstance(outcome, AgentError) or failed:
                self._finish_error(job, outcome if isinstance(outcome, AgentError) else failed[0])
                return
            try:
                if held:
                    publish(topic, make_chunk(rid, seq, "".join(held)), qos=1, correlation_data=corr)
                self._finish_ok(job, outcome, job.started)
            except AgentError as exc:
                self._finish_error(job, exc)
            except Exception as exc:
                log.exception("request_crashed", id=job.request_id)
                self._finish_error(job, AgentError(f"internal error: {type(exc).__name__}"))

        engine.start(tokens, params, on_text if req.stream else _discard, on_done, job.cancel.is_set)

    # -- replies -----------------------------------------------------------------------------------

    def _finish_ok(self, job: Job, result: GenerationResult, started: float) -> None:
        now = time.monotonic()
        reply = FinalReply(
            id=job.request_id,
            text=result.text,
            finish_reason=result.finish_reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            timings=Timings(
                queue_ms=round((started - job.message.received_at) * 1000, 2),
                ttft_ms=round(result.ttft_s * 1000, 2),
                tokens_per_second=round(result.decode_tokens_per_s, 2),
                total_ms=round((now - job.message.received_at) * 1000, 2),
            ),
            model=self._model_name,
            device_id=self._device_id,
            served_by=self.served_by,
        )
        payload = (openai_final_payload(reply, job.created) if job.request.reply_format == "openai"
                   else reply.model_dump_json().encode())
        self._link.publish(job.reply.topic, payload, qos=1, correlation_data=job.reply.correlation_data)
        self._acknowledge(job)
        self.counters.served += 1
        self.counters.tokens += result.completion_tokens
        self.counters.last_tokens_per_second = result.decode_tokens_per_s
        took = reply.timings.total_ms - reply.timings.queue_ms
        avg = self.counters.avg_request_ms
        self.counters.avg_request_ms = took if avg is None else 0.8 * avg + 0.2 * took
        log.info(
            "request_done",
            id=job.request_id,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            tokens=result.completion_tokens,
            queue_ms=reply.timings.queue_ms,
            ttft_ms=reply.timings.ttft_ms,
            tokens_per_second=reply.timings.tokens_per_second,
            total_ms=reply.timings.total_ms,
        )

    def _finish_error(self, job: Job, exc: AgentError) -> None:
        self._send_error(job.reply, job.request_id, exc)
        self._acknowledge(job)
        self.counters.failed += 1
        log.info("request_failed", id=job.request_id, code=exc.code, message=str(exc))

    def _acknowledge(self, job: Job) -> None:
        # Under the lock, so a redelivery racing with completion is either seen here or acked as done.
        with self._lock:
            self._pending.pop(job.dedup_key, None)
            message = job.message
        self._link.ack(message)

    def _reject(self, message: Incoming, reply: ReplyAddress | None, rid: str | None, exc: AgentError) -> None:
        if reply is not None:
            self._send_error(reply, rid, exc)
        self._link.ack(message)
        self.counters.rejected += 1
        log.warning(
            "request_rejected",
            id=rid,
            code=exc.code,
            message=str(exc),
            replied=reply is not None,
            topic=message.topic,
        )

    def _send_error(self, reply: ReplyAddress, rid: str | None, exc: AgentError) -> None:
        retry = getattr(exc, "retry_after_ms", None)
        code = exc.code if exc.code in _WIRE_CODES else "internal"
        self._link.publish(
            reply.topic,
            error_payload(rid, code, str(exc), self._device_id, retry),
            qos=1,
            correlation_data=reply.correlation_data,
        )

    def _count_limit(self, limit: str) -> None:
        setattr(self.limits, limit, getattr(self.limits, limit) + 1)

    def _reply_address(self, message: Incoming) -> ReplyAddress | None:
        if message.response_topic and is_concrete_topic(message.response_topic):
            return ReplyAddress(message.response_topic, message.correlation_data)
        return None

    def _retry_after_ms(self) -> int:
        # One average request per queued slot, from what this device has measured; 1 s when unknown.
        return 1000 * max(1, self._settings.max_queue)


_WIRE_CODES = frozenset(ERROR_CODES)


def _builtin_defaults() -> GenerationSettings:
    return GenerationSettings.model_validate({})


def _discard(_: str) -> None:
    return None


def _slots_of(engine: LlamaEngine) -> int:
    """Slots of ``engine`` (an engine without slots, e.g. a test fake, has one)."""
    return int(getattr(engine, "slots", 1))


def _free_slots(engine: LlamaEngine, running: int) -> int:
    return _slots_of(engine) - running
