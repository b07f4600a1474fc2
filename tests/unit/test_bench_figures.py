"""python -m bench: the figures and verdicts computed from samples, and the docs refresh (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.figures import level_rows, single_rows, targets
from bench.load import LevelRun
from bench.measures import Sample, percentile
from bench.models import BenchModel
from bench.report import BEGIN, END, refresh_docs
from bench.suite import BenchConfig, ModelResult

CFG = BenchConfig(quick=True)


def _sample(name: str, *, ttft: float, tps: float, total: float, tokens: int = 100, start: float = 0.0) -> Sample:
    return Sample(name, tokens=tokens, total_ms=total, ttft_ms=ttft, decode_tps=tps, start=start,
                  end=start + total / 1000)


def _result() -> ModelResult:
    res = ModelResult(BenchModel("m", "m", Path("m.gguf")))
    res.single = {
        "raw": [_sample("raw", ttft=10.0, tps=100.0, total=1000.0), _sample("raw", ttft=20.0, tps=50.0, total=2000.0)],
        "p4": [_sample("p4", ttft=12.0, tps=99.5, total=1010.0), _sample("p4", ttft=21.0, tps=50.0, total=2000.0)],
        "http": [_sample("http", ttft=16.0, tps=97.0, total=1030.0),
                 _sample("http", ttft=26.0, tps=48.0, total=2100.0)],
    }
    one = LevelRun("p4", 1, [_sample("p4", ttft=10.0, tps=100.0, total=1000.0)], wall_s=1.0)
    four = LevelRun("p4", 4, [_sample("p4", ttft=t, tps=50.0, total=2000.0) for t in (10.0, 15.0, 20.0, 25.0)],
                    wall_s=2.5)
    res.levels = {"p4": {1: [one], 4: [four]}}
    res.prefill_chunk_ms = 4.0
    res.rss = {"raw": 200 * 2**20, "p1": 210 * 2**20}
    return res


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([3.0, 1.0, 2.0], 50, 2.0),
    ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
    ([float(i) for i in range(1, 11)], 99, 10.0),  # fewer than 100 values: p99 is the slowest
    ([float(i) for i in range(1, 201)], 99, 198.0),
])
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    """Percentiles are nearest-rank, so p99 over a handful of requests is the slowest one, never interpolated."""
    assert percentile(values, q) == expected


def test_single_client_ratios_pair_each_round_with_raw() -> None:
    """tokens/s ratio and TTFT overhead are medians of per-round pairs with raw, not ratios of medians."""
    rows = {r.name: r for r in single_rows(_result())}
    assert rows["p4"].tps_ratio == pytest.approx((0.995 + 1.0) / 2)
    assert rows["p4"].ttft_overhead == pytest.approx((2.0 + 1.0) / 2)
    assert rows["raw"].tps_ratio == 1.0


def test_aggregate_is_all_tokens_over_wall_time() -> None:
    """A level's aggregate tokens/s is every completed token over its wall time, compared with one client's."""
    rows = {(r.name, r.clients): r for r in level_rows(_result())}
    assert rows[("p4", 4)].aggregate_tps == pytest.approx(400 / 2.5)
    assert rows[("p4", 4)].vs_one == pytest.approx(1.6)
    assert rows[("p4", 4)].ttft_p99 == 25.0


def test_targets_are_judged_with_their_figures() -> None:
    """Each target of issue 12 is met or not from the measured figures, the HTTP server as the second bar."""
    verdicts = {t.what.split(" (")[0].split(",")[0]: t.met for t in targets(_result(), BenchConfig(quick=True))}
    assert verdicts["aggregate tokens/s"] is True  # 1.6x exactly
    assert verdicts["single-client tokens/s / raw"] is True  # 0.9975 and ahead of 0.97
    assert verdicts["TTFT overhead over raw"] is True  # +1.5 ms, HTTP +6 ms
    assert verdicts["p99 TTFT with 4 clients"] is False  # 25 >= 2 x 10 + 4
    assert verdicts["RSS daemon"] is True  # +10 MiB


def test_docs_refresh_keeps_the_hand_written_text(tmp_path: Path) -> None:
    """Only the block between the markers is regenerated; what people wrote around it stays."""
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nintro\n\n{BEGIN}\nold tables\n{END}\n\n## Reading it\n\nnotes\n")
    refresh_docs(doc, "new tables")
    text = doc.read_text()
    assert "old tables" not in text
    assert f"intro\n\n{BEGIN}\nnew tables\n{END}\n\n## Reading it\n\nnotes\n" in text
