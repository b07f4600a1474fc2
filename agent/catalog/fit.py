"""Choose the quantization to run: the best quality whose memory estimate fits the budget.

Pure decision logic over small frozen inputs (the daemon and ``edge-agent plan`` map the hardware probe
and the catalog onto them), so every rule is table-tested over the boards in device-profiles.toml.

Rules, in order (docs/fit.md has the rationale):

1. **Budget** = min(MemAvailable, cgroup memory.max - memory.current) - reserve - safety margin
   (- the agent's own process overhead when the available figure was taken without the agent running).
2. **Fit**: a candidate fits when its ``estimate_bytes`` <= budget.
3. **Quality floor** (default Q3_K_S): below it, a smaller model later in the preference list is better
   than a crushed big one. Models are tried in preference order; the first with a fitting candidate at
   or above the floor wins. Only when no model has one does a below-floor candidate get chosen (unless
   the floor is hard), and the decision says so.
4. **Thermal / battery cap**: the device's heat and battery bands (:mod:`agent.hardware.conditions`,
   the same rule the live policy uses) step down among the winning model's fitting candidates, never
   below the floor: heat ``high`` 1 rung, ``critical`` 2, a low battery while discharging 1. A smaller
   quant moves fewer bytes per token, so it runs cooler and faster.
5. Nothing fits: ``chosen`` is None and :meth:`FitDecision.require` raises :class:`NothingFitsError`
   naming the budget and the smallest candidate's need.
6. **Slots** (continuous batching): quality first. The quant is chosen as above with one slot (or with
   the configured ``parallel`` slots, which it must then hold); then the chosen quant gets the most slots,
   up to the cap, whose estimate still fits (:func:`most_slots`, :func:`slots_for`), never fewer than 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from agent.catalog.estimate import DEFAULT_CALIBRATION, Calibration, estimate_memory
from agent.catalog.gguf_header import GgufInfo
from agent.catalog.quants import at_least, quality_rank
from agent.errors import AgentError
from agent.hardware.conditions import Band, Conditions

MiB: Final[int] = 1024 * 1024


def fmt_bytes(n: int) -> str:
    """Human-readable size, e.g. ``'812.4 MiB'`` / ``'1.52 GiB'`` (negative allowed)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 1024 * MiB:
        return f"{sign}{n / (1024 * MiB):.2f} GiB"
    return f"{sign}{n / MiB:.1f} MiB"


class NothingFitsError(AgentError, MemoryError):
    """No candidate fits the memory budget; the message names the numbers."""

    code = "model_unavailable"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Candidate(_Frozen):
    """One quant of one model with its memory estimate (see agent.catalog.estimate)."""

    model: str
    quant: str
    estimate_bytes: int = Field(ge=0, description="What loading and running it adds to the process.")
    file: str | None = None


class Budget(_Frozen):
    """How many bytes a model may take, and where the figure comes from."""

    available_bytes: int = Field(ge=0, description="MemAvailable (or an operator override).")
    cgroup_headroom_bytes: int | None = Field(
        default=None, ge=0, description="memory.max - memory.current of the agent's cgroup, when limited."
    )
    reserve_bytes: int = Field(default=0, ge=0, description="Left for the rest of the system (config).")
    safety_margin_bytes: int = Field(default=0, ge=0, description="Covers estimate error and allocator slack.")
    process_overhead_bytes: int = Field(
        default=0, ge=0, description="The agent's own RSS, subtracted when 'available' was measured without it."
    )

    @property
    def bytes(self) -> int:
        """The budget: never negative."""
        limit = self.available_bytes
        if self.cgroup_headroom_bytes is not None:
            limit = min(limit, self.cgroup_headroom_bytes)
        return max(0, limit - self.reserve_bytes - self.safety_margin_bytes - self.process_overhead_bytes)

    def explain(self) -> str:
        """One line: how the budget was computed."""
        parts = [f"available {fmt_bytes(self.available_bytes)}"]
        if self.cgroup_headroom_bytes is not None:
            parts.append(f"cgroup headroom {fmt_bytes(self.cgroup_headroom_bytes)} (the smaller counts)")
        for label, value in (
            ("reserve", self.reserve_bytes),
            ("safety margin", self.safety_margin_bytes),
            ("agent process", self.process_overhead_bytes),
        ):
            if value:
                parts.append(f"- {label} {fmt_bytes(value)}")
        return f"budget {fmt_bytes(self.bytes)} = " + ", ".join(parts)


