"""Request limits checked after parsing and before any expensive work, and the per-caller rate.

Pure pieces, tested with tables: :func:`check_request` (messages, stop sequences), :func:`check_prompt`
(prompt tokens against the operator's cap and the context), :func:`clamped_max_tokens`, and
:class:`RateLimiter`, a token bucket per reply address in a bounded map. The service counts each
refusal in :class:`LimitCounters` (plain ints, no work per token); telemetry publishes them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

from agent.errors import AgentError, BadRequestError, TooLargeError
from agent.settings import InferenceSettings
from agent.transport.wire import InferRequest

RATE_MAX_CLIENTS = 4096
"""Most callers the rate limiter remembers; the least recently seen is forgotten first (it then starts
again with a full bucket). Bounded so that the map is not itself a memory vector."""


@dataclass(slots=True)
class LimitCounters:
    """Refusals (and clamps) by limit since start; the service's share of telemetry ``limits``.

    The pre-parse limits (payload bytes, JSON depth and elements) are counted by the bulkhead.
    """

    messages: int = 0
    stop: int = 0
    prompt_tokens: int = 0
    rate_limited: int = 0
    queue_full: int = 0
    max_tokens_clamped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Violation:
    """Which limit a request broke (a key of :class:`LimitCounters`) and the error that answers it."""

    limit: str
    error: AgentError


def check_request(request: InferRequest, settings: InferenceSettings) -> Violation | None:
    """The first limit a parsed request breaks (messages, then stop sequences), or None."""
    if request.messages is not None and len(request.messages) > settings.max_messages:
        return Violation("messages", TooLargeError(
            f"the request has {len(request.messages)} messages; the limit is {settings.max_messages}"
        ))
    stops = request.stop_list()
    if len(stops) > settings.max_stop_sequences:
        return Violation("stop", BadRequestError(
            f"the request has {len(stops)} stop sequences; the limit is {settings.max_stop_sequences}"
        ))
    longest = max(map(len, stops), default=0)
    if longest > settings.max_stop_chars:
        return Violation("stop", BadRequestError(
            f"a stop sequence is {longest} characters long; the limit is {settings.max_stop_chars}"
        ))
    return None


def check_prompt(prompt_tokens: int, settings: InferenceSettings, n_ctx: int | None) -> Violation | None:
    """A prompt of ``prompt_tokens`` over ``inference.max_prompt_tokens``, or not fitting the context
    ``n_ctx`` (at least one token must be left to generate; None = unknown, not checked), or None.

    The cap is named only when it is the tighter bound, so the message names what to change.
    """
    cap = settings.max_prompt_tokens
    if cap is not None and prompt_tokens > cap and (n_ctx is None or cap < n_ctx):
        return Violation("prompt_tokens", TooLargeError(
            f"the prompt is {prompt_tokens} tokens; the limit is {cap} (inference.max_prompt_tokens)"
        ))
    if n_ctx is not None and prompt_tokens >= n_ctx:
        return Violation("prompt_tokens", TooLargeError(
            f"the prompt is {prompt_tokens} tokens; the context holds {n_ctx} (shorten it or raise model.n_ctx)"
        ))
    return None


def clamped_max_tokens(request: InferRequest, settings: InferenceSettings) -> tuple[int, bool]:
    """The request's max_tokens (default ``default_max_tokens``) capped at ``max_tokens_limit``, and
    whether the cap lowered what the request asked for."""
    asked = request.token_limit()
    wanted = asked or settings.default_max_tokens
    limit = settings.max_tokens_limit
    return min(wanted, limit), asked is not None and asked > limit


class RateLimiter:
    """A token bucket per caller: ``burst`` requests at once, then ``rate`` per second.

    Keyed by the reply address (the only stable trace of a caller a subscriber sees), stored as its
    hash so the map holds no caller-chosen strings (a topic may be 64 KB); at most ``max_clients``
    buckets, least recently used forgotten first. One thread only (the daemon's main thread).
    """

    def __init__(self, rate: float, burst: int, max_clients: int = RATE_MAX_CLIENTS) -> None:
        self._rate = rate
        self._burst = burst
        self._max = max_clients
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def configure(self, rate: float, burst: int) -> None:
        """Live change: buckets keep their level, capped at the new burst; rate 0 turns metering off."""
        self._rate, self._burst = rate, burst
        if rate <= 0:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, caller: str, now: float) -> int | None:
        """Admit one request from ``caller`` at ``now`` (monotonic seconds): None when admitted, else
        the milliseconds until it would be (at least 1)."""
        rate = self._rate
        if rate <= 0:
            return None
        key = hash(caller)
        buckets = self._buckets
        entry = buckets.get(key)
        if entry is None:
            tokens = float(self._burst)
        else:
            level, at = entry
            tokens = min(float(self._burst), level + max(0.0, now - at) * rate)
            buckets.move_to_end(key)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / rate * 1000))
        buckets[key] = (tokens - 1.0, now)
        if len(buckets) > self._max:
            buckets.popitem(last=False)
        return None
