"""``edge-agent run``: the long-running daemon (what systemd starts)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from agent.commands.config_cmd import add_config_argument
from agent.logs import configure_logging
from agent.sdnotify import Notifier
from agent.settings import load_settings


def add_parser(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run the agent daemon in the foreground")
    add_config_argument(run)
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, required=args.config is not None)
    configure_logging(settings.log.level, settings.log.format)
    from agent.daemon import Daemon  # noqa: PLC0415 - keeps `config check` free of llama/paho imports

    daemon = Daemon(settings, notifier=_notifier(), config_path=args.config)
    daemon.install_signal_handlers(test_hooks=os.environ.get("EDGE_TEST_HOOKS") == "1")
    return daemon.run()


def _notifier() -> Notifier:
    return Notifier.from_environ(os.environ)
