"""A base for test engines that generate one request at a time through ``generate``.

The inference service drives engines through slots (``start`` then ``step`` until each sequence
reports); a fake only writes ``generate`` and inherits one slot that runs the whole generation in
the step after it starts, which is what the service saw before batching.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.engine.llama import GenerationResult, Outcome, SamplingParams
from agent.errors import AgentError


class OneSlotEngine:
    slots = 1

    def __init__(self) -> None:
        self._started: tuple[list[int], SamplingParams, Callable[[str], None], Callable[[Outcome], None],
                             Callable[[], bool]] | None = None

    def generate(self, prompt_tokens: list[int], params: SamplingParams, on_text: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> GenerationResult:
        raise NotImplementedError

    @property
    def active(self) -> int:
        return 1 if self._started is not None else 0

    @property
    def free_slots(self) -> int:
        return 1 - self.active

    def start(self, prompt_tokens: list[int], params: SamplingParams, on_text: Callable[[str], None],
              on_done: Callable[[Outcome], None], cancelled: Callable[[], bool] = lambda: False) -> None:
        assert self._started is None, "the service started a second sequence on a one-slot engine"
        self._started = (prompt_tokens, params, on_text, on_done, cancelled)

    def step(self) -> int:
        if self._started is None:
            return 0
        tokens, params, on_text, on_done, cancelled = self._started
        try:
            outcome: Outcome = self.generate(tokens, params, on_text, cancelled)
        except AgentError as exc:
            outcome = exc
        finally:
            self._started = None
        on_done(outcome)
        return 1
