"""CLI subcommands: one module per command group, each exporting ``add_parser(subparsers)``.

A command's handler takes the parsed ``argparse.Namespace`` and returns an exit code; it raises
:class:`agent.errors.AgentError` for failures the operator should read. Only ``agent.__main__`` exits.
To add a command: write ``agent/cli/<name>.py`` and list it below.

Modules are imported on demand: the resident daemon (``run``) then loads none of the client commands and
what they pull in (the Hub client for ``models``, httpx, tqdm): 8.7 MiB of RSS on a device that serves a
fixed model file, measured with ``RssAnon`` after ``import llama_cpp``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

COMMAND_NAMES: tuple[str, ...] = (
    "ask", "chat", "completion", "config_cmd", "fleet", "gateway", "models", "models_cache", "probe", "run", "status",
)


def command_modules(names: Iterable[str] = COMMAND_NAMES) -> tuple[ModuleType, ...]:
    """The command modules ``names`` (module names under agent.cli), imported now."""
    return tuple(importlib.import_module(f"agent.cli.{name}") for name in names)
