"""The broker failover state machine: fail over after the configured outage, fail back at once."""

from __future__ import annotations

import pytest

from agent.transport.failover import FailoverState, failover_step


@pytest.mark.parametrize(
    ("state", "connected", "now", "expected", "transition"),
    [
        (FailoverState(), True, 0.0, FailoverState(), None),
        (FailoverState(), False, 10.0, FailoverState(down_since=10.0), None),
        (FailoverState(down_since=10.0), False, 39.9, FailoverState(down_since=10.0), None),
        (FailoverState(down_since=10.0), False, 40.0, FailoverState(active=True, down_since=10.0), "failover"),
        (FailoverState(active=True, down_since=10.0), False, 100.0, FailoverState(active=True, down_since=10.0), None),
        (FailoverState(active=True, down_since=10.0), True, 101.0, FailoverState(), "failback"),
        (FailoverState(down_since=10.0), True, 20.0, FailoverState(), None),
    ],
    ids=["up", "first-seen-down", "not-yet", "fail-over", "stay-over", "fail-back", "short-blip"],
)
def test_failover_step(state, connected, now, expected, transition) -> None:
    """A blip shorter than failover_after_s changes nothing; a longer outage fails over; recovery fails back."""
    assert failover_step(state, primary_connected=connected, now=now, after_s=30.0) == (expected, transition)
