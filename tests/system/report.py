"""Figures measured during the system tests (boot and install times, exposure, restart counts, pull
timings), printed in a section at the end of the pytest run by the ``pytest_terminal_summary`` hook in
conftest.py."""

from __future__ import annotations

FIGURES: dict[str, object] = {}


def record(name: str, value: object) -> None:
    """Keep a measured figure for the end-of-run summary (a later value under the same name wins)."""
    FIGURES[name] = value
