"""What one request measured, the statistics over many, and the process-level measures (RSS, idle CPU)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Protocol

import psutil


@dataclass(frozen=True)
class Sample:
    """One request as its client saw it. Times from ``time.perf_counter`` in the client's process, except
    raw llama-cpp-python's, measured inside its own process (no IPC in the baseline)."""

    contender: str
    tokens: int = 0
    total_ms: float = 0.0
    ttft_ms: float | None = None  # None: not streamed, the client sees no first token
    decode_tps: float | None = None  # tokens after the first / time from first token to the end
    start: float = 0.0
    end: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.tokens > 0


class Contender(Protocol):
    """A way of serving the model: started once, asked for completions (threads may share it when
    ``concurrent``), stopped at the end."""

    name: str
    label: str
    concurrent: bool

    def complete(self, prompt: str, max_tokens: int, *, stream: bool = True) -> Sample: ...

    def pids(self) -> list[int]: ...


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); with fewer than 100 values p99 is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of these processes, summed (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total


def idle_cpu_percent(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """CPU used by each group of processes over the same ``seconds`` of idleness, in % of one core."""
    procs = {name: [psutil.Process(p) for p in pids] for name, pids in groups.items()}

    def used(ps: list[psutil.Process]) -> float:
        total = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    before = {name: used(ps) for name, ps in procs.items()}
    started = time.monotonic()
    time.sleep(seconds)
    took = time.monotonic() - started
    return {name: 100.0 * (used(ps) - before[name]) / took for name, ps in procs.items()}
