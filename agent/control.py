"""What fleet commands can do to a running daemon (the ``DeviceControl`` of agent.fleet.service).

Model changes are requests to the model owner (:class:`agent.services.model.ModelOwner`), which runs
them one at a time between two generations; this module waits for the outcome and returns it as the
command result. Serving state (drain, restart, live settings) is the daemon's lifecycle, reached
through the small :class:`Lifecycle` interface rather than the daemon itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent.errors import ConfigError, ModelUnavailableError

if TYPE_CHECKING:
    from agent.services.inference import InferenceService
    from agent.services.model import ModelOwner
    from agent.settings import Settings

log = structlog.get_logger("agent.control")

LIVE_SECTIONS = ("inference.", "telemetry.", "adapt.", "log.")


class Lifecycle(Protocol):
    """What fleet commands need from the running daemon besides the model."""

    @property
    def settings(self) -> Settings: ...
    def status_dict(self) -> dict[str, Any]: ...
    def service_or_raise(self) -> InferenceService: ...
    def set_draining(self, draining: bool) -> None: ...
    def request_restart(self) -> None: ...
    def apply_live_settings(self, new: Settings) -> None: ...


class DaemonControl:
    """Implements agent.fleet.service.DeviceControl: model commands ask the owner, the rest the lifecycle."""

    def __init__(self, model: ModelOwner, lifecycle: Lifecycle) -> None:
        self._model = model
        self._daemon = lifecycle

    # -- read-only ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._daemon.status_dict()

    def plan(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("model") or self._daemon.settings.model.name
        if not name:
            raise ConfigError("model: no catalog model configured; give args.model")
        plan = self._model.make_plan(name, args.get("quant"))
        self._model.last_plan = plan.as_dict()
        return self._model.last_plan

    # -- model changes -----------------------------------------------------------------------------

    def set_model(self, name: str, quant: str | None) -> dict[str, Any]:
        if name == "auto":
            name = self._daemon.settings.model.name or ""
            if not name:
                raise ConfigError("model: 'auto' needs [model] name in the config")
        return self.switch_to_catalog(name, quant)

    def switch_to_catalog(self, name: str, quant: str | None) -> dict[str, Any]:
        """Ask the model owner for ``name`` and wait for the outcome (it raises what the swap raised)."""
        return self._model.request_switch(name, quant).result()

    def pull(self, name: str, quant: str | None) -> dict[str, Any]:
        plan = self._model.make_plan(name, quant)
        local = self._model.planner().ensure_present(plan)
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


def run_logged(action: Callable[[], Any], event: str) -> Any:
    """Run an action, logging (not raising) failures: for background adaptation steps."""
    try:
        return action()
    except Exception as exc:  # adaptation must never take the daemon down
        log.warning(event, error=str(exc), error_type=type(exc).__name__)
        return None
