"""Hypothesis profiles for the property suite, and the checks every parser property shares.

``ci`` (the default) keeps the whole suite under a minute on the 2-core box; ``long`` runs 25x the
examples (``HYPOTHESIS_PROFILE=long pytest tests/property``). Failing examples are kept in
``.pytest_cache/hypothesis`` (already ignored by git) and replayed first on the next run.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from agent.errors import AgentError
from agent.transport.limits import top_level_strings
from agent.transport.mqtt import Incoming

_DB = DirectoryBasedExampleDatabase(str(Path(__file__).resolve().parents[2] / ".pytest_cache" / "hypothesis"))
# No per-example deadline: the box is shared and loaded; bounded time is asserted per call instead
# (see bounded()), with a bound that catches hangs and quadratic blow-ups, not scheduler noise.
settings.register_profile("ci", max_examples=60, deadline=None, database=_DB,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=1500, deadline=None, database=_DB,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

T = TypeVar("T")

CALL_BOUND_S = 2.0
"""The most one parser call may take on any input tried here (they take micro- to milliseconds)."""


def bounded(call: Callable[[], T], seconds: float = CALL_BOUND_S) -> T | AgentError:
    """Run ``call``; return its result or the AgentError it raised. Anything else fails the property,
    and so does a call slower than ``seconds``."""
    started = time.perf_counter()
    try:
        return call()
    except AgentError as exc:
        return exc
    finally:
        took = time.perf_counter() - started
        assert took < seconds, f"took {took:.2f} s (bound {seconds} s)"


@contextmanager
def peak_allocation(limit_bytes: int) -> Iterator[None]:
    """Fail if the block allocates more than ``limit_bytes`` at its peak (Python allocations)."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit_bytes, f"peak allocation {peak / 2**20:.1f} MiB (bound {limit_bytes / 2**20:.1f} MiB)"


def asked_reply_topics(message: Incoming) -> set[str]:
    """Every topic ``message`` asked to be answered on: its Response Topic, its top-level ``reply_to``
    (as the safe peek reads it, and as a full parse reads it: the two may differ on duplicate keys)."""
    asked = {message.response_topic, top_level_strings(message.payload, ("reply_to",)).get("reply_to")}
    try:
        reply_to = json.loads(message.payload).get("reply_to")
    except (ValueError, AttributeError, RecursionError):
        reply_to = None
    if isinstance(reply_to, str):
        asked.add(reply_to)
    return {topic for topic in asked if topic}
