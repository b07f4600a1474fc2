"""Concurrent clients: N threads, each sending its requests back to back (a closed loop), started together."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from bench.measures import Contender, Sample


@dataclass
class LevelRun:
    """One run of ``clients`` concurrent clients against one contender."""

    contender: str
    clients: int
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples if s.ok)


def run_level(contender: Contender, clients: int, per_client: int, prompts: list[str], max_tokens: int, *,
              first_prompt: int = 0, timeout_s: float) -> LevelRun:
    """``clients`` threads send ``per_client`` requests each; client i's j-th prompt is
    ``prompts[(first_prompt + i * per_client + j) % len(prompts)]``. Aggregate wall time runs from the
    common start to the last reply; a thread still busy after ``timeout_s`` is reported, not waited for."""
    run = LevelRun(contender.name, clients)
    lock = threading.Lock()
    gate = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            gate.wait(timeout=30)
        except threading.BrokenBarrierError:
            return
        for j in range(per_client):
            prompt = prompts[(first_prompt + i * per_client + j) % len(prompts)]
            sample = contender.complete(prompt, max_tokens, stream=True)
            with lock:
                run.samples.append(sample)

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"bench-client-{i}")
               for i in range(clients)]
    for t in threads:
        t.start()
    gate.wait(timeout=30)
    started = time.perf_counter()
    deadline = started + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    ended = max((s.end for s in run.samples), default=time.perf_counter())
    run.wall_s = max(1e-9, ended - started)
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        run.samples.append(Sample(contender.name, error=f"{stuck} client(s) still busy after {timeout_s:.0f} s"))
    return run
