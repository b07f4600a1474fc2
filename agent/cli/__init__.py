"""CLI subcommands: one module per command group, each exporting ``add_parser(subparsers)``.

A command's handler takes the parsed ``argparse.Namespace`` and returns an exit code; it raises
:class:`agent.errors.AgentError` for failures the operator should read. Only ``agent.__main__`` exits.
To add a command: write ``agent/cli/<name>.py`` and list it below.
"""

from __future__ import annotations

from types import ModuleType

from agent.cli import ask, chat, completion, config_cmd, fleet, gateway, models, models_cache, probe, run, status

COMMAND_MODULES: tuple[ModuleType, ...] = (
    ask, chat, completion, config_cmd, fleet, gateway, models, models_cache, probe, run, status,
)
