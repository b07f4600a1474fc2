"""Start-up's choice of the first model: ``[model] path`` as is, or the catalog entry ``[model] name``
planned against the device now and pulled (verified), with progress reported as it goes.

Runs on the daemon's main thread before serving. Progress goes to the status service (retained
``starting`` → ``pulling`` with a percentage, and the ``pull_*`` events); the daemon passes two more
callbacks: ``on_block`` (per received block: handle link events, so the status says "connected" before
the progress) and ``extend_timeout`` (systemd's EXTEND_TIMEOUT_USEC, so a first pull may take longer than
TimeoutStartSec).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent.errors import AgentError, ConfigError
from agent.transport.wire import PullProgress

if TYPE_CHECKING:
    from agent.config.generation import GenerationDefaults
    from agent.services.model import ModelOwner
    from agent.settings import ModelSettings

log = structlog.get_logger("agent.model")

STATUS_EVERY_S = 1.0
EXTEND_EVERY_S = 5.0
EXTEND_BY_S = 60.0


class StartReport(Protocol):
    """Where start-up says what it is doing (the daemon passes its :class:`StatusService`)."""

    def set_state(self, state: str, *, note: str, progress: PullProgress | None = None) -> None: ...
    def emit_event(self, kind: str, reason: str, numbers: dict[str, Any]) -> None: ...


def resolve_start_model(
    owner: ModelOwner,
    model: ModelSettings,
    report: StartReport,
    *,
    on_block: Callable[[], None] = lambda: None,
    extend_timeout: Callable[[float], object] | None = None,
) -> tuple[Path, int]:
    """The file and context size to load first; records the choice on ``owner``. Raises what plan or pull raise."""
    if model.path is not None:
        # With 'name' too, the file is that catalog model (a copy made elsewhere): its sampling defaults apply.
        defaults = _catalog_defaults(model) if model.name else None
        owner.chosen(str(model.path), None, None, parallel=owner.slots_for_file(model.path, model.n_ctx),
                     defaults=defaults)
        return model.path, model.n_ctx
    if not model.name:
        raise ConfigError("set [model] path (a local GGUF file) or [model] name (a catalog entry)")
    report.set_state("starting", note=f"planning {model.name}")
    plan = owner.make_plan(model.name, model.quant)
    chosen = plan.decision.require()
    log.info("model_chosen", model=model.name, quant=chosen.quant, file=chosen.file,
             estimate_bytes=chosen.estimate_bytes, budget_bytes=plan.decision.budget_bytes,
             explain=plan.decision.explain())
    owner.last_plan = plan.as_dict()
    spec = f"{model.name}:{chosen.quant}"
    last = {"status": 0.0, "extend": 0.0, "started": time.monotonic(), "pulled": 0.0}

    def progress(done: int, total: int) -> None:
        # Called per received block from the pull: throttled to one status a second.
        now = time.monotonic()
        on_block()
        if not last["pulled"]:
            last["pulled"] = 1.0
            report.emit_event("pull_started", "first_start", {"bytes_total": total})
        if now - last["status"] < STATUS_EVERY_S and done < total:
            return
        last["status"] = now
        percent = round(100.0 * done / total, 1) if total else 0.0
        report.set_state("pulling", note=f"pulling {spec}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB "
                         f"({percent:.0f}%)", progress=PullProgress(bytes_done=done, bytes_total=total,
                                                                    percent=min(percent, 100.0)))
        if extend_timeout is not None and now - last["extend"] >= EXTEND_EVERY_S:
            last["extend"] = now
            extend_timeout(EXTEND_BY_S)

    try:
        local = owner.planner().ensure_present(plan, progress=progress)
    except AgentError as exc:
        report.emit_event("pull_failed", exc.code, {})
        raise
    if last["pulled"]:
        report.emit_event("pull_finished", "first_start", {
            "bytes": local.size, "seconds": round(time.monotonic() - last["started"], 1)})
    owner.chosen(model.name, chosen.quant, chosen.estimate_bytes, parallel=plan.parallel,
                 defaults=plan.entry.defaults)
    return local.path, plan.n_ctx


def _catalog_defaults(model: ModelSettings) -> GenerationDefaults | None:
    """The catalog entry ``[model] name``'s sampling defaults, without the Hub client (a fixed file needs none)."""
    from agent.catalog.catalog import load_catalog  # noqa: PLC0415

    return load_catalog(model.catalog).get(model.name or "").defaults
