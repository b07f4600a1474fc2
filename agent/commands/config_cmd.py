"""``edge-agent config check``: validate a config file and print the effective settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.settings import DEFAULT_CONFIG_PATH, load_settings, redacted_dict


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--config PATH`` option every command that reads the config shares."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file (default {DEFAULT_CONFIG_PATH}; EDGE_AGENT_* variables override it)",
    )


def add_parser(subparsers: Any) -> None:
    config = subparsers.add_parser("config", help="inspect the configuration")
    inner = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = inner.add_parser("check", help="validate and print the effective config (secrets redacted)")
    add_config_argument(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML-like text")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, required=args.config is not None)
    data = redacted_dict(settings)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_as_toml(data))
    return 0


def _as_toml(data: dict[str, Any]) -> str:
    """A TOML-shaped rendering (scalars first, then one table per section)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return "# (unset)"
    return json.dumps(value)
