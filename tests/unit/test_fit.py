"""Choosing a quant: budgets, the quality floor, thermal/battery caps, over the real board profiles."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.catalog.estimate import estimate_memory
from agent.catalog.fit import (
    Budget,
    Candidate,
    FitPolicy,
    MiB,
    NothingFitsError,
    Verdict,
    choose,
    make_budget,
)
from agent.catalog.gguf_header import GgufInfo
from agent.catalog.quants import quality_rank
from agent.config.adapt import AdaptSettings
from agent.hardware.conditions import BatteryReading, Conditions, Memory, make_conditions

PROFILES = Path(__file__).resolve().parents[2].parent / "shared" / "device-profiles.toml"
MB = 1_000_000


def _gemma3(n_layer: int, n_embd: int, n_ff: int, file_bytes: int) -> GgufInfo:
    """Gemma 3 hyperparameters (1 KV head of 256, 262k vocab, SWA 512 every 6th layer global)."""
    return GgufInfo(
        version=3,
        architecture="gemma3",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        n_head_kv=1,
        key_length=256,
        value_length=256,
        sliding_window=512,
        swa_layers=tuple(il % 6 < 5 for il in range(n_layer)),
        context_length=32768,
        vocab_size=262144,
        data_offset=0,
        tensor_bytes=file_bytes,
        metadata={"gemma3.feed_forward_length": n_ff},
    )


def _llama(file_bytes: int) -> GgufInfo:
    """SmolLM2 135M hyperparameters (30 layers, 3 KV heads of 64, 49k vocab, 48900 BPE merges)."""
    return GgufInfo(
        version=3,
        architecture="llama",
        n_layer=30,
        n_embd=576,
        n_head=9,
        n_head_kv=3,
        key_length=64,
        value_length=64,
        vocab_size=49152,
        data_offset=0,
        tensor_bytes=file_bytes,
        metadata={"llama.feed_forward_length": 1536, "tokenizer.ggml.merges": 48900},
    )


# File sizes from the Hub listings of the catalog repos (decimal MB as the Hub shows them).
GEMMA_1B_FILES = {"Q8_0": 1050, "Q6_K": 997, "Q5_K_M": 851, "UD-Q4_K_XL": 806, "Q4_K_M": 806,
                  "UD-Q3_K_XL": 727, "Q3_K_M": 722, "Q2_K_L": 690, "Q2_K": 701}
GEMMA_270M_FILES = {"Q8_0": 292, "Q4_K_M": 253, "Q4_0": 242}
SMOLLM_135M_FILES = {"Q8_0": 145, "Q4_K_M": 105, "Q2_K": 88}
PREFER = ["gemma-3-1b-it", "gemma-3-270m-it", "smollm2-135m-instruct"]


def _candidates(n_ctx: int = 2048) -> list[Candidate]:
    """Estimated candidates for the three-model preference list (no repacking: a Pi 4 layout)."""
    out: list[Candidate] = []
    for model, files, info_for in (
        ("gemma-3-1b-it", GEMMA_1B_FILES, lambda b: _gemma3(26, 1152, 6912, b)),
        ("gemma-3-270m-it", GEMMA_270M_FILES, lambda b: _gemma3(18, 640, 2048, b)),
        ("smollm2-135m-instruct", SMOLLM_135M_FILES, _llama),
    ):
        for quant, mb in files.items():
            est = estimate_memory(info_for(mb * MB), n_ctx, repack_types=frozenset())
            out.append(Candidate(model=model, quant=quant, estimate_bytes=est.estimate_bytes))
    return out


def _profiles() -> list[dict[str, Any]]:
    if not PROFILES.exists():
        return []
    return list(tomllib.loads(PROFILES.read_text(encoding="utf-8"))["board"])


def _board_cases() -> list[Any]:
    cases = []
    for board in _profiles():
        for ram, avail in board["typical_available_mb"].items():
            for temp in (45.0, board["soft_temp_c"] - 2, board["hard_temp_c"]):
                cases.append(pytest.param(board, int(ram), int(avail), temp, id=f"{board['name']}-{ram}MB-{temp:.0f}C"))
    return cases


def _cond(
    temp: float | None = None,
    soft: float = 80.0,
    hard: float = 85.0,
    *,
    flags: frozenset[str] = frozenset(),
    battery: BatteryReading | None = None,
) -> Conditions:
    """Conditions for a device with plenty of memory (fit tests pass the budget separately)."""
    return make_conditions(
        temperature_c=temp, flags=flags, battery=battery, memory=Memory(available_bytes=10**10),
        soft_limit_c=soft, hard_limit_c=hard, cfg=AdaptSettings(),
    )


def _battery(percent: float, discharging: bool) -> BatteryReading:
    return BatteryReading(name="BAT0", percent=percent, discharging=discharging)


# ---------------------------------------------------------------------------------------------- budget


def test_budget_takes_the_smaller_of_available_and_cgroup_headroom() -> None:
    """A systemd MemoryMax below MemAvailable is what counts."""
    budget = make_budget(4000 * MiB, cgroup_limit_bytes=1000 * MiB, cgroup_usage_bytes=200 * MiB,
                         reserve_bytes=0, safety_fraction=0.0, min_safety_bytes=0)
    assert budget.cgroup_headroom_bytes == 800 * MiB
    assert budget.bytes == 800 * MiB


def test_budget_subtracts_reserve_margin_and_process() -> None:
    """Reserve, a 5 % (>= 32 MiB) safety margin and the process overhead come off; never negative."""
    budget = make_budget(1000 * MiB, reserve_bytes=64 * MiB, process_overhead_bytes=80 * MiB)
    assert budget.safety_margin_bytes == 50 * MiB
    assert budget.bytes == (1000 - 64 - 50 - 80) * MiB
    assert make_budget(10 * MiB).bytes == 0
    assert "budget" in budget.explain()
    assert "cgroup" not in budget.explain()


# ---------------------------------------------------------------------------------------------- choose


def test_picks_the_best_quality_that_fits() -> None:
    """Among one model's quants, the highest on the ladder within the budget wins."""
    cands = [Candidate(model="m", quant=q, estimate_bytes=b * MiB) for q, b in
             (("Q8_0", 900), ("Q6_K", 700), ("Q4_K_M", 500), ("Q2_K", 300))]
    decision = choose(cands, Budget(available_bytes=750 * MiB))
    assert decision.require().quant == "Q6_K"
    verdicts = {v.candidate.quant: v for v in decision.verdicts}
    assert verdicts["Q8_0"].verdict is Verdict.TOO_LARGE
    assert verdicts["Q8_0"].margin_bytes == -150 * MiB
    assert verdicts["Q4_K_M"].verdict is Verdict.FITS
    assert verdicts["Q6_K"].margin_bytes == 50 * MiB


