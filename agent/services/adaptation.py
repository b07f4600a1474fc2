"""The live-adaptation state: one policy, the engine change in flight, and the mode they add up to.

:func:`agent.adapt.policy.decide` is pure; this is the one object that holds its state and carries its
actions out. A thread change or a quant swap is asked of the model owner and only counts once the
owner reports it done (:func:`agent.adapt.policy.hold` / :func:`~agent.adapt.policy.settle`), so a
failed swap leaves the device reporting what it really serves. Runs on the daemon's main thread; the
owner's outcome is handed back to it through ``post``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog

from agent.adapt.policy import (
    Action,
    CapQuant,
    EngineChange,
    Observation,
    Offload,
    PolicyState,
    SetThreads,
    decide,
    hold,
    mode,
    settle,
)
from agent.transport.telemetry import Mode

if TYPE_CHECKING:
    from agent.adapt.settings import AdaptSettings
    from agent.services.model import ModelOwner

log = structlog.get_logger("agent.adaptation")


class Adaptation:
    """Decides once per tick, applies through the model owner, and advances only on a reported success."""

    def __init__(
        self,
        threads: int,
        model: ModelOwner,
        *,
        catalog_name: Callable[[], str | None],
        report: Callable[[Action, bool], None],
        post: Callable[[Callable[[], None]], None],
    ) -> None:
        """``catalog_name``: the model a quant cap re-plans (None for a fixed file); ``report(action,
        mode_changed)``: tell the world an action took effect; ``post``: run a callable on the owner thread."""
        self.state = PolicyState.initial(threads)
        self._model = model
        self._catalog_name = catalog_name
        self._report = report
        self._post = post
        self.changing: EngineChange | None = None

    @property
    def mode(self) -> Mode:
        return mode(self.state)

    @property
    def offload(self) -> bool:
        return self.state.level.offload

    def step(self, obs: Observation, cfg: AdaptSettings) -> None:
        """One policy decision for this observation, carried out."""
        before = self.mode
        state, actions = decide(self.state, obs, cfg)
        action = actions[0] if actions else None
        if isinstance(action, SetThreads | CapQuant):
            if self.changing is not None:
                # The change in flight settles first; the next tick decides again from what is served.
                return
            future = self._start(action)
            self.state = hold(state, action)
            if future is not None:
                self.changing = action
                future.add_done_callback(partial(self._hand_back, action))
            return
        self.state = state
        if isinstance(action, Offload):
            # Offload routing reads the policy state at each request; nothing else to do here.
            self._report(action, self.mode != before)

    def _start(self, action: EngineChange) -> Future[Any] | None:
        if isinstance(action, SetThreads):
            return self._model.set_threads(action.threads)
        name = self._catalog_name()
        if name is None:
            log.info("quant_cap_ignored", reason="serving a fixed model.path", steps=action.steps)
            return None
        return self._model.request_switch(name, None, extra_cap_steps=action.steps)

    def _hand_back(self, action: EngineChange, future: Future[Any]) -> None:
        # On the model owner's thread: only hand the outcome over, the state is the owner thread's.
        self._post(partial(self._settled, action, future))

    def _settled(self, action: EngineChange, future: Future[Any]) -> None:
        """Owner thread: the model owner finished ``action`` (or failed, or superseded it)."""
        self.changing = None
        error = future.exception()
        before = self.mode
        self.state = settle(self.state, action, done=error is None)
        if error is None:
            self._report(action, self.mode != before)
            return
        event = "quant_swap_failed" if isinstance(action, CapQuant) else "threads_change_failed"
        log.warning(event, error=str(error), error_type=type(error).__name__, kind=action.kind)
