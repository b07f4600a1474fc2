"""The numbers a report quotes, computed from a model's samples (pure: no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.measures import Sample, median, percentile
from bench.suite import BenchConfig, ModelResult

MiB = 1024 * 1024

# Targets of issue 12 (and issue 2's idle CPU), on this 2-core machine.
AGGREGATE_TARGET = 1.6
TPS_RATIO_TARGET = 0.99
TTFT_OVERHEAD_TARGET_MS = 3.0
RSS_OVER_TARGET_MIB = 15.0
IDLE_CPU_TARGET_PCT = 0.5


@dataclass(frozen=True)
class SingleRow:
    name: str
    n_ok: int
    n_failed: int
    tokens: float
    decode_tps: float  # median, streamed only (nan otherwise)
    tps_ratio: float  # median of per-round ratios to raw
    ttft_p50: float
    ttft_overhead: float  # median of per-round differences to raw
    total_p50: float
    total_ratio: float  # median of per-round raw total / this total (> 1: faster than raw)


@dataclass(frozen=True)
class LevelRow:
    name: str
    clients: int
    n_ok: int
    n_total: int
    aggregate_tps: float
    vs_one: float
    latency_p50: float
    latency_p99: float
    ttft_p50: float
    ttft_p99: float


@dataclass(frozen=True)
class Target:
    what: str
    result: str
    target: str
    met: bool | None  # None: not measured


def _paired(res: ModelResult, name: str) -> list[tuple[Sample, Sample]]:
    raw = res.single.get("raw", [])
    return [(s, r) for s, r in zip(res.single.get(name, []), raw, strict=False) if s.ok and r.ok]


def single_rows(res: ModelResult) -> list[SingleRow]:
    rows = []
    for name, samples in res.single.items():
        ok = [s for s in samples if s.ok]
        pairs = _paired(res, name)
        rows.append(SingleRow(
            name=name, n_ok=len(ok), n_failed=len(samples) - len(ok),
            tokens=median([float(s.tokens) for s in ok]),
            decode_tps=median([s.decode_tps for s in ok if s.decode_tps is not None]),
            tps_ratio=median([s.decode_tps / r.decode_tps for s, r in pairs
                              if s.decode_tps is not None and r.decode_tps]),
            ttft_p50=median([s.ttft_ms for s in ok if s.ttft_ms is not None]),
            ttft_overhead=median([s.ttft_ms - r.ttft_ms for s, r in pairs
                                  if s.ttft_ms is not None and r.ttft_ms is not None]),
            total_p50=median([s.total_ms for s in ok]),
            total_ratio=median([r.total_ms / s.total_ms for s, r in pairs if s.total_ms]),
        ))
    return rows


def level_rows(res: ModelResult) -> list[LevelRow]:
    rows = []
    for name, by_level in res.levels.items():
        one = None
        for clients in sorted(by_level):
            runs = by_level[clients]
            samples = [s for run in runs for s in run.samples]
            ok = [s for s in samples if s.ok]
            agg = sum(run.tokens for run in runs) / sum(run.wall_s for run in runs)
            if clients == 1:
                one = agg
            lat = [s.total_ms for s in ok]
            ttft = [s.ttft_ms for s in ok if s.ttft_ms is not None]
            rows.append(LevelRow(name, clients, len(ok), len(samples), agg, agg / one if one else math.nan,
                                 percentile(lat, 50), percentile(lat, 99), percentile(ttft, 50), percentile(ttft, 99)))
    return rows


def _fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def targets(res: ModelResult, cfg: BenchConfig) -> list[Target]:
    """Issue 12's targets, judged on the batching daemon (``parallel`` = cfg.parallel, streamed)."""
    edge = f"p{cfg.parallel}"
    singles = {r.name: r for r in single_rows(res)}
    levels = {(r.name, r.clients): r for r in level_rows(res)}
    out = []

    four, one = levels.get((edge, 4)), levels.get((edge, 1))
    if four and one:
        out.append(Target(f"aggregate tokens/s, 4 clients / 1 client (parallel = {cfg.parallel})",
                          f"{four.vs_one:.2f}x ({four.aggregate_tps:.1f} vs {one.aggregate_tps:.1f})",
                          f">= {AGGREGATE_TARGET}x", four.vs_one >= AGGREGATE_TARGET))
    else:
        out.append(Target("aggregate tokens/s, 4 clients / 1 client", "not measured", f">= {AGGREGATE_TARGET}x", None))

    e, h = singles.get(edge), singles.get("http")
    if e:
        ahead = h is None or e.tps_ratio > h.tps_ratio
        out.append(Target("single-client tokens/s / raw (median of per-round ratios)",
                          f"{e.tps_ratio:.3f} ({e.decode_tps:.1f} vs raw {singles['raw'].decode_tps:.1f})"
                          + (f"; HTTP server {h.tps_ratio:.3f}" if h else ""),
                          f">= {TPS_RATIO_TARGET} and ahead of the HTTP server",
                          e.tps_ratio >= TPS_RATIO_TARGET and ahead))
        ahead = h is None or e.ttft_overhead < h.ttft_overhead
        out.append(Target("TTFT overhead over raw, p50 (ms)",
                          f"{e.ttft_overhead:+.2f} ({e.ttft_p50:.1f} vs raw {singles['raw'].ttft_p50:.1f})"
                          + (f"; HTTP server {h.ttft_overhead:+.2f}" if h else ""),
                          f"<= {TTFT_OVERHEAD_TARGET_MS:.0f} and ahead of the HTTP server",
                          e.ttft_overhead <= TTFT_OVERHEAD_TARGET_MS and ahead))
    if four and one and res.prefill_chunk_ms is not None:
        bound = 2 * one.ttft_p50 + res.prefill_chunk_ms
        out.append(Target("p99 TTFT with 4 clients (ms)",
                          f"{four.ttft_p99:.1f} (bound: 2 x {one.ttft_p50:.1f} + prefill of {cfg.prefill_chunk} "
                          f"tokens {res.prefill_chunk_ms:.1f} = {bound:.1f})",
                          "< 2 x single-client TTFT p50 + one prefill chunk", four.ttft_p99 < bound))
    if "p1" in res.rss and "raw" in res.rss and res.rss["raw"]:
        over = (res.rss["p1"] - res.rss["raw"]) / MiB
        out.append(Target("RSS daemon (parallel = 1) - raw, same model and n_ctx (MiB)",
                          f"{over:+.1f} ({res.rss['p1'] / MiB:.1f} vs {res.rss['raw'] / MiB:.1f})",
                          f"<= {RSS_OVER_TARGET_MIB:.0f}", over <= RSS_OVER_TARGET_MIB))
    if edge in res.idle_cpu_pct:
        pct = res.idle_cpu_pct[edge]
        out.append(Target(f"idle CPU, daemon parallel = {cfg.parallel} (% of one core)", f"{pct:.3f}",
                          f"<= {IDLE_CPU_TARGET_PCT} (issue 2)", pct <= IDLE_CPU_TARGET_PCT))
    return out


def aggregate_ratio(res: ModelResult, cfg: BenchConfig, clients: int = 4) -> float | None:
    """The batching daemon's aggregate tokens/s with ``clients`` clients over one client's."""
    for row in level_rows(res):
        if row.name == f"p{cfg.parallel}" and row.clients == clients:
            return row.vs_one
    return None
