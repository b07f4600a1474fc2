"""The planner trades quant and slots against the budget, and `edge-agent plan` shows slots, KV and mmap."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

import agent.catalog.planner as planner_module
from agent.catalog.catalog import Catalog, CatalogEntry
from agent.catalog.estimate import estimate_memory
from agent.catalog.gguf_header import read_local
from agent.catalog.planner import Planner
from agent.cli import models as cli_models
from agent.config.adapt import AdaptSettings
from agent.hardware.conditions import Conditions, Memory, make_conditions
from agent.settings import InferenceSettings, ModelSettings, Settings
from tests.support.tiny_gguf import write_tiny_llama

MiB = 1024 * 1024
N_CTX = 2048
# KV-heavy so slots matter: 4 layers, 4 KV heads of 64 (f16: 8 KiB per token); weights 1-4 MiB.
SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_head_kv": 4, "n_ff": 512, "vocab_size": 512}
QUANTS = ("F16", "Q8_0", "Q4_0")


class LocalHub:
    """Every file is already in the cache (the planner reads headers locally, nothing over the network)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def local(self, repo: str, filename: str, revision: str = "main", *, verify: bool = True) -> Path | None:
        return self.files[filename]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("plan")
    return {f"tiny-{q}.gguf": write_tiny_llama(directory / f"tiny-{q}.gguf", tensor_type=q, **SHAPE) for q in QUANTS}


def _planner(files: dict[str, Path], **kwargs: Any) -> Planner:
    catalog = Catalog(models={"tiny": CatalogEntry(repo="test/tiny", n_ctx=N_CTX,
                                                   files={q: f"tiny-{q}.gguf" for q in QUANTS})})
    return Planner(catalog, LocalHub(files), repack_types=frozenset(), **kwargs)  # type: ignore[arg-type]


def _conditions(budget: int) -> Conditions:
    """Conditions whose planner budget is exactly ``budget`` (below 544 MiB available the margin is 32 MiB)."""
    available = budget + 64 * MiB + 32 * MiB
    assert available * 0.05 < 32 * MiB
    return make_conditions(
        temperature_c=None, flags=frozenset(), battery=None, memory=Memory(available_bytes=available),
        soft_limit_c=80.0, hard_limit_c=85.0, cfg=AdaptSettings(),
    )


def _cost(files: dict[str, Path], quant: str, slots: int, kv_type: str = "f16") -> int:
    info = read_local(files[f"tiny-{quant}.gguf"])
    return estimate_memory(info, N_CTX, n_seq=slots, kv_type=kv_type, repack_types=frozenset()).estimate_bytes


def test_quality_first_then_the_most_slots_that_fit(files: dict[str, Path]) -> None:
    """F16 fits with one slot but not two: F16 with 1 slot, although Q4_0 would fit more slots."""
    budget = _cost(files, "F16", 1) + MiB
    assert _cost(files, "F16", 2) > budget
    plan = _planner(files, max_parallel=4).plan("tiny", _conditions(budget))
    assert (plan.decision.require().quant, plan.parallel) == ("F16", 1)
    assert any("2 would need" in note for note in plan.decision.notes)


@pytest.mark.parametrize("cap", [1, 2, 3, 4])
@pytest.mark.parametrize("fit", [1, 2, 3, 4, 5])
def test_slots_are_the_most_up_to_the_cap(files: dict[str, Path], cap: int, fit: int) -> None:
    """A budget that holds ``fit`` F16 slots: min(fit, cap) slots, and the chosen estimate is theirs."""
    budget = _cost(files, "F16", fit)
    plan = _planner(files, max_parallel=cap).plan("tiny", _conditions(budget))
    slots = min(fit, cap)
    assert plan.decision.require().quant == "F16"
    assert plan.parallel == slots
    assert plan.chosen.estimate.n_seq == slots
    assert plan.decision.require().estimate_bytes == _cost(files, "F16", slots) <= budget


def test_configured_parallel_must_fit_with_the_quant(files: dict[str, Path]) -> None:
    """inference.parallel = 3: the best quant that holds 3 slots, even if a better one fits with fewer."""
    budget = _cost(files, "Q8_0", 3)
    assert _cost(files, "F16", 3) > budget >= _cost(files, "F16", 1)
    plan = _planner(files, parallel=3, max_parallel=8).plan("tiny", _conditions(budget))
    assert (plan.decision.require().quant, plan.parallel) == ("Q8_0", 3)
    for verdict in plan.decision.verdicts:
        assert verdict.candidate.estimate_bytes == _cost(files, verdict.candidate.quant, 3)


