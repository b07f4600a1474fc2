"""Properties of admission: InferenceService behind the bulkhead, exactly as the daemon's main loop runs
it, with a fake link and a fake engine. Whatever arrives on the infer and cancel topics (valid requests,
mutations, random bytes, repeated ids, DUP redeliveries, expired messages, bursts past the queue), every
message is acknowledged exactly once, every reply address gets at most one final message (exactly one
when it belongs to a request nobody else shares the id of), and nothing is sent where nobody asked.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypothesis import example, given
from hypothesis import strategies as st

from agent.engine.llama import GenerationResult, SamplingParams
from agent.errors import TooLargeError
from agent.services.bulkhead import Bulkhead
from agent.services.inference import InferenceService
from agent.settings import InferenceSettings
from agent.transport.mqtt import Incoming
from tests.fuzz.payloads import MUTATORS, mutate, valid_request
from tests.property.conftest import asked_reply_topics
from tests.support.fake_engine import OneSlotEngine
from tests.support.fake_link import RecordingLink

INFER, CANCEL = "edge/dev1/infer", "edge/dev1/infer/cancel"


class FakeEngine(OneSlotEngine):
    """Tokenizes like llama.cpp does (UTF-8 encode first), generates ``max_tokens`` pieces of 'x'."""

    info = None  # no LoadedModel: the service leaves the context check to generate()

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return list(range(1, len(prompt.encode()) // 4 + 2))

    def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenize_prompt("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    def generate(self, prompt_tokens: list[int], params: SamplingParams, on_text: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> GenerationResult:
        self.gate.wait(5)
        if len(prompt_tokens) >= 4096:
            raise TooLargeError("the prompt does not fit the context")
        n, reason = 0, "length"
        for n in range(1, params.max_tokens + 1):  # noqa: B007 - n is the count after the loop
            if cancelled():
                reason = "cancelled"
                break
            on_text("x")
        return GenerationResult("x" * n, reason, len(prompt_tokens), n, 0.001, 1000.0)

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class Spec:
    """One generated message: what it carries and where it may be answered."""

    topic: str
    payload: bytes
    response_topic: str | None
    dup: bool
    expiry_s: int | None
    qos: int


_mids = itertools.count(1)


@st.composite
def messages(draw: st.DrawFn, index: int) -> Spec:
    rng = draw(st.randoms(use_true_random=False))
    rid = draw(st.sampled_from([f"r{index}", f"r{index}", "shared", None]))
    address = draw(st.sampled_from(["response", "response", "reply_to", "none", "wildcard", "long"]))
    topic = draw(st.sampled_from([INFER, INFER, INFER, CANCEL]))
    reply = f"caller/{index}"
    body = valid_request(rng, rid, reply_to=reply if address == "reply_to" else None)
    how = draw(st.sampled_from(["valid", "valid", "mutated", "bytes"]))
    if topic == CANCEL:
        body = {"id": draw(st.sampled_from(["r0", "r1", "shared", "nope"]))}
    if how == "valid":
        payload = json.dumps(body).encode()
    elif how == "mutated":
        payload = mutate(rng, body, draw(st.sampled_from(sorted(MUTATORS))))[1]
    else:
        payload = draw(st.binary(max_size=64))
    response_topic = {"response": reply, "wildcard": "caller/+", "long": "caller/" + "y" * 70_000}.get(address)
    return Spec(topic, payload, response_topic, draw(st.booleans()), draw(st.sampled_from([None, None, 0, 1, 3600])),
                draw(st.sampled_from([0, 1])))


batches = st.integers(min_value=1, max_value=12).flatmap(lambda n: st.tuples(*(messages(i) for i in range(n))))


def _deliver(specs: Sequence[Spec], *, max_queue: int, gated: bool) -> tuple[RecordingLink, list[Incoming]]:
    link, engine = RecordingLink(), FakeEngine()
    settings = InferenceSettings(max_queue=max_queue, default_max_tokens=3, max_tokens_limit=4, stream_interval_ms=0)
    service = InferenceService(engine, link, settings, "dev1", "fake")  # type: ignore[arg-type]
    bulkhead = Bulkhead(link, max_bytes=lambda: settings.max_payload_bytes, state_dir=None)
    service.before_run = bulkhead.charge
    service.start()
    if gated:  # hold the first generation so the queue fills up behind it (overloaded, cancel while queued)
        engine.gate.clear()
    sent: list[Incoming] = []
    for spec in specs:
        message = Incoming(topic=spec.topic, payload=spec.payload, qos=spec.qos, mid=next(_mids), dup=spec.dup,
                           response_topic=spec.response_topic, correlation_data=b"corr", received_at=time.monotonic(),
                           message_expiry_s=spec.expiry_s)
        sent.append(message)
        if spec.topic == INFER:
            bulkhead.run(message, service.submit, service.refuse, charge=False)
        else:
            bulkhead.run(message, service.cancel, service.refuse_cancel)
    engine.gate.set()
    deadline = time.monotonic() + 10
    while len(set(link.acked)) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.005)
    service.shutdown(2.0)
    return link, sent


def _check(link: RecordingLink, sent: list[Incoming]) -> None:
    acks = Counter(link.acked)
    assert all(acks[m.mid] == 1 for m in sent), f"acks per message: {[acks[m.mid] for m in sent]}"
    assert len(link.acked) == len(sent)
    finals = Counter(t for t, body in link.sent if body.get("done"))
    assert all(n == 1 for n in finals.values()), f"a reply address got {finals.most_common(1)} final messages"
    asked = set().union(*(asked_reply_topics(m) for m in sent))
    assert {t for t, _ in link.sent} <= asked, "a reply went where nobody asked"
    for _, body in link.sent:
        if body.get("done") and "error" not in body:
            assert body["usage"]["completion_tokens"] <= 4
    # Chunks of a reply address come before its final message.
    for topic in finals:
        bodies = [b for t, b in link.sent if t == topic]
        assert bodies[-1].get("done"), bodies
    # Exactly one final for each addressed request with an id of its own (shared ids may be duplicates).
    for i, m in enumerate(sent):
        if m.topic == INFER and m.response_topic == f"caller/{i}" and json.dumps(f"r{i}").encode() in m.payload:
            try:
                body = json.loads(m.payload)
            except (ValueError, RecursionError):
                continue
            if isinstance(body, dict) and body.get("id") == f"r{i}":
                assert finals[f"caller/{i}"] == 1, (i, m.payload[:200])


@given(batches, st.sampled_from([0, 1, 4]), st.booleans())
@example((Spec(INFER, b'{"id": "\\ud800", "prompt": 3}', "caller/0", False, None, 1),), 4, False)
@example((Spec(INFER, b'{"id": "same", "prompt": "a"}', "caller/0", False, None, 1),
          Spec(INFER, b'{"id": "same", "prompt": "a"}', "caller/1", False, None, 1)), 4, True)
def test_every_message_is_acked_once_and_answered_at_most_once(batch: tuple[Spec, ...], max_queue: int,
                                                               gated: bool) -> None:
    """Any batch through the bulkhead and the service: one ack per message, at most one final per reply
    address (exactly one for a request with an id of its own), no reply nobody asked for."""
    link, sent = _deliver(batch, max_queue=max_queue, gated=gated)
    _check(link, sent)


def test_a_burst_past_the_queue_is_answered_overloaded_not_dropped() -> None:
    """Thirty requests while one generation is held: max_queue + 1 are served, the rest 'overloaded', each
    exactly once and acked once."""
    rng = random.Random(7)
    specs = [Spec(INFER, json.dumps(valid_request(rng, f"r{i}")).encode(), f"caller/{i}", False, None, 1)
             for i in range(30)]
    link, sent = _deliver(specs, max_queue=4, gated=True)
    _check(link, sent)
    codes = Counter(body.get("error", {}).get("code", "served") for _, body in link.sent if body.get("done"))
    assert codes == {"served": 5, "overloaded": 25}
