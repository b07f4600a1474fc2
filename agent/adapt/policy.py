"""Live adaptation: from a stream of observations, when to use fewer threads, a smaller quant, or the cloud.

Pure: :func:`decide` maps (previous state, one observation, settings) to (next state, actions) and does
no I/O and reads no clock, so every rule is pinned by table tests. The daemon feeds it one
:class:`Observation` per telemetry tick (built by :func:`observe` from the hardware snapshot) and
carries the actions out (re-thread, hot-swap a capped quant, route requests to the cloud), publishing
each one as an event with the reason and the numbers that triggered it.

The bands themselves (where heat and battery count as clear / band / high / critical) are the one rule in
:mod:`agent.hardware.conditions`, shared with the fit decision and the CLI; this module adds time.

Why it never flaps:

* **Hysteresis bands.** Stepping down starts at ``soft - thermal_margin_c``; stepping up needs the SoC
  below ``soft - thermal_recover_c`` (a wider margin). Between the two nothing moves either way. The
  same holds for battery (``low`` vs ``low + recover``), memory and the critical/offload level.
* **Dwell times.** Two step-downs are at least ``down_dwell_s`` apart (give one its effect before the
  next); each single step up needs every condition clear for a full ``hold_s``, and the hold restarts
  after every step and on any reading outside the clear band.
* **Critical is the exception**: reaching the critical level offloads at once, without dwell.

Order of the ladder: heat and low battery remove threads first (cheapest to undo, cuts power at once),
then cap the quant one rung at a time; memory pressure caps the quant directly (threads free no
memory). Critical heat or a critical battery offloads. Recovery walks back in reverse, one step per hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from agent.adapt.settings import AdaptSettings, ThermalLimits
from agent.hardware.conditions import Band, battery_band, heat_band, read_battery, throttle_now
from agent.hardware.snapshot import DeviceSnapshot
from agent.transport.telemetry import Mode, Number


@dataclass(frozen=True, slots=True)
class Observation:
    """What the policy looks at, at one instant. ``None`` = the device does not report it (never guessed)."""

    ts: float  # seconds on a monotonic clock
    temperature_c: float | None
    soft_limit_c: float
    hard_limit_c: float
    throttle_now: frozenset[str] = frozenset()  # names from conditions.THROTTLE_FLAGS that are set "now"
    battery_percent: float | None = None
    battery_discharging: bool = False
    memory_budget_bytes: int | None = None  # what a model could have now, counting the loaded one's own share
    psi_some_avg10: float | None = None
    model_estimate_bytes: int | None = None  # the loaded model's memory estimate


@dataclass(frozen=True, slots=True)
class Level:
    """What the device runs with now: generation threads, quant rungs below the fit decision, offload."""

    threads: int
    cap_steps: int = 0
    offload: bool = False


@dataclass(frozen=True, slots=True)
class PolicyState:
    """The current level plus the timers that implement dwell and hold."""

    level: Level
    max_threads: int  # the configured/physical thread count: the level "local" runs with
    last_change_ts: float | None = None
    clear_since: float | None = None  # every condition inside its clear band since then
    critical_clear_since: float | None = None  # no critical condition (with hysteresis) since then

    @classmethod
    def initial(cls, threads: int) -> PolicyState:
        """Full speed, no cap, no offload."""
        return cls(level=Level(threads=max(1, threads)), max_threads=max(1, threads))


@dataclass(frozen=True, slots=True)
class SetThreads:
    """Run generation with ``threads`` threads (applies from the next request)."""

    threads: int
    previous: int
    reason: str
    numbers: Mapping[str, Number] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "downgrade" if self.threads < self.previous else "upgrade"


@dataclass(frozen=True, slots=True)
class CapQuant:
    """Re-run the fit decision with ``steps`` extra rungs of cap and hot-swap to its choice."""

    steps: int
    previous: int
    reason: str
    numbers: Mapping[str, Number] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "downgrade" if self.steps > self.previous else "upgrade"


@dataclass(frozen=True, slots=True)
class Offload:
    """Route requests to the cloud (``on``) or serve locally again."""

    on: bool
    reason: str
    numbers: Mapping[str, Number] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "offload_on" if self.on else "offload_off"


Action = SetThreads | CapQuant | Offload

@dataclass(frozen=True, slots=True)
class Assessment:
    """Each condition placed in its band, with the reasons and numbers behind it (for events)."""

    thermal: Band
    battery: Band
    memory: Band
    reasons: tuple[str, ...]
    numbers: Mapping[str, Number]

    @property
    def all_clear(self) -> bool:
        return self.thermal == "clear" and self.battery == "clear" and self.memory == "clear"

    @property
    def critical(self) -> bool:
        return self.thermal == "critical" or self.battery == "critical"


def assess(obs: Observation, cfg: AdaptSettings, *, offloading: bool = False) -> Assessment:
    """Place temperature, battery and memory in clear / band (hysteresis) / high / critical.

    ``offloading`` widens the critical level by its hysteresis: once offloading, a condition counts as
    critical until it is clearly below the level that started it.
    """
    reasons: list[str] = []
    numbers: dict[str, Number] = {}
    thermal = _thermal(obs, cfg, offloading, reasons, numbers)
    battery = _battery(obs, cfg, offloading, reasons, numbers)
    memory = _memory(obs, cfg, reasons, numbers)
    return Assessment(thermal, battery, memory, tuple(reasons), numbers)


def _thermal(
    obs: Observation, cfg: AdaptSettings, offloading: bool, reasons: list[str], numbers: dict[str, Number]
) -> Band:
    t = obs.temperature_c
    flags = sorted(obs.throttle_now)
    if t is not None:
        numbers.update(temperature_c=round(t, 1), soft_limit_c=obs.soft_limit_c, hard_limit_c=obs.hard_limit_c)
    if flags:
        numbers["throttle_now"] = ",".join(flags)
    band, reason = heat_band(t, obs.throttle_now, obs.soft_limit_c, obs.hard_limit_c, cfg, offloading=offloading)
    if reason:
        reasons.append(reason)
    return band


def _battery(
    obs: Observation, cfg: AdaptSettings, offloading: bool, reasons: list[str], numbers: dict[str, Number]
) -> Band:
    p = obs.battery_percent
    if p is None:
        return "clear"
    numbers.update(battery_percent=p, battery_discharging=obs.battery_discharging)
    band, reason = battery_band(p, obs.battery_discharging, cfg, offloading=offloading)
    if reason:
        reasons.append(reason)
    return band


def _memory(obs: Observation, cfg: AdaptSettings, reasons: list[str], numbers: dict[str, Number]) -> Band:
    band: Band = "clear"
    psi = obs.psi_some_avg10
    if psi is not None:
        numbers["psi_some_avg10"] = psi
        if psi >= cfg.psi_some_avg10:
            reasons.append("memory_psi")
            band = "high"
        elif psi >= cfg.psi_some_avg10 / 2:
            band = "band"
    budget, estimate = obs.memory_budget_bytes, obs.model_estimate_bytes
    if budget is not None and estimate:
        numbers.update(memory_budget_bytes=budget, model_estimate_bytes=estimate)
        if budget < estimate * cfg.memory_margin:
            reasons.append("memory_budget")
            band = "high"
        elif budget < estimate * (cfg.memory_margin + 0.05) and band == "clear":
            band = "band"
    return band


def decide(state: PolicyState, obs: Observation, cfg: AdaptSettings) -> tuple[PolicyState, list[Action]]:
    """One policy step: the next state and at most one action (none when nothing should change)."""
    if not cfg.enabled:
        return state, []
    a = assess(obs, cfg, offloading=state.level.offload)
    clear_since = (state.clear_since if state.clear_since is not None else obs.ts) if a.all_clear else None
    crit_clear_since = (
        (state.critical_clear_since if state.critical_clear_since is not None else obs.ts) if not a.critical else None
    )
    state = replace(state, clear_since=clear_since, critical_clear_since=crit_clear_since)
    numbers = dict(a.numbers)
    step = _step_down(state, obs, cfg, a, numbers) or _step_up(state, obs, cfg, numbers)
    if step is None:
        return state, []
    level, action, restart_hold = step
    state = replace(state, level=level, last_change_ts=obs.ts)
    if restart_hold:
        # Each step up needs its own full hold: the next one is judged from here.
        state = replace(
            state,
            clear_since=obs.ts if state.clear_since is not None else None,
            critical_clear_since=obs.ts if state.critical_clear_since is not None else None,
        )
    return state, [action]


_Step = tuple[Level, Action, bool]


def _step_down(
    state: PolicyState, obs: Observation, cfg: AdaptSettings, a: Assessment, numbers: dict[str, Number]
) -> _Step | None:
    level, reason = state.level, ",".join(a.reasons)
    # Critical: offload at once, no dwell; protecting the board beats smoothness.
    if a.critical and not level.offload:
        return replace(level, offload=True), Offload(True, reason, numbers), False
    if state.last_change_ts is not None and obs.ts - state.last_change_ts < cfg.down_dwell_s:
        return None
    capped = replace(level, cap_steps=level.cap_steps + 1)
    cap = CapQuant(capped.cap_steps, level.cap_steps, reason, numbers)
    if a.memory == "high" and level.cap_steps < cfg.max_cap_steps:
        return capped, cap, False
    if a.thermal in ("high", "critical") or a.battery in ("high", "critical"):
        min_threads = min(cfg.min_threads, state.max_threads)
        if level.threads > min_threads:
            fewer = replace(level, threads=max(min_threads, level.threads - cfg.thread_step))
            return fewer, SetThreads(fewer.threads, level.threads, reason, numbers), False
        if level.cap_steps < cfg.max_cap_steps:
            return capped, cap, False
    return None


def _step_up(state: PolicyState, obs: Observation, cfg: AdaptSettings, numbers: dict[str, Number]) -> _Step | None:
    level = state.level
    if level.offload:
        # Leave offload once no condition has been critical (with hysteresis) for a full hold.
        since = state.critical_clear_since
        if since is None or obs.ts - since < cfg.hold_s:
            return None
        numbers["clear_for_s"] = round(obs.ts - since, 1)
        return replace(level, offload=False), Offload(False, "critical_cleared", numbers), True
    since = state.clear_since
    if since is None or obs.ts - since < cfg.hold_s:
        return None
    numbers["clear_for_s"] = round(obs.ts - since, 1)
    # Reverse of the way down: the quant cap first, then threads.
    if level.cap_steps > 0:
        up = replace(level, cap_steps=level.cap_steps - 1)
        return up, CapQuant(up.cap_steps, level.cap_steps, "recovered", numbers), True
    if level.threads < state.max_threads:
        up = replace(level, threads=min(state.max_threads, level.threads + cfg.thread_step))
        return up, SetThreads(up.threads, level.threads, "recovered", numbers), True
    return None


EngineChange = SetThreads | CapQuant


def hold(state: PolicyState, action: EngineChange) -> PolicyState:
    """The state :func:`decide` returned with ``action``, but the level still at what runs now.

    A thread change or a quant swap takes effect later (between requests; a swap may pull and load
    first) and may fail; until :func:`settle` says it is done, the level reports what is served.
    """
    if isinstance(action, SetThreads):
        return replace(state, level=replace(state.level, threads=action.previous))
    return replace(state, level=replace(state.level, cap_steps=action.previous))


def settle(state: PolicyState, action: EngineChange, *, done: bool) -> PolicyState:
    """The state once ``action`` finished: its level when it was done; unchanged when it failed or was
    superseded (the next decision starts again from what is really served)."""
    if not done:
        return state
    if isinstance(action, SetThreads):
        return replace(state, level=replace(state.level, threads=action.threads))
    return replace(state, level=replace(state.level, cap_steps=action.steps))


def mode(state: PolicyState) -> Mode:
    """'offloading' when requests go to the cloud, 'degraded' below full threads/quant, else 'local'."""
    if state.level.offload:
        return "offloading"
    if state.level.cap_steps > 0 or state.level.threads < state.max_threads:
        return "degraded"
    return "local"


def observe(
    snapshot: DeviceSnapshot,
    limits: ThermalLimits,
    *,
    ts: float,
    model_estimate_bytes: int | None,
    model_loaded: bool = True,
) -> Observation:
    """Reduce a hardware snapshot to the policy's inputs.

    The snapshot's budget is what is still free *beside* the loaded model, so the model's own estimate
    is added back: the result is what a model could have now, comparable with the estimate.
    """
    battery = read_battery(snapshot.power)
    budget = snapshot.memory.budget_bytes
    if budget is not None and model_loaded and model_estimate_bytes:
        budget += model_estimate_bytes
    pressure = snapshot.memory.pressure
    return Observation(
        ts=ts,
        temperature_c=snapshot.thermal.max_temp_c,
        soft_limit_c=limits.soft_c,
        hard_limit_c=limits.hard_c,
        throttle_now=throttle_now(snapshot),
        battery_percent=battery.percent if battery is not None else None,
        battery_discharging=battery.discharging if battery is not None else False,
        memory_budget_bytes=budget,
        psi_some_avg10=pressure.some.avg10 if pressure is not None and pressure.some is not None else None,
        model_estimate_bytes=model_estimate_bytes,
    )