def make_budget(
    available_bytes: int,
    *,
    cgroup_limit_bytes: int | None = None,
    cgroup_usage_bytes: int | None = None,
    cgroup_headroom_bytes: int | None = None,
    reserve_bytes: int = 64 * MiB,
    safety_fraction: float = 0.05,
    min_safety_bytes: int = 32 * MiB,
    process_overhead_bytes: int = 0,
) -> Budget:
    """Budget from probe figures: the safety margin is ``safety_fraction`` of what is usable (>= a floor).

    ``cgroup_limit_bytes`` None means unlimited (``memory.max`` = "max"). ``cgroup_headroom_bytes`` gives
    the headroom directly (a probe's, over the own cgroup and its ancestors); the smaller of the two counts.
    """
    headroom = None if cgroup_headroom_bytes is None else max(0, cgroup_headroom_bytes)
    if cgroup_limit_bytes is not None:
        own = max(0, cgroup_limit_bytes - (cgroup_usage_bytes or 0))
        headroom = own if headroom is None else min(headroom, own)
    usable = available_bytes if headroom is None else min(available_bytes, headroom)
    margin = max(min_safety_bytes, int(usable * safety_fraction))
    return Budget(
        available_bytes=available_bytes,
        cgroup_headroom_bytes=headroom,
        reserve_bytes=reserve_bytes,
        safety_margin_bytes=margin,
        process_overhead_bytes=process_overhead_bytes,
    )


class FitPolicy(_Frozen):
    """Knobs of the decision. The heat and battery thresholds are ``[adapt]``'s (agent.hardware.conditions)."""

    quality_floor: str = Field(default="Q3_K_S", description="Lowest quant worth running when a smaller model exists.")
    floor_is_hard: bool = Field(default=False, description="Refuse below-floor quants even when nothing else fits.")
    max_cap_steps: int = Field(default=2, ge=0, description="The heat + battery step-down never exceeds this.")


HEAT_STEPS: Final[dict[Band, int]] = {"clear": 0, "band": 0, "high": 1, "critical": 2}
BATTERY_STEPS: Final[dict[Band, int]] = {"clear": 0, "band": 0, "high": 1, "critical": 1}


def condition_steps(conditions: Conditions | None) -> tuple[int, list[str]]:
    """Rungs to step down for heat and battery, and why: heat ``high`` 1, ``critical`` 2; battery low 1.

    The bands come from the one rule in :mod:`agent.hardware.conditions`, the same the live policy uses.
    """
    if conditions is None:
        return 0, []
    steps, why = 0, []
    heat, battery = conditions.heat, conditions.battery
    if HEAT_STEPS[heat.band]:
        steps += HEAT_STEPS[heat.band]
        why.append(heat.explain())
    if BATTERY_STEPS[battery.band]:
        steps += BATTERY_STEPS[battery.band]
        why.append(battery.explain())
    return steps, why


class Verdict(StrEnum):
    """What happened to a candidate."""

    CHOSEN = "chosen"
    FITS = "fits"  # fits, but a better one was chosen
    THERMAL_CAP = "capped"  # fits, but the thermal/battery cap stepped below it
    TOO_LARGE = "too_large"
    BELOW_FLOOR = "below_floor"
    NOT_PREFERRED = "not_preferred"  # fits, but an earlier model in the preference list won
    UNKNOWN_QUANT = "unknown_quant"


class CandidateVerdict(_Frozen):
    """A candidate, whether it fits, and why it was or was not taken."""

    candidate: Candidate
    fits: bool
    margin_bytes: int = Field(description="budget - estimate (negative: short by that much).")
    verdict: Verdict
    reason: str


