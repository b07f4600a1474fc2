"""Request limits after parsing: the pure checks, the per-caller rate, and the service that applies and counts them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from agent.engine.llama import GenerationResult, SamplingParams
from agent.errors import BadRequestError, OverloadedError, RateLimitedError, TooLargeError
from agent.services.inference import InferenceService
from agent.services.request_limits import (
    RateLimiter,
    check_prompt,
    check_request,
    clamped_max_tokens,
)
from agent.settings import InferenceSettings
from agent.transport.mqtt import Incoming
from agent.transport.wire import InferRequest
from tests.support.fake_engine import OneSlotEngine
from tests.support.fake_link import RecordingLink

SETTINGS = InferenceSettings()


def chat(n: int, **extra: Any) -> InferRequest:
    return InferRequest.model_validate({"messages": [{"role": "user", "content": "hi"}] * n, **extra})


# -- check_request ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "limit", "error", "message"),
    [
        (chat(1), None, None, None),
        (chat(64), None, None, None),
        (chat(65), "messages", TooLargeError, "65 messages; the limit is 64"),
        (InferRequest(prompt="x", stop=["a"] * 8), None, None, None),
        (InferRequest(prompt="x", stop=["a"] * 9), "stop", BadRequestError, "9 stop sequences; the limit is 8"),
        (InferRequest(prompt="x", stop="y" * 64), None, None, None),
        (InferRequest(prompt="x", stop="y" * 65), "stop", BadRequestError, "65 characters long; the limit is 64"),
        (InferRequest(prompt="x", stop=["ok", "é" * 65]), "stop", BadRequestError, "65 characters"),
        (chat(65, stop=["a"] * 9), "messages", TooLargeError, "65 messages"),  # the first broken limit
    ],
    ids=["one-message", "64-messages", "65-messages", "8-stops", "9-stops", "stop-64", "stop-65",
         "stop-65-unicode", "messages-first"],
)
def test_check_request_names_the_limit_and_both_numbers(
    request_: InferRequest, limit: str | None, error: type[Exception] | None, message: str | None
) -> None:
    """Messages over max_messages are too_large; stops over max_stop_sequences/max_stop_chars bad_request."""
    got = check_request(request_, SETTINGS)
    if limit is None:
        assert got is None
        return
    assert got is not None
    assert got.limit == limit
    assert type(got.error) is error
    assert message is not None and message in str(got.error)


def test_check_request_reads_the_settings_it_is_given() -> None:
    """The limits are settings (live-updatable), not constants."""
    tight = InferenceSettings(max_messages=2, max_stop_sequences=0, max_stop_chars=3)
    assert check_request(chat(2), tight) is None
    assert check_request(chat(3), tight) is not None
    assert check_request(InferRequest(prompt="x", stop="a"), tight) is not None
    assert check_request(InferRequest(prompt="x", stop="abcd"), InferenceSettings(max_stop_chars=3)) is not None


# -- check_prompt ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "cap", "n_ctx", "message"),
    [
        (100, None, 2048, None),
        (2047, None, 2048, None),
        (2048, None, 2048, "the prompt is 2048 tokens; the context holds 2048"),
        (512, 512, 2048, None),
        (513, 512, 2048, "the prompt is 513 tokens; the limit is 512 (inference.max_prompt_tokens)"),
        (3000, 4096, 2048, "the context holds 2048"),  # the cap above the context: the context is named
        (10_000, None, None, None),  # unknown context: only the cap applies
        (10_000, 512, None, "the limit is 512"),
    ],
    ids=["fits", "one-left", "fills-context", "at-cap", "over-cap", "cap-above-context", "no-context",
         "cap-no-context"],
)
def test_check_prompt_refuses_over_the_cap_or_the_context(
    tokens: int, cap: int | None, n_ctx: int | None, message: str | None
) -> None:
    """A prompt over max_prompt_tokens or not leaving one token of context is too_large, naming both numbers."""
    got = check_prompt(tokens, InferenceSettings(max_prompt_tokens=cap), n_ctx)
    if message is None:
        assert got is None
        return
    assert got is not None
    assert (got.limit, got.error.code) == ("prompt_tokens", "too_large")
    assert message in str(got.error)


# -- clamped_max_tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "expected"),
    [(None, (128, False)), (1, (1, False)), (1024, (1024, False)), (1025, (1024, True)), (10**9, (1024, True))],
)
def test_max_tokens_is_clamped_not_refused(asked: int | None, expected: tuple[int, bool]) -> None:
    """max_tokens defaults to default_max_tokens and is lowered to max_tokens_limit, which is reported."""
    assert clamped_max_tokens(InferRequest(prompt="x", max_tokens=asked), SETTINGS) == expected


# -- RateLimiter ----------------------------------------------------------------------------------


def test_a_caller_gets_its_burst_then_the_rate_with_retry_after() -> None:
    """Burst requests at once, then refused with the ms until one token is back; after that, admitted."""
    limiter = RateLimiter(rate=4.0, burst=3)
    assert [limiter.take("a", 100.0) for _ in range(3)] == [None, None, None]
    assert limiter.take("a", 100.0) == 250
    assert limiter.take("a", 100.125) == 125
    assert limiter.take("a", 100.25) is None
    assert limiter.take("a", 100.25) == 250


def test_callers_have_separate_buckets_and_idle_ones_refill_to_the_burst() -> None:
    """Another reply address is not charged for the first one; a long pause refills only up to the burst."""
    limiter = RateLimiter(rate=1.0, burst=2)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [None, None, 1000]
    assert limiter.take("b", 0.0) is None
    assert [limiter.take("a", 3600.0) for _ in range(3)] == [None, None, 1000]


def test_the_bucket_map_is_bounded_least_recently_seen_first() -> None:
    """At most max_clients callers are remembered; the one seen longest ago is forgotten (full bucket again)."""
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=3)
    for caller in ("a", "b", "c"):
        assert limiter.take(caller, 0.0) is None
    assert limiter.take("a", 0.0) == 1000  # a is now the most recently seen
    assert limiter.take("d", 0.0) is None  # b is forgotten
    assert len(limiter) == 3
    assert limiter.take("b", 0.0) is None
    assert limiter.take("a", 0.0) == 1000


def test_many_callers_never_grow_the_map_past_its_bound() -> None:
    """A flood of distinct reply topics (even 64 KB ones) keeps at most max_clients entries of fixed size."""
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=100)
    for i in range(5000):
        limiter.take(f"caller/{i}/" + "y" * 1000, 0.0)
    assert len(limiter) == 100


def test_rate_zero_is_off_and_configure_applies_live() -> None:
    """Rate 0 admits everything; a lower burst caps what a bucket holds from the next request on."""
    limiter = RateLimiter(rate=0.0, burst=1)
    assert all(limiter.take("a", 0.0) is None for _ in range(100))
    limiter.configure(rate=1.0, burst=5)
    assert [limiter.take("a", 0.0) for _ in range(5)] == [None] * 5
    limiter.configure(rate=1.0, burst=1)
    assert limiter.take("a", 10.0) is None
    assert limiter.take("a", 10.0) == 1000


# -- the service -------------------------------------------------------------------------------------


class Engine(OneSlotEngine):
    """Four tokens a prompt character; generates one 'x' per token; records what it was asked."""

    info = None

    def __init__(self) -> None:
        super().__init__()
        self.generated: list[SamplingParams] = []
        self.gate = threading.Event()
        self.gate.set()

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return [1] * (len(prompt) * 4)

    def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenize_prompt("".join(m["content"] for m in messages))

    def generate(self, prompt_tokens: list[int], params: SamplingParams, on_text: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> GenerationResult:
        self.gate.wait(5)
        self.generated.append(params)
        return GenerationResult("x", "length", len(prompt_tokens), 1, 0.001, 1000.0)


_mid = iter(range(1, 10**6))


def message(body: dict[str, Any], reply: str, *, topic: str = "edge/dev1/infer") -> Incoming:
    return Incoming(topic=topic, payload=json.dumps(body).encode(), qos=1, mid=next(_mid), dup=False,
                    response_topic=reply, correlation_data=None, message_expiry_s=None,
                    received_at=time.monotonic())


@pytest.fixture
def service() -> Any:
    engine, link = Engine(), RecordingLink()
    svc = InferenceService(engine, link, InferenceSettings(rate_per_client_per_s=1.0, rate_burst=2),  # type: ignore[arg-type]
                           "dev1", "fake")
    svc.start()
    yield svc, engine, link
    svc.shutdown(2.0)


def wait_final(link: RecordingLink, topic: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while not link.finals(topic) and time.monotonic() < deadline:
        time.sleep(0.005)
    [body] = link.finals(topic)
    return body


def test_a_request_over_a_limit_is_answered_counted_and_never_queued(service: Any) -> None:
    """Too many messages, too many stops: the right code at once, one counter each, the engine untouched."""
    svc, engine, link = service
    svc.submit(message({"id": "m", "messages": [{"role": "user", "content": "hi"}] * 65}, "c/m"))
    svc.submit(message({"id": "s", "prompt": "x", "stop": ["a"] * 9}, "c/s"))
    assert link.finals("c/m")[0]["error"]["code"] == "too_large"
    assert link.finals("c/s")[0]["error"]["code"] == "bad_request"
    assert (svc.limits.messages, svc.limits.stop) == (1, 1)
    assert svc.counters.rejected == 2
    assert engine.generated == []
    svc.submit(message({"id": "m", "messages": [{"role": "user", "content": "hi"}]}, "c/m2"))  # same id, fixed
    assert "text" in wait_final(link, "c/m2")


def test_a_caller_over_its_rate_gets_rate_limited_and_may_retry_the_same_id(service: Any) -> None:
    """Burst 2 at 1/s: the third request from one reply address is 'rate_limited' with retry_after_ms;
    another address is served; the refused id is not a duplicate when sent again later."""
    svc, _, link = service
    for i in range(3):
        svc.submit(message({"id": f"r{i}", "prompt": "x"}, "c/one"))
    svc.submit(message({"id": "other", "prompt": "x"}, "c/two"))
    deadline = time.monotonic() + 5
    while len(link.finals("c/one")) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    refused = [b for b in link.finals("c/one") if "error" in b]
    assert [(b["id"], b["error"]["code"]) for b in refused] == [("r2", "rate_limited")]
    assert 0 < refused[0]["error"]["retry_after_ms"] <= 1000
    assert "text" in wait_final(link, "c/two")
    assert svc.limits.rate_limited == 1
    svc.apply_settings(InferenceSettings(rate_per_client_per_s=0))  # as if retry_after_ms had passed
    svc.submit(message({"id": "r2", "prompt": "x"}, "c/one"))
    deadline = time.monotonic() + 5
    while len(link.finals("c/one")) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [b["id"] for b in link.finals("c/one") if "text" in b][-1] == "r2"


def test_unmetered_topics_are_not_rate_limited(service: Any) -> None:
    """Requests on an unmetered topic (a cloud worker's relayed share) skip the per-address bucket."""
    svc, _, link = service
    svc.unmetered_topics = frozenset({"edge/cloud/infer"})
    for i in range(5):
        svc.submit(message({"id": f"u{i}", "prompt": "x"}, "edge/cloud/reply/dev2", topic="edge/cloud/infer"))
    deadline = time.monotonic() + 5
    while len(link.finals("edge/cloud/reply/dev2")) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert all("text" in b for b in link.finals("edge/cloud/reply/dev2"))
    assert svc.limits.rate_limited == 0


def test_queue_full_is_counted_and_the_refused_id_is_served_when_sent_again(service: Any) -> None:
    """'overloaded' moves limits.queue_full; the same id sent after retry_after_ms is served, not dropped
    as a duplicate."""
    svc, engine, link = service
    svc.apply_settings(InferenceSettings(max_queue=0, rate_per_client_per_s=0))
    engine.gate.clear()
    svc.submit(message({"id": "busy", "prompt": "x"}, "c/busy"))
    time.sleep(0.05)  # the worker takes it
    svc.submit(message({"id": "q", "prompt": "x"}, "c/q"))
    assert link.finals("c/q")[0]["error"]["code"] == "overloaded"
    assert svc.limits.queue_full == 1
    engine.gate.set()
    wait_final(link, "c/busy")
    svc.submit(message({"id": "q", "prompt": "x"}, "c/q2"))
    assert "text" in wait_final(link, "c/q2")


def test_an_id_the_offload_router_refused_is_served_when_sent_again(service: Any) -> None:
    """The offload decision answered 'overloaded' (nobody could serve it in time): the same id retried
    later is served, not acknowledged as a duplicate and left unanswered."""
    svc, _, link = service
    svc.apply_settings(InferenceSettings(rate_per_client_per_s=0))

    def refuse_all(request: InferRequest, reply: Any, incoming: Incoming, request_id: str) -> bool:
        svc.refuse_overloaded(incoming, reply, request_id, 500, "no worker in time")
        return True

    svc.router = refuse_all
    svc.submit(message({"id": "o", "prompt": "x"}, "c/o"))
    assert link.finals("c/o")[0]["error"]["code"] == "overloaded"
    svc.router = None
    svc.submit(message({"id": "o", "prompt": "x"}, "c/o2"))
    assert "text" in wait_final(link, "c/o2")


def test_prompt_over_the_token_cap_is_refused_before_generation(service: Any) -> None:
    """A prompt over max_prompt_tokens is 'too_large' naming both numbers; nothing is generated."""
    svc, engine, link = service
    svc.apply_settings(InferenceSettings(max_prompt_tokens=40, rate_per_client_per_s=0))
    svc.submit(message({"id": "long", "prompt": "y" * 11}, "c/long"))  # 44 tokens
    body = wait_final(link, "c/long")
    assert body["error"]["code"] == "too_large"
    assert "44 tokens; the limit is 40" in body["error"]["message"]
    assert engine.generated == []
    assert svc.limits.prompt_tokens == 1
    svc.submit(message({"id": "short", "prompt": "y" * 10}, "c/short"))  # 40 tokens: fits
    assert "text" in wait_final(link, "c/short")


def test_clamped_max_tokens_are_counted(service: Any) -> None:
    """A max_tokens over max_tokens_limit is generated with the limit and counted, not refused."""
    svc, engine, link = service
    svc.submit(message({"id": "big", "prompt": "x", "max_tokens": 5000}, "c/big"))
    assert "text" in wait_final(link, "c/big")
    assert engine.generated[-1].max_tokens == 1024
    assert svc.limits.max_tokens_clamped == 1


def test_live_settings_change_the_limits_for_the_next_request(service: Any) -> None:
    """apply_settings: a lower max_messages and a rate turned off apply to the very next request."""
    svc, _, link = service
    svc.apply_settings(InferenceSettings(max_messages=1, rate_per_client_per_s=0))
    svc.submit(message({"messages": [{"role": "user", "content": "hi"}] * 2}, "c/two-messages"))
    assert link.finals("c/two-messages")[0]["error"]["code"] == "too_large"
    for i in range(5):
        svc.submit(message({"id": f"n{i}", "prompt": "x"}, "c/free"))
    deadline = time.monotonic() + 5
    while len(link.finals("c/free")) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert all("text" in b for b in link.finals("c/free"))


def test_rate_limited_is_an_overloaded_error_by_category() -> None:
    """Callers catching OverloadedError ('try again later') also catch RateLimitedError; its code is its own."""
    error = RateLimitedError("slow down", retry_after_ms=100)
    assert isinstance(error, OverloadedError)
    assert (error.code, error.retry_after_ms) == ("rate_limited", 100)
