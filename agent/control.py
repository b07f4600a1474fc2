"""What fleet commands can do to a running daemon (the ``DeviceControl`` of agent.fleet.commands).

Model changes go through the inference worker (:meth:`InferenceService.between_requests`), so a
swap happens between two generations and queued requests simply wait: when the new model fits next
to the old one it is loaded first and switched in a moment; otherwise the old one is closed first
(drain, swap, resume).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.engine.llama import LlamaEngine
from agent.errors import ConfigError, ModelUnavailableError

if TYPE_CHECKING:
    from agent.catalog.planner import DeviceConditions, Plan, Planner
    from agent.daemon import Daemon
    from agent.settings import Settings

log = structlog.get_logger("agent.control")

SWAP_TIMEOUT_S = 600.0
LIVE_SECTIONS = ("inference.", "telemetry.", "adapt.", "log.")


class DaemonControl:
    """Implements agent.fleet.commands.DeviceControl on top of the daemon's parts."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._planner: Planner | None = None
        self.last_plan: dict[str, Any] | None = None

    # -- read-only ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._daemon.status_dict()

    def plan(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("model") or self._daemon.settings.model.name
        if not name:
            raise ConfigError("model: no catalog model configured; give args.model")
        plan = self.make_plan(name, args.get("quant"))
        self.last_plan = plan.as_dict()
        return self.last_plan

    # -- model changes -----------------------------------------------------------------------------

    def set_model(self, name: str, quant: str | None) -> dict[str, Any]:
        if name == "auto":
            name = self._daemon.settings.model.name or ""
            if not name:
                raise ConfigError("model: 'auto' needs [model] name in the config")
        return self.switch_to_catalog(name, quant)

    def switch_to_catalog(self, name: str, quant: str | None, *, extra_cap_steps: int = 0) -> dict[str, Any]:
        """Plan (with the current model's memory counted as free), pull, then swap between requests."""
        daemon = self._daemon
        current = daemon.service_or_raise().engine
        plan = self.make_plan(name, quant, extra_cap_steps=extra_cap_steps, freeing=daemon.model_estimate_bytes)
        chosen = plan.decision.require()
        self.last_plan = plan.as_dict()
        if (name, chosen.quant) == (daemon.model_key, daemon.quant) and current.info is not None:
            return {"model": name, "quant": chosen.quant, "changed": False}
        daemon.emit_event("pull_started", "set_model", {"estimate_bytes": chosen.estimate_bytes})
        try:
            local = self.planner().ensure_present(plan)
        except Exception as exc:
            daemon.emit_event("pull_failed", type(exc).__name__, {})
            raise
        daemon.emit_event("pull_finished", "set_model", {"bytes": local.size})
        # Side by side only when the new model fits without freeing the old one.
        side_by_side = chosen.estimate_bytes <= plan.decision.budget_bytes - (daemon.model_estimate_bytes or 0)
        result = self.swap(local.path, plan.n_ctx, name, chosen.quant, chosen.estimate_bytes, side_by_side=side_by_side)
        return {"model": name, "quant": chosen.quant, "file": chosen.file, "changed": True, **result}

    def swap(
        self, path: Path, n_ctx: int, key: str, quant: str | None, estimate: int | None, *, side_by_side: bool
    ) -> dict[str, Any]:
        daemon = self._daemon
        service = daemon.service_or_raise()
        cfg = daemon.settings.model
        new = LlamaEngine(path, n_ctx=n_ctx, threads=service.engine.info.threads if service.engine.info else 0,
                          n_batch=cfg.n_batch, chat_template=cfg.chat_template, seed=cfg.seed)
        daemon.emit_event("swap_started", "side_by_side" if side_by_side else "drain_swap", {})
        started = time.monotonic()
        pause: dict[str, float] = {}

        def switch_in_place() -> None:
            t0 = time.monotonic()
            old = service.engine
            old.close()
            try:
                new.load()
            except Exception:
                old.load()  # back to what worked; the caller gets the error
                raise
            service.replace_engine(new, new.info.name if new.info else key)
            pause["ms"] = (time.monotonic() - t0) * 1000

        def switch_loaded() -> None:
            # Timed on the worker: the pause is the switch itself, not the wait for the running generation.
            t0 = time.monotonic()
            old = service.engine
            service.replace_engine(new, new.info.name if new.info else key)
            old.close()
            pause["ms"] = (time.monotonic() - t0) * 1000

        try:
            if side_by_side:
                new.load()
                service.between_requests(switch_loaded).result(SWAP_TIMEOUT_S)
            else:
                service.between_requests(switch_in_place).result(SWAP_TIMEOUT_S)
        except Exception as exc:
            daemon.emit_event("swap_failed", type(exc).__name__, {})
            raise
        daemon.model_switched(key, quant, estimate)
        numbers = {
            "pause_ms": round(pause.get("ms", 0.0), 2),
            "total_ms": round((time.monotonic() - started) * 1000, 1),
        }
        daemon.emit_event("swap_finished", "side_by_side" if side_by_side else "drain_swap", numbers)
        log.info("model_swapped", model=key, quant=quant, side_by_side=side_by_side, **numbers)
        return {"side_by_side": side_by_side, **numbers}

    def pull(self, name: str, quant: str | None) -> dict[str, Any]:
        plan = self.make_plan(name, quant)
        local = self.planner().ensure_present(plan)
        return {"model": name, "quant": plan.decision.require().quant, **local.model_dump(mode="json")}

    def reload(self) -> dict[str, Any]:
        """Re-run the fit decision for the configured model and swap if the answer changed."""
        cfg = self._daemon.settings.model
        if cfg.path is not None:
            return {"changed": False, "reason": "serving a fixed model.path"}
        if not cfg.name:
            raise ModelUnavailableError("no catalog model configured")
        return self.switch_to_catalog(cfg.name, cfg.quant)

    # -- serving state -----------------------------------------------------------------------------

    def drain(self) -> dict[str, Any]:
        self._daemon.set_draining(True)
        return {"draining": True, "queue_depth": self._daemon.service_or_raise().queue_depth}

    def resume(self) -> dict[str, Any]:
        self._daemon.set_draining(False)
        return {"draining": False}

    def restart(self) -> dict[str, Any]:
        self._daemon.request_restart()
        return {"restarting": True}

    def apply_settings(self, new: Settings, changed_keys: list[str]) -> dict[str, Any]:
        live = [k for k in changed_keys if k.startswith(LIVE_SECTIONS)]
        later = [k for k in changed_keys if k not in live]
        self._daemon.apply_live_settings(new)
        return {"applied": live, "restart_required": later}

    # -- helpers -----------------------------------------------------------------------------------

    def planner(self) -> Planner:
        """The catalog planner, made on first use (a device serving a fixed file never loads the Hub client)."""
        if self._planner is None:
            from agent.catalog.planner import planner_from_settings  # noqa: PLC0415

            self._planner = planner_from_settings(self._daemon.settings, os.environ)
        return self._planner

    def make_plan(
        self, name: str, quant: str | None, *, extra_cap_steps: int = 0, freeing: int | None = None
    ) -> Plan:
        """The fit decision for ``name`` now; ``freeing`` counts the loaded model's memory as available."""
        from dataclasses import replace  # noqa: PLC0415

        conditions: DeviceConditions = self._daemon.conditions()
        if freeing:
            conditions = replace(conditions, available_bytes=conditions.available_bytes + freeing)
        if extra_cap_steps:
            # The live policy's cap already accounts for heat and battery: do not count them twice.
            conditions = replace(conditions, thermal=None, battery=None)
        cfg = self._daemon.settings.model
        return self.planner().plan(
            name,
            conditions,
            n_ctx=cfg.n_ctx if "n_ctx" in cfg.model_fields_set else None,
            n_batch=cfg.n_batch,
            quant=quant,
            extra_cap_steps=extra_cap_steps,
        )


def run_logged(action: Callable[[], Any], event: str) -> Any:
    """Run an action, logging (not raising) failures: for background adaptation steps."""
    try:
        return action()
    except Exception as exc:  # adaptation must never take the daemon down
        log.warning(event, error=str(exc), error_type=type(exc).__name__)
        return None