class FitDecision(_Frozen):
    """The choice, the budget, and the reasoning for every candidate."""

    chosen: Candidate | None
    budget: Budget
    verdicts: tuple[CandidateVerdict, ...]
    cap_steps: int = 0
    notes: tuple[str, ...] = ()
    slots: int = Field(default=1, ge=1, description="Sequences the chosen quant serves together (in its estimate).")

    @property
    def budget_bytes(self) -> int:
        """The budget in bytes."""
        return self.budget.bytes

    def explain(self) -> list[str]:
        """Readable lines: budget, notes, then each candidate with its verdict."""
        lines = [self.budget.explain(), *self.notes]
        if self.chosen is None:
            lines.append(self.nothing_fits_message())
        else:
            slots = f" with {self.slots} slot{'s' if self.slots != 1 else ''}"
            lines.append(
                f"chosen: {self.chosen.model} {self.chosen.quant} ({fmt_bytes(self.chosen.estimate_bytes)}{slots})"
            )
        for v in self.verdicts:
            c = v.candidate
            lines.append(
                f"  {c.model:<24} {c.quant:<11} {fmt_bytes(c.estimate_bytes):>11}  "
                f"margin {fmt_bytes(v.margin_bytes):>11}  {v.verdict.value}: {v.reason}"
            )
        return lines

    def nothing_fits_message(self) -> str:
        """Names the budget and the smallest candidate's need."""
        if not self.verdicts:
            return f"nothing fits: no candidates (budget {fmt_bytes(self.budget.bytes)})"
        smallest = min(self.verdicts, key=lambda v: v.candidate.estimate_bytes)
        c = smallest.candidate
        return (
            f"nothing fits in the budget of {fmt_bytes(self.budget.bytes)}: the smallest candidate, "
            f"{c.model} {c.quant}, needs {fmt_bytes(c.estimate_bytes)} "
            f"(short by {fmt_bytes(-smallest.margin_bytes)}); free memory, lower n_ctx or add a smaller model"
        )

    def require(self) -> Candidate:
        """The chosen candidate, or :class:`NothingFitsError` with the numbers."""
        if self.chosen is None:
            raise NothingFitsError(self.nothing_fits_message())
        return self.chosen

    def with_slots(self, slots: int, estimate_bytes: int, note: str | None = None) -> FitDecision:
        """The same decision serving ``slots`` sequences: the chosen candidate carries ``estimate_bytes``
        (its estimate with that many slots) and its verdict the new margin."""
        if self.chosen is None:
            return self.model_copy(update={"slots": slots})
        old = self.chosen
        new = old.model_copy(update={"estimate_bytes": estimate_bytes})
        limit = self.budget.bytes
        verdicts = tuple(
            v.model_copy(update={"candidate": new, "margin_bytes": limit - estimate_bytes,
                                 "fits": estimate_bytes <= limit, "reason": f"{v.reason}; {slots} slot(s)"})
            if v.candidate == old and v.verdict is Verdict.CHOSEN else v
            for v in self.verdicts
        )
        notes = (*self.notes, note) if note else self.notes
        return self.model_copy(update={"chosen": new, "verdicts": verdicts, "slots": slots, "notes": notes})


def _model_order(candidates: Sequence[Candidate], prefer: Iterable[str] | None) -> list[str]:
    seen: list[str] = []
    for name in list(prefer or []) + [c.model for c in candidates]:
        if name not in seen:
            seen.append(name)
    return seen


def _rank(c: Candidate) -> int:
    r = quality_rank(c.quant)
    return 10_000 if r is None else r


def _pick(
    by_model: dict[str, list[Candidate]], order: list[str], limit: int, steps: int, policy: FitPolicy
) -> tuple[Candidate | None, set[int], bool]:
    """(chosen, ids of candidates skipped by the cap, whether the pick is below the floor)."""
    for model in order:
        ok = [
            c
            for c in by_model.get(model, [])
            if quality_rank(c.quant) is not None
            and c.estimate_bytes <= limit
            and at_least(c.quant, policy.quality_floor)
        ]
        if ok:
            index = min(steps, len(ok) - 1)
            return ok[index], {id(c) for c in ok[:index]}, False
    if policy.floor_is_hard:
        return None, set(), False
    for model in order:
        ok = [c for c in by_model.get(model, []) if quality_rank(c.quant) is not None and c.estimate_bytes <= limit]
        if ok:
            return ok[0], set(), True
    return None, set(), False


def _judge(  # noqa: PLR0911 -- one return per verdict reads best
    c: Candidate, *, chosen: Candidate | None, limit: int, steps: int, capped: set[int], below: bool, floor: str
) -> tuple[Verdict, str]:
    if quality_rank(c.quant) is None:
        return Verdict.UNKNOWN_QUANT, f"{c.quant!r} is not on the quant ladder"
    if c is chosen:
        if below:
            return Verdict.CHOSEN, "below the quality floor, but nothing else fits"
        return Verdict.CHOSEN, "best quality that fits" + (f" after a {steps}-step cap" if steps else "")
    if c.estimate_bytes > limit:
        return Verdict.TOO_LARGE, f"needs {fmt_bytes(c.estimate_bytes - limit)} more than the budget"
    if not at_least(c.quant, floor):
        return Verdict.BELOW_FLOOR, f"below the quality floor {floor}"
    if id(c) in capped:
        return Verdict.THERMAL_CAP, "fits, but the thermal/battery cap steps below it"
    if chosen is not None and c.model != chosen.model:
        return Verdict.NOT_PREFERRED, f"fits, but {chosen.model} comes first in preference"
    return Verdict.FITS, "fits; a better quant was chosen"


