"""The live adaptation policy: bands, the step ladder, dwell and hold, and no flapping under noise."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from agent.adapt.policy import (
    Action,
    CapQuant,
    Level,
    Observation,
    Offload,
    PolicyState,
    SetThreads,
    assess,
    decide,
    hold,
    mode,
    settle,
)
from agent.adapt.settings import AdaptSettings

CFG = AdaptSettings()  # margin 5, recover 10, critical margin 2, battery 20/8 (+5), dwell 15 s, hold 60 s
GiB = 1024**3


def obs(ts: float = 0.0, t: float | None = 50.0, **kw: object) -> Observation:
    """A Raspberry Pi 4 reading (soft 80 °C, hard 85 °C) at ``ts`` seconds."""
    return Observation(ts=ts, temperature_c=t, soft_limit_c=80.0, hard_limit_c=85.0, **kw)  # type: ignore[arg-type]


def run(state: PolicyState, readings: list[Observation], cfg: AdaptSettings = CFG) -> tuple[PolicyState, list[Action]]:
    state, timed = run_timed(state, readings, cfg)
    return state, [a for _, a in timed]


def run_timed(
    state: PolicyState, readings: list[Observation], cfg: AdaptSettings = CFG
) -> tuple[PolicyState, list[tuple[float, Action]]]:
    timed: list[tuple[float, Action]] = []
    for o in readings:
        state, acts = decide(state, o, cfg)
        timed += [(o.ts, a) for a in acts]
    return state, timed


def assert_spaced(timed: list[tuple[float, Action]], cfg: AdaptSettings = CFG) -> None:
    """Every step down is at least down_dwell_s after the previous change, every step up at least hold_s."""
    for (t0, _), (t1, a) in itertools.pairwise(timed):
        up = a.kind in ("upgrade", "offload_off")
        assert t1 - t0 >= (cfg.hold_s if up else cfg.down_dwell_s), (t0, t1, a)


# --- bands ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temp", "flags", "offloading", "band", "reason"),
    [
        (None, frozenset(), False, "clear", None),
        (60.0, frozenset(), False, "clear", None),
        (69.9, frozenset(), False, "clear", None),
        (70.0, frozenset(), False, "band", None),
        (74.9, frozenset(), False, "band", None),
        (75.0, frozenset(), False, "high", "soc_near_soft_limit"),
        (82.9, frozenset(), False, "high", "soc_near_soft_limit"),
        (83.0, frozenset(), False, "critical", "soc_critical"),
        (79.0, frozenset(), True, "critical", "soc_critical"),
        (77.9, frozenset(), True, "high", "soc_near_soft_limit"),
        (50.0, frozenset({"throttled"}), False, "high", "firmware_throttling"),
        (50.0, frozenset({"under_voltage"}), False, "high", "firmware_throttling"),
        (None, frozenset({"soft_temp_limit"}), False, "high", "firmware_throttling"),
    ],
)
def test_thermal_bands(temp, flags, offloading, band, reason) -> None:
    """Temperature against soft-margin, soft-recover and hard-critical margin, or any throttle bit, gives the band."""
    a = assess(obs(t=temp, throttle_now=flags), CFG, offloading=offloading)
    assert a.thermal == band
    assert (reason in a.reasons) if reason else not a.reasons


@pytest.mark.parametrize(
    ("percent", "discharging", "offloading", "band"),
    [
        (None, True, False, "clear"),
        (15.0, False, False, "clear"),
        (3.0, False, False, "clear"),
        (25.0, True, False, "clear"),
        (22.0, True, False, "band"),
        (20.0, True, False, "high"),
        (9.0, True, False, "high"),
        (8.0, True, False, "critical"),
        (12.0, True, True, "critical"),
        (13.0, True, True, "high"),
    ],
)
def test_battery_bands(percent, discharging, offloading, band) -> None:
    """A battery only matters while discharging; low/critical thresholds have a recover margin above them."""
    a = assess(obs(battery_percent=percent, battery_discharging=discharging), CFG, offloading=offloading)
    assert a.battery == band


@pytest.mark.parametrize(
    ("psi", "budget", "estimate", "band", "reason"),
    [
        (None, None, None, "clear", None),
        (0.0, 2 * GiB, GiB, "clear", None),
        (5.0, 2 * GiB, GiB, "band", None),
        (10.0, 2 * GiB, GiB, "high", "memory_psi"),
        (0.0, int(1.05 * GiB), GiB, "high", "memory_budget"),
        (0.0, int(1.12 * GiB), GiB, "band", None),
        (0.0, int(1.2 * GiB), GiB, "clear", None),
    ],
)
def test_memory_bands(psi, budget, estimate, band, reason) -> None:
    """PSI 'some avg10' above its threshold or a budget under estimate x margin is memory pressure."""
    a = assess(obs(psi_some_avg10=psi, memory_budget_bytes=budget, model_estimate_bytes=estimate), CFG)
    assert a.memory == band
    assert (reason in a.reasons) if reason else not a.reasons


# --- the ladder -------------------------------------------------------------------------------------


def test_heat_removes_threads_first_then_caps_quant_one_dwell_apart() -> None:
    """Staying hot walks 4 → 3 → 2 → 1 threads, then cap 1 → 2, each step at least down_dwell_s after the last."""
    state = PolicyState.initial(4)
    state, actions = run(state, [obs(ts=float(s), t=78.0) for s in range(0, 200)])
    assert [(type(a).__name__, getattr(a, "threads", getattr(a, "steps", None))) for a in actions] == [
        ("SetThreads", 3),
        ("SetThreads", 2),
        ("SetThreads", 1),
        ("CapQuant", 1),
        ("CapQuant", 2),
    ]
    assert state.level == Level(threads=1, cap_steps=2, offload=False)
    assert all(a.reason == "soc_near_soft_limit" for a in actions)
    assert actions[0].numbers["temperature_c"] == 78.0
    assert actions[0].kind == "downgrade"


def test_step_downs_respect_the_dwell_time() -> None:
    """A second step-down waits down_dwell_s after the first, however hot it stays."""
    state, first = decide(PolicyState.initial(4), obs(ts=0.0, t=78.0), CFG)
    assert first == [SetThreads(3, 4, "soc_near_soft_limit", first[0].numbers)]
    state, none = decide(state, obs(ts=14.9, t=79.0), CFG)
    assert none == []
    _, second = decide(state, obs(ts=15.0, t=79.0), CFG)
    assert isinstance(second[0], SetThreads)
    assert second[0].threads == 2


def test_critical_offloads_at_once_even_within_the_dwell() -> None:
    """At hard - critical_margin the policy offloads immediately, without waiting for the dwell."""
    state, _ = decide(PolicyState.initial(4), obs(ts=0.0, t=78.0), CFG)
    state, actions = decide(state, obs(ts=1.0, t=83.5), CFG)
    assert len(actions) == 1
    assert isinstance(actions[0], Offload)
    assert actions[0].on
    assert actions[0].kind == "offload_on"
    assert actions[0].numbers["temperature_c"] == 83.5
    assert mode(state) == "offloading"


def test_offload_ends_only_after_a_full_hold_below_the_critical_band() -> None:
    """Offload stays on while within the critical hysteresis band and ends one hold after leaving it."""
    state = replace(PolicyState.initial(4), level=Level(threads=4, offload=True), last_change_ts=0.0)
    state, acts = run(state, [obs(ts=float(s), t=79.0) for s in range(1, 100)])
    assert not any(isinstance(a, Offload) for a in acts)  # 79 °C is still critical while offloading
    state, acts = run(state, [obs(ts=100.0 + s, t=77.0) for s in range(61)])
    offs = [a for a in acts if isinstance(a, Offload)]
    assert len(offs) == 1
    assert not offs[0].on
    assert offs[0].reason == "critical_cleared"
    assert offs[0].numbers["clear_for_s"] == 60.0


def test_recovery_steps_back_up_one_rung_per_hold_in_reverse_order() -> None:
    """Clear readings restore the quant cap first, then threads, one step per full hold_s."""
    state = replace(PolicyState.initial(4), level=Level(threads=2, cap_steps=1), last_change_ts=0.0)
    state, actions = run(state, [obs(ts=float(s), t=60.0) for s in range(1, 400)])
    assert [(type(a).__name__, a.kind) for a in actions] == [
        ("CapQuant", "upgrade"),
        ("SetThreads", "upgrade"),
        ("SetThreads", "upgrade"),
    ]
    assert state.level == Level(threads=4)
    assert mode(state) == "local"
    assert [a.numbers["clear_for_s"] for a in actions] == [60.0, 60.0, 60.0]
    assert all(a.reason == "recovered" for a in actions)


def test_readings_in_the_hysteresis_band_never_step_up() -> None:
    """Between soft - recover and soft - margin nothing changes in either direction, for any length of time."""
    state = replace(PolicyState.initial(4), level=Level(threads=2), last_change_ts=0.0)
    state, actions = run(state, [obs(ts=float(s), t=72.0) for s in range(1, 1000)])
    assert actions == []
    assert state.level.threads == 2


def test_one_hot_reading_restarts_the_hold() -> None:
    """A single reading outside the clear band during the hold postpones the step up by a full hold."""
    state = replace(PolicyState.initial(4), level=Level(threads=3), last_change_ts=0.0)
    readings = [obs(ts=float(s), t=60.0) for s in range(1, 50)] + [obs(ts=50.0, t=71.0)]
    readings += [obs(ts=float(s), t=60.0) for s in range(51, 110)]
    state, actions = run(state, readings)
    assert actions == []
    _, actions = decide(state, obs(ts=111.0, t=60.0), CFG)
    assert [a.kind for a in actions] == ["upgrade"]


def test_memory_pressure_caps_quant_without_touching_threads() -> None:
    """PSI above the threshold caps the quant directly; threads do not free memory."""
    state, actions = decide(PolicyState.initial(4), obs(psi_some_avg10=25.0), CFG)
    assert actions == [CapQuant(1, 0, "memory_psi", actions[0].numbers)]
    assert state.level == Level(threads=4, cap_steps=1)
    assert actions[0].numbers["psi_some_avg10"] == 25.0


def test_memory_budget_near_the_estimate_caps_quant() -> None:
    """A budget below estimate x memory_margin caps one rung before the OOM killer would act."""
    _, actions = decide(
        PolicyState.initial(4), obs(memory_budget_bytes=int(1.02 * GiB), model_estimate_bytes=GiB), CFG
    )
    assert isinstance(actions[0], CapQuant)
    assert actions[0].reason == "memory_budget"
    assert actions[0].numbers["model_estimate_bytes"] == GiB


def test_cap_never_exceeds_max_cap_steps() -> None:
    """At the cap limit and the thread floor, more heat changes nothing (short of critical)."""
    state = replace(PolicyState.initial(4), level=Level(threads=1, cap_steps=2))
    _, actions = run(state, [obs(ts=float(s), t=80.0, psi_some_avg10=50.0) for s in range(100)])
    assert actions == []


# --- battery ----------------------------------------------------------------------------------------


def test_low_battery_while_discharging_steps_down_and_charging_recovers() -> None:
    """15 % discharging removes a thread; plugging in (charging) restores it after a hold."""
    state, actions = decide(PolicyState.initial(2), obs(ts=0.0, battery_percent=15.0, battery_discharging=True), CFG)
    assert actions == [SetThreads(1, 2, "battery_low", actions[0].numbers)]
    assert actions[0].numbers["battery_percent"] == 15.0
    state, actions = run(
        state, [obs(ts=float(s), battery_percent=15.0, battery_discharging=False) for s in range(1, 62)]
    )
    assert [(type(a).__name__, a.kind) for a in actions] == [("SetThreads", "upgrade")]


def test_critical_battery_offloads_and_charging_ends_offload() -> None:
    """At 8 % discharging requests go to the cloud; charging again brings them back after a hold."""
    state, actions = decide(PolicyState.initial(4), obs(ts=0.0, battery_percent=6.0, battery_discharging=True), CFG)
    assert actions == [Offload(True, "battery_critical", actions[0].numbers)]
    state, actions = run(
        state, [obs(ts=float(s), battery_percent=6.0, battery_discharging=False) for s in range(1, 62)]
    )
    assert [a.kind for a in actions] == ["offload_off"]
    assert mode(state) == "local"


# --- flapping ---------------------------------------------------------------------------------------


def _directions(actions: list[Action]) -> list[str]:
    return ["down" if a.kind in ("downgrade", "offload_on") else "up" for a in actions]


def _reversals(actions: list[Action]) -> int:
    d = _directions(actions)
    return sum(1 for x, y in itertools.pairwise(d) if x != y)


@pytest.mark.parametrize("seed", range(5))
def test_noise_around_the_step_down_threshold_never_steps_up(seed: int) -> None:
    """An hour of readings jittering ±4 °C around soft - margin only ever steps down, never back up."""
    rng = random.Random(seed)
    readings = [obs(ts=float(s), t=75.0 + rng.uniform(-4, 4)) for s in range(3600)]
    _, actions = run(PolicyState.initial(4), readings)
    assert actions
    assert set(_directions(actions)) == {"down"}


@pytest.mark.parametrize("seed", range(5))
def test_noisy_heat_then_cooling_reverses_direction_once(seed: int) -> None:
    """A noisy rise then a noisy fall reverses direction exactly once, with no step closer than the dwell."""
    rng = random.Random(seed)
    readings = []
    for s in range(7200):
        trend = 60 + 20 * min(s, 1800) / 1800 if s < 3600 else 80 - 25 * min(s - 3600, 1800) / 1800
        noise = rng.gauss(0, 1.5) + (rng.choice([0, 0, 0, 0, 0, 0, 0, 0, 0, 6]) if s % 7 == 0 else 0)
        readings.append(obs(ts=float(s), t=trend + noise))
    state, timed = run_timed(PolicyState.initial(4), readings)
    assert _reversals([a for _, a in timed]) == 1
    assert_spaced(timed)
    assert state.level == Level(threads=4)


@pytest.mark.parametrize("seed", range(5))
def test_flickering_throttle_bit_does_not_flap(seed: int) -> None:
    """A throttle bit flickering on 1 reading in 5 at a cool temperature only steps down, never oscillates."""
    rng = random.Random(seed)
    readings = [
        obs(ts=float(s), t=55.0, throttle_now=frozenset({"arm_freq_capped"}) if rng.random() < 0.2 else frozenset())
        for s in range(3600)
    ]
    _, timed = run_timed(PolicyState.initial(4), readings)
    assert _reversals([a for _, a in timed]) == 0
    assert_spaced(timed)


@pytest.mark.parametrize("seed", range(5))
def test_any_noise_keeps_changes_spaced_by_dwell_and_hold(seed: int) -> None:
    """Whatever the readings do, a step down follows a change by >= down_dwell_s and a step up by >= hold_s."""
    rng = random.Random(seed)
    readings = [
        obs(
            ts=float(s),
            t=rng.uniform(55, 84),
            battery_percent=rng.uniform(5, 40),
            battery_discharging=rng.random() < 0.5,
            psi_some_avg10=rng.uniform(0, 15),
        )
        for s in range(3600)
    ]
    _, timed = run_timed(PolicyState.initial(4), readings)
    # Offload-on is the one exception (critical acts at once), so judge only the others.
    assert_spaced([(t, a) for t, a in timed if a.kind != "offload_on"])


# --- mode and switches ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (Level(threads=4), "local"),
        (Level(threads=3), "degraded"),
        (Level(threads=4, cap_steps=1), "degraded"),
        (Level(threads=4, offload=True), "offloading"),
        (Level(threads=1, cap_steps=2, offload=True), "offloading"),
    ],
)
def test_mode_names_the_level(level: Level, expected: str) -> None:
    """mode() is 'offloading' whenever offloading, 'degraded' below full threads or with a cap, else 'local'."""
    assert mode(replace(PolicyState.initial(4), level=level)) == expected


def test_disabled_policy_never_acts() -> None:
    """With adapt.enabled = false nothing changes, however hot."""
    _, actions = run(PolicyState.initial(4), [obs(ts=float(s), t=90.0) for s in range(100)],
                     AdaptSettings(enabled=False))
    assert actions == []


def test_single_core_device_never_goes_below_one_thread() -> None:
    """With one thread to start with, heat goes straight to the quant cap."""
    _, actions = decide(PolicyState.initial(1), obs(t=78.0), AdaptSettings(min_threads=2))
    assert isinstance(actions[0], CapQuant)


def test_settings_reject_a_recover_band_narrower_than_the_margin() -> None:
    """thermal_recover_c <= thermal_margin_c would let the policy flap, so the config is refused."""
    with pytest.raises(ValueError, match="thermal_recover_c"):
        AdaptSettings(thermal_margin_c=5.0, thermal_recover_c=5.0)


# -- engine changes count once done -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "held", "done"),
    [
        (SetThreads(2, 4, "soc_near_soft_limit"), Level(threads=4), Level(threads=2)),
        (SetThreads(4, 2, "recovered"), Level(threads=2), Level(threads=4)),
        (CapQuant(1, 0, "memory_budget"), Level(threads=4), Level(threads=4, cap_steps=1)),
        (CapQuant(0, 1, "recovered"), Level(threads=4, cap_steps=1), Level(threads=4)),
    ],
)
def test_an_engine_change_counts_only_once_done(action: SetThreads | CapQuant, held: Level, done: Level) -> None:
    """hold() keeps the level at what runs while the change is in flight; settle() advances it only when done."""
    decided = replace(PolicyState.initial(4), level=done, last_change_ts=7.0)
    waiting = hold(decided, action)
    assert waiting.level == held
    assert waiting.last_change_ts == 7.0  # the dwell still starts at the decision
    assert settle(waiting, action, done=True).level == done
    assert settle(waiting, action, done=False) == waiting


def test_a_failed_cap_is_asked_again_from_the_real_level() -> None:
    """After a cap that failed, the next step down after the dwell asks for the same rung again."""
    state, actions = decide(PolicyState.initial(1), obs(t=78.0), CFG)
    (cap,) = actions
    assert isinstance(cap, CapQuant)
    state = settle(hold(state, cap), cap, done=False)
    assert mode(state) == "local"
    _, again = decide(state, obs(ts=CFG.down_dwell_s, t=78.0), CFG)
    assert again == [CapQuant(1, 0, again[0].reason, again[0].numbers)]  # type: ignore[union-attr]
