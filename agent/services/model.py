"""The one owner of the loaded model: which engine serves, with which plan and estimate, and how it changes.

Every model change (a fleet ``set-model``/``reload``, an adaptation quant cap) is a request to
:meth:`ModelOwner.request_switch`, which returns a future with the outcome. One swap worker runs the
requests one at a time (plan → pull → load → switch), so two new models are never loaded beside the
old one; a request still waiting when a newer one arrives is superseded (its future fails
``cancelled``), because only the newest wish matters. Whether the new model is loaded beside the old
one is decided after the pull, from a fresh probe, not from the estimate the plan started with.

The engine itself is only touched on the inference worker (:meth:`InferenceService.between_requests`),
so a switch or a thread change happens between two generations and queued requests simply wait.
This is the only module that builds a :class:`LlamaEngine`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent.engine.llama import LlamaEngine, LoadedModel
from agent.errors import AgentError, CancelledError, ConfigError

if TYPE_CHECKING:
    from agent.catalog.planner import Plan, Planner
    from agent.config.generation import GenerationDefaults
    from agent.hardware.conditions import Conditions
    from agent.services.inference import InferenceService
    from agent.settings import InferenceSettings, ModelSettings

log = structlog.get_logger("agent.model")

SWAP_TIMEOUT_S = 600.0


class Engine(Protocol):
    """What the owner and the inference worker need from an engine (a :class:`LlamaEngine`, or a test fake)."""

    info: LoadedModel | None

    def load(self) -> LoadedModel: ...
    def set_threads(self, threads: int) -> None: ...
    def close(self) -> None: ...


class EngineFactory(Protocol):
    def __call__(
        self, path: Path, *, n_ctx: int, threads: int, n_batch: int, chat_template: str | None, seed: int,
        parallel: int, use_mmap: bool | None, kv_type: str, prefill_chunk: int,
    ) -> Engine: ...


Emit = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ServingModel:
    """What is being served, replaced as a whole so readers on other threads see one consistent picture."""

    key: str | None = None  # the catalog name, or the fixed file's path
    quant: str | None = None
    estimate_bytes: int | None = None
    info: LoadedModel | None = None  # None until loaded
    parallel: int = 1  # slots the fit decision (or [inference] parallel) gave it
    defaults: GenerationDefaults | None = None  # the catalog entry's sampling defaults


@dataclass(slots=True)
class _Request:
    name: str
    quant: str | None
    extra_cap_steps: int
    future: Future[dict[str, Any]]


class ModelOwner:
    """Holds the engine and its plan; serializes every change to it and reports each outcome."""

    def __init__(
        self,
        settings: ModelSettings,
        *,
        inference: Callable[[], InferenceSettings] | None = None,
        planner: Callable[[], Planner],
        conditions: Callable[[], Conditions],
        emit: Emit,
        on_switched: Callable[[], None] = lambda: None,
        engine_factory: EngineFactory = LlamaEngine,
    ) -> None:
        self._settings = settings
        self._inference = inference
        self._make_planner = planner
        self._planner: Planner | None = None
        self._conditions = conditions
        self._emit = emit
        self._on_switched = on_switched
        self._new_engine = engine_factory
        self._engine: Engine | None = None
        self._service: InferenceService | None = None
        self._threads = settings.threads
        self.serving = ServingModel()
        self.last_plan: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self._pending: _Request | None = None
        self._closed = False
        self._worker: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ConfigError("no model is loaded yet")
        return self._engine

    @property
    def info(self) -> LoadedModel | None:
        return self.serving.info

    def planner(self) -> Planner:
        """The catalog planner, made on first use (a device serving a fixed file never loads the Hub client)."""
        if self._planner is None:
            self._planner = self._make_planner()
        return self._planner

    def make_plan(
        self, name: str, quant: str | None, *, extra_cap_steps: int = 0, freeing: int | None = None
    ) -> Plan:
        """The fit decision for ``name`` now; ``freeing`` counts the loaded model's memory as available."""
        from agent.catalog.planner import configured_n_ctx  # noqa: PLC0415 - the planner module is loaded by now

        # Heat and battery are in the conditions and the live policy's cap answers the same ones; the fit
        # decision counts the larger of the two, not their sum (agent.catalog.fit.choose).
        conditions = self._conditions().freeing(freeing)
        cfg = self._settings
        return self.planner().plan(
            name,
            conditions,
            n_ctx=configured_n_ctx(cfg),
            n_batch=cfg.n_batch,
            quant=quant,
            extra_cap_steps=extra_cap_steps,
        )

    # -- start-up (main thread, before serving) -----------------------------------------------------

    def chosen(self, key: str, quant: str | None, estimate_bytes: int | None, *, parallel: int | None = None,
               defaults: GenerationDefaults | None = None) -> None:
        """Record what start-up decided to serve, before it is loaded (the status shows it while loading).

        ``parallel``: the slots the fit decision gave it; unset = ``[inference] parallel`` or 1.
        ``defaults``: the catalog entry's sampling defaults."""
        self.serving = ServingModel(key=key, quant=quant, estimate_bytes=estimate_bytes,
                                    parallel=self.slots(parallel), defaults=defaults)

    def slots_for_file(self, path: Path, n_ctx: int) -> int | None:
        """The fit decision's slots for a fixed file (no plan): the most that fit the memory budget now, at
        most ``[inference] max_parallel``; None when ``[inference] parallel`` decides or the header is unreadable
        (then llama.cpp says what is wrong with the file)."""
        settings = self._inference() if self._inference is not None else None
        if settings is None or settings.parallel is not None:
            return None
        from agent.catalog.fit import budget_from_conditions, slots_for  # noqa: PLC0415 - the catalog's arithmetic
        from agent.catalog.gguf_header import read_local  # noqa: PLC0415

        try:
            info = read_local(path)
        except (AgentError, OSError):
            return None
        budget = budget_from_conditions(self._conditions()).bytes
        slots = slots_for(info, n_ctx, budget, settings.max_parallel, self._settings.kv_type,
                          n_batch=self._settings.n_batch, use_mmap=self._settings.use_mmap)
        log.info("slots_chosen", path=str(path), n_ctx=n_ctx, slots=slots, budget_bytes=budget,
                 max_parallel=settings.max_parallel)
        return slots

    def slots(self, planned: int | None) -> int:
        """Slots for the next load: ``[inference] parallel`` when set, else what the plan chose, else 1."""
        settings = self._inference() if self._inference is not None else None
        if settings is not None and settings.parallel is not None:
            return settings.parallel
        return max(1, planned or 1)

    def load_first(self, path: Path, n_ctx: int) -> LoadedModel:
        """Build and load the first engine; raises what the engine raises."""
        engine = self._build(path, n_ctx, self.serving.parallel)
        info = engine.load()
        self._engine, self._threads = engine, info.threads
        self.serving = replace(self.serving, info=info)
        return info

    def attach(self, service: InferenceService) -> None:
        """The inference service that runs the engine: every later change goes through its worker."""
        self._service = service

    def close(self) -> None:
        """Refuse new changes, cancel a waiting one, close the engine (after the service stopped)."""
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, None
            self._cond.notify_all()
        if pending is not None:
            pending.future.set_exception(CancelledError("the device is shutting down"))
        if self._engine is not None:
            self._engine.close()

    # -- changes -----------------------------------------------------------------------------------

    def set_threads(self, threads: int) -> Future[Any]:
        """Change generation threads between requests; the future fails when the engine refused."""

        def change() -> None:
            self.engine.set_threads(threads)
            self._threads = threads  # models loaded later start with it too
            info = self.engine.info
            if info is not None:
                self.serving = replace(self.serving, info=info)

        return self._service_or_raise().between_requests(change, drain=False)

    def request_switch(self, name: str, quant: str | None, *, extra_cap_steps: int = 0) -> Future[dict[str, Any]]:
        """Queue a switch to catalog model ``name``: plan (the loaded model's memory counted as free), pull, swap.

        The future resolves with the command result (``changed`` False when the plan picks what already
        serves) or fails with the reason; a request superseded while it waited fails ``cancelled``.
        """
        future: Future[dict[str, Any]] = Future()
        with self._cond:
            if self._closed:
                future.set_exception(CancelledError("the device is shutting down"))
                return future
            superseded, self._pending = self._pending, _Request(name, quant, extra_cap_steps, future)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="model-swap", daemon=True)
                self._worker.start()
            self._cond.notify()
        if superseded is not None:
            log.info("model_change_superseded", model=superseded.name, quant=superseded.quant,
                     by_model=name, by_quant=quant)
            superseded.future.set_exception(
                CancelledError(f"superseded by a newer model change ({name}{':' + quant if quant else ''})")
            )
        return future

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                request, self._pending = self._pending, None
            if request is None:
                return
            if not request.future.set_running_or_notify_cancel():
                continue
            try:
                request.future.set_result(self._switch(request.name, request.quant, request.extra_cap_steps))
            except BaseException as exc:  # handed to whoever asked
                request.future.set_exception(exc)

    def _switch(self, name: str, quant: str | None, extra_cap_steps: int) -> dict[str, Any]:
        """Swap worker only: one change at a time, so nothing here races another swap."""
        current = self.serving
        plan = self.make_plan(name, quant, extra_cap_steps=extra_cap_steps, freeing=current.estimate_bytes)
        chosen = plan.decision.require()
        self.last_plan = plan.as_dict()
        if (name, chosen.quant) == (current.key, current.quant) and current.info is not None:
            return {"model": name, "quant": chosen.quant, "changed": False}
        self._emit("pull_started", "set_model", {"estimate_bytes": chosen.estimate_bytes})
        try:
            local = self.planner().ensure_present(plan)
        except Exception as exc:
            self._emit("pull_failed", type(exc).__name__, {})
            raise
        self._emit("pull_finished", "set_model", {"bytes": local.size})
        if self._closed:
            raise CancelledError("the device is shutting down")  # do not load a model nobody will serve
        # Side by side only when the new model fits beside the old one now: a pull can take minutes,
        # so the budget comes from a fresh probe, which already counts the loaded model as used.
        beside = self._budget_now()
        side_by_side = chosen.estimate_bytes <= beside
        log.info("swap_budget", model=name, quant=chosen.quant, estimate_bytes=chosen.estimate_bytes,
                 budget_beside_bytes=beside, side_by_side=side_by_side)
        slots = self.slots(plan.parallel)
        target = ServingModel(name, chosen.quant, chosen.estimate_bytes, parallel=slots, defaults=plan.entry.defaults)
        result = self._swap(local.path, plan.n_ctx, target, side_by_side=side_by_side)
        return {"model": name, "quant": chosen.quant, "file": chosen.file, "changed": True, **result}

    def _budget_now(self) -> int:
        from agent.catalog.fit import make_budget  # noqa: PLC0415 - keeps the catalog out of fixed-file devices

        now = self._conditions().memory
        return make_budget(now.available_bytes, cgroup_headroom_bytes=now.cgroup_headroom_bytes).bytes

    def _swap(self, path: Path, n_ctx: int, target: ServingModel, *, side_by_side: bool) -> dict[str, Any]:
        service = self._service_or_raise()
        new = self._build(path, n_ctx, target.parallel)
        mode = "side_by_side" if side_by_side else "drain_swap"
        self._emit("swap_started", mode, {})
        started = time.monotonic()
        pause: dict[str, float] = {}

        def switch_in_place() -> None:
            t0 = time.monotonic()
            old = self.engine
            old.close()
            try:
                new.load()
            except Exception:
                old.load()  # back to what worked; the caller gets the error
                raise
            self._switch_to(service, new, target)
            pause["ms"] = (time.monotonic() - t0) * 1000

        def switch_loaded() -> None:
            # Timed on the worker: the pause is the switch itself, not the wait for the running generation.
            t0 = time.monotonic()
            old = self.engine
            self._switch_to(service, new, target)
            old.close()
            pause["ms"] = (time.monotonic() - t0) * 1000

        try:
            if side_by_side:
                try:
                    new.load()
                    _on_worker(service, switch_loaded)
                except BaseException:
                    if self._engine is not new:
                        new.close()  # never leave a second model behind
                    raise
            else:
                _on_worker(service, switch_in_place)
        except Exception as exc:
            self._emit("swap_failed", type(exc).__name__, {})
            raise
        self._on_switched()
        numbers = {
            "pause_ms": round(pause.get("ms", 0.0), 2),
            "total_ms": round((time.monotonic() - started) * 1000, 1),
        }
        self._emit("swap_finished", mode, numbers)
        log.info("model_swapped", model=target.key, quant=target.quant, side_by_side=side_by_side, **numbers)
        return {"side_by_side": side_by_side, **numbers}

    def _switch_to(self, service: InferenceService, new: Engine, target: ServingModel) -> None:
        """Inference worker only: the new engine serves from the next request on."""
        if new.info is not None and new.info.threads != self._threads:
            new.set_threads(self._threads)  # a thread change made while it loaded
        self._engine = new
        service.replace_engine(new, new.info.name if new.info else (target.key or ""))  # type: ignore[arg-type]
        self.serving = replace(target, info=new.info)

    def _build(self, path: Path, n_ctx: int, parallel: int) -> Engine:
        cfg = self._settings
        threads = self.serving.info.threads if self.serving.info else self._threads
        inference = self._inference() if self._inference is not None else None
        return self._new_engine(path, n_ctx=n_ctx, threads=threads, n_batch=cfg.n_batch,
                                chat_template=cfg.chat_template, seed=cfg.seed, parallel=parallel,
                                use_mmap=cfg.use_mmap, kv_type=cfg.kv_type,
                                prefill_chunk=inference.prefill_chunk if inference is not None else 128)

    def _service_or_raise(self) -> InferenceService:
        if self._service is None:
            raise ConfigError("the daemon is not serving yet")
        return self._service


def _on_worker(service: InferenceService, action: Callable[[], None]) -> None:
    """Run ``action`` between two generations and wait; one that has not started by the timeout never runs."""
    future = service.between_requests(action)
    try:
        future.result(SWAP_TIMEOUT_S)
    except TimeoutError:
        future.cancel()
        raise


def planner_for(settings_source: Callable[[], Any]) -> Callable[[], Planner]:
    """A planner factory over the daemon's settings and the process environment (read when first used)."""

    def make() -> Planner:
        from agent.catalog.planner import planner_from_settings  # noqa: PLC0415 - needs the Hub client

        return planner_from_settings(settings_source(), os.environ)

    return make
