"""Slots in the fit decision: the most that fit after the quant is chosen, never fewer than one."""

from __future__ import annotations

import pytest

from agent.catalog.estimate import estimate_memory
from agent.catalog.fit import (
    Budget,
    Candidate,
    Verdict,
    budget_from_conditions,
    choose,
    make_budget,
    most_slots,
    slots_for,
)
from agent.catalog.gguf_header import GgufInfo, GgufTensor
from agent.config.adapt import AdaptSettings
from agent.hardware.conditions import Memory, make_conditions

MiB = 1024 * 1024


def _linear(base: int, per_slot: int):  # type: ignore[no-untyped-def]
    return lambda n: base + n * per_slot


@pytest.mark.parametrize("cap", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("budget", range(0, 1100, 20))
def test_most_slots_is_the_largest_count_that_fits_exhaustively(budget: int, cap: int) -> None:
    """For every budget and cap: the largest n <= cap with cost(n) <= budget, else 1."""
    cost = _linear(100, 100)  # 1 slot 200, 2 slots 300, ...
    expected = max([n for n in range(1, cap + 1) if cost(n) <= budget], default=1)
    assert most_slots(cost, budget, cap) == expected


def test_most_slots_never_returns_fewer_than_one_or_more_than_the_cap() -> None:
    """Nothing fits: 1 (the quant decision already said whether one fits); a zero cap counts as 1."""
    assert most_slots(lambda n: 10**12, 0, 4) == 1
    assert most_slots(lambda n: 0, 10, 0) == 1
    assert most_slots(lambda n: 0, 10, 64) == 64


def test_most_slots_asks_no_further_than_the_first_that_does_not_fit() -> None:
    """The cost grows with n, so the search stops at the first miss."""
    asked: list[int] = []

    def cost(n: int) -> int:
        asked.append(n)
        return n * 100

    assert most_slots(cost, 250, 8) == 2
    assert asked == [2, 3]


def _info() -> GgufInfo:
    """A 100 MiB LLaMA-like model: 4 layers x 2 KV heads x 128 B per token and layer (f16: 4 KiB per token)."""
    tensors = (GgufTensor(name="blk.0.ffn_up.weight", dims=(256, 256), ggml_type=8, type_name="Q8_0", offset=0,
                          n_bytes=100 * MiB),)
    return GgufInfo(version=3, architecture="llama", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, key_length=64,
                    value_length=64, vocab_size=2048, data_offset=0, tensor_bytes=100 * MiB, tensors=tensors,
                    metadata={"llama.feed_forward_length": 512})


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
@pytest.mark.parametrize("cap", [1, 4, 6])
def test_slots_for_matches_the_estimate_at_every_budget(kv_type: str, cap: int) -> None:
    """slots_for(info, ...) = the most slots whose estimate_memory fits, over a sweep of budgets."""
    info = _info()
    costs = {n: estimate_memory(info, 2048, n_seq=n, kv_type=kv_type, repack_types=frozenset()).estimate_bytes
             for n in range(1, cap + 1)}
    for budget in range(costs[1] - 5 * MiB, costs[cap] + 5 * MiB, MiB):
        expected = max([n for n, c in costs.items() if c <= budget], default=1)
        got = slots_for(info, 2048, budget, cap, kv_type, repack_types=frozenset())
        assert got == expected, budget


def test_a_q8_0_cache_fits_more_slots_in_the_same_budget() -> None:
    """The KV type is a fit lever: the same budget holds more q8_0 slots than f16 ones."""
    info = _info()
    budget = estimate_memory(info, 2048, n_seq=2, repack_types=frozenset()).estimate_bytes
    assert slots_for(info, 2048, budget, 8, "f16", repack_types=frozenset()) == 2
    assert slots_for(info, 2048, budget, 8, "q8_0", repack_types=frozenset()) > 2


def test_with_slots_carries_the_estimate_with_slots_into_the_chosen_candidate() -> None:
    """The chosen candidate's estimate and margin become the slots' ones; the others keep theirs."""
    cands = [Candidate(model="m", quant="Q8_0", estimate_bytes=300 * MiB),
             Candidate(model="m", quant="Q4_K_M", estimate_bytes=200 * MiB)]
    decision = choose(cands, 500 * MiB)
    assert decision.chosen is not None and decision.chosen.quant == "Q8_0" and decision.slots == 1
    more = decision.with_slots(3, 450 * MiB, "slots: 3")
    assert more.slots == 3
    assert more.require().estimate_bytes == 450 * MiB
    chosen = next(v for v in more.verdicts if v.verdict is Verdict.CHOSEN)
    assert chosen.margin_bytes == 50 * MiB and chosen.candidate == more.chosen
    other = next(v for v in more.verdicts if v.candidate.quant == "Q4_K_M")
    assert other.margin_bytes == 300 * MiB
    assert "slots: 3" in more.notes
    assert "with 3 slots" in "\n".join(more.explain())


def test_with_slots_on_nothing_fits_only_records_the_count() -> None:
    """No choice: nothing to re-estimate."""
    decision = choose([Candidate(model="m", quant="Q8_0", estimate_bytes=300 * MiB)], 100 * MiB)
    assert decision.with_slots(2, 999).chosen is None


def test_budget_from_conditions_is_the_planners_rule() -> None:
    """Available memory and cgroup headroom, less the 64 MiB reserve and the 5 % (>= 32 MiB) margin."""
    conditions = make_conditions(
        temperature_c=None, flags=frozenset(), battery=None,
        memory=Memory(available_bytes=2048 * MiB, cgroup_headroom_bytes=1024 * MiB),
        soft_limit_c=80.0, hard_limit_c=85.0, cfg=AdaptSettings(),
    )
    budget: Budget = budget_from_conditions(conditions)
    assert budget == make_budget(2048 * MiB, cgroup_headroom_bytes=1024 * MiB)
    assert budget.bytes == 1024 * MiB - 64 * MiB - int(1024 * MiB * 0.05)
    assert budget_from_conditions(conditions, reserve_bytes=0).bytes == budget.bytes + 64 * MiB


def test_the_pi4_example_in_docs_fit_md() -> None:
    """docs/fit.md: a hot 2 GB Pi 4 with 1.1 GiB free runs gemma-3-1b-it UD-Q4_K_XL with 3 slots of 2048 tokens."""
    from tests.unit.test_fit import GEMMA_1B_FILES, MB, _gemma3

    info = _gemma3(26, 1152, 6912, GEMMA_1B_FILES["UD-Q4_K_XL"] * MB)
    budget = make_budget(1126 * MiB).bytes
    assert round(budget / MiB) == 1006
    assert slots_for(info, 2048, budget, 4, repack_types=frozenset()) == 3