def test_nothing_fits_names_the_numbers() -> None:
    """With no fitting candidate, require() raises NothingFitsError naming budget and smallest need."""
    cands = [Candidate(model="big", quant="Q4_K_M", estimate_bytes=900 * MiB),
             Candidate(model="big", quant="Q2_K", estimate_bytes=600 * MiB)]
    decision = choose(cands, Budget(available_bytes=500 * MiB))
    assert decision.chosen is None
    with pytest.raises(NothingFitsError, match=r"500\.0 MiB.*big Q2_K, needs 600\.0 MiB.*short by 100\.0 MiB"):
        decision.require()
    assert any("nothing fits" in line for line in decision.explain())


def test_smaller_model_beats_a_quant_below_the_floor() -> None:
    """If the preferred model only fits below Q3_K_S, the next model in the preference list is taken."""
    cands = [Candidate(model="big", quant="Q4_K_M", estimate_bytes=900 * MiB),
             Candidate(model="big", quant="IQ2_XS", estimate_bytes=400 * MiB),
             Candidate(model="small", quant="Q8_0", estimate_bytes=300 * MiB)]
    decision = choose(cands, 500 * MiB, prefer=["big", "small"])
    assert (decision.require().model, decision.require().quant) == ("small", "Q8_0")
    assert {v.candidate.quant: v.verdict for v in decision.verdicts}["IQ2_XS"] is Verdict.BELOW_FLOOR


def test_below_floor_is_used_when_nothing_else_fits_unless_the_floor_is_hard() -> None:
    """A crushed model beats no model, and the decision says so; a hard floor refuses instead."""
    cands = [Candidate(model="big", quant="Q4_K_M", estimate_bytes=900 * MiB),
             Candidate(model="big", quant="IQ2_XS", estimate_bytes=400 * MiB)]
    soft = choose(cands, 500 * MiB)
    assert soft.require().quant == "IQ2_XS"
    assert any("below" in n for n in soft.notes)
    hard = choose(cands, 500 * MiB, policy=FitPolicy(floor_is_hard=True))
    assert hard.chosen is None


def test_preference_order_beats_quality_across_models() -> None:
    """The first preferred model with a fitting quant wins even if another model's quant ranks higher."""
    cands = [Candidate(model="a", quant="Q4_K_M", estimate_bytes=400 * MiB),
             Candidate(model="b", quant="Q8_0", estimate_bytes=300 * MiB)]
    decision = choose(cands, 500 * MiB, prefer=["a", "b"])
    assert decision.require().model == "a"
    assert {v.candidate.model: v.verdict for v in decision.verdicts}["b"] is Verdict.NOT_PREFERRED


