"""A Hub repo named straight ('org/repo[:QUANT]', as llama-server -hf takes it) is planned and pulled like a
catalog entry: its quants are read from the repo listing; against the fake Hub with the real client."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.catalog.catalog import load_catalog
from agent.catalog.hub import HubStore
from agent.catalog.planner import Planner
from agent.config.adapt import AdaptSettings
from agent.hardware.conditions import Memory, make_conditions
from agent.settings import ModelSettings
from tests.support.fake_hub import FakeHub
from tests.support.tiny_gguf import write_tiny_llama

REPO = "acme/tiny-chat-GGUF"
ROOMY = make_conditions(temperature_c=None, flags=frozenset(), battery=None,
                        memory=Memory(available_bytes=4 * 2**30), soft_limit_c=80.0, hard_limit_c=85.0,
                        cfg=AdaptSettings())


@pytest.fixture
def hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    files = {f"tiny-chat-{q}.gguf": write_tiny_llama(tmp_path / f"{q}.gguf", tensor_type=q).read_bytes()
             for q in ("Q8_0", "Q4_0")}
    with FakeHub() as fake, capture_logs():
        fake.add_repo(REPO, {**files, "README.md": b"# tiny"})
        yield HubStore(cache_dir=tmp_path / "cache", endpoint=fake.endpoint, retries=1, retry_wait_s=0.01)


def test_a_hub_repo_is_planned_from_its_listing_and_pulled(hub: HubStore) -> None:
    planner = Planner(load_catalog(), hub, repack_types=frozenset())
    plan = planner.plan(REPO, ROOMY)
    assert set(plan.options) == {"Q8_0", "Q4_0"} and plan.decision.require().quant == "Q8_0"
    pinned = planner.plan(REPO, ROOMY, quant="Q4_0")
    local = planner.ensure_present(pinned)
    assert local.path.name == "tiny-chat-Q4_0.gguf" and local.path.is_file()
    assert plan.entry.defaults is None  # not in the catalog: the agent-wide [generation] defaults apply


def test_a_catalog_name_still_means_the_catalog_entry(hub: HubStore) -> None:
    planner = Planner(load_catalog(), hub, repack_types=frozenset())
    assert planner.entry("smollm2-135m-instruct").defaults is not None


def test_model_name_takes_a_pinned_quant() -> None:
    model = ModelSettings(name=f"{REPO}:q4_0")
    assert (model.name, model.quant) == (REPO, "q4_0")
    with pytest.raises(ValueError, match="give one"):
        ModelSettings(name=f"{REPO}:Q4_0", quant="Q8_0")