def test_a_q8_0_cache_is_estimated_when_configured(files: dict[str, Path]) -> None:
    """[model] kv_type q8_0: candidates and slots use the q8_0 estimate; more slots fit the same budget."""
    budget = _cost(files, "F16", 2)
    f16 = _planner(files, max_parallel=8).plan("tiny", _conditions(budget))
    q8 = _planner(files, max_parallel=8, kv_type="q8_0").plan("tiny", _conditions(budget))
    assert q8.kv_type == "q8_0" and q8.chosen.estimate.flash_attn
    assert q8.parallel > f16.parallel == 2


def test_the_note_names_the_q8_0_lever_when_it_would_fit_more_slots(files: dict[str, Path]) -> None:
    """With f16 and fewer slots than the cap, the note says how many a q8_0 cache would hold; not with q8_0."""
    budget = _cost(files, "F16", 2)
    f16 = _planner(files, max_parallel=8).plan("tiny", _conditions(budget))
    q8_slots = max(n for n in range(1, 9) if _cost(files, "F16", n, "q8_0") <= budget)
    assert any(f'kv_type = "q8_0": {q8_slots} slots' in note for note in f16.decision.notes)
    q8 = _planner(files, max_parallel=8, kv_type="q8_0").plan("tiny", _conditions(budget))
    assert not any("kv_type" in note for note in q8.decision.notes)


def test_plan_as_dict_shows_slots_kv_and_mmap(files: dict[str, Path]) -> None:
    """The JSON of `plan --json` carries parallel, kv_type, use_mmap and the KV per slot."""
    plan = _planner(files, max_parallel=2).plan("tiny", _conditions(_cost(files, "F16", 4)))
    data = plan.as_dict()
    assert data["parallel"] == 2
    assert data["kv_type"] == "f16"
    assert data["use_mmap"] is True
    assert data["kv_per_slot_bytes"] == plan.chosen.estimate.kv_per_slot_bytes == 4 * N_CTX * 4 * 128 * 2
    assert data["estimate_bytes"] == _cost(files, "F16", 2)
    json.dumps(data)


def test_planner_from_settings_passes_the_configured_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """[model] kv_type/use_mmap and [inference] parallel/max_parallel reach the planner."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(planner_module, "Planner", lambda catalog, hub, **kw: seen.update(kw))
    monkeypatch.setattr(planner_module, "load_catalog", lambda path: None)
    monkeypatch.setattr(planner_module, "hub_from_settings", lambda settings, environ: None)
    settings = Settings(model=ModelSettings(kv_type="q8_0", use_mmap=False),
                        inference=InferenceSettings(parallel=3, max_parallel=6))
    planner_module.planner_from_settings(settings, {})
    assert {k: seen[k] for k in ("kv_type", "use_mmap", "parallel", "max_parallel")} == {
        "kv_type": "q8_0", "use_mmap": False, "parallel": 3, "max_parallel": 6}
    assert isinstance(seen["repack_types"], frozenset)


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_plan_prints_slots_and_kv_per_slot(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files: dict[str, Path], as_json: bool
) -> None:
    """`edge-agent plan` names the slots, the KV type, mmap and the KV per slot (human and --json)."""
    planner = _planner(files, max_parallel=4)
    budget = _cost(files, "F16", 3)
    monkeypatch.setattr(cli_models, "_settings", lambda args: Settings(model=ModelSettings(name="tiny")))
    monkeypatch.setattr(cli_models, "_conditions", lambda settings, args: _conditions(budget))
    monkeypatch.setattr(planner_module, "planner_from_settings", lambda settings, environ: planner)
    args = argparse.Namespace(model="tiny", n_ctx=None, quant=None, json=as_json)
    assert cli_models._plan(args) == 0
    out = capsys.readouterr().out
    if as_json:
        data = json.loads(out[out.index("{\n"):])  # after any log line structlog printed
        assert (data["parallel"], data["kv_type"], data["use_mmap"]) == (3, "f16", True)
    else:
        assert "n_ctx 2048 per slot, 3 slots, KV f16, mmap on" in out
        assert "with 3 slots" in out
        assert "3 slots x 2048 tokens" in out and "MiB per slot" in out