def choose(
    candidates: Sequence[Candidate],
    budget: Budget | int,
    *,
    conditions: Conditions | None = None,
    prefer: Sequence[str] | None = None,
    policy: FitPolicy | None = None,
    extra_cap_steps: int = 0,
) -> FitDecision:
    """Pick the best-quality candidate that fits ``budget`` (rules in the module docstring).

    ``prefer`` orders models (earlier = preferred); models not named follow in candidate order, and
    candidates of models outside a given ``prefer`` list are still considered after it. An int budget
    is taken as the final budget in bytes.
    """
    policy = policy or FitPolicy()
    if isinstance(budget, int):
        budget = Budget(available_bytes=max(0, budget))
    limit = budget.bytes
    c_steps, why = condition_steps(conditions)
    # extra_cap_steps: the live adaptation policy's cap. It already answers the same heat and battery
    # (one rule, agent.hardware.conditions), so the larger of the two counts, never their sum.
    extra = max(0, extra_cap_steps)
    steps = min(policy.max_cap_steps, max(c_steps, extra))
    notes = []
    if steps:
        if extra > c_steps:
            why.append(f"{extra} step(s) requested by live adaptation")
        notes.append(f"quality capped {steps} step(s) down: " + "; ".join(why))

    by_model: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=_rank):
        by_model.setdefault(c.model, []).append(c)
    order = _model_order(candidates, prefer)
    chosen, capped, below = _pick(by_model, order, limit, steps, policy)
    if chosen is not None and below:
        notes.append(
            f"no candidate at or above the quality floor {policy.quality_floor} fits; "
            f"running {chosen.model} {chosen.quant} below it"
        )
    verdicts = []
    for model in order:
        for c in by_model.get(model, []):
            verdict, reason = _judge(
                c, chosen=chosen, limit=limit, steps=steps, capped=capped, below=below, floor=policy.quality_floor
            )
            verdicts.append(
                CandidateVerdict(
                    candidate=c,
                    fits=c.estimate_bytes <= limit,
                    margin_bytes=limit - c.estimate_bytes,
                    verdict=verdict,
                    reason=reason,
                )
            )
    return FitDecision(chosen=chosen, budget=budget, verdicts=tuple(verdicts), cap_steps=steps, notes=tuple(notes))


def most_slots(cost: Callable[[int], int], budget_bytes: int, cap: int) -> int:
    """The most slots ``n`` in 1..``cap`` with ``cost(n) <= budget_bytes``; 1 when not even one fits.

    ``cost`` is the estimate with ``n`` slots and grows with ``n`` (more KV cells, a larger attention
    span), so the search stops at the first ``n`` that does not fit. Never fewer than 1: whether one
    slot fits is the quant decision's question, answered before this.
    """
    best = 1
    for n in range(2, max(1, cap) + 1):
        if cost(n) > budget_bytes:
            break
        best = n
    return best


def slots_for(
    info: GgufInfo,
    n_ctx: int,
    budget_bytes: int,
    cap: int,
    kv_type: str = "f16",
    *,
    n_batch: int = 512,
    use_mmap: bool | None = None,
    repack_types: frozenset[str] | None = None,
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> int:
    """Slots for one model file: the most, up to ``cap``, whose estimate (n_ctx tokens each) fits.

    For a fixed ``[model] path`` (no catalog): ``budget_bytes`` is :func:`budget_from_conditions`'s, the
    other arguments are the engine's. At least 1 (the file is loaded anyway).
    """

    def cost(n: int) -> int:
        return estimate_memory(
            info, n_ctx, n_seq=n, n_batch=n_batch, kv_type=kv_type, use_mmap=use_mmap,
            repack_types=repack_types, calibration=calibration,
        ).estimate_bytes

    return most_slots(cost, budget_bytes, cap)


def budget_from_conditions(conditions: Conditions, *, reserve_bytes: int | None = None) -> Budget:
    """The budget the planner uses: this device's available memory and cgroup headroom, less the reserve
    (default 64 MiB) and the safety margin."""
    memory = conditions.memory
    extra: dict[str, int] = {} if reserve_bytes is None else {"reserve_bytes": reserve_bytes}
    return make_budget(memory.available_bytes, cgroup_headroom_bytes=memory.cgroup_headroom_bytes, **extra)
