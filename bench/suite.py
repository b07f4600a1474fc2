"""One model through every measure: start the contenders, warm them, then interleave rounds so drift cancels."""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import http_server
from bench.edge import EdgeAgent, NonStreaming
from bench.http_server import LlamaServer
from bench.load import LevelRun, run_level
from bench.measures import Contender, Sample, idle_cpu_percent, rss_bytes
from bench.models import BenchModel
from bench.prompts import PROMPTS
from bench.raw import RawLlama


@dataclass(frozen=True)
class BenchConfig:
    """What a run measures and how much; ``--quick`` shrinks everything but the shape."""

    quick: bool
    threads: int = 2
    n_ctx: int = 2048
    max_tokens: int = 128  # single-client rounds
    rounds: int = 6  # single-client rounds after one warm-up round
    load_max_tokens: int = 96
    load_rounds: int = 2
    load_requests: int = 4  # requests per level and round: per client max(1, load_requests // clients)
    levels: tuple[int, ...] = (1, 2, 4, 8)
    parallel: int = 4  # the batching daemon's slots
    prefill_chunk: int = 128  # [inference] prefill_chunk's default: the target's "one prefill chunk"
    idle_s: float = 10.0
    timeout_s: float = 180.0  # any one request, start-up or level
    min_rounds: int = 3  # single-client rounds run even past the time budget

    def per_client(self, clients: int) -> int:
        return max(1, self.load_requests // clients)


@dataclass
class ModelResult:
    """Everything measured on one model."""

    model: BenchModel
    labels: dict[str, str] = field(default_factory=dict)  # contender name -> label, in table order
    start_ready_s: dict[str, float] = field(default_factory=dict)
    idle_cpu_pct: dict[str, float] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    prefill_chunk_ms: float | None = None
    single: dict[str, list[Sample]] = field(default_factory=dict)
    levels: dict[str, dict[int, list[LevelRun]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _rotated(items: list[Contender], r: int) -> list[Contender]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def run_model(model: BenchModel, cfg: BenchConfig, workdir: Path, *, broker_port: int,
              free_port: Callable[[], int], deadline: float) -> ModelResult:
    """Measure ``model`` with every contender; failures are recorded in the result, never raised. Past
    ``deadline`` (``time.monotonic``) rounds beyond the first few are skipped, and the result says so."""
    res = ModelResult(model)
    work = workdir / model.slug
    work.mkdir(parents=True, exist_ok=True)
    common = {"n_ctx": cfg.n_ctx, "threads": cfg.threads, "workdir": work, "timeout_s": cfg.timeout_s}
    edge_common = {**common, "model": model.path, "broker_port": broker_port}
    with contextlib.ExitStack() as stack:
        started: dict[str, Contender] = {}

        def start(c: Contender) -> None:
            stack.callback(c.stop)  # type: ignore[attr-defined]
            try:
                res.start_ready_s[c.name] = c.start()  # type: ignore[attr-defined]
                started[c.name] = c
                print(f"  {c.label}: ready in {res.start_ready_s[c.name]:.2f} s", flush=True)
            except Exception as exc:  # one contender failing must not end the run
                res.errors.append(f"{c.label} did not start: {exc}")
                print(f"  {c.label}: did not start: {exc}", flush=True)

        # One at a time, so no start-up competes with another for the two cores.
        start(RawLlama(model.path, **common))
        start(EdgeAgent("p1", "edge-agent, parallel = 1", parallel=1, **edge_common))
        start(EdgeAgent(f"p{cfg.parallel}", f"edge-agent, parallel = {cfg.parallel}", parallel=cfg.parallel,
                        **edge_common))
        start(EdgeAgent("q8", "edge-agent, parallel = 1, kv_type q8_0", parallel=1, kv_type="q8_0", **edge_common))
        why_not = http_server.available()
        if why_not is None:
            start(LlamaServer(model.path, port=free_port(), **common))
        else:
            res.skipped.append(f"llama_cpp.server: {why_not}")
        batched = started.get(f"p{cfg.parallel}")
        single: list[Contender] = []
        for name in ("raw", f"p{cfg.parallel}", "p1", "q8", "http"):
            if name in started:
                single.append(started[name])
                if name == f"p{cfg.parallel}" and isinstance(batched, EdgeAgent):
                    single.append(NonStreaming(batched))
        res.labels = {c.name: c.label for c in single}
        if not single:
            return res
        try:
            _measure(res, cfg, started, single, deadline)
        except Exception:  # report what was measured so far
            res.errors.append("measurement aborted:\n" + traceback.format_exc())
        for c in started.values():
            if isinstance(c, EdgeAgent) and not c.pids():
                res.errors.append(f"{c.label} exited during the run; log tail:\n{c.log_tail(2000)}")
    return res


def _measure(res: ModelResult, cfg: BenchConfig, started: dict[str, Contender], single: list[Contender],
             deadline: float) -> None:
    # Warm-up: the first generation pays one-off costs (page faults in the weights, graph allocation).
    for c in single:
        c.complete(PROMPTS[-1], 16, stream=True)
    print(f"  idle CPU over {cfg.idle_s:.0f} s", flush=True)
    res.idle_cpu_pct = idle_cpu_percent({n: c.pids() for n, c in started.items()}, cfg.idle_s)
    raw = started.get("raw")
    if isinstance(raw, RawLlama):
        res.prefill_chunk_ms = statistics.median(raw.prefill_ms(cfg.prefill_chunk) for _ in range(3))
    print(f"  single client: {len(single)} contenders x (1 warm-up + {cfg.rounds}) rounds", flush=True)
    # The load levels get the time after the single-client rounds' share (about a third).
    single_deadline = time.monotonic() + (deadline - time.monotonic()) / 3
    for r in range(cfg.rounds + 1):
        if r > cfg.min_rounds and time.monotonic() > single_deadline:
            res.skipped.append(f"one-client rounds {r}-{cfg.rounds}: past the time budget")
            break
        prompt = PROMPTS[r % len(PROMPTS)]
        for c in _rotated(single, r):
            sample = c.complete(prompt, cfg.max_tokens)
            if r > 0:
                res.single.setdefault(c.name, []).append(sample)
    res.rss = {n: rss_bytes(c.pids()) for n, c in started.items()}
    loaded = [started[n] for n in (f"p{cfg.parallel}", "p1", "http") if n in started]
    for c in loaded:
        res.labels.setdefault(c.name, c.label)
    print(f"  concurrent clients {list(cfg.levels)}: {len(loaded)} contenders x {cfg.load_rounds} rounds", flush=True)
    for r in range(cfg.load_rounds):
        if r > 0 and time.monotonic() > deadline:
            res.skipped.append(f"concurrent-client rounds {r + 1}-{cfg.load_rounds}: past the time budget")
            break
        for level in cfg.levels:
            for c in _rotated(loaded, r + level):
                run = run_level(c, level, cfg.per_client(level), PROMPTS, cfg.load_max_tokens, first_prompt=r * 3,
                                timeout_s=cfg.timeout_s * cfg.per_client(level) + 30)
                res.levels.setdefault(c.name, {}).setdefault(level, []).append(run)
                failed = [s.error for s in run.samples if not s.ok]
                print(f"    round {r + 1} {c.name} x{level}: {run.tokens / run.wall_s:.1f} tokens/s"
                      + (f", {len(failed)} failed: {failed[0]}" if failed else ""), flush=True)
