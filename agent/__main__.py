"""The ``edge-agent`` command line: the only place in the package that exits the process."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import __version__
from agent.commands import COMMAND_MODULES
from agent.errors import AgentError
from agent.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Serve small GGUF language models over MQTT from a Linux board.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # One-shot commands log warnings to stderr; `run` reconfigures for the daemon from its settings.
    configure_logging("warning", "console", stream=sys.stderr)
    try:
        code: int = args.func(args)
    except AgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 2 if exc.code == "bad_config" else 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