def test_unknown_quants_are_never_chosen() -> None:
    """A tag off the ladder is reported, not picked."""
    decision = choose([Candidate(model="m", quant="Q9_9", estimate_bytes=1)], 500 * MiB)
    assert decision.chosen is None
    assert decision.verdicts[0].verdict is Verdict.UNKNOWN_QUANT


@pytest.mark.parametrize(
    ("conditions", "steps"),
    [
        (None, 0),
        (_cond(60), 0),
        (_cond(74.9), 0),
        (_cond(75), 1),  # soft 80 - thermal_margin_c 5: high
        (_cond(78), 1),
        (_cond(82.9), 1),
        (_cond(83), 2),  # hard 85 - critical_margin_c 2: critical (was 1 until the hard limit)
        (_cond(86), 2),
        (_cond(50, flags=frozenset({"soft_temp_limit"})), 1),  # soft limit active now
        (_cond(50, flags=frozenset({"throttled"})), 1),  # throttled now: high (was 2)
        (_cond(50, flags=frozenset({"under_voltage"})), 1),  # under-voltage now: high (was 0)
        (_cond(None), 0),  # no temperature and no throttle bit: nothing guessed
    ],
)
def test_heat_caps_quality_by_steps(conditions: Conditions | None, steps: int) -> None:
    """Heat 'high' (near the soft limit or any throttle bit now): one rung down; 'critical': two."""
    cands = [Candidate(model="m", quant=q, estimate_bytes=100 * MiB) for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")]
    decision = choose(cands, 1000 * MiB, conditions=conditions)
    assert decision.cap_steps == steps
    assert decision.require().quant == ("Q8_0", "Q6_K", "Q5_K_M")[steps]


def test_cap_never_goes_below_the_floor() -> None:
    """When the cap would cross the floor, the lowest quant at or above it is kept."""
    cands = [Candidate(model="m", quant=q, estimate_bytes=100 * MiB) for q in ("Q3_K_S", "Q2_K")]
    assert choose(cands, 1000 * MiB, conditions=_cond(90)).require().quant == "Q3_K_S"


@pytest.mark.parametrize(
    ("battery", "quant"),
    [
        (_battery(15, discharging=True), "Q6_K"),
        (_battery(20, discharging=True), "Q6_K"),  # at battery_low_percent: low (was: only below 20)
        (_battery(20.5, discharging=True), "Q8_0"),
        (_battery(5, discharging=True), "Q6_K"),  # critical counts one rung, like low
        (_battery(15, discharging=False), "Q8_0"),
        (_battery(50, discharging=True), "Q8_0"),
        (None, "Q8_0"),
    ],
)
def test_low_battery_while_discharging_steps_down(battery: BatteryReading | None, quant: str) -> None:
    """At or below 20 % and discharging: one rung down; charging, above 20 % or no battery: no change."""
    cands = [Candidate(model="m", quant=q, estimate_bytes=100 * MiB) for q in ("Q8_0", "Q6_K")]
    assert choose(cands, 10**10, conditions=_cond(battery=battery)).require().quant == quant


@pytest.mark.parametrize(
    ("conditions", "extra", "steps"),
    [
        (_cond(78), 1, 1),  # the live cap answers the same heat: counted once
        (_cond(78), 2, 2),
        (_cond(60), 1, 1),  # a cap for memory pressure, no heat
        (_cond(84), 1, 2),  # critical heat weighs more than the live cap
        (_cond(78, battery=_battery(10, discharging=True)), 0, 2),  # heat and battery add up
        (_cond(86, battery=_battery(10, discharging=True)), 0, 2),  # never beyond max_cap_steps
    ],
)
def test_the_live_cap_and_the_conditions_count_once(conditions: Conditions, extra: int, steps: int) -> None:
    """The adaptation policy's cap and the conditions' heat/battery steps: the larger counts, not the sum."""
    cands = [Candidate(model="m", quant=q, estimate_bytes=100 * MiB) for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")]
    assert choose(cands, 1000 * MiB, conditions=conditions, extra_cap_steps=extra).cap_steps == steps


# -------------------------------------------------------------------------------- the real boards

EXPECTED = [
    # (board, RAM MB, available MB override or None = typical, temperature C, model, quant)
    ("Raspberry Pi 4 Model B", 2048, 1126, 78.0, "gemma-3-1b-it", "UD-Q4_K_XL"),  # 1.1 GiB free, hot
    ("Raspberry Pi 4 Model B", 2048, 1126, 50.0, "gemma-3-1b-it", "Q5_K_M"),
    ("Raspberry Pi 4 Model B", 2048, None, 50.0, "gemma-3-1b-it", "Q8_0"),
    ("Raspberry Pi 4 Model B", 1024, None, 50.0, "gemma-3-270m-it", "Q8_0"),
    ("Raspberry Pi 4 Model B", 1024, None, 86.0, "gemma-3-270m-it", "Q4_0"),
    ("Raspberry Pi Zero 2 W", 512, None, 50.0, "smollm2-135m-instruct", "Q8_0"),
    ("Raspberry Pi Zero 2 W", 512, None, 81.0, "smollm2-135m-instruct", "Q4_K_M"),
    ("Raspberry Pi 3 Model B+", 1024, None, 62.0, "gemma-3-270m-it", "Q4_K_M"),  # soft limit is 60 C
    ("Raspberry Pi 5", 8192, None, 50.0, "gemma-3-1b-it", "Q8_0"),
]


@pytest.mark.skipif(not PROFILES.exists(), reason="../shared/device-profiles.toml not present")
@pytest.mark.parametrize(("board_name", "ram", "avail", "temp", "model", "quant"), EXPECTED)
def test_board_scenarios(  # noqa: PLR0917 -- one parameter per table column
    board_name: str, ram: int, avail: int | None, temp: float, model: str, quant: str
) -> None:
    """What a board picks for the Gemma 1B > Gemma 270M > SmolLM2 135M preference list at n_ctx 2048."""
    board = next(b for b in _profiles() if b["name"] == board_name)
    available = (avail if avail is not None else board["typical_available_mb"][str(ram)]) * MiB
    hot = _cond(temp, board["soft_temp_c"], board["hard_temp_c"])
    decision = choose(_candidates(), make_budget(available), conditions=hot, prefer=PREFER)
    chosen = decision.require()
    assert (chosen.model, chosen.quant) == (model, quant), "\n".join(decision.explain())


@pytest.mark.skipif(not PROFILES.exists(), reason="../shared/device-profiles.toml not present")
@pytest.mark.parametrize(("board", "ram", "avail", "temp"), _board_cases())
def test_every_board_gets_a_sound_decision(board: dict[str, Any], ram: int, avail: int, temp: float) -> None:
    """On every board size and temperature: the choice fits, nothing better fits unless capped, heat never helps."""
    cands = _candidates()
    budget = make_budget(avail * MiB)
    hot = _cond(temp, board["soft_temp_c"], board["hard_temp_c"])
    decision = choose(cands, budget, conditions=hot, prefer=PREFER)
    cool = choose(cands, budget, prefer=PREFER)
    fitting = [c for c in cands if c.estimate_bytes <= budget.bytes]
    if not fitting:
        assert decision.chosen is None
        return
    chosen = decision.require()
    assert chosen.estimate_bytes <= budget.bytes
    assert cool.chosen is not None
    if decision.cap_steps == 0:
        assert chosen == cool.chosen
    else:
        assert chosen.model == cool.chosen.model
        assert quality_rank(chosen.quant) >= quality_rank(cool.chosen.quant)  # type: ignore[operator]
    # No fitting quant of the cool choice's model ranks above it (it really is the best that fits).
    for c in fitting:
        if c.model == cool.chosen.model:
            assert quality_rank(c.quant) >= quality_rank(cool.chosen.quant)  # type: ignore[operator]
    assert len(decision.verdicts) == len(cands)


# ------------------------------------------------------------------------------- estimate terms


def test_kv_cache_honours_gqa_and_sliding_window() -> None:
    """Gemma 3 270M at 8192: 18 layers x 1 KV head x 512 B/token; SWA layers shrink without swa_full (the default)."""
    info = _gemma3(18, 640, 2048, 250 * MB)
    full = estimate_memory(info, 8192, swa_full=True, repack_types=frozenset())
    assert full.kv_cache_bytes == 18 * 8192 * 1 * (256 + 256) * 2
    windowed = estimate_memory(info, 8192, repack_types=frozenset())
    # 15 SWA layers at pad256(512 + 512) = 1024 cells, 3 global layers at 8192.
    assert windowed.kv_cells_swa == 1024
    assert windowed.kv_cache_bytes == (15 * 1024 + 3 * 8192) * 512 * 2


def test_n_ctx_is_padded_to_256_and_quantized_kv_is_smaller() -> None:
    """llama.cpp allocates n_ctx rounded up to 256 cells; a q8_0 cache takes 34/32 bytes per value."""
    info = _llama(100 * MB)
    est = estimate_memory(info, 1000, kv_type="q8_0", repack_types=frozenset())
    assert est.n_ctx_alloc == 1024
    assert est.kv_cache_bytes == int(30 * 1024 * 3 * 128 * 34 / 32)


def test_estimate_explains_each_term() -> None:
    """explain() lists weights, KV, compute, overhead and the totals; terms add up to estimate_bytes."""
    est = estimate_memory(_llama(100 * MB), 2048)
    text = "\n".join(est.explain())
    for word in ("weights", "KV cache", "compute", "runtime overhead", "estimate", "process"):
        assert word in text
    assert sum(est.terms().values()) == est.estimate_bytes
    assert est.total_bytes == est.estimate_bytes + est.process_overhead_bytes
