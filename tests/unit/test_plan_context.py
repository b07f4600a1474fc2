"""`edge-agent plan` and the daemon plan with the same context size and batch (planner.configured_n_ctx)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

import agent.catalog.planner as planner_module
from agent.catalog.planner import configured_n_ctx
from agent.cli import models as cli_models
from agent.settings import ModelSettings, Settings


class RecordingPlanner:
    """Records the keyword arguments of plan() and stops there."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def plan(self, name: str, conditions: Any, **kwargs: Any) -> Any:
        self.calls.append({"name": name, **kwargs})
        raise SystemExit(0)


@pytest.mark.parametrize(
    ("model", "n_ctx"),
    [
        (ModelSettings(name="tiny"), None),  # not set: the catalog entry's n_ctx (else 2048) decides
        (ModelSettings(name="tiny", n_ctx=4096), 4096),
        (ModelSettings.model_validate({"name": "tiny", "n_ctx": 2048}), 2048),  # set to the default: still set
    ],
)
def test_configured_n_ctx(model: ModelSettings, n_ctx: int | None) -> None:
    """[model] n_ctx counts only when the config sets it."""
    assert configured_n_ctx(model) == n_ctx


@pytest.mark.parametrize(
    ("model", "cli_n_ctx", "expected"),
    [
        (ModelSettings(name="tiny"), None, None),
        (ModelSettings(name="tiny", n_ctx=4096), None, 4096),
        (ModelSettings(name="other", n_ctx=4096), None, 4096),  # --model other: the daemon would use 4096 too
        (ModelSettings(name="tiny", n_ctx=4096), 1024, 1024),  # --n-ctx wins
    ],
)
def test_cli_plan_uses_the_daemons_n_ctx_and_n_batch(
    monkeypatch: pytest.MonkeyPatch, model: ModelSettings, cli_n_ctx: int | None, expected: int | None
) -> None:
    """`plan` passes what ModelOwner.make_plan passes: configured n_ctx (or --n-ctx) and [model] n_batch."""
    model = model.model_copy(update={"n_batch": 256})
    settings = Settings(model=model)
    planner = RecordingPlanner()
    monkeypatch.setattr(cli_models, "_settings", lambda args: settings)
    monkeypatch.setattr(cli_models, "_conditions", lambda settings, args: None)
    monkeypatch.setattr(planner_module, "planner_from_settings", lambda settings, environ: planner)
    args = argparse.Namespace(model="tiny", n_ctx=cli_n_ctx, quant=None, json=True)
    with pytest.raises(SystemExit):
        cli_models._plan(args)
    assert planner.calls == [{"name": "tiny", "n_ctx": expected, "n_batch": 256, "quant": None}]
