"""Errors of fleet commands beyond the signature ones (those are in :mod:`agent.fleet.signing`)."""

from __future__ import annotations

from agent.errors import AgentError, BadRequestError


class ExpiredCommandError(AgentError):
    """The command's ``expires_at`` has passed; it was not run."""

    code = "expired"


class UnknownCommandError(BadRequestError):
    """No command of that name exists on this device."""

    code = "unknown_command"
