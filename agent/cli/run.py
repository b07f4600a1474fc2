"""``edge-agent run``: the long-running daemon (what systemd starts)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import structlog

from agent.cli.config_cmd import add_config_argument
from agent.logs import configure_logging
from agent.sdnotify import Notifier
from agent.settings import load_config

log = structlog.get_logger("agent.run")


def add_parser(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run the agent daemon in the foreground")
    add_config_argument(run)
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Strict: the daemon must see its fleet overrides; an unreadable layer stops it (exit 77).
    loaded = load_config(args.config, required=args.config is not None, strict_overrides=True)
    settings = loaded.settings
    configure_logging(settings.log.level, settings.log.format)
    overrides = loaded.layer("fleet-override")
    if overrides.keys:
        # They win over the provisioned file: say so, or a file edit that "does nothing" puzzles the operator.
        log.info("config_overrides_active", path=overrides.where, keys=list(overrides.keys),
                 hint="edge-agent config reset-overrides clears them")
    from agent.daemon import Daemon  # noqa: PLC0415 - keeps `config check` free of llama/paho imports

    daemon = Daemon(settings, notifier=_notifier(), config_path=loaded.config_path)
    daemon.install_signal_handlers(test_hooks=os.environ.get("EDGE_TEST_HOOKS") == "1")
    return daemon.run()


def _notifier() -> Notifier:
    return Notifier.from_environ(os.environ)
