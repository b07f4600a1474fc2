"""Transitional: the dispatcher moved to :mod:`agent.fleet.service` (removed once agent.daemon imports it there)."""

from agent.fleet.service import FleetService

__all__ = ["FleetService"]
