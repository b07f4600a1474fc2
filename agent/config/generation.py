"""Config ``[generation]`` and a catalog model's ``defaults``: what a request gets when it does not say.

Small models answer badly with bare sampling (no min-p, no repeat penalty): SmolLM2-135M asked "What is
the capital of France?" at temperature 0.2 without them loops on "la France, la France, …" in most
seeds. So sampling has defaults in three layers, the way an Ollama Modelfile carries parameters: the
agent-wide ``[generation]`` section, then the served catalog model's ``defaults`` (models.toml), then
the request's own values, which always win. The merge is :func:`effective_defaults`, pure.
"""

from __future__ import annotations

from pydantic import Field

from agent.settings_base import Section


class GenerationDefaults(Section):
    """One layer of defaults; unset fields fall through to the layer below."""

    temperature: float | None = Field(default=None, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: int | None = Field(default=None, ge=0, description="Top-k sampling; 0 = off.")
    min_p: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Drop tokens below this fraction of the best one's probability; 0 = off.",
    )
    repeat_penalty: float | None = Field(
        default=None, gt=0.0, le=10.0, description="Penalty on the last 64 tokens; 1 = off."
    )
    system: str | None = Field(
        default=None, description="System prompt put first in a chat request that brings none of its own."
    )
    stop: list[str] | None = Field(default=None, description="Stop sequences for requests that give none.")


class GenerationSettings(GenerationDefaults):
    """Config ``[generation]``: the agent-wide layer (applies live). Its sampling values are always set."""

    temperature: float = Field(0.7, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(40, ge=0, description="Top-k sampling; 0 = off.")
    min_p: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Drop tokens below this fraction of the best one's probability; 0 = off.",
    )
    repeat_penalty: float = Field(1.1, gt=0.0, le=10.0, description="Penalty on the last 64 tokens; 1 = off.")


def effective_defaults(agent: GenerationSettings, model: GenerationDefaults | None) -> GenerationSettings:
    """The agent-wide layer with the model's set fields on top (the request's own values go on top of this)."""
    if model is None:
        return agent
    return agent.model_copy(update=model.model_dump(exclude_none=True))
